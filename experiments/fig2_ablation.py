"""Paper Figure 2: SimCLR vs L_equi + L_unif vs CARE, and random-init features.

  python -m experiments.fig2_ablation --scale=small      # Fashion-MNIST, CPU (README)
  python -m experiments.fig2_ablation --scale=paper --data_dir=DIR [--paper_dataset=cifar100|stl10|imagenet100]
  python -m experiments.fig2_ablation --equi_unif_weights 1 0.3 0.1   # + a weight sweep
  python -m experiments.fig2_ablation --equi_unif_weights 3 1 --pretrain_seeds=3

Linear-probe top-1 bars: std over probe seeds on one encoder, or with
--pretrain_seeds=N the mean and std (ddof=1) over N pretraining runs per bar
(initialisation seeds for the random-init bar, the same encoder architecture
evaluated untrained).
Writes experiments/results/fig2_ablation/{fig2_ablation.json,.png}.
"""

import json

from experiments import paper_runs  # first: it quiets TensorFlow's C++ log before jaxlib loads

from care_jax import config_lib


@paper_runs.main_guard
def main(argv=None):
  args = paper_runs.parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
      "--equi_unif_weights", type=float, nargs="+", default=[1.0],
      help="L_equi weights of the L_equi + L_unif runs (a sweep: one bar each)"))
  paper_runs.require_simclr_pair(args, "fig2_ablation")
  if min(args.equi_unif_weights) < 0:
    raise config_lib.ConfigError(f"--equi_unif_weights {' '.join(f'{w:g}' for w in args.equi_unif_weights)}: "
                                 "each L_equi weight must be >= 0")
  out = paper_runs.out_dir(args, "fig2_ablation")
  seeds = range(args.pretrain_seeds)
  runs = lambda v, w=None: paper_runs.summarize_runs([  # noqa: E731
      paper_runs.run_variant(args.scale, v, seed=s, data_dir=args.data_dir, results=args.results, equiv_weight=w,
                             dataset=args.paper_dataset)
      for s in seeds])
  # The default weight (1.0) keeps the run folder of the variant itself.
  sweep = {w: runs("equi_unif", None if w == 1.0 else w) for w in args.equi_unif_weights}
  result = {"scale": args.scale, "settings": paper_runs.settings(args.scale, args.paper_dataset),
            "pretrain_seeds": args.pretrain_seeds,
            "simclr": runs("simclr"), "care": runs("care"),
            "equi_unif": sweep[args.equi_unif_weights[0]], "equi_unif_weight": args.equi_unif_weights[0],
            "equi_unif_sweep": {f"{w:g}": r for w, r in sweep.items()},
            "random_init": paper_runs.summarize_runs([
                paper_runs.random_init_report(args.scale, args.data_dir, args.results, seed=s,
                                              dataset=args.paper_dataset) for s in seeds])}
  (out / "fig2_ablation.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(4 + len(sweep), 3.5))
  bars = [("random\ninit", result["random_init"], "C7")]
  bars += [(f"L_equi +\nL_unif\n(w={w:g})", r, "C2") for w, r in sorted(sweep.items())]
  bars += [("SimCLR", result["simclr"], "C1"), ("CARE", result["care"], "C0")]
  values = [b[1]["linear_probe_top1"] for b in bars]
  ax.bar([b[0] for b in bars], values, yerr=[b[1]["std"] for b in bars], color=[b[2] for b in bars], capsize=5)
  if args.pretrain_seeds > 1:  # each pretraining (or initialisation) seed as a dot over its bar
    for x, b in enumerate(bars):
      ax.plot([x] * len(b[1]["per_pretrain_seed"]), b[1]["per_pretrain_seed"], "k.", markersize=5)
    values += [v for b in bars for v in b[1]["per_pretrain_seed"]]
  ax.set_ylim(max(0, min(values) - 10), max(values) + 5)
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title(f"{result['settings']['dataset']} ({args.scale}); std over {result['care']['std_over']}", fontsize=9)
  fig.savefig(out / "fig2_ablation.png", dpi=110, bbox_inches="tight")
  print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
  return result


if __name__ == "__main__":
  main()
