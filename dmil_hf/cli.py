"""The `dmil` console script: one subcommand per module in `dmil_hf.commands`."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import bench, cache, estimate, evaluate, export, profile, push, train

COMMANDS = (train, evaluate, bench, estimate, export, push, profile, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmil", description="DMIL: decomposition-based multimodal interaction learning.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dmil` with `argv` (default: the process arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ConnectionError) as err:
        # Errors at the public boundary already say what was wrong: print them without a traceback.
        print(f"dmil {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
