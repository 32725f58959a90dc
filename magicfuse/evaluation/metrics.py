"""Fusion metrics, exactly as ``../shared/docs/METRICS.md`` defines them.

The reference convention is the MATLAB evaluation code of Jiayi Ma's group
(``Linfeng-Tang/Image-Fusion``, ``General Evaluation Metric/Evaluation``), which is
what the MagicFuse paper's numbers come from:

* A = infrared, B = visible, F = fused; all uint8 and the same size. Colour images
  are turned to grey with MATLAB ``rgb2gray`` (rounded weighted sum, see `rgb2gray`).
* EN and MI use the uint8 integers; PSNR and MSE use the images divided by 255 with a
  peak of 255 (so PSNR is about 60); every other metric uses double values 0-255.
* MI is in bits, 256 bins, with the uint8 saturation quirk of ``Hab.m`` (grey levels
  254 and 255 share one bin of the *joint* histogram only).
* SSIM = 1/2 ssim(F,A) + 1/2 ssim(F,B) with MATLAB's built-in ``ssim`` on double
  0-255 data: DynamicRange 1 (C1 = 1e-4, C2 = 9e-4), 11x11 Gaussian window with
  sigma 1.5, replicate border, mean of the full map.
* Qabf: Xydeas-Petrovic (``analysis_Qabf.m``) including its "G = gF where gA == gF"
  quirk. Nabf: Shreyamsha Kumar's modified artefact measure (``analysis_nabf.m``),
  in the correct argument order (fused, IR, VIS) by default.

Other published conventions are available only as *named* options of
`MetricConventions` (never mixed in silently):

* ``ssim``: ``"mean"`` (reference), ``"sum"`` (CDDFuse/VIFB style sum of the two
  scores, same window and constants), ``"l255"`` (mean, constants from L = 255).
* ``mi``: ``"bits"`` (reference, with the quirk), ``"bits-no-quirk"`` (plain 256x256
  joint histogram), ``"nats"`` (no quirk, natural log: what ``sklearn``'s
  ``mutual_info_score`` gives, = bits-no-quirk * ln 2).
* ``psnr``: ``"reference"`` (images /255, peak 255; MSE reported on the /255 scale),
  ``"plain"`` (0-255 images, peak 255; MSE on 0-255), ``"maxF"`` (CDDFuse: 0-255
  images, peak max(F); MSE on 0-255).
* ``nabf_order``: ``"correct"`` = analysis_nabf(F, IR, VIS); ``"driver"`` =
  analysis_nabf(IR, VIS, F), as ``analysis_Reference.m`` calls it.
* ``ag``: ``"matlab"`` (divide by (rows-1)(cols-1)) or ``"cddfuse"`` (rows*cols).

Implementation: numpy float64 on CPU over (N, H, W) stacks of same-size images, processed
`chunk` images at a time; the separable Gaussian filters run plane by plane through
OpenCV's double-precision ``sepFilter2D``; histograms via ``bincount``; the logistic
sigmoids of Qabf via torch's vectorised kernel (in place on the numpy buffers). The hot
element-wise code works in place (few temporaries). Intermediate results are shared
between metrics: grey-level histograms (EN and MI), the Gaussian moments of F (both SSIM
terms), the squared maps (SSIM and VIF), the Sobel responses and magnitudes (Qabf and
Nabf differ only on the one-pixel border: Nabf's magnitude is Qabf's / 8 inside). Nabf's
orientations are computed only where they count (gF > gA and gF > gB). On glibc, the
heap trim threshold is raised to the working set (see `_keep_heap`): without it about
half the CPU time goes to page-faulting freshly returned memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import cv2
import numpy as np
import torch

from magicfuse.errors import ConfigError, DataError

__all__ = [
    "ALL",
    "METRIC_NAMES",
    "MetricConventions",
    "CONVENTION_PRESETS",
    "resolve_conventions",
    "parse_metric_names",
    "rgb2gray",
    "as_gray_uint8",
    "compute_metrics",
    "compute_metrics_batch",
]

METRIC_NAMES: tuple[str, ...] = (
    "EN", "SD", "SF", "AG", "MI", "SSIM", "Qabf", "PSNR", "MSE", "VIF", "SCD", "CC", "Nabf",
)
ALL = METRIC_NAMES

# MATLAB rgb2gray coefficients (the rows of inv of the NTSC matrix, as MATLAB prints them).
RGB2GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)



@dataclass(frozen=True)
class MetricConventions:
    """Which published convention each metric follows. Defaults = the reference (METRICS.md)."""

    ssim: Literal["mean", "sum", "l255"] = "mean"
    mi: Literal["bits", "nats", "bits-no-quirk"] = "bits"
    psnr: Literal["reference", "plain", "maxF"] = "reference"
    nabf_order: Literal["correct", "driver"] = "correct"
    ag: Literal["matlab", "cddfuse"] = "matlab"

    def __post_init__(self) -> None:
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"metric convention {name}={value!r} is not one of {list(allowed)}")


_ALLOWED: dict[str, tuple[str, ...]] = {
    "ssim": ("mean", "sum", "l255"),
    "mi": ("bits", "nats", "bits-no-quirk"),
    "psnr": ("reference", "plain", "maxF"),
    "nabf_order": ("correct", "driver"),
    "ag": ("matlab", "cddfuse"),
}

CONVENTION_PRESETS: dict[str, MetricConventions] = {"reference": MetricConventions()}


def resolve_conventions(
    conventions: str | MetricConventions | Mapping[str, Any] = "reference", **overrides: Any
) -> MetricConventions:
    """A `MetricConventions` from a preset name / instance / mapping, plus named overrides.

    Overrides whose value is None are ignored (so CLI flags left unset keep the preset).
    """
    if isinstance(conventions, MetricConventions):
        base = conventions
    elif isinstance(conventions, str):
        if conventions not in CONVENTION_PRESETS:
            raise ConfigError(
                f"unknown metric conventions preset {conventions!r}; known: {sorted(CONVENTION_PRESETS)}"
            )
        base = CONVENTION_PRESETS[conventions]
    elif isinstance(conventions, Mapping):
        overrides = {**dict(conventions), **overrides}
        base = MetricConventions()
    else:
        raise ConfigError(f"metric conventions must be a preset name or mapping, got {conventions!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(_ALLOWED))
    if unknown:
        raise ConfigError(f"unknown metric convention option(s) {unknown}; allowed: {sorted(_ALLOWED)}")
    return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------- input


def rgb2gray(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of a uint8 (..., 3) RGB array: round(0.2989 R + 0.5870 G + 0.1140 B)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise DataError(f"rgb2gray needs a uint8 (..., 3) array, got {rgb.dtype} {rgb.shape}")
    x = rgb.astype(np.float64)
    g = x[..., 0] * RGB2GRAY_WEIGHTS[0] + x[..., 1] * RGB2GRAY_WEIGHTS[1] + x[..., 2] * RGB2GRAY_WEIGHTS[2]
    # MATLAB's conversion to uint8 rounds half away from zero (values are >= 0).
    return np.clip(np.floor(g + 0.5), 0, 255).astype(np.uint8)


def as_gray_uint8(image: Any, name: str = "image", *, batched: bool = False) -> np.ndarray:
    """Check a uint8 grey (H, W) / RGB (H, W, 3) image (or an (N, ...) stack) and return grey uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"{name}: fusion metrics need uint8 images, got dtype {arr.dtype}")
    grey_ndim = 3 if batched else 2
    if arr.ndim == grey_ndim + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == grey_ndim + 1 and arr.shape[-1] == 3:
        arr = rgb2gray(arr)
    elif arr.ndim == grey_ndim + 1 and arr.shape[-1] == 4:
        raise DataError(f"{name}: RGBA images are not scored; drop the alpha channel first (shape {arr.shape})")
    if arr.ndim != grey_ndim:
        want = "(N, H, W) or (N, H, W, 3)" if batched else "(H, W) or (H, W, 3)"
        raise DataError(f"{name}: expected a {want} uint8 array, got shape {arr.shape}")
    if min(arr.shape[-2:]) < 2:
        raise DataError(f"{name}: image of size {arr.shape[-2:]} is too small to score")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- allocator

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX = 32 * 1024 * 1024  # glibc's own ceiling for its dynamic mmap threshold (64-bit)
_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.gnu_get_libc_version  # noqa: B018 -- glibc only (not musl)
                _libc = lib
            except (OSError, AttributeError):
                _libc = False
    return _libc


_heap_kept = 0  # the largest trim threshold set so far (never lowered)


def _keep_heap(nbytes: int) -> None:
    """Stop glibc from handing the metrics' working set back to the kernel after each map.

    The metrics churn through many short-lived 2-3 MB float64 maps (~50 live at the peak
    for a 640x480 image). With glibc's default trimming, freed heap goes back to the kernel
    and every new map is page-faulted and zeroed again: about half the CPU time of an image,
    all of it system time. Raising the trim threshold to the working set (and pinning the
    mmap threshold at glibc's own dynamic ceiling, 32 MiB) keeps that memory in the process
    for reuse, as caching allocators do: the resident size after a call stays at the
    call's peak (~150 MB per 640x480 image in a chunk) instead of dropping back. The
    threshold is only ever raised. A no-op where the C library is not glibc.
    """
    global _heap_kept
    if nbytes <= _heap_kept:
        return
    lib = _glibc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
        lib.mallopt(_M_TRIM_THRESHOLD, int(min(nbytes, 2**31 - 1)))
    _heap_kept = nbytes


# --------------------------------------------------------------------------- filters


def _gauss1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian; the outer product equals MATLAB fspecial('gaussian')."""
    r = (size - 1) / 2.0
    w = np.exp(-((np.arange(size) - r) ** 2) / (2.0 * sigma * sigma))
    return w / w.sum()


def _sep_filter(x: np.ndarray, w: np.ndarray, border: int) -> np.ndarray:
    """Separable filtering of every (H, W) plane of `x`, 'same' size, with an OpenCV border.

    Double precision throughout (OpenCV's SIMD separable filter: ~20x faster than float64
    torch ``conv2d``, which has no fast CPU kernel for double).
    """
    src = np.ascontiguousarray(x, dtype=np.float64).reshape(-1, x.shape[-2], x.shape[-1])
    out = np.empty_like(src)
    for i in range(src.shape[0]):
        cv2.sepFilter2D(src[i], cv2.CV_64F, w, w, dst=out[i], borderType=border)
    return out.reshape(x.shape)


def _filter_valid(x: np.ndarray, w: np.ndarray, step: int = 1) -> np.ndarray:
    """MATLAB filter2(w w^T, x, 'valid') of every plane, optionally subsampled by `step`."""
    n = len(w)
    r = n // 2
    if x.shape[-2] < n or x.shape[-1] < n:  # MATLAB: an empty result (sums over it are 0)
        return np.zeros((*x.shape[:-2], max(0, -(-(x.shape[-2] - n + 1) // step)),
                         max(0, -(-(x.shape[-1] - n + 1) // step))))
    y = _sep_filter(x, w, cv2.BORDER_REFLECT_101)
    return y[..., r : x.shape[-2] - r : step, r : x.shape[-1] - r : step]


_SSIM_W = _gauss1d(11, 1.5)


# --------------------------------------------------------------------------- pieces


def _sum2(x: np.ndarray) -> np.ndarray:
    """Per-image sum of an (N, H, W) stack."""
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _entropy_from_counts(counts: np.ndarray, total: float, log: Any = np.log2) -> np.ndarray:
    p = counts / float(total)
    terms = np.zeros_like(p)
    nz = p > 0
    terms[nz] = p[nz] * log(p[nz])
    return -terms.sum(axis=-1)


def _corr2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MATLAB corr2 per image of (N, H, W) stacks (NaN where either is constant)."""
    xc = x - x.mean(axis=(-2, -1), keepdims=True)
    yc = y - y.mean(axis=(-2, -1), keepdims=True)
    num = _sum2(xc * yc)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / np.sqrt(_sum2(xc * xc) * _sum2(yc * yc))


def _sobel_valid(xp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left - right, below - above) Sobel responses of a padded (..., H+2, W+2) array.

    h3 = [-1 0 1;-2 0 2;-1 0 1], h1 = [1 2 1;0 0 0;-1 -2 -1]; conv2 flips the kernel, so
    gx = weighted (left - right) and gy = weighted (below - above). Exact on integers.
    """
    h, w = xp.shape[-2] - 2, xp.shape[-1] - 2
    mid = xp[..., 1 : h + 1, :]
    sm_v = xp[..., 0:h, :] + xp[..., 2 : h + 2, :]  # [1 2 1] vertical (x + x == 2 x exactly)
    sm_v += mid
    sm_v += mid
    gx = sm_v[..., 0:w] - sm_v[..., 2 : w + 2]
    midc = xp[..., 1 : w + 1]
    sm_h = xp[..., 0:w] + xp[..., 2 : w + 2]  # [1 2 1] horizontal
    sm_h += midc
    sm_h += midc
    gy = sm_h[..., 2 : h + 2, :] - sm_h[..., 0:h, :]
    return gx, gy


def _sobel_zero(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """conv2(x, h3, 'same') and conv2(x, h1, 'same') of analysis_Qabf.m (zero padding)."""
    xp = np.zeros((*x.shape[:-2], x.shape[-2] + 2, x.shape[-1] + 2))
    xp[..., 1:-1, 1:-1] = x
    return _sobel_valid(xp)


def _reflect_border_fix(x: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel responses with mirror extension (per_extn_im_fn: no edge repeat).

    The interior equals the zero-padded responses, so only the one-pixel frame is recomputed
    (on copies of `gx`, `gy`).
    """
    h, w = x.shape[-2:]
    gx = gx.copy()
    gy = gy.copy()

    def strip(rows: np.ndarray) -> np.ndarray:  # (..., 3, W) -> mirror-padded (..., 3, W+2)
        return np.concatenate([rows[..., 1:2], rows, rows[..., w - 2 : w - 1]], axis=-1)

    def strip_t(cols: np.ndarray) -> np.ndarray:  # (..., H, 3) -> (..., H+2, 3)
        return np.concatenate([cols[..., 1:2, :], cols, cols[..., h - 2 : h - 1, :]], axis=-2)

    for src_rows, dst in (([1, 0, 1], 0), ([h - 2, h - 1, h - 2], h - 1)):
        bx, by = _sobel_valid(strip(x[..., src_rows, :]))
        gx[..., dst, :] = bx[..., 0, :]
        gy[..., dst, :] = by[..., 0, :]
    for src_cols, dst in (([1, 0, 1], 0), ([w - 2, w - 1, w - 2], w - 1)):
        bx, by = _sobel_valid(strip_t(x[..., :, src_cols]))
        gx[..., :, dst] = bx[..., :, 0]
        gy[..., :, dst] = by[..., :, 0]
    return gx, gy


def _sigmoid_(x: np.ndarray) -> np.ndarray:
    """In-place logistic sigmoid of a float64 array (torch's vectorised kernel is the fastest)."""
    torch.from_numpy(x).sigmoid_()
    return x


class _Ctx:
    """Per-chunk cache of shared intermediates (float maps, histograms, Sobel, moments)."""

    def __init__(self, f8: np.ndarray, a8: np.ndarray, b8: np.ndarray) -> None:
        self.u8 = {"F": f8, "A": a8, "B": b8}
        self.n, self.h, self.w = f8.shape
        self._cache: dict[Any, Any] = {}

    def get(self, key: Any, fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def d(self, name: str) -> np.ndarray:
        """Double 0-255 image."""
        return self.get(("d", name), lambda: self.u8[name].astype(np.float64))

    def prod(self, a: str, b: str) -> np.ndarray:
        key = ("prod",) + tuple(sorted((a, b)))
        return self.get(key, lambda: self.d(a) * self.d(b))

    def hist(self, name: str) -> np.ndarray:
        def make() -> np.ndarray:
            x = self.u8[name].reshape(self.n, -1).astype(np.int64)
            x += 256 * np.arange(self.n)[:, None]
            return np.bincount(x.ravel(), minlength=256 * self.n).reshape(self.n, 256)

        return self.get(("hist", name), make)

    def entropy(self, name: str) -> np.ndarray:
        return self.get(("H", name), lambda: _entropy_from_counts(self.hist(name), self.h * self.w))

    def joint_hist(self, a: str, b: str, quirk: bool) -> np.ndarray:
        def make() -> np.ndarray:
            xa = self.u8[a].reshape(self.n, -1)
            xb = self.u8[b].reshape(self.n, -1)
            if quirk:  # Hab.m: uint8 x+1 saturates at 255, so levels 254 and 255 share a bin
                xa = np.minimum(xa, 254)
                xb = np.minimum(xb, 254)
            idx = xa.astype(np.int64) * 256
            idx += xb
            idx += 65536 * np.arange(self.n)[:, None]
            return np.bincount(idx.ravel(), minlength=65536 * self.n).reshape(self.n, 65536)

        return self.get(("joint", a, b, quirk), make)

    def sobel_zero(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.get(("sobel0", name), lambda: _sobel_zero(self.d(name)))

    def sobel_reflect(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        def make() -> tuple[np.ndarray, np.ndarray]:
            gx, gy = self.sobel_zero(name)
            return _reflect_border_fix(self.d(name), gx, gy)

        return self.get(("sobelR", name), make)

    def gauss_mean(self, key: tuple[str, ...]) -> np.ndarray:
        """SSIM Gaussian moments: ('A',) -> mu_A, ('A','F') -> E[A F] (all for F, A, B at once)."""
        def make_all() -> dict[tuple[str, ...], np.ndarray]:
            keys = [("A",), ("B",), ("F",), ("A", "A"), ("B", "B"), ("F", "F"), ("A", "F"), ("B", "F")]
            return {k: _sep_filter(self.d(k[0]) if len(k) == 1 else self.prod(*k), _SSIM_W,
                                   cv2.BORDER_REPLICATE) for k in keys}

        return self.get("ssim_moments", make_all)[key]


# --------------------------------------------------------------------------- metrics


def _m_en(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    return c.entropy("F")


def _m_sd(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    f = c.d("F")
    dev = f - f.mean(axis=(-2, -1), keepdims=True)
    dev *= dev
    return np.sqrt(_sum2(dev) / (c.h * c.w))


def _m_sf(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    f = c.d("F")
    rf = np.diff(f, axis=-2)
    rf *= rf
    cf = np.diff(f, axis=-1)
    cf *= cf
    return np.sqrt(rf.mean(axis=(-2, -1)) + cf.mean(axis=(-2, -1)))


def _m_ag(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    f = c.d("F")
    if c.h < 2 or c.w < 2:  # as_gray_uint8 rejects these; kept for safety
        return np.zeros(c.n)
    # MATLAB gradient: central differences inside, one-sided at the ends (= np.gradient)
    gx = np.gradient(f, axis=-1)
    gy = np.gradient(f, axis=-2)
    gx *= gx
    gy *= gy
    gx += gy
    gx /= 2.0
    s = _sum2(np.sqrt(gx, out=gx))
    if conv.ag == "matlab":
        return s / ((c.h - 1) * (c.w - 1))
    return s / (c.h * c.w)


def _m_mi(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    quirk = conv.mi == "bits"
    total = c.h * c.w
    if conv.mi == "nats":
        def ent(counts: np.ndarray) -> np.ndarray:
            return _entropy_from_counts(counts, total, log=np.log)

        hf, ha, hb = ent(c.hist("F")), ent(c.hist("A")), ent(c.hist("B"))
    else:
        ent = lambda counts: _entropy_from_counts(counts, total)  # noqa: E731
        hf, ha, hb = c.entropy("F"), c.entropy("A"), c.entropy("B")
    hfa = ent(c.joint_hist("F", "A", quirk))
    hfb = ent(c.joint_hist("F", "B", quirk))
    return (ha + hf - hfa) + (hb + hf - hfb)


def _ssim_one(c: _Ctx, src: str, c1: float, c2: float) -> np.ndarray:
    mux = c.gauss_mean(("F",))
    muy = c.gauss_mean((src,))
    mux2 = c.get("ssim_mux2", lambda: mux * mux)
    sx2 = c.get("ssim_sx2", lambda: c.gauss_mean(("F", "F")) - mux2)
    muxy = mux * muy
    muy2 = muy * muy
    sy2 = c.gauss_mean((src, src)) - muy2
    sxy = c.gauss_mean((src, "F")) - muxy
    # num = (2 muxy + C1)(2 sxy + C2), den = (mux^2 + muy^2 + C1)(sx^2 + sy^2 + C2), in place
    muxy *= 2.0
    muxy += c1
    sxy *= 2.0
    sxy += c2
    muxy *= sxy
    muy2 += mux2
    muy2 += c1
    sy2 += sx2
    sy2 += c2
    muy2 *= sy2
    muxy /= muy2
    return muxy.mean(axis=(-2, -1))


def _m_ssim(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    L = 255.0 if conv.ssim == "l255" else 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    s = _ssim_one(c, "A", c1, c2) + _ssim_one(c, "B", c1, c2)
    return s if conv.ssim == "sum" else 0.5 * s


def _mse_pair(c: _Ctx, src: str) -> np.ndarray:
    d = c.d("F") - c.d(src)
    d *= d
    return d.mean(axis=(-2, -1))


def _mse255(c: _Ctx) -> np.ndarray:
    return c.get("mse255", lambda: 0.5 * _mse_pair(c, "A") + 0.5 * _mse_pair(c, "B"))


def _m_mse(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    if conv.psnr == "reference":
        def pair(src: str) -> np.ndarray:
            d = c.d("F") / 255.0
            d -= c.d(src) / 255.0
            d *= d
            return d.mean(axis=(-2, -1))

        return c.get("mse01", lambda: 0.5 * pair("A") + 0.5 * pair("B"))
    return _mse255(c)


def _m_psnr(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    mse = _m_mse(c, conv)
    with np.errstate(divide="ignore"):
        if conv.psnr == "maxF":
            peak = c.d("F").max(axis=(-2, -1))
            return 10.0 * np.log10(peak * peak / mse)
        return 20.0 * np.log10(255.0 / np.sqrt(mse))


def _m_cc(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    f = c.d("F")
    return 0.5 * (_corr2(c.d("A"), f) + _corr2(c.d("B"), f))


def _m_scd(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    f, a, b = c.d("F"), c.d("A"), c.d("B")
    return _corr2(f - b, a) + _corr2(f - a, b)


# Qabf (analysis_Qabf.m)
_QABF = dict(Tg=0.9994, kg=-15.0, Dg=0.5, Ta=0.9879, ka=-22.0, Da=0.8)


def _qabf_parts(c: _Ctx, name: str) -> tuple[np.ndarray, np.ndarray]:
    def make() -> tuple[np.ndarray, np.ndarray]:
        gx, gy = c.sobel_zero(name)
        g = gx * gx
        g += gy * gy
        np.sqrt(g, out=g)  # exact sqrt of an integer: ties are exact
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.divide(gy, gx)
        np.arctan(alpha, out=alpha)  # atan(gy./gx) as analysis_Qabf.m; pi/2 where gx == 0
        np.copyto(alpha, math.pi / 2, where=gx == 0)
        return g, alpha

    return c.get(("qabf", name), make)


def _qabf_weighted_sum(gs: np.ndarray, as_: np.ndarray, gf: np.ndarray, af: np.ndarray) -> np.ndarray:
    """Per image sum of Q_SF * gS (without the constant Tg * Ta)."""
    p = _QABF
    mn = np.minimum(gs, gf)
    mx = np.maximum(gs, gf)
    with np.errstate(divide="ignore", invalid="ignore"):
        G = np.divide(mn, mx)  # gF/gA or gA/gF
    np.copyto(G, gf, where=mn == mx)  # analysis_Qabf.m takes G = gF where gA == gF (0 where flat)
    # Tg/(1+exp(kg(G-Dg))) = Tg*sigmoid(-kg(G-Dg)), likewise for the orientation term
    G -= p["Dg"]
    G *= -p["kg"]
    qg = _sigmoid_(G)
    A = np.subtract(as_, af)
    np.abs(A, out=A)
    A /= math.pi / 2
    np.subtract(1.0, A, out=A)
    A -= p["Da"]
    A *= -p["ka"]
    qa = _sigmoid_(A)
    qg *= qa
    qg *= gs
    return _sum2(qg)


def _m_qabf(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    ga, aa = _qabf_parts(c, "A")
    gb, ab = _qabf_parts(c, "B")
    gf, af = _qabf_parts(c, "F")
    num = _qabf_weighted_sum(ga, aa, gf, af) + _qabf_weighted_sum(gb, ab, gf, af)
    den = _sum2(ga) + _sum2(gb)
    return num * (_QABF["Tg"] * _QABF["Ta"]) / den


# Nabf (analysis_nabf.m, Shreyamsha Kumar)
_NABF_TD, _NABF_WT_MIN, _NABF_LG = 2.0, 0.001, 1.5


def _nabf_parts(c: _Ctx, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(g, gx, gy) of analysis_nabf.m's Sobel/8 on the mirror-extended image (gx, gy unscaled)."""
    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gx, gy = c.sobel_reflect(name)
        # g = sqrt(gh^2 + gv^2) with gh = gy/8, gv = -gx/8: exactly the zero-padded Qabf
        # magnitude / 8 inside (power-of-two scaling), recomputed on the one-pixel frame.
        g = _qabf_parts(c, name)[0] * 0.125
        for sl in ((Ellipsis, 0, slice(None)), (Ellipsis, -1, slice(None)),
                   (Ellipsis, slice(None), 0), (Ellipsis, slice(None), -1)):
            gh = gy[sl] * 0.125
            gv = gx[sl] * -0.125
            g[sl] = np.sqrt(gh * gh + gv * gv)
        return g, gx, gy

    return c.get(("nabf", name), make)


def _nabf_weight(c: _Ctx, name: str) -> np.ndarray:
    """g^1.5 where g >= 2, else 0.001."""
    def make() -> np.ndarray:
        g = _nabf_parts(c, name)[0]
        w = np.sqrt(g)
        w *= g
        np.copyto(w, _NABF_WT_MIN, where=g < _NABF_TD)
        return w

    return c.get(("nabf_w", name), make)


def _nabf_angle(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """atan(gv/gh) as MATLAB gives it (gv = -gx/8, gh = gy/8): +-pi/2 where only gh is 0, 0 where both are.

    Uses atan2(gv*sign(gh), |gh|) (= atan(gv/gh) for gh != 0); where gh == 0 it is
    atan2(gv, 0), i.e. +-pi/2 or 0 by the sign of gv.
    """
    gv = gx * (-1.0 / 8.0)
    gh = gy * (1.0 / 8.0)
    s = np.sign(gh)
    z = 1.0 - np.abs(s)
    return np.arctan2(gv * s + gv * z, np.abs(gh))


def _nabf_full(c: _Ctx, f: str, s1: str, s2: str) -> np.ndarray:
    """analysis_nabf(f, I1, I2) on double 0-255 images: the modified NABF value."""
    nrg, kg, sg = 0.9999, 19.0, 0.5
    nra, ka, sa = 0.9995, 22.0, 0.5
    gF, xF, yF = _nabf_parts(c, f)
    gA, xA, yA = _nabf_parts(c, s1)
    gB, xB, yB = _nabf_parts(c, s2)
    wA = _nabf_weight(c, s1)
    wB = _nabf_weight(c, s2)
    den = _sum2(wA) + _sum2(wB)
    na = np.greater(gF, gA)
    na &= np.greater(gF, gB)
    idx = np.flatnonzero(na)
    if idx.size == 0:
        return np.zeros(c.n) / den
    # Only pixels with na contribute; there gF > gA >= 0, so the relative strength
    # (0 if gA == 0 or gF == 0, else min/max) is simply gA/gF. Angles are needed there only.
    take = lambda m: m.reshape(-1)[idx]  # noqa: E731
    gf = take(gF)
    af = _nabf_angle(take(xF), take(yF))

    def one_minus_q(gs_map: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        g_rel = take(gs_map) / gf
        a_rel = np.abs(np.abs(_nabf_angle(take(xs), take(ys)) - af) - math.pi / 2) * (2.0 / math.pi)
        qg = nrg / (1.0 + np.exp(-kg * (g_rel - sg)))
        qa = nra / (1.0 + np.exp(-ka * (a_rel - sa)))
        return 1.0 - np.sqrt(qg * qa)

    contrib = one_minus_q(gA, xA, yA) * take(wA) + one_minus_q(gB, xB, yB) * take(wB)
    num = np.bincount(idx // (c.h * c.w), weights=contrib, minlength=c.n)
    return num / den


def _m_nabf(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    if conv.nabf_order == "correct":
        return _nabf_full(c, "F", "A", "B")
    return _nabf_full(c, "A", "B", "F")  # analysis_nabf(IR, VIS, F) as the driver calls it


# VIF (vifp_mscale.m)
_VIF_SIGMA_NSQ = 2.0


def _m_vif(c: _Ctx, conv: MetricConventions) -> np.ndarray:
    # VIF(A, F) + VIF(B, F); the moments of F are shared by both terms.
    imgs = [c.d("A"), c.d("B"), c.d("F")]
    num = np.zeros((2, c.n))
    den = np.zeros((2, c.n))
    eps = 1e-10
    for scale in range(1, 5):
        size = 2 ** (4 - scale + 1) + 1
        w = _gauss1d(size, size / 5.0)
        if scale > 1:
            imgs = [_filter_valid(x, w, step=2) for x in imgs]
        if scale == 1:
            sq = [c.prod("A", "A"), c.prod("B", "B"), c.prod("F", "F"), c.prod("A", "F"), c.prod("B", "F")]
        else:
            a, b, f = imgs
            sq = [a * a, b * b, f * f, a * f, b * f]
        mu = [_filter_valid(x, w) for x in imgs]
        m2 = [_filter_valid(x, w) for x in sq]
        mu_f = mu[2]
        s2 = m2[2] - mu_f * mu_f  # sigma2^2, shared by A and B
        np.maximum(s2, 0.0, out=s2)
        low2 = s2 < eps
        for r in range(2):
            mu_r = mu[r]
            s1 = m2[r] - mu_r * mu_r
            np.maximum(s1, 0.0, out=s1)
            s12 = mu_r * mu_f
            np.subtract(m2[3 + r], s12, out=s12)
            # vifp_mscale.m's masking: g is zeroed where sigma1^2 < eps, sigma2^2 < eps or
            # g < 0 (its term is then log10(1) = 0); sigma1^2 is zeroed where < eps;
            # sv^2 = sigma2^2 - g sigma12, at least eps.
            g = s12 / (s1 + eps)
            sv = g * s12
            np.subtract(s2, sv, out=sv)
            np.maximum(sv, eps, out=sv)
            low1 = s1 < eps
            np.maximum(g, 0.0, out=g)
            np.copyto(g, 0.0, where=low1)
            np.copyto(g, 0.0, where=low2)
            np.copyto(s1, 0.0, where=low1)
            g *= g
            g *= s1
            sv += _VIF_SIGMA_NSQ
            g /= sv
            g += 1.0
            num[r] += _sum2(np.log10(g, out=g))
            s1 /= _VIF_SIGMA_NSQ
            s1 += 1.0
            den[r] += _sum2(np.log10(s1, out=s1))
    return (num / den).sum(axis=0)


_METRIC_FUNCS = {
    "EN": _m_en, "SD": _m_sd, "SF": _m_sf, "AG": _m_ag, "MI": _m_mi, "SSIM": _m_ssim,
    "Qabf": _m_qabf, "PSNR": _m_psnr, "MSE": _m_mse, "VIF": _m_vif, "SCD": _m_scd,
    "CC": _m_cc, "Nabf": _m_nabf,
}


# --------------------------------------------------------------------------- API


def parse_metric_names(metrics: Iterable[str] | str | None) -> tuple[str, ...]:
    """Canonical metric names from a list or a comma string (case-insensitive); None = all."""
    if metrics is None:
        return ALL
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    lookup = {m.lower(): m for m in METRIC_NAMES}
    out = []
    for m in metrics:
        if m.lower() not in lookup:
            raise ConfigError(f"unknown fusion metric {m!r}; known: {list(METRIC_NAMES)}")
        name = lookup[m.lower()]
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("no fusion metric selected")
    return tuple(out)


def compute_metrics_batch(
    fused: Any,
    ir: Any,
    vis: Any,
    *,
    metrics: Iterable[str] | str | None = ALL,
    conventions: str | MetricConventions | Mapping[str, Any] = "reference",
    chunk: int = 1,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Metrics of stacks F, A (IR), B (VIS): uint8 (N, H, W) or (N, H, W, 3) -> {name: (N,) float64}.

    `options` are convention overrides (ssim=, mi=, psnr=, nabf_order=, ag=). Images are
    processed `chunk` at a time (~120 MB per 640x480 image in a chunk); the default, one at
    a time, is also the fastest (the maps stay closer to cache size).
    """
    conv = resolve_conventions(conventions, **options)
    names = parse_metric_names(metrics)
    f = as_gray_uint8(fused, "fused", batched=True)
    a = as_gray_uint8(ir, "infrared", batched=True)
    b = as_gray_uint8(vis, "visible", batched=True)
    if not (f.shape == a.shape == b.shape):
        raise DataError(
            f"fused/infrared/visible sizes differ: {f.shape} / {a.shape} / {b.shape} (N, H, W)"
        )
    n = f.shape[0]
    out = {m: np.empty(n, dtype=np.float64) for m in names}
    if n == 0:
        return out
    chunk = max(1, int(chunk))
    _keep_heap(64 * 8 * f[0].size * min(chunk, n))  # peak working set: ~49 float64 maps per image
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in range(0, n, chunk):
            ctx = _Ctx(f[s : s + chunk], a[s : s + chunk], b[s : s + chunk])
            for m in names:
                out[m][s : s + chunk] = _METRIC_FUNCS[m](ctx, conv)
    return out


def compute_metrics(
    fused: Any,
    ir: Any,
    vis: Any,
    *,
    metrics: Iterable[str] | str | None = ALL,
    conventions: str | MetricConventions | Mapping[str, Any] = "reference",
    **options: Any,
) -> dict[str, float]:
    """Metrics of one triple: uint8 grey (H, W) or RGB (H, W, 3) images -> {name: float}.

    SCD is NaN when F equals a source (as in MATLAB). Sizes must match (DataError otherwise).
    """
    f = as_gray_uint8(fused, "fused")
    a = as_gray_uint8(ir, "infrared")
    b = as_gray_uint8(vis, "visible")
    if not (f.shape == a.shape == b.shape):
        raise DataError(f"fused/infrared/visible sizes differ: {f.shape} / {a.shape} / {b.shape}")
    res = compute_metrics_batch(f[None], a[None], b[None], metrics=metrics, conventions=conventions, **options)
    return {k: float(v[0]) for k, v in res.items()}
