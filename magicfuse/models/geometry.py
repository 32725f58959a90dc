"""Size and window geometry shared by the networks, the tiling wrappers and the sampler.

A leaf module (it imports nothing of ours but the errors), so that the attention layers,
`magicfuse.tiling` and `magicfuse.diffusion.sampler` can all use it without importing
each other:

* `LATENT_DOWNSCALE`: the autoencoder's spatial factor (image pixels per latent pixel);
* `unwrap`: the module behind a ``torch.compile`` wrapper;
* `net_multiple` / `required_multiple`: the latent-size multiple one UNet (or wrapper) needs,
  and the image-size multiple a whole pipeline needs;
* `round_up`, `tile_starts`, `tile_windows`, `blend_weight_1d`: overlapping tiles and
  their raised-cosine blend weights (window attention and tiled inference).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from magicfuse.errors import ConfigError

LATENT_DOWNSCALE = 4


def unwrap(m: nn.Module) -> nn.Module:
    """The original module behind a torch.compile wrapper (the module itself otherwise)."""
    return getattr(m, "_orig_mod", m)


def net_multiple(net: nn.Module) -> int:
    """Latent-size multiple a network needs: its ``required_multiple`` (a wrapper's, or a
    fusion network's), else 2^(levels-1) of a UNet config's ``channel_mult``, else 1."""
    m = unwrap(net)
    rm = getattr(m, "required_multiple", None)
    if rm is not None:
        return int(rm() if callable(rm) else rm)
    mult = getattr(getattr(m, "config", None), "channel_mult", None)
    return 2 ** (len(mult) - 1) if mult is not None else 1


def required_multiple(nets: Any) -> int:
    """Image height/width multiple a pipeline (``MagicFuseNets``: ``ikr``, ``ckg``, ``fusion``,
    each may be None) needs: `LATENT_DOWNSCALE` × the lcm of its networks' latent multiples."""
    lat = 1
    for net in (nets.ikr, nets.ckg, nets.fusion):
        if net is not None:
            lat = math.lcm(lat, net_multiple(net))
    return LATENT_DOWNSCALE * lat


def padded_latent_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Latent (h, w) of an image padded up to `multiple` (the sampler's padding)."""
    return round_up(height, multiple) // LATENT_DOWNSCALE, round_up(width, multiple) // LATENT_DOWNSCALE


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least
    ``overlap`` overlap; the last tile ends at ``length``. One tile at 0 if it fits."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ConfigError(f"tiling: overlap {overlap} must be smaller than tile {tile}")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_weight_1d(n: int, start: int, length: int, ramp: int, *, device=None) -> Tensor:
    """Weights of one tile along one axis: raised-cosine rise over ``ramp`` pixels at
    every edge that lies inside the image, 1 elsewhere (always > 0)."""
    w = torch.ones(n, dtype=torch.float32, device=device)
    r = min(ramp, n)
    if r > 0:
        x = (torch.arange(r, dtype=torch.float32, device=device) + 0.5) / r
        rise = torch.sin(0.5 * math.pi * x) ** 2
        if start > 0:
            w[:r] = torch.minimum(w[:r], rise)
        if start + n < length:
            w[n - r:] = torch.minimum(w[n - r:], rise.flip(0))
    return w


def tile_windows(length: int, tile: int, overlap: int, halo: int) -> list[tuple[int, int, int, int, int, int]]:
    """Per tile along one axis: (core start, core size, window start, window size,
    owned start, owned end).

    Cores of size ``tile`` overlap by ``overlap``; each window adds up to ``halo`` pixels of
    context on both sides, shifted inside ``[0, length)`` so that all windows share one size.
    The owned ranges partition ``[0, length)`` (split at the middle of each overlap); they
    are used to accumulate statistics once per pixel."""
    core = min(tile, length)
    win = min(core + 2 * halo, length)
    starts = tile_starts(length, tile, overlap)
    cuts = [0] + [(starts[i] + starts[i - 1] + core) // 2 for i in range(1, len(starts))] + [length]
    out = []
    for i, s in enumerate(starts):
        ws = min(max(s - halo, 0), length - win)
        out.append((s, core, ws, win, cuts[i], cuts[i + 1]))
    return out
