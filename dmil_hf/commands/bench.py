"""`dmil bench`: every method on every dataset over seeds; writes results.json, results.md and plots."""

from __future__ import annotations


def add_parser(subparsers):
    from ..bench import DATASETS, ROWS
    from ..towers import TOWER_SIZES

    p = subparsers.add_parser("bench", help="compare dmil, joint, ensemble and i2moe per kind of sample")
    p.add_argument("--output-dir", required=True, help="folder for results.json, results.md, the plots and the runs")
    p.add_argument("--quick", action="store_true", help="small data, few epochs, one seed (a few minutes)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS),
                   help="benchmark configurations (built-in datasets and their builder arguments)")
    p.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS),
                   help="rows: the registered methods and joint_robust (joint learning with DMIL's robustness training)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--towers", default="tiny", choices=list(TOWER_SIZES),
                   help="size of the randomly initialised towers of every run (dmil_hf.towers.TOWER_SIZES)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each with an equal share of the cores (train times are then shared-load times)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the ablation (DMIL with the paper's settings and with each of the package's deviations)")
    p.add_argument("--combine", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="train nothing: combine the runs of these results.json files (a later file's run replaces an "
                        "earlier one's of the same configuration, row and seed) into --output-dir")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..bench import combine_results, run_benchmark

    if args.combine:
        results = combine_results(args.combine, args.output_dir)
        print(f"dmil bench: combined {len(results['runs'])} runs into {args.output_dir}/results.md")
        return 0 if results["runs"] else 1
    results = run_benchmark(args.output_dir, args.datasets, args.methods, args.seeds, args.quick, args.towers,
                            args.jobs, ablation=not args.no_ablation)
    from pathlib import Path

    print((Path(args.output_dir) / "results.md").read_text())
    return 0 if results["runs"] else 1
