"""experiments/run_summary.py on a workdir written by hand: known windows, known answers."""

import json

import pytest

from experiments import run_summary


def _write_run(workdir, windows, steps_per_epoch, batch, report=None):
  """metrics.jsonl as the trainer logs it: step, images_per_sec (0 for the first step), epoch."""
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [{"step": 1, "loss": 4.0, "images_per_sec": 0.0, "epoch": 1 / steps_per_epoch}]
  rows += [{"step": 10 * (i + 1), "loss": 3.0, "images_per_sec": rate, "epoch": 10 * (i + 1) / steps_per_epoch}
           for i, rate in enumerate(windows)]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (workdir / "config.json").write_text(json.dumps({"batch_size": batch}))
  if report is not None:
    (workdir / "report.json").write_text(json.dumps(report))


REPORT = {"step": 40, "eval_seconds": 12.5, "knn_top1": 77.0, "linear_probe_top1": 80.0,
          "wahba_error_mean": 15.5, "relative_equivariance": 1.05}


def test_summary_takes_the_median_window_and_derives_step_and_epoch_time(tmp_path):
  # Windows 100, 400 (a checkpoint-save outlier would be the low one), 200, 250: median 225 images/s.
  _write_run(tmp_path / "run", [100.0, 400.0, 200.0, 250.0], steps_per_epoch=234.375, batch=256, report=REPORT)
  s = run_summary.summarize(tmp_path / "run")
  assert s["images_per_sec"] == pytest.approx(225.0)
  assert s["step_ms"] == pytest.approx(1e3 * 256 / 225.0)
  assert s["epoch_seconds"] == pytest.approx(60000 / 225.0)  # 234.375 steps of 256 = the 60000-image split
  assert (s["steps"], s["knn_top1"], s["linear_probe_top1"], s["finished"]) == (40, 77.0, 80.0, True)


def test_summary_of_a_run_stopped_before_its_report_keeps_the_throughput(tmp_path, capsys):
  _write_run(tmp_path / "run", [300.0, 100.0, 200.0], steps_per_epoch=100, batch=64)
  s = run_summary.summarize(tmp_path / "run")
  assert (s["images_per_sec"], s["steps"], s["finished"], s["knn_top1"]) == (200.0, 30, False, None)
  assert s["epoch_seconds"] == pytest.approx(100 * 64 / 200.0)
  run_summary.main([str(tmp_path / "run")])
  line = capsys.readouterr().out.splitlines()[1]
  assert "32.0" in line and "no report.json" in line


def test_summary_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(SystemExit, match="metrics.jsonl is missing"):
    run_summary.summarize(tmp_path)
  _write_run(tmp_path / "run", [], steps_per_epoch=10, batch=8)
  with pytest.raises(SystemExit, match="log_every_steps"):
    run_summary.summarize(tmp_path / "run")
  _write_run(tmp_path / "damaged", [100.0], steps_per_epoch=10, batch=8)
  (tmp_path / "damaged" / "report.json").write_text('{"step": 4')
  with pytest.raises(SystemExit, match=r"^run_summary: .*damaged/report\.json is not readable JSON \(JSONDecodeError"):
    run_summary.summarize(tmp_path / "damaged")
