"""The pipeline steps: the ONE implementation behind the DVC stages (`stages/`) and
the Prefect tasks (`flows/`).

Each function takes the parameters dict (`magicfuse.config.load_params()`), builds
its typed configs, calls the library, writes its outputs under `artifacts/` and its
DVC metrics/plots under `reports/<stage>/`, and records everything in an MLflow
stage run nested under the current pipeline run.

    synthesize -> shards -> train_ae -> train_ikr, train_ckg -> train_mkf -> evaluate
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from magicfuse import tracking
from magicfuse.config import ConfigError, check_sections, from_mapping, section, to_dict
from magicfuse.config import load_params as read_params
from magicfuse.data.readers import READERS, open_reader, reader_options_error
from magicfuse.data.shards import ShardConfig, write_shards
from magicfuse.data.degrade import DegradationConfig
from magicfuse.data.synthetic import write_synthetic_dataset
from magicfuse.devices import resolve_device
from magicfuse.errors import MagicFuseError
from magicfuse.evaluation.pipeline import EvaluateConfig, run_evaluation
from magicfuse.io import sha256_file, write_json_atomic, write_text_atomic
from magicfuse.training import distributed as ddp
from magicfuse.training.ae import AETrainConfig, train_autoencoder
from magicfuse.training.ldm import LDMTrainConfig
from magicfuse.training.ldm import train_ldm as train_denoiser
from magicfuse.training.mkf import MKFTrainConfig
from magicfuse.training.mkf import train_mkf as train_fusion
from magicfuse.training.resume import mark_complete, prepare_out_dir

__all__ = [
    "ARTIFACTS", "REPORTS", "STAGES", "load_params", "validate_params", "synthesize", "shards", "train_ae", "train_ldm",
    "train_mkf", "evaluate", "run_stage", "run_stage_distributed", "stage_name", "stage_outputs", "stage_upstream",
    "TRAINING_DIRS",
]

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
STAGES = ("synthesize", "shards", "train_ae", "train_ikr", "train_ckg", "train_mkf", "evaluate")


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SynthesizeConfig:
    seed: int = 0
    height: int = 96
    width: int = 128
    splits: dict[str, int] | None = None  # split name -> number of scenes
    out_dir: str = "artifacts/scenes"


@dataclass(frozen=True)
class SourceConfig:
    """One entry of `shards.sources`: a data set in its published layout."""

    kind: str  # mfnet | msrs | fmb | llvip | roadscene | pairs
    root: str
    splits: tuple[str, ...] = ("train", "test")
    options: dict[str, Any] | None = None  # reader options (e.g. boxes_dir, on_missing)
    split_options: dict[str, Any] | None = None  # {split: reader options} merged over `options`

    def reader_options(self, split: str) -> dict[str, Any]:
        extra = (self.split_options or {}).get(split) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"split_options.{split} must be a mapping of reader options, got {extra!r}")
        unknown = sorted(set(self.split_options or {}) - set(self.splits))
        if unknown:
            raise ConfigError(f"split_options names split(s) {unknown} that are not in splits {list(self.splits)}")
        return {**(self.options or {}), **extra}


@dataclass(frozen=True)
class ShardsStageConfig:
    sources: dict[str, Any]  # name -> SourceConfig mapping; null disables a source (profiles)
    samples_per_shard: int = 256
    seed: int = 0
    max_samples: int | None = None
    degradation: dict[str, Any] | None = None
    out_dir: str = "artifacts/shards"


def active_sources(params: Mapping[str, Any]) -> list[str]:
    """The names of the enabled `shards.sources` (a profile disables one by setting it to null)."""
    cfg = section(params, "shards", ShardsStageConfig)
    names = [name for name, src in cfg.sources.items() if src is not None]
    if not names:
        raise ConfigError("params.yaml:shards.sources must enable at least one data source")
    return names


def shard_dirs(params: Mapping[str, Any]) -> list[Path]:
    """The shard folders of every enabled source (what training reads)."""
    cfg = section(params, "shards", ShardsStageConfig)
    return [Path(cfg.out_dir) / name for name in active_sources(params)]


def validate_params(params: Mapping[str, Any], where: str = "params.yaml") -> None:
    """Check a whole (merged) parameters dict before any stage runs: its sections, every
    section's typed config, every shard source with its reader options and degradation
    settings, and the top-level device. Raises ConfigError naming the key at fault."""
    check_sections(params, where)
    resolve_device(str(params.get("device", "auto")), what=f"{where}:device")
    from_mapping(SynthesizeConfig, params.get("synthesize") or {}, where=f"{where}:synthesize")
    shards_cfg = from_mapping(ShardsStageConfig, params.get("shards") or {"sources": {}}, where=f"{where}:shards")
    if shards_cfg.degradation is not None:
        from_mapping(DegradationConfig, shards_cfg.degradation, where=f"{where}:shards.degradation")
    for name, raw in shards_cfg.sources.items():
        if raw is None:
            continue
        at = f"{where}:shards.sources.{name}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{at}: expected a mapping (kind, root, splits, options), got {raw!r}")
        src = from_mapping(SourceConfig, raw, where=at)
        if src.kind not in READERS:
            raise ConfigError(f"{at}.kind: unknown reader kind {src.kind!r}; known: {sorted(READERS)}")
        for split in src.splits:
            try:
                problem = reader_options_error(src.kind, src.reader_options(split))
            except ConfigError as exc:
                raise ConfigError(f"{at}: {exc}") from None
            if problem:
                raise ConfigError(f"{at} (split {split!r}): {problem}")
    for name, cls in (("train_ae", AETrainConfig), ("train_ikr", LDMTrainConfig), ("train_ckg", LDMTrainConfig),
                      ("train_mkf", MKFTrainConfig), ("evaluate", EvaluateConfig), ("tracking", TrackingConfig)):
        if name in params:
            from_mapping(cls, params[name] or {}, where=f"{where}:{name}")


def load_params(path: str | Path = "params.yaml", *, profile: str | None = None,
                resolved: bool = False) -> dict[str, Any]:
    """`magicfuse.config.load_params` (params.yaml with its profile merged in, unless
    `resolved`), validated whole by `validate_params`: a typo anywhere fails before the first
    stage starts."""
    params = read_params(path, profile=profile, resolved=resolved)
    validate_params(params, str(path) + (f" (profile {params.get('profile')})" if params.get("profile", "tiny")
                                         != "tiny" else ""))
    return params


def _stage_reports(stage: str) -> Path:
    path = REPORTS / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish_training_outputs(stage: str, out_dir: Path) -> None:
    """Copy the trainer's metrics/loss files to reports/<stage>/ (DVC metrics and plots
    cannot live inside a DVC output folder)."""
    dst = _stage_reports(stage)
    for name in ("metrics.json", "loss.csv", "loss.png"):
        src = out_dir / name
        if src.exists():
            shutil.copyfile(src, dst / name)


def _device(params: Mapping[str, Any], cfg_device: str) -> str:
    return cfg_device if cfg_device != "auto" else str(params.get("device", "auto"))


# ----------------------------------------------------------------------------- stages


def synthesize(params: Mapping[str, Any]) -> dict[str, Any]:
    """Generate the built-in synthetic scenes (MSRS layout) under artifacts/scenes."""

    cfg = section(params, "synthesize", SynthesizeConfig)
    splits = cfg.splits or {"train": 192, "val": 16, "test": 32}
    with _stage_run(params, "synthesize", {"synthesize": to_dict(cfg)}):
        t0 = time.perf_counter()
        out = write_synthetic_dataset(cfg.out_dir, seed=cfg.seed, splits=splits, height=cfg.height,
                                      width=cfg.width, progress=True)
        seconds = time.perf_counter() - t0
        n = sum(len(v) for v in out["keys"].values()) if isinstance(out.get("keys"), dict) else sum(splits.values())
        tracking.log_metrics({"scenes": n, "seconds": seconds, "scenes_per_s": n / max(seconds, 1e-9)})
    return {"out_dir": cfg.out_dir, "scenes": n, "seconds": seconds}


def shards(params: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Degrade and pack one source (or all) into WebDataset shards + parquet manifest."""

    cfg = section(params, "shards", ShardsStageConfig)
    names = [source] if source else active_sources(params)
    summary: dict[str, Any] = {}
    for name in names:
        if name not in cfg.sources:
            raise ConfigError(f"params.yaml:shards.sources has no source {name!r}; have {sorted(cfg.sources)}")
        if cfg.sources[name] is None:
            raise ConfigError(
                f"shards.sources.{name} is disabled (null) by profile {params.get('profile')!r}; DVC's "
                f"`shards@` stages iterate over params.yaml's own sources, so run this profile with "
                f"`python -m flows.pipeline --profile {params.get('profile')}` (README, 'Profiles')")
        src = from_mapping(SourceConfig, cfg.sources[name], where=f"params.yaml:shards.sources.{name}")
        if not Path(src.root).exists():
            raise ConfigError(f"params.yaml:shards.sources.{name}.root: {src.root} does not exist "
                              f"(see docs/DATASETS.md for the expected layout)")
        shard_cfg = ShardConfig(samples_per_shard=cfg.samples_per_shard, seed=cfg.seed, max_samples=cfg.max_samples)
        out_dir = Path(cfg.out_dir) / name
        with _stage_run(params, f"shards@{name}", {"shards": to_dict(cfg), "source": to_dict(src)}):
            per_split = {}
            for split in src.splits:
                reader = open_reader(src.kind, src.root, split, **src.reader_options(split))
                res = write_shards(reader, out_dir, split=split, source_name=name, cfg=shard_cfg,
                                   degradation_cfg=cfg.degradation, progress=True)
                per_split[split] = {"samples": res.num_samples, "shards": len(res.shards),
                                    "seconds": round(res.seconds, 3)}
                tracking.log_metrics({f"{split}.samples": res.num_samples, f"{split}.seconds": res.seconds})
            summary[name] = per_split
    return summary


def train_ae(params: Mapping[str, Any]) -> dict[str, Any]:
    """Train the autoencoder (artifacts/ae) and register it."""
    cfg = section(params, "train_ae", AETrainConfig)
    cfg = _with_device(cfg, params)
    out_dir = ARTIFACTS / "ae"
    return _training_stage(
        params, "train_ae", cfg, out_dir,
        lambda: train_autoencoder(cfg, _one_shards_dir(params), out_dir, logger=tracking.MetricLogger("train/")),
        register=lambda res: _register_component(params, "ae", res.checkpoint))


def train_ldm(params: Mapping[str, Any], branch: str) -> dict[str, Any]:
    """Train the IKR or CKG denoiser (`branch`) on the autoencoder's latents and register it."""
    stage = f"train_{branch}"
    cfg = _with_device(section(params, stage, LDMTrainConfig), params)
    out_dir = ARTIFACTS / branch
    ae_ckpt = ARTIFACTS / "ae" / "ae.pt"
    return _training_stage(
        params, stage, cfg, out_dir,
        lambda: train_denoiser(cfg, branch=branch, ae_checkpoint=ae_ckpt, shards_dir=_one_shards_dir(params),
                               out_dir=out_dir, logger=tracking.MetricLogger("train/")),
        register=lambda res: _register_component(params, branch, res.checkpoint, ae_checkpoint=ae_ckpt))


def train_mkf(params: Mapping[str, Any]) -> dict[str, Any]:
    """Train the fusion network and head (Algorithm 1) and bundle the pipeline (artifacts/mkf)."""
    cfg = _with_device(section(params, "train_mkf", MKFTrainConfig), params)
    out_dir = ARTIFACTS / "mkf"
    return _training_stage(
        params, "train_mkf", cfg, out_dir,
        lambda: train_fusion(cfg, ae_checkpoint=ARTIFACTS / "ae" / "ae.pt", ikr_checkpoint=ARTIFACTS / "ikr" / "ikr.pt",
                             ckg_checkpoint=ARTIFACTS / "ckg" / "ckg.pt", shards_dir=_one_shards_dir(params),
                             out_dir=out_dir, logger=tracking.MetricLogger("train/")))


def evaluate(params: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the trained pipeline, write the report, register and promote the model."""

    cfg = _with_device(section(params, "evaluate", EvaluateConfig), params)
    reports = _stage_reports("evaluate")
    out_dir = reports / "report"  # the whole report (markdown, html, csv, figures)
    pipeline_ckpt = ARTIFACTS / "mkf" / "pipeline.pt"
    with _stage_run(params, "evaluate", {"evaluate": to_dict(cfg)}) as run:
        result = run_evaluation(cfg, pipeline_checkpoint=pipeline_ckpt, shards_dir=_one_shards_dir(params),
                                out_dir=out_dir)
        # DVC metrics and plots sit beside the report folder (they may not live inside an output);
        # the DVC metrics file is the headline summary, the full tables stay in report/metrics.json.
        write_json_atomic(reports / "metrics.json", headline_metrics(result["metrics"]))
        if (out_dir / "tau_curve.csv").exists():
            shutil.copyfile(out_dir / "tau_curve.csv", reports / "tau_curve.csv")
        tracking.log_metrics(result["metrics"], prefix="eval.")
        tracking.log_artifacts([out_dir], artifact_path="report")
        decision = _register_pipeline(params, pipeline_ckpt, eval_run_id=run.info.run_id)
    if decision is not None:
        result["promotion"] = decision
    return result


HEADLINE_VISUAL = ("EN", "SSIM", "MI", "Qabf", "PSNR")  # the metrics of the paper's Tables 2 and 4


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's headline numbers for `dvc metrics show`: promotion score, CKG
    infrared check, the paper's visual metrics per row and mIoU per image set."""
    visual = {row: {k: vals[k] for k in HEADLINE_VISUAL if k in vals}
              for row, vals in metrics.get("visual", {}).items()}
    miou = {row: vals["mIoU"] for row, vals in metrics.get("semantic", {}).items() if "mIoU" in vals}
    return {"promotion_score": metrics.get("promotion_score"), "ckg_infrared": metrics.get("ckg_infrared", {}),
            "visual": visual, "mIoU": miou}


def run_stage(name: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run one named stage (`train_ikr`/`train_ckg` map onto train_ldm)."""
    params = params if params is not None else load_params()
    if name == "synthesize":
        return synthesize(params)
    if name == "shards":
        return shards(params, kwargs.get("source"))
    if name == "train_ae":
        return train_ae(params)
    if name in ("train_ikr", "train_ckg"):
        return train_ldm(params, name.split("_", 1)[1])
    if name == "train_mkf":
        return train_mkf(params)
    if name == "evaluate":
        return evaluate(params)
    raise ConfigError(f"unknown stage {name!r}; stages are {STAGES}")


# ----------------------------------------------------------------------------- what each stage hands on
# On a cluster (flows/cluster.py) every stage runs on some worker and hands its outputs to
# the next stages through MLflow (magicfuse.tracking.handoff): these say which.

TRAINING_DIRS = {"train_ae": "ae", "train_ikr": "ikr", "train_ckg": "ckg", "train_mkf": "mkf"}


def stage_name(stage: str, source: str | None = None) -> str:
    """The name of a stage's MLflow run: `shards@<source>` for a shard stage, else `stage`."""
    if stage == "shards":
        if not source:
            raise ConfigError("the shards stage runs one source at a time here; name it (source=...)")
        return f"shards@{source}"
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {STAGES}")
    return stage


def stage_outputs(params: Mapping[str, Any], stage: str, source: str | None = None) -> list[Path]:
    """The files and folders later stages read from `stage` (relative to the working directory)."""
    if stage == "synthesize":
        return [Path(section(params, "synthesize", SynthesizeConfig).out_dir)]
    if stage == "shards":
        return [Path(section(params, "shards", ShardsStageConfig).out_dir) / stage_name(stage, source)[7:]]
    if stage == "train_mkf":
        return [ARTIFACTS / "mkf" / "pipeline.pt"]
    if stage in TRAINING_DIRS:
        part = TRAINING_DIRS[stage]
        return [ARTIFACTS / part / f"{part}.pt"]
    if stage == "evaluate":
        return []  # its report and the registered model are logged by the stage itself
    raise ConfigError(f"unknown stage {stage!r}; stages are {STAGES}")


def stage_upstream(params: Mapping[str, Any], stage: str, source: str | None = None) -> list[str]:
    """The stage runs (names as `stage_name`) whose outputs `stage` reads."""
    shards_runs = [f"shards@{name}" for name in active_sources(params)]
    if stage == "synthesize":
        return []
    if stage == "shards":
        cfg = section(params, "shards", ShardsStageConfig)
        root = Path(from_mapping(SourceConfig, cfg.sources[source], where=f"shards.sources.{source}").root)
        scenes = Path(section(params, "synthesize", SynthesizeConfig).out_dir)
        return ["synthesize"] if root.resolve() == scenes.resolve() or scenes.resolve() in root.resolve().parents else []
    if stage == "train_ae":
        return shards_runs
    if stage in ("train_ikr", "train_ckg"):
        return [*shards_runs, "train_ae"]
    if stage == "train_mkf":
        return [*shards_runs, "train_ae", "train_ikr", "train_ckg"]
    if stage == "evaluate":
        return [*shards_runs, "train_mkf"]
    raise ConfigError(f"unknown stage {stage!r}; stages are {STAGES}")


DISTRIBUTED_STAGES = ("train_ae", "train_ikr", "train_ckg", "train_mkf")


def run_stage_distributed(name: str, params: Mapping[str, Any], nproc_per_node: int, *,
                          timeout_s: float | None = None) -> dict[str, Any]:
    """Run one training stage as `nproc_per_node` DDP processes on this machine:
    ``python -m torch.distributed.run --standalone --nproc_per_node N -m magicfuse.stage NAME``
    (one process per GPU; gloo on CPU), with `params` (already merged and validated) in a
    temporary file. Output streams through; returns rank 0's summary. A failed stage raises a
    `MagicFuseError` with the stage's own error message."""
    if name not in DISTRIBUTED_STAGES:
        raise ConfigError(f"run_stage_distributed: {name!r} is not a training stage; expected one of {DISTRIBUTED_STAGES}")
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ConfigError(f"nproc_per_node must be an integer >= 1, got {nproc_per_node!r}")
    validate_params(params, f"{name} parameters")
    with tempfile.TemporaryDirectory(prefix=f"magicfuse-{name}-") as tmp:
        params_file, summary_file = Path(tmp) / "params.yaml", Path(tmp) / "summary.json"
        write_text_atomic(params_file, yaml.safe_dump(dict(params), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc_per_node), "-m", "magicfuse.stage", name, "--params", str(params_file), "--resolved",
               "--summary", str(summary_file)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
        errors: list[str] = []
        tail: list[str] = []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            if proc.poll() is None:
                timed_out.set()
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout_s, kill) if timeout_s is not None else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # stream: progress and logs stay visible
                print(line, end="", flush=True)
                tail = (tail + [line.rstrip()])[-20:]
                if f"stage {name}: error:" in line:
                    errors.append(line.split(f"stage {name}: error:", 1)[1].strip())
            rc = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.poll() is None:  # interrupted: take every rank down with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if timed_out.is_set():
            raise MagicFuseError(f"stage {name} under torchrun ran past its {timeout_s:.0f} s limit and was stopped")
        if rc != 0:
            why = errors[0] if errors else "\n".join(tail[-5:])
            raise MagicFuseError(f"stage {name} failed under torchrun ({nproc_per_node} processes, exit {rc}): {why}")
        if not summary_file.is_file():
            raise MagicFuseError(f"stage {name} under torchrun ended without rank 0's summary ({summary_file})")
        return json.loads(summary_file.read_text())


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "magicfuse"
    register: bool = True  # register the AE, IKR, CKG and the full pipeline in the MLflow registry
    model_name: str = "magicfuse"  # registered name of the pipeline; components get -ae/-ikr/-ckg
    promote_metric: str = "eval.promotion_score"  # metric of the evaluate run deciding @champion
    higher_is_better: bool = True
    alias: str = "champion"


def _tracking_cfg(params: Mapping[str, Any]) -> TrackingConfig:
    return from_mapping(TrackingConfig, params.get("tracking", {}), where="params.yaml:tracking")


def _stage_run(params: Mapping[str, Any], stage: str, stage_params: Mapping[str, Any]):
    """The MLflow run of one stage, in the experiment named by params.yaml:tracking."""

    logged = {**stage_params, "profile": params.get("profile", "tiny")}
    return tracking.stage_run(stage, params=logged, experiment=_tracking_cfg(params).experiment)


def _register_component(params: Mapping[str, Any], kind: str, checkpoint: Path,
                        ae_checkpoint: Path | None = None) -> None:

    cfg = _tracking_cfg(params)
    if cfg.register and _already_registered(f"{cfg.model_name}-{kind}", checkpoint) is None:
        tracking.log_component_model(kind, checkpoint, ae_checkpoint=ae_checkpoint,
                                     registered_name=f"{cfg.model_name}-{kind}")


def _register_pipeline(params: Mapping[str, Any], checkpoint: Path, *, eval_run_id: str) -> dict[str, Any] | None:
    """Register the pipeline model from the evaluate run and move @champion if it beats the holder."""

    cfg = _tracking_cfg(params)
    if not cfg.register:
        return None
    version = _already_registered(cfg.model_name, checkpoint)
    if version is None:
        version = tracking.log_pipeline_model(checkpoint, registered_name=cfg.model_name)
    decision = tracking.promote_if_better(cfg.model_name, version.version, metric=cfg.promote_metric,
                                          higher_is_better=cfg.higher_is_better, alias=cfg.alias,
                                          metric_run_id=eval_run_id)
    print(f"registry: {decision.reason}")
    return decision.as_dict()


def _already_registered(name: str, checkpoint: Path) -> Any | None:
    """The version of `name` already registered from these checkpoint bytes (a stage killed after
    registering and rerun exports the same checkpoint): reused, not registered twice."""
    version = tracking.version_with_checkpoint(name, sha256_file(checkpoint))
    if version is not None:
        print(f"registry: {name} v{version.version} already holds {checkpoint} (same sha256); not registered again")
    return version


# The files each training stage reads besides its shards: a stage killed with these inputs
# resumes from its last.pt; with other inputs it starts over (magicfuse.training.resume).
_UPSTREAM = {"train_ae": (), "train_ikr": ("ae/ae.pt",), "train_ckg": ("ae/ae.pt",),
             "train_mkf": ("ae/ae.pt", "ikr/ikr.pt", "ckg/ckg.pt")}


def _prepare_out_dir(params: Mapping[str, Any], stage: str, cfg: Any, out_dir: Path) -> str:
    """Keep `out_dir` when it holds an interrupted run of this stage with the same configuration
    and inputs (the trainer resumes from its last.pt), else empty it. DVC keeps the folder between
    runs (`persist: true` in dvc.yaml)."""
    inputs = [ARTIFACTS / rel for rel in _UPSTREAM[stage]]
    inputs += [d / "manifest.parquet" for d in shard_dirs(params)]
    return prepare_out_dir(out_dir, stage, to_dict(cfg), inputs)


def _one_shards_dir(params: Mapping[str, Any]) -> Path | list[Path]:
    dirs = shard_dirs(params)
    return dirs[0] if len(dirs) == 1 else dirs


def _with_device(cfg: Any, params: Mapping[str, Any]) -> Any:
    import dataclasses

    dev = _device(params, getattr(cfg, "device", "auto"))
    return dataclasses.replace(cfg, device=dev) if dev != getattr(cfg, "device", dev) else cfg


def _training_stage(params: Mapping[str, Any], stage: str, cfg: Any, out_dir: Path, train: Callable[[], Any], *,
                    register: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run `train()` inside the stage's MLflow run, publish its outputs and register the model.
    Under torchrun only rank 0 does the MLflow and publishing part; the other ranks only train
    (else every rank opened a stage run and registered its own model version)."""
    if ddp.launched_rank() != 0:  # rank 0 prepares out_dir before the ranks meet in init_distributed
        return _result_summary(train())
    _prepare_out_dir(params, stage, cfg, out_dir)
    with _stage_run(params, stage, {stage: to_dict(cfg)}):
        res = train()
        _finish_training(stage, out_dir, res)
        if register is not None:
            register(res)
    mark_complete(out_dir)
    return _result_summary(res)


def _finish_training(stage: str, out_dir: Path, res: Any) -> None:

    _publish_training_outputs(stage, out_dir)
    tracking.log_metrics(res.final_metrics, prefix="final.")
    tracking.log_metrics({"seconds": res.seconds, "images_per_s": res.images_per_s})
    tracking.log_artifacts([p for p in (out_dir / "loss.csv", out_dir / "loss.png", out_dir / "history.json")
                            if p.exists()], artifact_path="training")
    previews = out_dir / "previews"
    if previews.is_dir():
        tracking.log_artifacts([previews], artifact_path="previews")


def _result_summary(res: Any) -> dict[str, Any]:
    return {"checkpoint": str(res.checkpoint), "metrics": dict(res.final_metrics),
            "seconds": round(res.seconds, 2), "images_per_s": round(res.images_per_s, 2)}
