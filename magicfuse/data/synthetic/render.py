"""`generate_scene(seed, index)`: one deterministic scene, drawn in depth order, then
formed into the visible image (illumination, texture, optics, sensor noise) and the
infrared image (a blurrier, noisier thermal camera)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from magicfuse.data.classes import MFNET_CLASSES
from magicfuse.errors import ConfigError
from magicfuse.data.synthetic.canvas import Canvas, Geometry, jit
from magicfuse.data.synthetic.objects import bump, crosswalk, draw_thing, guardrail, kerb, lane_marks, windows


GENERATOR_VERSION = 1
MIN_SIZE = 16


@dataclass(frozen=True)
class Scene:
    """One aligned triple plus a JSON-able description of how it was made."""

    visible: np.ndarray  # (H, W, 3) uint8 RGB
    infrared: np.ndarray  # (H, W) uint8
    label: np.ndarray  # (H, W) uint8, MFNet ids 0..8
    meta: dict


def validate(seed: int, index: int, height: int, width: int) -> None:
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
    validate(seed, index, height, width)
    rng = np.random.default_rng((int(seed), int(index)))
    H, W = int(height), int(width)
    cv = Canvas(H, W)
    night = bool(rng.random() < 0.4)
    sunny = bool(rng.random() < 0.6)
    horizon = H * rng.uniform(0.30, 0.46)
    vx = W * rng.uniform(0.32, 0.68)
    m1 = min(W, 1.6 * H) * rng.uniform(0.075, 0.12)  # pixels per metre at the bottom row
    g = Geometry(H, W, horizon, vx, m1)
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
        top = np.array(jit(rng, (0.05, 0.06, 0.14), 0.2), np.float32)
        bot = np.array(jit(rng, (0.20, 0.17, 0.22), 0.2), np.float32)
    else:
        top = np.array(jit(rng, (0.30, 0.50, 0.85), 0.15), np.float32) if sunny else \
            np.array(jit(rng, (0.62, 0.66, 0.72), 0.1), np.float32)
        bot = np.array(jit(rng, (0.78, 0.85, 0.92), 0.08), np.float32)
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
                       jit(rng, (0.18, 0.32, 0.14), 0.25), veg_t + rng.uniform(-0.02, 0.02), 0)
        else:
            col = jit(rng, rng.choice([(0.55, 0.52, 0.48), (0.7, 0.68, 0.62), (0.45, 0.42, 0.45),
                                        (0.62, 0.55, 0.45), (0.35, 0.38, 0.42)]), 0.15)
            x0, x1, y0 = x, x + bw, horizon - bh
            cv.rect(x0, y0, x1, horizon + 1, col, bld_t + rng.uniform(-0.02, 0.02), 0)
            windows(cv, rng, x0, y0, x1, horizon, night, bld_t)
        x += bw * rng.uniform(0.7, 1.05)

    # --- ground on both sides, then the road ----------------------------------------------
    side_kind = [str(rng.choice(["sidewalk", "grass"], p=[0.75, 0.25])) for _ in range(2)]
    far, near = 0.0, 1.4
    for k, sign in enumerate((-1.0, 1.0)):
        if side_kind[k] == "sidewalk":
            col, t = jit(rng, (0.58, 0.56, 0.53), 0.1), concrete_t
        else:
            col, t = jit(rng, (0.26, 0.40, 0.18), 0.2), veg_t + 0.03
        edge = g.x(sign * half_road, near)
        outer = -10 * W if sign < 0 else 11 * W
        cv.poly(((g.vx, horizon), (outer, horizon), (outer, g.y(near)), (edge, g.y(near))), col, t, 0)
    road_col = jit(rng, (0.33, 0.33, 0.34), 0.15)
    road_poly = [(g.x(-half_road, far), horizon), (g.x(half_road, far), horizon),
                 (g.x(half_road, near), g.y(near)), (g.x(-half_road, near), g.y(near))]
    cv.poly(road_poly, road_col, road_t, 0)
    z_bottom = rng.uniform(3.0, 5.0)  # metres from camera to the bottom row
    lane_marks(cv, g, rng, half_road, lanes, z_bottom, road_t)
    if rng.random() < 0.15:
        crosswalk(cv, g, rng, half_road, z_bottom, road_t)
    if rng.random() < 0.3:
        z = rng.uniform(z_bottom * 1.1, z_bottom * 6)
        bump(cv, g, rng, half_road, z, z_bottom, road_t)
        objects.append({"class": "bump", "distance_m": round(float(z), 2)})

    # --- kerbs, side facades, guard rails ---------------------------------------------------
    has_rail = [False, False]
    for k, sign in enumerate((-1.0, 1.0)):
        if rng.random() < 0.85:
            kerb(cv, g, rng, sign, half_road, concrete_t)
        if rng.random() < 0.4:
            xb = sign * (half_road + rng.uniform(4.0, 9.0))
            sn = rng.uniform(0.12, 0.4)
            hb = rng.uniform(6.0, 20.0)
            top_far = max(float(sky_rows), horizon - hb * g.m(0.02))
            top_near = max(float(sky_rows), g.y(sn) - hb * g.m(sn))
            col = jit(rng, (0.6, 0.57, 0.52), 0.2)
            cv.poly(((g.x(xb, 0.0), horizon), (g.x(xb, 0.0), top_far), (g.x(xb, sn), top_near),
                     (g.x(xb, sn), g.y(sn))), col, bld_t, 0)
        if rng.random() < 0.35:
            guardrail(cv, g, rng, sign, half_road + rng.uniform(0.3, 0.9), z_bottom, metal_t, night)
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
        rec = draw_thing(cv, g, rng, kind, s, kw, temps, night, sunny, sky_rows)
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


def _finish_visible(cv: Canvas, rng: np.random.Generator, night: bool, sunny: bool,
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
        tint = np.array(jit(rng, (1.0, 0.85, 0.65), 0.1), np.float32)  # sodium-lamp cast
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


def _finish_infrared(cv: Canvas, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
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
