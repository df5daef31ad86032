"""Paper Figure 4: linear-probe top-1 of CARE vs SimCLR, error bars over probe seeds.

  python -m experiments.fig4_linear_probe --scale=small      # Fashion-MNIST, CPU (README)
  python -m experiments.fig4_linear_probe --scale=paper --data_dir=DIR

The error bars are the standard deviation over linear-probe seeds on one
pretrained encoder per method (the paper's 5 seeds); pretraining seeds are a
separate, costlier source of variance not covered at small scale.
Writes experiments/results/fig4_linear_probe/{fig4_linear_probe.json,.png}.
"""

import json

from experiments import paper_runs


def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv)
  out = paper_runs.out_dir(args, "fig4_linear_probe")
  reports = {v: paper_runs.run_variant(args.scale, v, data_dir=args.data_dir, results=args.results)
             for v in ("simclr", "care")}
  result = {"scale": args.scale, "settings": paper_runs.settings(args.scale),
            **{v: {"linear_probe_top1": r["linear_probe"]["top1"], "std": r["linear_probe"]["top1_std"],
                   "per_seed": r["linear_probe"]["top1_per_seed"], "knn_top1": r["knn_top1"]}
               for v, r in reports.items()}}
  (out / "fig4_linear_probe.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4, 3.5))
  names = ["simclr", "care"]
  means = [result[v]["linear_probe_top1"] for v in names]
  ax.bar(["SimCLR", "CARE"], means, yerr=[result[v]["std"] for v in names], color=["C7", "C0"], capsize=6)
  ax.set_ylim(min(means) - 5, max(means) + 3)
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title(f"{result['settings']['dataset']} ({args.scale})", fontsize=9)
  fig.savefig(out / "fig4_linear_probe.png", dpi=110, bbox_inches="tight")
  print(json.dumps({v: result[v] for v in names}, indent=1))
  return result


if __name__ == "__main__":
  main()
