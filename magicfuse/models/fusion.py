"""Knowledge-fusion network F (eq. 8–9) with the segmentation head S (eq. 10), and eq. 11.

Parameter names and shapes equal the authors' MKF checkpoint. Data flow, per DDIM step
(all at latent resolution h×w):

* ``inconv``: 3×3 conv + SiLU on ``cat(ẑ0^ψ, ẑ0^φ, z_t^f)`` (3·8 = 24 → width).
* ``blocks[i]`` (5 in the paper): ``res1``, ``res2`` (time-conditioned residual blocks,
  GroupNorm + SiLU + conv, ``temb_proj``) → feature ζ_{2i}; ``mlp`` (1×1 convs
  width+16 → 2·width → width) re-injecting both predicted noises ``cat(x, ε^ψ, ε^φ)``;
  ``att`` (GroupNorm, 1×1 q/k/v, full-resolution single-head self-attention — over
  overlapping windows for big maps when ``attn_window`` is given, see
  :mod:`magicfuse.models.attention` —, 1×1 ``proj_out``, residual) → feature ζ_{2i+1}.
* ``normout`` (1×1 conv width → 8) then ``estimate`` (3×3 conv 24 → width, 3×3 conv
  width → 8, no activation in between) on ``cat(normout(x), ε^ψ, ε^φ)``: the
  per-channel, per-pixel weight **w** (not squashed by a sigmoid, as in the authors'
  code).
* Segmentation head S: the recurrent state z^s (C channels, started from Gaussian
  noise by the sampler) is refined by one 3×3 conv per attention feature, in order:
  ``s ← segproj[j](cat(ζ_j, s))`` for j = 0..2·blocks−1 (two features per block, so
  10 convs for 5 blocks). The result is both this step's segmentation logits (latent
  resolution; the loss upsamples them ×4) and the next step's state.

Ablation flags: ``use_zhat=False`` (Model I) feeds zeros in the two ẑ0 slots of the
input, so F sees only ``z_t^f`` and the noises (the parameter layout is unchanged);
``seg_head=False`` (Model II) removes ``segproj``: ``seg_logits`` is None and the
state is passed through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from magicfuse.data.classes import THERMAL_CLASSES
from magicfuse.errors import ConfigError, DataError
from magicfuse.models.attention import AttentionWindow, spatial_attention


@dataclass(frozen=True)
class FusionConfig:
    latent_channels: int = 8
    channels: int = 96
    num_blocks: int = 5
    num_classes: int = 9
    num_groups: int = 32
    dropout: float = 0.0
    use_zhat: bool = True  # False: Model I (F without the ẑ0 inputs)
    seg_head: bool = True  # False: Model II (no segmentation head)


class FusionOutput(NamedTuple):
    w: torch.Tensor  # (B,8,h,w) fusion weight, eq. 8: eps_f = w·eps_psi + (1−w)·eps_phi
    seg_logits: torch.Tensor | None  # (B,C,h,w) at latent resolution
    seg_state: torch.Tensor | None  # the next step's z^s (the logits themselves)
    zeta: list[torch.Tensor]  # attention features ζ fed to S, 2 per block


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM (fairseq) sinusoidal embedding used by F: [sin, cos], f_i = 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, temb_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(ch, groups)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, ch)
        self.norm2 = _norm(ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions (memory grows with (h·w)²)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, window: AttentionWindow | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        a = spatial_attention(q, k, v, (h, w), window)  # (B,1,hw,c), scale c^-1/2
        a = a[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(a)


class FusionBlock(nn.Module):
    def __init__(self, ch: int, temb_ch: int, noise_ch: int, groups: int, dropout: float):
        super().__init__()
        self.res1 = ResnetBlock(ch, temb_ch, groups, dropout)
        self.res2 = ResnetBlock(ch, temb_ch, groups, dropout)
        self.mlp = nn.Sequential(nn.Conv2d(ch + noise_ch, ch * 2, 1), nn.SiLU(), nn.Conv2d(ch * 2, ch, 1))
        self.att = AttnBlock(ch, groups)


class FusionNet(nn.Module):
    """F and S. ``forward(zhat_psi, zhat_phi, z_f, eps_psi, eps_phi, t, seg_state) -> FusionOutput``."""

    def __init__(self, cfg: FusionConfig | None = None):
        super().__init__()
        cfg = cfg or FusionConfig()
        self.config = cfg
        ch, lc, nc = cfg.channels, cfg.latent_channels, cfg.num_classes
        if ch % cfg.num_groups:
            raise ConfigError(f"FusionConfig: channels={ch} is not divisible by num_groups={cfg.num_groups}")
        temb = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inconv = nn.Sequential(nn.Conv2d(lc * 3, ch, 3, padding=1), nn.SiLU())
        self.normout = nn.Conv2d(ch, lc, 1)
        self.estimate = nn.Sequential(nn.Conv2d(lc * 3, ch, 3, padding=1), nn.Conv2d(ch, lc, 3, padding=1))
        self.blocks = nn.ModuleList(
            FusionBlock(ch, temb, 2 * lc, cfg.num_groups, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        if cfg.seg_head:
            self.segproj = nn.ModuleList(
                nn.Conv2d(ch + nc, nc, 3, padding=1) for _ in range(2 * cfg.num_blocks)
            )

    def forward(
        self,
        zhat_psi: torch.Tensor,
        zhat_phi: torch.Tensor,
        z_f: torch.Tensor,
        eps_psi: torch.Tensor,
        eps_phi: torch.Tensor,
        t: torch.Tensor | int | float,
        seg_state: torch.Tensor | None,
        *,
        attn_window: AttentionWindow | None = None,
    ) -> FusionOutput:
        cfg = self.config
        shape = z_f.shape
        if z_f.ndim != 4 or shape[1] != cfg.latent_channels:
            raise DataError(f"FusionNet: z_f must be (B,{cfg.latent_channels},h,w), got {tuple(shape)}")
        for name, x in (("zhat_psi", zhat_psi), ("zhat_phi", zhat_phi), ("eps_psi", eps_psi), ("eps_phi", eps_phi)):
            if x.shape != shape:
                raise DataError(f"FusionNet: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} like z_f")
        b, _, h, w = shape
        if cfg.seg_head:
            want = (b, cfg.num_classes, h, w)
            if seg_state is None or tuple(seg_state.shape) != want:
                got = None if seg_state is None else tuple(seg_state.shape)
                raise DataError(f"FusionNet: seg_state must have shape {want} (start it from Gaussian noise), got {got}")
        t = torch.as_tensor(t, device=z_f.device)
        if t.ndim == 0:
            t = t.expand(b)
        temb = self.time_embed(timestep_embedding(t, cfg.channels).to(z_f.dtype))
        if cfg.use_zhat:
            x = torch.cat([zhat_psi, zhat_phi, z_f], dim=1)
        else:
            x = torch.cat([torch.zeros_like(z_f), torch.zeros_like(z_f), z_f], dim=1)
        x = self.inconv(x)
        zeta: list[torch.Tensor] = []
        for block in self.blocks:
            x = block.res2(block.res1(x, temb), temb)
            zeta.append(x)
            x = block.att(block.mlp(torch.cat([x, eps_psi, eps_phi], dim=1)), attn_window)
            zeta.append(x)
        weight = self.estimate(torch.cat([self.normout(x), eps_psi, eps_phi], dim=1))
        if not cfg.seg_head:
            return FusionOutput(weight, None, seg_state, zeta)
        s = seg_state.to(x.dtype)
        for proj, feat in zip(self.segproj, zeta):
            s = proj(torch.cat([feat, s], dim=1))
        return FusionOutput(weight, s, s, zeta)


def thermal_mask(seg_logits: torch.Tensor, thermal_classes: Sequence[int]) -> torch.Tensor:
    """M of eq. 11: (B,1,h,w) float, 1 where argmax over classes is a thermal class."""
    pred = seg_logits.argmax(dim=1, keepdim=True)
    mask = torch.zeros_like(pred, dtype=torch.bool)
    for c in thermal_classes:
        mask |= pred == int(c)
    return mask.to(seg_logits.dtype)


def radiation_weight(
    w: torch.Tensor,
    seg_logits: torch.Tensor | None,
    thermal_classes: Sequence[int] = THERMAL_CLASSES,
    tau: float = 0.4,
) -> torch.Tensor:
    """Eq. 11: w^r = M·min(w, τ) + (1−M)·w, M = [argmax(seg) ∈ thermal_classes].

    Where S marks a warm object, the IKR weight is capped at τ so that at least 1−τ
    of the CKG (infrared-like) noise enters. ``seg_logits`` None (Model II, no head)
    means no mask: w is returned unchanged.
    """
    if seg_logits is None:
        return w
    if seg_logits.ndim != 4 or seg_logits.shape[0] != w.shape[0] or seg_logits.shape[-2:] != w.shape[-2:]:
        raise DataError(
            f"radiation_weight: seg_logits {tuple(seg_logits.shape)} do not match w {tuple(w.shape)} "
            "(same batch and latent size expected)"
        )
    m = thermal_mask(seg_logits, thermal_classes).to(w.dtype)
    return m * torch.clamp(w, max=tau) + (1 - m) * w
