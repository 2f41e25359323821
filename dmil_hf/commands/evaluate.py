"""`dmil evaluate`: test a saved model on a dataset (modalities it lacks are treated as absent)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(subparsers):
    from ..run_settings import add_dataset_arg_option

    p = subparsers.add_parser("evaluate", help="evaluate a saved model on a dataset split")
    p.add_argument("--model", required=True, help="folder written by dmil train / save_pretrained")
    p.add_argument("--dataset", required=True, help="built-in name or a save_to_disk folder")
    p.add_argument("--split", default="test", help="split to evaluate (validation for model selection)")
    p.add_argument("--degraded", action="store_true",
                   help="also evaluate copies of the split with each modality degraded (missing, noise, blank, partial "
                        "noise levels, natural corruptions), with the attainable level and the degradation gap")
    p.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                   help="with --degraded, only these kinds of degradation (e.g. missing noise blank partial; default: "
                        "all: missing, noise, blank, partial, blur, occlusion, background, word_dropout)")
    p.add_argument("--output", default=None, help="JSON file to write (default: <model>/eval_<dataset>_<split>.json)")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights; only if you trust them")
    p.add_argument("--no-embedding-cache", action="store_false", dest="embedding_cache",
                   help="run frozen towers live on every split instead of reading their pooled outputs from the "
                        "embedding cache (same result, slower: with --degraded each tower then runs on every copy)")
    add_dataset_arg_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from transformers import AutoProcessor

    from ..configuration_dmil import TOWERS
    from ..data import inspect_dataset, load_dataset_from_name_or_path
    from ..experiment import evaluate_model
    from ..loading import load_model
    from ..run_settings import parse_key_values

    model = load_model(args.model, allow_pickle=args.allow_pickle)
    dsd = load_dataset_from_name_or_path(args.dataset, **parse_key_values(args.dataset_arg))
    schema = inspect_dataset(dsd)
    if args.split not in dsd:
        raise ValueError(f"split {args.split!r} is not in the dataset; it has {list(dsd)}.")
    shared = [m for m in schema.modalities if m in model.config.modalities]
    if not shared:
        raise ValueError(f"the dataset's modalities {list(schema.modalities)} share none with the model's "
                         f"{list(model.config.modalities)}.")
    absent = [m for m in model.config.modalities if m not in shared]
    ignored = [m for m in schema.modalities if m not in model.config.modalities]
    notes = []
    if absent:
        notes.append(f"the model's modalities {absent} are absent from the dataset: evaluated without them (the model "
                     "uses only the components the present ones support)")
    if ignored:
        notes.append(f"the dataset's modalities {ignored} are not the model's: ignored")
    for note in notes:
        print(f"dmil evaluate: warning: {note}.", file=sys.stderr)
    needs_processor = any(m in TOWERS for m in shared)
    processor = AutoProcessor.from_pretrained(args.model) if needs_processor else None
    report, _ = evaluate_model(model, processor, dsd[args.split], shared, args.embedding_cache)
    name = Path(args.dataset).name or args.dataset
    output = Path(args.output) if args.output else Path(args.model) / f"eval_{name}_{args.split}.json"
    if args.kinds and not args.degraded:
        raise ValueError("--kinds selects the degradations of --degraded; add --degraded.")
    if args.degraded:  # every degradation of each shared modality (missing only where another one remains)
        from ..data.degrade import DEGRADATIONS, degradation_report

        kinds = sorted({d.kind for d in DEGRADATIONS})
        unknown = sorted(set(args.kinds or ()) - set(kinds))
        if unknown:
            raise ValueError(f"--kinds {unknown} unknown; expected some of {kinds}.")
        report["degraded"] = degradation_report(
            lambda split: evaluate_model(model, processor, split, shared, args.embedding_cache)[0], dsd, args.split,
            num_labels=model.config.num_labels, modalities=shared, clean=report,
            degradations=[d for d in DEGRADATIONS if not args.kinds or d.kind in args.kinds])
    result = {"test": report, "modalities_used": shared}
    if absent:
        result["modalities_absent"] = absent
    if ignored:
        result["modalities_ignored"] = ignored
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(report, indent=2))
    return 0
