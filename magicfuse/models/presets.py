"""Named network configurations and the one factory that builds every network.

Presets (kind, config):

* ``ae`` — the authors' autoencoder (220,968 + 188,163 parameters).
* ``ae-tiny`` — the same layout, 16 channels, one residual block per stage and no
  InstanceNorm (50,843 parameters): 8x cheaper per step, and without the per-image
  normalisation it learns colour and brightness from scratch in minutes on 2 CPU cores.
* ``ikr-paper`` / ``ckg-paper`` / ``fusion-paper`` — the paper's Ψ (39,652,104),
  Φ (517,670,920) and F&S (2,742,148), parameter names equal to the authors'.
* ``ikr-tiny`` / ``ckg-tiny`` / ``fusion-tiny`` — small versions (a few hundred
  thousand parameters) that train in minutes on two CPU cores; the tiny denoisers
  predict v instead of ε (`UNetConfig.prediction`), which small networks learn far
  faster (docs/QUALITY.md).
* ``ikr-small`` / ``ckg-small`` / ``fusion-small`` — between the two, for the ``real``
  profile: 4 resolution levels (attention at 1/8 of the latent), v-prediction; about
  4.9 M parameters per denoiser, 0.2 s per denoiser call at a 640×480 frame on 2 cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Union

from torch import nn

from magicfuse.config import from_mapping, to_dict
from magicfuse.errors import ConfigError
from magicfuse.models.autoencoder import AutoEncoder, AutoEncoderConfig
from magicfuse.models.fusion import FusionConfig, FusionNet
from magicfuse.models.unet import ConditionalUNet, UNetConfig

Kind = Literal["ae", "unet", "fusion"]
AnyConfig = Union[AutoEncoderConfig, UNetConfig, FusionConfig]

KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "ae": (AutoEncoderConfig, AutoEncoder),
    "unet": (UNetConfig, ConditionalUNet),
    "fusion": (FusionConfig, FusionNet),
}

_TINY_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,),
                        num_heads=2, num_groups=8, prediction="v")

PRESETS: dict[str, tuple[str, AnyConfig]] = {
    "ae": ("ae", AutoEncoderConfig()),
    "ae-tiny": ("ae", AutoEncoderConfig(channels=16, num_res_blocks=1, norm="none")),
    "ikr-paper": ("unet", UNetConfig(model_channels=64, num_heads=4, attention_resolutions=(4, 8))),
    "ckg-paper": ("unet", UNetConfig(model_channels=256, num_heads=8, attention_resolutions=(4,))),
    "fusion-paper": ("fusion", FusionConfig()),
    # IKR and CKG share the tiny layout (the CKG at 16 channels since 2026-12-04: docs/QUALITY.md)
    "ikr-tiny": ("unet", _TINY_UNET),
    "ckg-tiny": ("unet", _TINY_UNET),
    "fusion-tiny": ("fusion", FusionConfig(channels=32, num_blocks=2, num_groups=8)),
    # between tiny and paper: the `real` profile (2 CPU cores, real 640x480 pairs)
    "ikr-small": ("unet", UNetConfig(model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=1,
                                     attention_resolutions=(8,), num_heads=4, num_groups=8, prediction="v")),
    "ckg-small": ("unet", UNetConfig(model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=1,
                                     attention_resolutions=(8,), num_heads=4, num_groups=8, prediction="v")),
    "fusion-small": ("fusion", FusionConfig(channels=48, num_blocks=3, num_groups=8)),
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")


def resolve_config(kind: str, cfg: str | Mapping[str, Any] | AnyConfig) -> AnyConfig:
    """A config dataclass of `kind` from a preset name, a mapping or a config instance."""
    _check_kind(kind)
    cls = KINDS[kind][0]
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ConfigError(f"unknown preset {cfg!r}; available: {sorted(PRESETS)}")
        pkind, pcfg = PRESETS[cfg]
        if pkind != kind:
            raise ConfigError(f"preset {cfg!r} is a {pkind!r} network, not a {kind!r} one")
        return pcfg
    if isinstance(cfg, Mapping):
        return from_mapping(cls, cfg, where=f"{kind} config")
    if isinstance(cfg, cls):
        return cfg
    if dataclasses.is_dataclass(cfg):
        raise ConfigError(f"a {type(cfg).__name__} cannot configure a {kind!r} network (needs {cls.__name__})")
    raise ConfigError(f"{kind!r} network: expected a preset name, a mapping or a {cls.__name__}, got {cfg!r}")


def build_model(kind: str, cfg: str | Mapping[str, Any] | AnyConfig) -> nn.Module:
    """Build network `kind` ("ae" | "unet" | "fusion") from a preset name, a mapping or a config.

    To count parameters without allocating, build inside ``with torch.device("meta"):``.
    """
    config = resolve_config(kind, cfg)
    return KINDS[kind][1](config)


def model_kind(model: nn.Module) -> str:
    for kind, (_, mcls) in KINDS.items():
        if isinstance(model, mcls):
            return kind
    raise ConfigError(f"{type(model).__name__} is not a MagicFuse network")


def model_config(model: nn.Module) -> dict[str, Any]:
    """The plain-dict config of a built network (what checkpoints store)."""
    model_kind(model)
    return to_dict(model.config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
