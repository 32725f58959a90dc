"""Procedural road scenes: aligned visible / infrared / label triples.

The embedded default data set (DESIGN.md §4). A scene is a road seen from a
car: sky, a skyline of buildings and trees, a perspective road with lane marks,
kerbs (`curve`), guard rails, speed bumps, parking blocks (`car_stop`), traffic
cones, moving and parked cars, people and bikes, in daylight or at night.

Everything is drawn once, in depth order, into four aligned layers:

* colour (reflectance, RGB in [0, 1]) and light emitted at night (lamps,
  headlights, lit windows), combined with an illumination map (sun and
  shadows by day; a dim ambient plus lamp/headlight pools of light by night);
* temperature in [0, 1] from a small thermal model (sky cold, vegetation cool,
  road warm after a sunny day, people and running cars warm, tyres, engines and
  exhausts of running cars warmer still, parked cars near ambient, glass and
  metal reflecting the cold sky);
* the MFNet class id of the frontmost labelled thing (0 for background).

The visible image then gets texture, optics blur and sensor noise; the infrared
image is the temperature seen through a blurrier, noisier thermal camera
(non-uniformity, column fixed-pattern noise, gain/offset), so visible→infrared
is learnable but not trivial.

`generate_scene(seed, index)` is deterministic per `(seed, index)`.
`write_synthetic_dataset` writes scenes in the MSRS layout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from magicfuse.data.classes import CLASS_ID, MFNET_CLASSES
from magicfuse.errors import ConfigError, DataError
from magicfuse.io import write_bytes_atomic, write_json_atomic

GENERATOR_VERSION = 1
MIN_SIZE = 16

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

_CAR_COLOURS = (
    (0.92, 0.92, 0.90), (0.75, 0.76, 0.78), (0.10, 0.10, 0.11), (0.65, 0.08, 0.07),
    (0.10, 0.20, 0.50), (0.40, 0.40, 0.42), (0.85, 0.70, 0.10), (0.15, 0.35, 0.20),
    (0.55, 0.45, 0.35),
)
_SKIN = ((0.93, 0.78, 0.65), (0.80, 0.60, 0.45), (0.55, 0.38, 0.26), (0.35, 0.24, 0.16))


@dataclass(frozen=True)
class Scene:
    """One aligned triple plus a JSON-able description of how it was made."""

    visible: np.ndarray  # (H, W, 3) uint8 RGB
    infrared: np.ndarray  # (H, W) uint8
    label: np.ndarray  # (H, W) uint8, MFNet ids 0..8
    meta: dict


class _Canvas:
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
            cv2.fillPoly(self.alb, p, _c3(col), shift=_SHIFT)
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
            cv2.ellipse(self.alb, c, a, 0, 0, 360, _c3(col), th, shift=_SHIFT)
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
            cv2.line(self.alb, p0, p1, _c3(col), th, shift=_SHIFT)
        if temp is not None:
            cv2.line(self.temp, p0, p1, float(temp), th, shift=_SHIFT)
        if cls is not None:
            cv2.line(self.lab, p0, p1, int(cls), th, shift=_SHIFT)

    def light(self, cx: float, cy: float, ax: float, ay: float, rgb: Any) -> None:
        """An emitting patch (lamp, headlight, window) in the visible image."""
        c = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        a = (max(1, int(round(ax * _ONE))), max(1, int(round(ay * _ONE))))
        cv2.ellipse(self.emit, c, a, 0, 0, 360, _c3(rgb), -1, shift=_SHIFT)
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


def _c3(col: Any) -> tuple[float, float, float]:
    return (float(col[0]), float(col[1]), float(col[2]))


def _jit(rng: np.random.Generator, col: Any, amount: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(col, np.float64) * (1.0 + rng.uniform(-amount, amount))
                + rng.uniform(-amount / 2, amount / 2, 3), 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def _clamp01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


class _Geometry:
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


def _validate(seed: int, index: int, height: int, width: int) -> None:
    for name, v in (("seed", seed), ("index", index), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"generate_scene: {name} must be an integer, got {v!r}")
    if seed < 0 or index < 0:
        raise ConfigError(f"generate_scene: seed and index must be >= 0, got seed={seed}, index={index}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ConfigError(
            f"generate_scene: size {width}x{height} is too small (minimum {MIN_SIZE}x{MIN_SIZE})"
        )


def generate_scene(seed: int, index: int, *, height: int = 96, width: int = 128) -> Scene:
    """Draw scene `index` of the synthetic data set `seed` at `width`×`height`."""
    _validate(seed, index, height, width)
    rng = np.random.default_rng((int(seed), int(index)))
    H, W = int(height), int(width)
    cv = _Canvas(H, W)
    night = bool(rng.random() < 0.4)
    sunny = bool(rng.random() < 0.6)
    horizon = H * rng.uniform(0.30, 0.46)
    vx = W * rng.uniform(0.32, 0.68)
    m1 = min(W, 1.6 * H) * rng.uniform(0.075, 0.12)  # pixels per metre at the bottom row
    g = _Geometry(H, W, horizon, vx, m1)
    yh = int(round(horizon))
    sky_rows = max(1, int(round(0.08 * H)))
    half_road = float(rng.choice([3.5, 5.25, 7.0], p=[0.45, 0.3, 0.25]))
    lanes = int(round(half_road / 1.75))  # lanes across the full road width

    # Thermal model: temperatures in [0, 1].
    amb = 0.30 if night else (0.45 if sunny else 0.38)
    amb += rng.uniform(-0.03, 0.03)
    warm_road = sunny if not night else bool(rng.random() < 0.65)
    if night:
        road_t = amb + (rng.uniform(0.12, 0.20) if warm_road else rng.uniform(0.0, 0.05))
    else:
        road_t = amb + (rng.uniform(0.10, 0.20) if sunny else rng.uniform(0.0, 0.06))
    sky_t = rng.uniform(0.03, 0.10)
    veg_t = amb - rng.uniform(0.05, 0.12)
    bld_t = amb + rng.uniform(-0.03, 0.05) + (0.04 if sunny and not night else 0.0)
    metal_t = amb - rng.uniform(0.05, 0.10)
    concrete_t = road_t - rng.uniform(0.03, 0.07)

    objects: list[dict[str, Any]] = []

    # --- sky -------------------------------------------------------------------------
    ramp = np.linspace(0.0, 1.0, max(yh, 1), dtype=np.float32)[:, None, None]
    if night:
        top = np.array(_jit(rng, (0.05, 0.06, 0.14), 0.2), np.float32)
        bot = np.array(_jit(rng, (0.20, 0.17, 0.22), 0.2), np.float32)
    else:
        top = np.array(_jit(rng, (0.30, 0.50, 0.85), 0.15), np.float32) if sunny else \
            np.array(_jit(rng, (0.62, 0.66, 0.72), 0.1), np.float32)
        bot = np.array(_jit(rng, (0.78, 0.85, 0.92), 0.08), np.float32)
    lowf = cv2.resize(rng.standard_normal((max(2, H // 8), max(2, W // 8))).astype(np.float32),
                      (W, H), interpolation=cv2.INTER_CUBIC)
    clouds = cv2.resize(rng.standard_normal((3, 5)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    if yh > 0:
        cv.alb[:yh] = top + (bot - top) * ramp
        if not night:
            cloud = np.clip(clouds[:yh] + 0.2 * lowf[:yh] - 0.2, 0, None)[:, :, None] * (0.3 if sunny else 0.12)
            cv.alb[:yh] += cloud
        cv.temp[:yh] = sky_t + 0.06 * ramp[:, :, 0]

    # --- skyline: buildings and trees at the horizon -------------------------------------
    x = -rng.uniform(0, 0.1) * W
    max_h = max(1.0, horizon - sky_rows)
    while x < W:
        bw = W * rng.uniform(0.06, 0.2)
        bh = min(max_h, H * rng.uniform(0.04, 0.3))
        if rng.random() < 0.25:  # a tree cluster rather than a building
            cv.ellipse(x + bw / 2, horizon - bh * 0.45, bw / 2, bh * 0.5,
                       _jit(rng, (0.18, 0.32, 0.14), 0.25), veg_t + rng.uniform(-0.02, 0.02), 0)
        else:
            col = _jit(rng, rng.choice([(0.55, 0.52, 0.48), (0.7, 0.68, 0.62), (0.45, 0.42, 0.45),
                                        (0.62, 0.55, 0.45), (0.35, 0.38, 0.42)]), 0.15)
            x0, x1, y0 = x, x + bw, horizon - bh
            cv.rect(x0, y0, x1, horizon + 1, col, bld_t + rng.uniform(-0.02, 0.02), 0)
            _windows(cv, rng, x0, y0, x1, horizon, night, bld_t)
        x += bw * rng.uniform(0.7, 1.05)

    # --- ground on both sides, then the road ----------------------------------------------
    side_kind = [str(rng.choice(["sidewalk", "grass"], p=[0.75, 0.25])) for _ in range(2)]
    far, near = 0.0, 1.4
    for k, sign in enumerate((-1.0, 1.0)):
        if side_kind[k] == "sidewalk":
            col, t = _jit(rng, (0.58, 0.56, 0.53), 0.1), concrete_t
        else:
            col, t = _jit(rng, (0.26, 0.40, 0.18), 0.2), veg_t + 0.03
        edge = g.x(sign * half_road, near)
        outer = -10 * W if sign < 0 else 11 * W
        cv.poly(((g.vx, horizon), (outer, horizon), (outer, g.y(near)), (edge, g.y(near))), col, t, 0)
    road_col = _jit(rng, (0.33, 0.33, 0.34), 0.15)
    road_poly = [(g.x(-half_road, far), horizon), (g.x(half_road, far), horizon),
                 (g.x(half_road, near), g.y(near)), (g.x(-half_road, near), g.y(near))]
    cv.poly(road_poly, road_col, road_t, 0)
    z_bottom = rng.uniform(3.0, 5.0)  # metres from camera to the bottom row
    _lane_marks(cv, g, rng, half_road, lanes, z_bottom, road_t)
    if rng.random() < 0.15:
        _crosswalk(cv, g, rng, half_road, z_bottom, road_t)
    if rng.random() < 0.3:
        z = rng.uniform(z_bottom * 1.1, z_bottom * 6)
        _bump(cv, g, rng, half_road, z, z_bottom, road_t)
        objects.append({"class": "bump", "distance_m": round(float(z), 2)})

    # --- kerbs, side facades, guard rails ---------------------------------------------------
    has_rail = [False, False]
    for k, sign in enumerate((-1.0, 1.0)):
        if rng.random() < 0.85:
            _kerb(cv, g, rng, sign, half_road, concrete_t)
        if rng.random() < 0.4:
            xb = sign * (half_road + rng.uniform(4.0, 9.0))
            sn = rng.uniform(0.12, 0.4)
            hb = rng.uniform(6.0, 20.0)
            top_far = max(float(sky_rows), horizon - hb * g.m(0.02))
            top_near = max(float(sky_rows), g.y(sn) - hb * g.m(sn))
            col = _jit(rng, (0.6, 0.57, 0.52), 0.2)
            cv.poly(((g.x(xb, 0.0), horizon), (g.x(xb, 0.0), top_far), (g.x(xb, sn), top_near),
                     (g.x(xb, sn), g.y(sn))), col, bld_t, 0)
        if rng.random() < 0.35:
            _guardrail(cv, g, rng, sign, half_road + rng.uniform(0.3, 0.9), z_bottom, metal_t, night)
            has_rail[k] = True
            objects.append({"class": "guardrail", "side": "left" if sign < 0 else "right"})

    # --- things, drawn far to near -----------------------------------------------------------
    things: list[tuple[float, str, dict[str, Any]]] = []

    def add(kind: str, z: float, lateral: float, **kw: Any) -> None:
        things.append((g.s_at_distance(z, z_bottom), kind, {"lateral": lateral, "z": z, **kw}))

    def dist(s_lo: float, s_hi: float) -> float:  # distance of a depth drawn uniformly in s
        return z_bottom / rng.uniform(s_lo, s_hi)

    lane_centres = [(-half_road + 1.75 * (2 * i + 1)) for i in range(lanes)]
    for _ in range(int(rng.choice([0, 1, 2, 3, 4], p=[0.12, 0.28, 0.28, 0.2, 0.12]))):
        lane = float(rng.choice(lane_centres))
        view = "rear" if lane > 0 or rng.random() < 0.3 else "front"
        add("car", dist(0.08, 0.8), lane + rng.uniform(-0.3, 0.3),
            moving=True, view=view if rng.random() < 0.85 else "side")
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1]))):
        sign = float(rng.choice([-1.0, 1.0]))
        add("car", dist(0.1, 0.9), sign * (half_road - 1.1),
            moving=False, view=str(rng.choice(["rear", "side"], p=[0.6, 0.4])))
    for _ in range(int(rng.choice([0, 1, 2, 3, 4, 5], p=[0.15, 0.25, 0.25, 0.15, 0.12, 0.08]))):
        sign = float(rng.choice([-1.0, 1.0]))
        on_road = rng.random() < 0.25
        lat = rng.uniform(-half_road, half_road) if on_road else \
            sign * (half_road + rng.uniform(0.5, 3.0)) if not has_rail[int(sign > 0)] else \
            sign * (half_road - rng.uniform(0.4, 1.0))
        add("person", dist(0.1, 1.0), lat)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.55, 0.3, 0.15]))):
        sign = float(rng.choice([-1.0, 1.0]))
        add("bike", dist(0.1, 0.9), sign * (half_road - rng.uniform(0.4, 1.2)),
            rider=bool(rng.random() < 0.7), facing=float(rng.choice([-1.0, 1.0])))
    if rng.random() < 0.35:
        zc = dist(0.15, 0.8)
        lat = float(rng.uniform(-half_road + 0.5, half_road - 0.5))
        for i in range(int(rng.integers(1, 5))):
            add("cone", zc + i * rng.uniform(1.5, 3.0), lat + rng.uniform(-0.3, 0.3))
    if rng.random() < 0.3:
        sign = float(rng.choice([-1.0, 1.0]))
        zc = dist(0.2, 0.9)
        for i in range(int(rng.integers(1, 4))):
            add("car_stop", zc + i * 2.6, sign * (half_road + rng.uniform(1.2, 2.5)))
    lamp_side = float(rng.choice([-1.0, 1.0]))
    z = rng.uniform(z_bottom * 1.0, z_bottom * 3)
    while z < z_bottom * 25:
        add("lamp", z, lamp_side * (half_road + 0.6))
        z += rng.uniform(20, 30)
    for _ in range(int(rng.integers(0, 4))):
        sign = float(rng.choice([-1.0, 1.0]))
        add("tree", dist(0.08, 0.8), sign * (half_road + rng.uniform(1.5, 4.0)))

    things.sort(key=lambda t: t[0])
    temps = {"amb": amb, "road": road_t, "metal": metal_t, "veg": veg_t, "concrete": concrete_t}
    for s, kind, kw in things:
        if s < 0.03:
            continue
        rec = _draw_thing(cv, g, rng, kind, s, kw, temps, night, sunny, sky_rows)
        if rec is not None:
            objects.append(rec)

    if night:  # ego headlights
        cv.pool(g.vx + rng.uniform(-0.1, 0.1) * W, H * 1.0, W * 0.45, (H - horizon) * 0.55,
                rng.uniform(0.5, 0.9))

    visible = _finish_visible(cv, rng, night, sunny, lowf, yh)
    infrared = _finish_infrared(cv, rng, H, W)
    counts = np.bincount(cv.lab.ravel(), minlength=len(MFNET_CLASSES))
    meta = {
        "generator": "magicfuse.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "index": int(index),
        "height": H,
        "width": W,
        "time": "night" if night else "day",
        "sunny": bool(sunny),
        "warm_road": bool(warm_road),
        "horizon": round(float(horizon), 2),
        "vanishing_x": round(float(vx), 2),
        "sky_rows": sky_rows,
        "road_polygon": [[round(float(a), 2), round(float(b), 2)] for a, b in road_poly],
        "lanes": lanes,
        "temperatures": {k: round(float(v), 4) for k, v in temps.items()},
        "class_pixels": {MFNET_CLASSES[i]: int(c) for i, c in enumerate(counts[: len(MFNET_CLASSES)]) if c},
        "objects": objects,
    }
    return Scene(visible=visible, infrared=infrared, label=cv.lab, meta=meta)


# ----------------------------------------------------------------------------- drawing helpers


def _windows(cv: _Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
             night: bool, bld_t: float) -> None:
    """A grid of windows inside a facade rectangle (vectorised on its slice)."""
    H, W = cv.h, cv.w
    ix0, ix1 = max(0, int(math.ceil(x0))), min(W, int(x1))
    iy0, iy1 = max(0, int(math.ceil(y0))), min(H, int(y1) - 1)
    if ix1 - ix0 < 3 or iy1 - iy0 < 3:
        return
    period = max(2, int(round(max(3.0, H / 40) * rng.uniform(0.8, 1.4))))
    yy, xx = np.mgrid[iy0:iy1, ix0:ix1]
    win = ((xx - ix0) % period < period * 0.55) & ((yy - iy0) % period < period * 0.5)
    if night:
        cells = (xx - ix0) // period * 7919 + (yy - iy0) // period * 104729
        lit = ((cells * 2654435761 + int(rng.integers(0, 1 << 20))) >> 7) % 100 < int(rng.uniform(15, 60))
        region = cv.emit[iy0:iy1, ix0:ix1]
        region[win & lit] = _c3(_jit(rng, (0.85, 0.7, 0.4), 0.1))
        cv.any_emit = True
        cv.temp[iy0:iy1, ix0:ix1][win & lit] = bld_t + 0.05
    cv.alb[iy0:iy1, ix0:ix1][win] = _c3(_jit(rng, (0.18, 0.22, 0.28), 0.2))


def _lane_marks(cv: _Canvas, g: _Geometry, rng: np.random.Generator, half_road: float, lanes: int,
                z_bottom: float, road_t: float) -> None:
    paint = (0.85, 0.85, 0.82)
    paint_t = road_t - 0.04
    yellow = (0.85, 0.7, 0.15)
    for i in range(1, lanes):
        lat = -half_road + 3.5 * i
        centre = abs(lat) < 0.1
        col = yellow if centre and rng.random() < 0.5 else paint
        z = z_bottom * rng.uniform(0.5, 1.0)
        while z < z_bottom * 40:
            s0, s1 = g.s_at_distance(z, z_bottom), g.s_at_distance(z + 3.0, z_bottom)
            hw = 0.075
            cv.poly(((g.x(lat - hw, s0), g.y(s0)), (g.x(lat + hw, s0), g.y(s0)),
                     (g.x(lat + hw, s1), g.y(s1)), (g.x(lat - hw, s1), g.y(s1))), col, paint_t, None)
            z += 3.0 if centre and col is yellow else 9.0
    for sign in (-1.0, 1.0):  # solid edge lines
        lat = sign * (half_road - 0.3)
        cv.poly(((g.x(lat - 0.07, 1.4), g.y(1.4)), (g.x(lat + 0.07, 1.4), g.y(1.4)),
                 (g.x(lat, 0.0), g.y(0.0))), paint, paint_t, None)


def _crosswalk(cv: _Canvas, g: _Geometry, rng: np.random.Generator, half_road: float, z_bottom: float,
               road_t: float) -> None:
    z = rng.uniform(z_bottom * 1.5, z_bottom * 5)
    s0, s1 = g.s_at_distance(z, z_bottom), g.s_at_distance(z + 3.0, z_bottom)
    lat = -half_road + 0.3
    while lat < half_road - 0.6:
        cv.poly(((g.x(lat, s0), g.y(s0)), (g.x(lat + 0.45, s0), g.y(s0)),
                 (g.x(lat + 0.45, s1), g.y(s1)), (g.x(lat, s1), g.y(s1))), (0.85, 0.85, 0.83), road_t - 0.04, 0)
        lat += 0.9


def _bump(cv: _Canvas, g: _Geometry, rng: np.random.Generator, half_road: float, z: float, z_bottom: float,
          road_t: float) -> None:
    depth = rng.uniform(0.35, 0.6)
    s0, s1 = g.s_at_distance(z, z_bottom), g.s_at_distance(z + depth, z_bottom)
    lift = 0.08 * g.m(s0)
    t = road_t + 0.03
    cv.poly(((g.x(-half_road, s0), g.y(s0)), (g.x(half_road, s0), g.y(s0)),
             (g.x(half_road, s1), g.y(s1) - lift), (g.x(-half_road, s1), g.y(s1) - lift)),
            (0.12, 0.12, 0.12), t, BUMP)
    stripe = rng.uniform(0.4, 0.7)
    lat = -half_road
    yellow = _jit(rng, (0.9, 0.75, 0.1), 0.1)
    while lat < half_road:
        l1 = min(lat + stripe, half_road)
        cv.poly(((g.x(lat, s0), g.y(s0)), (g.x(l1, s0), g.y(s0)),
                 (g.x(l1, s1), g.y(s1) - lift), (g.x(lat, s1), g.y(s1) - lift)), yellow, t, BUMP)
        lat += 2 * stripe


def _kerb(cv: _Canvas, g: _Geometry, rng: np.random.Generator, sign: float, half_road: float,
          concrete_t: float) -> None:
    height, top = rng.uniform(0.12, 0.2), rng.uniform(0.15, 0.3)
    a, b = sign * half_road, sign * (half_road + top)
    sf, sn = 0.0, 1.4
    face = _jit(rng, (0.62, 0.62, 0.6), 0.12)
    t = concrete_t + rng.uniform(-0.02, 0.02)
    cv.poly(((g.x(a, sf), g.y(sf)), (g.x(a, sn), g.y(sn)), (g.x(a, sn), g.y(sn) - height * g.m(sn)),
             (g.x(b, sn), g.y(sn) - height * g.m(sn)), (g.x(b, sf), g.y(sf))), face, t, CURVE)
    upper = tuple(min(1.0, c * 1.15) for c in face)
    cv.poly(((g.x(a, sf), g.y(sf)), (g.x(a, sn), g.y(sn) - height * g.m(sn)),
             (g.x(b, sn), g.y(sn) - height * g.m(sn)), (g.x(b, sf), g.y(sf))), upper, t + 0.01, CURVE)


def _guardrail(cv: _Canvas, g: _Geometry, rng: np.random.Generator, sign: float, lat: float,
               z_bottom: float, metal_t: float, night: bool) -> None:
    lat = sign * lat
    sf, sn = 0.0, 1.4
    lo, hi = rng.uniform(0.4, 0.5), rng.uniform(0.75, 0.85)
    col = _jit(rng, (0.78, 0.78, 0.76) if rng.random() < 0.7 else (0.85, 0.8, 0.3), 0.08)
    post_col = tuple(c * 0.7 for c in col)
    z = z_bottom * rng.uniform(0.6, 1.0)
    while z < z_bottom * 40:
        s = g.s_at_distance(z, z_bottom)
        hw = max(0.06 * g.m(s), 0.35)
        xc = g.x(lat, s)
        cv.rect(xc - hw, g.y(s) - hi * g.m(s), xc + hw, g.y(s), post_col, metal_t, GUARDRAIL)
        z += 4.0
    cv.poly(((g.x(lat, sf), g.y(sf)), (g.x(lat, sn), g.y(sn) - hi * g.m(sn)),
             (g.x(lat, sn), g.y(sn) - lo * g.m(sn))), col, metal_t, GUARDRAIL)
    mid = (lo + hi) / 2
    cv.poly(((g.x(lat, sf), g.y(sf)), (g.x(lat, sn), g.y(sn) - mid * g.m(sn)),
             (g.x(lat, sn), g.y(sn) - (mid - 0.05) * g.m(sn))), tuple(c * 0.8 for c in col), metal_t, GUARDRAIL)


def _draw_thing(cv: _Canvas, g: _Geometry, rng: np.random.Generator, kind: str, s: float,
                kw: dict[str, Any], temps: dict[str, float], night: bool, sunny: bool,
                sky_rows: int) -> dict[str, Any] | None:
    m = g.m(s)
    yb = g.y(s)
    cx = g.x(kw["lateral"], s)
    if m * 1.7 < 1.5 or cx < -6 * m or cx > cv.w + 6 * m:
        return None
    amb, road_t = temps["amb"], temps["road"]
    rec: dict[str, Any] = {"class": kind, "distance_m": round(float(kw["z"]), 2),
                           "lateral_m": round(float(kw["lateral"]), 2)}
    if kind == "car":
        moving = bool(kw["moving"])
        base = max(road_t, amb)
        t = {
            "body": _clamp01(base + rng.uniform(0.12, 0.2)) if moving else _clamp01(amb + rng.uniform(-0.04, 0.02)),
            # glass reflects the cold sky; a running car's heated cabin warms it
            "glass": _clamp01(base + rng.uniform(0.0, 0.06)) if moving else _clamp01(amb - rng.uniform(0.02, 0.06)),
            "tyre": _clamp01(rng.uniform(0.78, 0.88)) if moving else _clamp01(amb + rng.uniform(-0.03, 0.01)),
            "engine": _clamp01(rng.uniform(0.85, 0.95)) if moving else _clamp01(amb + 0.02),
            "exhaust": _clamp01(rng.uniform(0.9, 1.0)) if moving else _clamp01(amb),
            "lamp": _clamp01(amb + 0.25) if (moving and night) else _clamp01(amb),
        }
        col = _jit(rng, _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))], 0.08)
        if kw["view"] == "side":
            box = _car_side(cv, rng, cx, yb, m, col, t, night and moving, float(rng.choice([-1.0, 1.0])), sunny and not night)
        else:
            box = _car_front_rear(cv, rng, cx, yb, m, col, t, night and moving, kw["view"], sunny and not night)
        rec.update(moving=moving, view=kw["view"])
    elif kind == "person":
        box = _person(cv, rng, cx, yb, m, amb, sunny and not night)
    elif kind == "bike":
        box = _bike(cv, rng, cx, yb, m, temps["metal"], amb, kw["facing"], bool(kw["rider"]), sunny and not night)
        rec.update(rider=bool(kw["rider"]))
    elif kind == "cone":
        box = _cone(cv, rng, cx, yb, m, amb)
    elif kind == "car_stop":
        box = _car_stop(cv, rng, cx, yb, m, temps["concrete"])
    elif kind == "lamp":
        _lamp(cv, rng, cx, yb, m, temps["metal"], night, kw["lateral"], sky_rows, g)
        return None
    elif kind == "tree":
        _tree(cv, rng, cx, yb, m, temps["veg"], sky_rows)
        return None
    else:  # pragma: no cover - internal list
        raise AssertionError(kind)
    x0, y0, x1, y1 = box
    x0, x1 = max(0.0, x0), min(float(cv.w), x1)
    y0, y1 = max(0.0, y0), min(float(cv.h), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    rec["box"] = [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]
    return rec


def _car_front_rear(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, col: Any,
                    t: dict[str, float], lights_on: bool, view: str, sun: bool) -> tuple:
    w, h = rng.uniform(1.65, 1.9) * m, rng.uniform(1.4, 1.7) * m
    if rng.random() < 0.15:  # van / small truck
        h *= 1.35
    x0, x1 = cx - w / 2, cx + w / 2
    if sun:
        cv.shadow(cx, yb, w * 0.6, 0.25 * m + 0.5, 0.45)
    tyre_w = 0.22 * w
    cv.rect(x0 + 0.04 * w, yb - 0.38 * m, x0 + 0.04 * w + tyre_w, yb, (0.05, 0.05, 0.05), t["tyre"], CAR)
    cv.rect(x1 - 0.04 * w - tyre_w, yb - 0.38 * m, x1 - 0.04 * w, yb, (0.05, 0.05, 0.05), t["tyre"], CAR)
    body_top = yb - 0.58 * h
    cv.rect(x0, body_top, x1, yb - 0.22 * m, col, t["body"], CAR)
    cv.rect(x0, yb - 0.42 * m, x1, yb - 0.22 * m, tuple(c * 0.45 for c in col), t["body"], CAR)  # bumper
    roof = yb - h
    cab = ((x0 + 0.06 * w, body_top), (x1 - 0.06 * w, body_top), (x1 - 0.16 * w, roof), (x0 + 0.16 * w, roof))
    cv.poly(cab, tuple(min(1.0, c * 1.1) for c in col), t["body"], CAR)
    cv.poly(((x0 + 0.11 * w, body_top - 0.04 * h), (x1 - 0.11 * w, body_top - 0.04 * h),
             (x1 - 0.19 * w, roof + 0.08 * h), (x0 + 0.19 * w, roof + 0.08 * h)),
            (0.12, 0.14, 0.17), t["glass"], CAR)
    ly = body_top + 0.25 * (yb - body_top)
    lamp_col = (0.85, 0.1, 0.08) if view == "rear" else (0.9, 0.9, 0.85)
    for lx in (x0 + 0.12 * w, x1 - 0.12 * w):
        cv.rect(lx - 0.09 * w, ly - 0.05 * h, lx + 0.09 * w, ly + 0.05 * h, lamp_col, t["lamp"], CAR)
        if lights_on:
            if view == "rear":
                cv.light(lx, ly, 0.1 * w, 0.06 * h, (1.2, 0.1, 0.05))
            else:
                cv.light(lx, ly, 0.1 * w, 0.07 * h, (1.6, 1.5, 1.3))
                cv.pool(lx, yb + 2.5 * m, 0.9 * w, 1.5 * m, 0.35)
    if view == "front":  # radiator grille, warm on a running engine
        cv.rect(cx - 0.25 * w, ly - 0.06 * h, cx + 0.25 * w, ly + 0.1 * h, (0.15, 0.15, 0.15), t["engine"], CAR)
    else:
        cv.rect(cx - 0.12 * w, ly + 0.02 * h, cx + 0.12 * w, ly + 0.12 * h, (0.9, 0.9, 0.85), t["body"], CAR)
        ex = x0 + 0.25 * w
        cv.ellipse(ex, yb - 0.3 * m, max(0.5, 0.05 * w), max(0.5, 0.04 * h), (0.1, 0.1, 0.1), t["exhaust"], CAR)
    return (x0, roof, x1, yb)


def _car_side(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, col: Any,
              t: dict[str, float], lights_on: bool, facing: float, sun: bool) -> tuple:
    length, h = rng.uniform(4.0, 4.8) * m, rng.uniform(1.4, 1.6) * m
    x0, x1 = cx - length / 2, cx + length / 2
    r = 0.33 * m
    if sun:
        cv.shadow(cx, yb, length * 0.55, 0.3 * m + 0.5, 0.45)
    cv.rect(x0, yb - 0.95 * m, x1, yb - 0.28 * m, col, t["body"], CAR)
    front = x1 if facing > 0 else x0
    back = x0 if facing > 0 else x1
    hood_end = front - facing * 0.28 * length
    cv.rect(min(front, hood_end), yb - 0.95 * m, max(front, hood_end), yb - 0.4 * m, col, t["engine"] * 0.5 + t["body"] * 0.5, CAR)
    ca, cb = x0 + 0.22 * length, x1 - 0.22 * length
    cv.poly(((ca - 0.05 * length, yb - 0.95 * m), (cb + 0.05 * length, yb - 0.95 * m),
             (cb - 0.02 * length, yb - h), (ca + 0.08 * length, yb - h)),
            tuple(min(1.0, c * 1.05) for c in col), t["body"], CAR)
    cv.poly(((ca, yb - 1.0 * m), (cb, yb - 1.0 * m), (cb - 0.04 * length, yb - h + 0.08 * m),
             (ca + 0.1 * length, yb - h + 0.08 * m)), (0.12, 0.14, 0.17), t["glass"], CAR)
    for wx in (x0 + 0.18 * length, x1 - 0.18 * length):
        cv.ellipse(wx, yb - r, r, r, (0.05, 0.05, 0.05), t["tyre"], CAR)
        cv.ellipse(wx, yb - r, r * 0.5, r * 0.5, (0.6, 0.6, 0.62), t["tyre"] * 0.8 + t["body"] * 0.2, CAR)
    cv.ellipse(back, yb - 0.3 * m, max(0.5, 0.08 * m), max(0.5, 0.06 * m), (0.1, 0.1, 0.1), t["exhaust"], CAR)
    if lights_on:
        cv.light(front, yb - 0.7 * m, 0.12 * m, 0.1 * m, (1.6, 1.5, 1.3))
        cv.light(back, yb - 0.75 * m, 0.1 * m, 0.08 * m, (1.2, 0.1, 0.05))
        cv.pool(front + facing * 2.5 * m, yb, 2.5 * m, 0.8 * m, 0.35)
    return (x0, yb - h, x1, yb)


def _person(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, amb: float,
            sun: bool) -> tuple:
    ht = rng.uniform(1.5, 1.9) * m
    if sun:
        cv.shadow(cx + 0.2 * m, yb, 0.4 * m + 0.5, 0.12 * m + 0.5, 0.5)
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    top_col = _jit(rng, rng.uniform(0.05, 0.9, 3), 0.1)
    leg_col = _jit(rng, rng.choice([(0.1, 0.12, 0.25), (0.15, 0.15, 0.15), (0.5, 0.45, 0.35), (0.3, 0.3, 0.35)]), 0.15)
    t_skin = rng.uniform(0.86, 0.95)
    t_cloth = rng.uniform(0.74, 0.84)
    t_leg = t_cloth - rng.uniform(0.0, 0.05)
    hip_y = yb - 0.5 * ht
    sh_y = yb - 0.82 * ht
    stride = rng.uniform(-0.18, 0.18) * ht
    lw = max(1.0, 0.11 * ht)
    cv.line(cx - 0.04 * ht, hip_y, cx - 0.04 * ht - stride, yb - 0.02 * ht, lw, leg_col, t_leg, PERSON)
    cv.line(cx + 0.04 * ht, hip_y, cx + 0.04 * ht + stride, yb - 0.02 * ht, lw, leg_col, t_leg, PERSON)
    sw = 0.13 * ht
    cv.poly(((cx - sw, sh_y), (cx + sw, sh_y), (cx + 0.1 * ht, hip_y + 0.03 * ht), (cx - 0.1 * ht, hip_y + 0.03 * ht)),
            top_col, t_cloth, PERSON)
    aw = max(1.0, 0.07 * ht)
    swing = rng.uniform(-0.1, 0.1) * ht
    cv.line(cx - sw, sh_y + 0.02 * ht, cx - sw - 0.02 * ht + swing, hip_y + 0.02 * ht, aw, top_col, t_cloth, PERSON)
    cv.line(cx + sw, sh_y + 0.02 * ht, cx + sw + 0.02 * ht - swing, hip_y + 0.02 * ht, aw, top_col, t_cloth, PERSON)
    hr = 0.065 * ht
    cv.ellipse(cx, sh_y - hr * 1.1, hr * 0.85, hr, skin, t_skin, PERSON)
    if rng.random() < 0.4:  # hair / hat
        cv.ellipse(cx, sh_y - hr * 1.6, hr * 0.85, hr * 0.5, _jit(rng, (0.1, 0.08, 0.06), 0.3), t_cloth, PERSON)
    return (cx - sw - 0.12 * ht, sh_y - 2.2 * hr, cx + sw + 0.12 * ht, yb)


def _bike(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, metal_t: float, amb: float,
          facing: float, rider: bool, sun: bool) -> tuple:
    r = 0.34 * m
    base = 1.05 * m
    wa, wb = cx - base / 2, cx + base / 2
    th = max(1.0, 0.06 * m)
    frame_col = _jit(rng, rng.uniform(0.1, 0.9, 3), 0.1)
    tyre_t = amb - 0.02
    if sun:
        cv.shadow(cx, yb, base * 0.7, 0.12 * m + 0.5, 0.55)
    for wx in (wa, wb):
        cv.ellipse(wx, yb - r, r, r, (0.06, 0.06, 0.06), tyre_t, BIKE, thickness=max(1.0, 0.07 * m))
    seat = (cx - facing * 0.15 * m, yb - 0.95 * m)
    bar = (cx + facing * 0.38 * m, yb - 1.05 * m)
    crank = (cx, yb - r)
    front = wb if facing > 0 else wa
    back = wa if facing > 0 else wb
    for p0, p1 in ((seat, crank), (crank, (back, yb - r)), ((back, yb - r), seat), (seat, bar),
                   (bar, (front, yb - r)), (crank, (bar[0] - facing * 0.05 * m, bar[1] + 0.15 * m))):
        cv.line(p0[0], p0[1], p1[0], p1[1], th, frame_col, metal_t, BIKE)
    top = yb - 1.1 * m
    if rider:
        ht = rng.uniform(1.6, 1.85) * m
        cloth = _jit(rng, rng.uniform(0.05, 0.9, 3), 0.1)
        t_c, t_s = rng.uniform(0.74, 0.84), rng.uniform(0.86, 0.95)
        lw = max(1.0, 0.1 * ht)
        hip = (seat[0], seat[1] - 0.03 * m)
        sh = (hip[0] + facing * 0.18 * ht, hip[1] - 0.32 * ht)
        cv.line(hip[0], hip[1], crank[0] + facing * 0.08 * m, crank[1] + 0.1 * m, lw, _jit(rng, (0.15, 0.15, 0.2), 0.2), t_c - 0.03, PERSON)
        cv.line(hip[0], hip[1], sh[0], sh[1], max(1.0, 0.2 * ht), cloth, t_c, PERSON)
        cv.line(sh[0], sh[1], bar[0], bar[1], max(1.0, 0.06 * ht), cloth, t_c, PERSON)
        hr = 0.065 * ht
        cv.ellipse(sh[0] + facing * 0.02 * ht, sh[1] - 1.3 * hr, hr * 0.85, hr, _SKIN[int(rng.integers(len(_SKIN)))], t_s, PERSON)
        top = sh[1] - 2.4 * hr
    return (wa - r, top, wb + r, yb)


def _cone(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, amb: float) -> tuple:
    h = rng.uniform(0.5, 0.75) * m
    b, tw = 0.2 * m, 0.04 * m
    t = amb - 0.02
    orange = _jit(rng, (0.95, 0.35, 0.05), 0.08)
    cv.rect(cx - 1.3 * b, yb - 0.06 * m, cx + 1.3 * b, yb, (0.12, 0.12, 0.12), t, CONE)
    cv.poly(((cx - b, yb - 0.05 * m), (cx + b, yb - 0.05 * m), (cx + tw, yb - h), (cx - tw, yb - h)), orange, t, CONE)
    f0, f1 = 0.45, 0.62
    cv.poly(((cx - b + (b - tw) * f0, yb - f0 * h), (cx + b - (b - tw) * f0, yb - f0 * h),
             (cx + b - (b - tw) * f1, yb - f1 * h), (cx - b + (b - tw) * f1, yb - f1 * h)), (0.92, 0.92, 0.9), t - 0.02, CONE)
    return (cx - 1.3 * b, yb - h, cx + 1.3 * b, yb)


def _car_stop(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, concrete_t: float) -> tuple:
    half, h = rng.uniform(0.6, 0.8) * m, rng.uniform(0.1, 0.16) * m
    col = _jit(rng, (0.9, 0.78, 0.12) if rng.random() < 0.5 else (0.7, 0.7, 0.68), 0.1)
    t = concrete_t + rng.uniform(-0.02, 0.03)
    cv.rect(cx - half, yb - h, cx + half, yb, col, t, CAR_STOP)
    cv.rect(cx - half, yb - h, cx + half, yb - 0.65 * h, tuple(min(1.0, c * 1.15) for c in col), t, CAR_STOP)
    return (cx - half, yb - h, cx + half, yb)


def _lamp(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, metal_t: float, night: bool,
          lateral: float, sky_rows: int, g: _Geometry) -> None:
    top = max(float(sky_rows) + 0.15 * m + 1.0, yb - rng.uniform(6.0, 8.0) * m)
    pw = max(1.0, 0.15 * m)
    col = (0.45, 0.45, 0.47)
    cv.rect(cx - pw / 2, top, cx + pw / 2, yb, col, metal_t, 0)
    toward = -1.0 if lateral > 0 else 1.0
    hx = cx + toward * 1.2 * m
    cv.line(cx, top, hx, top, max(1.0, 0.1 * m), col, metal_t, 0)
    cv.ellipse(hx, top + 0.08 * m, 0.3 * m + 0.5, 0.1 * m + 0.5, (0.8, 0.8, 0.75), metal_t + 0.1, 0)
    if night:
        tint = (1.8, 1.4, 0.8) if rng.random() < 0.6 else (1.6, 1.6, 1.7)
        cv.light(hx, top + 0.1 * m, 0.35 * m + 0.5, 0.15 * m + 0.5, tint)
        cv.ellipse(hx, top + 0.1 * m, 0.2 * m + 0.5, 0.08 * m + 0.5, None, min(1.0, metal_t + 0.45), None)
        cv.pool(hx, yb, 4.0 * m, 1.2 * m + 1.0, rng.uniform(0.35, 0.6))


def _tree(cv: _Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, veg_t: float, sky_rows: int) -> None:
    h = rng.uniform(3.0, 6.0) * m
    crown_r = rng.uniform(1.0, 2.0) * m
    crown_y = max(float(sky_rows) + 1.2 * crown_r, yb - h + crown_r)
    cv.rect(cx - 0.12 * m - 0.5, crown_y, cx + 0.12 * m + 0.5, yb, (0.3, 0.22, 0.15), veg_t + 0.03, 0)
    col = _jit(rng, (0.2, 0.36, 0.15), 0.25)
    for _ in range(3):
        dx, dy = rng.uniform(-0.5, 0.5) * crown_r, rng.uniform(-0.3, 0.3) * crown_r
        cv.ellipse(cx + dx, crown_y + dy, crown_r * rng.uniform(0.6, 0.9), crown_r * rng.uniform(0.5, 0.8),
                   _jit(rng, col, 0.1), veg_t + rng.uniform(-0.02, 0.02), 0)


# ----------------------------------------------------------------------------- image formation


def _finish_visible(cv: _Canvas, rng: np.random.Generator, night: bool, sunny: bool,
                    lowf: np.ndarray, yh: int) -> np.ndarray:
    H, W = cv.h, cv.w
    alb = cv.alb
    # texture: low-frequency colour variation plus a faint fine grain. The clean image is the
    # restoration target and the autoencoder's input: per-pixel randomness in it can be neither
    # predicted from a degraded copy nor kept by a 1/4-resolution latent (a 5% grain capped the
    # autoencoder near 21 dB), so it stays small; sensor noise is one of the degradations.
    grain = rng.standard_normal((H, W), dtype=np.float32)
    tex = 1.0 + 0.08 * lowf + 0.015 * grain
    tex[:yh] = 1.0 + 0.01 * grain[:yh]  # the sky is smooth
    alb *= tex[:, :, None]
    if night:
        ambient = rng.uniform(0.06, 0.14)
        glow = cv2.GaussianBlur(cv.glow, (0, 0), sigmaX=max(1.0, cv.gw / 40))
        glow = cv2.resize(glow, (W, H), interpolation=cv2.INTER_LINEAR)
        illum = ambient + glow
        tint = np.array(_jit(rng, (1.0, 0.85, 0.65), 0.1), np.float32)  # sodium-lamp cast
        img = alb * illum[:, :, None] * tint
    else:
        sun = rng.uniform(0.85, 1.1) if sunny else rng.uniform(0.7, 0.9)
        shade = cv2.GaussianBlur(cv.shade, (0, 0), sigmaX=max(0.5, H / 200)) if sunny else \
            (1.0 + (cv.shade - 1.0) * 0.3)
        img = alb * (sun * shade)[:, :, None]
    if cv.any_emit:
        emit = cv.emit
        bloom = cv2.GaussianBlur(emit, (0, 0), sigmaX=max(1.0, H / 60))
        img = img + emit + 0.6 * bloom
    # optics and sensor
    # optics: a lens blur of about one pixel, as real frames have (MSRS frames lose ~33 dB to a
    # 4x down-up resampling; sharper renderings lose ~22 dB, more detail than a 1/4-resolution
    # latent holds)
    sigma = rng.uniform(0.8, 1.1) * max(1.0, H / 240)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)
    noise_std = rng.uniform(0.001, 0.003) if not night else rng.uniform(0.002, 0.005)
    img += noise_std * rng.standard_normal((H, W, 3), dtype=np.float32)
    np.clip(img, 0.0, 1.0, out=img)
    return (img * 255.0 + 0.5).astype(np.uint8)


def _finish_infrared(cv: _Canvas, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    temp = cv.temp
    nonuni = cv2.resize(rng.standard_normal((max(2, H // 16), max(2, W // 16))).astype(np.float32),
                        (W, H), interpolation=cv2.INTER_CUBIC)
    temp = temp + rng.uniform(0.01, 0.025) * nonuni
    sigma = rng.uniform(0.7, 1.3) * max(1.0, H / 160)
    temp = cv2.GaussianBlur(temp, (0, 0), sigmaX=sigma)
    gain = rng.uniform(0.9, 1.05)
    offset = rng.uniform(-0.03, 0.03)
    ir = (0.05 + 0.9 * temp * gain + offset) * 255.0
    ir += rng.uniform(1.0, 3.0) * rng.standard_normal((H, W), dtype=np.float32)
    ir += rng.uniform(0.5, 1.5) * rng.standard_normal((1, W), dtype=np.float32)  # column fixed-pattern noise
    np.clip(ir, 0.0, 255.0, out=ir)
    return (ir + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- data set writer


def _split_offset(split: str) -> int:
    return (zlib.crc32(split.encode("utf-8")) + 1) << 32


def scene_key(split: str, index: int, time: str | None = None) -> str:
    suffix = "" if time is None else ("N" if time == "night" else "D")
    return f"syn_{split}_{index:06d}{suffix}"


def _encode_png(array: np.ndarray, path: Path) -> bytes:
    img = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - OpenCV failure
        raise DataError(f"{path}: OpenCV could not encode the PNG")
    return buf.tobytes()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file():
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
    write_bytes_atomic(path, data)
    return True


def write_synthetic_dataset(out_dir: str | Path, *, seed: int, splits: Mapping[str, int],
                            height: int = 96, width: int = 128, progress: bool = True) -> dict[str, Any]:
    """Write synthetic scenes in the MSRS layout and `scenes.json`; return a summary.

    `out_dir/{split}/{vi,ir,Segmentation_labels}/{key}.png`; keys `syn_{split}_{i:06d}{D|N}`.
    Split `name` draws scene indices `offset(name) + i`, so splits never share scenes.
    Files already present with identical bytes are left untouched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a directory")
    if not isinstance(splits, Mapping) or not splits:
        raise ConfigError(f"write_synthetic_dataset: splits must be a non-empty mapping, got {splits!r}")
    offsets: dict[int, str] = {}
    for name, n in splits.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"write_synthetic_dataset: bad split name {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"write_synthetic_dataset: split {name!r} count must be an integer >= 0, got {n!r}")
        off = _split_offset(name)
        if off in offsets:
            raise ConfigError(f"write_synthetic_dataset: splits {offsets[off]!r} and {name!r} collide")
        offsets[off] = name
    _validate(seed, 0, height, width)

    total = sum(splits.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"synthetic {width}x{height}", unit="scene")
    scenes: dict[str, dict] = {}
    keys: dict[str, list[str]] = {}
    written = skipped = 0
    try:
        for name, n in splits.items():
            keys[name] = []
            for i in range(n):
                sc = generate_scene(seed, _split_offset(name) + i, height=height, width=width)
                key = scene_key(name, i, sc.meta["time"])
                meta = dict(sc.meta, split=name, key=key)
                for sub, arr in (("vi", sc.visible), ("ir", sc.infrared), ("Segmentation_labels", sc.label)):
                    path = out / name / sub / f"{key}.png"
                    if _write_if_changed(path, _encode_png(arr, path)):
                        written += 1
                    else:
                        skipped += 1
                scenes[key] = meta
                keys[name].append(key)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    index = {
        "generator": "magicfuse.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "height": int(height),
        "width": int(width),
        "splits": {k: int(v) for k, v in splits.items()},
        "classes": list(MFNET_CLASSES),
        "scenes": scenes,
    }
    write_json_atomic(out / "scenes.json", index)
    return {"out_dir": str(out), "splits": dict(index["splits"]), "keys": keys,
            "files_written": written, "files_unchanged": skipped, "scenes_json": str(out / "scenes.json")}
