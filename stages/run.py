"""Thin DVC entry point: `python -m stages.run STAGE` reads params.yaml and calls the
one library function behind that stage (magicfuse.pipeline.run_stage)."""

from __future__ import annotations

import argparse
import json
import sys

from magicfuse import pipeline
from magicfuse.errors import MagicFuseError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.run", description=__doc__)
    ap.add_argument("stage", choices=pipeline.STAGES)
    ap.add_argument("--source", default=None, help="shards only: name under shards.sources (default: all)")
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    args = ap.parse_args(argv)
    try:
        summary = pipeline.run_stage(args.stage, pipeline.load_params(args.params), source=args.source)
    except MagicFuseError as exc:
        print(f"stage {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
