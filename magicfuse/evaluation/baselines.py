"""Classical fusions of a visible and an infrared image: reference rows for the tables.

These baselines **cheat** with respect to MagicFuse: they are given the real
infrared image, which MagicFuse never sees (it fuses knowledge generated from the
visible image alone). They show what a simple two-source fusion scores under the
same metric conventions; reports mark their rows as using infrared.

Inputs: visible ``uint8 (H,W)`` grey or ``(H,W,3)`` RGB, infrared ``uint8 (H,W)``
(or ``(H,W,1)``), the same size. Output has the visible image's layout:

* grey visible: the fused grey image, ``uint8 (H,W)``;
* RGB visible: the fusion is done on the luminance Y of full-range YCbCr
  (Y = 0.299 R + 0.587 G + 0.114 B, Cb/Cr offset 128, as in JPEG / fusion code),
  Cb and Cr are kept from the visible image, and the result is turned back into
  ``uint8 (H,W,3)`` RGB. Y, Cb, Cr stay floating point until the end, so only one
  rounding happens.

Rounding: every result is rounded half up, ``floor(x + 0.5)``, then clipped to
0..255. For grey inputs ``fuse_mean`` is therefore exactly ``floor((A + B)/2 + 0.5)``
= ``(A + B + 1) // 2``, the "F = mean" of METRICS.md, and ``fuse_max`` is the
elementwise maximum.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from magicfuse.errors import DataError

__all__ = [
    "fuse_mean",
    "fuse_max",
    "fuse_laplacian_pyramid",
    "BASELINES",
    "USES_INFRARED",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]

# Full-range (JPEG) YCbCr.
_RGB2YCC = np.array([
    [0.299, 0.587, 0.114],
    [-0.168735892, -0.331264108, 0.5],
    [0.5, -0.418687589, -0.081312411],
])
_YCC2RGB = np.linalg.inv(_RGB2YCC)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB (H,W,3) -> float64 YCbCr (H,W,3), full range, Cb/Cr offset 128."""
    ycc = rgb.astype(np.float64) @ _RGB2YCC.T
    ycc[..., 1:] += 128.0
    return ycc


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """float YCbCr (H,W,3) -> float64 RGB (H,W,3) (not rounded or clipped)."""
    x = ycc.astype(np.float64).copy()
    x[..., 1:] -= 128.0
    return x @ _YCC2RGB.T


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _check(visible: np.ndarray, infrared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    visible = np.asarray(visible)
    infrared = np.asarray(infrared)
    if visible.dtype != np.uint8 or infrared.dtype != np.uint8:
        raise DataError(f"fusion baseline: expected uint8 images, got visible {visible.dtype}, "
                        f"infrared {infrared.dtype}")
    if infrared.ndim == 3 and infrared.shape[2] == 1:
        infrared = infrared[..., 0]
    if infrared.ndim != 2:
        raise DataError(f"fusion baseline: infrared must be (H,W) grey, got shape {infrared.shape}")
    if visible.ndim == 3 and visible.shape[2] == 1:
        visible = visible[..., 0]
    if not (visible.ndim == 2 or (visible.ndim == 3 and visible.shape[2] == 3)):
        raise DataError(f"fusion baseline: visible must be (H,W) grey or (H,W,3) RGB, got shape {visible.shape}")
    if visible.shape[:2] != infrared.shape:
        raise DataError(f"fusion baseline: visible {visible.shape[:2]} and infrared {infrared.shape} sizes differ")
    if visible.size == 0:
        raise DataError("fusion baseline: empty image")
    return visible, infrared


def _on_luminance(visible: np.ndarray, infrared: np.ndarray,
                  rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply `rule(y_vis, ir)` (float64 arrays 0..255 -> float64) on Y; rebuild the output."""
    visible, infrared = _check(visible, infrared)
    ir = infrared.astype(np.float64)
    if visible.ndim == 2:
        return _round_u8(rule(visible.astype(np.float64), ir))
    ycc = rgb_to_ycbcr(visible)
    ycc[..., 0] = rule(ycc[..., 0], ir)
    return _round_u8(ycbcr_to_rgb(ycc))


def fuse_mean(visible: np.ndarray, infrared: np.ndarray) -> np.ndarray:
    """Average of visible (luminance) and infrared, rounded half up."""
    return _on_luminance(visible, infrared, lambda y, a: (y + a) / 2.0)


def fuse_max(visible: np.ndarray, infrared: np.ndarray) -> np.ndarray:
    """Per-pixel maximum of visible (luminance) and infrared."""
    return _on_luminance(visible, infrared, np.maximum)


def _laplacian_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    gauss = [img]
    for _ in range(levels - 1):
        gauss.append(cv2.pyrDown(gauss[-1]))
    lap = []
    for i in range(levels - 1):
        h, w = gauss[i].shape[:2]
        lap.append(gauss[i] - cv2.pyrUp(gauss[i + 1], dstsize=(w, h)))
    lap.append(gauss[-1])
    return lap


def _reconstruct(lap: list[np.ndarray]) -> np.ndarray:
    img = lap[-1]
    for detail in reversed(lap[:-1]):
        h, w = detail.shape[:2]
        img = cv2.pyrUp(img, dstsize=(w, h)) + detail
    return img


def max_levels(height: int, width: int, min_side: int = 4) -> int:
    """Largest pyramid depth whose coarsest level keeps both sides >= `min_side`."""
    levels, h, w = 1, height, width
    while (h + 1) // 2 >= min_side and (w + 1) // 2 >= min_side:
        h, w = (h + 1) // 2, (w + 1) // 2
        levels += 1
    return levels


def fuse_laplacian_pyramid(visible: np.ndarray, infrared: np.ndarray, levels: int = 4) -> np.ndarray:
    """Laplacian-pyramid fusion: mean of the coarsest (base) level, max-abs detail coefficients.

    `levels` counts pyramid levels including the base (levels=1 is plain mean
    fusion). The image must be large enough that the coarsest level keeps both
    sides >= 4 pixels, else DataError names the largest valid depth. Pyramids use
    OpenCV's 5×5 Gaussian pyrDown/pyrUp (reflect-101 border), in float32.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    visible, infrared = _check(visible, infrared)
    h, w = infrared.shape
    limit = max_levels(h, w)
    if levels > limit:
        raise DataError(f"fuse_laplacian_pyramid: a {h}×{w} image allows at most {limit} levels, got {levels}")

    def rule(y: np.ndarray, a: np.ndarray) -> np.ndarray:
        ly = _laplacian_pyramid(y.astype(np.float32), levels)
        la = _laplacian_pyramid(a.astype(np.float32), levels)
        fused = [np.where(np.abs(dy) >= np.abs(da), dy, da) for dy, da in zip(ly[:-1], la[:-1])]
        fused.append((ly[-1] + la[-1]) * 0.5)
        return _reconstruct(fused).astype(np.float64)

    return _on_luminance(visible, infrared, rule)


# name -> function, and whether the row uses the real infrared image (all of these do).
BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "mean": fuse_mean,
    "max": fuse_max,
    "laplacian_pyramid": fuse_laplacian_pyramid,
}
USES_INFRARED: dict[str, bool] = {name: True for name in BASELINES}
