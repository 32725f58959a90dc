"""Where MLflow keeps runs and models: the one place that points MLflow at a store.

A leaf module (it imports nothing of MagicFuse), used by `magicfuse.tracking`
(runs, registry, logged models) and by `magicfuse.inference` (downloading a model URI).
MLflow itself is imported inside the functions: it takes seconds to import, and
``import magicfuse.inference`` must stay fast for the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "magicfuse"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves this machine


def project_root() -> Path:
    """The folder holding params.yaml (the working directory of stages and flows)."""
    return Path.cwd()


def default_tracking_uri(root: Path | None = None) -> str:
    root = (root or project_root()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def use_tracking_store(tracking_uri: str | None = None) -> str:
    """Point MLflow at the tracking store (explicit URI, `MLFLOW_TRACKING_URI`, or the
    local sqlite default) without touching experiments; returns the URI."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def configure(experiment: str = DEFAULT_EXPERIMENT, tracking_uri: str | None = None) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id.

    An explicit `tracking_uri` wins, then `MLFLOW_TRACKING_URI`, then the local
    sqlite default (whose artifacts go to `mlartifacts/` beside it).
    """
    import mlflow

    uri = use_tracking_store(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):  # a local store: keep its artifacts beside it, not in ./mlruns
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
