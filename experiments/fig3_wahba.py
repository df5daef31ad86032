"""Paper Figure 3: Wahba error of CARE vs SimCLR, per sampled augmentation.

  python -m experiments.fig3_wahba --scale=small      # Fashion-MNIST, CPU (README)
  python -m experiments.fig3_wahba --scale=paper --data_dir=DIR

Both encoders see the same sampled augmentations (same seed -> same trials), so
the comparison is paired: a scatter of (SimCLR error, CARE error) per trial with
the diagonal; points below it are trials where CARE is more equivariant.
Writes experiments/results/fig3_wahba/{fig3_wahba.json,fig3_wahba.png}.
"""

import json

import numpy as np

from experiments import paper_runs


def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv)
  out = paper_runs.out_dir(args, "fig3_wahba")
  reports = {v: paper_runs.run_variant(args.scale, v, data_dir=args.data_dir, results=args.results)
             for v in ("simclr", "care")}
  errors = {v: np.array([t["wahba_error"] for t in r["wahba_trials"]]) for v, r in reports.items()}
  gammas = {v: np.array([t["relative_equivariance"] for t in r["wahba_trials"]]) for v, r in reports.items()}
  result = {
      "scale": args.scale, "settings": paper_runs.settings(args.scale),
      **{f"{v}_wahba_error_mean": float(e.mean()) for v, e in errors.items()},
      **{f"{v}_wahba_error_max": float(e.max()) for v, e in errors.items()},
      **{f"{v}_relative_equivariance": float(g.mean()) for v, g in gammas.items()},
      "care_below_simclr_fraction": float(np.mean(errors["care"] < errors["simclr"])),
      "per_trial": {v: e.tolist() for v, e in errors.items()},
  }
  (out / "fig3_wahba.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.scatter(errors["simclr"], errors["care"], color="C0")
  hi = 1.05 * max(errors["simclr"].max(), errors["care"].max())
  ax.plot([0, hi], [0, hi], "k--", linewidth=1)
  ax.set_xlim(0, hi)
  ax.set_ylim(0, hi)
  ax.set_xlabel("SimCLR Wahba error")
  ax.set_ylabel("CARE Wahba error")
  ax.set_title(f"per sampled augmentation ({args.scale}); CARE lower in "
               f"{100 * result['care_below_simclr_fraction']:.0f}%", fontsize=9)
  fig.savefig(out / "fig3_wahba.png", dpi=110, bbox_inches="tight")
  print(json.dumps({k: v for k, v in result.items() if k not in ("per_trial", "settings")}, indent=1))
  return result


if __name__ == "__main__":
  main()
