"""Seeded, reproducible degradations of visible images, and paired geometric augmentation.

`degrade(image, rng)` picks one degradation (or, with probability `composite_prob`,
a composite of 2–3) and returns the degraded image and its *recipe*: a list of
`{"name": ..., **exact parameters}` dicts in plain JSON types. Every random quantity
(noise seeds included) is in the recipe, so `apply_recipe(image, recipe)` gives back
the same bytes.

Degradations (applied in this physical order inside a composite):

* `haze` — atmospheric scattering I = J·t + A·(1−t), t = exp(−β·d), with a road-scene
  depth proxy (distance ∝ 1/(y − y_horizon), sky at the far limit), optionally blended
  with a darker-is-farther term, or a depth map given by the caller;
* `rain` — bright slanted streaks over a dimmed scene;
* `low_light` — exposure scaling and colour shift in linear light, Poisson shot noise
  plus Gaussian read noise, quantisation, a little digital gain and a display gamma;
* `over_exposure` — exposure gain in linear light, clipping and highlight bloom;
* `motion_blur` — a straight-line kernel of given length and angle;
* `defocus_blur` — Albumentations `Defocus` (disc kernel);
* `gaussian_noise` — Albumentations `GaussNoise`;
* `jpeg` — Albumentations `ImageCompression`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from magicfuse.errors import ConfigError, DataError  # noqa: E402

Recipe = list[dict[str, Any]]

_SEED_MAX = 2**31 - 1


def _r(x: float, nd: int = 5) -> float:
    return float(round(float(x), nd))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, _SEED_MAX))


def _check_image(image: Any, where: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise DataError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{where}: expected a uint8 H×W×3 RGB image, got {image.dtype} {image.shape}")
    if image.shape[0] < 4 or image.shape[1] < 4:
        raise DataError(f"{where}: image {image.shape[1]}x{image.shape[0]} is too small (minimum 4x4)")
    return image


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _linear(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255.0) ** 2.2


def _A() -> Any:
    """Albumentations, imported on first use (it is slow to import and only some
    degradations and the geometric augmentation need it)."""
    import albumentations

    return albumentations


def _albu(transform: Any, image: np.ndarray, seed: int) -> np.ndarray:
    return _A().Compose([transform], seed=int(seed))(image=image)["image"]


# ----------------------------------------------------------------------------- haze


def road_depth_proxy(height: int, width: int, horizon: float = 0.4, near: float = 0.1) -> np.ndarray:
    """Normalised depth in [0, 1] for a road scene: far (1) at and above the horizon row.

    Below the horizon, distance on a flat ground plane is ∝ 1/(y − y_h); the proxy is
    near/(s + near) with s = (y − y_h)/(H − y_h), rescaled to reach 0 at the bottom row.
    `horizon` is the horizon's row as a fraction of the height.
    """
    yh = horizon * (height - 1)
    y = np.arange(height, dtype=np.float32)
    s = np.clip((y - yh) / max(height - 1 - yh, 1.0), 0.0, 1.0)
    d = near / (s + near)
    d_bottom = near / (1.0 + near)
    d = (d - d_bottom) / (1.0 - d_bottom)
    return np.broadcast_to(d[:, None], (height, width)).astype(np.float32)


def _haze_depth(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None) -> np.ndarray:
    h, w = image.shape[:2]
    if p["depth"] == "given":
        if depth is None:
            raise ConfigError("haze: recipe was made with a caller-supplied depth map; pass depth= again")
        d = np.asarray(depth, np.float32)
        if d.shape != (h, w):
            raise DataError(f"haze: depth map shape {d.shape} does not match image {(h, w)}")
        dmin, dmax = float(d.min()), float(d.max())
        d = (d - dmin) / (dmax - dmin) if dmax > dmin else np.zeros_like(d)
    else:
        d = road_depth_proxy(h, w, p["horizon"])
    lw = float(p["lum_weight"])
    if lw > 0:
        lum = image.astype(np.float32).mean(axis=2) / 255.0
        lum = cv2.GaussianBlur(lum, (0, 0), sigmaX=max(1.0, min(h, w) / 32))
        d = (1.0 - lw) * d + lw * (1.0 - lum)  # darker-is-farther
    return d


def _haze_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    base = rng.uniform(0.72, 0.95)
    tint = rng.uniform(-0.04, 0.04, 3)
    return {
        "beta": _r(rng.uniform(0.6, 2.5)),
        "airlight": [_r(min(1.0, base + t)) for t in tint],
        "horizon": _r(rng.uniform(0.3, 0.5)),
        "lum_weight": _r(rng.uniform(0.0, 0.3)) if rng.random() < 0.5 else 0.0,
        "depth": "given" if depth_given else "proxy",
    }


def _haze_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    d = _haze_depth(image, p, depth)
    t = np.exp(-float(p["beta"]) * d)[:, :, None]
    a = np.asarray(p["airlight"], np.float32)
    j = image.astype(np.float32) / 255.0
    return _to_uint8(j * t + a * (1.0 - t))


# ----------------------------------------------------------------------------- rain


def _rain_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    h = shape[0]
    return {
        "seed": _seed(rng),
        "density": _r(rng.uniform(1.5, 5.0)),  # drops per 1000 pixels
        "length": _r(rng.uniform(0.04, 0.12) * h, 2),  # pixels
        "angle": _r(rng.uniform(-25.0, 25.0), 2),  # degrees from vertical
        "width": int(max(1, round(rng.uniform(0.6, 1.6) * max(1.0, h / 240)))),
        "brightness": _r(rng.uniform(0.75, 0.95)),
        "alpha": _r(rng.uniform(0.5, 0.85)),
        "dim": _r(rng.uniform(0.75, 0.95)),
    }


def _rain_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    h, w = image.shape[:2]
    rng = np.random.default_rng(int(p["seed"]))
    n = max(1, int(round(float(p["density"]) * h * w / 1000.0)))
    length = float(p["length"])
    ang = math.radians(float(p["angle"]))
    dx, dy = length * math.sin(ang), length * math.cos(ang)
    x0 = rng.uniform(-abs(dx), w + abs(dx), n)
    y0 = rng.uniform(-length, h, n)
    scale = rng.uniform(0.5, 1.0, n)  # drops at different distances: shorter streaks
    pts = np.stack([np.stack([x0, y0], 1), np.stack([x0 + dx * scale, y0 + dy * scale], 1)], 1)
    layer = np.zeros((h, w), np.float32)
    cv2.polylines(layer, list(np.round(pts * 16).astype(np.int32)), False, 1.0, int(p["width"]),
                  lineType=cv2.LINE_AA, shift=4)
    layer = cv2.GaussianBlur(layer, (0, 0), sigmaX=0.5)[:, :, None]
    alpha = float(p["alpha"]) * np.clip(layer, 0.0, 1.0)
    img = image.astype(np.float32) / 255.0 * float(p["dim"])
    return _to_uint8(img * (1.0 - alpha) + alpha * float(p["brightness"]))


# ----------------------------------------------------------------------------- exposure


def _low_light_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    exposure = rng.uniform(0.02, 0.12)
    gain = rng.uniform(1.0, min(2.0, 0.15 / exposure))
    return {
        "seed": _seed(rng),
        "exposure": _r(exposure),
        "gains": [_r(rng.uniform(0.85, 1.15)), 1.0, _r(rng.uniform(0.8, 1.2))],
        "full_well": _r(rng.uniform(150.0, 1500.0), 2),  # electrons at full scale
        "read_noise": _r(rng.uniform(0.001, 0.008)),  # std, fraction of full scale
        "bits": int(rng.choice([8, 10, 12])),
        "digital_gain": _r(gain),
        "gamma": _r(rng.uniform(1.9, 2.4)),
    }


def _low_light_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(int(p["seed"]))
    x = _linear(image) * float(p["exposure"]) * np.asarray(p["gains"], np.float32)
    fw = float(p["full_well"])
    electrons = rng.poisson(np.clip(x, 0.0, None) * fw).astype(np.float32)
    x = electrons / fw + float(p["read_noise"]) * rng.standard_normal(x.shape, dtype=np.float32)
    levels = float(2 ** int(p["bits"]) - 1)
    x = np.round(np.clip(x, 0.0, 1.0) * levels) / levels
    x = np.clip(x * float(p["digital_gain"]), 0.0, 1.0)
    return _to_uint8(x ** (1.0 / float(p["gamma"])))


def _over_exposure_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    return {
        "exposure": _r(rng.uniform(2.5, 6.0)),
        "bloom_sigma": _r(rng.uniform(0.01, 0.04) * min(shape[0], shape[1]), 3),
        "bloom_strength": _r(rng.uniform(0.1, 0.5)),
        "gains": [_r(rng.uniform(0.95, 1.1)), 1.0, _r(rng.uniform(0.9, 1.05))],
    }


def _over_exposure_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    x = _linear(image) * float(p["exposure"]) * np.asarray(p["gains"], np.float32)
    excess = np.clip(x - 1.0, 0.0, None)
    sigma = max(0.5, float(p["bloom_sigma"]))
    bloom = cv2.GaussianBlur(excess, (0, 0), sigmaX=sigma)
    x = np.clip(x, 0.0, 1.0) + float(p["bloom_strength"]) * bloom
    return _to_uint8(np.clip(x, 0.0, 1.0) ** (1.0 / 2.2))


# ----------------------------------------------------------------------------- blur, noise, jpeg


def _motion_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    hi = max(5.0, 0.06 * min(shape[0], shape[1]))
    return {"length": _r(rng.uniform(3.0, hi), 2), "angle": _r(rng.uniform(0.0, 180.0), 2)}


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised line kernel of `length` pixels at `angle` degrees (0 = horizontal)."""
    size = int(math.ceil(length)) | 1
    ss = 8
    big = np.zeros((size * ss, size * ss), np.float32)
    c = (size * ss - 1) / 2.0
    a = math.radians(angle)
    dx, dy = (length * ss - ss) / 2.0 * math.cos(a), -(length * ss - ss) / 2.0 * math.sin(a)
    p0 = (int(round((c - dx) * 16)), int(round((c - dy) * 16)))
    p1 = (int(round((c + dx) * 16)), int(round((c + dy) * 16)))
    cv2.line(big, p0, p1, 1.0, ss, lineType=cv2.LINE_AA, shift=4)
    k = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    total = float(k.sum())
    if total <= 0:  # pragma: no cover - degenerate
        k[size // 2, size // 2] = 1.0
        total = 1.0
    return k / total


def _motion_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    k = motion_kernel(float(p["length"]), float(p["angle"]))
    out = cv2.filter2D(image.astype(np.float32), -1, k, borderType=cv2.BORDER_REFLECT_101)
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def _defocus_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    hi = max(3, int(round(min(shape[0], shape[1]) / 40)))
    return {"radius": int(rng.integers(2, hi + 1)), "alias_blur": _r(rng.uniform(0.1, 0.5), 3)}


def _defocus_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    r, a = int(p["radius"]), float(p["alias_blur"])
    return _albu(_A().Defocus(radius=(r, r), alias_blur=(a, a), p=1.0), image, 0)


def _noise_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    return {"seed": _seed(rng), "std": _r(rng.uniform(0.04, 0.12)), "per_channel": bool(rng.random() < 0.7)}


def _noise_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    s = float(p["std"])
    t = _A().GaussNoise(std_range=(s, s), mean_range=(0.0, 0.0), per_channel=bool(p["per_channel"]), p=1.0)
    return _albu(t, image, int(p["seed"]))


def _jpeg_sample(rng: np.random.Generator, shape: tuple[int, ...], depth_given: bool) -> dict[str, Any]:
    return {"quality": int(rng.integers(8, 41))}


def _jpeg_apply(image: np.ndarray, p: Mapping[str, Any], depth: np.ndarray | None = None) -> np.ndarray:
    q = int(p["quality"])
    return _albu(_A().ImageCompression(compression_type="jpeg", quality_range=(q, q), p=1.0), image, 0)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Degradation:
    name: str
    sample: Callable[[np.random.Generator, tuple[int, ...], bool], dict[str, Any]]
    apply: Callable[..., np.ndarray]
    params: tuple[str, ...]  # the keys a recipe step must carry
    description: str


DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in (
        Degradation("haze", _haze_sample, _haze_apply, ("beta", "airlight", "horizon", "lum_weight", "depth"),
                    "atmospheric scattering with a road-scene depth proxy"),
        Degradation("rain", _rain_sample, _rain_apply,
                    ("seed", "density", "length", "angle", "width", "brightness", "alpha", "dim"),
                    "slanted bright rain streaks over a dimmed scene"),
        Degradation("low_light", _low_light_sample, _low_light_apply,
                    ("seed", "exposure", "gains", "full_well", "read_noise", "bits", "digital_gain", "gamma"),
                    "under-exposure with shot/read noise and quantisation"),
        Degradation("over_exposure", _over_exposure_sample, _over_exposure_apply,
                    ("exposure", "bloom_sigma", "bloom_strength", "gains"), "over-exposure with clipping and bloom"),
        Degradation("motion_blur", _motion_sample, _motion_apply, ("length", "angle"), "linear motion blur"),
        Degradation("defocus_blur", _defocus_sample, _defocus_apply, ("radius", "alias_blur"), "disc defocus blur"),
        Degradation("gaussian_noise", _noise_sample, _noise_apply, ("seed", "std", "per_channel"),
                    "additive Gaussian noise"),
        Degradation("jpeg", _jpeg_sample, _jpeg_apply, ("quality",), "JPEG compression artefacts"),
    )
}
ALL_KINDS: tuple[str, ...] = tuple(DEGRADATIONS)
_ORDER = {name: i for i, name in enumerate(ALL_KINDS)}
_CONFLICTS = ({"low_light", "over_exposure"}, {"motion_blur", "defocus_blur"})


def _check_kinds(kinds: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if kinds is None:
        return ALL_KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    out = tuple(kinds)
    if not out:
        raise ConfigError(f"{where}: kinds is empty; choose from {list(ALL_KINDS)}")
    unknown = [k for k in out if k not in DEGRADATIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown degradation(s) {unknown}; known: {list(ALL_KINDS)}")
    return tuple(dict.fromkeys(out))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise ConfigError(f"degrade: rng must be a numpy Generator or an integer seed >= 0, got {rng!r}")


def _pick(rng: np.random.Generator, kinds: tuple[str, ...], composite_prob: float, max_composite: int) -> list[str]:
    if len(kinds) >= 2 and max_composite >= 2 and rng.random() < composite_prob:
        n = 2 if max_composite == 2 or rng.random() < 0.6 else 3
        for _ in range(20):
            chosen = [str(k) for k in rng.choice(kinds, size=min(n, len(kinds)), replace=False)]
            if not any(c <= set(chosen) for c in _CONFLICTS):
                return sorted(chosen, key=_ORDER.__getitem__)
    return [str(kinds[int(rng.integers(len(kinds)))])]


def degrade(image: np.ndarray, rng: np.random.Generator | int, *, kinds: Sequence[str] | None = None,
            composite_prob: float = 0.3, max_composite: int = 3,
            depth: np.ndarray | None = None) -> tuple[np.ndarray, Recipe]:
    """Degrade a uint8 RGB image; return `(degraded, recipe)`.

    One degradation from `kinds` (default all of `DEGRADATIONS`), or with probability
    `composite_prob` a composite of 2–`max_composite` distinct ones in physical order.
    `depth` (H×W, larger = farther) replaces the haze depth proxy.
    """
    image = _check_image(image, "degrade")
    kinds_t = _check_kinds(kinds, "degrade")
    if not 0.0 <= float(composite_prob) <= 1.0:
        raise ConfigError(f"degrade: composite_prob must be in [0, 1], got {composite_prob!r}")
    gen = _as_rng(rng)
    names = _pick(gen, kinds_t, float(composite_prob), int(max_composite))
    recipe: Recipe = []
    out = image
    for name in names:
        d = DEGRADATIONS[name]
        step = {"name": name, **d.sample(gen, image.shape, depth is not None)}
        out = d.apply(out, step, depth)
        recipe.append(step)
    return out, recipe


def apply_recipe(image: np.ndarray, recipe: Sequence[Mapping[str, Any]], *,
                 depth: np.ndarray | None = None) -> np.ndarray:
    """Re-apply a recipe from `degrade`; gives the same bytes for the same input image."""
    image = _check_image(image, "apply_recipe")
    if isinstance(recipe, Mapping) or not isinstance(recipe, Sequence):
        raise ConfigError(f"apply_recipe: recipe must be a list of steps, got {type(recipe).__name__}")
    out = image
    for i, step in enumerate(recipe):
        if not isinstance(step, Mapping) or "name" not in step:
            raise ConfigError(f"apply_recipe: step {i} must be a mapping with a 'name', got {step!r}")
        name = step["name"]
        if name not in DEGRADATIONS:
            raise ConfigError(f"apply_recipe: step {i}: unknown degradation {name!r}; known: {list(ALL_KINDS)}")
        d = DEGRADATIONS[name]
        missing = [k for k in d.params if k not in step]
        extra = sorted(set(step) - set(d.params) - {"name"})
        if missing or extra:
            raise ConfigError(f"apply_recipe: step {i} ({name}): missing {missing}, unexpected {extra}")
        out = d.apply(out, step, depth)
    return out


@dataclass(frozen=True)
class DegradationConfig:
    """Which degradations to draw from and how often to compose them (params.yaml section)."""

    kinds: tuple[str, ...] = ALL_KINDS
    composite_prob: float = 0.3
    max_composite: int = 3

    def __post_init__(self) -> None:
        _check_kinds(self.kinds, "DegradationConfig.kinds")
        if not 0.0 <= float(self.composite_prob) <= 1.0:
            raise ConfigError(f"DegradationConfig.composite_prob must be in [0, 1], got {self.composite_prob!r}")
        if self.max_composite not in (1, 2, 3):
            raise ConfigError(f"DegradationConfig.max_composite must be 1, 2 or 3, got {self.max_composite!r}")


def degrade_with_config(image: np.ndarray, rng: np.random.Generator | int, cfg: DegradationConfig, *,
                        depth: np.ndarray | None = None) -> tuple[np.ndarray, Recipe]:
    return degrade(image, rng, kinds=cfg.kinds, composite_prob=cfg.composite_prob,
                   max_composite=cfg.max_composite, depth=depth)


# ----------------------------------------------------------------------------- geometry


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def augment_geometry(seed: int, visible: np.ndarray, infrared: np.ndarray | None, label: np.ndarray | None, *,
                     crop: tuple[int, int] | None = None, hflip_prob: float = 0.5,
                     scale_range: tuple[float, float] = (1.0, 1.0), rotate_limit: float = 0.0,
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """Apply one random geometry to visible, infrared and label alike.

    Horizontal flip with `hflip_prob`; optional scale/rotation (`scale_range`, ±`rotate_limit`
    degrees; bilinear for images, nearest for labels); optional random crop `(height, width)`,
    padding first when the image is smaller. Padding is 0 in the images and 255 (ignore) in
    the label. Returns the three arrays (None stays None) and a JSON-able record.
    """
    _check_image(visible, "augment_geometry: visible")
    h, w = visible.shape[:2]
    if infrared is not None and (infrared.dtype != np.uint8 or infrared.shape != (h, w)):
        raise DataError(f"augment_geometry: infrared must be uint8 {(h, w)}, got {infrared.dtype} {infrared.shape}")
    if label is not None and (label.dtype != np.uint8 or label.shape != (h, w)):
        raise DataError(f"augment_geometry: label must be uint8 {(h, w)}, got {label.dtype} {label.shape}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"augment_geometry: seed must be an integer >= 0, got {seed!r}")
    if not 0.0 <= hflip_prob <= 1.0:
        raise ConfigError(f"augment_geometry: hflip_prob must be in [0, 1], got {hflip_prob!r}")
    A = _A()
    transforms: list[Any] = [A.HorizontalFlip(p=float(hflip_prob))]
    s0, s1 = float(scale_range[0]), float(scale_range[1])
    if not 0 < s0 <= s1:
        raise ConfigError(f"augment_geometry: scale_range must be 0 < lo <= hi, got {scale_range!r}")
    if (s0, s1) != (1.0, 1.0) or rotate_limit:
        transforms.append(A.Affine(scale=(s0, s1), rotate=(-float(rotate_limit), float(rotate_limit)),
                                   interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                                   border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255, p=1.0))
    if crop is not None:
        ch, cw = int(crop[0]), int(crop[1])
        if ch <= 0 or cw <= 0:
            raise ConfigError(f"augment_geometry: crop must be positive (height, width), got {crop!r}")
        transforms += [A.PadIfNeeded(min_height=ch, min_width=cw, position="center",
                                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255, p=1.0),
                       A.RandomCrop(height=ch, width=cw, p=1.0)]
    targets = {"infrared": "image"} if infrared is not None else {}
    comp = A.Compose(transforms, additional_targets=targets, seed=int(seed), save_applied_params=True)
    kwargs: dict[str, Any] = {"image": visible}
    if infrared is not None:
        kwargs["infrared"] = infrared
    if label is not None:
        kwargs["mask"] = label
    res = comp(**kwargs)
    applied = [{"name": name, **_plain({k: v for k, v in params.items() if k != "shape"})}
               for name, params in res.get("applied_transforms", [])]
    record = {
        "seed": int(seed),
        "input_size": [int(h), int(w)],
        "crop": None if crop is None else [int(crop[0]), int(crop[1])],
        "hflip": any(a["name"] == "HorizontalFlip" for a in applied),
        "transforms": applied,
    }
    ir_out = res["infrared"] if infrared is not None else None
    lab_out = res["mask"] if label is not None else None
    return res["image"], ir_out, lab_out, record


__all__ = [
    "ALL_KINDS", "DEGRADATIONS", "Degradation", "DegradationConfig", "Recipe", "apply_recipe", "augment_geometry",
    "degrade", "degrade_with_config", "motion_kernel", "road_depth_proxy",
]
