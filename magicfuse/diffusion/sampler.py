"""The joint MagicFuse sampler — the only sampling loop of the project.

One degraded visible image I goes in; three latent streams start from the SAME
Gaussian z_T and are denoised together with deterministic DDIM (DESIGN.md §1).
z_T is ``init_noise_scale`` × a standard Gaussian (1, the default, is the paper's
N(0, I); a smaller scale is reduced-temperature sampling, see `SamplerSettings`):

* z^ψ by the IKR denoiser Ψ, z^φ by the CKG denoiser Φ, both conditioned on
  c = E(I) (the autoencoder latent of the degraded image);
* z^f by the fused noise ε^f = w^r·ε^ψ + (1−w^r)·ε^φ (eq. 8), where the fusion
  network F gives w from (ẑ0^ψ, ẑ0^φ, z^f_t, ε^ψ, ε^φ, t) (eq. 9) and the
  segmentation head's argmax turns it into w^r = M·min(w, τ) + (1−M)·w on the
  thermal classes (eq. 10–11). The segmentation state is recurrent and starts from
  its own Gaussian noise (one channel per class, latent resolution).

Each stream is updated with its own ε. The outputs are the decoded ẑ0 estimates at
the last executed step (at the final step t = 0 → ᾱ_prev = 1 they are z_0):
MagImg (fused stream), the IKR image and the CKG image, plus the segmentation map.

Ablations (Tables 6–7 of the paper), chosen with ``variant``; `PLANS` tabulates which streams
and which parts of F each variant runs:

* ``"model1"`` — F without the ẑ0 inputs: the fusion network must be built with
  ``use_zhat=False`` (it then ignores the ẑ0 tensors the sampler still passes).
* ``"model2"`` — no segmentation head: w is used as is (no radiation weighting)
  and no segmentation map is returned (``seg``/``seg_logits`` are None). The fusion
  network is normally built with ``seg_head=False``; a network with a head is also
  accepted (the head still runs, since the network requires its state, but its output is ignored).
* ``"model3"`` — output fusion instead of noise fusion: the IKR and CKG streams are
  sampled independently (no fused stream); after the last executed step F is called
  ONCE on the final estimates (ẑ0^ψ, ẑ0^φ, z^f := ½(ẑ0^ψ+ẑ0^φ), ε^ψ, ε^φ, t of that
  step, the initial segmentation noise) and its radiation-weighted w^r fuses the
  two *latents*: ẑ0^f = w^r·ẑ0^ψ + (1−w^r)·ẑ0^φ, which is then decoded.
* ``"model4"`` — IKR only: only the IKR stream runs; MagImg is the IKR image,
  CKG outputs and segmentation are None.

Any image size: the batch is padded (reflect; replicate where the image is too
small for reflection) on the bottom/right up to ``required_multiple(nets)`` and
every image output is cropped back exactly. Latent outputs (``zhat``, ``w``) stay
at the padded latent size.

Training (Algorithm 1): ``stop_at=i`` runs steps 0..i of the list and returns the
estimates at step i; ``grad_step=j`` (j <= i) enables autograd for the fusion
network at step j only. IKR, CKG and the encoder run under ``no_grad``; the
decoder of the fused stream runs with autograd so that a loss on the decoded
MagImg reaches F, but all AE/IKR/CKG parameters are frozen (``requires_grad``
off) for the duration of the call, so their ``.grad`` stays None.

The loop does no host–device synchronisation: the per-step t, ᾱ_t, ᾱ_prev are
precomputed device tensors indexed with Python ints, and no Python branch looks
at tensor values. Latent arithmetic is float32; the networks run in whatever
autocast context the caller sets (e.g. bf16), and may be ``torch.compile``d.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Collection, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magicfuse.diffusion.schedule import DDIMSchedule, ddim_step, eps_from_v, make_ddim_schedule, predict_x0
from magicfuse.diffusion.settings import VARIANTS, SamplerSettings, check_init_noise_scale
from magicfuse.errors import ConfigError, DataError
from magicfuse.models.fusion import radiation_weight
from magicfuse.models.geometry import LATENT_DOWNSCALE, required_multiple, unwrap
from magicfuse.models.unet import prediction_of

Variant = Literal["full", "model1", "model2", "model3", "model4"]
DECODABLE: tuple[str, ...] = ("magimg", "ikr", "ckg")  # images the sampler can decode
DEFAULTS = SamplerSettings()  # the defaults of the keyword arguments below


@dataclass
class MagicFuseNets:
    """The four networks of a MagicFuse pipeline (``fusion`` may be None for ``model4``;
    ``ckg`` may be None for ``model4`` as well)."""

    ae: nn.Module
    ikr: nn.Module
    ckg: nn.Module | None
    fusion: nn.Module | None = None

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.ae, self.ikr, self.ckg, self.fusion) if m is not None]


@dataclass
class SamplerOutput:
    """Result of ``magicfuse_sample``.

    Images are (B,3,H,W) float32 in [0,1] at the input size; ``ckg_ir`` is the CKG
    image's channel mean (B,1,H,W). ``seg_logits`` (B,C,H,W) are the segmentation
    head's logits upsampled ×4 (bilinear) to image size, ``seg`` (B,H,W) int64 their
    argmax. ``zhat`` holds the ẑ0 latents {"psi", "phi", "f"} at the last executed
    step (padded latent size); ``w`` is the weight actually applied (w^r, after
    radiation weighting) and ``w_raw`` F's raw output at that step;
    ``seg_logits_latent`` the logits at latent resolution. ``step_index`` is the
    index of the last executed step in ``pairs`` and ``t`` its timestep.
    """

    magimg: Tensor | None
    ikr: Tensor | None
    ckg: Tensor | None
    ckg_ir: Tensor | None
    seg_logits: Tensor | None
    seg: Tensor | None
    zhat: dict[str, Tensor]
    w: Tensor | None
    w_raw: Tensor | None
    seg_logits_latent: Tensor | None
    step_index: int
    t: int
    pairs: tuple[tuple[int, int], ...] = field(default=())
    image_size: tuple[int, int] = (0, 0)
    padded_size: tuple[int, int] = (0, 0)


# --------------------------------------------------------------------------- helpers


def denoiser_eps(net: nn.Module, z_t: Tensor, t: Tensor, cond: Tensor, abar_t: Tensor) -> Tensor:
    """ε̂(z_t, t, c) of a denoiser in float32, whatever it predicts (ε or v, see `prediction_of`)."""
    out = net(z_t, t, cond).float()
    return eps_from_v(out, z_t.float(), abar_t) if prediction_of(net) == "v" else out


def _cfg(m: nn.Module):
    m = unwrap(m)
    return getattr(m, "config", None) or getattr(m, "cfg", None)


def _fusion_num_classes(fusion: nn.Module) -> int:
    cfg = _cfg(fusion)
    for name in ("num_classes", "classes", "n_classes"):
        if cfg is not None and hasattr(cfg, name):
            return int(getattr(cfg, name))
    raise ConfigError(f"sampler: cannot tell the number of classes of {type(unwrap(fusion)).__name__}")


def _fusion_flag(fusion: nn.Module, name: str, default: bool) -> bool:
    cfg = _cfg(fusion)
    return bool(getattr(cfg, name, default)) if cfg is not None else default


def _stack_images(image: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(image, (list, tuple)):
        if not image:
            raise DataError("magicfuse_sample: empty image list")
        sizes = {tuple(x.shape) for x in image}
        if len(sizes) != 1:
            raise DataError(
                f"magicfuse_sample: images of one batch must share a size, got {sorted(sizes)} "
                "(group them by size first, as magicfuse.inference does)"
            )
        image = torch.stack(list(image))
    if not torch.is_tensor(image):
        raise DataError(f"magicfuse_sample: expected a tensor (B,3,H,W), got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise DataError(f"magicfuse_sample: expected an RGB batch (B,3,H,W) in [0,1], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise DataError(f"magicfuse_sample: expected float images in [0,1], got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise DataError(f"magicfuse_sample: empty image batch {tuple(image.shape)}")
    return image.float()


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal drawn on the generator's device (so a CPU generator works for any device)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)


def _check_noise(name: str, noise: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    if tuple(noise.shape) != shape:
        raise DataError(f"magicfuse_sample: {name} must have shape {shape} (padded latent size), got {tuple(noise.shape)}")
    return noise.to(device=device, dtype=torch.float32)


@contextlib.contextmanager
def _frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Turn requires_grad off for every parameter of `modules`, restoring it afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class VariantPlan:
    """What one sampler variant runs (see the module docstring)."""

    ckg: bool  # the CKG stream z^φ is denoised
    fused_stream: bool  # a fused stream z^f is denoised with ε^f (eq. 8), F called at every step
    fuse_once: bool  # output fusion: F once, after the last step, on the final estimates
    head_used: bool  # the head's output weights w (eq. 11) and gives the segmentation map
    zhat_inputs: bool  # F is built to see the ẑ0 estimates (use_zhat)

    @property
    def fusion(self) -> bool:
        return self.fused_stream or self.fuse_once


PLANS: dict[str, VariantPlan] = {
    #            ckg    fused_stream fuse_once head_used zhat_inputs
    "full": VariantPlan(True, True, False, True, True),
    "model1": VariantPlan(True, True, False, True, False),
    "model2": VariantPlan(True, True, False, False, True),
    "model3": VariantPlan(True, False, True, True, True),
    "model4": VariantPlan(False, False, False, False, True),
}


def _check_variant(nets: MagicFuseNets, variant: str) -> tuple[VariantPlan, bool]:
    """The variant's plan and whether the fusion network has a head; ConfigError when the
    networks cannot run it."""
    if variant not in PLANS:
        raise ConfigError(f"magicfuse_sample: variant must be one of {list(VARIANTS)}, got {variant!r}")
    plan = PLANS[variant]
    if plan.ckg and nets.ckg is None:
        raise ConfigError(f"magicfuse_sample: variant {variant!r} needs the CKG network (nets.ckg is None)")
    if not plan.fusion:
        return plan, False
    if nets.fusion is None:
        raise ConfigError(f"magicfuse_sample: variant {variant!r} needs the fusion network (nets.fusion is None)")
    head = _fusion_flag(nets.fusion, "seg_head", True)
    has_zhat = _fusion_flag(nets.fusion, "use_zhat", True)
    if not plan.zhat_inputs and has_zhat:
        raise ConfigError("magicfuse_sample: variant 'model1' needs a fusion network built with use_zhat=False")
    if plan.zhat_inputs and not has_zhat:
        raise ConfigError("magicfuse_sample: the fusion network was built with use_zhat=False (Model I); "
                          f"use variant='model1', not {variant!r}")
    if plan.head_used and not head:
        raise ConfigError("magicfuse_sample: the fusion network has no segmentation head (Model II); "
                          f"use variant='model2', not {variant!r}")
    return plan, head


def _check_steps(n: int, stop_at: int | None, grad_step: int | None, plan: VariantPlan) -> int:
    """The index of the last step to run; ConfigError for a bad stop_at / grad_step."""
    last = n - 1 if stop_at is None else int(stop_at)
    if not 0 <= last < n:
        raise ConfigError(f"magicfuse_sample: stop_at must be in [0, {n - 1}], got {stop_at}")
    if grad_step is not None:
        if not 0 <= grad_step <= last:
            raise ConfigError(f"magicfuse_sample: grad_step must be in [0, stop_at={last}], got {grad_step}")
        if not plan.fusion:
            raise ConfigError("magicfuse_sample: grad_step needs a variant with a fusion network (not 'model4')")
        if plan.fuse_once and grad_step != last:
            raise ConfigError(
                f"magicfuse_sample: in 'model3' F runs once, after step {last}; grad_step must equal it, got {grad_step}"
            )
    return last


# --------------------------------------------------------------------------- sampler


def magicfuse_sample(
    nets: MagicFuseNets,
    image: Tensor | Sequence[Tensor],
    *,
    steps: int = DEFAULTS.steps,
    tau: float = DEFAULTS.tau,
    thermal_classes: Sequence[int] = DEFAULTS.thermal_classes,
    variant: Variant = "full",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    seg_noise: Tensor | None = None,
    ae_noise: Tensor | None = None,
    stop_at: int | None = None,
    grad_step: int | None = None,
    decode: bool | Collection[str] = True,
    schedule: DDIMSchedule | None = None,
    init_noise_scale: float = DEFAULTS.init_noise_scale,
) -> SamplerOutput:
    """Run the joint MagicFuse sampler on a batch of degraded visible images.

    ``image`` (B,3,H,W) float in [0,1] (or a list of same-size (3,H,W) tensors).
    ``noise`` = the standard Gaussian behind z_T (B,8,h,w), ``seg_noise`` (B,C,h,w) and
    ``ae_noise`` (the encoder's noise) at the padded latent size; whatever is not given is
    drawn from ``generator`` in that order (z_T, encoder noise, segmentation noise).
    ``init_noise_scale`` in [0, 1] multiplies that Gaussian: z_T = init_noise_scale · noise (given
    or drawn; the segmentation state and the encoder noise are not scaled).
    ``stop_at``/``grad_step``: indices into the list of ``steps`` DDIM steps (see
    module docstring). ``decode``: True decodes all images, False none (image fields are
    None), or a subset of ``("magimg", "ikr", "ckg")`` (each decode is a full autoencoder
    pass, the most expensive part of a few-step run on big images).
    ``schedule`` is the DDIM schedule to run (`SamplerSettings.ddim`: the denoisers' training
    schedule); None = ``steps`` steps over the default training schedule. Its length wins
    over ``steps``.
    """
    want = set(DECODABLE) if decode is True else set() if decode is False else set(decode)
    if want - set(DECODABLE):
        raise ConfigError(f"magicfuse_sample: decode must be a bool or a subset of {list(DECODABLE)}, got {decode!r}")
    if not (isinstance(tau, (int, float)) and 0.0 <= float(tau) <= 1.0):
        raise ConfigError(f"magicfuse_sample: tau must be a number in [0, 1], got {tau!r}")
    init_noise_scale = check_init_noise_scale(init_noise_scale, "magicfuse_sample: init_noise_scale")
    plan, head = _check_variant(nets, variant)  # head: the fusion network has a segmentation head

    image = _stack_images(image)
    device = image.device
    sched = schedule if schedule is not None else make_ddim_schedule(steps, device=device)
    if sched.timesteps.device != device:
        sched = DDIMSchedule(sched.pairs, sched.timesteps.to(device), sched.abar_t.to(device), sched.abar_prev.to(device))
    last = _check_steps(len(sched), stop_at, grad_step, plan)

    B, _, H, W = image.shape
    mult = required_multiple(nets)
    padded = _pad_to_multiple(image, mult)
    Hp, Wp = padded.shape[-2:]
    h, w = Hp // LATENT_DOWNSCALE, Wp // LATENT_DOWNSCALE
    lat_c = int(getattr(_cfg(nets.ae), "latent_channels", 8))

    # ---- noises, drawn from `generator` in this order: z_T, encoder noise, segmentation
    # state (last, so that variants without a segmentation head see the same z_T and c).
    zshape = (B, lat_c, h, w)
    z_T = _randn(zshape, generator, device) if noise is None else _check_noise("noise", noise, zshape, device)
    if init_noise_scale != 1.0:
        z_T = z_T * init_noise_scale

    frozen = [m for m in (nets.ae, nets.ikr, nets.ckg) if m is not None] if grad_step is not None else []
    outer = torch.enable_grad() if grad_step is not None else torch.no_grad()
    with outer, _frozen(frozen):
        with torch.no_grad():
            cond = nets.ae.encode(padded, noise=ae_noise, generator=generator).float()
        seg_state = None
        if head:
            sshape = (B, _fusion_num_classes(nets.fusion), h, w)
            seg_state = (_randn(sshape, generator, device) if seg_noise is None
                         else _check_noise("seg_noise", seg_noise, sshape, device))

        z_psi = z_T
        z_phi = z_T if plan.ckg else None
        z_f = z_T if plan.fused_stream else None
        zhat: dict[str, Tensor] = {}
        w_used = w_raw = seg_logits = None
        eps_psi = eps_phi = None

        for i in range(last + 1):
            t = sched.timesteps[i].expand(B)
            a_t, a_prev = sched.abar_t[i], sched.abar_prev[i]
            with torch.no_grad():
                eps_psi = denoiser_eps(nets.ikr, z_psi, t, cond, a_t)
                eps_phi = denoiser_eps(nets.ckg, z_phi, t, cond, a_t) if plan.ckg else None
            x0_psi = predict_x0(z_psi, eps_psi, a_t)
            x0_phi = predict_x0(z_phi, eps_phi, a_t) if plan.ckg else None

            x0_f = None
            if z_f is not None:
                grad_here = grad_step is not None and i == grad_step
                with torch.set_grad_enabled(grad_here):
                    out = nets.fusion(x0_psi, x0_phi, z_f, eps_psi, eps_phi, t, seg_state)
                w_raw = out.w.float()
                seg_state = out.seg_state
                if plan.head_used:
                    seg_logits = out.seg_logits
                    w_used = radiation_weight(w_raw, seg_logits.float(), thermal_classes, tau)
                else:
                    w_used = w_raw
                eps_f = w_used * eps_psi + (1.0 - w_used) * eps_phi
                x0_f = predict_x0(z_f, eps_f, a_t)

            if i == last:
                zhat = {"psi": x0_psi}
                if x0_phi is not None:
                    zhat["phi"] = x0_phi
                if x0_f is not None:
                    zhat["f"] = x0_f
                break
            z_psi = ddim_step(z_psi, eps_psi, a_t, a_prev)
            if plan.ckg:
                z_phi = ddim_step(z_phi, eps_phi, a_t, a_prev)
            if z_f is not None:
                z_f = ddim_step(z_f, eps_f, a_t, a_prev)

        if plan.fuse_once:
            # Output fusion: F once on the final estimates; its weight fuses the latents.
            t = sched.timesteps[last].expand(B)
            with torch.set_grad_enabled(grad_step is not None):
                out = nets.fusion(x0_psi, x0_phi, 0.5 * (x0_psi + x0_phi), eps_psi, eps_phi, t, seg_state)
            w_raw = out.w.float()
            seg_logits = out.seg_logits
            w_used = radiation_weight(w_raw, seg_logits.float(), thermal_classes, tau)
            zhat["f"] = w_used * x0_psi + (1.0 - w_used) * x0_phi
        elif not plan.fusion:  # IKR only: the MagImg is the IKR image
            zhat["f"] = zhat["psi"]

        magimg = ikr_img = ckg_img = ckg_ir = None
        with torch.no_grad():
            if "ikr" in want or (not plan.fusion and "magimg" in want):
                ikr_img = nets.ae.decode(zhat["psi"]).float()[..., :H, :W]
            if "ckg" in want and "phi" in zhat:
                ckg_img = nets.ae.decode(zhat["phi"]).float()[..., :H, :W]
                ckg_ir = ckg_img.mean(dim=1, keepdim=True)
        if "magimg" in want:
            magimg = ikr_img if not plan.fusion else nets.ae.decode(zhat["f"]).float()[..., :H, :W]

        seg_up = seg = None
        if seg_logits is not None:
            seg_logits = seg_logits.float()
            seg_up = F.interpolate(seg_logits, size=(Hp, Wp), mode="bilinear", align_corners=False)[..., :H, :W]
            seg = seg_up.detach().argmax(dim=1)

    return SamplerOutput(
        magimg=magimg,
        ikr=ikr_img,
        ckg=ckg_img,
        ckg_ir=ckg_ir,
        seg_logits=seg_up,
        seg=seg,
        zhat=zhat,
        w=w_used,
        w_raw=w_raw,
        seg_logits_latent=seg_logits,
        step_index=last,
        t=sched.pairs[last][0],
        pairs=sched.pairs,
        image_size=(H, W),
        padded_size=(Hp, Wp),
    )
