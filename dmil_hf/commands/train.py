"""`dmil train`: train DMIL or a baseline on a built-in or saved dataset."""

from __future__ import annotations

import json


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train DMIL or a baseline and write a checkpoint plus metrics.json")
    p.add_argument("--dataset", default="digits", help="built-in name (synthetic, digits) or a save_to_disk folder")
    p.add_argument("--method", default="dmil", choices=["dmil", "joint", "ensemble", "i2moe"])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--towers", default="tiny", choices=["tiny", "small"], help="size of randomly initialised towers")
    for modality in ("text", "vision", "audio"):
        p.add_argument(f"--{modality}-model", default=None,
                       help=f"pretrained {modality} tower: hub id or local folder (replaces the random one); offline "
                            "aliases from the 'pretrained' extra: all-minilm-l6-v2 (text), whisper-tiny.en (audio)")
    p.add_argument("--pooling", default="mean", choices=["auto", "mean", "cls"], help="how tower outputs are pooled")
    p.add_argument("--stage-epochs", type=float, nargs=3, metavar=("S1", "S2", "S3"), help="DMIL epochs per stage")
    p.add_argument("--stage-learning-rates", type=float, nargs=3, metavar=("S1", "S2", "S3"))
    p.add_argument("--epochs", type=float, help="baselines: epochs (default: DMIL's total)")
    p.add_argument("--learning-rate", type=float, help="baselines: learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds model init, data order and dropout: on CPU the same seed, settings and thread count "
                        "give identical weights")
    p.add_argument("--lora", action="store_true",
                   help="LoRA on the transformer towers that are not frozen; the head trains fully")
    p.add_argument("--freeze-towers", nargs="*", metavar="MODALITY", default=None,
                   help="freeze these towers (no modality named: every tower): eval mode, no gradient, their pooled "
                        "outputs computed once per split and cached; their projections still train")
    p.add_argument("--no-embedding-cache", action="store_true",
                   help="run frozen towers live in every epoch instead of caching their outputs (same result, slower)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="with --resume: continue even though settings or data differ from the interrupted run's")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --output-dir (only a folder dmil wrote; checked before deleting)")
    p.add_argument("--full-determinism", action="store_true",
                   help="transformers' enable_full_determinism: torch deterministic algorithms (slower on GPU)")
    p.add_argument("--push-to-hub", action="store_true",
                   help="push the finished model (exported with remote code and card) to --hub-model-id")
    p.add_argument("--hub-model-id", help="user/name or org/name on the Hub")
    p.add_argument("--hub-private", action="store_true", help="create the Hub repo private")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for this run (default: torch's, one per core). When several runs share "
                        "the machine, give each its share of the cores (e.g. 1 each for two runs on 2 cores): "
                        "oversubscribed threads slow every run many times over. The count is recorded in metrics.json "
                        "(it changes the order of float reductions)")
    p.add_argument("--report-to", default="none", help="passed to Trainer: none, tensorboard, ...")
    p.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="argument for a built-in dataset builder, e.g. num_samples=600 (JSON values)")
    p.add_argument("--config-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DmilConfig field, e.g. latent_size=64 or synergy_source=irrelevant (JSON values)")
    p.set_defaults(func=run)
    return p


def parse_key_values(pairs, option: str = "--dataset-arg") -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} {pair!r} must look like KEY=VALUE.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args) -> int:
    from ..experiment import RunSettings, run_training

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)

    settings = RunSettings(
        dataset=args.dataset, method=args.method, output_dir=args.output_dir, towers=args.towers,
        pretrained={m: getattr(args, f"{m}_model") for m in ("text", "vision", "audio") if getattr(args, f"{m}_model")},
        stage_epochs=tuple(args.stage_epochs) if args.stage_epochs else None,
        stage_learning_rates=tuple(args.stage_learning_rates) if args.stage_learning_rates else None,
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed,
        lora=args.lora, resume=args.resume, overwrite=args.overwrite, report_to=args.report_to,
        dataset_kwargs=parse_key_values(args.dataset_arg), tower_pooling=args.pooling,
        config_overrides=parse_key_values(args.config_arg, "--config-arg"), push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id, hub_private=args.hub_private, resume_with_changes=args.resume_with_changes,
        full_determinism=args.full_determinism,
        freeze_towers=False if args.freeze_towers is None else (list(args.freeze_towers) or True),
        embedding_cache=not args.no_embedding_cache,
    )
    metrics = run_training(settings)
    if metrics:
        summary = {"test": metrics["test"], "train_seconds": round(metrics["train_seconds"], 1)}
        if metrics.get("sessions", 1) > 1:
            summary["train_seconds_this_session"] = round(metrics["train_seconds_this_session"], 1)
        print(json.dumps(summary, indent=2))
        if metrics.get("hub_commit_url"):
            print(f"Pushed to the Hub: {metrics['hub_commit_url']}")
    return 0
