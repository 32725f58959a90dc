"""The paper's semantic protocol: retrain SegFormer on each image set, report IoU.

MagicFuse (Tables 3 and 5) judges how much semantic information an image set
carries by training the same segmentation network from the same starting point on
each set — degraded visible, IKR-enhanced, MagImgs, or any other method's output —
and scoring it on that set's test images with per-class IoU and mIoU.

Here the network is HuggingFace transformers' ``SegformerForSemanticSegmentation``
built from a ``SegformerConfig`` with **random initialisation** (nothing is
downloaded). Variants:

* ``tiny``: a 4-stage MiT with one layer per stage, widths 16/32/64/128, decoder
  width 64 (0.46 M parameters). For the CPU default pipeline: 64 images of 96×128,
  batch 8, 40 epochs (320 steps) take about 15 s on 2 cores.
* ``b0`` / ``b1``: the MiT-B0 / MiT-B1 sizes of the SegFormer paper (3.7 M / 13.7 M
  parameters), for GPUs. Still trained from scratch: ImageNet-pretrained weights
  would need a hub download.

Because every set starts from the same seed (same initial weights, same batch
order, same crops and flips), differences between rows come from the images only.
Results are deterministic on CPU for a given seed; on CUDA some kernels
(bilinear upsampling backward) use atomics and differ in the last bits.

Training: AdamW, polynomial (power 1) learning-rate decay, cross-entropy with
ignore index 255 (optionally class-weighted), random crops (``crop``) and
horizontal flips. SegFormer's logits come at 1/4 resolution; they are upsampled
bilinearly to the label size for the loss and for evaluation. Evaluation runs on
full test frames (no crop, no resize).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from magicfuse.data.classes import IGNORE_INDEX, MFNET_CLASSES, NUM_CLASSES
from magicfuse.devices import resolve_device
from magicfuse.errors import ConfigError, DataError, TrainingError
from magicfuse.evaluation.segmentation import ConfusionMatrix
from magicfuse.config import from_mapping

__all__ = [
    "SegformerProtocolConfig",
    "SegResult",
    "VARIANTS",
    "build_segformer",
    "train_and_evaluate_segformer",
    "run_protocol",
    "config_from_mapping",
    "to_tensors",
]

# MiT encoder sizes (SegFormer paper, Table 6 / the nvidia/mit-b* configs) plus a CPU one.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 1, 2, 4],
                 sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=64),
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], num_attention_heads=[1, 2, 5, 8],
               sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256),
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
               sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256),
}

# ImageNet statistics, the normalisation SegFormer's image processor applies.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegformerProtocolConfig:
    """Settings of one SegFormer retraining run (the same for every image set)."""

    variant: Literal["tiny", "b0", "b1"] = "tiny"
    num_classes: int = NUM_CLASSES
    epochs: int = 40
    max_steps: int = 0                 # > 0: stop after this many optimiser steps
    batch_size: int = 8
    lr: float = 1e-3                   # AdamW peak learning rate (from scratch, so higher than fine-tuning's 6e-5)
    weight_decay: float = 0.01
    poly_power: float = 1.0            # lr = lr0 * (1 - step/total) ** poly_power
    crop: tuple[int, int] | None = None  # (h, w) random training crop; None = whole images
    hflip: bool = True
    class_weights: tuple[float, ...] | None = None
    drop_path_rate: float = 0.1
    eval_batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0               # > 0: torch.set_num_threads for the run (CPU)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"SegformerProtocolConfig.variant: {self.variant!r} is not one of {sorted(VARIANTS)}")
        for name in ("num_classes", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SegformerProtocolConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError("SegformerProtocolConfig: epochs or max_steps must be >= 1")
        if self.epochs < 0 or self.max_steps < 0:
            raise ConfigError("SegformerProtocolConfig: epochs and max_steps must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"SegformerProtocolConfig.lr must be > 0, got {self.lr}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 4):
            raise ConfigError(f"SegformerProtocolConfig.crop must be (h, w) with sides >= 4, got {self.crop}")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ConfigError(f"SegformerProtocolConfig.class_weights has {len(self.class_weights)} "
                              f"entries for {self.num_classes} classes")


@dataclass
class SegResult:
    """Scores of one retraining run. IoU values are fractions in [0, 1]."""

    per_class_iou: dict[str, float]
    miou: float
    pixel_acc: float
    confusion: np.ndarray | None = None
    train_steps: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0

    def to_row(self, name: str, *, percent: bool = True) -> dict[str, Any]:
        """A report row ``{"name", <class>: IoU, ..., "mIoU"}`` (in % like the paper's tables)."""
        k = 100.0 if percent else 1.0
        row: dict[str, Any] = {"name": name}
        row.update({c: v * k for c, v in self.per_class_iou.items()})
        row["mIoU"] = self.miou * k
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_class_iou": dict(self.per_class_iou), "miou": self.miou, "pixel_acc": self.pixel_acc,
            "train_steps": self.train_steps, "final_loss": self.final_loss, "seconds": self.seconds,
        }


def build_segformer(cfg: SegformerProtocolConfig):
    """A randomly initialised ``SegformerForSemanticSegmentation`` for `cfg` (seeded by the caller)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    hf_cfg = SegformerConfig(
        num_labels=cfg.num_classes,
        semantic_loss_ignore_index=IGNORE_INDEX,
        drop_path_rate=cfg.drop_path_rate,
        **VARIANTS[cfg.variant],
    )
    return SegformerForSemanticSegmentation(hf_cfg)


# ---------------------------------------------------------------------------------------
def _check_set(images: torch.Tensor, labels: torch.Tensor, what: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError(f"{what}: images and labels must be torch tensors, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{what}: images must be (N,3,H,W), got {tuple(images.shape)}")
    if labels.ndim != 3:
        raise DataError(f"{what}: labels must be (N,H,W), got {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise DataError(f"{what}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    if images.shape[0] == 0:
        raise DataError(f"{what}: no images")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise DataError(f"{what}: images must be float in [0,1] or uint8, got {images.dtype}")
    else:
        images = images.float()
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(f"{what}: images must lie in [0,1], found range [{lo:.4g}, {hi:.4g}]")
    if labels.is_floating_point():
        raise DataError(f"{what}: labels must be integer class ids, got {labels.dtype}")
    labels = labels.long()
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise DataError(f"{what}: labels hold id {int(labels[bad][0])}, outside 0..{num_classes - 1} and not {IGNORE_INDEX}")
    if bool((labels == IGNORE_INDEX).all()):
        raise DataError(f"{what}: every label pixel is {IGNORE_INDEX} (ignore); nothing to learn or score")
    return images, labels


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, y: torch.Tensor, cfg: SegformerProtocolConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (padding with ignore when the image is smaller) and flip, per sample."""
    xs, ys = [], []
    for i in range(x.shape[0]):
        xi, yi = x[i], y[i]
        if cfg.crop is not None:
            ch, cw = cfg.crop
            h, w = yi.shape
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            if ph or pw:
                xi = F.pad(xi, (0, pw, 0, ph), value=0.0)
                yi = F.pad(yi, (0, pw, 0, ph), value=IGNORE_INDEX)
                h, w = yi.shape
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            xi = xi[:, top:top + ch, left:left + cw]
            yi = yi[top:top + ch, left:left + cw]
        if cfg.hflip and bool(torch.rand((), generator=gen) < 0.5):
            xi = xi.flip(-1)
            yi = yi.flip(-1)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def _logits_at(model, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    logits = model(pixel_values=_normalise(x)).logits  # (B, C, H/4, W/4)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def _evaluate(model, images: torch.Tensor, labels: torch.Tensor, cfg: SegformerProtocolConfig,
              device: torch.device) -> ConfusionMatrix:
    model.eval()
    cm = ConfusionMatrix(cfg.num_classes, IGNORE_INDEX)
    for s in range(0, images.shape[0], cfg.eval_batch_size):
        x = images[s:s + cfg.eval_batch_size].to(device)
        y = labels[s:s + cfg.eval_batch_size].to(device)
        pred = _logits_at(model, x, tuple(y.shape[-2:])).argmax(1)
        cm.update(pred, y)
    return cm


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def train_and_evaluate_segformer(train_images: torch.Tensor, train_labels: torch.Tensor,
                                 test_images: torch.Tensor, test_labels: torch.Tensor,
                                 cfg: SegformerProtocolConfig = SegformerProtocolConfig(),
                                 progress: bool = True, *, desc: str = "segformer",
                                 class_names: tuple[str, ...] | None = None) -> SegResult:
    """Train a fresh SegFormer on (train_images, train_labels), score it on the test set.

    Images ``(N,3,H,W)`` float in [0,1] (uint8 accepted), labels ``(N,H,W)`` integer
    ids with 255 = ignore. Train and test sizes may differ. Same `cfg.seed` ⇒ same
    initial weights, batch order and augmentation for every call.
    """
    if isinstance(cfg, Mapping):
        cfg = from_mapping(SegformerProtocolConfig, cfg)
    train_images, train_labels = _check_set(train_images, train_labels, "SegFormer training set", cfg.num_classes)
    test_images, test_labels = _check_set(test_images, test_labels, "SegFormer test set", cfg.num_classes)
    if class_names is None:
        class_names = MFNET_CLASSES if cfg.num_classes == NUM_CLASSES else tuple(str(i) for i in range(cfg.num_classes))
    device = resolve_device(cfg.device, what="SegformerProtocolConfig.device")

    n = train_images.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.epochs > 0 else cfg.max_steps
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps) if cfg.epochs > 0 else cfg.max_steps

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        # The model's dropout / drop-path draw from the global RNG: seed it inside a forked
        # RNG state so the caller's global state is left untouched.
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(cfg.seed)
            model = build_segformer(cfg).to(device)
            gen = torch.Generator().manual_seed(cfg.seed + 1)  # shuffling and augmentation (CPU)
            weight = (torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
                      if cfg.class_weights is not None else None)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: max(1.0 - s / total, 0.0) ** cfg.poly_power)
            bar = _progress(progress, total, desc)
            step, loss_val = 0, float("nan")
            model.train()
            while step < total:
                order = torch.randperm(n, generator=gen)
                for s in range(0, n, cfg.batch_size):
                    if step >= total:
                        break
                    idx = order[s:s + cfg.batch_size]
                    x, y = _augment(train_images[idx], train_labels[idx], cfg, gen)
                    x, y = x.to(device), y.to(device)
                    if bool((y == IGNORE_INDEX).all()):
                        loss = None  # nothing labelled in this batch (e.g. crops of padding)
                    else:
                        logits = _logits_at(model, x, tuple(y.shape[-2:]))
                        loss = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE_INDEX)
                        if not torch.isfinite(loss):
                            raise TrainingError(f"{desc}: SegFormer loss became {float(loss)} at step {step}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss_val = float(loss.detach())
                    sched.step()
                    step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_val:.3f}")
            if bar is not None:
                bar.close()
            cm = _evaluate(model, test_images, test_labels, cfg, device)
    finally:
        if cfg.num_threads > 0:
            torch.set_num_threads(old_threads)

    return SegResult(
        per_class_iou=cm.per_class_iou(class_names),
        miou=cm.miou(),
        pixel_acc=cm.pixel_accuracy(),
        confusion=cm.matrix.numpy().copy(),
        train_steps=step,
        final_loss=loss_val,
        seconds=time.perf_counter() - t0,
    )


def run_protocol(sets: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                 cfg: SegformerProtocolConfig = SegformerProtocolConfig(),
                 progress: bool = True) -> dict[str, SegResult]:
    """Retrain SegFormer once per image set (same cfg and seed); Table 3/5 style results.

    `sets` maps a row name (e.g. "degraded VIS", "IKR", "MagImg") to
    ``(train_images, train_labels, test_images, test_labels)``. Use
    ``{name: r.to_row(name) for name, r in results.items()}`` for report rows.
    """
    if not sets:
        raise DataError("run_protocol: no image sets given")
    results: dict[str, SegResult] = {}
    for name, item in sets.items():
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise DataError(f"run_protocol: set {name!r} must be (train_images, train_labels, test_images, "
                            "test_labels)")
        results[name] = train_and_evaluate_segformer(*item, cfg=cfg, progress=progress, desc=f"segformer[{name}]")
    return results


def to_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of numpy ``uint8 (H,W,3)`` RGB images and ``uint8 (H,W)`` labels -> protocol tensors.

    Returns images ``(N,3,H,W)`` float32 in [0,1] and labels ``(N,H,W)`` int64. All
    images must share one size (crop or resize them beforehand, the same way for
    every image set). Grey ``(H,W)`` images are replicated to 3 channels.
    """
    images, labels = list(images), list(labels)
    if len(images) != len(labels):
        raise DataError(f"to_tensors: {len(images)} images but {len(labels)} labels")
    if not images:
        raise DataError("to_tensors: no images")
    xs, ys = [], []
    for i, (im, lb) in enumerate(zip(images, labels)):
        im, lb = np.asarray(im), np.asarray(lb)
        if im.dtype != np.uint8 or lb.dtype != np.uint8:
            raise DataError(f"to_tensors: sample {i}: expected uint8 image and label, got {im.dtype} and {lb.dtype}")
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        if im.ndim != 3 or im.shape[2] != 3 or lb.ndim != 2 or im.shape[:2] != lb.shape:
            raise DataError(f"to_tensors: sample {i}: image {im.shape} and label {lb.shape} do not match "
                            "(expected (H,W,3) and (H,W))")
        if im.shape[:2] != np.asarray(images[0]).shape[:2]:
            raise DataError(f"to_tensors: sample {i} is {im.shape[:2]}, sample 0 is {np.asarray(images[0]).shape[:2]}; "
                            "all images of a set must share one size")
        xs.append(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1))
        ys.append(torch.from_numpy(np.ascontiguousarray(lb)))
    return torch.stack(xs).float().div_(255.0), torch.stack(ys).long()


def config_from_mapping(mapping: Mapping[str, Any] | None) -> SegformerProtocolConfig:
    """Build the config from a params.yaml section (unknown keys are errors)."""
    return from_mapping(SegformerProtocolConfig, mapping)

