"""The pipeline on a cluster: every heavy step is its own Prefect deployment, run on whichever
worker of its work pool picks it up, and the steps share nothing but the MLflow server.

    magicfuse-step/<stage>   one deployment per step (synthesize, shards, train_ae, train_ikr,
                             train_ckg, train_mkf, evaluate) of the `step` flow below
    magicfuse-cluster/...    the `cluster_pipeline` flow: starts the steps with run_deployment,
                             IKR and CKG at the same time (on two workers when there are two)

A step (`step`):
  1. fetches the outputs of the runs it reads (checkpoints, shard folders, scenes: logged by
     their steps as MLflow artifacts, resolved by run id, sha256-checked, cached per worker;
     magicfuse.tracking.handoff) into its own working directory;
  2. runs the one stage function of `magicfuse.pipeline` (the same code as `dvc repro` and
     flows/pipeline.py), as torchrun DDP processes when `nproc_per_node` > 1 (or the job
     variable env.MAGICFUSE_NPROC_PER_NODE);
  3. while a training stage runs, mirrors its last.pt to the pipeline run, so that a step whose
     process dies (kill -9, a lost machine) resumes on the next attempt, on any worker;
  4. logs its outputs to its own MLflow stage run for the steps after it.

The pipeline flow retries a step whose flow run *crashed* (its process died) up to `attempts`
times; a step that *failed* (raised an error) fails the pipeline with the step's own message.

Set-up (server, pools, workers, storage, GPUs): docs/ORCHESTRATION.md. The single-machine
flows (flows/pipeline.py) and `dvc repro` do not use any of this.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from prefect import flow, runtime, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.pipeline import _pipeline_run_env, parse_set, resolve_params  # noqa: E402
from magicfuse import pipeline, tracking  # noqa: E402
from magicfuse.errors import ConfigError, MagicFuseError  # noqa: E402
from magicfuse.tracking import handoff  # noqa: E402

STEP_FLOW = "magicfuse-step"
WORKER_ENV = "MAGICFUSE_WORKER_NAME"  # a name for this worker in run records (default: the host name)
NPROC_ENV = "MAGICFUSE_NPROC_PER_NODE"  # job variable: run training steps as N torchrun processes


def worker_name() -> str:
    return os.environ.get(WORKER_ENV) or socket.gethostname()


def _nproc(value: int | None) -> int:
    if value is None:
        text = os.environ.get(NPROC_ENV, "1")
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{NPROC_ENV}={text!r}: expected an integer >= 1 (processes per node)") from None
    if isinstance(value, bool) or value < 1:
        raise ConfigError(f"nproc_per_node must be an integer >= 1, got {value!r}")
    return value


def _step_run_name() -> str:
    p = runtime.flow_run.parameters
    return f"{pipeline.stage_name(p['stage'], p.get('source'))} on {worker_name()}"


# ----------------------------------------------------------------------------- one step on a worker


@flow(name=STEP_FLOW, flow_run_name=_step_run_name, log_prints=True)
def step(stage: str, params: dict[str, Any] | None = None, params_path: str = "params.yaml",
         profile: str | None = None, overrides: dict[str, Any] | None = None,
         pipeline_run_id: str | None = None, inputs: list[str] | None = None, source: str | None = None,
         nproc_per_node: int | None = None) -> dict[str, Any]:
    """Run one stage on this worker: fetch `inputs` (MLflow run ids) -> run -> publish.

    `params`: the pipeline's resolved parameters (what the pipeline flow passes, so every worker
    trains with the same ones); else `params_path`/`profile`/`overrides` are resolved here.
    `pipeline_run_id`: the MLflow pipeline run the stage run nests under (and where its
    checkpoints are mirrored); none: a new pipeline run."""
    if params is None:
        params = resolve_params(params_path, profile, overrides)
    else:
        pipeline.validate_params(params, f"step {stage}: parameters from the pipeline flow")
    name = pipeline.stage_name(stage, source)
    nproc = _nproc(nproc_per_node)
    if nproc > 1 and stage not in pipeline.TRAINING_DIRS:
        raise ConfigError(f"step {name}: nproc_per_node={nproc} applies to training steps only")
    experiment = str(params.get("tracking", {}).get("experiment", "magicfuse"))
    tracking.configure(experiment)
    if pipeline_run_id is None:
        pipeline_run_id = tracking.start_pipeline_run("pipeline", experiment=experiment,
                                                      tags={"magicfuse.orchestrator": "prefect-cluster"})
    print(f"step {name} on worker {worker_name()} in {Path.cwd()} (pipeline run {pipeline_run_id})")
    t0 = time.perf_counter()
    with _pipeline_run_env(pipeline_run_id):
        for run_id in inputs or []:
            handoff.fetch(run_id)
        handoff.close_stale_runs(pipeline_run_id, name)
        out_dir = pipeline.ARTIFACTS / pipeline.TRAINING_DIRS[stage] if stage in pipeline.TRAINING_DIRS else None
        if out_dir is not None:
            handoff.restore_checkpoint(pipeline_run_id, name, out_dir)
        fetched = time.perf_counter() - t0
        with handoff.mirrored(pipeline_run_id, name, out_dir):
            if nproc > 1:
                summary = pipeline.run_stage_distributed(stage, params, nproc)
            else:
                summary = pipeline.run_stage(stage, params, source=source)
        run = handoff.find_stage_run(pipeline_run_id, name, published=False)
        if run is None:
            raise MagicFuseError(f"step {name}: the stage finished but its MLflow run under pipeline run "
                                 f"{pipeline_run_id} was not found")
        client = handoff.client()
        client.set_tag(run.info.run_id, "magicfuse.worker", worker_name())
        client.set_tag(run.info.run_id, "magicfuse.workdir", str(Path.cwd()))
        handoff.publish(run.info.run_id, pipeline.stage_outputs(params, stage, source))
    print(f"step {name}: done in {time.perf_counter() - t0:.1f} s ({fetched:.1f} s fetching inputs); "
          f"outputs logged to MLflow run {run.info.run_id}")
    return {"stage": name, "mlflow_run_id": run.info.run_id, "worker": worker_name(), "summary": summary}


# ----------------------------------------------------------------------------- the pipeline flow


@task(name="remote-step", task_run_name="{stage}{suffix}", retries=0, cache_policy=NO_CACHE, log_prints=True)
def remote_step(stage: str, params: dict[str, Any], pipeline_run_id: str, inputs: list[str], *,
                source: str | None = None, suffix: str = "", nproc_per_node: int = 1, attempts: int = 2,
                deployment: str | None = None) -> dict[str, Any]:
    """Start the step's deployment and wait for it; a crashed flow run (its process died) is started
    again (it resumes from the checkpoint mirrored to MLflow), a failed one raises its error.
    Returns the step's MLflow run id and its flow-run record (worker, start, end)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = pipeline.stage_name(stage, source)
    deployment = deployment or f"{STEP_FLOW}/{stage}"
    parameters = {"stage": stage, "params": params, "pipeline_run_id": pipeline_run_id, "inputs": inputs,
                  "source": source}
    job_variables = {"env": {NPROC_ENV: str(nproc_per_node)}} if nproc_per_node > 1 else None
    attempts_made = []
    for attempt in range(1, attempts + 1):
        try:
            fr = run_deployment(deployment, parameters=parameters, job_variables=job_variables, poll_interval=1,
                                tags=["magicfuse", f"pipeline-run:{pipeline_run_id}"])
        except ObjectNotFound:
            raise MagicFuseError(f"step {name}: there is no deployment {deployment!r} on the Prefect server "
                                 f"({os.environ.get('PREFECT_API_URL', 'ephemeral')}); run `prefect deploy --all` "
                                 f"from the repository (docs/ORCHESTRATION.md)") from None
        state = fr.state
        attempts_made.append({"flow_run": fr.name, "state": state.type.value if state else None})
        if state is not None and state.is_completed():
            run = handoff.find_stage_run(pipeline_run_id, name)
            if run is None:
                raise MagicFuseError(f"step {name} completed ({fr.name}) but published no outputs to MLflow "
                                     f"pipeline run {pipeline_run_id}")
            return {"stage": name, "mlflow_run_id": run.info.run_id, "flow_run": fr.name,
                    "flow_run_id": str(fr.id), "worker": run.data.tags.get("magicfuse.worker"),
                    "start": fr.start_time.isoformat() if fr.start_time else None,
                    "end": fr.end_time.isoformat() if fr.end_time else None, "attempts": attempts_made}
        message = (state.message or "") if state is not None else "no state"
        if state is not None and state.is_crashed() and attempt < attempts:
            print(f"step {name}: flow run {fr.name} crashed ({message}); starting it again "
                  f"(attempt {attempt + 1} of {attempts}), it resumes from its last mirrored checkpoint")
            continue
        kind = state.type.value.lower() if state is not None else "ended"
        raise MagicFuseError(f"step {name} {kind} (flow run {fr.name}, attempt {attempt} of {attempts}): {message}")
    raise AssertionError("unreachable")


@flow(name="magicfuse-cluster", log_prints=True)
def cluster_pipeline(params_path: str = "params.yaml", profile: str | None = None,
                     overrides: dict[str, Any] | None = None, nproc_per_node: int = 1,
                     attempts: int = 2) -> dict[str, Any]:
    """The whole pipeline, every step as its own deployment run (`magicfuse-step/<stage>`):
    synthesize -> shards@<source> (concurrently) -> train_ae -> train_ikr || train_ckg ->
    train_mkf -> evaluate. Steps hand their outputs on through MLflow only.
    `nproc_per_node` > 1: training steps run as that many torchrun processes on their worker.
    `attempts`: how often a crashed step is started (resuming from its mirrored checkpoint)."""
    params = resolve_params(params_path, profile, overrides)
    if attempts < 1:
        raise ConfigError(f"attempts must be >= 1, got {attempts!r}")
    _nproc(nproc_per_node)
    experiment = str(params.get("tracking", {}).get("experiment", "magicfuse"))
    run_id = tracking.start_pipeline_run("pipeline", experiment=experiment, record=None, tags={
        "magicfuse.orchestrator": "prefect-cluster", "magicfuse.profile": str(params.get("profile", "tiny"))})
    print(f"MLflow pipeline run {run_id}")
    common = {"params": params, "pipeline_run_id": run_id, "attempts": attempts}
    done: dict[str, dict[str, Any]] = {}

    def inputs(stage: str, source: str | None = None) -> list[str]:
        return [done[n]["mlflow_run_id"] for n in pipeline.stage_upstream(params, stage, source)]

    def record(result: dict[str, Any]) -> None:
        done[result["stage"]] = result

    status = "FAILED"
    try:
        record(remote_step("synthesize", inputs=inputs("synthesize"), **common))
        futures = [remote_step.submit("shards", inputs=inputs("shards", s), source=s, suffix=f"@{s}", **common)
                   for s in pipeline.active_sources(params)]
        for fut in futures:
            record(fut.result())
        record(remote_step("train_ae", inputs=inputs("train_ae"), nproc_per_node=nproc_per_node, **common))
        branches = [remote_step.submit(b, inputs=inputs(b), nproc_per_node=nproc_per_node, **common)
                    for b in ("train_ikr", "train_ckg")]
        for fut in branches:
            record(fut.result())
        record(remote_step("train_mkf", inputs=inputs("train_mkf"), nproc_per_node=nproc_per_node, **common))
        record(remote_step("evaluate", inputs=inputs("evaluate"), **common))
        status = "FINISHED"
    finally:
        timeline = sorted(done.values(), key=lambda r: r.get("start") or "")
        if timeline:
            print(format_timeline(timeline))
            import mlflow

            mlflow.MlflowClient().log_text(run_id, json.dumps(timeline, indent=2), "timeline.json")
        tracking.end_pipeline_run(status, run_id=run_id)
    return {"pipeline_run_id": run_id, "steps": done}


CRASH_AUTOMATION = "magicfuse: crash flow runs whose heartbeats stopped"


def install_crash_detection(heartbeat_s: int = 60, missed: int = 3) -> str:
    """Create (or replace) the Prefect automation that marks a flow run Crashed when it has sent
    no heartbeat for `heartbeat_s` x `missed` seconds: its machine died together with its
    worker, so no worker is left to report it. The pipeline flow then starts the step again on
    another worker. Workers must run with PREFECT_FLOWS_HEARTBEAT_FREQUENCY=`heartbeat_s`
    (>= 30). Returns the automation's id."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if heartbeat_s < 30 or missed < 1:
        raise ConfigError(f"crash detection: heartbeat_s must be >= 30 (Prefect's minimum) and missed >= 1, "
                          f"got {heartbeat_s} and {missed}")
    with_states = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    automation = Automation(
        name=CRASH_AUTOMATION,
        description=f"A flow run with no heartbeat for {heartbeat_s * missed} s is marked Crashed "
                    f"(magicfuse flows/cluster.py restarts crashed steps).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *with_states},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=heartbeat_s * missed)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {heartbeat_s * missed} s: its machine or worker died")])
    try:
        Automation.read(name=CRASH_AUTOMATION).delete()
    except ValueError:  # none yet
        pass
    return str(automation.create().id)


def format_timeline(rows: list[Mapping[str, Any]]) -> str:
    """The steps as a table: stage, worker, start and end (seconds after the first start)."""
    from datetime import datetime

    starts = [datetime.fromisoformat(r["start"]) for r in rows if r.get("start")]
    t0 = min(starts) if starts else None
    lines = [f"{'step':<18} {'worker':<16} {'start s':>8} {'end s':>8}  flow run"]
    for r in rows:
        def rel(key: str) -> str:
            return f"{(datetime.fromisoformat(r[key]) - t0).total_seconds():8.1f}" if r.get(key) and t0 else "       -"
        lines.append(f"{r['stage']:<18} {str(r.get('worker')):<16} {rel('start')} {rel('end')}  {r.get('flow_run')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.cluster",
        description="Run the cluster pipeline flow here; its steps run as deployments on the Prefect server's "
                    "workers (PREFECT_API_URL), handing outputs on through MLflow (MLFLOW_TRACKING_URI).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--attempts", type=int, default=2)
    ap.add_argument("--install-crash-detection", type=int, metavar="HEARTBEAT_S", default=None,
                    help="only create the Prefect automation that marks a flow run Crashed after 3 missed "
                         "heartbeats (workers run with PREFECT_FLOWS_HEARTBEAT_FREQUENCY=HEARTBEAT_S), then exit")
    ap.add_argument("--missed-heartbeats", type=int, default=3, metavar="N",
                    help="with --install-crash-detection: heartbeats missed before a run is marked Crashed (3)")
    args = ap.parse_args(argv)
    try:
        if args.install_crash_detection is not None:
            automation_id = install_crash_detection(args.install_crash_detection, args.missed_heartbeats)
            print(f"automation {CRASH_AUTOMATION!r} ({automation_id}): a flow run without a heartbeat for "
                  f"{args.missed_heartbeats * args.install_crash_detection} s is marked Crashed")
            return 0
        result = cluster_pipeline(params_path=args.params, profile=args.profile,
                                  overrides=parse_set(args.sets) or None, nproc_per_node=args.nproc_per_node,
                                  attempts=args.attempts)
    except MagicFuseError as exc:
        print(f"cluster pipeline: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
