"""Thermal-object visibility: how much brighter an object's box is than its surroundings.

`box_contrast` is the measure of the issue "MagicFuse on real images": for each box of a
class, the mean grey level inside the box minus the mean of a ring around it (the box grown
by `ring` times its shorter side on every side, minus every box of the image), in units of
the image's grey standard deviation. On MSRS pairs the real infrared gives about +2.2 for
people and the visible image about -0.2.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from magicfuse.data.classes import CLASS_ID
from magicfuse.errors import DataError

__all__ = ["box_contrasts", "contrast_scores", "mean_box_contrast"]


def _corners(box: Any) -> tuple[int, float, float, float, float]:
    if isinstance(box, Mapping):
        return int(box["cls"]), float(box["x0"]), float(box["y0"]), float(box["x1"]), float(box["y1"])
    return int(box.cls), float(box.x0), float(box.y0), float(box.x1), float(box.y1)


def _grey(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        if img.shape[2] == 1:
            return img[..., 0]
        # ITU-R BT.601 luma, as the fusion metrics use (docs/METRICS.md)
        return img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
    if img.ndim != 2:
        raise DataError(f"box_contrasts: expected an HxW or HxWxC image, got shape {img.shape}")
    return img


def box_contrasts(image: np.ndarray, boxes: Iterable[Any], cls: int, *, ring: float = 0.5,
                  min_pixels: int = 4) -> list[float]:
    """Contrast of every box of class `cls` (MFNet id) in `image`; boxes are `Box`es or their
    dict form, in pixel-edge coordinates of `image`. Boxes with fewer than `min_pixels`
    pixels inside or in their ring, and images without grey variation, give no value."""
    grey = _grey(image)
    h, w = grey.shape
    sd = float(grey.std())
    if sd <= 1e-9:
        return []
    spans = []
    for box in boxes:
        c, x0, y0, x1, y1 = _corners(box)
        c0, c1 = max(0, int(round(x0))), min(w, int(round(x1)))
        r0, r1 = max(0, int(round(y0))), min(h, int(round(y1)))
        spans.append((c, r0, r1, c0, c1))
    occupied = np.zeros((h, w), dtype=bool)
    for _, r0, r1, c0, c1 in spans:
        occupied[r0:r1, c0:c1] = True
    out = []
    for c, r0, r1, c0, c1 in spans:
        if c != cls or (r1 - r0) * (c1 - c0) < min_pixels:
            continue
        g = max(1, int(round(ring * min(r1 - r0, c1 - c0))))
        R0, R1, C0, C1 = max(0, r0 - g), min(h, r1 + g), max(0, c0 - g), min(w, c1 + g)
        around = ~occupied[R0:R1, C0:C1]
        if around.sum() < min_pixels:
            continue
        inside = grey[r0:r1, c0:c1].mean()
        out.append(float((inside - grey[R0:R1, C0:C1][around].mean()) / sd))
    return out


def mean_box_contrast(images: Sequence[np.ndarray], boxes: Sequence[Iterable[Any] | None], cls: int,
                      **kw: Any) -> tuple[float | None, int]:
    """Mean `box_contrasts` over every box of class `cls` in a set of images, and the number
    of boxes it averages (None when there is none)."""
    if len(images) != len(boxes):
        raise DataError(f"mean_box_contrast: {len(images)} images but {len(boxes)} box lists")
    values: list[float] = []
    for img, bxs in zip(images, boxes):
        if bxs:
            values.extend(box_contrasts(img, bxs, cls, **kw))
    return (float(np.mean(values)) if values else None), len(values)


def contrast_scores(images: Sequence[np.ndarray], boxes: Sequence[Iterable[Any] | None],
                    names: Sequence[str] = ("person", "car")) -> dict[str, float]:
    """``{"<name>_contrast": mean box contrast}`` for each class name that has boxes in the set
    (what the trainers log against steps and the reports print)."""
    scores = {}
    for name in names:
        value, _ = mean_box_contrast(images, [b or [] for b in boxes], CLASS_ID[name])
        if value is not None:
            scores[f"{name}_contrast"] = float(value)
    return scores
