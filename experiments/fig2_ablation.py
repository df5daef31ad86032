"""Paper Figure 2: SimCLR vs L_equi + L_unif vs CARE, and random-init features.

  python -m experiments.fig2_ablation --scale=small      # Fashion-MNIST, CPU (README)
  python -m experiments.fig2_ablation --scale=paper --data_dir=DIR

Linear-probe top-1 bars (std over probe seeds). The random-init bar is the same
encoder architecture evaluated untrained.
Writes experiments/results/fig2_ablation/{fig2_ablation.json,.png}.
"""

import json

from experiments import paper_runs


def main():
  args = paper_runs.parse_args(__doc__.splitlines()[0])
  out = paper_runs.out_dir(args, "fig2_ablation")
  reports = {v: paper_runs.run_variant(args.scale, v, data_dir=args.data_dir)
             for v in ("simclr", "equi_unif", "care")}
  random_init = paper_runs.random_init_report(args.scale, args.data_dir)
  result = {"scale": args.scale, "settings": paper_runs.settings(args.scale),
            **{v: {"linear_probe_top1": r["linear_probe"]["top1"], "std": r["linear_probe"].get("top1_std", 0.0),
                   "knn_top1": r["knn_top1"]} for v, r in reports.items()},
            "random_init": random_init}
  (out / "fig2_ablation.json").write_text(json.dumps(result, indent=2))
  plt = paper_runs.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  labels = ["random\ninit", "L_equi +\nL_unif", "SimCLR", "CARE"]
  values = [random_init["linear_probe_top1"]] + [result[v]["linear_probe_top1"] for v in ("equi_unif", "simclr", "care")]
  errs = [random_init["std"]] + [result[v]["std"] for v in ("equi_unif", "simclr", "care")]
  ax.bar(labels, values, yerr=errs, color=["C7", "C2", "C1", "C0"], capsize=5)
  ax.set_ylim(max(0, min(values) - 10), max(values) + 5)
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title(f"{result['settings']['dataset']} ({args.scale})", fontsize=9)
  fig.savefig(out / "fig2_ablation.png", dpi=110, bbox_inches="tight")
  print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
  main()
