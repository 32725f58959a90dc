"""Noise schedule and DDIM maths: pure functions of tensors (no modules, no loops).

Conventions (DESIGN.md §1-2, the authors' code):

* linear β from 0.00085 to 0.012 over 1000 training steps — linear in β itself
  (DDPM "linear"), *not* LDM's linear-in-√β; computed in float32 exactly as the
  reference does, which reproduces its ᾱ values to the last float32 digit;
* 25 DDIM steps with "leading" spacing t = 960, 920, …, 40, 0, each paired with the
  next lower one, the last paired with -1 meaning ᾱ_prev = 1;
* deterministic DDIM (eta = 0), no clipping of ẑ0.

ᾱ arguments are tensors (or floats) broadcastable against the latents: a 0-d
tensor, a `(B,)` tensor (reshaped to `(B,1,1,1)`) or anything already broadcastable.
`DDIMSchedule` precomputes every step's t, ᾱ_t and ᾱ_prev as device tensors so a
sampling loop indexes them with a Python int and never synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from magicfuse.errors import ConfigError

NUM_TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def make_alphas_cumprod(
    num_train_steps: int = NUM_TRAIN_STEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s) for a β linear from `beta_start` to `beta_end`, shape `(T,)`.

    float32 (the default) matches the authors' values exactly
    (ᾱ_0 = 0.99914998, ᾱ_40 = 0.95692903, ᾱ_999 = 0.00157896).
    """
    if num_train_steps < 1:
        raise ConfigError(f"schedule: num_train_steps must be >= 1, got {num_train_steps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(f"schedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=dtype, device=device)
    return torch.cumprod(1.0 - betas, dim=0)


# Name used in docs/ARCHITECTURE.md.
make_schedule = make_alphas_cumprod


def ddim_pairs(num_steps: int = 25, num_train_steps: int = NUM_TRAIN_STEPS) -> list[tuple[int, int]]:
    """(t, t_prev) pairs with "leading" spacing, highest t first; t_prev = -1 means ᾱ_prev = 1.

    `ddim_pairs(25, 1000)` = [(960, 920), (920, 880), …, (40, 0), (0, -1)].
    """
    if num_steps < 1 or num_steps > num_train_steps:
        raise ConfigError(
            f"schedule: num_steps must be in [1, {num_train_steps}] (num_train_steps), got {num_steps}"
        )
    ratio = num_train_steps // num_steps
    ts = [i * ratio for i in range(num_steps)][::-1]
    return list(zip(ts, ts[1:] + [-1]))


@dataclass(frozen=True)
class DDIMSchedule:
    """Everything a sampling loop needs, precomputed once on one device.

    `pairs[i] = (t, t_prev)`; `timesteps[i] = t` (long), `abar_t[i]`, `abar_prev[i]`
    (float32, with `abar_prev = 1` for t_prev = -1).
    """

    pairs: tuple[tuple[int, int], ...]
    timesteps: Tensor
    abar_t: Tensor
    abar_prev: Tensor

    def __len__(self) -> int:
        return len(self.pairs)


def make_ddim_schedule(
    num_steps: int = 25,
    num_train_steps: int = NUM_TRAIN_STEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    *,
    device: torch.device | str | None = None,
) -> DDIMSchedule:
    pairs = ddim_pairs(num_steps, num_train_steps)
    abar = make_alphas_cumprod(num_train_steps, beta_start, beta_end)
    ts = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    prev = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    abar_t = abar[ts]
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar_t))
    return DDIMSchedule(
        pairs=tuple(pairs),
        timesteps=ts.to(device),
        abar_t=abar_t.to(device),
        abar_prev=abar_prev.to(device),
    )


def _bc(abar: Tensor | float, ref: Tensor) -> Tensor:
    """ᾱ as a float tensor broadcastable against `ref` (B,C,H,W)."""
    if not torch.is_tensor(abar):
        return torch.tensor(abar, dtype=torch.float32, device=ref.device)
    if abar.ndim == 1 and ref.ndim > 1:
        abar = abar.view(-1, *([1] * (ref.ndim - 1)))
    return abar


def predict_x0(z_t: Tensor, eps: Tensor, abar_t: Tensor | float) -> Tensor:
    """Eq. 13: ẑ0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    a = _bc(abar_t, z_t)
    return (z_t - torch.sqrt(1.0 - a) * eps) / torch.sqrt(a)


def ddim_step(z_t: Tensor, eps: Tensor, abar_t: Tensor | float, abar_prev: Tensor | float) -> Tensor:
    """Deterministic DDIM (eta = 0, no clipping): z_prev = √ᾱ_prev·ẑ0 + √(1−ᾱ_prev)·ε."""
    x0 = predict_x0(z_t, eps, abar_t)
    ap = _bc(abar_prev, z_t)
    return torch.sqrt(ap) * x0 + torch.sqrt(1.0 - ap) * eps


def q_sample(z0: Tensor, noise: Tensor, abar_t: Tensor | float) -> Tensor:
    """Eq. 3-4: z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε."""
    a = _bc(abar_t, z0)
    return torch.sqrt(a) * z0 + torch.sqrt(1.0 - a) * noise


def v_target(z0: Tensor, noise: Tensor, abar_t: Tensor | float) -> Tensor:
    """The "v" a v-predicting denoiser learns (Salimans & Ho 2022): v = √ᾱ_t·ε − √(1−ᾱ_t)·z0."""
    a = _bc(abar_t, z0)
    return torch.sqrt(a) * noise - torch.sqrt(1.0 - a) * z0


def eps_from_v(v: Tensor, z_t: Tensor, abar_t: Tensor | float) -> Tensor:
    """ε of a v prediction: ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t (exact inverse of `v_target` given z_t)."""
    a = _bc(abar_t, z_t)
    return torch.sqrt(a) * v + torch.sqrt(1.0 - a) * z_t


def eps_loss(eps_pred: Tensor, noise: Tensor) -> Tensor:
    """Eq. 7: mean squared error between predicted and true noise (computed in float32)."""
    if eps_pred.shape != noise.shape:
        raise ValueError(f"eps_loss: shapes differ, prediction {tuple(eps_pred.shape)} vs noise {tuple(noise.shape)}")
    return F.mse_loss(eps_pred.float(), noise.float())


TIMESTEP_DENSITIES = ("uniform", "linear")


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    num_train_steps: int = NUM_TRAIN_STEPS,
    device: torch.device | str | None = None,
    density: str = "uniform",
) -> Tensor:
    """Training timesteps in [0, num_train_steps), `(batch,)` long.

    `density`: "uniform" (eq. 7, the authors' training) or "linear", where the density rises
    linearly with t (t = ⌊√u·T⌋, mean 2T/3): more of the training goes to the noisy steps
    where a sample's layout is decided. Each t's minimiser is unchanged, so the sampler is too.
    The generator must live on `device` (default: the generator's device, else CPU).
    """
    if density not in TIMESTEP_DENSITIES:
        raise ConfigError(f"timestep density must be one of {TIMESTEP_DENSITIES}, got {density!r}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if density == "uniform":
        return torch.randint(0, num_train_steps, (batch,), generator=generator, device=device)
    u = torch.rand(batch, generator=generator, device=device)
    return (u.sqrt() * num_train_steps).long().clamp_(max=num_train_steps - 1)
