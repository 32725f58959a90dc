"""The things a synthetic scene is made of, drawn into a `Canvas`: buildings' windows, lane
marks, crossings, bumps, kerbs, guard rails, cars, people, bikes, cones, parking blocks,
lamps and trees, each with its colour, temperature and class."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from magicfuse.data.synthetic.canvas import (
    BIKE,
    BUMP,
    CAR,
    CAR_COLOURS,
    CAR_STOP,
    CONE,
    CURVE,
    GUARDRAIL,
    PERSON,
    SKIN,
    Canvas,
    Geometry,
    c3,
    clamp01,
    jit,
)


def windows(cv: Canvas, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
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
        region[win & lit] = c3(jit(rng, (0.85, 0.7, 0.4), 0.1))
        cv.any_emit = True
        cv.temp[iy0:iy1, ix0:ix1][win & lit] = bld_t + 0.05
    cv.alb[iy0:iy1, ix0:ix1][win] = c3(jit(rng, (0.18, 0.22, 0.28), 0.2))


def lane_marks(cv: Canvas, g: Geometry, rng: np.random.Generator, half_road: float, lanes: int,
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


def crosswalk(cv: Canvas, g: Geometry, rng: np.random.Generator, half_road: float, z_bottom: float,
               road_t: float) -> None:
    z = rng.uniform(z_bottom * 1.5, z_bottom * 5)
    s0, s1 = g.s_at_distance(z, z_bottom), g.s_at_distance(z + 3.0, z_bottom)
    lat = -half_road + 0.3
    while lat < half_road - 0.6:
        cv.poly(((g.x(lat, s0), g.y(s0)), (g.x(lat + 0.45, s0), g.y(s0)),
                 (g.x(lat + 0.45, s1), g.y(s1)), (g.x(lat, s1), g.y(s1))), (0.85, 0.85, 0.83), road_t - 0.04, 0)
        lat += 0.9


def bump(cv: Canvas, g: Geometry, rng: np.random.Generator, half_road: float, z: float, z_bottom: float,
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
    yellow = jit(rng, (0.9, 0.75, 0.1), 0.1)
    while lat < half_road:
        l1 = min(lat + stripe, half_road)
        cv.poly(((g.x(lat, s0), g.y(s0)), (g.x(l1, s0), g.y(s0)),
                 (g.x(l1, s1), g.y(s1) - lift), (g.x(lat, s1), g.y(s1) - lift)), yellow, t, BUMP)
        lat += 2 * stripe


def kerb(cv: Canvas, g: Geometry, rng: np.random.Generator, sign: float, half_road: float,
          concrete_t: float) -> None:
    height, top = rng.uniform(0.12, 0.2), rng.uniform(0.15, 0.3)
    a, b = sign * half_road, sign * (half_road + top)
    sf, sn = 0.0, 1.4
    face = jit(rng, (0.62, 0.62, 0.6), 0.12)
    t = concrete_t + rng.uniform(-0.02, 0.02)
    cv.poly(((g.x(a, sf), g.y(sf)), (g.x(a, sn), g.y(sn)), (g.x(a, sn), g.y(sn) - height * g.m(sn)),
             (g.x(b, sn), g.y(sn) - height * g.m(sn)), (g.x(b, sf), g.y(sf))), face, t, CURVE)
    upper = tuple(min(1.0, c * 1.15) for c in face)
    cv.poly(((g.x(a, sf), g.y(sf)), (g.x(a, sn), g.y(sn) - height * g.m(sn)),
             (g.x(b, sn), g.y(sn) - height * g.m(sn)), (g.x(b, sf), g.y(sf))), upper, t + 0.01, CURVE)


def guardrail(cv: Canvas, g: Geometry, rng: np.random.Generator, sign: float, lat: float,
               z_bottom: float, metal_t: float, night: bool) -> None:
    lat = sign * lat
    sf, sn = 0.0, 1.4
    lo, hi = rng.uniform(0.4, 0.5), rng.uniform(0.75, 0.85)
    col = jit(rng, (0.78, 0.78, 0.76) if rng.random() < 0.7 else (0.85, 0.8, 0.3), 0.08)
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


def draw_thing(cv: Canvas, g: Geometry, rng: np.random.Generator, kind: str, s: float,
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
            "body": clamp01(base + rng.uniform(0.12, 0.2)) if moving else clamp01(amb + rng.uniform(-0.04, 0.02)),
            # glass reflects the cold sky; a running car's heated cabin warms it
            "glass": clamp01(base + rng.uniform(0.0, 0.06)) if moving else clamp01(amb - rng.uniform(0.02, 0.06)),
            "tyre": clamp01(rng.uniform(0.78, 0.88)) if moving else clamp01(amb + rng.uniform(-0.03, 0.01)),
            "engine": clamp01(rng.uniform(0.85, 0.95)) if moving else clamp01(amb + 0.02),
            "exhaust": clamp01(rng.uniform(0.9, 1.0)) if moving else clamp01(amb),
            "lamp": clamp01(amb + 0.25) if (moving and night) else clamp01(amb),
        }
        col = jit(rng, CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))], 0.08)
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


def _car_front_rear(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, col: Any,
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


def _car_side(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, col: Any,
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


def _person(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, amb: float,
            sun: bool) -> tuple:
    ht = rng.uniform(1.5, 1.9) * m
    if sun:
        cv.shadow(cx + 0.2 * m, yb, 0.4 * m + 0.5, 0.12 * m + 0.5, 0.5)
    skin = SKIN[int(rng.integers(len(SKIN)))]
    top_col = jit(rng, rng.uniform(0.05, 0.9, 3), 0.1)
    leg_col = jit(rng, rng.choice([(0.1, 0.12, 0.25), (0.15, 0.15, 0.15), (0.5, 0.45, 0.35), (0.3, 0.3, 0.35)]), 0.15)
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
        cv.ellipse(cx, sh_y - hr * 1.6, hr * 0.85, hr * 0.5, jit(rng, (0.1, 0.08, 0.06), 0.3), t_cloth, PERSON)
    return (cx - sw - 0.12 * ht, sh_y - 2.2 * hr, cx + sw + 0.12 * ht, yb)


def _bike(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, metal_t: float, amb: float,
          facing: float, rider: bool, sun: bool) -> tuple:
    r = 0.34 * m
    base = 1.05 * m
    wa, wb = cx - base / 2, cx + base / 2
    th = max(1.0, 0.06 * m)
    frame_col = jit(rng, rng.uniform(0.1, 0.9, 3), 0.1)
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
        cloth = jit(rng, rng.uniform(0.05, 0.9, 3), 0.1)
        t_c, t_s = rng.uniform(0.74, 0.84), rng.uniform(0.86, 0.95)
        lw = max(1.0, 0.1 * ht)
        hip = (seat[0], seat[1] - 0.03 * m)
        sh = (hip[0] + facing * 0.18 * ht, hip[1] - 0.32 * ht)
        cv.line(hip[0], hip[1], crank[0] + facing * 0.08 * m, crank[1] + 0.1 * m, lw, jit(rng, (0.15, 0.15, 0.2), 0.2), t_c - 0.03, PERSON)
        cv.line(hip[0], hip[1], sh[0], sh[1], max(1.0, 0.2 * ht), cloth, t_c, PERSON)
        cv.line(sh[0], sh[1], bar[0], bar[1], max(1.0, 0.06 * ht), cloth, t_c, PERSON)
        hr = 0.065 * ht
        cv.ellipse(sh[0] + facing * 0.02 * ht, sh[1] - 1.3 * hr, hr * 0.85, hr, SKIN[int(rng.integers(len(SKIN)))], t_s, PERSON)
        top = sh[1] - 2.4 * hr
    return (wa - r, top, wb + r, yb)


def _cone(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, amb: float) -> tuple:
    h = rng.uniform(0.5, 0.75) * m
    b, tw = 0.2 * m, 0.04 * m
    t = amb - 0.02
    orange = jit(rng, (0.95, 0.35, 0.05), 0.08)
    cv.rect(cx - 1.3 * b, yb - 0.06 * m, cx + 1.3 * b, yb, (0.12, 0.12, 0.12), t, CONE)
    cv.poly(((cx - b, yb - 0.05 * m), (cx + b, yb - 0.05 * m), (cx + tw, yb - h), (cx - tw, yb - h)), orange, t, CONE)
    f0, f1 = 0.45, 0.62
    cv.poly(((cx - b + (b - tw) * f0, yb - f0 * h), (cx + b - (b - tw) * f0, yb - f0 * h),
             (cx + b - (b - tw) * f1, yb - f1 * h), (cx - b + (b - tw) * f1, yb - f1 * h)), (0.92, 0.92, 0.9), t - 0.02, CONE)
    return (cx - 1.3 * b, yb - h, cx + 1.3 * b, yb)


def _car_stop(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, concrete_t: float) -> tuple:
    half, h = rng.uniform(0.6, 0.8) * m, rng.uniform(0.1, 0.16) * m
    col = jit(rng, (0.9, 0.78, 0.12) if rng.random() < 0.5 else (0.7, 0.7, 0.68), 0.1)
    t = concrete_t + rng.uniform(-0.02, 0.03)
    cv.rect(cx - half, yb - h, cx + half, yb, col, t, CAR_STOP)
    cv.rect(cx - half, yb - h, cx + half, yb - 0.65 * h, tuple(min(1.0, c * 1.15) for c in col), t, CAR_STOP)
    return (cx - half, yb - h, cx + half, yb)


def _lamp(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, metal_t: float, night: bool,
          lateral: float, sky_rows: int, g: Geometry) -> None:
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


def _tree(cv: Canvas, rng: np.random.Generator, cx: float, yb: float, m: float, veg_t: float, sky_rows: int) -> None:
    h = rng.uniform(3.0, 6.0) * m
    crown_r = rng.uniform(1.0, 2.0) * m
    crown_y = max(float(sky_rows) + 1.2 * crown_r, yb - h + crown_r)
    cv.rect(cx - 0.12 * m - 0.5, crown_y, cx + 0.12 * m + 0.5, yb, (0.3, 0.22, 0.15), veg_t + 0.03, 0)
    col = jit(rng, (0.2, 0.36, 0.15), 0.25)
    for _ in range(3):
        dx, dy = rng.uniform(-0.5, 0.5) * crown_r, rng.uniform(-0.3, 0.3) * crown_r
        cv.ellipse(cx + dx, crown_y + dy, crown_r * rng.uniform(0.6, 0.9), crown_r * rng.uniform(0.5, 0.8),
                   jit(rng, col, 0.1), veg_t + rng.uniform(-0.02, 0.02), 0)
