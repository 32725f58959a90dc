"""The evaluation's own scores beside the fusion metrics: PSNR of uint8 images, SSIM against a
reference, thermal-object box contrast rows, IKR PSNR per degradation, segmentation rows,
and reading a number out of metrics.json by a dotted path (the promotion score)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from magicfuse.errors import ConfigError
from magicfuse.evaluation.ablation import visual_means
from magicfuse.evaluation.metrics import rgb2gray
from magicfuse.evaluation.objects import mean_box_contrast


def gray(rgb: np.ndarray) -> np.ndarray:
    return rgb2gray(rgb) if rgb.ndim == 3 else rgb


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """Plain PSNR of two uint8 images, peak 255 (dB); inf if identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim_to(images: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean SSIM of each image against its reference: Wang et al.'s SSIM for 8-bit images
    (11x11 Gaussian window, C1 = (0.01*255)^2, C2 = (0.03*255)^2; the `l255` convention of
    `evaluation.metrics`; with A = B = the reference it is exactly ssim(image, reference)).
    Not the fusion table's MATLAB convention (docs/METRICS.md), whose near-zero constants score
    any visible/infrared pair at about 0: here a grey copy of an MSRS visible frame scores
    about 0.4 against its infrared (00111D: 0.42), so the number says how infrared-like an
    image is."""
    return visual_means(images, reference, reference, ("SSIM",), conventions={"ssim": "l255"})["SSIM"]


def contrast_row(name: str, images: Sequence[np.ndarray], boxes: Sequence[Any],
                  classes: Mapping[str, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    for cname, cls in classes.items():
        value, count = mean_box_contrast(images, boxes, cls)
        row[f"{cname} contrast"] = value
        row[f"{cname} boxes"] = count
    return row


def psnr_by_degradation(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray],
                         clean: Sequence[np.ndarray], kinds: Sequence[tuple[str, ...]]) -> list[dict[str, Any]]:
    """IKR output and degraded input PSNR against the clean frame, per degradation (a
    composite of several counts as "composite") and overall."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(k[0] if len(k) == 1 else ("composite" if k else "none"), []).append(i)
    rows = []
    for name, idx in sorted(groups.items()) + [("all", list(range(len(clean))))]:
        p_in = float(np.mean([psnr_u8(inputs[i], clean[i]) for i in idx]))
        p_out = float(np.mean([psnr_u8(outputs[i], clean[i]) for i in idx]))
        rows.append({"name": name, "images": len(idx), "input PSNR": p_in, "IKR PSNR": p_out, "gain": p_out - p_in})
    return rows


def seg_row(name: str, scores: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    row.update({c: 100.0 * v for c, v in scores["per_class_iou"].items()})
    row["mIoU"] = 100.0 * scores["miou"]
    return row


def json_safe(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
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
