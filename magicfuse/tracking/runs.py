"""MLflow runs: one pipeline run per `make run` / flow run, a run per stage nested under it,
per-step metrics (`MetricLogger`) and artifacts. MLflow is imported inside the functions (it takes seconds to import).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from magicfuse.errors import MagicFuseError
from magicfuse.io import write_json_atomic
from magicfuse.mlflow_store import DEFAULT_EXPERIMENT, configure

PIPELINE_RUN_FILE = Path("artifacts") / "mlflow_pipeline_run.json"


class TrackingError(MagicFuseError):
    """MLflow tracking or registry operation failed."""


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params into `a.b.c` keys with string values (MLflow's limit is 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            out[name] = text[:6000]
    return out


def _read_pipeline_run(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["run_id"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def child_runs(parent_run_id: str, stage: str | None = None) -> list[Any]:
    """The runs nested under `parent_run_id` (only those of `stage` if given), newest first."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if stage is not None:
        query += f" and tags.`magicfuse.stage` = '{stage}'"
    return client.search_runs([parent.info.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"], max_results=1000)


def close_dead_runs(parent_run_id: str, stage: str | None = None) -> list[str]:
    """Mark the runs under `parent_run_id` (of `stage`, if given) that are still RUNNING as KILLED:
    their process died (kill -9, a lost machine) and left them open. Returns their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    dead = [r.info.run_id for r in child_runs(parent_run_id, stage) if r.info.status == "RUNNING"]
    for run_id in dead:
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "magicfuse.note", "its process died and left it RUNNING")
        print(f"mlflow: run {run_id} under {parent_run_id} was left RUNNING by a dead process; marked KILLED",
              flush=True)
    return dead


def start_pipeline_run(name: str = "pipeline", *, tags: Mapping[str, str] | None = None,
                       record: Path | None = PIPELINE_RUN_FILE, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create a fresh parent run for one pipeline execution and remember its id (in `record`).
    The previously recorded pipeline run, if a killed `make run` left it RUNNING, is closed as
    KILLED with the stage runs left RUNNING under it."""
    import mlflow

    exp_id = configure(experiment)
    client = mlflow.MlflowClient()
    previous = _read_pipeline_run(record) if record is not None else None
    if previous:
        try:
            if client.get_run(previous).info.status == "RUNNING":
                close_dead_runs(previous)
                client.set_terminated(previous, status="KILLED")
                print(f"mlflow: the previous pipeline run {previous} was left RUNNING; marked KILLED", flush=True)
        except Exception:  # a run of another store, or deleted: nothing to close
            pass
    run = client.create_run(exp_id, run_name=name, tags={"magicfuse.kind": "pipeline", **(tags or {})})
    if record is not None:
        write_json_atomic(record, {"run_id": run.info.run_id})
    return run.info.run_id


def current_pipeline_run(record: Path = PIPELINE_RUN_FILE, *, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The parent run of the current pipeline: env var, the recorded one, or a new one."""
    import mlflow

    run_id = os.environ.get("MAGICFUSE_PIPELINE_RUN_ID") or _read_pipeline_run(record)
    if run_id:
        try:
            run = mlflow.MlflowClient().get_run(run_id)
            if run.info.lifecycle_stage == "active":
                return run_id
        except Exception:  # run from another store or deleted: start a new one
            pass
    return start_pipeline_run(record=record, experiment=experiment)


def end_pipeline_run(status: str = "FINISHED", record: Path = PIPELINE_RUN_FILE, *, run_id: str | None = None) -> None:
    """Mark the pipeline run (`run_id`, else the recorded one) terminated with `status`."""
    import mlflow

    configure()
    run_id = run_id or _read_pipeline_run(record)
    if run_id:
        mlflow.MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
              experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """An MLflow run for one stage of experiment `experiment`, nested under the pipeline run."""
    import mlflow

    configure(experiment)
    parent = parent_run_id or current_pipeline_run(experiment=experiment)
    tags = {"magicfuse.stage": stage, "mlflow.parentRunId": parent, **(tags or {})}
    with mlflow.start_run(run_name=stage, tags=tags, nested=mlflow.active_run() is not None) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run


_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9\-.:/]+")  # "_" included, so runs collapse to one


def metric_key(name: str) -> str:
    """`name` as a valid MLflow metric key: spaces and every character MLflow refuses
    (anything but alphanumerics, ``_ - . : /``) become one ``_``, with none left at the
    edges of a dotted part: ``"eval.visual.IKR (captured input).EN"`` →
    ``"eval.visual.IKR_captured_input.EN"``."""
    key = _BAD_METRIC_CHARS.sub("_", name)
    return ".".join(part.strip("_") or "_" for part in key.split("."))


class MetricLogger:
    """Callable `(metrics, step)` that logs finite values to the active MLflow run."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        clean = {metric_key(f"{self.prefix}{k}"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            mlflow.log_metrics(clean, step=int(step))


def log_metrics(metrics: Mapping[str, Any], *, prefix: str = "", step: int | None = None) -> None:
    """Log a (possibly nested) dict of numbers; non-numbers are skipped."""
    import mlflow

    flat: dict[str, float] = {}

    def walk(d: Mapping[str, Any], p: str) -> None:
        for k, v in d.items():
            key = f"{p}{k}"
            if isinstance(v, Mapping):
                walk(v, f"{key}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                flat[metric_key(key)] = float(v)

    walk(metrics, prefix)
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    import mlflow

    for p in paths:
        p = Path(p)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.is_file():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)
