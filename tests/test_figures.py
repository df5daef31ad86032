"""The figure scripts end to end at --scale=smoke: runs shared, JSON and PNG written.

Pretraining seed 0 of CARE and of the swept L_equi + L_unif weight is a real
smoke run; every other run (seed 1 of each variant, and SimCLR's seed 0: its
objective's training is test_train's) is a finished run's report.json written
beforehand with known numbers, which the scripts must reuse (as they reuse any
finished run) and aggregate with the real runs'.
"""

import json
import os

import numpy as np
import pytest

from care_jax import datasets

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed")

# Seed 1's known numbers: probe top-1 and the three Wahba trials' errors.
SEED1 = {"simclr": (41.0, [3.0, 4.0, 5.0]), "care": (43.0, [1.0, 2.0, 6.0]), "equi_unif-w0.5": (37.0, [2.0, 2.0, 2.0])}
SIMCLR_SEED0 = (39.0, [4.0, 5.0, 7.0])
RANDOM_INIT_SEED1 = 23.0


def _finished_report(probe_top1: float, wahba: list) -> dict:
  """The fields of a run's report.json that the figure scripts read."""
  return {"linear_probe": {"top1": probe_top1, "top1_std": 0.5, "top1_per_seed": [probe_top1 - 0.5, probe_top1 + 0.5]},
          "linear_probe_top1": probe_top1, "knn_top1": probe_top1 + 1.0,
          "wahba_error_mean": float(np.mean(wahba)), "relative_equivariance": 0.25,
          "wahba_trials": [{"wahba_error": w, "relative_equivariance": 0.25} for w in wahba]}


@needs_fashion_mnist
def test_figure_scripts_run_share_their_runs_and_write_json_and_png(tmp_path, capsys):
  from experiments import fig2_ablation, fig3_wahba, fig4_linear_probe, paper_runs
  simclr = paper_runs.variant_config("smoke", "simclr")  # what SimCLR's seed 0 would train
  assert simclr.objective == "simclr" and simclr.equiv_weight == 0
  runs_dir = tmp_path / "runs" / "smoke"
  finished = {f"{name}-seed1": known for name, known in SEED1.items()} | {"simclr-seed0": SIMCLR_SEED0}
  for run, (probe, wahba) in finished.items():
    (runs_dir / run).mkdir(parents=True)
    (runs_dir / run / "report.json").write_text(json.dumps(_finished_report(probe, wahba)))
  random_init = {"knn_top1": 30.0, "linear_probe_top1": RANDOM_INIT_SEED1, "std": 0.5, "seed": 1,
                 "linear_probe": {"top1": RANDOM_INIT_SEED1, "top1_std": 0.5, "top1_per_seed": [RANDOM_INIT_SEED1] * 2}}
  (runs_dir / "random_init-seed1.json").write_text(json.dumps(random_init))

  common = ["--scale=smoke", f"--results={tmp_path}", "--pretrain_seeds=2"]
  fig2 = fig2_ablation.main(common + ["--equi_unif_weights", "0.5"])
  err = capsys.readouterr().err
  assert err.count("pretraining") == 2 and err.count("reusing") == 4  # care, equi_unif seed 0 trained
  assert sorted(p.name for p in runs_dir.iterdir()) == [
      "care-seed0", "care-seed1", "equi_unif-w0.5-seed0", "equi_unif-w0.5-seed1",
      "random_init-seed1.json", "random_init.json", "simclr-seed0", "simclr-seed1"]
  # A swept weight gets its own run folder and is what that run trained with.
  config = json.loads((runs_dir / "equi_unif-w0.5-seed0" / "config.json").read_text())
  assert config["equiv_weight"] == 0.5 and config["objective"] == "equi_unif" and config["seed"] == 0
  assert set(fig2["equi_unif_sweep"]) == {"0.5"} and fig2["equi_unif"] == fig2["equi_unif_sweep"]["0.5"]
  for name in ("simclr", "care", "equi_unif-w0.5"):
    seed0 = json.loads((runs_dir / f"{name}-seed0" / "report.json").read_text())
    if name != "simclr":  # a real run's report
      assert seed0["knn"]["bank_size"] == 2048 and seed0["knn"]["num_queries"] == 1024
    probe = [seed0["linear_probe"]["top1"], SEED1[name][0]]
    bar = fig2[name.split("-")[0]]
    assert bar["per_pretrain_seed"] == probe
    assert bar["linear_probe_top1"] == pytest.approx((probe[0] + probe[1]) / 2)
    assert bar["std"] == pytest.approx(abs(probe[0] - probe[1]) / 2 ** 0.5)  # ddof=1 of two values
  assert fig2["random_init"]["per_pretrain_seed"][1] == RANDOM_INIT_SEED1

  fig4 = fig4_linear_probe.main(common)
  fig3 = fig3_wahba.main(common)
  assert "pretraining" not in capsys.readouterr().err  # fig3 and fig4 trained nothing new
  for name in ("simclr", "care"):
    assert fig4[name] == fig2[name]  # one summary of the same runs
    # Trials in [pretraining seed, trial] order: seed 1's are the known ones.
    assert len(fig3["per_trial"][name]) == 2 * 3 and fig3["per_trial"][name][3:] == SEED1[name][1]
  assert fig3["per_trial"]["simclr"][:3] == SIMCLR_SEED0[1]
  care, simclr = np.array(fig3["per_trial"]["care"]), np.array(fig3["per_trial"]["simclr"])
  assert fig3["care_below_simclr_fraction"] == pytest.approx(np.mean(care < simclr))
  assert fig3["care_wahba_error_max"] == care.max() and fig3["care_wahba_error_mean_per_pretrain_seed"][1] == 3.0
  assert fig4["care_minus_simclr"]["per_pretrain_seed"] == pytest.approx(
      [c - s for c, s in zip(fig4["care"]["per_pretrain_seed"], fig4["simclr"]["per_pretrain_seed"])])
  for figure in ("fig2_ablation", "fig3_wahba", "fig4_linear_probe"):
    assert json.loads((tmp_path / figure / f"{figure}.json").read_text())["scale"] == "smoke"
    assert (tmp_path / figure / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_scale_runs_each_figure4_pair_with_its_release_config():
  from care_jax import config_lib
  from experiments import paper_runs
  expected = {"cifar10": ("cifar10", "care", 0.03), "cifar100": ("cifar100", "care", 0.001),
              "stl10": ("stl10", "care", 0.01), "imagenet100": ("imagenet100", "care", 0.005),
              "imagenet100_moco": ("imagenet100", "moco_care", 0.005)}
  assert set(paper_runs.PAPER_RUNS) == set(expected)
  for name, (dataset, care_objective, weight) in expected.items():
    base, care = paper_runs.compared_variants("paper", name)
    assert care == care_objective
    care_config = paper_runs.variant_config("paper", care, dataset=name)
    base_config = paper_runs.variant_config("paper", base, dataset=name)
    assert care_config.dataset == base_config.dataset == dataset, name
    assert care_config.objective == care and care_config.equiv_weight == weight, name  # the release's lambda
    assert base_config.objective == ("moco" if care == "moco_care" else "simclr") and base_config.equiv_weight == 0
    assert care_config.linear_probe_seeds == 5
    for config in (care_config, base_config):
      config_lib.validate(config, num_devices=1)
  assert paper_runs.compared_variants("small") == ("simclr", "care")


@pytest.mark.parametrize("argv, message", [
    (["--scale=paper", "--paper_dataset=cifar100"], "'cifar100' is not prepared under"),
    (["--scale=paper", "--paper_dataset=cifar100"], "and pass --data_dir=DIR"),  # this script's flag
    (["--scale=small", "--paper_dataset=stl10"], "--paper_dataset=stl10 needs --scale=paper"),
    (["--scale=smoke", "--pretrain_seeds=0"], "--pretrain_seeds must be >= 1"),  # was a ZeroDivisionError
])
def test_paper_scale_without_its_data_stops_in_seconds_with_one_line(tmp_path, capsys, argv, message):
  import time

  from experiments import fig2_ablation, fig3_wahba, fig4_linear_probe
  start = time.perf_counter()
  with pytest.raises(SystemExit) as stop:
    fig4_linear_probe.main(argv + [f"--data_dir={tmp_path}", f"--results={tmp_path}"])
  assert stop.value.code != 0 and time.perf_counter() - start < 30
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and not list(tmp_path.glob("fig4_linear_probe/**/*.json"))
  with pytest.raises(SystemExit):
    fig2_ablation.main(["--scale=smoke", "--equi_unif_weights", "1", "-1", f"--results={tmp_path}"])
  assert capsys.readouterr().err.strip() == "error: --equi_unif_weights 1 -1: each L_equi weight must be >= 0"
  with pytest.raises(SystemExit):  # the MoCo pair is fig4's only
    fig3_wahba.main(["--scale=paper", "--paper_dataset=imagenet100_moco", f"--results={tmp_path}"])
  assert "fig3_wahba compares SimCLR and CARE" in capsys.readouterr().err


def test_paper_scale_moco_pair_reuses_finished_runs_and_stores_the_papers_numbers(tmp_path):
  from experiments import fig4_linear_probe
  runs_dir = tmp_path / "runs" / "paper" / "imagenet100_moco"
  known = {"moco": [73.0, 72.0], "moco_care": [74.5, 74.0]}
  for variant, probes in known.items():
    for seed, probe in enumerate(probes):
      (runs_dir / f"{variant}-seed{seed}").mkdir(parents=True)
      (runs_dir / f"{variant}-seed{seed}" / "report.json").write_text(json.dumps(_finished_report(probe, [1.0])))
  result = fig4_linear_probe.main(["--scale=paper", "--paper_dataset=imagenet100_moco", "--pretrain_seeds=2",
                                   f"--results={tmp_path}"])
  assert result["moco"]["per_pretrain_seed"] == known["moco"]
  assert result["moco_care_minus_moco"]["per_pretrain_seed"] == pytest.approx([1.5, 2.0])
  assert result["paper_linear_probe_top1"] == {"moco": 73.16, "moco_care": 74.22}
  assert result["settings"]["dataset"] == "imagenet100"
  assert result["settings"]["equiv_batch_size"] == 128  # the release's equivariant batch, recorded with the result
  out = tmp_path / "fig4_linear_probe" / "paper-imagenet100_moco"
  assert json.loads((out / "fig4_linear_probe.json").read_text())["scale"] == "paper"
  assert (out / "fig4_linear_probe.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_folder_from_other_settings_is_neither_reused_nor_resumed(tmp_path, capsys):
  from care_jax import config_lib
  from experiments import paper_runs
  workdir = paper_runs.runs_dir("smoke", "cifar10", tmp_path) / "care-seed0"
  workdir.mkdir(parents=True)
  (workdir / "report.json").write_text(json.dumps(_finished_report(40.0, [1.0, 2.0, 3.0])))
  trained = paper_runs.variant_config("smoke", "care", data_dir="/old/mount")
  (workdir / "config.json").write_text(trained.to_json_best_effort())
  # The same settings with the data elsewhere: reused.
  assert paper_runs.run_variant("smoke", "care", results=tmp_path)["linear_probe_top1"] == 40.0
  assert "reusing" in capsys.readouterr().err
  trained.num_train_steps, trained.equiv_weight = 7, 0.5  # e.g. an older scale definition
  (workdir / "config.json").write_text(trained.to_json_best_effort())
  with pytest.raises(config_lib.ConfigError, match=r"care-seed0 holds a run with other settings \("
                     r"equiv_weight=0\.5 there, 0\.03 here; num_train_steps=7 there, 2 here\); delete it"):
    paper_runs.run_variant("smoke", "care", results=tmp_path)
  # The random-init report records its config and is checked the same way.
  stale = paper_runs.variant_config("smoke", "care", model_width=0.5)
  (workdir.parent / "random_init.json").write_text(json.dumps({"knn_top1": 30.0,
                                                                "config": json.loads(stale.to_json_best_effort())}))
  with pytest.raises(config_lib.ConfigError, match=r"random_init\.json holds a run with other settings \("
                     r"model_width=0\.5 there, 0\.0625 here\)"):
    paper_runs.random_init_report("smoke", results=tmp_path)


@needs_fashion_mnist
def test_damaged_run_files_name_the_file_or_are_made_again(tmp_path, capsys):
  from care_jax import config_lib
  from experiments import paper_runs
  workdir = paper_runs.runs_dir("smoke", "cifar10", tmp_path) / "care-seed0"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text('{"batch_size": 3')  # the run's record of its settings: kept, refused
  with pytest.raises(config_lib.ConfigError, match=r"care-seed0/config\.json is not readable JSON \(JSONDecodeError: "
                     r".*\); delete .*care-seed0 to retrain, or pass another --results$"):
    paper_runs.run_variant("smoke", "care", results=tmp_path)
  # The random-init report is derived data: a damaged one is made again, and written aside then renamed.
  (workdir.parent / "random_init.json").write_text('{"knn_top1": 3')
  again = paper_runs.random_init_report("smoke", results=tmp_path)
  assert "random_init.json is not readable JSON" in capsys.readouterr().err
  assert json.loads((workdir.parent / "random_init.json").read_text())["knn_top1"] == again["knn_top1"] > 0
  assert not list(workdir.parent.glob("*.partial"))
