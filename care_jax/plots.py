"""PNG figures of a run: loss curves from metrics.jsonl, Wahba error per augmentation.

matplotlib is imported when a figure is drawn (Agg backend, no display); where it
is missing (the bare GPU image) the figures are skipped with a note.
"""

from __future__ import annotations

import io
import sys

from etils import epath

from care_jax import metric_writers


def _pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
  except ImportError:
    print("note: matplotlib is not installed; skipping the PNG figures", file=sys.stderr)
    return None


def _save(fig, path: epath.Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  path.write_bytes(buffer.getvalue())


def read_metrics(workdir) -> list:
  path = epath.Path(workdir) / "metrics.jsonl"
  return metric_writers.read_jsonl(path) if path.exists() else []


def write_plots(workdir, report: dict, out_dir=None) -> list:
  """Writes loss_curves.png (from workdir's metrics) and wahba_errors.png into out_dir
  (default: workdir); returns their paths."""
  plt = _pyplot()
  if plt is None:
    return []
  workdir = epath.Path(workdir)
  out_dir = workdir if out_dir is None else epath.Path(out_dir)
  written = []
  rows = [r for r in read_metrics(workdir) if "loss" in r and isinstance(r["loss"], (int, float))]
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    for key in ("loss", "info_nce", "uniformity"):
      if all(isinstance(r.get(key), (int, float)) for r in rows):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("contrastive terms")
    axes[0].legend()
    if all(isinstance(r.get("equivariance"), (int, float)) for r in rows):
      axes[1].plot(steps, [r["equivariance"] for r in rows], color="C3")
      axes[1].set_yscale("log" if min(r["equivariance"] for r in rows) > 0 else "linear")
    axes[1].set_xlabel("step")
    axes[1].set_title("equivariance loss L_equi")
    _save(fig, out_dir / "loss_curves.png")
    plt.close(fig)
    written.append(out_dir / "loss_curves.png")
  trials = report.get("wahba_trials") or []
  if trials:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([t["trial"] for t in trials], [t["wahba_error"] for t in trials], color="C0")
    ax.axhline(report["wahba_error_mean"], color="k", linestyle="--", label=f"mean {report['wahba_error_mean']:.3f}")
    ax.set_xticks([t["trial"] for t in trials])
    ax.set_xlabel("sampled augmentation (trial)")
    ax.set_ylabel("Wahba error  min_R ||R F - F_a||_F")
    ax.set_title(f"Wahba error per augmentation ({report['wahba_examples']} test images each)")
    ax.legend()
    _save(fig, out_dir / "wahba_errors.png")
    plt.close(fig)
    written.append(out_dir / "wahba_errors.png")
  return written
