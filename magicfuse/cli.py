"""The `magicfuse` command.

Each subcommand lives beside the code it drives: a module listed in
`SUBCOMMAND_MODULES` exposes `add_cli(subparsers)`, which adds its parser and sets
`func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from magicfuse import __version__
from magicfuse.errors import MagicFuseError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "magicfuse.models.importer",
    "magicfuse.evaluation.fusion_eval",
    "magicfuse.fuse_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magicfuse",
        description="MagicFuse: single-image fusion for visual and semantic reinforcement.",
    )
    parser.add_argument("--version", action="version", version=f"magicfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MagicFuseError as exc:
        print(f"magicfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"magicfuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
