"""Paper Figure 4: linear-probe top-1 of CARE vs SimCLR with error bars over seeds.

  python -m experiments.fig4_linear_probe --scale=small --pretrain_seeds=3   # Fashion-MNIST, CPU (README)
  python -m experiments.fig4_linear_probe --scale=paper --data_dir=DIR --pretrain_seeds=3 \
      [--paper_dataset=cifar10|cifar100|stl10|imagenet100|imagenet100_moco]

Each pretrained encoder gets the scale's linear-probe seeds (the paper's 5 at
paper scale). With --pretrain_seeds=1 the error bars are the standard
deviation over probe seeds on one encoder, which leaves out the larger
variance of pretraining itself; with N > 1 each variant is pretrained with
seeds 0..N-1, a bar is the mean over those runs of their probe means and its
error bar the standard deviation over the runs (ddof=1). The CARE - SimCLR
difference is also given per pretraining seed (run pairs share a seed, so
the same initialisation and batches), with its mean and standard deviation.
At paper scale the pair is SimCLR vs CARE, or MoCo-v2 vs MoCo-v2 + CARE for
imagenet100_moco, and the paper's own numbers are stored and drawn beside.
Writes experiments/results/fig4_linear_probe/{fig4_linear_probe.json,.png}
(paper scale: in fig4_linear_probe/paper-<dataset>/).
"""

import json

from experiments import paper_runs

LABELS = {"simclr": "SimCLR", "care": "CARE", "moco": "MoCo-v2", "moco_care": "MoCo-v2\n+ CARE"}


@paper_runs.main_guard
def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv)
  out = paper_runs.out_dir(args, "fig4_linear_probe")
  variants = base, care = paper_runs.compared_variants(args.scale, args.paper_dataset)
  reports = {v: paper_runs.run_seeds(args, v) for v in variants}
  differences = [c["linear_probe"]["top1"] - s["linear_probe"]["top1"]
                 for c, s in zip(reports[care], reports[base])]
  diff_mean, diff_std = paper_runs.mean_std(differences)
  result = {"scale": args.scale, "settings": paper_runs.settings(args.scale, args.paper_dataset),
            "pretrain_seeds": args.pretrain_seeds,
            **{v: paper_runs.summarize_runs(r) for v, r in reports.items()},
            f"{care}_minus_{base}": {"mean": diff_mean, "std": diff_std, "per_pretrain_seed": differences}}
  if args.scale == "paper":
    result["paper_linear_probe_top1"] = dict(zip(variants, paper_runs.PAPER_RUNS[args.paper_dataset][2]))
  (out / "fig4_linear_probe.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4, 3.5))
  means = [result[v]["linear_probe_top1"] for v in variants]
  ax.bar([LABELS[v] for v in variants], means, yerr=[result[v]["std"] for v in variants], color=["C7", "C0"],
         capsize=6)
  if args.pretrain_seeds > 1:  # each pretraining run as a dot over its bar
    for x, v in enumerate(variants):
      ax.plot([x] * args.pretrain_seeds, result[v]["per_pretrain_seed"], "k.", markersize=5)
  if "paper_linear_probe_top1" in result:
    paper = list(result["paper_linear_probe_top1"].values())
    ax.plot(range(len(paper)), paper, "r_", markersize=30, mew=2, label="paper")
    ax.legend(fontsize=7)
    means = means + paper
  ax.set_ylim(min(means) - 5, max(means) + 3)
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title(f"{result['settings']['dataset']} ({args.scale}); std over {result[care]['std_over']}",
               fontsize=8)
  fig.savefig(out / "fig4_linear_probe.png", dpi=110, bbox_inches="tight")
  print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
  return result


if __name__ == "__main__":
  main()
