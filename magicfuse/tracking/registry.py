"""The model registry: move an alias (``@champion``) to a new model version only when its
evaluation metric beats the current holder's. MLflow is imported inside the functions (it takes seconds to import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from magicfuse.tracking.runs import TrackingError

CHAMPION = "champion"


@dataclass(frozen=True)
class PromotionDecision:
    model: str
    version: str
    promoted: bool
    reason: str
    metric: str
    candidate: float | None
    champion_version: str | None
    champion: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def version_with_checkpoint(model_name: str, checkpoint_sha256: str) -> Any | None:
    """The oldest version of `model_name` registered from a checkpoint with this sha256 (tag
    ``magicfuse.checkpoint_sha256``, set by `log_pipeline_model`/`log_component_model`), else None.

    A stage that is killed after it registered its model and then rerun (`dvc repro` after an
    interruption) exports the same checkpoint again: the pipeline reuses this version instead of
    registering a duplicate."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except Exception:  # no such registered model yet
        return None
    same = [mv for mv in versions if mv.tags.get("magicfuse.checkpoint_sha256") == checkpoint_sha256]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _run_metric(client: Any, run_id: str | None, metric: str) -> float | None:
    if not run_id:
        return None
    value = client.get_run(run_id).data.metrics.get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def promote_if_better(model_name: str, version: str | int, *, metric: str, higher_is_better: bool = True,
                      alias: str = CHAMPION, metric_run_id: str | None = None) -> PromotionDecision:
    """Move `alias` to `version` only when its evaluation metric beats the current holder's.

    The candidate's metric is read from `metric_run_id` (the evaluation run), else from
    the run that logged the model version; the champion's from the run recorded on its
    version (tag `magicfuse.eval_run_id`) or its source run. The decision and its reason
    are recorded as tags on the candidate version.
    """
    import mlflow

    client = mlflow.MlflowClient()
    version = str(version)
    mv = client.get_model_version(model_name, version)
    cand_run = metric_run_id or mv.tags.get("magicfuse.eval_run_id") or mv.run_id
    if metric_run_id:
        client.set_model_version_tag(model_name, version, "magicfuse.eval_run_id", metric_run_id)
    cand = _run_metric(client, cand_run, metric)
    if cand is None:
        raise TrackingError(f"model {model_name} v{version}: metric {metric!r} not found in run {cand_run}")
    try:
        champ_mv = client.get_model_version_by_alias(model_name, alias)
    except Exception:
        champ_mv = None
    champ_val = None
    champ_version = None
    holder = None if champ_mv is None else str(champ_mv.version)  # MLflow gives int or str versions
    if champ_mv is not None and holder != version:
        champ_version = holder
        champ_val = _run_metric(client, champ_mv.tags.get("magicfuse.eval_run_id") or champ_mv.run_id, metric)
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    if champ_mv is not None and holder == version:
        promoted, reason = True, f"v{version} already holds @{alias}"
    elif champ_mv is None:
        promoted, reason = True, f"no @{alias} yet; v{version} {metric}={cand:.6g} becomes {alias}"
    elif champ_val is None:
        promoted, reason = True, f"@{alias} v{champ_version} has no {metric}; v{version} ({cand:.6g}) replaces it"
    elif better(cand, champ_val):
        promoted, reason = True, (f"v{version} {metric}={cand:.6g} beats @{alias} v{champ_version} "
                                  f"({champ_val:.6g}, {'higher' if higher_is_better else 'lower'} is better)")
    else:
        promoted, reason = False, (f"v{version} {metric}={cand:.6g} does not beat @{alias} v{champ_version} "
                                   f"({champ_val:.6g}); alias unchanged")
    if promoted:
        client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, "magicfuse.promotion", reason)
    return PromotionDecision(model_name, version, promoted, reason, metric, cand, champ_version, champ_val)
