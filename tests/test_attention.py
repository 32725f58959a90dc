"""Windowed spatial attention (magicfuse.models.attention) against an independent
masked-softmax reference, and its use inside the UNet and the fusion network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magicfuse.errors import ConfigError
from magicfuse.models import build_model
from magicfuse.models.attention import AttentionWindow, spatial_attention
from magicfuse.models.geometry import blend_weight_1d, tile_windows


def _qkv(h: int, w: int, heads: int = 2, d: int = 4, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, h * w, d, generator=g) for _ in range(3)]


def _masked_reference(q, k, v, h, w, win: AttentionWindow):
    """Per window: attention over ALL keys with a -inf mask outside the window (no slicing),
    blended with the raised-cosine weights of the window's core."""
    out = torch.zeros_like(q)
    wsum = torch.zeros(h * w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    for cy, ny, wy, nwy, _, _ in tile_windows(h, win.tile, win.overlap, win.halo):
        for cx, nx, wx, nwx, _, _ in tile_windows(w, win.tile, win.overlap, win.halo):
            inside = (ys >= wy) & (ys < wy + nwy) & (xs >= wx) & (xs < wx + nwx)
            core = (ys >= cy) & (ys < cy + ny) & (xs >= cx) & (xs < cx + nx)
            bias = torch.where(inside, 0.0, float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, :].expand(h * w, -1))
            wt = torch.zeros(h * w)
            wt[core] = (blend_weight_1d(ny, cy, h, win.overlap)[ys[core] - cy]
                        * blend_weight_1d(nx, cx, w, win.overlap)[xs[core] - cx])
            out += o * wt[:, None]
            wsum += wt
    return out / wsum[:, None]


@pytest.mark.parametrize("h,w,tile,overlap,halo,batch", [
    (13, 21, 8, 2, 2, 16), (13, 21, 8, 2, 0, 3), (20, 9, 6, 3, 5, 1), (16, 16, 16, 4, 4, 16),
])
def test_windowed_attention_equals_masked_reference(h, w, tile, overlap, halo, batch):
    q, k, v = _qkv(h, w)
    win = AttentionWindow(max_tokens=0, tile=tile, overlap=overlap, halo=halo, batch=batch)
    got = spatial_attention(q, k, v, (h, w), win)
    assert got.shape == q.shape
    assert torch.allclose(got, _masked_reference(q, k, v, h, w, win), atol=1e-5)


def test_small_maps_and_no_window_are_plain_sdpa():
    q, k, v = _qkv(12, 10)
    full = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(spatial_attention(q, k, v, (12, 10)), full)
    assert torch.equal(spatial_attention(q, k, v, (12, 10), AttentionWindow(max_tokens=120, tile=4, overlap=1)), full)
    assert torch.equal(spatial_attention(q, k, v, (12, 10), AttentionWindow(max_tokens=0, tile=12, overlap=2)), full)
    windowed = spatial_attention(q, k, v, (12, 10), AttentionWindow(max_tokens=119, tile=4, overlap=1, halo=1))
    assert not torch.allclose(windowed, full, atol=1e-3)


def test_constant_values_stay_constant_and_batch_of_windows_does_not_matter():
    q, k, _ = _qkv(30, 17, seed=1)
    v = torch.full_like(q, 0.75)
    win = AttentionWindow(max_tokens=0, tile=7, overlap=3, halo=2, batch=1)
    assert torch.allclose(spatial_attention(q, k, v, (30, 17), win), v, atol=1e-6)
    q, k, v = _qkv(30, 17, seed=2)
    one = spatial_attention(q, k, v, (30, 17), win)
    many = spatial_attention(q, k, v, (30, 17), AttentionWindow(max_tokens=0, tile=7, overlap=3, halo=2, batch=64))
    assert torch.allclose(one, many, atol=1e-6)


def test_attention_window_rejects_bad_geometry():
    with pytest.raises(ConfigError, match="overlap"):
        AttentionWindow(tile=8, overlap=8)
    with pytest.raises(ConfigError, match="tile and batch"):
        AttentionWindow(tile=0)
    with pytest.raises(ConfigError, match=">= 0"):
        AttentionWindow(halo=-1)


def test_networks_take_the_window_and_stay_exact_when_it_covers_the_map():
    torch.manual_seed(0)
    unet = build_model("unet", "ikr-tiny").eval()
    fusion = build_model("fusion", "fusion-tiny").eval()
    with torch.no_grad():  # the UNet's output convolutions start at zero: give every weight a value
        for p in unet.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.05)
    z = torch.randn(1, 8, 24, 32)
    big = torch.randn(1, 8, 64, 64)  # ikr-tiny attends at 1/4: a 16x16 map, larger than the small window
    t = torch.tensor([500])
    seg = torch.randn(1, fusion.config.num_classes, 24, 32)
    covering = AttentionWindow(max_tokens=0, tile=32, overlap=4)
    small = AttentionWindow(max_tokens=0, tile=8, overlap=2, halo=2)
    with torch.no_grad():
        assert float(unet(z, t, z).abs().mean()) > 1e-3  # premise: the output depends on the weights
        for out in (lambda win: unet(z, t, z, attn_window=win),
                    lambda win: fusion(z, z, z, z, z, t, seg, attn_window=win).w):
            plain = out(None)
            assert torch.equal(out(covering), plain)
            windowed = out(small)
            assert windowed.shape == plain.shape and bool(torch.isfinite(windowed).all())
        # small windows change what a map larger than them attends to, in both networks
        assert not torch.allclose(unet(big, t, big, attn_window=small), unet(big, t, big))
        assert not torch.allclose(fusion(z, z, z, z, z, t, seg, attn_window=small).w, fusion(z, z, z, z, z, t, seg).w)
