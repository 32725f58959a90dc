"""Spatial self-attention, global or over overlapping windows (for big images).

Both attention layers of the model (the UNets' ``Attention`` inside each
``SpatialTransformer`` and the fusion network's ``AttnBlock``) call
:func:`spatial_attention`. With no :class:`AttentionWindow` (the default, and whenever the
map has at most ``window.max_tokens`` positions) it is plain
``scaled_dot_product_attention`` over all h·w positions, as in the paper.

Above ``max_tokens`` the queries are split into ``tile``×``tile`` cores that overlap by
``overlap`` positions; each core attends to the keys/values of its core plus ``halo``
positions of context on every side, and the outputs are blended with the same
raised-cosine weights as the tiled networks (:func:`magicfuse.tiling.blend_weight_1d`,
weights sum to one at every position). Everything else in the networks (convolutions,
GroupNorm statistics, the 1×1 q/k/v projections) still runs on the whole map, so the only
approximation is the attention context: cost and memory of attention grow linearly with
the number of positions instead of quadratically. Measured on the tiny random-weight nets
(256×320 gradient, 2 DDIM steps, window 32, overlap 8, halo 8): mean |Δ| 0.09/255 against
global attention, where tiling whole networks at the same tile size gives 11.6/255.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from magicfuse.errors import ConfigError
from magicfuse.models.geometry import blend_weight_1d, tile_windows

__all__ = ["AttentionWindow", "spatial_attention"]


@dataclass(frozen=True)
class AttentionWindow:
    """Windowed attention for maps with more than ``max_tokens`` positions.

    ``tile``: query core size (positions per side); ``overlap``: overlap of neighbouring
    cores; ``halo``: extra key/value context around each core; ``batch``: windows per
    attention call (bounds the memory of one call)."""

    max_tokens: int = 0
    tile: int = 64
    overlap: int = 16
    halo: int = 16
    batch: int = 16

    def __post_init__(self) -> None:
        if self.tile < 1 or self.batch < 1:
            raise ConfigError(f"AttentionWindow: tile and batch must be >= 1, got tile={self.tile}, batch={self.batch}")
        if self.overlap < 0 or self.halo < 0 or self.max_tokens < 0:
            raise ConfigError(f"AttentionWindow: overlap, halo and max_tokens must be >= 0, got {self}")
        if self.overlap >= self.tile:
            raise ConfigError(f"AttentionWindow: overlap ({self.overlap}) must be smaller than tile ({self.tile})")

    def applies(self, h: int, w: int) -> bool:
        return h * w > self.max_tokens and (h > self.tile or w > self.tile)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int],
                      window: AttentionWindow | None = None) -> Tensor:
    """Self-attention of ``q``, ``k``, ``v`` ``(B, heads, h·w, d)`` (positions in row-major
    order of an ``hw`` map) -> ``(B, heads, h·w, d)``; scale ``d^-1/2``."""
    h, w = int(hw[0]), int(hw[1])
    if window is None or not window.applies(h, w):
        return F.scaled_dot_product_attention(q, k, v)
    B, H, n, d = q.shape
    if n != h * w:
        raise ConfigError(f"spatial_attention: {n} positions do not form a {h}x{w} map")
    qs, ks, vs = (x.reshape(B, H, h, w, d) for x in (q, k, v))
    tiles = [(ry, rx) for ry in tile_windows(h, window.tile, window.overlap, window.halo)
             for rx in tile_windows(w, window.tile, window.overlap, window.halo)]
    out = torch.zeros((B, H, h, w, d), dtype=torch.float32, device=q.device)
    wsum = torch.zeros((h, w), dtype=torch.float32, device=q.device)
    for c0 in range(0, len(tiles), window.batch):
        chunk = tiles[c0:c0 + window.batch]
        qc = torch.cat([qs[:, :, cy:cy + ny, cx:cx + nx].reshape(B, H, ny * nx, d)
                        for (cy, ny, *_), (cx, nx, *_) in chunk])
        kc, vc = (torch.cat([x[:, :, wy:wy + nwy, wx:wx + nwx].reshape(B, H, nwy * nwx, d)
                             for (_, _, wy, nwy, *_), (_, _, wx, nwx, *_) in chunk]) for x in (ks, vs))
        o = F.scaled_dot_product_attention(qc, kc, vc)
        for j, ((cy, ny, *_), (cx, nx, *_)) in enumerate(chunk):
            wt = (blend_weight_1d(ny, cy, h, window.overlap, device=q.device)[:, None]
                  * blend_weight_1d(nx, cx, w, window.overlap, device=q.device)[None, :])
            wsum[cy:cy + ny, cx:cx + nx] += wt
            out[:, :, cy:cy + ny, cx:cx + nx] += o[j * B:(j + 1) * B].reshape(B, H, ny, nx, d).float() * wt[..., None]
    out /= wsum[..., None]
    return out.to(q.dtype).reshape(B, H, n, d)
