"""Conditional latent-diffusion UNet (the IKR branch Ψ and the CKG branch Φ).

An LDM "openaimodel"-style UNet whose parameter names and shapes equal the
authors' checkpoints (``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``), so their state dicts load as they are.

* sinusoidal timestep embedding ([cos, sin], max period 10000) → MLP of width 4·ch;
* ResBlocks: GroupNorm, SiLU, 3×3 conv, + emb_layers(SiLU, Linear), GroupNorm, SiLU,
  dropout, 3×3 conv (zero-initialised), 1×1 skip conv when the width changes;
* SpatialTransformer at the chosen downsample factors and in the middle block:
  GroupNorm, 1×1 proj_in, BasicTransformerBlock (attn1 self-attention, attn2 —
  also self-attention because the model has no text context —, GEGLU feed-forward,
  LayerNorms norm1..3), 1×1 proj_out (zero-initialised), residual;
* conv Downsample (3×3 stride 2) / nearest Upsample + 3×3 conv. The upsampler
  resizes to the size of the matching skip tensor, so any latent size works
  (odd sizes included).

Input: ``cat(cond, z_t)`` (16 channels, condition FIRST as in the authors' code);
output (8 channels): the predicted noise ε, or v = √ᾱ·ε − √(1−ᾱ)·z0 when
``UNetConfig.prediction == "v"`` (`prediction_of` tells consumers which). Attention runs through
``torch.nn.functional.scaled_dot_product_attention``, over overlapping windows for big
maps when an ``attn_window`` is given (see :mod:`magicfuse.models.attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from magicfuse.models.attention import AttentionWindow, spatial_attention
from magicfuse.errors import ConfigError, DataError


PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class UNetConfig:
    latent_channels: int = 8  # z_t and cond channels each; input = 2×, output = 1×
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 8)  # downsample factors with attention
    num_heads: int = 4
    transformer_depth: int = 1
    dropout: float = 0.0
    num_groups: int = 32
    # What the network outputs: "eps" (the noise, eq. 7; the authors' checkpoints) or "v"
    # (√ᾱ·ε − √(1−ᾱ)·z0). Consumers turn either into ε with `predicted_eps`; v is far
    # better conditioned at high t for small networks (docs/QUALITY.md).
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"UNetConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")


def prediction_of(net: nn.Module) -> str:
    """What a denoiser outputs ("eps" or "v"), read from its config through any wrapper
    (torch.compile, DDP and the tiling wrappers all expose the wrapped network's `config`)."""
    cfg = getattr(getattr(net, "_orig_mod", net), "config", None)
    return getattr(cfg, "prediction", "eps")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM sinusoidal embedding: [cos(t·f), sin(t·f)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under bf16/fp16), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention (to_q/to_k/to_v without bias, to_out.0 linear)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, hw: tuple[int, int], window: AttentionWindow | None = None) -> torch.Tensor:
        """Self-attention over the ``hw`` map whose positions are the tokens of ``x``."""
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = spatial_attention(q, k, v, hw, window)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], window: AttentionWindow | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), hw, window) + x
        x = self.attn2(self.norm2(x), hw, window) + x  # no text context: self-attention again
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, dropout: float, groups: int):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"UNetConfig: {channels} channels are not divisible by num_heads={heads}")
        self.norm = GroupNorm32(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, dropout) for _ in range(depth)
        )
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, window: AttentionWindow | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, (h, w), window)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(y) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x.float(), scale_factor=2, mode="nearest").type(x.dtype)
        else:
            x = F.interpolate(x.float(), size=size, mode="nearest").type(x.dtype)
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that feeds the timestep embedding / target size / attention window to the
    layers that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None,
                window: AttentionWindow | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, window)
            else:
                x = layer(x)
        return x


class ConditionalUNet(nn.Module):
    """``forward(z_t, t, cond) -> eps``; z_t, cond ``(B,8,h,w)``, t ``(B,)`` (or a scalar).

    ``attn_window`` (an :class:`~magicfuse.models.attention.AttentionWindow`) makes the
    attention of maps bigger than its ``max_tokens`` windowed (big images)."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.config = cfg
        mc, groups, drop = cfg.model_channels, cfg.num_groups, cfg.dropout
        widths = [mc * m for m in cfg.channel_mult]
        for w in [mc, *widths]:
            if w % groups:
                raise ConfigError(f"UNetConfig: width {w} is not divisible by num_groups={groups}")
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attn(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, drop, groups)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(2 * cfg.latent_channels, mc, 3, padding=1))]
        )
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, drop, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, drop, groups), attn(ch), ResBlock(ch, emb_dim, ch, drop, groups)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, mc * mult, drop, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(mc, cfg.latent_channels, 3, padding=1)))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor | int | float, cond: torch.Tensor, *,
                attn_window: AttentionWindow | None = None) -> torch.Tensor:
        c = self.config.latent_channels
        if z_t.ndim != 4 or z_t.shape[1] != c or cond.shape != z_t.shape:
            raise DataError(
                f"ConditionalUNet: z_t and cond must both be (B,{c},h,w), got {tuple(z_t.shape)} and {tuple(cond.shape)}"
            )
        b = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(z_t.dtype))
        h = torch.cat([cond, z_t], dim=1)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, None, attn_window)
            hs.append(h)
        h = self.middle_block(h, emb, None, attn_window)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            size = tuple(hs[-1].shape[-2:]) if hs else None
            h = module(h, emb, size, attn_window)
        return self.out(h)
