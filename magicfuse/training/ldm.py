"""Training of the conditional latent denoisers Ψ (IKR) and Φ (CKG), eq. 7.

With the autoencoder frozen:

    c  = E(degraded visible)
    z0 = E(clean visible)                         (IKR)
         E(infrared replicated to 3 channels)     (CKG)
    t ~ U{0..T-1},  ε ~ N(0, I),  z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε
    loss = ‖ε − UNet(z_t, t, c)‖²

c and z0 are encoded once per frame, at full frame size (`magicfuse.training.latents`),
and `crop` cuts the same window out of both latents: the denoiser trains on the
latents it is sampled on (encoding crops on their own gives other latents). t and ε
come from the step's generator. After training,
`evaluate_ldm_psnr` samples the EMA network with the project's one DDIM sampler
(`magicfuse_sample`, variant "model4" = a single denoising stream) on a few test
images and compares the result with the true target, beside a trivial baseline
(the degraded input for IKR; a grey copy of the degraded input for CKG).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from magicfuse.config import to_dict
from magicfuse.diffusion.sampler import MagicFuseNets, denoiser_eps, magicfuse_sample
from magicfuse.diffusion.settings import SamplerSettings, check_init_noise_scale
from magicfuse.diffusion.schedule import (
    BETA_END,
    BETA_START,
    NUM_TRAIN_STEPS,
    TIMESTEP_DENSITIES,
    eps_loss,
    make_alphas_cumprod,
    make_ddim_schedule,
    predict_x0,
    q_sample,
    sample_timesteps,
    v_target,
)
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.dataset import load_eval_set
from magicfuse.evaluation.objects import contrast_scores
from magicfuse.imageio import to_uint8
from magicfuse.inference import to_image_tensor
from magicfuse.models import build_model, model_config
from magicfuse.models.geometry import LATENT_DOWNSCALE, net_multiple
from magicfuse.models.unet import prediction_of
from magicfuse.training import distributed as ddp
from magicfuse.training.ae import load_autoencoder
from magicfuse.training.loop import (
    ArtifactFn,
    Logger,
    TrainConfig,
    TrainJob,
    TrainResult,
    derive_seed,
    freeze,
    run_training,
    seeded,
)
from magicfuse.training.latents import branch_members, cached_pairs, latent_loader
from magicfuse.checkpoint import load_model, save_model
from magicfuse.data.shards import make_loader, manifest_hash

Branch = Literal["ikr", "ckg"]
BRANCHES = ("ikr", "ckg")


@dataclass(frozen=True)
class LDMTrainConfig(TrainConfig):
    model: str | None = None  # UNet preset; None = "<branch>-tiny"
    lr: float = 1e-4
    num_train_steps: int = NUM_TRAIN_STEPS
    beta_start: float = BETA_START
    beta_end: float = BETA_END
    eval_samples: int = 4  # test images sampled after training for the PSNR check (0 = skip)
    eval_steps: int = 25  # DDIM steps of that check
    eval_split: str = "test"
    eval_init_noise_scale: float = SamplerSettings.init_noise_scale  # z_T scale of that check (1 = the paper)
    # training t density: "uniform" (eq. 7) or "linear" (rising with t; the tiny CKG draws the
    # scene's layout sooner: docs/QUALITY.md)
    timesteps: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timesteps not in TIMESTEP_DENSITIES:
            raise ConfigError(f"LDMTrainConfig.timesteps must be one of {TIMESTEP_DENSITIES}, "
                              f"got {self.timesteps!r}")
        if self.num_train_steps < 1:
            raise ConfigError(f"LDMTrainConfig.num_train_steps must be >= 1, got {self.num_train_steps}")
        if self.eval_samples < 0 or self.eval_steps < 1:
            raise ConfigError("LDMTrainConfig: eval_samples must be >= 0 and eval_steps >= 1")
        check_init_noise_scale(self.eval_init_noise_scale, "LDMTrainConfig.eval_init_noise_scale")


def _check_branch(branch: str) -> None:
    if branch not in BRANCHES:
        raise ConfigError(f"branch must be 'ikr' or 'ckg', got {branch!r}")


def branch_target(batch: dict[str, Any], branch: str) -> Tensor:
    """The image a branch learns to produce: clean visible (IKR) or 3-channel infrared (CKG)."""
    if branch == "ikr":
        return batch["clean"]
    return batch["infrared"].expand(-1, 3, -1, -1)


def ldm_loss(unet: nn.Module, batch: dict[str, Any], generator: torch.Generator, *,
             alphas_cumprod: Tensor, timesteps: str = "uniform") -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 7 on one batch of latent pairs {"cond", "z0"}; t (drawn with the `timesteps`
    density of `sample_timesteps`) and ε come from `generator`.
    A v-predicting UNet (`UNetConfig.prediction`) regresses v = √ᾱ·ε − √(1−ᾱ)·z0 instead of ε."""
    cond, z0 = batch["cond"].float(), batch["z0"].float()
    t = sample_timesteps(z0.shape[0], generator, num_train_steps=alphas_cumprod.numel(), device=z0.device,
                         density=timesteps)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    z_t = q_sample(z0, noise, alphas_cumprod[t])
    out = unet(z_t, t, cond)
    target = v_target(z0, noise, alphas_cumprod[t]) if prediction_of(unet) == "v" else noise
    loss = eps_loss(out, target)  # the MSE of eq. 7, on ε or on v (same minimiser, better scaled)
    return loss, {}


def _preview_images(shards_dir: Any, split: str, members: tuple[str, ...], n: int = 4) -> dict[str, Tensor]:
    """The first `n` full frames of `split` (the preview grid's inputs and targets)."""
    batch = next(iter(make_loader(shards_dir, split, batch_size=n, crop=None, num_workers=0, shuffle=False,
                                  members=members)))
    return {m: batch[m] for m in members}


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of two (B,C,H,W) images in [0,1] (peak 1; identical images give +inf)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def sample_branch(ae: nn.Module, unet: nn.Module, degraded: Tensor, *, steps: int = 25,
                  generator: torch.Generator | None = None, schedule: Any = None,
                  init_noise_scale: float = SamplerSettings.init_noise_scale) -> Tensor:
    """One denoising stream (the sampler's "model4" path) → decoded (B,3,H,W) image in [0,1]."""
    nets = MagicFuseNets(ae=ae, ikr=unet, ckg=None, fusion=None)
    out = magicfuse_sample(nets, degraded, steps=steps, variant="model4", generator=generator, schedule=schedule,
                           init_noise_scale=init_noise_scale)
    return out.ikr


@torch.no_grad()
def condition_use(ae: nn.Module, unet: nn.Module, conditions: list[Tensor], targets: list[Tensor], *,
                  schedule: Any, generator: torch.Generator,
                  init_noise_scale: float = SamplerSettings.init_noise_scale) -> dict[str, float]:
    """How much the denoiser's first sampling step draws on its condition image.

    For each frame n (at least two, each (1,3,H,W) in [0,1]), the one-step estimate ẑ0 of its
    target latent at the sampler's first step — t = ``schedule.timesteps[0]``, z_t = z_T =
    ``init_noise_scale`` · N(0, I), exactly where sampling starts — is scored against the
    true target latent (latent MSE) with frame n's own condition (``x0_mse``) and with frame
    n+1's (``x0_mse_other_cond``, cyclic); ``x0_power`` is the targets' mean square (the MSE
    of predicting 0, the standardised latents' training mean). A denoiser that reads its input
    scores clearly lower with its own condition; one whose samples are decided by z_T scores
    the same with both and no better than ``x0_power``. Latents are encoded without encoder
    noise; a pair of frames of different sizes is compared on their common top-left window,
    cut to the network's size multiple.
    """
    if len(conditions) < 2 or len(conditions) != len(targets):
        raise ConfigError("condition_use: needs >= 2 frames and one target per condition, got "
                          f"{len(conditions)} conditions and {len(targets)} targets")
    device = conditions[0].device
    multiple = LATENT_DOWNSCALE * net_multiple(unet)
    t, abar = schedule.timesteps[:1], schedule.abar_t[0]
    own, other, power = [], [], []
    for n, (cond_img, target_img) in enumerate(zip(conditions, targets)):
        next_img = conditions[(n + 1) % len(conditions)]
        h = min(cond_img.shape[-2], next_img.shape[-2]) // multiple * multiple
        w = min(cond_img.shape[-1], next_img.shape[-1]) // multiple * multiple
        if h == 0 or w == 0:
            raise DataError(f"condition_use: frame {n} is smaller than the network's multiple of {multiple} px")
        cond, cond_next, z0 = (ae.encode(img[..., :h, :w], noise_scale=0.0).float()
                               for img in (cond_img, next_img, target_img))
        z_t = init_noise_scale * torch.randn(z0.shape, generator=generator, device=device)
        for c, out in ((cond, own), (cond_next, other)):
            x0 = predict_x0(z_t, denoiser_eps(unet, z_t, t, c, abar), abar)
            out.append(float((x0 - z0).pow(2).mean()))
        power.append(float(z0.pow(2).mean()))
    return {"x0_mse": sum(own) / len(own), "x0_mse_other_cond": sum(other) / len(other),
            "x0_power": sum(power) / len(power)}


@torch.no_grad()
def evaluate_ldm_psnr(ae: nn.Module, unet: nn.Module, branch: str, shards_dir: str | Path, *,
                      split: str = "test", samples: int = 4, steps: int = 25, seed: int = 0,
                      num_train_steps: int = NUM_TRAIN_STEPS, beta_start: float = BETA_START,
                      beta_end: float = BETA_END, device: torch.device | str = "cpu",
                      init_noise_scale: float = SamplerSettings.init_noise_scale) -> dict[str, float]:
    """Sample the denoiser on the first `samples` images of `split` (full frames, z_T scaled by
    `init_noise_scale`) and score it.

    Returns mean PSNR (dB) of the branch output against its true target (`psnr`) and of
    the trivial baseline against the same target (`psnr_baseline`): the degraded input
    for IKR, a grey copy (channel mean) of the degraded input for CKG, whose output is
    compared as 1-channel infrared (the channel mean of the decoded image). For CKG on a
    split whose samples carry object boxes (e.g. MSRS), also the mean box contrast of the
    CKG image for people and cars (`person_contrast`, `car_contrast`,
    `magicfuse.evaluation.objects`; the real infrared gives about +2.2 for people),
    when the images hold such boxes. With two or more samples, also `condition_use` (how much
    the first sampling step's estimate depends on the condition: `x0_mse`,
    `x0_mse_other_cond`, `x0_power`).
    """
    _check_branch(branch)
    if samples < 1:
        raise ConfigError(f"evaluate_ldm_psnr: samples must be >= 1, got {samples}")
    device = torch.device(device)
    ae.eval().to(device)
    unet.eval().to(device)
    schedule = make_ddim_schedule(steps, num_train_steps, beta_start, beta_end, device=device)
    try:
        data = load_eval_set(shards_dir, split, max_images=samples)
    except DataError as exc:
        raise DataError(f"{shards_dir}: split {split!r} has no samples to evaluate the {branch} denoiser on "
                        f"({exc})") from exc

    def tensor(arr: Any, name: str, channels: int = 3) -> Tensor:
        return to_image_tensor(arr, name=name)[:channels][None].to(device)

    ours, base, grey, conds, targets = [], [], [], [], []
    for n, key in enumerate(data.keys):
        degraded = tensor(data.degraded[n], f"{key} degraded")
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, n, 0xE7A1))
        out = sample_branch(ae, unet, degraded, steps=steps, generator=gen, schedule=schedule,
                            init_noise_scale=init_noise_scale)
        if branch == "ikr":
            target = tensor(data.clean[n], f"{key} clean")
            pred, baseline = out, degraded
        else:
            if data.infrared[n] is None:
                raise DataError(f"{shards_dir}: sample {key!r} of split {split!r} has no infrared to score the "
                                "CKG denoiser against")
            target = tensor(data.infrared[n], f"{key} infrared", channels=1)
            pred, baseline = out.mean(dim=1, keepdim=True), degraded.mean(dim=1, keepdim=True)
            grey.append(to_uint8(pred)[0])
        ours.append(psnr(pred, target))
        base.append(psnr(baseline, target))
        conds.append(degraded)
        targets.append(target.expand(-1, 3, -1, -1))  # the infrared as the CKG learns it (`branch_target`)
    scores = {"psnr": float(torch.cat(ours).mean()), "psnr_baseline": float(torch.cat(base).mean()),
              "eval_samples": float(len(data))}
    if len(conds) >= 2:
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, 0, 0xC0DE))
        scores.update(condition_use(ae, unet, conds, targets, schedule=schedule, generator=gen,
                                    init_noise_scale=init_noise_scale))
    if branch == "ckg" and data.has_boxes():
        scores.update(contrast_scores(grey, data.boxes))
    return scores


def train_ldm(cfg: LDMTrainConfig, *, branch: Branch, ae_checkpoint: str | Path, shards_dir: str | Path,
              out_dir: str | Path, logger: Logger | None = None,
              artifacts: ArtifactFn | None = None) -> TrainResult:
    """Train the IKR or CKG denoiser; writes `out_dir/<branch>.pt` (kind "unet", EMA weights).

    `ae_checkpoint`: our "ae" checkpoint or the authors' `official_ae.pth`.
    `cfg.init_from`: an optional "unet" checkpoint to start from (fine-tuning).
    """
    _check_branch(branch)
    info = ddp.init_distributed(cfg.device)
    device = ddp.resolve_device(cfg.device, info)
    ae = freeze(load_autoencoder(ae_checkpoint)).to(device)
    preset = cfg.model or f"{branch}-tiny"
    if cfg.init_from:
        unet, _ = load_model(cfg.init_from, kind="unet")
    else:
        with seeded(cfg.seed):
            unet = build_model("unet", preset)
    abar = make_alphas_cumprod(cfg.num_train_steps, cfg.beta_start, cfg.beta_end, device=device)
    members = branch_members(branch)
    pairs = cached_pairs(ae, ae_checkpoint, shards_dir, cfg.split, branch, seed=cfg.seed,
                         manifest=manifest_hash(shards_dir), cache_dir=Path(out_dir), device=device,
                         progress=cfg.progress and info.is_main)
    loader = latent_loader(pairs, batch_size=cfg.batch_size, crop=cfg.crop, seed=cfg.seed, rank=info.rank,
                           world_size=info.world_size)
    preview_batch = _preview_images(shards_dir, cfg.eval_split, members) if cfg.sample_every else None

    def export(module: nn.Module, out: Path) -> dict[str, Path]:
        path = out / f"{branch}.pt"
        save_model(path, module, kind="unet", branch=branch, preset=preset, train_config=to_dict(cfg))
        return {branch: path}

    def evaluate(module: nn.Module) -> dict[str, float]:
        if cfg.eval_samples == 0:
            return {}
        return evaluate_ldm_psnr(ae, module, branch, shards_dir, split=cfg.eval_split,
                                 samples=cfg.eval_samples, steps=cfg.eval_steps, seed=cfg.seed,
                                 num_train_steps=cfg.num_train_steps, beta_start=cfg.beta_start,
                                 beta_end=cfg.beta_end, device=device,
                                 init_noise_scale=cfg.eval_init_noise_scale)

    def preview(module: nn.Module, batch: dict[str, Any], gen: torch.Generator) -> Tensor:
        batch = {k: v.to(device) for k, v in preview_batch.items()}
        degraded = batch["degraded"]
        schedule = make_ddim_schedule(cfg.eval_steps, cfg.num_train_steps, cfg.beta_start, cfg.beta_end,
                                      device=degraded.device)
        out = sample_branch(ae, module, degraded, steps=cfg.eval_steps, generator=gen, schedule=schedule,
                            init_noise_scale=cfg.eval_init_noise_scale)
        return torch.cat([degraded, out.float(), branch_target(batch, branch)], dim=-2)

    job = TrainJob(
        name=branch, model=unet, model_config=model_config(unet),
        loss_fn=lambda m, b, g: ldm_loss(m, b, g, alphas_cumprod=abar, timesteps=cfg.timesteps),
        make_loader=loader, export=export, manifest_hash=manifest_hash(shards_dir),
        evaluate=evaluate, preview=preview,
    )
    return run_training(cfg, job, out_dir, logger=logger, artifacts=artifacts)
