"""Paper Figure 4: linear-probe top-1 of CARE vs SimCLR with error bars over seeds.

  python -m experiments.fig4_linear_probe --scale=small --pretrain_seeds=3   # Fashion-MNIST, CPU (README)
  python -m experiments.fig4_linear_probe --scale=paper --data_dir=DIR --pretrain_seeds=3

Each pretrained encoder gets the scale's linear-probe seeds (the paper's 5 at
paper scale). With --pretrain_seeds=1 the error bars are the standard
deviation over probe seeds on one encoder, which leaves out the larger
variance of pretraining itself; with N > 1 each variant is pretrained with
seeds 0..N-1, a bar is the mean over those runs of their probe means and its
error bar the standard deviation over the runs (ddof=1). The CARE - SimCLR
difference is also given per pretraining seed (run pairs share a seed, so
the same initialisation and batches), with its mean and standard deviation.
Writes experiments/results/fig4_linear_probe/{fig4_linear_probe.json,.png}.
"""

import json

from experiments import paper_runs

VARIANTS = ("simclr", "care")


def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv)
  out = paper_runs.out_dir(args, "fig4_linear_probe")
  reports = {v: paper_runs.run_seeds(args, v) for v in VARIANTS}
  differences = [c["linear_probe"]["top1"] - s["linear_probe"]["top1"]
                 for c, s in zip(reports["care"], reports["simclr"])]
  diff_mean, diff_std = paper_runs.mean_std(differences)
  result = {"scale": args.scale, "settings": paper_runs.settings(args.scale),
            "pretrain_seeds": args.pretrain_seeds,
            **{v: paper_runs.summarize_runs(r) for v, r in reports.items()},
            "care_minus_simclr": {"mean": diff_mean, "std": diff_std, "per_pretrain_seed": differences}}
  (out / "fig4_linear_probe.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4, 3.5))
  means = [result[v]["linear_probe_top1"] for v in VARIANTS]
  ax.bar(["SimCLR", "CARE"], means, yerr=[result[v]["std"] for v in VARIANTS], color=["C7", "C0"], capsize=6)
  if args.pretrain_seeds > 1:  # each pretraining run as a dot over its bar
    for x, v in enumerate(VARIANTS):
      ax.plot([x] * args.pretrain_seeds, result[v]["per_pretrain_seed"], "k.", markersize=5)
  ax.set_ylim(min(means) - 5, max(means) + 3)
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title(f"{result['settings']['dataset']} ({args.scale}); std over {result['care']['std_over']}",
               fontsize=8)
  fig.savefig(out / "fig4_linear_probe.png", dpi=110, bbox_inches="tight")
  print(json.dumps({k: result[k] for k in (*VARIANTS, "care_minus_simclr")}, indent=1))
  return result


if __name__ == "__main__":
  main()
