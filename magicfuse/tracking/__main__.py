"""`python -m magicfuse.tracking start|end [--status S]` (see `main`)."""

from __future__ import annotations

import argparse

from magicfuse.config import load_params
from magicfuse.mlflow_store import DEFAULT_EXPERIMENT
from magicfuse.tracking.runs import end_pipeline_run, start_pipeline_run


def main(argv: list[str] | None = None) -> int:
    """`python -m magicfuse.tracking start|end [--status S]`: open a fresh pipeline run
    before `dvc repro` (its stage runs nest under it) and close it afterwards."""
    ap = argparse.ArgumentParser(prog="python -m magicfuse.tracking", description=main.__doc__)
    ap.add_argument("action", choices=("start", "end"))
    ap.add_argument("--status", default="FINISHED", choices=("FINISHED", "FAILED", "KILLED"))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    if args.action == "start":
        params = load_params(args.params)
        experiment = str(params.get("tracking", {}).get("experiment", DEFAULT_EXPERIMENT))
        run_id = start_pipeline_run("pipeline", tags={"magicfuse.orchestrator": "dvc",
                                                      "magicfuse.profile": str(params.get("profile", "tiny"))},
                                    experiment=experiment)
        print(f"MLflow pipeline run {run_id} (experiment {experiment!r})")
    else:
        end_pipeline_run(args.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
