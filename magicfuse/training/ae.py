"""Autoencoder training: reconstruction of clean visible and infrared images.

Each batch holds the clean visible crops and the infrared crops replicated to
three channels (the convention of the whole project), concatenated along the
batch. Loss: L1 + structural_weight × (1 − SSIM) (or a Sobel-gradient L1). The
encoder's Gaussian noise input is drawn from the step's generator, so training
is reproducible. Training may start from the authors' AE (`init_from` pointing at
`official_ae.pth`, keys `encoder`/`decoder`) or from one of our "ae" checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from magicfuse.config import to_dict
from magicfuse.errors import CheckpointError, TrainingError
from magicfuse.models import build_model, model_config
from magicfuse.training.loop import (
    ArtifactFn,
    Logger,
    TrainConfig,
    TrainJob,
    TrainResult,
    run_training,
    seeded,
    shard_loader,
)
from magicfuse.training.losses import reconstruction_loss
from magicfuse.checkpoint import load_checkpoint, load_model, save_model
from magicfuse.data.shards import make_loader, manifest_hash
from magicfuse.models.importer import convert_part, read_torch_file
from magicfuse.training import distributed as ddp


@dataclass(frozen=True)
class AETrainConfig(TrainConfig):
    model: str = "ae"  # preset name of the autoencoder
    lr: float = 1e-4
    structural: Literal["ssim", "gradient"] = "ssim"
    structural_weight: float = 1.0
    chroma_weight: float = 0.0  # weight of an L1 on Cb/Cr (colour); see losses.reconstruction_loss
    infrared: bool = True  # also reconstruct the infrared images (replicated to 3 channels)
    # Measure the latents' mean and standard deviation on up to this many training images
    # (visible and infrared) after training and store them in the exported AE
    # (AutoEncoderConfig.latent_shift/latent_scale), so that the denoisers get standardised
    # latents. 0 keeps the raw latents (their std is ~0.25-0.5, far from the unit variance
    # the noise schedule assumes; see docs/QUALITY.md).
    latent_stats_images: int = 0


def load_ae_init(model: nn.Module, path: str | Path) -> None:
    """Load AE weights from the authors' `{encoder, decoder}` file or from our "ae" checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: AE weights file not found")
    raw = read_torch_file(path)
    if isinstance(raw, dict) and raw.get("format") == "magicfuse":
        state = load_checkpoint(path, kind="ae")["state_dict"]
    else:
        state = convert_part("ae", path)["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the autoencoder: {exc}") from None


def load_autoencoder(path: str | Path) -> nn.Module:
    """An autoencoder from our "ae" checkpoint or from the authors' `{encoder, decoder}` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: autoencoder checkpoint not found")
    raw = read_torch_file(path)
    if isinstance(raw, dict) and raw.get("format") == "magicfuse":
        return load_model(path, kind="ae")[0]
    model = build_model("ae", "ae")
    load_ae_init(model, path)
    return model


def ae_loss(model: nn.Module, batch: dict[str, Any], generator: torch.Generator, cfg: AETrainConfig
            ) -> tuple[Tensor, dict[str, Tensor]]:
    images = batch["clean"]
    if cfg.infrared:
        images = torch.cat([images, batch["infrared"].expand(-1, 3, -1, -1)], dim=0)
    recon = model(images, None, generator)
    return reconstruction_loss(recon.float(), images.float(), structural=cfg.structural,
                               structural_weight=cfg.structural_weight, chroma_weight=cfg.chroma_weight)


@torch.no_grad()
def latent_stats(ae: nn.Module, shards_dir: str | Path, split: str, members: tuple[str, ...],
                 max_images: int) -> tuple[tuple[float, ...], float]:
    """(per-channel means, scale) of the raw, noise-free latents of the first `max_images`
    full frames of `split` (every member in `members`, infrared replicated to 3 channels).
    The scale is the RMS deviation from those means over all channels, so the standardised
    latents have zero-mean channels and unit variance overall (a near-constant channel
    stays near 0 instead of being blown up to unit variance)."""
    raw = dataclasses.replace(ae.config, latent_shift=0.0, latent_scale=1.0)
    saved, ae.config = ae.config, raw
    device = next(ae.parameters()).device
    was_training = ae.training
    ae.eval()
    total = total_sq = None
    count = 0
    try:
        loader = make_loader(shards_dir, split, batch_size=1, crop=None, num_workers=0, shuffle=False, members=members)
        for n, batch in enumerate(loader):
            if n >= max_images:
                break
            for m in members:
                z = ae.encode(batch[m].to(device).expand(-1, 3, -1, -1), noise_scale=0.0).double()
                s1, s2 = z.sum(dim=(0, 2, 3)).cpu(), z.pow(2).sum(dim=(0, 2, 3)).cpu()
                total = s1 if total is None else total + s1
                total_sq = s2 if total_sq is None else total_sq + s2
                count += z.numel() // z.shape[1]
    finally:
        ae.config = saved
        ae.train(was_training)
    if count == 0:
        raise TrainingError(f"{shards_dir}: split {split!r} has no images to measure the latent statistics on")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    scale = max(float(var.mean()), 1e-12) ** 0.5
    return tuple(float(v) for v in mean), scale


def train_autoencoder(cfg: AETrainConfig, shards_dir: str | Path, out_dir: str | Path, *,
                      logger: Logger | None = None, artifacts: ArtifactFn | None = None) -> TrainResult:
    """Train (or fine-tune) the autoencoder; writes `out_dir/ae.pt` (kind "ae", EMA weights)."""
    info = ddp.init_distributed(cfg.device)
    with seeded(cfg.seed):
        model = build_model("ae", cfg.model)
    if cfg.init_from:
        load_ae_init(model, cfg.init_from)
    members = ("clean", "infrared") if cfg.infrared else ("clean",)
    loader = shard_loader(shards_dir, cfg, info, members)

    def export(module: nn.Module, out: Path) -> dict[str, Path]:
        if cfg.latent_stats_images:
            shift, scale = latent_stats(module, shards_dir, cfg.split, members, cfg.latent_stats_images)
            module.config = dataclasses.replace(module.config, latent_shift=shift, latent_scale=scale)
        path = out / "ae.pt"
        save_model(path, module, kind="ae", train_config=to_dict(cfg))
        return {"ae": path}

    def preview(module: nn.Module, batch: dict[str, Any], gen: torch.Generator) -> Tensor:
        x = batch["clean"][:4]
        return torch.cat([x, module(x, None, gen).float()], dim=-2)

    job = TrainJob(
        name="ae", model=model, model_config=model_config(model),
        loss_fn=lambda m, b, g: ae_loss(m, b, g, cfg), make_loader=loader, export=export,
        manifest_hash=manifest_hash(shards_dir), preview=preview,
    )
    return run_training(cfg, job, out_dir, logger=logger, artifacts=artifacts)
