"""Diffusion maths (pure functions in `schedule`) and the joint MagicFuse sampler."""

from magicfuse.diffusion.sampler import (
    VARIANTS,
    MagicFuseNets,
    SamplerOutput,
    magicfuse_sample,
    required_multiple,
)
from magicfuse.diffusion.settings import NoiseSchedule, SamplerSettings
from magicfuse.diffusion.schedule import (
    DDIMSchedule,
    ddim_pairs,
    ddim_step,
    eps_loss,
    make_alphas_cumprod,
    make_ddim_schedule,
    make_schedule,
    predict_x0,
    q_sample,
    sample_timesteps,
)

__all__ = [
    "VARIANTS",
    "DDIMSchedule",
    "MagicFuseNets",
    "NoiseSchedule",
    "SamplerSettings",
    "SamplerOutput",
    "ddim_pairs",
    "ddim_step",
    "eps_loss",
    "magicfuse_sample",
    "make_alphas_cumprod",
    "make_ddim_schedule",
    "make_schedule",
    "predict_x0",
    "q_sample",
    "required_multiple",
    "sample_timesteps",
]
