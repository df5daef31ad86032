"""Shared harness of the figure scripts: one pretraining run per variant, reused.

A variant is (objective, equiv_weight) on top of a scale's base config:
  smoke  the quickstart smoke preset (2 steps, evaluated on 2048 + 1024 images: seconds; tests)
  small  the quickstart model on the embedded Fashion-MNIST, CPU-sized
  paper  the release's settings for one of the paper's Figure-4 runs
         (--paper_dataset: cifar10, cifar100, stl10, imagenet100, or
         imagenet100_moco for MoCo-v2 vs MoCo-v2 + CARE), from configs/; needs
         tfds data (--data_dir) and an accelerator
Runs land in <results>/runs/<scale>/<variant>/ (paper: runs/paper/<dataset>/;
--results, default experiments/results); a run whose report.json exists is
reused, so fig3 and fig4 share their CARE and SimCLR runs, and an interrupted
script resumes from the runs' checkpoints. A run folder whose config.json
differs from the variant's config (data_dir aside) stops the script with one
line: its report would stand in a figure for settings it was not trained with.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys

# Before anything loads jaxlib (care_jax/main.py says why), so the figure
# scripts import this module first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from care_jax import config_lib, metric_writers  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
VARIANTS = {
    "simclr": {"objective": "simclr", "equiv_weight": 0.0},
    "care": {"objective": "care"},  # the scale's lambda
    "equi_unif": {"objective": "equi_unif", "equiv_weight": 1.0},
    "moco": {"objective": "moco", "equiv_weight": 0.0},
    "moco_care": {"objective": "moco_care"},  # the config's lambda
}
# --scale=paper: the config file of each of the paper's Figure-4 runs, the pair it
# compares (baseline, CARE) and the paper's linear-probe top-1 for that pair.
PAPER_RUNS = {
    "cifar10": ("cifar10_care", ("simclr", "care"), (90.98, 91.92)),
    "cifar100": ("cifar100_care", ("simclr", "care"), (66.77, 68.05)),
    "stl10": ("stl10_care", ("simclr", "care"), (84.19, 84.64)),
    "imagenet100": ("imagenet100_care", ("simclr", "care"), (72.79, 76.69)),
    "imagenet100_moco": ("imagenet100_moco_care", ("moco", "moco_care"), (73.16, 74.22)),
}


def _load_config(name: str, preset: str = ""):
  return config_lib.load_config_file(ROOT / "configs" / f"{name}.py", preset)


def base_config(scale: str, dataset: str = "cifar10"):
  if scale == "smoke":
    c = _load_config("quickstart", "smoke")
    c.num_train_steps, c.checkpoint_every_steps, c.linear_probe_epochs = 2, 0, 1
    c.composition_trials = 0  # no figure reads the Corollary-1 report
    return c
  if scale == "small":
    c = _load_config("quickstart")
    c.num_train_steps = 240  # three variants within the 30-minute budget on 2 cores
    c.linear_probe_seeds = 3
    c.random_init_baseline = False
    return c
  if scale == "paper":
    c = _load_config(PAPER_RUNS[dataset][0])
    c.linear_probe_seeds = 5
    return c
  raise ValueError(f"--scale={scale!r}: use smoke, small or paper")


def compared_variants(scale: str, dataset: str = "cifar10") -> tuple:
  """(baseline, CARE) variants the scale compares: SimCLR and CARE, or MoCo-v2 and MoCo-v2 + CARE."""
  return PAPER_RUNS[dataset][1] if scale == "paper" else ("simclr", "care")


def runs_dir(scale: str, dataset: str, results=RESULTS) -> pathlib.Path:
  return pathlib.Path(results) / "runs" / scale / (dataset if scale == "paper" else "")


def variant_config(scale: str, variant: str, seed: int = 0, dataset: str = "cifar10", **overrides):
  c = base_config(scale, dataset)
  for k, v in {**VARIANTS[variant], "seed": seed, **overrides}.items():
    c[k] = v
  return c


def run_variant(scale: str, variant: str, *, seed: int = 0, data_dir: str = "", results=RESULTS,
                equiv_weight: float | None = None, dataset: str = "cifar10") -> dict:
  """Pretrains + evaluates one variant (or reuses its finished run); returns its report.

  equiv_weight overrides the variant's lambda (a sweep); the run's folder names it.
  """
  from care_jax import train  # noqa: PLC0415
  name = variant if equiv_weight is None else f"{variant}-w{equiv_weight:g}"
  workdir = runs_dir(scale, dataset, results) / f"{name}-seed{seed}"
  overrides = {"data_dir": data_dir} if data_dir else {}
  if equiv_weight is not None:
    overrides["equiv_weight"] = equiv_weight
  config = variant_config(scale, variant, seed, dataset, **overrides)
  saved = config_lib.saved_config(workdir, f"delete {workdir} to retrain, or pass another --results")
  _check_same_settings(workdir, saved, config)
  report = _derived_json(workdir / "report.json")  # damaged: the run is evaluated again
  if report is not None:
    print(f"reusing {workdir / 'report.json'}", file=sys.stderr)
    return report
  config_lib.validate(config, _device_count())
  print(f"pretraining {variant} ({scale}) into {workdir}", file=sys.stderr)
  return train.train_and_evaluate(config, str(workdir))


def _derived_json(path) -> dict | None:
  """A report made from checkpoints or weights: None where missing, or damaged (said), to make again."""
  return metric_writers.read_derived_json(path, lambda line: print(line, file=sys.stderr), "making it again")


# Where the data lives, not what was trained: a run may be reused from another mount.
_LOCATION_FIELDS = ("data_dir", "download")


def _check_same_settings(where: pathlib.Path, saved: dict | None, config) -> None:
  """A run (or random-init report) from other settings, an older scale definition say, is
  neither reused nor resumed: its report would stand in the figure for this config's."""
  if saved is None:
    return
  differ = [f"{k}={there!r} there, {here!r} here" for k, there, here in config_lib.config_changes(saved, config)
            if k not in _LOCATION_FIELDS]
  if differ:
    raise config_lib.ConfigError(f"{where} holds a run with other settings ({'; '.join(differ[:3])}"
                                 f"{'; ...' if len(differ) > 3 else ''}); delete it to retrain, or "
                                 "pass another --results")


def random_init_report(scale: str, data_dir: str = "", results=RESULTS, seed: int = 0,
                       dataset: str = "cifar10") -> dict:
  """kNN and linear probe of the untrained encoder (the scale's architecture, initialised with `seed`)."""
  import jax  # noqa: PLC0415

  from care_jax import evaluate, train  # noqa: PLC0415
  path = runs_dir(scale, dataset, results) / ("random_init.json" if seed == 0 else f"random_init-seed{seed}.json")
  config = variant_config(scale, compared_variants(scale, dataset)[1], seed, dataset,
                          **({"data_dir": data_dir} if data_dir else {}))
  result = _derived_json(path)
  if result is not None:
    _check_same_settings(path, result.get("config"), config)
    return result
  config_lib.validate(config, _device_count())
  mesh = train.make_mesh()
  model = train.build_model(config)
  variables = train.random_init_variables(model, config, mesh)
  evaluator = evaluate.RunEvaluator(config, model, mesh, log=lambda m: print(m, file=sys.stderr))
  knn = evaluator.knn(variables, "random_init")
  probe = evaluator.linear_probe(variables, "random_init", config.linear_probe_seeds)
  result = {"knn_top1": knn["top1"], "linear_probe_top1": probe["top1"], "std": probe["top1_std"],
            "linear_probe": probe, "devices": jax.device_count(), "seed": seed,
            "config": json.loads(config.to_json_best_effort())}
  path.parent.mkdir(parents=True, exist_ok=True)
  metric_writers.write_atomically(path, json.dumps(result, indent=2))  # a kill leaves no half file
  return result


def _device_count() -> int:
  import jax  # noqa: PLC0415
  return jax.device_count()


def parse_args(description: str, argv=None, extra=None):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--scale", choices=("smoke", "small", "paper"), default="small")
  parser.add_argument("--paper_dataset", choices=tuple(PAPER_RUNS), default=None,
                      help="--scale=paper only: which of the paper's runs (default cifar10)")
  parser.add_argument("--data_dir", default="", help="tfds data_dir for --scale=paper")
  parser.add_argument("--results", default=str(RESULTS), help="root of runs/ and the figure folders")
  parser.add_argument("--out", default="", help="figure folder (default <results>/<figure>)")
  parser.add_argument("--pretrain_seeds", type=int, default=1,
                      help="pretraining runs per variant (seeds 0..N-1); error bars over them when N > 1")
  if extra is not None:
    extra(parser)
  args = parser.parse_args(argv)
  if args.pretrain_seeds < 1:
    parser.error(f"--pretrain_seeds must be >= 1 (pretraining runs per variant), got {args.pretrain_seeds}")
  if args.paper_dataset is not None and args.scale != "paper":
    parser.error(f"--paper_dataset={args.paper_dataset} needs --scale=paper (got --scale={args.scale})")
  args.paper_dataset = args.paper_dataset or "cifar10"
  return args


def require_simclr_pair(args, figure: str) -> None:
  """fig2 and fig3 compare SimCLR-family runs; the MoCo pair is fig4's."""
  if compared_variants(args.scale, args.paper_dataset) != ("simclr", "care"):
    print(f"error: --paper_dataset={args.paper_dataset}: {figure} compares SimCLR and CARE runs; the MoCo-v2 pair "
          "is fig4_linear_probe's (use cifar10, cifar100, stl10 or imagenet100 here)", file=sys.stderr)
    sys.exit(2)


def main_guard(main):
  """Runs a figure script's main: a bad config or missing data ends with one line and status 1."""
  @functools.wraps(main)
  def guarded(argv=None):
    from care_jax import checkpoints, train  # noqa: PLC0415
    try:
      return main(argv)
    except (config_lib.ConfigError, checkpoints.CheckpointError, train.TrainingDivergedError) as e:
      # The data's fix is this script's --data_dir, not the trainer's --config.data_dir.
      print(f"error: {str(e).replace('--config.data_dir=', '--data_dir=')}", file=sys.stderr)
      sys.exit(1)
  return guarded


def run_seeds(args, variant: str) -> list:
  """Reports of `variant` pretrained with seeds 0..args.pretrain_seeds-1 (finished runs reused)."""
  return [run_variant(args.scale, variant, seed=seed, data_dir=args.data_dir, results=args.results,
                      dataset=args.paper_dataset)
          for seed in range(args.pretrain_seeds)]


def summarize_runs(reports: list) -> dict:
  """One variant's figures over its pretraining runs (run reports, or random_init_report's)."""
  probe = [r["linear_probe"]["top1"] for r in reports]
  mean, pretrain_std = mean_std(probe)
  probe_std = sum(r["linear_probe"]["top1_std"] for r in reports) / len(reports)
  out = {"linear_probe_top1": mean,
         # The error bar: over pretraining runs when there are several.
         "std": pretrain_std if len(reports) > 1 else probe_std,
         "std_over": "pretraining seeds (ddof=1)" if len(reports) > 1 else "probe seeds",
         "probe_seed_std": probe_std,
         "per_pretrain_seed": probe,
         "per_seed": reports[0]["linear_probe"]["top1_per_seed"] if len(reports) == 1 else
                     [r["linear_probe"]["top1_per_seed"] for r in reports],
         "knn_top1": mean_std([r["knn_top1"] for r in reports])[0],
         "knn_per_pretrain_seed": [r["knn_top1"] for r in reports]}
  for key in ("wahba_error_mean", "relative_equivariance"):  # absent for random init
    if key in reports[0]:
      out[key] = mean_std([r[key] for r in reports])[0]
  return out


def mean_std(values) -> tuple:
  """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
  import numpy as np  # noqa: PLC0415
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def out_dir(args, figure: str) -> pathlib.Path:
  """--out, else <results>/<figure> (paper scale: <results>/<figure>/paper-<dataset>)."""
  path = pathlib.Path(args.out) if args.out else pathlib.Path(args.results) / figure
  if args.scale == "paper" and not args.out:
    path = path / f"paper-{args.paper_dataset}"
  path.mkdir(parents=True, exist_ok=True)
  return path


def pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def settings(scale: str, dataset: str = "cifar10") -> dict:
  c = base_config(scale, dataset)
  return {k: c[k] for k in ("dataset", "model", "model_width", "image_size", "source_image_size", "batch_size",
                            "num_train_steps", "num_epochs", "optimizer", "learning_rate", "temperature", "equiv_weight",
                            "equiv_splits", "equiv_batch_size", "equiv_augment_pairs", "linear_probe_epochs",
                            "linear_probe_protocol", "linear_probe_lr", "linear_probe_weight_decay",
                            "linear_probe_lr_drop_epochs", "linear_probe_seeds", "bn_groups", "resize_antialias",
                            "wahba_trials", "wahba_examples")}
