"""`dmil profile`: forward latency of the decomposition head versus the towers."""

from __future__ import annotations

import json


def add_parser(subparsers):
    p = subparsers.add_parser("profile", help="time the DMIL head against the towers (random weights)")
    p.add_argument("--towers", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--modalities", nargs="+", default=["text", "vision", "audio"], choices=["text", "vision", "audio"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from .. import DmilConfig, DmilForMultimodalClassification
    from ..profiling import profile_head
    from ..towers import tower_configs

    torch.set_num_threads(torch.get_num_threads())
    results = []
    for size in args.towers:
        config = DmilConfig(**tower_configs(args.modalities, size, image_channels=3), num_labels=10)
        torch.manual_seed(0)
        result = profile_head(DmilForMultimodalClassification(config), args.batch_size, args.repeats, args.device)
        result.update(towers=size, modalities=args.modalities)
        results.append(result)
        print(f"{size:>5} towers: towers {result['towers_ms']:.2f} ms, head {result['head_ms']:.2f} ms "
              f"({100 * result['head_fraction_of_towers']:.1f}% of towers) on {result['device']}, batch {args.batch_size}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0
