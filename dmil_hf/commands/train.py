"""`dmil train`: train DMIL or a baseline on a built-in or saved dataset. Its options are [`RunSettings`]' fields
(`dmil_hf.run_settings`), plus `--threads` for this process."""

from __future__ import annotations

import argparse
import json

from ..run_settings import RunSettingsParser, settings_from_args


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train DMIL or a baseline and write a checkpoint plus metrics.json",
                              parents=[RunSettingsParser(add_help=False)],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for this run (default: torch's, one per core). When several runs share "
                        "the machine, give each its share of the cores (e.g. 1 each for two runs on 2 cores): "
                        "oversubscribed threads slow every run many times over. The count is recorded in metrics.json "
                        "(it changes the order of float reductions)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..experiment import run_training

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)

    metrics = run_training(settings_from_args(args))
    if metrics:
        summary = {"test": metrics["test"], "train_seconds": round(metrics["train_seconds"], 1)}
        if metrics.get("sessions", 1) > 1:
            summary["train_seconds_this_session"] = round(metrics["train_seconds_this_session"], 1)
        print(json.dumps(summary, indent=2))
        if metrics.get("hub_commit_url"):
            print(f"Pushed to the Hub: {metrics['hub_commit_url']}")
    return 0
