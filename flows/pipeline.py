"""Prefect 3 flows of the MagicFuse pipeline.

The flows orchestrate; they hold no logic of their own. Every task wraps exactly one
step of `magicfuse.pipeline` (the functions the DVC stages call too), so a flow run
and `dvc repro` produce the same artifacts, reports and MLflow runs:

    data_flow       synthesize -> shards@<source> (one task per source)
    train_flow      train_ae -> train_ikr || train_ckg (concurrently, two processes) -> train_mkf
    evaluate_flow   evaluate (report, metrics, model registration, @champion promotion)
    magicfuse_pipeline   an MLflow pipeline run around data_flow -> train_flow -> evaluate_flow

Every flow takes the parameters file (`params_path`), an optional `profile` (e.g.
"paper": deep-merges `profiles/<profile>.yaml`, exactly as setting `profile:` in the
file does) and optional `overrides`, a nested dict deep-merged over the result.

Run locally (offline, Prefect's ephemeral server; leave PREFECT_API_URL unset):

    python -m flows.pipeline [--params params.yaml] [--profile paper] [--set train_ae.steps=50 ...]

Deployments for a GPU work pool: prefect.yaml and docs/ORCHESTRATION.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402

from magicfuse import pipeline, tracking  # noqa: E402
from magicfuse.config import check_sections, deep_merge, load_params  # noqa: E402
from magicfuse.errors import ConfigError, MagicFuseError  # noqa: E402

RUN_ID_ENV = "MAGICFUSE_PIPELINE_RUN_ID"


# ----------------------------------------------------------------------------- parameters


def resolve_params(params_path: str = "params.yaml", profile: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`load_params(params_path)`, with `profile` (when given) selected as if it were written
    in the file, then `overrides` deep-merged over it; the result is validated whole
    (`magicfuse.pipeline.validate_params`) before any step runs."""
    params = load_params(params_path, profile=profile)
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"flow parameter overrides must be a mapping, got {overrides!r}")
        check_sections(overrides, "flow parameter overrides")
        params = deep_merge(params, overrides)
    pipeline.validate_params(params, f"{params_path} (profile {params.get('profile', 'tiny')}, with overrides)")
    return params


def parse_set(items: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=[1, 2]"] -> {"a": {"b": 1}, "c": [1, 2]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (dotted key), got {item!r}")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} was already given a value")
        node[parts[-1]] = yaml.safe_load(text)
    return out


@contextlib.contextmanager
def _pipeline_run_env(run_id: str | None) -> Iterator[None]:
    """Make `run_id` the parent of every stage run opened meanwhile (tasks run in this process)."""
    if run_id is None:
        yield
        return
    old = os.environ.get(RUN_ID_ENV)
    os.environ[RUN_ID_ENV] = run_id
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = old


# ----------------------------------------------------------------------------- tasks
# retries=0: a failed training step is a bug or a resource problem to look at, not a
# flake; NO_CACHE: every step has side effects (files, MLflow runs) and must really run.

_TASK = dict(retries=0, log_prints=True, cache_policy=NO_CACHE)


@task(name="synthesize", **_TASK)
def synthesize_task(params: dict[str, Any]) -> dict[str, Any]:
    return pipeline.synthesize(params)


@task(name="shards", task_run_name="shards@{source}", **_TASK)
def shards_task(params: dict[str, Any], source: str) -> dict[str, Any]:
    return pipeline.shards(params, source)


@task(name="train_ae", **_TASK)
def train_ae_task(params: dict[str, Any]) -> dict[str, Any]:
    return pipeline.train_ae(params)


@task(name="train_ldm", task_run_name="train_{branch}", **_TASK)
def train_ldm_task(params: dict[str, Any], branch: str, share_cpu: int = 1) -> dict[str, Any]:
    """`share_cpu` > 1: this many steps run at once on this machine, so on CPU each takes its
    share of the cores (two processes with torch's default thread count each oversubscribe the
    cores and both run several times slower)."""
    if share_cpu > 1:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // share_cpu))
    return pipeline.train_ldm(params, branch)


@task(name="train_ddp", task_run_name="{stage}-x{nproc_per_node}", **_TASK)
def train_ddp_task(params: dict[str, Any], stage: str, nproc_per_node: int) -> dict[str, Any]:
    """One training stage as `nproc_per_node` DDP processes (torchrun; one per GPU)."""
    return pipeline.run_stage_distributed(stage, params, nproc_per_node)


@task(name="train_mkf", **_TASK)
def train_mkf_task(params: dict[str, Any]) -> dict[str, Any]:
    return pipeline.train_mkf(params)


@task(name="evaluate", **_TASK)
def evaluate_task(params: dict[str, Any]) -> dict[str, Any]:
    return pipeline.evaluate(params)


# ----------------------------------------------------------------------------- flows


def _sources(params: Mapping[str, Any]) -> list[str]:
    return pipeline.active_sources(params)


@flow(name="data", log_prints=True)
def data_flow(params_path: str = "params.yaml", profile: str | None = None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """synthesize -> shards@<source> for every entry of shards.sources."""
    params = resolve_params(params_path, profile, overrides)
    scenes = synthesize_task(params)
    return {"synthesize": scenes, "shards": {name: shards_task(params, name) for name in _sources(params)}}


# The two denoisers train concurrently in two worker processes, not threads: a training
# run owns process-wide state (torch's global RNG while networks are built under a seed,
# matplotlib's pyplot and mathtext parser for loss.png, the GIL), so threads would make
# results depend on timing and can crash the loss plot. Processes also give real
# parallelism on CPU. train_ae and train_mkf run in the flow's own process.
@flow(name="train", log_prints=True, task_runner=ProcessPoolTaskRunner(max_workers=2))
def train_flow(params_path: str = "params.yaml", profile: str | None = None,
               overrides: dict[str, Any] | None = None, nproc_per_node: int = 1) -> dict[str, Any]:
    """train_ae -> train_ikr and train_ckg concurrently (two processes) -> train_mkf.

    `nproc_per_node` > 1 (a multi-GPU worker): every training stage runs, one after the
    other, as that many torchrun DDP processes (`pipeline.run_stage_distributed`)."""
    params = resolve_params(params_path, profile, overrides)
    if nproc_per_node != 1:
        return {stage: train_ddp_task(params, stage, nproc_per_node)
                for stage in ("train_ae", "train_ikr", "train_ckg", "train_mkf")}
    ae = train_ae_task(params)
    ikr = train_ldm_task.submit(params, "ikr", share_cpu=2)
    ckg = train_ldm_task.submit(params, "ckg", share_cpu=2)
    branches = {"ikr": ikr.result(), "ckg": ckg.result()}
    mkf = train_mkf_task(params)
    return {"train_ae": ae, "train_ikr": branches["ikr"], "train_ckg": branches["ckg"], "train_mkf": mkf}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml", profile: str | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the trained pipeline; registers it and moves @champion if it is better."""
    params = resolve_params(params_path, profile, overrides)
    return evaluate_task(params)


@flow(name="magicfuse-pipeline", log_prints=True)
def magicfuse_pipeline(params_path: str = "params.yaml", profile: str | None = None,
                       overrides: dict[str, Any] | None = None, nproc_per_node: int = 1) -> dict[str, Any]:
    """The whole pipeline under one MLflow pipeline run (its stage runs nest under it);
    `nproc_per_node` > 1 trains with that many DDP processes (see `train_flow`)."""
    params = resolve_params(params_path, profile, overrides)  # fail fast on bad parameters
    run_id = tracking.start_pipeline_run("pipeline", tags={"magicfuse.orchestrator": "prefect",
                                                           "magicfuse.profile": str(params.get("profile", "tiny"))},
                                        experiment=str(params.get("tracking", {}).get("experiment", "magicfuse")))
    print(f"MLflow pipeline run {run_id}")
    status = "FAILED"
    try:
        with _pipeline_run_env(run_id):
            out = {
                "data": data_flow(params_path, profile, overrides),
                "train": train_flow(params_path, profile, overrides, nproc_per_node),
                "evaluate": evaluate_flow(params_path, profile, overrides),
            }
        status = "FINISHED"
    finally:
        tracking.end_pipeline_run(status, run_id=run_id)
    return {"pipeline_run_id": run_id, **out}


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline",
                                 description="Run the whole MagicFuse pipeline as a Prefect flow (locally).")
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    ap.add_argument("--profile", default=None, help="profile to select (default: the file's `profile:`)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one parameter, dotted key, YAML value (repeatable), e.g. train_ae.steps=50")
    ap.add_argument("--flow", choices=("pipeline", "data", "train", "evaluate"), default="pipeline",
                    help="which flow to run (default: the whole pipeline)")
    ap.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="pipeline/train flows: run each training stage as N torchrun DDP processes "
                         "(one per GPU), one stage after the other (default 1: in-process, IKR || CKG)")
    args = ap.parse_args(argv)
    flows = {"pipeline": magicfuse_pipeline, "data": data_flow, "train": train_flow, "evaluate": evaluate_flow}
    try:
        overrides = parse_set(args.sets) or None
        resolve_params(args.params, args.profile, overrides)  # bad parameters: fail before starting Prefect
        extra = {"nproc_per_node": args.nproc_per_node} if args.flow in ("pipeline", "train") else {}
        if args.nproc_per_node != 1 and not extra:
            raise ConfigError(f"--nproc-per-node applies to the pipeline and train flows, not to {args.flow!r}")
        result = flows[args.flow](params_path=args.params, profile=args.profile, overrides=overrides, **extra)
    except MagicFuseError as exc:
        print(f"flow {args.flow}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
