"""The networks of MagicFuse: autoencoder, conditional UNet, fusion network + segmentation head."""

from magicfuse.models.autoencoder import AutoEncoder, AutoEncoderConfig
from magicfuse.models.fusion import FusionConfig, FusionNet, FusionOutput, radiation_weight, thermal_mask
from magicfuse.models.presets import PRESETS, build_model, count_parameters, model_config, model_kind
from magicfuse.models.unet import ConditionalUNet, UNetConfig

__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "ConditionalUNet",
    "FusionConfig",
    "FusionNet",
    "FusionOutput",
    "PRESETS",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "model_config",
    "model_kind",
    "radiation_weight",
    "thermal_mask",
]
