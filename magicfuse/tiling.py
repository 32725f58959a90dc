"""Big images: windowed attention, and tiled networks with overlap and smooth blending.

The sampler (``magicfuse.diffusion.sampler``) stays the only loop. Big images are handled
by ``nn.Module`` wrappers with the wrapped network's interface, so ``magicfuse_sample``
runs unchanged on them. :func:`wrap_for_tiling` picks, from the padded latent size and a
:class:`TilingBudget`, one of three regimes for the latent networks (IKR, CKG, fusion):

1. **whole** (latent maps up to ``max_attention_tokens`` positions, e.g. 640×480 on a
   GPU): the networks as they are, global attention as in the paper.
2. **windowed attention** (up to ``max_latent_pixels``): :class:`WindowedAttention`
   runs the networks on the whole latent, but every attention map bigger than
   ``max_attention_tokens`` is computed over overlapping ``tile``×``tile`` windows
   (``overlap``, ``halo`` of key context) and blended
   (:mod:`magicfuse.models.attention`). Convolutions and GroupNorm statistics stay exact,
   so this is close to the untiled result (tiny random-weight nets, 256×320, window 32:
   mean |Δ| 0.09/255) while attention costs grow linearly with the image; memory grows
   linearly with the number of pixels.
3. **tiled networks** (beyond ``max_latent_pixels``; bounded memory for any size):
   :class:`TiledDenoiser` — ``forward(z_t, t, cond)``: the UNet runs on overlapping
   ``net_tile`` latent tiles with ``net_halo`` context and the ε predictions are blended;
   :class:`TiledFusion` — the fusion network runs per tile and every per-pixel output
   (``w``, ``seg_logits`` = the next ``seg_state``) is blended; ``zeta`` (the attention
   features) stays per tile and is not returned (an empty list): the sampler does not use
   it. Attention inside a tile is windowed as in 2. GroupNorm statistics and the
   receptive field are per tile here (the MultiDiffusion approximation, harmonised at
   every DDIM step by the blending), a much larger change than 2. (same test, tile 32:
   mean |Δ| 11.6/255), which is why this is only the fallback for huge images.

The autoencoder: :class:`TiledAutoEncoder` — ``encode``/``decode`` on overlapping
image-space tiles, each computed with a ``halo`` of context (64 px ≥ the decoder's
≈50 px receptive field) and blended in latent/image space. The autoencoder normalises with
InstanceNorm, whose statistics would otherwise differ from tile to tile, so they are
fixed first: the network runs once on a downscaled proxy of the whole input (longest side
``proxy`` pixels) and every InstanceNorm records its per-sample, per-channel mean and
variance; ``stat_passes`` further tiled passes then replace them by the exact whole-image
statistics one layer at a time (pass k makes the first k norm layers exact; 22 encoder /
18 decoder norm layers make the result equal to the untiled one, checked in the tests, at
that many times the cost). The encoder's noise is sliced per tile from the full-size noise
tensor. **Caveat:** this autoencoder is very sensitive to its norm statistics — with proxy
statistics alone (256 px, no extra passes) the official AE decodes a 640×480 frame with a
mean error of ≈18/255 — so the default budget keeps the AE untiled up to 16.8 MP (4096²;
a 4K frame runs untiled, memory linear in pixels) and uses the tiled AE only beyond that.

Blending (windows and tiles alike): cores are ``tile`` wide with ``overlap`` between
neighbours (the last core of a row/column is aligned with the far border, so every core
has the full size). Each core contributes with a separable raised-cosine weight that rises
from ~0 at an inner edge to 1 over ``overlap`` pixels (borders of the image get weight 1);
the outputs are the weighted mean. Overlap regions therefore fade from one tile to the
next instead of showing a seam. ``tests/test_inference.py`` bounds the differences from an
untiled run on a smooth image for regimes 2 and 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magicfuse.errors import ConfigError, DataError
from magicfuse.models.attention import AttentionWindow
from magicfuse.models.fusion import FusionOutput
from magicfuse.models.geometry import (
    LATENT_DOWNSCALE,
    blend_weight_1d,
    net_multiple,
    required_multiple,
    round_up,
    tile_starts,
    tile_windows,
    unwrap,
)


__all__ = [
    "TilingBudget",
    "WindowedAttention",
    "TiledDenoiser",
    "TiledFusion",
    "TiledAutoEncoder",
    "tile_starts",
    "tile_windows",
    "blend_weight_1d",
    "wrap_for_tiling",
    "needs_tiling",
]


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class TilingBudget:
    """When and how to window attention and tile networks (see the module docstring).

    Attention (all sizes in positions of the attention map, i.e. latent pixels for the
    fusion network, latent/4 and latent/8 for the UNets' attention levels): global while a
    map has at most ``max_attention_tokens`` positions, else over ``tile``×``tile`` windows
    overlapping by ``overlap`` with ``halo`` positions of key context, ``window_batch``
    windows per attention call. The default 32,768 keeps 640×480 (19,200 latent pixels)
    global, as in the paper.

    Networks: the latent networks run on the whole latent while it has at most
    ``max_latent_pixels`` pixels (default 1,048,576 = a 4096×4096 image), else on
    ``net_tile`` latent tiles with ``net_overlap`` overlap and ``net_halo`` context,
    ``tile_batch`` tiles per call.

    Autoencoder: untiled up to ``max_image_pixels`` (padded) image pixels, else on
    ``ae_tile``-pixel image tiles with ``ae_overlap`` overlap and ``ae_halo`` context, with
    norm statistics from a ``proxy``-pixel (longest side) downscaled copy.
    """

    max_attention_tokens: int = 32_768
    tile: int = 64
    overlap: int = 16
    halo: int = 16
    window_batch: int = 16
    max_latent_pixels: int = 1_048_576
    net_tile: int = 256
    net_overlap: int = 32
    net_halo: int = 32
    tile_batch: int = 1
    max_image_pixels: int = 16_777_216
    ae_tile: int = 512
    ae_overlap: int = 64
    ae_halo: int = 64
    proxy: int = 512

    def __post_init__(self) -> None:
        for name in ("tile", "net_tile", "ae_tile", "proxy", "tile_batch", "window_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TilingBudget.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("overlap", "halo", "net_overlap", "net_halo", "ae_overlap", "ae_halo", "max_attention_tokens",
                     "max_latent_pixels", "max_image_pixels"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"TilingBudget.{name} must be >= 0, got {getattr(self, name)}")
        for ov, tl in (("overlap", "tile"), ("net_overlap", "net_tile"), ("ae_overlap", "ae_tile")):
            if getattr(self, ov) >= getattr(self, tl):
                raise ConfigError(f"TilingBudget: {ov} ({getattr(self, ov)}) must be smaller than {tl} "
                                  f"({getattr(self, tl)})")

    @property
    def window(self) -> AttentionWindow:
        return AttentionWindow(self.max_attention_tokens, self.tile, self.overlap, self.halo, self.window_batch)

    @classmethod
    def for_device(cls, device: str | torch.device) -> "TilingBudget":
        """Default budget: on CPU global attention over more than 64×64 positions is slow
        (quadratic), so CPU windows attention above 4,096 positions (e.g. the fusion network
        at 256×256 images and up) with windows of 32 (overlap 8, no halo): the fusion network
        of the `real` profile at 640×480 takes 0.84 s per call with windows of 32 against
        1.87 s with windows of 64 (one thread), and 32 latent positions are the 128-pixel
        crops it is trained on."""
        if torch.device(device).type == "cpu":
            return cls(max_attention_tokens=4096, tile=32, overlap=8, halo=0)
        return cls()

    @classmethod
    def forced(cls, tile: int, overlap: int | None = None, **kw) -> "TilingBudget":
        """Always window attention with ``tile``×``tile`` windows (overlap and halo default
        to tile/4; networks and autoencoder are tiled at the default budgets);
        ``tile <= 0`` never windows or tiles anything."""
        if tile <= 0:
            never = 1 << 62
            return cls(max_attention_tokens=never, max_latent_pixels=never, max_image_pixels=never, **kw)
        ov = min(overlap if overlap is not None else max(tile // 4, 1), tile - 1)
        args = dict(max_attention_tokens=0, tile=tile, overlap=ov, halo=ov)
        args.update(kw)
        return cls(**args)


# --------------------------------------------------------------------------- tiles and weights


def _blend(
    fn: Callable[[list[Tensor], int], Sequence[Tensor | None]],
    inputs: Sequence[Tensor],
    *,
    tile: int,
    overlap: int,
    halo: int = 0,
    in_scales: Sequence[int] | None = None,
    out_scale: int = 1,
    tile_batch: int = 4,
    before_chunk: Callable[[list], None] | None = None,
) -> list[Tensor | None]:
    """Run ``fn`` on overlapping windows of ``inputs`` and blend the outputs.

    Coordinates live on a base grid of size (H, W) = the last input's size divided by its
    scale; input ``i`` has ``in_scales[i]`` pixels per base pixel (default 1), outputs have
    ``out_scale``. Each tile's core (``tile`` base pixels, ``overlap`` between neighbours)
    is computed from a window with ``halo`` base pixels of context on every side; only the
    core enters the blend, with raised-cosine ramps over the overlap.
    ``fn(window_inputs, k)`` receives the inputs of ``k`` windows concatenated along the
    batch (window-major) and returns per-pixel outputs (or None) at ``out_scale``.
    ``before_chunk(chunk)`` is called before each ``fn`` call with the chunk's
    ``(y_axis, x_axis)`` window tuples (see :func:`_windows`).
    """
    in_scales = list(in_scales or [1] * len(inputs))
    B = inputs[0].shape[0]
    H, W = inputs[0].shape[-2] // in_scales[0], inputs[0].shape[-1] // in_scales[0]
    tiles = [(ry, rx) for ry in tile_windows(H, tile, overlap, halo) for rx in tile_windows(W, tile, overlap, halo)]
    so = out_scale
    Ho, Wo = H * so, W * so
    acc: list[Tensor | None] = []
    wsum: Tensor | None = None
    for c0 in range(0, len(tiles), max(1, tile_batch)):
        chunk = tiles[c0:c0 + max(1, tile_batch)]
        k = len(chunk)
        tile_in = [
            torch.cat([x[..., wy * sc:(wy + nwy) * sc, wx * sc:(wx + nwx) * sc]
                       for ((_, _, wy, nwy, _, _), (_, _, wx, nwx, _, _)) in chunk], dim=0)
            for x, sc in zip(inputs, in_scales)
        ]
        if before_chunk is not None:
            before_chunk(chunk)
        outs = fn(tile_in, k)
        if wsum is None:
            dev = inputs[0].device
            acc = [None if o is None else torch.zeros((B, o.shape[1], Ho, Wo), dtype=torch.float32, device=o.device)
                   for o in outs]
            wsum = torch.zeros((1, 1, Ho, Wo), dtype=torch.float32, device=dev)
        for j, ((cy, ny, wy, _, _, _), (cx, nx, wx, _, _, _)) in enumerate(chunk):
            wt = (blend_weight_1d(ny * so, cy * so, Ho, overlap * so, device=wsum.device)[:, None]
                  * blend_weight_1d(nx * so, cx * so, Wo, overlap * so, device=wsum.device)[None, :])[None, None]
            ys, xs = cy * so, cx * so
            wsum[..., ys:ys + ny * so, xs:xs + nx * so] += wt
            oy, ox = (cy - wy) * so, (cx - wx) * so
            for a, o in zip(acc, outs):
                if a is not None:
                    part = o[j * B:(j + 1) * B, :, oy:oy + ny * so, ox:ox + nx * so].float()
                    a[..., ys:ys + ny * so, xs:xs + nx * so] += part * wt.to(a.device)
    return [None if a is None else a / wsum.to(a.device) for a in acc]


def _check_tile(tile: int, overlap: int, multiple: int, what: str) -> tuple[int, int]:
    if tile < 1 or overlap < 0:
        raise ConfigError(f"{what}: tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    tile = round_up(int(tile), multiple)
    overlap = round_up(int(overlap), multiple)
    if overlap >= tile:
        overlap = tile - multiple
    return tile, overlap


# --------------------------------------------------------------------------- wrappers


class _Wrapper(nn.Module):
    """What every wrapper exposes of the wrapped network: its size multiple and config."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.multiple = net_multiple(net)
        self.config = getattr(unwrap(net), "config", None)

    def required_multiple(self) -> int:
        return self.multiple


class _TiledNet(_Wrapper):
    """A wrapper that runs its network on overlapping latent tiles: ``tile``, ``overlap`` and
    ``halo`` (context added around each tile, default ``overlap``) are latent pixels,
    rounded up to the network's size multiple; ``tile_batch`` tiles per call."""

    def __init__(self, net: nn.Module, tile: int, overlap: int, halo: int | None, tile_batch: int):
        super().__init__(net)
        self.tile, self.overlap = _check_tile(tile, overlap, self.multiple, type(self).__name__)
        self.halo = round_up(max(int(self.overlap if halo is None else halo), 0), self.multiple)
        self.tile_batch = int(tile_batch)

    @staticmethod
    def _timesteps(t: Tensor | int | float, like: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=like.device)
        return t.expand(like.shape[0]) if t.ndim == 0 else t


class WindowedAttention(_Wrapper):
    """A UNet or fusion network whose attention maps above ``window.max_tokens`` positions
    are windowed (regime 2 of the module docstring); everything else runs on the whole
    input. ``forward(*args)`` = ``net(*args, attn_window=window)``."""

    def __init__(self, net: nn.Module, window: AttentionWindow):
        super().__init__(net)
        self.net = net
        self.window = window

    def forward(self, *args):
        return self.net(*args, attn_window=self.window)


class TiledDenoiser(_TiledNet):
    """A conditional UNet run on overlapping latent tiles: ``forward(z_t, t, cond) -> eps``
    (tile geometry as in :class:`_TiledNet`)."""

    def __init__(self, unet: nn.Module, tile: int = 64, overlap: int = 16, *, halo: int | None = None,
                 tile_batch: int = 4):
        super().__init__(unet, tile, overlap, halo, tile_batch)
        self.unet = unet

    def forward(self, z_t: Tensor, t: Tensor | int | float, cond: Tensor) -> Tensor:
        t = self._timesteps(t, z_t)

        def run(xs: list[Tensor], k: int) -> tuple[Tensor]:
            return (self.unet(xs[0], t.repeat(k), xs[1]),)

        return _blend(run, [z_t, cond], tile=self.tile, overlap=self.overlap, halo=self.halo,
                      tile_batch=self.tile_batch)[0]


class TiledFusion(_TiledNet):
    """The fusion network (+ segmentation head) run on overlapping latent tiles.

    Returns a ``FusionOutput`` whose ``w`` and ``seg_logits`` (= ``seg_state``) are
    blended over tiles; ``zeta`` is an empty list (attention features are per tile)."""

    def __init__(self, fusion: nn.Module, tile: int = 64, overlap: int = 16, *, halo: int | None = None,
                 tile_batch: int = 4):
        super().__init__(fusion, tile, overlap, halo, tile_batch)
        self.fusion = fusion

    def forward(self, zhat_psi: Tensor, zhat_phi: Tensor, z_f: Tensor, eps_psi: Tensor, eps_phi: Tensor,
                t: Tensor | int | float, seg_state: Tensor | None):

        t = self._timesteps(t, z_f)
        has_state = seg_state is not None
        inputs = [zhat_psi, zhat_phi, z_f, eps_psi, eps_phi] + ([seg_state] if has_state else [])

        def run(xs: list[Tensor], k: int):
            out = self.fusion(*xs[:5], t.repeat(k), xs[5] if has_state else None)
            return (out.w, out.seg_logits)

        w, seg = _blend(run, inputs, tile=self.tile, overlap=self.overlap, halo=self.halo,
                        tile_batch=self.tile_batch)
        state = seg if seg is not None else seg_state
        return FusionOutput(w, seg, state, [])


class _NormOverride:
    """Replace every InstanceNorm of a module by a normalisation with given statistics.

    Modes: ``"record"`` — normal InstanceNorm, and its (per-sample, per-channel) mean and
    variance are kept (used on the proxy); ``"apply"`` — normalise with the kept
    statistics; ``"accumulate"`` — like ``"apply"``, and also sum the pre-norm activations
    over each window's owned region (set by :meth:`set_windows`), so that
    :meth:`finish_pass` can replace the kept statistics by the whole-image ones.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.InstanceNorm2d)]
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}
        self._sums: dict[int, list[Tensor]] = {}
        self._windows: list = []

    def set_windows(self, chunk: list) -> None:
        self._windows = chunk

    def _accumulate(self, idx: int, xf: Tensor) -> None:
        k = len(self._windows)
        B = xf.shape[0] // k
        sums = self._sums.setdefault(idx, [0.0, 0.0, 0])
        for j, ((_, _, wy, nwy, oy0, oy1), (_, _, wx, nwx, ox0, ox1)) in enumerate(self._windows):
            sy, sx = xf.shape[-2] / nwy, xf.shape[-1] / nwx  # activation pixels per base pixel
            y0, y1 = int(round((oy0 - wy) * sy)), int(round((oy1 - wy) * sy))
            x0, x1 = int(round((ox0 - wx) * sx)), int(round((ox1 - wx) * sx))
            part = xf[j * B:(j + 1) * B, :, y0:y1, x0:x1].double()
            sums[0] = sums[0] + part.sum(dim=(2, 3))
            sums[1] = sums[1] + (part * part).sum(dim=(2, 3))
            sums[2] += part.shape[-2] * part.shape[-1]

    def finish_pass(self) -> None:
        for idx, (s1, s2, n) in self._sums.items():
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0.0)
            self.stats[idx] = (mean.float(), var.float())
        self._sums.clear()

    def _forward(self, idx: int, norm: nn.InstanceNorm2d, mode: str):
        def fwd(x: Tensor) -> Tensor:
            xf = x.float()
            if mode == "record":
                var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False)
                self.stats[idx] = (mean, var)
            else:
                if mode == "accumulate":
                    self._accumulate(idx, xf)
                mean, var = self.stats[idx]
                reps = x.shape[0] // mean.shape[0]
                mean, var = mean.repeat(reps, 1), var.repeat(reps, 1)
            y = (xf - mean[:, :, None, None]) * torch.rsqrt(var[:, :, None, None] + norm.eps)
            if norm.affine:
                y = y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
            return y.to(x.dtype)

        return fwd

    @contextlib.contextmanager
    def active(self, mode: str) -> Iterator[None]:
        try:
            for i, n in enumerate(self.norms):
                n.forward = self._forward(i, n, mode)  # instance attribute shadows the class method
            yield
        finally:
            for n in self.norms:
                n.__dict__.pop("forward", None)
            self._sums.clear()
            self._windows = []


class TiledAutoEncoder(nn.Module):
    """``encode``/``decode`` of an :class:`~magicfuse.models.AutoEncoder` on overlapping
    image-space tiles (``tile``, ``overlap``, ``halo`` in image pixels, rounded up to
    multiples of 4), with the InstanceNorm statistics taken from a downscaled proxy of
    the whole input (see the module docstring). The default halo of 64 pixels covers
    the decoder's receptive field (≈50 pixels), so with exact statistics tiling would be
    exact. Inputs that fit in one tile go through the plain autoencoder."""

    def __init__(self, ae: nn.Module, tile: int = 512, overlap: int = 64, *, halo: int = 64, proxy: int = 256,
                 stat_passes: int = 0, tile_batch: int = 1):
        super().__init__()
        self.ae = ae
        d = LATENT_DOWNSCALE
        self.tile, self.overlap = _check_tile(tile, overlap, d, type(self).__name__)
        self.halo = round_up(max(int(halo), 0), d)
        self.proxy = max(int(proxy), 4 * d)
        self.stat_passes = max(int(stat_passes), 0)
        self.tile_batch = int(tile_batch)
        self.config = ae.config
        self._enc_norms = _NormOverride(ae.encoder)
        self._dec_norms = _NormOverride(ae.decoder)

    def noise_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        return self.ae.noise_shape(x)

    def _proxy_size(self, H: int, W: int) -> tuple[int, int]:
        d = LATENT_DOWNSCALE
        s = min(1.0, self.proxy / max(H, W))
        return max(d, round_up(int(round(H * s)), d)), max(d, round_up(int(round(W * s)), d))

    def encode(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None, *,
               noise_scale: float | None = None) -> Tensor:
        ae, d = self.ae, LATENT_DOWNSCALE
        ae._check_image(x)
        H, W = x.shape[-2:]
        if H <= self.tile and W <= self.tile:
            return ae.encode(x, noise, generator, noise_scale=noise_scale)
        noise = ae.make_noise(x, noise, generator, noise_scale, where="TiledAutoEncoder.encode")
        ph, pw = self._proxy_size(H, W)
        px = F.interpolate(x, size=(ph, pw), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        pn = F.interpolate(noise, size=(ph // d, pw // d), mode="nearest")
        with self._enc_norms.active("record"):
            ae.encoder(px, pn)

        def run(xs: list[Tensor], k: int):
            return (ae.encoder(xs[1], xs[0]),)

        s = self._tiled(self._enc_norms, run, [noise, x], in_scales=[1, d], out_scale=1)
        return s * 2.0 - 1.0

    def _tiled(self, norms: _NormOverride, run, inputs, *, in_scales, out_scale) -> Tensor:
        d = LATENT_DOWNSCALE
        kw = dict(tile=self.tile // d, overlap=self.overlap // d, halo=self.halo // d, in_scales=in_scales,
                  out_scale=out_scale, tile_batch=self.tile_batch, before_chunk=norms.set_windows)
        for _ in range(self.stat_passes):  # refine the proxy statistics into whole-image ones
            with norms.active("accumulate"):
                _blend(lambda xs, k: tuple(None for _ in run(xs, k)), inputs, **kw)
                norms.finish_pass()
        with norms.active("apply"):
            return _blend(run, inputs, **kw)[0]

    def decode(self, z: Tensor) -> Tensor:
        ae, d = self.ae, LATENT_DOWNSCALE
        c = ae.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise DataError(f"TiledAutoEncoder.decode: expected a latent batch (B,{c},h,w), got shape {tuple(z.shape)}")
        h, w = z.shape[-2:]
        if h * d <= self.tile and w * d <= self.tile:
            return ae.decode(z)
        s = ((z + 1.0) / 2.0).clamp(0.0, 1.0)
        ph, pw = self._proxy_size(h * d, w * d)
        ps = F.interpolate(s, size=(ph // d, pw // d), mode="bilinear", antialias=True, align_corners=False)
        with self._dec_norms.active("record"):
            ae.decoder(ps)

        def run(xs: list[Tensor], k: int):
            return (ae.decoder(xs[0]),)

        return self._tiled(self._dec_norms, run, [s], in_scales=[1], out_scale=d)

    def forward(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.encode(x, noise, generator))


# --------------------------------------------------------------------------- decision


def needs_tiling(image_hw: tuple[int, int], budget: TilingBudget, multiple: int = 16) -> tuple[str, bool]:
    """(regime of the latent networks — ``"whole"``, ``"windowed"`` or ``"tiled"`` —, tile the
    autoencoder?) for an image of ``image_hw``."""
    H, W = round_up(int(image_hw[0]), multiple), round_up(int(image_hw[1]), multiple)
    h, w = H // LATENT_DOWNSCALE, W // LATENT_DOWNSCALE
    if h * w > budget.max_latent_pixels:
        regime = "tiled"
    elif budget.window.applies(h, w):
        regime = "windowed"
    else:
        regime = "whole"
    return regime, H * W > budget.max_image_pixels


def wrap_for_tiling(nets, image_hw: tuple[int, int], budget: TilingBudget | None = None):
    """``nets`` (a ``MagicFuseNets``) with windowed/tiled wrappers where ``image_hw`` exceeds
    ``budget``.

    Returns a new ``MagicFuseNets`` (the same object when nothing is needed); the wrapped
    networks are shared, not copied.
    """
    budget = budget or TilingBudget()
    mult = required_multiple(nets)
    regime, tile_ae = needs_tiling(image_hw, budget, mult)
    if regime == "whole" and not tile_ae:
        return nets
    changes = {}
    if regime != "whole":
        kw = dict(tile=budget.net_tile, overlap=budget.net_overlap, halo=budget.net_halo, tile_batch=budget.tile_batch)
        for name in ("ikr", "ckg", "fusion"):
            net = getattr(nets, name)
            if net is None or isinstance(net, (WindowedAttention, TiledDenoiser, TiledFusion)):
                continue
            windowed = WindowedAttention(net, budget.window)
            if regime == "windowed":
                changes[name] = windowed
            else:
                changes[name] = (TiledFusion if name == "fusion" else TiledDenoiser)(windowed, **kw)
    if tile_ae and not isinstance(nets.ae, TiledAutoEncoder):
        changes["ae"] = TiledAutoEncoder(nets.ae, budget.ae_tile, budget.ae_overlap, halo=budget.ae_halo,
                                         proxy=budget.proxy)
    return dataclasses.replace(nets, **changes)
