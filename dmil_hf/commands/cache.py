"""`dmil cache`: list or clear the embedding cache of frozen towers (`$DMIL_HF_CACHE/embeddings`, see
`dmil_hf.embedding_cache`)."""

from __future__ import annotations

import time


def add_parser(subparsers):
    p = subparsers.add_parser("cache", help="list or clear the cached pooled outputs of frozen towers")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the cache's entries: modality, split, shape, size, date, state")
    listing.add_argument("--verify", action="store_true",
                         help="also check each entry's SHA-256 against its sidecar (reads every file)")
    clearing = actions.add_parser("clear", help="delete the cache's entries (only files the cache wrote)")
    clearing.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                          help="delete only the entries written more than DAYS days ago")
    for sub in (listing, clearing):
        sub.add_argument("--cache-dir", default=None,
                         help="the cache folder (default: $DMIL_HF_CACHE/embeddings, else ~/.cache/dmil_hf/embeddings)")
    p.set_defaults(func=run)
    return p


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def run(args) -> int:
    from ..embedding_cache import clear_entries, default_cache_dir, list_entries

    folder = args.cache_dir or default_cache_dir()
    if args.action == "clear":
        deleted = clear_entries(folder, args.older_than)
        print(f"Deleted {len(deleted)} file(s) from {folder}.")
        return 0
    entries = list_entries(folder, checksum=args.verify)
    if not entries:
        print(f"No entries in {folder}.")
        return 0
    print(f"{len(entries)} entries in {folder}, {_size(sum(e['bytes'] for e in entries))}:")
    for entry in entries:
        shape = "x".join(map(str, entry["shape"])) if entry["shape"] else "?"
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["created"]))
        state = "ok" if entry["problem"] is None else f"damaged: {entry['problem']}"
        print(f"  {entry['modality']:<10} {entry['split'] or '?':<16} {shape:>12} {_size(entry['bytes']):>9}  {date}  "
              f"{entry['path'].name}  {state}")
    return 0
