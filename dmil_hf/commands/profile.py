"""`dmil profile`: forward latency of the decomposition head versus the towers, or (`--train-step`) the cost of one
training step of DMIL against the baselines on the same towers and batch."""

from __future__ import annotations

import json


def add_parser(subparsers):
    from ..configuration_dmil import TOWER_MODALITIES
    from ..methods import METHODS
    from ..towers import TOWER_SIZES

    p = subparsers.add_parser("profile", help="time the DMIL head against the towers, or a training step against "
                                              "the baselines (random weights)")
    p.add_argument("--towers", nargs="+", default=list(TOWER_SIZES), choices=list(TOWER_SIZES),
                   help="sizes of randomly initialised towers to time, one result each (dmil_hf.towers.TOWER_SIZES)")
    p.add_argument("--modalities", nargs="+", default=list(TOWER_MODALITIES), choices=list(TOWER_MODALITIES),
                   help="the towers the model has (random inputs of each)")
    p.add_argument("--batch-size", type=int, default=32, help="rows in the random batch that is timed")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions (with --train-step: steps per method)")
    p.add_argument("--device", default=None, help="torch device to time on, e.g. cpu or cuda:0 (default: cuda when "
                                                  "available, else cpu)")
    p.add_argument("--train-step", action="store_true",
                   help="time a bare training step (forward, backward, AdamW) of each of --methods, taking turns")
    p.add_argument("--methods", nargs="+", default=["joint", "dmil"], choices=list(METHODS),
                   help="with --train-step: the methods to time; ratios are to the first")
    p.add_argument("--feature-modalities", type=int, default=0, metavar="N",
                   help="with --train-step: N feature modalities of 16 values and 4 labels (the synthetic dataset's "
                        "shape) instead of transformer towers")
    p.add_argument("--stage", type=int, default=3, choices=[1, 2, 3], help="with --train-step: DMIL's stage")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from .. import DmilConfig, DmilForMultimodalClassification
    from ..profiling import profile_head, profile_train_step
    from ..towers import tower_configs

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    if args.train_step:
        if args.feature_modalities:
            names = "abcdefgh"[:args.feature_modalities]
            setups = [("features", DmilConfig(feature_modalities={m: 16 for m in names}, num_labels=4))]
        else:
            setups = [(size, DmilConfig(**tower_configs(args.modalities, size, image_channels=3), num_labels=10))
                      for size in args.towers]
        for name, config in setups:
            result = profile_train_step(config, args.methods, args.batch_size, args.repeats, args.stage, args.device)
            result.update(towers=name)
            results.append(result)
            first = args.methods[0]
            steps = ", ".join(f"{m} {ms:.2f} ms ({result[f'ratio_to_{first}'][m]:.2f}x {first})"
                              for m, ms in result["step_ms"].items())
            print(f"{name:>8} towers, train step (DMIL stage {args.stage}): {steps} on {result['device']}, batch "
                  f"{args.batch_size}, {result['threads']} thread(s)")
    else:
        for size in args.towers:
            config = DmilConfig(**tower_configs(args.modalities, size, image_channels=3), num_labels=10)
            torch.manual_seed(0)
            result = profile_head(DmilForMultimodalClassification(config), args.batch_size, args.repeats, args.device)
            result.update(towers=size, modalities=args.modalities)
            results.append(result)
            print(f"{size:>5} towers: towers {result['towers_ms']:.2f} ms, head {result['head_ms']:.2f} ms "
                  f"({100 * result['head_fraction_of_towers']:.1f}% of towers) on {result['device']}, batch "
                  f"{args.batch_size}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0
