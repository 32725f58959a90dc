"""The ``evaluate:`` section (`EvaluateConfig`) and the report's fixed row names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

from magicfuse.config import from_mapping
from magicfuse.diffusion.settings import check_init_noise_scale
from magicfuse.errors import ConfigError
from magicfuse.evaluation.ablation import ABLATION_VARIANTS
from magicfuse.evaluation.metrics import METRIC_NAMES
from magicfuse.evaluation.segformer import config_from_mapping

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
    * ``steps`` / ``tau`` / ``thermal_classes`` / ``init_noise_scale``: sampler settings;
      None = the checkpoint's (``payload["sampler"]``).
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
    init_noise_scale: float | None = None
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
        if self.init_noise_scale is not None:
            check_init_noise_scale(self.init_noise_scale, f"{where}.init_noise_scale")
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
