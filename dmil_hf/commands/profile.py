"""`dmil profile`: forward latency of the decomposition head versus the towers, or (`--train-step`) the cost of one
training step of DMIL against the baselines on the same towers and batch, eager and (`--compile`) compiled."""

from __future__ import annotations

import json


def add_parser(subparsers):
    from ..configuration_dmil import TOWER_MODALITIES
    from ..methods import METHODS
    from ..profiling import TRAIN_STEP_SETUPS
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
    p.add_argument("--setups", nargs="+", default=None, choices=list(TRAIN_STEP_SETUPS),
                   help="with --train-step: the models to time, one result each: features (the synthetic dataset's "
                        "shape), main-job (make run: cached 384-wide text and audio tower outputs, a tiny vision tower "
                        "live), main-job-head (every tower's output cached: the head alone) or a tower size (text, "
                        "vision and audio towers, live). Default: --towers, or features with --feature-modalities")
    p.add_argument("--feature-modalities", type=int, default=0, metavar="N",
                   help="with --train-step: N feature modalities of 16 values and 4 labels (the synthetic dataset's "
                        "shape) instead of transformer towers (the features setup; 2 when named in --setups)")
    p.add_argument("--stage", type=int, default=3, choices=[1, 2, 3], help="with --train-step: DMIL's stage")
    p.add_argument("--compile", action="store_true",
                   help="with --train-step: also time each method under torch.compile (as dmil train --torch-compile "
                        "runs it), with its compile time (inductor's cache empty, then warm) and the steps and epochs "
                        "it takes to earn that back")
    p.add_argument("--steps-per-epoch", type=int, default=64, metavar="N",
                   help="with --compile: training steps per epoch for the break-even epochs (64: make run's main job, "
                        "2,800 digits training rows plus 1,260 corrupted copies at batch 64)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="with --train-step: bf16 runs the forward under bfloat16 autocast (Trainer's --bf16)")
    p.add_argument("--scale", nargs="+", type=int, default=None, metavar="ROWS",
                   help="instead: train each of --methods with dmil train on synthetic-shaped feature data of these "
                        "sizes (saved to disk), one run at a time, and report seconds per epoch and peak resident "
                        "memory (dmil_hf.scale)")
    p.add_argument("--work-dir", default="runs/scale",
                   help="with --scale: folder for the saved datasets, the runs and their logs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; with --scale, each training run's, default 1)")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from .. import DmilConfig, DmilForMultimodalClassification
    from ..profiling import profile_head, profile_train_step, train_step_setup
    from ..towers import tower_configs

    if args.scale:
        from ..scale import measure_scale

        results = measure_scale(args.scale, args.methods, args.work_dir, args.threads or 1, args.output)
        print(scale_summary(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    if args.train_step:
        setups = args.setups or (["features"] if args.feature_modalities else args.towers)
        for name in setups:
            config, cached = train_step_setup(name, args.feature_modalities or 2, args.modalities)
            result = profile_train_step(config, args.methods, args.batch_size, args.repeats, args.stage, args.device,
                                        cached=cached, compile=args.compile, precision=args.precision,
                                        steps_per_epoch=args.steps_per_epoch)
            result.update(towers=name)
            results.append(result)
            print(train_step_summary(result, args.methods[0]))
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


def train_step_summary(result: dict, first: str) -> str:
    """The console lines of one `--train-step` result."""
    steps = ", ".join(f"{m} {ms:.2f} ms ({result[f'ratio_to_{first}'][m]:.2f}x {first})"
                      for m, ms in result["step_ms"].items())
    lines = [f"{result['towers']:>13}: train step (DMIL stage {result['dmil_stage']}, {result['precision']}): {steps} "
             f"on {result['device']}, batch {result['batch_size']}, {result['threads']} thread(s)"]
    if result.get("peak_memory_mb"):
        lines.append("".rjust(15) + "peak memory: " + ", ".join(f"{m} {mb:.0f} MB"
                                                               for m, mb in result["peak_memory_mb"].items()))
    for m in result.get("compiled_step_ms", {}):
        pays = []
        for suffix, cache in (("", "cold"), ("_warm", "warm")):
            epochs = result.get(f"break_even_epochs{suffix}", {}).get(m)
            pays.append(f"{result[f'compile_seconds{suffix}'][m]:.0f} s {cache}, "
                        + ("never pays" if epochs is None else f"pays after {epochs:.1f} epochs"))
        lines.append(f"{'':>15}{m} compiled: {result['compiled_step_ms'][m]:.2f} ms a step "
                     f"({result['compile_speedup'][m]:.2f}x eager); compiling {'; '.join(pays)}")
    return "\n".join(lines)


def scale_summary(results: dict) -> str:
    """The console table of a `--scale` measurement."""
    lines = ["| rows | method | s / epoch | refit s | peak RSS MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['rows']:,} | {r['method']} | {r['seconds_per_epoch']:.1f} | {r.get('refit_seconds', 0):.1f} | "
              f"{r['peak_rss_mb']:.0f} |" for r in results["runs"]]
    for method, steps in results["rss_growth_mb"].items():
        lines += [f"{method}: peak RSS {step} rows {mb:+.0f} MB" for step, mb in steps.items()]
    return "\n".join(lines)
