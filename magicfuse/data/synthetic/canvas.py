"""Drawing surface of the synthetic scenes: the four aligned layers (colour, emitted light,
temperature, class id) with sub-pixel polygon drawing, colour helpers, and the road
perspective (`Geometry`)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from magicfuse.data.classes import CLASS_ID


CAR = CLASS_ID["car"]
PERSON = CLASS_ID["person"]
BIKE = CLASS_ID["bike"]
CURVE = CLASS_ID["curve"]
CAR_STOP = CLASS_ID["car_stop"]
GUARDRAIL = CLASS_ID["guardrail"]
CONE = CLASS_ID["color_cone"]
BUMP = CLASS_ID["bump"]

_SHIFT = 4  # sub-pixel drawing: coordinates are multiplied by 2**_SHIFT
_ONE = 1 << _SHIFT

CAR_COLOURS = (
    (0.92, 0.92, 0.90), (0.75, 0.76, 0.78), (0.10, 0.10, 0.11), (0.65, 0.08, 0.07),
    (0.10, 0.20, 0.50), (0.40, 0.40, 0.42), (0.85, 0.70, 0.10), (0.15, 0.35, 0.20),
    (0.55, 0.45, 0.35),
)
SKIN = ((0.93, 0.78, 0.65), (0.80, 0.60, 0.45), (0.55, 0.38, 0.26), (0.35, 0.24, 0.16))


class Canvas:
    """Aligned drawing layers; every primitive paints colour, temperature and label."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.alb = np.zeros((height, width, 3), np.float32)
        self.temp = np.zeros((height, width), np.float32)
        self.lab = np.zeros((height, width), np.uint8)
        self.emit = np.zeros((height, width, 3), np.float32)
        self.shade = np.ones((height, width), np.float32)
        self.gh, self.gw = max(4, (height + 3) // 4), max(4, (width + 3) // 4)
        self.glow = np.zeros((self.gh, self.gw), np.float32)
        self.any_emit = False

    @staticmethod
    def _pts(pts: Any) -> list[np.ndarray]:
        return [np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)]

    def poly(self, pts: Any, col: Any, temp: float | None, cls: int | None) -> None:
        p = self._pts(pts)
        if col is not None:
            cv2.fillPoly(self.alb, p, c3(col), shift=_SHIFT)
        if temp is not None:
            cv2.fillPoly(self.temp, p, float(temp), shift=_SHIFT)
        if cls is not None:
            cv2.fillPoly(self.lab, p, int(cls), shift=_SHIFT)

    def rect(self, x0: float, y0: float, x1: float, y1: float, col: Any, temp: float | None,
             cls: int | None) -> None:
        self.poly(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), col, temp, cls)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, col: Any, temp: float | None,
                cls: int | None, *, thickness: float = -1.0) -> None:
        c = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        a = (max(1, int(round(ax * _ONE))), max(1, int(round(ay * _ONE))))
        th = -1 if thickness < 0 else max(1, int(round(thickness)))
        if col is not None:
            cv2.ellipse(self.alb, c, a, 0, 0, 360, c3(col), th, shift=_SHIFT)
        if temp is not None:
            cv2.ellipse(self.temp, c, a, 0, 0, 360, float(temp), th, shift=_SHIFT)
        if cls is not None:
            cv2.ellipse(self.lab, c, a, 0, 0, 360, int(cls), th, shift=_SHIFT)

    def line(self, x0: float, y0: float, x1: float, y1: float, width: float, col: Any,
             temp: float | None, cls: int | None) -> None:
        p0 = (int(round(x0 * _ONE)), int(round(y0 * _ONE)))
        p1 = (int(round(x1 * _ONE)), int(round(y1 * _ONE)))
        th = max(1, int(round(width)))
        if col is not None:
            cv2.line(self.alb, p0, p1, c3(col), th, shift=_SHIFT)
        if temp is not None:
            cv2.line(self.temp, p0, p1, float(temp), th, shift=_SHIFT)
        if cls is not None:
            cv2.line(self.lab, p0, p1, int(cls), th, shift=_SHIFT)

    def light(self, cx: float, cy: float, ax: float, ay: float, rgb: Any) -> None:
        """An emitting patch (lamp, headlight, window) in the visible image."""
        c = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        a = (max(1, int(round(ax * _ONE))), max(1, int(round(ay * _ONE))))
        cv2.ellipse(self.emit, c, a, 0, 0, 360, c3(rgb), -1, shift=_SHIFT)
        self.any_emit = True

    def pool(self, cx: float, cy: float, ax: float, ay: float, level: float) -> None:
        """A pool of light on the ground (night), drawn on the coarse glow layer."""
        sx, sy = self.gw / self.w, self.gh / self.h
        c = (int(round(cx * sx * _ONE)), int(round(cy * sy * _ONE)))
        a = (max(1, int(round(ax * sx * _ONE))), max(1, int(round(ay * sy * _ONE))))
        layer = np.zeros_like(self.glow)
        cv2.ellipse(layer, c, a, 0, 0, 360, float(level), -1, shift=_SHIFT)
        np.add(self.glow, layer, out=self.glow)

    def shadow(self, cx: float, cy: float, ax: float, ay: float, level: float) -> None:
        c = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        a = (max(1, int(round(ax * _ONE))), max(1, int(round(ay * _ONE))))
        cv2.ellipse(self.shade, c, a, 0, 0, 360, float(level), -1, shift=_SHIFT)


def c3(col: Any) -> tuple[float, float, float]:
    return (float(col[0]), float(col[1]), float(col[2]))


def jit(rng: np.random.Generator, col: Any, amount: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(col, np.float64) * (1.0 + rng.uniform(-amount, amount))
                + rng.uniform(-amount / 2, amount / 2, 3), 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def clamp01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


class Geometry:
    """Flat-ground pinhole camera: depth parameter s = (y - y_h) / (H - y_h) ∝ 1 / distance."""

    def __init__(self, h: int, w: int, horizon: float, vx: float, m1: float) -> None:
        self.h, self.w, self.yh, self.vx, self.m1 = h, w, horizon, vx, m1

    def y(self, s: float) -> float:
        return self.yh + s * (self.h - self.yh)

    def m(self, s: float) -> float:  # pixels per metre at depth s
        return self.m1 * s

    def x(self, lateral: float, s: float) -> float:
        return self.vx + lateral * self.m1 * s

    def s_at_distance(self, z: float, z_bottom: float) -> float:
        return z_bottom / z
