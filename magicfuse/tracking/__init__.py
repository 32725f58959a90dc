"""MLflow helpers: one experiment per project, a run per stage nested under a pipeline run,
per-step metrics, artifacts, registered models and alias promotion. By job:

* `magicfuse.mlflow_store` — where the store is (re-exported here);
* `tracking.runs` — pipeline and stage runs, metrics, artifacts;
* `tracking.registry` — alias (``@champion``) promotion;
* `tracking.models` — the logged pyfunc models and `load_model`;
* `python -m magicfuse.tracking start|end` — `tracking.__main__`.

Tracking store: `MLFLOW_TRACKING_URI` when set, else a local sqlite file
(`mlflow.db` in the project root) with artifacts under `mlartifacts/`.
"""

from __future__ import annotations

from typing import Any

from magicfuse.mlflow_store import DEFAULT_EXPERIMENT, configure, default_tracking_uri, project_root, use_tracking_store
from magicfuse.tracking import models as _models
from magicfuse.tracking.models import (
    COMPONENT_KINDS,
    PIPELINE_ARTIFACT,
    load_model,
    log_component_model,
    log_pipeline_model,
    pip_requirements,
)
from magicfuse.tracking.registry import CHAMPION, PromotionDecision, promote_if_better, version_with_checkpoint
from magicfuse.tracking.runs import (
    PIPELINE_RUN_FILE,
    MetricLogger,
    TrackingError,
    current_pipeline_run,
    end_pipeline_run,
    flatten,
    log_artifacts,
    log_metrics,
    metric_key,
    stage_run,
    start_pipeline_run,
)

__all__ = [
    "CHAMPION", "COMPONENT_KINDS", "DEFAULT_EXPERIMENT", "PIPELINE_ARTIFACT", "PIPELINE_RUN_FILE", "MetricLogger",
    "PromotionDecision", "TrackingError", "configure", "current_pipeline_run", "default_tracking_uri",
    "end_pipeline_run", "flatten", "load_model", "log_artifacts", "log_component_model", "log_metrics",
    "log_pipeline_model", "metric_key", "pip_requirements", "project_root", "promote_if_better", "stage_run",
    "start_pipeline_run", "use_tracking_store", "version_with_checkpoint",
]


def __getattr__(name: str) -> Any:
    """``ComponentPyfunc`` is built on first use (importing MLflow's pyfunc takes seconds);
    models logged before the split pickled it as ``magicfuse.tracking.ComponentPyfunc``."""
    if name == "ComponentPyfunc":
        return _models.ComponentPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
