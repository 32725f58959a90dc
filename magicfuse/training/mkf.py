"""Training of the fusion network F and segmentation head S (Algorithm 1).

Ψ (IKR), Φ (CKG) and the autoencoder are frozen. For every batch:

1. draw z_T (shared by the three streams), the segmentation state noise and the
   encoder noise from the step's generator (inside the sampler, in that order);
2. pick the truncation step i uniformly from the `sampler_steps`-step schedule;
3. run the joint sampler `magicfuse_sample(..., stop_at=i, grad_step=i)`: steps
   0..i run, autograd is on for F only at step i;
4. decode the three ẑ0 estimates (MagImg, IKR, CKG: done by the sampler) and apply
   the losses of eq. 15–16 (YCbCr contrast/texture/colour, class-weighted CE);
5. update F and S (SGD, momentum 0.9, weight decay 1e-4, lr ×0.5 every
   `lr_decay_every` steps).

The batch shares one truncation step (the paper trains with batch 1, where this
is exactly Algorithm 1). Outputs: `fusion.pt` and `pipeline.pt`, the bundle of
the four networks and the sampler settings that users run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from magicfuse.checkpoint import load_model, save_model, save_pipeline
from magicfuse.config import to_dict
from magicfuse.data.classes import SEG_CLASS_WEIGHTS
from magicfuse.data.shards import manifest_hash
from magicfuse.diffusion.sampler import MagicFuseNets, magicfuse_sample
from magicfuse.diffusion.settings import NoiseSchedule, SamplerSettings, check_init_noise_scale
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.ablation import segmentation_scores, visual_means
from magicfuse.evaluation.dataset import load_eval_set
from magicfuse.evaluation.objects import contrast_scores
from magicfuse.inference import MagicFuse
from magicfuse.models import build_model, model_config
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
    shard_loader,
)
from magicfuse.training.losses import FusionLossWeights, fusion_losses

# the MagImg's fusion metrics scored against training steps (issue targets: SSIM, MI, Qabf, PSNR)
MKF_EVAL_METRICS = ("SSIM", "MI", "Qabf", "PSNR")


@dataclass(frozen=True)
class MKFTrainConfig(TrainConfig):
    model: str = "fusion-tiny"  # fusion network preset
    optimizer: Literal["adam", "adamw", "sgd"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 1
    lr_decay_every: int = 0  # paper: every 10 epochs
    lr_decay_gamma: float = 0.5
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    sampler_steps: int = SamplerSettings.steps
    tau: float = SamplerSettings.tau
    thermal_classes: tuple[int, ...] = SamplerSettings().thermal_classes  # car, person (the paper); the authors' code uses (2,)
    variant: Literal["full", "model1", "model2", "model3"] = "full"
    init_noise_scale: float = SamplerSettings.init_noise_scale  # z_T scale of training and of the pipeline (1 = the paper)
    w_contrast: float = 6.0
    w_texture: float = 10.0
    w_cb: float = 5.0
    w_cr: float = 5.0
    w_seg: float = 1.0
    # cross-entropy weight of each class; None = the authors' MFNet weights (SEG_CLASS_WEIGHTS)
    seg_class_weights: tuple[float, ...] | None = None
    eval_samples: int = 0  # images of `eval_split` fused for the head's IoU and the MagImg's box contrast (0 = skip)
    eval_split: str = "test"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler_steps < 1:
            raise ConfigError(f"MKFTrainConfig.sampler_steps must be >= 1, got {self.sampler_steps}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"MKFTrainConfig.tau must be in [0, 1], got {self.tau}")
        check_init_noise_scale(self.init_noise_scale, "MKFTrainConfig.init_noise_scale")
        if self.seg_class_weights is not None and (
                not self.seg_class_weights or not all(w >= 0 for w in self.seg_class_weights)):
            raise ConfigError("MKFTrainConfig.seg_class_weights must be a non-empty list of weights >= 0 "
                              f"(one per class), got {self.seg_class_weights}")
        if self.eval_samples < 0:
            raise ConfigError(f"MKFTrainConfig.eval_samples must be >= 0, got {self.eval_samples}")

    @property
    def loss_weights(self) -> FusionLossWeights:
        return FusionLossWeights(contrast=self.w_contrast, texture=self.w_texture, cb=self.w_cb, cr=self.w_cr,
                                 seg=self.w_seg, seg_class_weights=tuple(self.seg_class_weights or SEG_CLASS_WEIGHTS))

    def sampler_settings(self, schedule: NoiseSchedule) -> SamplerSettings:
        """What the trained pipeline samples with: this config's steps, τ, thermal classes,
        variant and z_T scale over `schedule` (the denoisers' training schedule)."""
        return SamplerSettings(steps=self.sampler_steps, tau=self.tau, thermal_classes=tuple(self.thermal_classes),
                               variant=self.variant, schedule=schedule, init_noise_scale=self.init_noise_scale)


def mkf_loss(fusion: nn.Module, frozen: MagicFuseNets, batch: dict[str, Any], generator: torch.Generator,
             cfg: MKFTrainConfig, schedule: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Algorithm 1 on one batch (one truncation step for the batch)."""
    n = len(schedule)
    i = int(torch.randint(0, n, (1,), generator=generator, device=generator.device).item())
    nets = MagicFuseNets(ae=frozen.ae, ikr=frozen.ikr, ckg=frozen.ckg, fusion=fusion)
    out = magicfuse_sample(nets, batch["degraded"], tau=cfg.tau, thermal_classes=cfg.thermal_classes,
                           variant=cfg.variant, generator=generator, stop_at=i, grad_step=i, schedule=schedule,
                           init_noise_scale=cfg.init_noise_scale)
    label = batch.get("label") if cfg.variant != "model2" else None
    loss, terms = fusion_losses(out.magimg, out.ikr, out.ckg_ir, seg_logits=out.seg_logits, label=label,
                                weights=cfg.loss_weights)
    terms["trunc_step"] = torch.tensor(float(i))
    return loss, terms


def evaluate_mkf(nets: MagicFuseNets, shards_dir: str | Path, *, settings: SamplerSettings, split: str = "test",
                 samples: int = 4, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fuse the first `samples` images of `split` whole, as users do (`MagicFuse.fuse`: the
    device's tiling budget, `settings`' steps, τ, variant and z_T scale; image n seeded by
    ``derive_seed(seed, n, 0x5E6)``), and score the head and the MagImg.

    Returns ``miou`` and ``<class>_iou`` for each thermal class (the head's argmax against the
    split's labels, `segmentation_scores`; a class absent from labels and prediction is left
    out) when the split is labelled and the network has a head, and the MagImg's mean box
    contrast ``person_contrast`` / ``car_contrast`` (`magicfuse.evaluation.objects`) when the
    images carry boxes: what eq. 11 is for, measured against training steps. When the split
    holds infrared, also the MagImg's fusion metrics against (A = infrared, B = clean visible)
    in the docs/METRICS.md convention (`visual_means`): ``SSIM``, ``MI``, ``Qabf``, ``PSNR``.
    `nets.fusion` may be the network being trained: the runner gets a frozen copy of it.
    """
    if samples < 1:
        raise ConfigError(f"evaluate_mkf: samples must be >= 1, got {samples}")
    try:
        data = load_eval_set(shards_dir, split, max_images=samples)
    except DataError as exc:
        raise DataError(f"{shards_dir}: split {split!r} has no samples to evaluate the fusion network on "
                        f"({exc})") from exc
    fusion = copy.deepcopy(nets.fusion)
    runner = MagicFuse({"ae": nets.ae, "ikr": nets.ikr, "ckg": nets.ckg, "fusion": fusion}, settings, device=device,
                       source="evaluate_mkf")
    results = runner.fuse(list(data.degraded), seeds=[derive_seed(seed, n, 0x5E6) for n in range(len(data))],
                          batch_size=1, outputs=("magimg", "seg"))
    scores: dict[str, float] = {"eval_samples": float(len(data))}
    if results[0].seg is not None and data.has_labels():
        seg = segmentation_scores([r.seg for r in results], data.label, fusion.config.num_classes)
        per_class = list(seg["per_class_iou"].items())  # (name, IoU) in class id order
        scores["miou"] = float(seg["miou"])
        for name, value in (per_class[c] for c in settings.thermal_classes):
            if value == value:  # NaN: the class is in neither the labels nor the prediction
                scores[f"{name}_iou"] = float(value)
    if data.has_boxes():
        scores.update(contrast_scores([r.magimg for r in results], data.boxes))
    if data.has_infrared():
        scores.update(visual_means([r.magimg for r in results], data.infrared, data.clean, MKF_EVAL_METRICS))
    return scores


def train_mkf(cfg: MKFTrainConfig, *, ae_checkpoint: str | Path, ikr_checkpoint: str | Path,
              ckg_checkpoint: str | Path, shards_dir: str | Path, out_dir: str | Path,
              logger: Logger | None = None, artifacts: ArtifactFn | None = None) -> TrainResult:
    """Train F and S; writes `out_dir/fusion.pt` and `out_dir/pipeline.pt` (returned as `checkpoint`).

    IKR and CKG must have been trained on the same noise schedule (their ``train_config``);
    MKF training, the preview and the bundle's `SamplerSettings` use that schedule.
    """
    info = ddp.init_distributed(cfg.device)
    device = ddp.resolve_device(cfg.device, info)
    ae = freeze(load_autoencoder(ae_checkpoint)).to(device)
    ikr, ikr_payload = load_model(ikr_checkpoint, kind="unet")
    ckg, ckg_payload = load_model(ckg_checkpoint, kind="unet")
    noise_schedule = NoiseSchedule.common({
        f"IKR {ikr_checkpoint}": NoiseSchedule.of_denoiser(ikr_payload.get("train_config")),
        f"CKG {ckg_checkpoint}": NoiseSchedule.of_denoiser(ckg_payload.get("train_config")),
    })
    settings = cfg.sampler_settings(noise_schedule)
    ikr, ckg = freeze(ikr).to(device), freeze(ckg).to(device)
    frozen = MagicFuseNets(ae=ae, ikr=ikr, ckg=ckg, fusion=None)
    if cfg.init_from:
        fusion, _ = load_model(cfg.init_from, kind="fusion")
    else:
        with seeded(cfg.seed):
            fusion = build_model("fusion", cfg.model)
    num_classes = fusion.config.num_classes
    if cfg.seg_class_weights is not None and len(cfg.seg_class_weights) != num_classes:
        raise ConfigError(f"MKFTrainConfig.seg_class_weights has {len(cfg.seg_class_weights)} weights but the "
                          f"fusion network {cfg.model!r} segments {num_classes} classes")
    schedule = settings.ddim(device)
    members = ("degraded", "label")
    loader = shard_loader(shards_dir, cfg, info, members)

    def export(module: nn.Module, out: Path) -> dict[str, Path]:
        fusion_path = save_model(out / "fusion.pt", module, kind="fusion", train_config=to_dict(cfg),
                                 sampler=settings.to_dict())
        pipe_path = save_pipeline(out / "pipeline.pt", ae, ikr, ckg, module, sampler=settings,
                                  train_config=to_dict(cfg))
        return {"pipeline": pipe_path, "fusion": fusion_path}

    def preview(module: nn.Module, batch: dict[str, Any], gen: torch.Generator) -> Tensor:
        nets = MagicFuseNets(ae=ae, ikr=ikr, ckg=ckg, fusion=module)
        degraded = batch["degraded"][:4]
        out = magicfuse_sample(nets, degraded, tau=cfg.tau, thermal_classes=cfg.thermal_classes,
                               variant=cfg.variant, generator=gen, schedule=schedule,
                               init_noise_scale=cfg.init_noise_scale)
        return torch.cat([degraded, out.ikr, out.ckg, out.magimg], dim=-2)

    def evaluate(module: nn.Module) -> dict[str, float]:
        if cfg.eval_samples == 0:
            return {}
        return evaluate_mkf(MagicFuseNets(ae=ae, ikr=ikr, ckg=ckg, fusion=module), shards_dir, settings=settings,
                            split=cfg.eval_split, samples=cfg.eval_samples, seed=cfg.seed, device=device)

    job = TrainJob(
        name="mkf", model=fusion, model_config=model_config(fusion),
        loss_fn=lambda m, b, g: mkf_loss(m, frozen, b, g, cfg, schedule),
        make_loader=loader, export=export, manifest_hash=manifest_hash(shards_dir), preview=preview,
        evaluate=evaluate, find_unused_parameters=True,
    )
    return run_training(cfg, job, out_dir, logger=logger, artifacts=artifacts)
