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

Implementation: torch float64 on CPU, batched over images of the same size
((N, H, W) stacks); the separable Gaussian filters run plane by plane through OpenCV's
double-precision ``sepFilter2D`` (float64 ``conv2d`` has no fast CPU kernel); histograms
via ``bincount``; the hot element-wise code avoids bool-mask kernels, which are slow. Intermediate
results are shared between metrics: grey-level histograms (EN and MI), the Gaussian
moments of F (both SSIM terms), the Sobel responses (Qabf and Nabf differ only on
the one-pixel border), the squared maps (SSIM and VIF).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

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

_DT = torch.float64


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


# --------------------------------------------------------------------------- filters


def _gauss1d(size: int, sigma: float) -> list[float]:
    """Normalised 1-D Gaussian; the outer product equals MATLAB fspecial('gaussian')."""
    r = (size - 1) / 2.0
    w = np.exp(-((np.arange(size) - r) ** 2) / (2.0 * sigma * sigma))
    w /= w.sum()
    return [float(v) for v in w]


def _sep_filter(x: torch.Tensor, w: Sequence[float], border: int) -> torch.Tensor:
    """Separable filtering of every (H, W) plane of `x`, 'same' size, with an OpenCV border.

    Double precision throughout. OpenCV's SIMD separable filter is about 2x faster on CPU
    than float64 torch filtering built from shifted slices, and ~20x faster than float64
    ``conv2d`` (which has no fast CPU kernel for double).
    """
    k = np.asarray(w, dtype=np.float64)
    src = x.contiguous().numpy().reshape(-1, x.shape[-2], x.shape[-1])
    out = np.empty_like(src)
    for i in range(src.shape[0]):
        cv2.sepFilter2D(src[i], cv2.CV_64F, k, k, dst=out[i], borderType=border)
    return torch.from_numpy(out.reshape(x.shape))


def _filter_valid(x: torch.Tensor, w: Sequence[float], step: int = 1) -> torch.Tensor:
    """MATLAB filter2(w w^T, x, 'valid') of every plane, optionally subsampled by `step`."""
    n = len(w)
    r = n // 2
    if x.shape[-2] < n or x.shape[-1] < n:  # MATLAB: an empty result (sums over it are 0)
        return x.new_zeros(*x.shape[:-2], max(0, -(-(x.shape[-2] - n + 1) // step)),
                           max(0, -(-(x.shape[-1] - n + 1) // step)))
    y = _sep_filter(x, w, cv2.BORDER_REFLECT_101)
    return y[..., r : x.shape[-2] - r : step, r : x.shape[-1] - r : step]


_SSIM_W = _gauss1d(11, 1.5)


def _ssim_filter(x: torch.Tensor) -> torch.Tensor:
    """imgaussfilt(x, 1.5, 'FilterSize', 11, 'Padding', 'replicate'), as MATLAB ssim uses it."""
    return _sep_filter(x, _SSIM_W, cv2.BORDER_REPLICATE)


# --------------------------------------------------------------------------- pieces


def _entropy_from_counts(counts: torch.Tensor, total: float, log: Any = torch.log2) -> torch.Tensor:
    p = counts.to(_DT) / total
    terms = torch.where(p > 0, p * log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return -terms.sum(dim=-1)


def _corr2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MATLAB corr2 per image of (N, H, W) stacks (NaN where either is constant)."""
    xc = x - x.mean(dim=(-2, -1), keepdim=True)
    yc = y - y.mean(dim=(-2, -1), keepdim=True)
    num = (xc * yc).sum(dim=(-2, -1))
    den = torch.sqrt((xc * xc).sum(dim=(-2, -1)) * (yc * yc).sum(dim=(-2, -1)))
    return num / den


def _sobel_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2(x, h3, 'same') and conv2(x, h1, 'same') of analysis_Qabf.m (zero padding).

    h3 = [-1 0 1;-2 0 2;-1 0 1], h1 = [1 2 1;0 0 0;-1 -2 -1]; conv2 flips the kernel, so
    gx = weighted (left - right) and gy = weighted (below - above). Exact on integers.
    """
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    return _sobel_valid(xp)


def _sobel_valid(xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left - right, below - above) Sobel responses of a padded (..., H+2, W+2) tensor."""
    h, w = xp.shape[-2] - 2, xp.shape[-1] - 2
    sm_v = xp[..., 0:h, :] + 2.0 * xp[..., 1 : h + 1, :] + xp[..., 2 : h + 2, :]  # [1 2 1] vertical
    gx = sm_v[..., 0:w] - sm_v[..., 2 : w + 2]
    sm_h = xp[..., 0:w] + 2.0 * xp[..., 1 : w + 1] + xp[..., 2 : w + 2]  # [1 2 1] horizontal
    gy = sm_h[..., 2 : h + 2, :] - sm_h[..., 0:h, :]
    return gx, gy


def _reflect_border_fix(x: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel responses with mirror extension (per_extn_im_fn: no edge repeat).

    The interior equals the zero-padded responses, so only the one-pixel frame is recomputed.
    """
    shape = x.shape
    xp = torch.nn.functional.pad(x.reshape(-1, 1, shape[-2], shape[-1]), (1, 1, 1, 1), mode="reflect")
    xp = xp.reshape(*shape[:-2], shape[-2] + 2, shape[-1] + 2)
    gx = gx.clone()
    gy = gy.clone()
    # top/bottom rows (full width) and left/right columns (full height)
    for rows, dst in ((slice(0, 3), slice(0, 1)), (slice(-3, None), slice(-1, None))):
        bx, by = _sobel_valid(xp[..., rows, :])
        gx[..., dst, :] = bx
        gy[..., dst, :] = by
    for cols, dst in ((slice(0, 3), slice(0, 1)), (slice(-3, None), slice(-1, None))):
        bx, by = _sobel_valid(xp[..., :, cols])
        gx[..., :, dst] = bx
        gy[..., :, dst] = by
    return gx, gy


class _Ctx:
    """Per-chunk cache of shared intermediates (float maps, histograms, Sobel, moments)."""

    def __init__(self, f8: torch.Tensor, a8: torch.Tensor, b8: torch.Tensor) -> None:
        self.u8 = {"F": f8, "A": a8, "B": b8}
        self.n, self.h, self.w = f8.shape
        self._cache: dict[Any, Any] = {}

    def get(self, key: Any, fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def d(self, name: str) -> torch.Tensor:
        """Double 0-255 image."""
        return self.get(("d", name), lambda: self.u8[name].to(_DT))

    def prod(self, a: str, b: str) -> torch.Tensor:
        key = ("prod",) + tuple(sorted((a, b)))
        return self.get(key, lambda: self.d(a) * self.d(b))

    def hist(self, name: str) -> torch.Tensor:
        def make() -> torch.Tensor:
            x = self.u8[name].reshape(self.n, -1).to(torch.int64)
            idx = x + 256 * torch.arange(self.n).unsqueeze(1)
            return torch.bincount(idx.reshape(-1), minlength=256 * self.n).reshape(self.n, 256)

        return self.get(("hist", name), make)

    def entropy(self, name: str) -> torch.Tensor:
        return self.get(("H", name), lambda: _entropy_from_counts(self.hist(name), self.h * self.w))

    def joint_hist(self, a: str, b: str, quirk: bool) -> torch.Tensor:
        def make() -> torch.Tensor:
            xa = self.u8[a].reshape(self.n, -1).to(torch.int64)
            xb = self.u8[b].reshape(self.n, -1).to(torch.int64)
            if quirk:  # Hab.m: uint8 x+1 saturates at 255, so levels 254 and 255 share a bin
                xa = xa.clamp(max=254)
                xb = xb.clamp(max=254)
            idx = xa * 256 + xb + 65536 * torch.arange(self.n).unsqueeze(1)
            return torch.bincount(idx.reshape(-1), minlength=65536 * self.n).reshape(self.n, 65536)

        return self.get(("joint", a, b, quirk), make)

    def sobel_zero(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(("sobel0", name), lambda: _sobel_zero(self.d(name)))

    def sobel_reflect(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            gx, gy = self.sobel_zero(name)
            return _reflect_border_fix(self.d(name), gx, gy)

        return self.get(("sobelR", name), make)

    def gauss_mean(self, key: tuple[str, ...]) -> torch.Tensor:
        """SSIM Gaussian moments: ('A',) -> mu_A, ('A','F') -> E[A F] (all for F, A, B at once)."""
        def make_all() -> dict[tuple[str, ...], torch.Tensor]:
            keys = [("A",), ("B",), ("F",), ("A", "A"), ("B", "B"), ("F", "F"), ("A", "F"), ("B", "F")]
            maps = [self.d(k[0]) if len(k) == 1 else self.prod(*k) for k in keys]
            filt = _ssim_filter(torch.stack(maps, dim=0))
            return {k: filt[i] for i, k in enumerate(keys)}

        return self.get("ssim_moments", make_all)[key]


# --------------------------------------------------------------------------- metrics


def _m_en(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    return c.entropy("F")


def _m_sd(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    f = c.d("F")
    mu = f.mean(dim=(-2, -1), keepdim=True)
    return torch.sqrt(((f - mu) ** 2).sum(dim=(-2, -1)) / (c.h * c.w))


def _m_sf(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    f = c.d("F")
    rf = torch.diff(f, dim=-2)
    cf = torch.diff(f, dim=-1)
    return torch.sqrt((rf * rf).mean(dim=(-2, -1)) + (cf * cf).mean(dim=(-2, -1)))


def _matlab_gradient(f: torch.Tensor, dim: int) -> torch.Tensor:
    """MATLAB gradient along `dim`: central differences inside, one-sided at the ends."""
    g = torch.empty_like(f)
    n = f.shape[dim]
    if n < 2:
        g.zero_()
        return g
    nar = f.narrow
    g.narrow(dim, 0, 1).copy_(nar(dim, 1, 1) - nar(dim, 0, 1))
    g.narrow(dim, n - 1, 1).copy_(nar(dim, n - 1, 1) - nar(dim, n - 2, 1))
    if n > 2:
        g.narrow(dim, 1, n - 2).copy_((nar(dim, 2, n - 2) - nar(dim, 0, n - 2)) / 2.0)
    return g


def _m_ag(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    f = c.d("F")
    gx = _matlab_gradient(f, -1)
    gy = _matlab_gradient(f, -2)
    s = torch.sqrt((gx * gx + gy * gy) / 2.0).sum(dim=(-2, -1))
    if conv.ag == "matlab":
        return s / ((c.h - 1) * (c.w - 1))
    return s / (c.h * c.w)


def _m_mi(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    quirk = conv.mi == "bits"
    total = c.h * c.w
    if conv.mi == "nats":
        def ent(counts: torch.Tensor) -> torch.Tensor:
            return _entropy_from_counts(counts, total, log=torch.log)

        hf, ha, hb = ent(c.hist("F")), ent(c.hist("A")), ent(c.hist("B"))
    else:
        ent = lambda counts: _entropy_from_counts(counts, total)  # noqa: E731
        hf, ha, hb = c.entropy("F"), c.entropy("A"), c.entropy("B")
    hfa = ent(c.joint_hist("F", "A", quirk))
    hfb = ent(c.joint_hist("F", "B", quirk))
    return (ha + hf - hfa) + (hb + hf - hfb)


def _ssim_one(c: _Ctx, src: str, c1: float, c2: float) -> torch.Tensor:
    mux = c.gauss_mean(("F",))
    muy = c.gauss_mean((src,))
    muxy = mux * muy
    mux2 = mux * mux
    muy2 = muy * muy
    sx2 = c.gauss_mean(("F", "F")) - mux2
    sy2 = c.gauss_mean((src, src)) - muy2
    sxy = c.gauss_mean((src, "F")) - muxy
    num = (2.0 * muxy + c1) * (2.0 * sxy + c2)
    den = (mux2 + muy2 + c1) * (sx2 + sy2 + c2)
    return (num / den).mean(dim=(-2, -1))


def _m_ssim(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    L = 255.0 if conv.ssim == "l255" else 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    s = _ssim_one(c, "A", c1, c2) + _ssim_one(c, "B", c1, c2)
    return s if conv.ssim == "sum" else 0.5 * s


def _mse_pair(c: _Ctx, src: str) -> torch.Tensor:
    d = c.d("F") - c.d(src)
    return (d * d).mean(dim=(-2, -1))


def _mse255(c: _Ctx) -> torch.Tensor:
    return c.get("mse255", lambda: 0.5 * _mse_pair(c, "A") + 0.5 * _mse_pair(c, "B"))


def _m_mse(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    if conv.psnr == "reference":
        def pair(src: str) -> torch.Tensor:
            d = c.d("F") / 255.0 - c.d(src) / 255.0
            return (d * d).mean(dim=(-2, -1))

        return c.get("mse01", lambda: 0.5 * pair("A") + 0.5 * pair("B"))
    return _mse255(c)


def _m_psnr(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    mse = _m_mse(c, conv)
    if conv.psnr == "maxF":
        peak = c.d("F").amax(dim=(-2, -1))
        return 10.0 * torch.log10(peak * peak / mse)
    return 20.0 * torch.log10(255.0 / torch.sqrt(mse))


def _m_cc(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    f = c.d("F")
    return 0.5 * (_corr2(c.d("A"), f) + _corr2(c.d("B"), f))


def _m_scd(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    f, a, b = c.d("F"), c.d("A"), c.d("B")
    return _corr2(f - b, a) + _corr2(f - a, b)


# Qabf (analysis_Qabf.m)
_QABF = dict(Tg=0.9994, kg=-15.0, Dg=0.5, Ta=0.9879, ka=-22.0, Da=0.8)


def _step_ge(x: torch.Tensor, t: float) -> torch.Tensor:
    """Float 0/1 map of x >= t, without bool tensors (mixed bool/float kernels are slow on CPU)."""
    return 1.0 - torch.sign(torch.clamp(t - x, min=0.0))


def _atan_ratio(num: torch.Tensor, den: torch.Tensor, den_zero_num: torch.Tensor | float) -> torch.Tensor:
    """MATLAB atan(num/den), with the numerator replaced by `den_zero_num` where den == 0.

    Uses atan2(num*sign(den), |den|) (= atan(num/den) for den != 0); where den == 0 it is
    atan2(den_zero_num, 0), i.e. +-pi/2 or 0 by the sign of `den_zero_num`.
    """
    s = torch.sign(den)
    z = 1.0 - torch.abs(s)  # 1 where den == 0
    return torch.atan2(num * s + den_zero_num * z, torch.abs(den))


def _qabf_parts(c: _Ctx, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gx, gy = c.sobel_zero(name)
        g = torch.sqrt(gx * gx + gy * gy)  # exact sqrt of an integer: ties are exact
        alpha = _atan_ratio(gy, gx, 1.0)  # atan(gy/gx); pi/2 where gx == 0
        return g, alpha

    return c.get(("qabf", name), make)


def _qabf_q(gs: torch.Tensor, as_: torch.Tensor, gf: torch.Tensor, af: torch.Tensor) -> torch.Tensor:
    p = _QABF
    mn = torch.minimum(gs, gf)
    mx = torch.maximum(gs, gf)
    ratio = mn / mx.clamp(min=1e-300)  # gF/gA or gA/gF; 0 where both are 0
    eq = 1.0 - torch.sign(mx - mn)  # 1 where gA == gF: analysis_Qabf.m then takes G = gF
    G = ratio * (1.0 - eq) + gf * eq  # exact: one of the two products is 0
    A = 1.0 - torch.abs(as_ - af) / (math.pi / 2)
    # Tg/(1+exp(kg(G-Dg))) = Tg*sigmoid(-kg(G-Dg)), likewise for the orientation term
    qg = torch.sigmoid(-p["kg"] * (G - p["Dg"]))
    qa = torch.sigmoid(-p["ka"] * (A - p["Da"]))
    return (qg * qa) * (p["Tg"] * p["Ta"])


def _m_qabf(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    ga, aa = _qabf_parts(c, "A")
    gb, ab = _qabf_parts(c, "B")
    gf, af = _qabf_parts(c, "F")
    qaf = _qabf_q(ga, aa, gf, af)
    qbf = _qabf_q(gb, ab, gf, af)
    num = (qaf * ga).sum(dim=(-2, -1)) + (qbf * gb).sum(dim=(-2, -1))
    den = ga.sum(dim=(-2, -1)) + gb.sum(dim=(-2, -1))
    return num / den


# Nabf (analysis_nabf.m, Shreyamsha Kumar)
def _nabf_parts(c: _Ctx, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gx, gy = c.sobel_reflect(name)
        gv = gx * (-1.0 / 8.0)  # vtemp = [-1 0 1;-2 0 2;-1 0 1]/8 as a correlation: right - left
        gh = gy * (1.0 / 8.0)  # htemp = [-1 -2 -1;0 0 0;1 2 1]/8: below - above
        g = torch.sqrt(gh * gh + gv * gv)
        # atan(gv/gh) as MATLAB gives it: +-pi/2 where only gh is 0, and 0 where both are
        a = _atan_ratio(gv, gh, gv)
        return g, a

    return c.get(("nabf", name), make)


def _nabf_full(c: _Ctx, f: str, s1: str, s2: str) -> torch.Tensor:
    """analysis_nabf(f, I1, I2) on double 0-255 images: the modified NABF value."""
    td, wt_min, lg = 2.0, 0.001, 1.5
    nrg, kg, sg = 0.9999, 19.0, 0.5
    nra, ka, sa = 0.9995, 22.0, 0.5
    gF, aF = _nabf_parts(c, f)
    gA, aA = _nabf_parts(c, s1)
    gB, aB = _nabf_parts(c, s2)

    def weight(g: torch.Tensor) -> torch.Tensor:
        m = _step_ge(g, td)
        return (g ** lg) * m + wt_min * (1.0 - m)

    wA = weight(gA)
    wB = weight(gB)
    den = wA.sum(dim=(-2, -1)) + wB.sum(dim=(-2, -1))
    na = (gF > gA) & (gF > gB)
    num = torch.zeros(c.n, dtype=_DT)
    n_idx, i_idx, j_idx = na.nonzero(as_tuple=True)
    if n_idx.numel():
        # Only pixels with na contribute; there gF > gA >= 0, so the relative strength
        # (0 if gA == 0 or gF == 0, else min/max) is simply gA/gF.
        gf, af = gF[n_idx, i_idx, j_idx], aF[n_idx, i_idx, j_idx]

        def q(gs_map: torch.Tensor, as_map: torch.Tensor) -> torch.Tensor:
            gs, as_ = gs_map[n_idx, i_idx, j_idx], as_map[n_idx, i_idx, j_idx]
            g_rel = gs / gf
            a_rel = torch.abs(torch.abs(as_ - af) - math.pi / 2) * (2.0 / math.pi)
            qg = nrg / (1.0 + torch.exp(-kg * (g_rel - sg)))
            qa = nra / (1.0 + torch.exp(-ka * (a_rel - sa)))
            return torch.sqrt(qg * qa)

        contrib = (1.0 - q(gA, aA)) * wA[n_idx, i_idx, j_idx] + (1.0 - q(gB, aB)) * wB[n_idx, i_idx, j_idx]
        num = num.index_add(0, n_idx, contrib)
    return num / den


def _m_nabf(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    if conv.nabf_order == "correct":
        return _nabf_full(c, "F", "A", "B")
    return _nabf_full(c, "A", "B", "F")  # analysis_nabf(IR, VIS, F) as the driver calls it


# VIF (vifp_mscale.m)
_VIF_SIGMA_NSQ = 2.0


def _m_vif(c: _Ctx, conv: MetricConventions) -> torch.Tensor:
    # Stack: A, B, F at the current scale; VIF(A, F) + VIF(B, F).
    imgs = torch.stack([c.d("A"), c.d("B"), c.d("F")], dim=0)  # (3, N, H, W)
    num = torch.zeros(2, c.n, dtype=_DT)
    den = torch.zeros(2, c.n, dtype=_DT)
    eps = 1e-10
    for scale in range(1, 5):
        size = 2 ** (4 - scale + 1) + 1
        w = _gauss1d(size, size / 5.0)
        if scale > 1:
            imgs = _filter_valid(imgs, w, step=2)
        if scale == 1:
            sq = torch.stack([c.prod("A", "A"), c.prod("B", "B"), c.prod("F", "F"),
                              c.prod("A", "F"), c.prod("B", "F")], dim=0)
        else:
            a, b, f = imgs[0], imgs[1], imgs[2]
            sq = torch.stack([a * a, b * b, f * f, a * f, b * f], dim=0)
        mu = _filter_valid(imgs, w)
        m2 = _filter_valid(sq, w)
        mu_ref, mu_f = mu[0:2], mu[2:3]
        s1 = torch.addcmul(m2[0:2], mu_ref, mu_ref, value=-1.0).clamp_(min=0.0)
        s2 = torch.addcmul(m2[2:3], mu_f, mu_f, value=-1.0).clamp_(min=0.0)  # shared by A and B
        s12 = torch.addcmul(m2[3:5], mu_ref, mu_f, value=-1.0)
        # vifp_mscale.m's masking, branch-free: g is zeroed where sigma1^2 < eps,
        # sigma2^2 < eps or g < 0 (its term is then log10(1) = 0); sigma1^2 is zeroed
        # where < eps; sv^2 = sigma2^2 - g sigma12, at least eps.
        m1 = _step_ge(s1, eps)
        g = s12 / (s1 + eps)
        sv = torch.addcmul(s2, g, s12, value=-1.0).clamp_(min=eps)
        g.clamp_(min=0.0).mul_(m1).mul_(_step_ge(s2, eps))
        s1.mul_(m1)
        num += g.square_().mul_(s1).div_(sv.add_(_VIF_SIGMA_NSQ)).add_(1.0).log10_().sum(dim=(-2, -1))
        den += s1.div_(_VIF_SIGMA_NSQ).add_(1.0).log10_().sum(dim=(-2, -1))
    return (num / den).sum(dim=0)


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
    chunk: int = 4,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Metrics of stacks F, A (IR), B (VIS): uint8 (N, H, W) or (N, H, W, 3) -> {name: (N,) float64}.

    `options` are convention overrides (ssim=, mi=, psnr=, nabf_order=, ag=). Images are
    processed `chunk` at a time to bound memory (~150 MB per 640x480 image in a chunk).
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
    with torch.inference_mode():
        for s in range(0, n, chunk):
            ctx = _Ctx(torch.from_numpy(f[s : s + chunk]), torch.from_numpy(a[s : s + chunk]),
                       torch.from_numpy(b[s : s + chunk]))
            for m in names:
                out[m][s : s + chunk] = _METRIC_FUNCS[m](ctx, conv).numpy()
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
