"""`dmil push`: export a saved model (with the fresh-process reload check) and upload it to the Hugging Face Hub."""

from __future__ import annotations

import sys


def add_parser(subparsers):
    p = subparsers.add_parser("push", help="export a saved model, check it, and upload it to the Hugging Face Hub")
    p.add_argument("--model", required=True, help="folder written by dmil train / save_pretrained")
    p.add_argument("--repo-id", required=True, help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` saved, or HF_TOKEN)")
    p.add_argument("--commit-message", default=None, help='message of the Hub commit (default: "Upload <method> model")')
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; only if you trust them")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import ExportCheckError, push_model

    try:
        url = push_model(args.model, args.repo_id, private=args.private, create_pr=args.create_pr,
                         revision=args.revision, token=args.token, commit_message=args.commit_message,
                         allow_pickle=args.allow_pickle)
    except ExportCheckError as err:
        print(f"dmil push: nothing was uploaded; the export failed its check: {err}", file=sys.stderr)
        return 1
    except HfHubHTTPError as err:
        print(f"dmil push: the Hub refused the upload: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0
