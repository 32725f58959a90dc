"""The lightweight autoencoder E/D of MagicFuse.

Layout (parameter names equal the authors' released checkpoint, so their
``encoder``/``decoder`` state dicts load without renaming):

* Encoder: ``imgconv`` (3→32, InstanceNorm, LeakyReLU 0.2) → ``resnet1`` (3 residual
  blocks) → ``downsample1`` (4×4 stride-2 conv) → ``resnet2`` → ``downsample2`` →
  concatenate ``noise_channels`` channels of Gaussian noise → ``noiseconv`` (64→32)
  → ``resnet3`` → ``out`` (3×3 conv to 8, sigmoid).
* Decoder: ``input`` (8→32, ReLU) → ``resnet1`` → ``upsample1`` (bilinear ×2 + conv)
  → ``resnet2`` → ``upsample2`` → ``resnet3`` → ``deconv`` (3×3 conv to RGB, sigmoid).

Conventions (checked against the official weights on real MSRS frames, ≈35 dB):
images are ``(B,3,H,W)`` in [0,1] (infrared replicated to 3 channels); the
encoder's noise is standard normal; ``encode`` returns the sigmoid output mapped
to [-1,1] (``2s-1``); ``decode`` maps [-1,1] back to [0,1] (clamped) before the
decoder. The noise is an explicit input: pass it, or a ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from magicfuse.errors import ConfigError, DataError

DOWNSCALE = 4


@dataclass(frozen=True)
class AutoEncoderConfig:
    in_channels: int = 3
    latent_channels: int = 8
    channels: int = 32
    num_res_blocks: int = 3
    noise_channels: int = 32
    noise_scale: float = 1.0  # std of the encoder's Gaussian noise (0 = no noise)
    # "instance": the authors' non-affine InstanceNorm after every conv (needed to load their
    # weights). It normalises every feature map of every image, so the absolute brightness and
    # colour of an image survive only through border effects: from scratch it learns slowly,
    # loses colour, and a crop encodes differently from the same window of the whole frame.
    # "none": the same layers without normalisation (no parameters either way, so the state
    # dict layout is identical).
    norm: Literal["instance", "none"] = "instance"
    # Latent standardisation (LDM's "scale factor", plus a shift): encode returns
    # (z_raw - latent_shift) / latent_scale and decode undoes it, so the denoisers see
    # latents of about zero mean and unit variance, the signal-to-noise ratio the noise
    # schedule assumes. The shift is one value or one per latent channel (the AE trainer
    # measures the channel means: the authors' AE has channels whose means differ by more
    # than their spread, and a single shift/scale left its content at 0.11 of unit
    # variance); the scale is one value (the RMS spread around those means). 0 / 1 (the
    # authors' AE) leave the latents as they are.
    latent_shift: float | tuple[float, ...] = 0.0
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.norm not in ("instance", "none"):
            raise ConfigError(f"AutoEncoderConfig.norm must be 'instance' or 'none', got {self.norm!r}")
        if not self.latent_scale > 0:
            raise ConfigError(f"AutoEncoderConfig.latent_scale must be > 0, got {self.latent_scale!r}")
        if isinstance(self.latent_shift, (tuple, list)):
            if len(self.latent_shift) != self.latent_channels:
                raise ConfigError(f"AutoEncoderConfig.latent_shift: {len(self.latent_shift)} per-channel values "
                                  f"for {self.latent_channels} latent channels")
            object.__setattr__(self, "latent_shift", tuple(float(v) for v in self.latent_shift))

    def shift_for(self, z: torch.Tensor) -> torch.Tensor | float:
        """`latent_shift` broadcastable against a (B,C,h,w) latent `z`."""
        if isinstance(self.latent_shift, tuple):
            return torch.tensor(self.latent_shift, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        return self.latent_shift


def _norm(channels: int, norm: str) -> nn.Module:
    return nn.InstanceNorm2d(channels) if norm == "instance" else nn.Identity()


class ResNet(nn.Module):
    """Two (conv 3×3, norm, activation) layers plus the identity."""

    def __init__(self, channels: int, activation: str, norm: str = "instance"):
        super().__init__()
        act = (lambda: nn.LeakyReLU(0.2)) if activation == "leaky" else (lambda: nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), _norm(channels, norm), act())
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return h + x


def _conv_in_act(cin: int, cout: int, k: int, stride: int, pad: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=pad), _norm(cout, norm), nn.LeakyReLU(0.2))


def _up(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU())


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        c = cfg.channels
        self.noise_channels = cfg.noise_channels
        n = cfg.norm
        self.downsample1 = _conv_in_act(c, c, 4, 2, 1, n)
        self.downsample2 = _conv_in_act(c, c, 4, 2, 1, n)
        self.imgconv = _conv_in_act(cfg.in_channels, c, 3, 1, 1, n)
        self.noiseconv = _conv_in_act(c + cfg.noise_channels, c, 3, 1, 1, n)
        self.out = nn.Sequential(nn.Conv2d(c, cfg.latent_channels, 3, padding=1), nn.Sigmoid())
        self.resnet1 = nn.Sequential(*[ResNet(c, "leaky", n) for _ in range(cfg.num_res_blocks)])
        self.resnet2 = nn.Sequential(*[ResNet(c, "leaky", n) for _ in range(cfg.num_res_blocks)])
        self.resnet3 = nn.Sequential(*[ResNet(c, "leaky", n) for _ in range(cfg.num_res_blocks)])

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W) in [0,1], noise (B,noise_channels,H/4,W/4) -> sigmoid latent in [0,1]."""
        h = self.downsample1(self.resnet1(self.imgconv(x)))
        h = self.downsample2(self.resnet2(h))
        h = self.resnet3(self.noiseconv(torch.cat([h, noise.to(h.dtype)], dim=1)))
        return self.out(h)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        c = cfg.channels
        self.upsample1 = _up(c)
        self.upsample2 = _up(c)
        self.deconv = nn.Sequential(nn.Conv2d(c, cfg.in_channels, 3, padding=1), nn.Sigmoid())
        self.input = nn.Sequential(nn.Conv2d(cfg.latent_channels, c, 3, padding=1), nn.ReLU())
        self.resnet1 = nn.Sequential(*[ResNet(c, "relu", cfg.norm) for _ in range(cfg.num_res_blocks)])
        self.resnet2 = nn.Sequential(*[ResNet(c, "relu", cfg.norm) for _ in range(cfg.num_res_blocks)])
        self.resnet3 = nn.Sequential(*[ResNet(c, "relu", cfg.norm) for _ in range(cfg.num_res_blocks)])

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s (B,8,h,w) in [0,1] -> image (B,3,4h,4w) in [0,1]."""
        h = self.upsample1(self.resnet1(self.input(s)))
        h = self.upsample2(self.resnet2(h))
        return self.deconv(self.resnet3(h))


class AutoEncoder(nn.Module):
    """E/D pair; ``encode`` gives latents in [-1,1] at 1/4 resolution, ``decode`` inverts."""

    def __init__(self, cfg: AutoEncoderConfig | None = None):
        super().__init__()
        self.config = cfg or AutoEncoderConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def noise_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        b, _, h, w = x.shape
        return (b, self.config.noise_channels, h // DOWNSCALE, w // DOWNSCALE)

    def _check_image(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise DataError(f"AutoEncoder.encode: expected an image batch (B,{c},H,W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % DOWNSCALE or w % DOWNSCALE or h == 0 or w == 0:
            raise DataError(
                f"AutoEncoder.encode: height and width must be positive multiples of {DOWNSCALE}, got {h}×{w} "
                "(pad or crop the image first)"
            )

    def encode(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        noise_scale: float | None = None,
    ) -> torch.Tensor:
        """Image (B,3,H,W) in [0,1] -> latent (B,8,H/4,W/4): the encoder's [-1,1] output,
        standardised with the config's ``latent_shift`` / ``latent_scale``.

        ``noise``: the encoder's extra input, standard-normal of shape
        ``noise_shape(x)``; when None it is drawn from ``generator`` (on the
        generator's device, then moved) and multiplied by ``noise_scale``
        (default: the config's; 0 gives a deterministic, noise-free encoding).
        """
        self._check_image(x)
        raw = self.encoder(x, self.make_noise(x, noise, generator, noise_scale)) * 2.0 - 1.0
        return (raw - self.config.shift_for(raw)) / self.config.latent_scale  # exact no-op for 0 / 1

    def make_noise(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None,
                   noise_scale: float | None = None, *, where: str = "AutoEncoder.encode") -> Tensor:
        """The encoder's injected noise for image batch `x`: `noise` checked against
        `noise_shape(x)`, or drawn from `generator` and scaled (zeros when the scale is 0)."""
        shape = self.noise_shape(x)
        if noise is None:
            scale = self.config.noise_scale if noise_scale is None else float(noise_scale)
            if scale == 0.0:
                return torch.zeros(shape, device=x.device, dtype=x.dtype)
            gdev = generator.device if generator is not None else x.device
            noise = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
            return (noise * scale).to(device=x.device, dtype=x.dtype)
        if tuple(noise.shape) != shape:
            raise DataError(f"{where}: noise must have shape {shape}, got {tuple(noise.shape)}")
        return noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B,8,h,w) as `encode` returns it -> image (B,3,4h,4w) in [0,1] (the
        de-standardised latent is clamped to the encoder's range [-1,1])."""
        cfg = self.config
        c = cfg.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise DataError(f"AutoEncoder.decode: expected a latent batch (B,{c},h,w), got shape {tuple(z.shape)}")
        z = z * cfg.latent_scale + cfg.shift_for(z)
        return self.decoder(((z + 1.0) / 2.0).clamp(0.0, 1.0))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x, noise, generator))
