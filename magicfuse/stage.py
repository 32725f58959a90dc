"""One pipeline stage from the command line: ``python -m magicfuse.stage STAGE`` reads the
parameters file and calls the one library function behind that stage
(:func:`magicfuse.pipeline.run_stage`). DVC's stages (``python -m stages.run``) and the
torchrun launcher (:func:`magicfuse.pipeline.run_stage_distributed`) both come here; it
lives in the package so that it runs from any working directory."""

from __future__ import annotations

import argparse
import json
import sys

from magicfuse import pipeline
from magicfuse.errors import MagicFuseError
from magicfuse.io import write_json_atomic
from magicfuse.training.distributed import launched_rank


def main(argv: list[str] | None = None, *, prog: str = "python -m magicfuse.stage") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=pipeline.STAGES)
    ap.add_argument("--source", default=None, help="shards only: name under shards.sources (default: all)")
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    ap.add_argument("--resolved", action="store_true",
                    help="the parameters file already holds its profile's values: do not merge the profile again")
    ap.add_argument("--summary", default=None, metavar="PATH",
                    help="also write the stage's summary as JSON to PATH (under torchrun: rank 0 only)")
    args = ap.parse_args(argv)
    try:
        summary = pipeline.run_stage(args.stage, pipeline.load_params(args.params, resolved=args.resolved),
                                     source=args.source)
        if args.summary and launched_rank() == 0:
            write_json_atomic(args.summary, json.loads(json.dumps(summary, default=str)))
    except MagicFuseError as exc:
        print(f"stage {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
