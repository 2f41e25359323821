"""`dmil export`: write a self-contained Hub folder for a saved model and prove it reloads without dmil_hf."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="write a Hub-ready folder (remote code, safetensors, model card) and check that it reloads")
    p.add_argument("--model", required=True, help="folder written by dmil train / save_pretrained")
    p.add_argument("--output-dir", required=True, help="where to write the export (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; only if you trust them")
    p.add_argument("--repo-id", default=None,
                   help="Hub repo the card's usage snippet should load (default: the folder)")
    p.add_argument("--revision", default=None, help="branch or tag the card's usage snippet should load")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..hub import ExportCheckError, export_model

    try:
        report = export_model(args.model, args.output_dir, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                              repo_id=args.repo_id, revision=args.revision)
    except ExportCheckError as err:
        print(f"dmil export: the export failed its check: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
