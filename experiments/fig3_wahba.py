"""Paper Figure 3: Wahba error of CARE vs SimCLR, per sampled augmentation.

  python -m experiments.fig3_wahba --scale=small --pretrain_seeds=3   # Fashion-MNIST, CPU (README)
  python -m experiments.fig3_wahba --scale=paper --data_dir=DIR [--paper_dataset=cifar100|stl10|imagenet100]

Both encoders see the same sampled augmentations (same seed -> same trials), so
the comparison is paired: a scatter of (SimCLR error, CARE error) per trial with
the diagonal; points below it are trials where CARE is more equivariant. With
--pretrain_seeds=N the runs of seeds 0..N-1 are pooled (pairs still share
seed and trial, one colour per seed) and the per-seed means are listed too.
Writes experiments/results/fig3_wahba/{fig3_wahba.json,fig3_wahba.png}.
"""

import json

import numpy as np

from experiments import paper_runs


@paper_runs.main_guard
def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv)
  paper_runs.require_simclr_pair(args, "fig3_wahba")
  out = paper_runs.out_dir(args, "fig3_wahba")
  reports = {v: paper_runs.run_seeds(args, v) for v in ("simclr", "care")}
  # [pretraining seed, trial]
  per_seed = {v: np.array([[t["wahba_error"] for t in r["wahba_trials"]] for r in rs]) for v, rs in reports.items()}
  errors = {v: e.ravel() for v, e in per_seed.items()}
  gammas = {v: np.array([t["relative_equivariance"] for r in rs for t in r["wahba_trials"]])
            for v, rs in reports.items()}
  result = {
      "pretrain_seeds": args.pretrain_seeds,
      **{f"{v}_wahba_error_mean_per_pretrain_seed": e.mean(axis=1).tolist() for v, e in per_seed.items()},
      "scale": args.scale, "settings": paper_runs.settings(args.scale, args.paper_dataset),
      **{f"{v}_wahba_error_mean": float(e.mean()) for v, e in errors.items()},
      **{f"{v}_wahba_error_max": float(e.max()) for v, e in errors.items()},
      **{f"{v}_relative_equivariance": float(g.mean()) for v, g in gammas.items()},
      "care_below_simclr_fraction": float(np.mean(errors["care"] < errors["simclr"])),
      "per_trial": {v: e.tolist() for v, e in errors.items()},
  }
  (out / "fig3_wahba.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  for seed in range(args.pretrain_seeds):
    ax.scatter(per_seed["simclr"][seed], per_seed["care"][seed], color=f"C{seed}", s=14,
               label=f"pretraining seed {seed}" if args.pretrain_seeds > 1 else None)
  if args.pretrain_seeds > 1:
    ax.legend(fontsize=7)
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
