"""The evaluation suite behind the ``evaluate`` DVC stage and Prefect task.

`run_evaluation(cfg, pipeline_checkpoint=..., shards_dir=..., out_dir=...)`:

1. loads the pipeline bundle (`magicfuse.checkpoint.load_pipeline`) and the test
   split of the shards (degraded visible = the sampler's input; clean visible, real
   infrared and labels = references);
2. runs the joint sampler through the project's one runner, `magicfuse.inference.MagicFuse`
   (the checkpoint's `SamplerSettings` unless the config overrides steps / τ / thermal
   classes; per-image seeded noise, see `ablation.sample_set`) → MagImg, IKR image, CKG
   image, segmentation map. The grid images' inputs and MagImgs are also written as PNGs
   (``figures/images/input/<key>.png``, ``figures/images/<key>_magimg.png``):
   ``magicfuse fuse figures/images/input --recursive --seed <evaluate.seed> --batch-size
   <evaluate.batch_size>`` writes the same bytes;
3. **visual table** (Tables 2/4 shape): rows ``degraded input``, ``IKR``, ``CKG``,
   ``MagImg`` and, because the synthetic test split has a real infrared image,
   the classical fusions mean / max / Laplacian pyramid of the CLEAN visible and
   the REAL infrared (marked ``uses_infrared`` / † — references, not competitors:
   MagicFuse never sees the infrared). Metrics: A = real infrared, B = the visible
   reference chosen by ``cfg.reference_visible`` (default ``clean``; METRICS.md
   leaves this open — the choice is written into the report);
4. **semantic table** (Tables 3/5 shape, IoU in %): ``Ours-S`` (the segmentation
   head on the test labels) and the paper's protocol — a SegFormer retrained from
   the same seed on the degraded / IKR-enhanced / MagImg versions of (a subset of)
   the TRAIN split and scored on the matching test images
   (`magicfuse.evaluation.segformer.run_protocol`);
5. **ablations** (`magicfuse.evaluation.ablation.run_ablations`): the τ sweep
   (Fig. 7) and Models I–IV (Tables 6–7) on the first ``cfg.ablation_images``
   test images — the main run is reused for τ = default;
6. **CKG infrared PSNR**: the CKG image's channel mean against the real infrared,
   next to a grey copy of the degraded input against the real infrared;
7. qualitative grids; the report (`magicfuse.evaluation.report.write_report`):
   ``report.md``, ``report.html``, ``metrics.json``, ``tau_curve.csv`` and the
   PNGs under ``figures/`` (what ``dvc.yaml`` declares);
8. ``promotion_score``: a weighted sum of metrics named by dotted paths into
   ``metrics`` (`EvaluateConfig.promotion`), used to move the ``@champion`` alias.

The returned ``metrics`` dict is exactly what ``metrics.json`` holds. Its row
names use only letters, digits, spaces and ``- . :`` so that MLflow accepts the
flattened keys.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from magicfuse.checkpoint import load_pipeline
from magicfuse.config import from_mapping, to_dict
from magicfuse.data.classes import IGNORE_INDEX, MFNET_CLASSES, MFNET_PALETTE, NUM_CLASSES
from magicfuse.data.shards import ShardDataset
from magicfuse.devices import resolve_device
from magicfuse.diffusion.settings import SamplerSettings
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.ablation import (
    ABLATION_VARIANTS,
    OURS_S_MIOU,
    VARIANT_LABELS,
    VARIANT_NOTES,
    SampleRun,
    run_ablations,
    sample_set,
    segmentation_scores,
    visual_means,
)
from magicfuse.evaluation.baselines import BASELINES
from magicfuse.evaluation.metrics import METRIC_NAMES, rgb2gray
from magicfuse.evaluation.objects import mean_box_contrast
from magicfuse.evaluation.report import INFRARED_FLAG, make_grid, write_report
from magicfuse.evaluation.segformer import config_from_mapping, run_protocol
from magicfuse.evaluation.segmentation import colorize, legend_image
from magicfuse.imageio import write_png
from magicfuse.inference import MagicFuse
from magicfuse.io import write_json_atomic, write_text_atomic

__all__ = ["EvaluateConfig", "EvalSet", "load_eval_set", "run_evaluation", "resolve_metric_path",
           "ROW_DEGRADED", "ROW_IKR", "ROW_CKG", "ROW_MAGIMG", "ROW_OURS_S", "BASELINE_ROWS"]

ROW_DEGRADED = "degraded input"
ROW_IKR = "IKR"
ROW_CKG = "CKG"
ROW_MAGIMG = "MagImg"
ROW_OURS_S = "Ours-S"
BASELINE_ROWS = {"mean": "IR-VIS mean", "max": "IR-VIS max", "laplacian_pyramid": "IR-VIS Laplacian pyramid"}
FIGURES = "figures"
# the top-level tables of metrics.json that a promotion path may start with
METRIC_SECTIONS = ("visual", "semantic", "ablation", "tau_curve", "ckg_infrared", "objects", "ikr_by_degradation")

DEFAULT_METRICS = ("EN", "SD", "SF", "AG", "MI", "SSIM", "Qabf", "PSNR", "VIF", "SCD", "CC")
SWEEP_METRICS = ("EN", "SSIM", "MI", "Qabf", "PSNR")
# Unless evaluate.segformer sets them: a from-scratch tiny SegFormer trained 320 steps on 64 synthetic
# images with lr 1e-3 and plain cross-entropy predicts "unlabelled" everywhere (mIoU 10.3 on every
# set, so the protocol cannot rank image sets); lr 3e-3 with the authors' segmentation class weights
# (0.4, 0.8, 1, 2, 4, 1.8, 1.8, 1.5, 1.5; MFNet classes) learns car/curve (mIoU 13.9). Measured on
# the degraded synthetic test set.
SEGFORMER_DEFAULTS: dict[str, Any] = {"lr": 3e-3, "class_weights": (0.4, 0.8, 1.0, 2.0, 4.0, 1.8, 1.8, 1.5, 1.5)}


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml ``evaluate:`` section. Defaults fit the tiny CPU profile (32 test
    images of 96×128, a tiny pipeline, 2 CPU cores).

    * ``split`` / ``max_images``: the evaluated split and how many of its images
      (first ones in shard order; None = all).
    * ``steps`` / ``tau`` / ``thermal_classes``: sampler settings; None = the
      checkpoint's (``payload["sampler"]``).
    * ``taus``: the τ sweep; ``ablations``: sampler variants for Tables 6–7;
      ``ablation_images``: how many of the evaluated images the sweep and the
      ablations use (None = all of them).
    * ``reference_visible``: source B of the visual metrics — ``clean`` (default:
      the undegraded visible frame, what the fused result should resemble) or
      ``degraded`` (the actual input). A is always the real infrared.
    * ``semantic``: run the SegFormer protocol; ``segformer``: its
      `SegformerProtocolConfig` fields (``device`` defaults to this config's; ``lr``
      and, for the 9 MFNet classes, ``class_weights`` default to `SEGFORMER_DEFAULTS`);
      ``segformer_train_split`` / ``segformer_train_images``: its training images.
    * ``captured_inputs``: also run the sampler on the undegraded frames (for real data: the
      images as captured, night frames being real low light) and score them too.
    * ``contrast_classes``: {name: class id} whose box contrast (`evaluation.objects`) is
      reported for every image set, when the shards hold boxes.
    * ``promotion``: {dotted path into the metrics: weight}; ``promotion_score`` is
      the weighted sum (terms of weight 0 are dropped, neither computed nor required). Default: the mIoU (%) of the SegFormer retrained on MagImgs,
      plus 0.01 × the segmentation head's mIoU (%) as a tie-breaker.
    """

    split: str = "test"
    max_images: int | None = 32
    batch_size: int = 8
    seed: int = 0
    steps: int | None = None
    tau: float | None = None
    thermal_classes: tuple[int, ...] | None = None
    taus: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
    ablations: tuple[str, ...] = ABLATION_VARIANTS
    ablation_images: int | None = 8
    reference_visible: Literal["clean", "degraded"] = "clean"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    sweep_metrics: tuple[str, ...] = SWEEP_METRICS
    semantic: bool = True
    segformer: dict[str, Any] = field(default_factory=dict)
    segformer_train_split: str = "train"
    segformer_train_images: int | None = 64
    grid_images: int = 4
    captured_inputs: bool = False  # also sample the clean (as captured) visible frames and score them
    contrast_classes: dict[str, int] = field(default_factory=lambda: {"person": 2, "car": 1})
    promotion: dict[str, float] = field(
        default_factory=lambda: {"semantic.MagImg.mIoU": 1.0, "semantic.Ours-S.mIoU": 0.01})
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        where = "EvaluateConfig"
        for name in ("max_images", "ablation_images", "segformer_train_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{where}.{name} must be >= 1 or null, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"{where}.steps must be >= 1 or null, got {self.steps}")
        for t in ((self.tau,) if self.tau is not None else ()) + tuple(self.taus):
            if not 0.0 <= t <= 1.0:
                raise ConfigError(f"{where}: tau values must lie in [0, 1], got {t}")
        bad = [v for v in self.ablations if v not in ABLATION_VARIANTS]
        if bad:
            raise ConfigError(f"{where}.ablations: unknown variant(s) {bad}; allowed {list(ABLATION_VARIANTS)}")
        for name in ("metrics", "sweep_metrics"):
            unknown = [m for m in getattr(self, name) if m not in METRIC_NAMES]
            if unknown or not getattr(self, name):
                raise ConfigError(f"{where}.{name}: unknown or empty metric list {list(getattr(self, name))}; "
                                  f"known: {list(METRIC_NAMES)}")
        if self.reference_visible not in ("clean", "degraded"):
            raise ConfigError(f"{where}.reference_visible must be 'clean' or 'degraded', got {self.reference_visible!r}")
        if self.grid_images < 0:
            raise ConfigError(f"{where}.grid_images must be >= 0, got {self.grid_images}")
        if not self.promotion or not any(w != 0 for w in self.promotion.values()):
            raise ConfigError(f"{where}.promotion: give at least one {{metric path: non-zero weight}}")
        for path, w in self.promotion.items():
            if not isinstance(path, str) or len(path.split(".")) < 2:
                raise ConfigError(f"{where}.promotion: {path!r} is not a dotted metric path like 'semantic.MagImg.mIoU'")
            if path.split(".")[0] not in METRIC_SECTIONS:
                raise ConfigError(f"{where}.promotion: {path!r} does not start with a section of metrics.json "
                                  f"({', '.join(METRIC_SECTIONS)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
                raise ConfigError(f"{where}.promotion[{path!r}]: weight must be a finite number, got {w!r}")
        if self.segformer:
            config_from_mapping(self.segformer)  # unknown keys / bad values fail now, not after sampling
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"{where}.device: {self.device!r}: {exc}") from None  # CUDA is checked when it runs

    @property
    def promotion_terms(self) -> dict[str, float]:
        """The promotion terms with a non-zero weight (a profile drops a term of params.yaml by
        giving it weight 0: the profile merge cannot delete keys)."""
        return {p: float(w) for p, w in self.promotion.items() if w != 0}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "EvaluateConfig":
        return from_mapping(cls, mapping, "evaluate")


# --------------------------------------------------------------------------- data


@dataclass
class EvalSet:
    """Images of one split, uint8 numpy: ``degraded``/``clean`` (H,W,3), ``infrared`` and
    ``label`` (H,W) (label 255 where unlabelled; infrared None when a sample has none);
    ``boxes`` (the reader's boxes as dicts, None when the source has none) and
    ``degradations`` (the names of the degradations applied to the input) per sample."""

    keys: list[str]
    degraded: list[np.ndarray]
    clean: list[np.ndarray]
    infrared: list[np.ndarray | None]
    label: list[np.ndarray]
    boxes: list[list[dict[str, Any]] | None] = field(default_factory=list)
    degradations: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def has_labels(self) -> bool:
        return any(bool((y != IGNORE_INDEX).any()) for y in self.label)

    def has_infrared(self) -> bool:
        return all(ir is not None for ir in self.infrared)

    def has_boxes(self) -> bool:
        return any(b is not None for b in self.boxes)


def load_eval_set(shards_dir: str | Path | Sequence[str | Path], split: str,
                  max_images: int | None = None) -> EvalSet:
    """The first `max_images` samples of `split` (shard order, folders in the given
    order) with every member decoded to uint8 numpy arrays."""
    dirs = [Path(shards_dir)] if isinstance(shards_dir, (str, Path)) else [Path(d) for d in shards_dir]
    if not dirs:
        raise DataError("evaluation: no shards folder given")
    present = [d for d in dirs if (d / split).is_dir()]
    if not present:
        raise DataError(f"evaluation: split {split!r} not found in any of the shards folders "
                        f"{[str(d) for d in dirs]}")
    out = EvalSet([], [], [], [], [])
    for d in present:
        for s in ShardDataset(d, split, shuffle=False, members=("clean", "degraded", "infrared", "label"),
                              skip_missing=False, with_meta=True):
            out.keys.append(str(s["key"]))
            meta = s["meta"]
            out.boxes.append(meta.get("boxes"))
            out.degradations.append(tuple(str(step.get("name", "?")) if isinstance(step, Mapping) else str(step)
                                          for step in meta.get("recipe") or ()))
            out.degraded.append(s["degraded"])
            out.clean.append(s["clean"])
            out.infrared.append(s.get("infrared"))
            out.label.append(s["label"])
            if max_images is not None and len(out) >= max_images:
                return out
    if len(out) == 0:
        raise DataError(f"evaluation: split {split!r} of {[str(d) for d in present]} holds no samples")
    return out


# --------------------------------------------------------------------------- helpers


def _sampler_settings(cfg: EvaluateConfig, payload: Mapping[str, Any], ckpt: Path) -> SamplerSettings:
    """The checkpoint's sampler settings with the config's overrides (steps, τ, thermal classes)."""
    s = SamplerSettings.from_mapping(payload.get("sampler"), where=f"{ckpt}: sampler settings")
    if s.variant != "full":
        raise ConfigError(f"{ckpt}: the checkpoint's sampler variant is {s.variant!r}; the evaluation suite "
                          "evaluates full pipelines (ablations are derived from them)")
    return s.replace(steps=cfg.steps, tau=cfg.tau, thermal_classes=cfg.thermal_classes)


def _write_images(folder: Path, keys: Sequence[str], inputs: Sequence[np.ndarray],
                  magimgs: Sequence[np.ndarray]) -> None:
    """Inputs as ``input/<key>.png`` and MagImgs as ``<key>_magimg.png`` (the names
    ``magicfuse fuse`` reads and writes, so the CLI reproduces these files)."""
    for key, x, m in zip(keys, inputs, magimgs):
        write_png(folder / "input" / f"{key}.png", x)
        write_png(folder / f"{key}_magimg.png", m)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb2gray(rgb) if rgb.ndim == 3 else rgb


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Plain PSNR of two uint8 images, peak 255 (dB); inf if identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _ssim_to(images: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean SSIM of each image against its reference: Wang et al.'s SSIM for 8-bit images
    (11x11 Gaussian window, C1 = (0.01*255)^2, C2 = (0.03*255)^2; the `l255` convention of
    `evaluation.metrics`; with A = B = the reference it is exactly ssim(image, reference)).
    Not the fusion table's MATLAB convention (docs/METRICS.md), whose near-zero constants score
    any visible/infrared pair at about 0: here a grey copy of an MSRS visible frame scores
    about 0.4 against its infrared (00111D: 0.42), so the number says how infrared-like an
    image is."""
    return visual_means(images, reference, reference, ("SSIM",), conventions={"ssim": "l255"})["SSIM"]


def _contrast_row(name: str, images: Sequence[np.ndarray], boxes: Sequence[Any],
                  classes: Mapping[str, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    for cname, cls in classes.items():
        value, count = mean_box_contrast(images, boxes, cls)
        row[f"{cname} contrast"] = value
        row[f"{cname} boxes"] = count
    return row


def _psnr_by_degradation(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray],
                         clean: Sequence[np.ndarray], kinds: Sequence[tuple[str, ...]]) -> list[dict[str, Any]]:
    """IKR output and degraded input PSNR against the clean frame, per degradation (a
    composite of several counts as "composite") and overall."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(k[0] if len(k) == 1 else ("composite" if k else "none"), []).append(i)
    rows = []
    for name, idx in sorted(groups.items()) + [("all", list(range(len(clean))))]:
        p_in = float(np.mean([_psnr(inputs[i], clean[i]) for i in idx]))
        p_out = float(np.mean([_psnr(outputs[i], clean[i]) for i in idx]))
        rows.append({"name": name, "images": len(idx), "input PSNR": p_in, "IKR PSNR": p_out, "gain": p_out - p_in})
    return rows


def _seg_row(name: str, scores: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    row.update({c: 100.0 * v for c, v in scores["per_class_iou"].items()})
    row["mIoU"] = 100.0 * scores["miou"]
    return row


def _json(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v


def resolve_metric_path(metrics: Mapping[str, Any], path: str) -> float:
    """The number at dotted `path` in `metrics` (row names may contain dots: the
    longest matching key wins at each level). ConfigError names what exists."""
    node: Any = metrics
    rest = path
    while rest:
        if not isinstance(node, Mapping):
            raise ConfigError(f"promotion path {path!r}: {rest!r} goes below a number")
        match = None
        for key in sorted(node, key=lambda k: -len(str(k))):
            k = str(key)
            if rest == k or rest.startswith(k + "."):
                match = key
                break
        if match is None:
            raise ConfigError(f"promotion path {path!r}: no key for {rest!r}; available: {sorted(map(str, node))}")
        node = node[match]
        rest = rest[len(str(match)) + 1:]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"promotion path {path!r} does not name a number (found {type(node).__name__})")
    return float(node)


def _publish_figures(out: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """Move the PNGs write_report wrote (grids/, tau_curve.png) under figures/ — the folder
    dvc.yaml declares — and point report.md's links there (report.html embeds them)."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    md_path = paths.get("markdown")
    md = md_path.read_text() if md_path is not None else ""
    moved: dict[str, Path] = {}
    for key, p in list(paths.items()):
        if not (key.startswith("grid:") or key == "tau_plot"):
            continue
        p = Path(p)
        if p.parent == fig_dir:
            continue
        rel_old = p.relative_to(out).as_posix()
        dst = fig_dir / p.name
        shutil.move(str(p), str(dst))
        md = md.replace(f"]({rel_old})", f"]({FIGURES}/{p.name})")
        moved[key] = dst
    grids_dir = out / "grids"
    if grids_dir.is_dir() and not any(grids_dir.iterdir()):
        grids_dir.rmdir()
    if moved and md_path is not None:
        write_text_atomic(md_path, md)
    return {**paths, **moved}


# --------------------------------------------------------------------------- main


def run_evaluation(cfg: EvaluateConfig | Mapping[str, Any] | None = None, *,
                   pipeline_checkpoint: str | Path,
                   shards_dir: str | Path | Sequence[str | Path],
                   out_dir: str | Path) -> dict[str, Any]:
    """Evaluate a trained pipeline bundle on the shards; write the report into `out_dir`.

    Returns ``{"metrics": <what metrics.json holds>, "paths": {name: str path}}``.
    ``metrics["promotion_score"]`` is the number the model registry compares.
    """
    t_start = time.perf_counter()
    if cfg is None:
        cfg = EvaluateConfig()
    elif isinstance(cfg, Mapping):
        cfg = EvaluateConfig.from_mapping(cfg)
    out = Path(out_dir)
    ckpt = Path(pipeline_checkpoint)
    say = print if cfg.progress else (lambda *a, **k: None)

    modules, payload = load_pipeline(ckpt, map_location="cpu")
    fus_cfg = modules["fusion"].config
    if not (fus_cfg.use_zhat and fus_cfg.seg_head):
        raise ConfigError(f"{ckpt}: the fusion network is an ablation (use_zhat={fus_cfg.use_zhat}, "
                          f"seg_head={fus_cfg.seg_head}); evaluate a full pipeline")
    num_classes = int(fus_cfg.num_classes)
    class_names = MFNET_CLASSES if num_classes == NUM_CLASSES else tuple(str(i) for i in range(num_classes))
    settings = _sampler_settings(cfg, payload, ckpt)
    runner = MagicFuse(modules, settings, device=resolve_device(cfg.device, what="evaluate.device"),
                       source=str(ckpt))
    device = runner.device
    steps, tau, thermal = settings.steps, settings.tau, settings.thermal_classes

    test = load_eval_set(shards_dir, cfg.split, cfg.max_images)
    if not test.has_infrared():
        missing = [k for k, ir in zip(test.keys, test.infrared) if ir is None][:5]
        raise DataError(f"evaluation: split {cfg.split!r} has samples without infrared (e.g. {missing}); "
                        "the visual metrics need the real infrared as source A")
    labelled = test.has_labels()
    do_semantic = cfg.semantic and labelled
    # the promotion paths must be computable before spending minutes on sampling
    promotion = cfg.promotion_terms
    for path in promotion:
        if path.startswith("semantic.") and not labelled:
            raise ConfigError(f"evaluate.promotion uses {path!r} but split {cfg.split!r} has no labels")
        if path.startswith("semantic.") and not path.startswith(f"semantic.{ROW_OURS_S}.") and not cfg.semantic:
            raise ConfigError(f"evaluate.promotion uses {path!r} but evaluate.semantic is false")
    ref_vis = test.clean if cfg.reference_visible == "clean" else test.degraded
    say(f"evaluate: {len(test)} {cfg.split} images, steps={steps}, tau={tau:g}, thermal classes={list(thermal)}, "
        f"device={device}")

    sample_kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, progress=cfg.progress)
    # ---- main run
    main = sample_set(runner, test.degraded, test.keys, tau=tau, variant="full", desc=f"MagicFuse[{cfg.split}]",
                      **sample_kw)
    say(f"evaluate: sampled {len(test)} images in {main.seconds:.1f} s")

    # ---- visual table
    visual_rows: list[dict[str, Any]] = []
    for name, imgs in ((ROW_DEGRADED, test.degraded), (ROW_IKR, main.ikr), (ROW_CKG, main.ckg),
                       (ROW_MAGIMG, main.magimg)):
        visual_rows.append({"name": name, **visual_means(imgs, test.infrared, ref_vis, cfg.metrics)})
    for key, fn in BASELINES.items():
        fused = [fn(c, ir) for c, ir in zip(test.clean, test.infrared)]
        visual_rows.append({"name": BASELINE_ROWS.get(key, f"IR-VIS {key}"), INFRARED_FLAG: True,
                            **visual_means(fused, test.infrared, ref_vis, cfg.metrics)})

    # ---- the sampler on the frames as captured (no synthetic degradation)
    captured = None
    if cfg.captured_inputs:
        captured = sample_set(runner, test.clean, test.keys, tau=tau, variant="full",
                              desc=f"MagicFuse[{cfg.split}, as captured]", **sample_kw)
        say(f"evaluate: sampled {len(test)} captured frames in {captured.seconds:.1f} s")
        for name, imgs in (("IKR (captured input)", captured.ikr), ("CKG (captured input)", captured.ckg),
                           ("MagImg (captured input)", captured.magimg)):
            visual_rows.append({"name": name, **visual_means(imgs, test.infrared, ref_vis, cfg.metrics)})

    # ---- CKG infrared vs a grey copy of the input (PSNR peak 255, SSIM for 8-bit images, see _ssim_to)
    def ckg_scores(run: SampleRun, inputs: Sequence[np.ndarray]) -> dict[str, float]:
        grey = [_gray(d) for d in inputs]
        out = {"psnr_ckg_db": float(np.mean([_psnr(c, ir) for c, ir in zip(run.ckg_ir, test.infrared)])),
               "psnr_grey_input_db": float(np.mean([_psnr(g, ir) for g, ir in zip(grey, test.infrared)])),
               "ssim_ckg": _ssim_to(run.ckg_ir, test.infrared), "ssim_grey_input": _ssim_to(grey, test.infrared)}
        out["gain_db"] = out["psnr_ckg_db"] - out["psnr_grey_input_db"]
        return out

    ckg_ir = ckg_scores(main, test.degraded)
    if captured is not None:
        ckg_ir["captured"] = ckg_scores(captured, test.clean)

    # ---- thermal objects: box contrast of every image set
    object_rows: list[dict[str, Any]] = []
    if test.has_boxes() and cfg.contrast_classes:
        sets = [("visible (clean)", test.clean), (ROW_DEGRADED, test.degraded), ("real infrared", test.infrared),
                (ROW_IKR, main.ikr), (ROW_CKG, main.ckg_ir), (ROW_MAGIMG, main.magimg)]
        if captured is not None:
            sets += [("CKG (captured input)", captured.ckg_ir), ("MagImg (captured input)", captured.magimg)]
        object_rows = [_contrast_row(name, imgs, test.boxes, cfg.contrast_classes) for name, imgs in sets]

    # ---- IKR per degradation kind (PSNR vs the clean frame)
    ikr_rows = _psnr_by_degradation(main.ikr, test.degraded, test.clean, test.degradations) \
        if len(test.degradations) == len(test) else []

    # ---- semantic table
    semantic_rows: list[dict[str, Any]] = []
    semantic_info: dict[str, Any] = {}
    if labelled:
        semantic_rows.append(_seg_row(ROW_OURS_S, segmentation_scores(main.seg, test.label, num_classes,
                                                                        class_names)))
    if do_semantic:
        protocol_rows, semantic_info = _segformer_protocol(cfg, runner, test, main, shards_dir, device,
                                                           sample_kw, tau, num_classes, say)
        semantic_rows = protocol_rows + semantic_rows  # Tables 3/5 order: image sets, then Ours-S
    else:
        semantic_info["skipped"] = ("evaluate.semantic is false" if not cfg.semantic
                                    else f"split {cfg.split!r} has no labels")

    # ---- ablations (τ sweep + Models I-IV) on the first images
    n_abl = len(test) if cfg.ablation_images is None else min(cfg.ablation_images, len(test))
    abl = run_ablations(runner, test.degraded[:n_abl], test.keys[:n_abl], infrared=test.infrared[:n_abl],
                        visible=ref_vis[:n_abl], labels=test.label[:n_abl] if labelled else None,
                        taus=cfg.taus, variants=cfg.ablations, tau=tau, metrics=cfg.sweep_metrics,
                        reuse={("full", tau): main}, **sample_kw)
    if object_rows:  # the MagImg's thermal-object contrast along the τ sweep (eq. 11 should move it)
        for t, row in abl.tau_curve.items():
            for cname, cls in cfg.contrast_classes.items():
                row[f"{cname} contrast"] = mean_box_contrast(abl.runs[("full", t)].magimg, test.boxes[:n_abl], cls)[0]

    # ---- grids
    grids = []
    n_grid = min(cfg.grid_images, len(test))
    if n_grid:
        cols = ["input", "IKR", "CKG", "MagImg", "segmentation", "label", "real IR"]
        rows = [[test.degraded[i], main.ikr[i], main.ckg[i], main.magimg[i], colorize(main.seg[i]),
                 colorize(test.label[i]), test.infrared[i]] for i in range(n_grid)]
        grids.append(("Degraded input, branch outputs, MagImg and segmentation",
                      make_grid(rows, cols, row_labels=test.keys[:n_grid])))
        _write_images(out / FIGURES / "images", test.keys[:n_grid], test.degraded[:n_grid], main.magimg[:n_grid])
        if num_classes <= len(MFNET_PALETTE):
            grids.append(("Class colours", legend_image(class_names, MFNET_PALETTE[:num_classes])))

    # ---- metrics dict (what metrics.json holds)
    def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}

    vis_json = table(visual_rows)
    for r in vis_json.values():
        r[INFRARED_FLAG] = bool(r.get(INFRARED_FLAG, False))
    settings = {
        "checkpoint": str(ckpt), "split": cfg.split, "images": len(test), "steps": steps, "tau": tau,
        "thermal_classes": list(thermal), "seed": cfg.seed, "device": str(device),
        "reference_visible": cfg.reference_visible, "ablation_images": n_abl,
        "captured_inputs": cfg.captured_inputs,
    }
    metrics: dict[str, Any] = {
        "visual": vis_json,
        "semantic": table(semantic_rows),
        "semantic_protocol": semantic_info,
        "ablation": {"models": table(abl.variant_rows)},
        "tau_curve": {f"{t:g}": dict(v) for t, v in abl.tau_curve.items()},
        "ckg_infrared": ckg_ir,
        "objects": table(object_rows),
        "ikr_by_degradation": table(ikr_rows),
        "settings": settings,
    }
    metrics = _json(metrics)
    terms = {p: w * resolve_metric_path(metrics, p) for p, w in promotion.items()}
    score = float(sum(terms.values()))
    metrics["promotion_score"] = score if math.isfinite(score) else None
    metrics["promotion"] = {"formula": " + ".join(f"{w:g} * {p}" for p, w in promotion.items()),
                            "terms": terms}
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)

    # ---- report
    vis_label = "clean visible frame" if cfg.reference_visible == "clean" else "degraded input (the sampler's input)"
    extra = {
        "checkpoint": str(ckpt),
        "images": f"{len(test)} from split {cfg.split!r} (first in shard order); ablations and tau sweep on the "
                  f"first {n_abl}",
        "sampler": f"{steps} DDIM steps, tau = {tau:g}, thermal classes {list(thermal)}, per-image seeded noise "
                   f"(seed {cfg.seed}), device {device}",
        "visual metric sources": f"A = real infrared, B = {vis_label} (evaluate.reference_visible = "
                                 f"{cfg.reference_visible!r}); the degraded-input row is the input itself scored as F",
        "outputs to uint8": "rounded (the authors' code truncates)",
        "CKG infrared vs real infrared (PSNR dB peak 255 / SSIM, Wang's 8-bit constants)":
            f"CKG {ckg_ir['psnr_ckg_db']:.2f} / {ckg_ir['ssim_ckg']:.3f}; grey copy of the degraded input "
            f"{ckg_ir['psnr_grey_input_db']:.2f} / {ckg_ir['ssim_grey_input']:.3f}; gain {ckg_ir['gain_db']:+.2f} dB"
            + ("" if captured is None else
               f"; captured input: CKG {ckg_ir['captured']['psnr_ckg_db']:.2f} / {ckg_ir['captured']['ssim_ckg']:.3f}, "
               f"grey copy {ckg_ir['captured']['psnr_grey_input_db']:.2f} / "
               f"{ckg_ir['captured']['ssim_grey_input']:.3f}"),
        "semantic protocol": (semantic_info.get("summary") or f"skipped: {semantic_info.get('skipped')}"),
        "ablation protocol": "Models I and II are INFERENCE-TIME ablations on the same trained weights "
                             "(Model I: zero zhat inputs to F; Model II: segmentation head output ignored); the "
                             "paper's Table 6 retrains F for them. Models III and IV need no retraining. "
                             f"Ablation rows report the MagImg metrics and {OURS_S_MIOU} (%, n/a without a "
                             "segmentation output).",
        **{f"variant {VARIANT_LABELS[v]}": VARIANT_NOTES[v] for v in ("full",) + tuple(cfg.ablations)},
        "promotion_score": f"{metrics['promotion_score']} = {metrics['promotion']['formula']}",
    }
    paths = write_report(out, visual_table=visual_rows, semantic_table=semantic_rows,
                         ablation_tables={"Models I-IV (Tables 6-7)": abl.variant_rows},
                         tau_curve=abl.tau_curve, grids=grids, extra=extra,
                         tables={"Thermal objects: box contrast (box mean minus ring mean, in grey standard "
                                 "deviations of the image)": object_rows,
                                 "IKR: PSNR (dB) against the clean frame per degradation": ikr_rows})
    paths = _publish_figures(out, paths)
    write_json_atomic(paths["metrics"], metrics)  # the full nested metrics (a superset of the report's)
    say(f"evaluate: report in {out} ({metrics['seconds']:.1f} s), promotion_score = {metrics['promotion_score']}")
    return {"metrics": metrics, "paths": {k: str(v) for k, v in paths.items()} | {"figures": str(out / FIGURES)}}


def _segformer_protocol(cfg: EvaluateConfig, runner: MagicFuse, test: EvalSet, main: SampleRun,
                        shards_dir: Any, device: torch.device, sample_kw: dict[str, Any], tau: float,
                        num_classes: int, say: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SegFormer retrained on degraded / IKR / MagImg train images, scored on the matching test images."""
    seg_map = dict(cfg.segformer)
    seg_map.setdefault("device", str(device))
    seg_map.setdefault("num_classes", num_classes)
    for k, v in SEGFORMER_DEFAULTS.items():
        if k != "class_weights" or seg_map["num_classes"] == NUM_CLASSES:
            seg_map.setdefault(k, v)
    seg_cfg = config_from_mapping(seg_map)
    train = load_eval_set(shards_dir, cfg.segformer_train_split, cfg.segformer_train_images)
    if not train.has_labels():
        raise DataError(f"evaluation: split {cfg.segformer_train_split!r} (SegFormer training) has no labels; "
                        "set evaluate.semantic: false or point segformer_train_split at a labelled split")
    sizes = {im.shape[:2] for im in train.degraded + test.degraded}
    if len(sizes) > 1:
        raise DataError(f"evaluation: the SegFormer protocol needs one image size; found {sorted(sizes)} "
                        "(evaluate a single-size data set or set evaluate.semantic: false)")
    say(f"evaluate: sampling {len(train)} {cfg.segformer_train_split} images for the SegFormer protocol")
    tr = sample_set(runner, train.degraded, train.keys, tau=tau, variant="full",
                    desc=f"MagicFuse[{cfg.segformer_train_split}]", **sample_kw)

    def tens(imgs: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # uint8 (N,3,H,W)

    ytr = torch.from_numpy(np.stack(train.label)).long()
    yte = torch.from_numpy(np.stack(test.label)).long()
    sets = {
        ROW_DEGRADED: (tens(train.degraded), ytr, tens(test.degraded), yte),
        ROW_IKR: (tens(tr.ikr), ytr, tens(main.ikr), yte),
        ROW_MAGIMG: (tens(tr.magimg), ytr, tens(main.magimg), yte),
    }
    results = run_protocol(sets, seg_cfg, progress=cfg.progress)
    rows = [r.to_row(name) for name, r in results.items()]
    info = {
        "train_split": cfg.segformer_train_split, "train_images": len(train), "test_images": len(test),
        "segformer": to_dict(seg_cfg),
        "runs": {name: {k: v for k, v in r.to_dict().items() if k != "per_class_iou"} for name, r in results.items()},
        "summary": (f"SegFormer-{seg_cfg.variant} trained from scratch (seed {seg_cfg.seed}) on {len(train)} "
                    f"{cfg.segformer_train_split!r} images of each set, scored on the {len(test)} matching test "
                    f"images; {ROW_OURS_S} = the MagicFuse segmentation head on the test labels"),
    }
    return rows, info
