"""Segmentation metrics and pictures of segmentation maps.

Conventions
-----------
* Labels and predictions are integer maps with MFNet class ids ``0..num_classes-1``;
  ``ignore_index`` (255) in the *target* marks pixels without a label. They are left
  out of every count. A prediction must never hold ``ignore_index``.
* The confusion matrix has the target on the rows and the prediction on the
  columns: ``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``.
* ``IoU_c = TP / (TP + FP + FN)``. A class that occurs neither in the target nor in
  the prediction has an undefined IoU (NaN) and is skipped by :meth:`ConfusionMatrix.miou`.
* **mIoU averages over all 9 MFNet classes, "unlabelled" included**, as the MFNet /
  MagicFuse tables do (their mIoU column is the mean of the nine per-class columns).
  Pass ``classes=`` to average over a subset (e.g. ``classes=range(1, 9)`` for the
  eight object classes). Within the selection, classes with an undefined IoU
  (absent from both target and prediction over the whole data set) are skipped.
* Pixel accuracy is ``trace(cm) / cm.sum()`` over labelled pixels.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from magicfuse.data.classes import (
    CLASS_ID,
    IGNORE_INDEX,
    MFNET_CLASSES,
    MFNET_PALETTE,
    NUM_CLASSES,
)
from magicfuse.errors import DataError

__all__ = [
    "ConfusionMatrix",
    "colorize",
    "legend_image",
    "box_iou_protocol",
    "BOX_CLASSES",
    "IGNORE_COLOR",
]

# Colour drawn for ignore (255) pixels by `colorize`.
IGNORE_COLOR: tuple[int, int, int] = (255, 255, 255)

# Classes scored by the box-mask protocol (MFNet ids).
BOX_CLASSES: tuple[str, ...] = ("person", "bike", "car")


def _as_long_tensor(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            raise DataError(f"{what}: expected an integer class map, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x)).long()
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise DataError(f"{what}: expected an integer class map, got dtype {x.dtype} "
                            "(take the argmax of logits first)")
        return x.detach().long()
    raise DataError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")


class ConfusionMatrix:
    """Accumulates a ``num_classes × num_classes`` confusion matrix (int64, on CPU).

    ``update(pred, target)`` takes integer maps of the same shape (any number of
    leading batch dimensions; numpy or torch, any device). See the module docstring
    for the conventions of :meth:`iou`, :meth:`miou` and :meth:`pixel_accuracy`.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (< {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> "ConfusionMatrix":
        p = _as_long_tensor(pred, "prediction")
        t = _as_long_tensor(target, "target")
        if p.shape != t.shape:
            raise DataError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
        p = p.reshape(-1)
        t = t.reshape(-1).to(p.device)
        valid = t != self.ignore_index
        t = t[valid]
        p = p[valid]
        n = self.num_classes
        if t.numel():
            bad_t = (t < 0) | (t >= n)
            if bool(bad_t.any()):
                v = int(t[bad_t][0])
                raise DataError(f"target holds class id {v}, outside 0..{n - 1} and not ignore_index {self.ignore_index}")
            bad_p = (p < 0) | (p >= n)
            if bool(bad_p.any()):
                v = int(p[bad_p][0])
                raise DataError(f"prediction holds class id {v}, outside 0..{n - 1}")
            counts = torch.bincount(t * n + p, minlength=n * n).reshape(n, n)
            self.matrix += counts.cpu()
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (for example from another worker) into this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    # -- scores ---------------------------------------------------------------------------
    def iou(self) -> np.ndarray:
        """Per-class IoU, float64 array of length num_classes; NaN where undefined."""
        cm = self.matrix.double().numpy()
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self, classes: Iterable[int] | None = None) -> float:
        """Mean IoU over `classes` (default: all classes, "unlabelled" included).

        Classes with an undefined IoU are skipped; NaN if none is defined.
        """
        iou = self.iou()
        idx = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
        for c in idx:
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class id {c} outside 0..{self.num_classes - 1}")
        sel = iou[idx]
        sel = sel[~np.isnan(sel)]
        return float(sel.mean()) if sel.size else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(torch.diag(self.matrix).sum()) / total if total else float("nan")

    def per_class_iou(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """``{class name: IoU}``; names default to MFNet's when num_classes == 9."""
        if names is None:
            names = MFNET_CLASSES if self.num_classes == NUM_CLASSES else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} names given for {self.num_classes} classes")
        return {name: float(v) for name, v in zip(names, self.iou())}


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------
def colorize(seg: np.ndarray | torch.Tensor,
             palette: Sequence[Sequence[int]] = MFNET_PALETTE,
             *, ignore_index: int = IGNORE_INDEX,
             ignore_color: Sequence[int] = IGNORE_COLOR) -> np.ndarray:
    """Class map ``(H,W)`` of ids -> ``(H,W,3)`` uint8 RGB with `palette`.

    Pixels equal to `ignore_index` are drawn in `ignore_color` (white by default);
    any other id outside the palette is an error.
    """
    if isinstance(seg, torch.Tensor):
        seg = seg.detach().cpu().numpy()
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise DataError(f"colorize: expected an (H,W) class map, got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise DataError(f"colorize: expected integer class ids, got dtype {seg.dtype}")
    lut = np.zeros((256, 3), np.uint8)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    if len(pal) > 256 or ignore_index < len(pal) and ignore_index >= 0:
        raise ValueError(f"palette of {len(pal)} colours does not fit with ignore_index {ignore_index}")
    lut[: len(pal)] = pal
    known = np.zeros(256, bool)
    known[: len(pal)] = True
    if 0 <= ignore_index < 256:
        lut[ignore_index] = np.asarray(ignore_color, np.uint8)
        known[ignore_index] = True
    if seg.size:
        lo, hi = int(seg.min()), int(seg.max())
        if lo < 0 or hi > 255:
            raise DataError(f"colorize: class ids range {lo}..{hi}; palette has {len(pal)} colours")
        seg8 = seg.astype(np.uint8, copy=False)
        if not known[seg8].all():
            bad = int(seg8[~known[seg8]][0])
            raise DataError(f"colorize: class id {bad} has no colour (palette has {len(pal)} colours, "
                            f"ignore_index {ignore_index})")
        return lut[seg8]
    return np.zeros(seg.shape + (3,), np.uint8)


def legend_image(classes: Sequence[str] = MFNET_CLASSES,
                 palette: Sequence[Sequence[int]] = MFNET_PALETTE,
                 *, row_height: int = 22, width: int = 180) -> np.ndarray:
    """A legend: one row per class, a colour swatch and the class name. uint8 RGB."""
    if len(classes) != len(palette):
        raise ValueError(f"{len(classes)} class names but {len(palette)} colours")
    h = row_height * len(classes)
    img = np.full((h, width, 3), 255, np.uint8)
    sw = row_height - 6
    scale = max(row_height / 40.0, 0.3)
    for i, (name, col) in enumerate(zip(classes, palette)):
        y0 = i * row_height + 3
        img[y0:y0 + sw, 4:4 + sw] = np.asarray(col, np.uint8)
        cv2.rectangle(img, (4, y0), (4 + sw - 1, y0 + sw - 1), (0, 0, 0), 1)
        cv2.putText(img, str(name), (sw + 10, y0 + sw - 3), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return img


# ---------------------------------------------------------------------------------------
# Box-mask protocol
# ---------------------------------------------------------------------------------------
def box_iou_protocol(pred_seg: np.ndarray | torch.Tensor | Sequence,
                     boxes_mask: np.ndarray | torch.Tensor | Sequence,
                     *, classes: Sequence[str] = BOX_CLASSES,
                     outside: str = "ignore",
                     ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """COARSE IoU of person/bike/car against masks rasterised from bounding boxes.

    This is **not** a segmentation mIoU and is not comparable to the paper's Tables
    3/5: it exists because the only real annotations in reach (MSRS detection
    labels) are boxes. ``boxes_mask`` holds, inside each box, the MFNet id of the
    box's class and `ignore_index` (255) everywhere else. A box is a rectangle, so
    background pixels inside it count as the object: a perfect segmentation does
    *not* score 1.

    outside="ignore" (default): pixels outside every box are left out, so false
    positives away from the boxes are not penalised (the score measures how well
    the objects inside the boxes are covered and told apart).
    outside="background": pixels outside every box count as "none of `classes`",
    so predicting the object class there is a false positive.

    Each of the other MFNet classes in the prediction counts as "other". `pred_seg`
    and `boxes_mask` are ``(H,W)`` or ``(B,H,W)`` integer maps, or equal-length
    sequences of ``(H,W)`` maps (sizes may differ between images). Returns
    ``{class name: IoU, ..., "mIoU": mean over defined classes}`` (NaN = class absent
    in both mask and prediction).
    """
    if outside not in ("ignore", "background"):
        raise ValueError(f"outside must be 'ignore' or 'background', got {outside!r}")
    ids = []
    for name in classes:
        if name not in CLASS_ID:
            raise ValueError(f"unknown class {name!r}; MFNet classes are {list(MFNET_CLASSES)}")
        ids.append(CLASS_ID[name])
    k = len(ids)
    # lookup: MFNet id -> index among `classes`, or k ("other")
    lut = torch.full((256,), k, dtype=torch.int64)
    for j, c in enumerate(ids):
        lut[c] = j

    if isinstance(pred_seg, (list, tuple)) or isinstance(boxes_mask, (list, tuple)):
        if len(pred_seg) != len(boxes_mask):
            raise DataError(f"{len(pred_seg)} predictions but {len(boxes_mask)} box masks")
        pairs = list(zip(pred_seg, boxes_mask))
    else:
        pairs = [(pred_seg, boxes_mask)]

    cm = ConfusionMatrix(k + 1, ignore_index=ignore_index)
    for i, (p, m) in enumerate(pairs):
        p = _as_long_tensor(p, f"prediction {i}").cpu()
        m = _as_long_tensor(m, f"box mask {i}").cpu()
        if p.shape != m.shape:
            raise DataError(f"prediction {i} shape {tuple(p.shape)} differs from box mask shape {tuple(m.shape)}")
        if bool(((p < 0) | (p > 255)).any()) or bool(((m < 0) | (m > 255)).any()):
            raise DataError(f"pair {i}: class ids must lie in 0..255")
        pm = lut[p]
        inside = m != ignore_index
        tm = torch.where(inside, lut[m.clamp(0, 255)], torch.full_like(m, k if outside == "background" else ignore_index))
        cm.update(pm, tm)
    iou = cm.iou()[:k]
    out = {name: float(v) for name, v in zip(classes, iou)}
    defined = iou[~np.isnan(iou)]
    out["mIoU"] = float(defined.mean()) if defined.size else float("nan")
    return out
