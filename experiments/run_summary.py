"""One line per finished training run: throughput, epoch time and the final report.

    python -m experiments.run_summary runs/quickstart [more workdirs ...]

Reads a workdir's metrics.jsonl (the trainer's logged windows) and report.json
(the final evaluation). images/s is the median over the logged windows: the
trainer starts its clock after a process's first step (which compiles) and
restarts it after a kNN monitor, and the median keeps a window holding a
(asynchronous) checkpoint save from moving the figure, so it is what a steady
step achieves, input included. Epoch time is one pass over the training
split at that rate: steps_per_epoch x batch / (images/s), with steps_per_epoch
recovered from the logged `epoch` field (step / steps_per_epoch).
A run stopped before its final evaluation (no report.json yet) still gets its
throughput columns, the report's shown as "-".
Needs neither JAX nor TensorFlow (etils only), so it runs anywhere a run's files are.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

from care_jax import metric_writers  # etils only: no JAX, no TensorFlow

COLUMNS = ("run", "steps", "batch", "img/s", "step ms", "epoch s", "eval s", "kNN top-1", "probe top-1",
           "Wahba mean", "gamma_f")


def summarize(workdir) -> dict:
  """The figures of one run (report fields None before its final evaluation)."""
  workdir = pathlib.Path(workdir)
  metrics_path, report_path = workdir / "metrics.jsonl", workdir / "report.json"
  if not metrics_path.exists():
    raise SystemExit(f"run_summary: {metrics_path} is missing; pass the --workdir of a care_jax.main run")
  rows = metric_writers.read_jsonl(metrics_path)  # a run cut off mid-line (a stage limit) still reads
  windows = [r for r in rows if r.get("images_per_sec", 0) > 0]
  if not windows:
    raise SystemExit(f"run_summary: {metrics_path} has no timed window (images_per_sec > 0); the run logged "
                     "only its first step; set --config.log_every_steps below num_train_steps")
  try:
    config = metric_writers.read_json(workdir / "config.json") or {}
    report = metric_writers.read_json(report_path) or {}
  except metric_writers.DamagedFileError as e:
    raise SystemExit(f"run_summary: {e}") from None
  batch = config.get("batch_size")
  images_per_sec = statistics.median(r["images_per_sec"] for r in windows)
  last = windows[-1]
  steps_per_epoch = last["step"] / last["epoch"]
  out = {"run": str(workdir), "steps": report.get("step", rows[-1]["step"]), "batch": batch,
         "images_per_sec": images_per_sec, "finished": bool(report)}
  for key in ("eval_seconds", "knn_top1", "linear_probe_top1", "wahba_error_mean", "relative_equivariance"):
    out[key] = report.get(key)
  if batch:
    out["step_ms"] = 1e3 * batch / images_per_sec
    out["epoch_seconds"] = steps_per_epoch * batch / images_per_sec
  return out


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def main(argv) -> None:
  if not argv:
    raise SystemExit("usage: python -m experiments.run_summary WORKDIR [WORKDIR ...]")
  summaries = [summarize(w) for w in argv]
  width = max(len(COLUMNS[0]), *(len(s["run"]) for s in summaries))
  print(f"{COLUMNS[0]:<{width}} " + " ".join(f"{c:>11}" for c in COLUMNS[1:]))
  for s in summaries:
    cells = (_fmt(s["steps"], "d"), _fmt(s["batch"], "d"), _fmt(s["images_per_sec"], ".0f"),
             _fmt(s.get("step_ms"), ".2f"), _fmt(s.get("epoch_seconds"), ".1f"), _fmt(s["eval_seconds"], ".1f"),
             _fmt(s["knn_top1"], ".2f"), _fmt(s["linear_probe_top1"], ".2f"), _fmt(s["wahba_error_mean"], ".3f"),
             _fmt(s["relative_equivariance"], ".3f"))
    print(f"{s['run']:<{width}} " + " ".join(f"{c:>11}" for c in cells)
          + ("" if s["finished"] else "   (no report.json: stopped before its final evaluation)"))


if __name__ == "__main__":
  main(sys.argv[1:])
