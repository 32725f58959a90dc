"""Thin DVC entry point: `python -m stages.run STAGE` reads params.yaml and calls the
one library function behind that stage (magicfuse.stage -> magicfuse.pipeline.run_stage)."""

from __future__ import annotations

import sys

from magicfuse.stage import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m stages.run"))
