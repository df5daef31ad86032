"""Shared harness of the figure scripts: one pretraining run per variant, reused.

A variant is (objective, equiv_weight) on top of a scale's base config:
  smoke  the quickstart smoke preset, evaluated on 2048 + 1024 images (seconds; tests)
  small  the quickstart model on the embedded Fashion-MNIST, CPU-sized
  paper  the release's CIFAR-10 settings (configs/cifar10_*.py), needs tfds data
         (--data_dir) and an accelerator
Runs land in <results>/runs/<scale>/<variant>/ (--results, default
experiments/results); a run whose report.json exists is reused, so fig3 and fig4 share their CARE and SimCLR runs, and an
interrupted script resumes from the runs' checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from care_jax import config_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
VARIANTS = {
    "simclr": {"objective": "simclr", "equiv_weight": 0.0},
    "care": {"objective": "care"},  # the scale's lambda
    "equi_unif": {"objective": "equi_unif", "equiv_weight": 1.0},
}


def _load_config(name: str, preset: str = ""):
  return config_lib.load_config_file(ROOT / "configs" / f"{name}.py", preset)


def base_config(scale: str):
  if scale == "smoke":
    c = _load_config("quickstart", "smoke")
    c.eval_train_split, c.test_split = "train[:2048]", "test[:1024]"
    c.num_train_steps, c.checkpoint_every_steps, c.linear_probe_epochs = 2, 0, 1
    return c
  if scale == "small":
    c = _load_config("quickstart")
    c.num_train_steps = 240  # three variants within the 30-minute budget on 2 cores
    c.linear_probe_seeds = 3
    c.random_init_baseline = False
    return c
  if scale == "paper":
    c = _load_config("cifar10_care")
    c.linear_probe_seeds = 5
    return c
  raise ValueError(f"--scale={scale!r}: use smoke, small or paper")


def variant_config(scale: str, variant: str, seed: int = 0, **overrides):
  c = base_config(scale)
  for k, v in {**VARIANTS[variant], "seed": seed, **overrides}.items():
    c[k] = v
  return c


def run_variant(scale: str, variant: str, *, seed: int = 0, data_dir: str = "", results=RESULTS,
                equiv_weight: float | None = None) -> dict:
  """Pretrains + evaluates one variant (or reuses its finished run); returns its report.

  equiv_weight overrides the variant's lambda (a sweep); the run's folder names it.
  """
  from care_jax import train  # noqa: PLC0415
  name = variant if equiv_weight is None else f"{variant}-w{equiv_weight:g}"
  workdir = pathlib.Path(results) / "runs" / scale / f"{name}-seed{seed}"
  report_path = workdir / "report.json"
  if report_path.exists():
    print(f"reusing {report_path}", file=sys.stderr)
    return json.loads(report_path.read_text())
  overrides = {"data_dir": data_dir} if data_dir else {}
  if equiv_weight is not None:
    overrides["equiv_weight"] = equiv_weight
  config = variant_config(scale, variant, seed, **overrides)
  config_lib.validate(config, _device_count())
  print(f"pretraining {variant} ({scale}) into {workdir}", file=sys.stderr)
  return train.train_and_evaluate(config, str(workdir))


def random_init_report(scale: str, data_dir: str = "", results=RESULTS, seed: int = 0) -> dict:
  """kNN and linear probe of the untrained encoder (the scale's architecture, initialised with `seed`)."""
  import jax  # noqa: PLC0415

  from care_jax import evaluate, train  # noqa: PLC0415
  path = pathlib.Path(results) / "runs" / scale / ("random_init.json" if seed == 0 else f"random_init-seed{seed}.json")
  if path.exists():
    return json.loads(path.read_text())
  config = variant_config(scale, "care", seed, **({"data_dir": data_dir} if data_dir else {}))
  mesh = train.make_mesh()
  model = train.build_model(config)
  variables = train.random_init_variables(model, config, mesh)
  evaluator = evaluate.RunEvaluator(config, model, mesh, log=lambda m: print(m, file=sys.stderr))
  knn = evaluator.knn(variables, "random_init")
  probe = evaluator.linear_probe(variables, "random_init", config.linear_probe_seeds)
  result = {"knn_top1": knn["top1"], "linear_probe_top1": probe["top1"], "std": probe["top1_std"],
            "linear_probe": probe, "devices": jax.device_count(), "seed": seed}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2))
  return result


def _device_count() -> int:
  import jax  # noqa: PLC0415
  return jax.device_count()


def parse_args(description: str, argv=None, extra=None):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--scale", choices=("smoke", "small", "paper"), default="small")
  parser.add_argument("--data_dir", default="", help="tfds data_dir for --scale=paper")
  parser.add_argument("--results", default=str(RESULTS), help="root of runs/ and the figure folders")
  parser.add_argument("--out", default="", help="figure folder (default <results>/<figure>)")
  parser.add_argument("--pretrain_seeds", type=int, default=1,
                      help="pretraining runs per variant (seeds 0..N-1); error bars over them when N > 1")
  if extra is not None:
    extra(parser)
  return parser.parse_args(argv)


def run_seeds(args, variant: str) -> list:
  """Reports of `variant` pretrained with seeds 0..args.pretrain_seeds-1 (finished runs reused)."""
  if args.pretrain_seeds < 1:
    raise ValueError(f"--pretrain_seeds must be >= 1, got {args.pretrain_seeds}")
  return [run_variant(args.scale, variant, seed=seed, data_dir=args.data_dir, results=args.results)
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
  path = pathlib.Path(args.out) if args.out else pathlib.Path(args.results) / figure
  path.mkdir(parents=True, exist_ok=True)
  return path


def pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def settings(scale: str) -> dict:
  c = base_config(scale)
  return {k: c[k] for k in ("dataset", "model", "model_width", "image_size", "batch_size", "num_train_steps",
                            "num_epochs", "optimizer", "learning_rate", "temperature", "equiv_weight",
                            "equiv_splits", "linear_probe_epochs", "linear_probe_seeds", "wahba_trials",
                            "wahba_examples")}
