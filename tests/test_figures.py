"""The figure scripts end to end at --scale=smoke: runs shared, JSON and PNG written."""

import json
import os

import pytest

from care_jax import datasets

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed")


@needs_fashion_mnist
def test_figure_scripts_run_share_their_runs_and_write_json_and_png(tmp_path, capsys):
  from experiments import fig2_ablation, fig3_wahba, fig4_linear_probe
  common = ["--scale=smoke", f"--results={tmp_path}", "--pretrain_seeds=2"]
  fig2 = fig2_ablation.main(common + ["--equi_unif_weights", "0.5"])
  runs = sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir())
  assert runs == ["care-seed0", "care-seed1", "equi_unif-w0.5-seed0", "equi_unif-w0.5-seed1",
                  "random_init-seed1.json", "random_init.json", "simclr-seed0", "simclr-seed1"]
  # A swept weight gets its own run folder and is what that run trained with.
  config = json.loads((tmp_path / "runs" / "smoke" / "equi_unif-w0.5-seed1" / "config.json").read_text())
  assert config["equiv_weight"] == 0.5 and config["objective"] == "equi_unif" and config["seed"] == 1
  assert set(fig2["equi_unif_sweep"]) == {"0.5"} and fig2["equi_unif"] == fig2["equi_unif_sweep"]["0.5"]
  reports = {(name, s): json.loads((tmp_path / "runs" / "smoke" / f"{name}-seed{s}" / "report.json").read_text())
             for name in ("simclr", "care") for s in (0, 1)}
  for name in ("simclr", "care"):
    probe = [reports[name, s]["linear_probe"]["top1"] for s in (0, 1)]
    assert fig2[name]["per_pretrain_seed"] == probe
    assert fig2[name]["linear_probe_top1"] == pytest.approx(sum(probe) / 2)
    assert fig2[name]["std"] == pytest.approx(abs(probe[0] - probe[1]) / 2 ** 0.5)  # ddof=1 of two values
    assert reports[name, 0]["knn"]["bank_size"] == 2048 and reports[name, 0]["knn"]["num_queries"] == 1024
  assert len(fig2["random_init"]["per_pretrain_seed"]) == 2
  capsys.readouterr()
  fig4 = fig4_linear_probe.main(common)
  fig3 = fig3_wahba.main(common)
  assert "pretraining" not in capsys.readouterr().err  # fig3 and fig4 trained nothing new
  assert len(fig3["per_trial"]["care"]) == len(fig3["per_trial"]["simclr"]) == 2 * 3
  assert 0.0 <= fig3["care_below_simclr_fraction"] <= 1.0
  for name in ("simclr", "care"):
    assert fig4[name] == fig2[name]  # one summary of the same runs
  assert fig4["care_minus_simclr"]["per_pretrain_seed"] == pytest.approx(
      [c - s for c, s in zip(fig4["care"]["per_pretrain_seed"], fig4["simclr"]["per_pretrain_seed"])])
  for figure in ("fig2_ablation", "fig3_wahba", "fig4_linear_probe"):
    assert json.loads((tmp_path / figure / f"{figure}.json").read_text())["scale"] == "smoke"
    assert (tmp_path / figure / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
