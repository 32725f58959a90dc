from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from magicfuse.diffusion.sampler import MagicFuseNets, magicfuse_sample, required_multiple
from magicfuse.diffusion.schedule import ddim_pairs, eps_from_v, make_alphas_cumprod, make_ddim_schedule, predict_x0
from magicfuse.errors import ConfigError, DataError, MagicFuseError
from magicfuse.models import FusionConfig, build_model
from magicfuse.models.presets import PRESETS

STEPS = 4  # short schedules keep the suite fast; one test runs the full 25


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_zero_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The UNets' output convs start at zero (eps = 0); give them small random weights so
    that every network's output depends on its input, as in a trained pipeline."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _nets(fusion_cfg: FusionConfig | None = None, seed: int = 0) -> MagicFuseNets:
    torch.manual_seed(seed)
    fcfg = fusion_cfg or PRESETS["fusion-tiny"][1]
    return MagicFuseNets(
        ae=build_model("ae", "ae").eval(),
        ikr=_randomise_zero_init(build_model("unet", "ikr-tiny"), seed + 1),
        ckg=_randomise_zero_init(build_model("unet", "ckg-tiny"), seed + 2),
        fusion=build_model("fusion", fcfg).eval(),
    )


@pytest.fixture(scope="module")
def nets() -> MagicFuseNets:
    return _nets()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 30, 41, generator=torch.Generator().manual_seed(7))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def full(nets, image):
    return magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0))


def test_required_multiple(nets):
    # AE /4, tiny UNets with 3 levels need latents divisible by 4
    assert required_multiple(nets) == 16
    with torch.device("meta"):  # the paper UNets have 4 levels: latents /8, images /32
        paper = dataclasses.replace(nets, ikr=build_model("unet", "ikr-paper"))
    assert required_multiple(paper) == 32


def test_output_shapes_odd_size(full, image):
    B, _, H, W = image.shape
    assert full.padded_size == (32, 48) and full.image_size == (H, W)
    for name in ("magimg", "ikr", "ckg"):
        x = getattr(full, name)
        assert x.shape == (B, 3, H, W) and x.dtype == torch.float32, name
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert full.ckg_ir.shape == (B, 1, H, W)
    torch.testing.assert_close(full.ckg_ir, full.ckg.mean(dim=1, keepdim=True))
    assert full.seg_logits.shape == (B, 9, H, W)
    assert full.seg.shape == (B, H, W) and full.seg.dtype == torch.long
    assert torch.equal(full.seg, full.seg_logits.argmax(1))
    assert full.seg_logits_latent.shape == (B, 9, 8, 12)
    assert full.w.shape == (B, 8, 8, 12)
    assert set(full.zhat) == {"psi", "phi", "f"}
    assert full.step_index == STEPS - 1 and full.t == 0
    assert not full.magimg.requires_grad


def test_pad_and_crop_exact(nets, image):
    """An odd-size image gives exactly the crop of what its reflect-padded version gives."""
    kw = dict(steps=2, noise=torch.randn(2, 8, 8, 12, generator=_gen(1)),
              seg_noise=torch.randn(2, 9, 8, 12, generator=_gen(2)),
              ae_noise=torch.randn(2, 32, 8, 12, generator=_gen(3)))
    odd = magicfuse_sample(nets, image, **kw)
    padded = F.pad(image, (0, 48 - 41, 0, 32 - 30), mode="reflect")
    big = magicfuse_sample(nets, padded, **kw)
    assert big.padded_size == (32, 48)
    for name in ("magimg", "ikr", "ckg", "seg_logits", "seg"):
        assert torch.equal(getattr(odd, name), getattr(big, name)[..., :30, :41]), name
    # an image that is already a multiple is not padded
    assert magicfuse_sample(nets, image[..., :16, :32], steps=1, generator=_gen()).padded_size == (16, 32)


def test_tiny_image_uses_replicate_padding(nets):
    out = magicfuse_sample(nets, torch.rand(1, 3, 5, 3, generator=_gen()), steps=1, generator=_gen())
    assert out.magimg.shape == (1, 3, 5, 3) and out.padded_size == (16, 16)


def test_deterministic_for_a_seed(nets, image, full):
    again = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0))
    for name in ("magimg", "ikr", "ckg", "seg_logits", "w"):
        assert torch.equal(getattr(full, name), getattr(again, name)), name
    other = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(1))
    assert (other.magimg - full.magimg).abs().max() > 1e-3
    assert not torch.equal(other.zhat["psi"], full.zhat["psi"])


def test_streams_share_z_T_and_eq8(nets, image):
    """Step 0 from given noises: each stream's ẑ0 is eq. 13 on the SAME z_T with its own ε,
    and the fused stream uses ε^f = w^r·ε^ψ + (1−w^r)·ε^φ."""
    z_T = torch.randn(2, 8, 8, 12, generator=_gen(11))
    s_T = torch.randn(2, 9, 8, 12, generator=_gen(12))
    a_T = torch.randn(2, 32, 8, 12, generator=_gen(13))
    out = magicfuse_sample(nets, image, steps=25, noise=z_T, seg_noise=s_T, ae_noise=a_T, stop_at=0)
    assert out.step_index == 0 and out.t == 960
    padded = F.pad(image, (0, 7, 0, 2), mode="reflect")
    abar = make_alphas_cumprod()[960]
    t = torch.full((2,), 960, dtype=torch.long)
    with torch.no_grad():
        c = nets.ae.encode(padded, noise=a_T)
        # the tiny denoisers predict v: ε = √ᾱ·v + √(1−ᾱ)·z_t
        assert nets.ikr.config.prediction == nets.ckg.config.prediction == "v"
        e_psi = eps_from_v(nets.ikr(z_T, t, c), z_T, abar)
        e_phi = eps_from_v(nets.ckg(z_T, t, c), z_T, abar)
        x_psi, x_phi = predict_x0(z_T, e_psi, abar), predict_x0(z_T, e_phi, abar)
        ref = nets.fusion(x_psi, x_phi, z_T, e_psi, e_phi, t, s_T)
    torch.testing.assert_close(out.zhat["psi"], x_psi)
    torch.testing.assert_close(out.zhat["phi"], x_phi)
    torch.testing.assert_close(out.w_raw, ref.w)
    torch.testing.assert_close(out.seg_logits_latent, ref.seg_logits)
    torch.testing.assert_close(out.zhat["f"], predict_x0(z_T, out.w * e_psi + (1 - out.w) * e_phi, abar))
    assert not torch.allclose(out.zhat["psi"], out.zhat["phi"])


def test_init_noise_scale_scales_z_T_only(nets, image):
    """z_T = init_noise_scale · noise: the same run as scale 1 on the scaled Gaussian (the
    encoder noise and the segmentation state untouched); scale 0 starts every stream at 0."""
    z = torch.randn(2, 8, 8, 12, generator=_gen(21))
    s_T = torch.randn(2, 9, 8, 12, generator=_gen(22))
    a_T = torch.randn(2, 32, 8, 12, generator=_gen(23))
    kw = dict(steps=STEPS, seg_noise=s_T, ae_noise=a_T)
    scaled = magicfuse_sample(nets, image, noise=z, init_noise_scale=0.5, **kw)
    by_hand = magicfuse_sample(nets, image, noise=0.5 * z, **kw)
    plain = magicfuse_sample(nets, image, noise=z, **kw)
    for name in ("magimg", "ikr", "ckg", "seg_logits", "w"):
        assert torch.equal(getattr(scaled, name), getattr(by_hand, name)), name
    assert (scaled.ikr - plain.ikr).abs().max() > 1e-3  # premise: the scale changes the result
    zero = magicfuse_sample(nets, image, noise=z, init_noise_scale=0.0, **kw)
    other = magicfuse_sample(nets, image, noise=-z, init_noise_scale=0.0, **kw)
    assert torch.equal(zero.ikr, other.ikr) and torch.equal(zero.ckg, other.ckg)
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match="init_noise_scale"):
            magicfuse_sample(nets, image, steps=1, init_noise_scale=bad)


def test_sampler_reads_what_each_denoiser_predicts(nets, image):
    """The same weights read as an ε-predictor (the authors' convention) give eq. 13 on the raw
    output; read as a v-predictor, on ε = √ᾱ·v + √(1−ᾱ)·z_t."""
    z_T = torch.randn(2, 8, 8, 12, generator=_gen(21))
    a_T = torch.randn(2, 32, 8, 12, generator=_gen(22))
    as_eps = build_model("unet", dataclasses.replace(nets.ikr.config, prediction="eps")).eval()
    as_eps.load_state_dict(nets.ikr.state_dict())
    abar = make_alphas_cumprod()[960]
    t = torch.full((2,), 960, dtype=torch.long)
    padded = F.pad(image, (0, 7, 0, 2), mode="reflect")
    outs = {}
    for name, net in (("v", nets.ikr), ("eps", as_eps)):
        one = MagicFuseNets(ae=nets.ae, ikr=net, ckg=None)
        outs[name] = magicfuse_sample(one, image, steps=25, noise=z_T, ae_noise=a_T, stop_at=0, variant="model4")
    with torch.no_grad():
        raw = nets.ikr(z_T, t, nets.ae.encode(padded, noise=a_T))
    torch.testing.assert_close(outs["eps"].zhat["psi"], predict_x0(z_T, raw, abar))
    torch.testing.assert_close(outs["v"].zhat["psi"], predict_x0(z_T, eps_from_v(raw, z_T, abar), abar))
    assert (outs["v"].zhat["psi"] - outs["eps"].zhat["psi"]).abs().mean() > 0.1


def test_stop_at_truncates(nets, image, full):
    part = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), stop_at=1)
    assert part.step_index == 1 and part.t == ddim_pairs(STEPS)[1][0]
    assert part.magimg.shape == full.magimg.shape
    assert not torch.allclose(part.zhat["f"], full.zhat["f"])


def test_gradients_reach_only_the_fusion_net(image):
    """Algorithm 1: run to step i with autograd on for F at step i only."""
    nets = _nets(seed=3)
    out = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), stop_at=2, grad_step=2)
    assert out.step_index == 2 and out.magimg.requires_grad and out.seg_logits.requires_grad
    assert not out.ikr.requires_grad and not out.ckg.requires_grad
    label = torch.randint(0, 9, out.seg.shape, generator=_gen(1))
    (out.magimg.mean() + F.cross_entropy(out.seg_logits, label)).backward()
    fgrads = {n: p.grad for n, p in nets.fusion.named_parameters()}
    assert all(g is not None for g in fgrads.values()), [n for n, g in fgrads.items() if g is None]
    assert sum(float(g.abs().sum()) for g in fgrads.values()) > 0
    for name in ("ae", "ikr", "ckg"):
        mod = getattr(nets, name)
        assert all(p.grad is None for p in mod.parameters()), name
        assert all(p.requires_grad for p in mod.parameters()), f"{name}: requires_grad not restored"
    # without grad_step nothing is tracked, and the values are the same
    out2 = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), stop_at=2)
    assert not out2.magimg.requires_grad and not out2.w.requires_grad
    torch.testing.assert_close(out2.magimg, out.magimg.detach())


def test_grad_step_before_stop_at(image):
    """With grad_step < stop_at the loss reaches F through the fused stream of that
    step only; F's later calls (and so the final segmentation logits) carry no graph."""
    nets = _nets(seed=4)
    out = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), stop_at=2, grad_step=1)
    assert out.magimg.requires_grad and not out.seg_logits.requires_grad and not out.w.requires_grad
    out.magimg.mean().backward()
    assert nets.fusion.estimate[0].weight.grad is not None
    assert float(nets.fusion.estimate[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in nets.ikr.parameters())


def test_variants_change_output(image):
    base = _nets(seed=5)
    # every class thermal and tau = 0: radiation weighting acts on every pixel with w > 0
    tc = tuple(range(9))
    full = magicfuse_sample(base, image, thermal_classes=tc, tau=0.0, generator=_gen(0), steps=STEPS)

    m1_nets = dataclasses.replace(base, fusion=build_model("fusion", dataclasses.replace(PRESETS["fusion-tiny"][1], use_zhat=False)))
    m1_nets.fusion.load_state_dict(base.fusion.state_dict())
    m1_nets.fusion.eval()
    m2_nets = dataclasses.replace(base, fusion=build_model("fusion", dataclasses.replace(PRESETS["fusion-tiny"][1], seg_head=False)))
    m2_nets.fusion.load_state_dict(base.fusion.state_dict(), strict=False)
    m2_nets.fusion.eval()
    outs = {
        "model1": magicfuse_sample(m1_nets, image, thermal_classes=tc, tau=0.0, variant="model1", generator=_gen(0), steps=STEPS),
        "model2": magicfuse_sample(m2_nets, image, thermal_classes=tc, tau=0.0, variant="model2", generator=_gen(0), steps=STEPS),
        "model2-head": magicfuse_sample(base, image, thermal_classes=tc, tau=0.0, variant="model2", generator=_gen(0), steps=STEPS),
        "model3": magicfuse_sample(base, image, thermal_classes=tc, tau=0.0, variant="model3", generator=_gen(0), steps=STEPS),
        "model4": magicfuse_sample(base, image, thermal_classes=tc, tau=0.0, variant="model4", generator=_gen(0), steps=STEPS),
    }
    for name, o in outs.items():
        assert o.magimg.shape == full.magimg.shape, name
        assert (o.magimg - full.magimg).abs().max() > 1e-4, f"{name} gives the same MagImg as the full model"
        # the IKR stream does not depend on the variant
        torch.testing.assert_close(o.ikr, full.ikr, msg=name)
    assert outs["model2"].seg is None and outs["model2"].seg_logits is None
    assert outs["model2-head"].seg is None
    torch.testing.assert_close(outs["model2"].magimg, outs["model2-head"].magimg)
    assert outs["model1"].seg.shape == full.seg.shape
    # model3: the same streams as model4/full for IKR and CKG, fused once at the end
    m3 = outs["model3"]
    torch.testing.assert_close(m3.ckg, full.ckg)
    torch.testing.assert_close(m3.zhat["f"], m3.w * m3.zhat["psi"] + (1 - m3.w) * m3.zhat["phi"])
    assert m3.seg.shape == full.seg.shape
    # model4: IKR only
    m4 = outs["model4"]
    assert torch.equal(m4.magimg, m4.ikr)
    assert m4.ckg is None and m4.seg is None and m4.w is None


def test_variant_network_mismatch_is_an_error(nets, image):
    with pytest.raises(ConfigError, match="use_zhat"):
        magicfuse_sample(nets, image, steps=1, variant="model1")
    no_zhat = dataclasses.replace(nets, fusion=build_model("fusion", dataclasses.replace(PRESETS["fusion-tiny"][1], use_zhat=False)))
    with pytest.raises(ConfigError, match="model1"):
        magicfuse_sample(no_zhat, image, steps=1)
    no_head = dataclasses.replace(nets, fusion=build_model("fusion", dataclasses.replace(PRESETS["fusion-tiny"][1], seg_head=False)))
    with pytest.raises(ConfigError, match="model2"):
        magicfuse_sample(no_head, image, steps=1)
    with pytest.raises(ConfigError, match="fusion"):
        magicfuse_sample(dataclasses.replace(nets, fusion=None), image, steps=1)
    # model4 needs neither CKG nor F
    out = magicfuse_sample(dataclasses.replace(nets, ckg=None, fusion=None), image, steps=1, variant="model4")
    assert out.magimg.shape == image.shape


def test_tau_caps_weight_on_thermal_pixels(nets, image):
    # the untrained head's most frequent class plays the thermal class (class 2 may not occur)
    free = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), tau=1.0, thermal_classes=(0,))
    thermal = int(free.seg_logits_latent.argmax(1).flatten().mode().values)
    out = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), tau=0.2, thermal_classes=(thermal,))
    mask = (out.seg_logits_latent.argmax(1, keepdim=True) == thermal).expand_as(out.w)
    # premise: some pixels are of that class, some are not, and some had a weight above the cap
    assert bool(mask.any()) and bool((~mask).any()) and bool((out.w_raw[mask] > 0.2).any())
    assert bool((out.w[mask] <= 0.2).all())
    torch.testing.assert_close(out.w[mask], out.w_raw[mask].clamp(max=0.2))
    torch.testing.assert_close(out.w[~mask], out.w_raw[~mask])
    everything = tuple(range(9))
    lo = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), tau=0.0, thermal_classes=everything)
    hi = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), tau=0.8, thermal_classes=everything)
    assert bool((lo.w <= 0.0).all()) and bool((hi.w <= 0.8).all())
    assert (lo.magimg - hi.magimg).abs().max() > 1e-4


def test_bad_inputs_give_clear_errors(nets, image):
    with pytest.raises(DataError, match="share a size"):
        magicfuse_sample(nets, [image[0], image[1, :, :20]], steps=1)
    with pytest.raises(DataError, match=r"\(B,3,H,W\)"):
        magicfuse_sample(nets, torch.rand(1, 1, 32, 32), steps=1)
    with pytest.raises(DataError, match="dtype"):
        magicfuse_sample(nets, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), steps=1)
    with pytest.raises(DataError, match="noise must have shape"):
        magicfuse_sample(nets, image, steps=1, noise=torch.randn(2, 8, 7, 10))
    with pytest.raises(ConfigError, match="variant"):
        magicfuse_sample(nets, image, steps=1, variant="model5")
    with pytest.raises(ConfigError, match="tau"):
        magicfuse_sample(nets, image, steps=1, tau=1.5)
    with pytest.raises(ConfigError, match="stop_at"):
        magicfuse_sample(nets, image, steps=3, stop_at=3)
    with pytest.raises(ConfigError, match="grad_step"):
        magicfuse_sample(nets, image, steps=3, stop_at=1, grad_step=2)
    with pytest.raises(MagicFuseError):
        magicfuse_sample(nets, image, steps=0)
    # a same-size list is accepted and equals the stacked batch
    a = magicfuse_sample(nets, [image[0], image[1]], steps=1, generator=_gen())
    b = magicfuse_sample(nets, image, steps=1, generator=_gen())
    assert torch.equal(a.magimg, b.magimg)


def test_prebuilt_schedule(nets, image):
    s = make_ddim_schedule(3)
    a = magicfuse_sample(nets, image, schedule=s, generator=_gen())
    b = magicfuse_sample(nets, image, steps=3, generator=_gen())
    assert torch.equal(a.magimg, b.magimg) and a.pairs == tuple(ddim_pairs(3))


def test_autocast_bf16_cpu(nets, image, full):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0))
    assert out.magimg.dtype == torch.float32 and out.zhat["f"].dtype == torch.float32
    assert torch.isfinite(out.magimg).all()
    # bf16 nets, fp32 latent maths: close to the fp32 result
    assert (out.magimg - full.magimg).abs().mean() < 0.05


def test_decode_only_what_is_asked(nets, image, full):
    only = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), decode=["magimg"])
    assert torch.equal(only.magimg, full.magimg) and only.ikr is None and only.ckg is None
    ckg = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), decode=("ckg",))
    assert ckg.magimg is None and torch.equal(ckg.ckg_ir, full.ckg_ir)
    m4 = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), variant="model4", decode=["magimg"])
    assert m4.magimg is not None and m4.ckg is None
    none = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), decode=False)
    assert none.magimg is None and torch.equal(none.zhat["f"], full.zhat["f"])
    with pytest.raises(ConfigError, match="decode"):
        magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0), decode=["seg"])


@pytest.mark.slow
def test_torch_compile_matches_eager(image, full):
    nets = _nets()
    nets.ikr = torch.compile(nets.ikr)
    nets.ckg = torch.compile(nets.ckg)
    nets.fusion = torch.compile(nets.fusion)
    out = magicfuse_sample(nets, image, steps=STEPS, generator=_gen(0))
    assert required_multiple(nets) == 16
    torch.testing.assert_close(out.magimg, full.magimg, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (checks the loop for host-device syncs)")
def test_no_host_device_sync_in_loop(image):
    dev = torch.device("cuda")
    nets = _nets()
    for m in nets.modules():
        m.to(dev)
    x = image.to(dev)
    sched = make_ddim_schedule(STEPS, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    magicfuse_sample(nets, x, schedule=sched, generator=g, decode=False)  # warm up kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = magicfuse_sample(nets, x, schedule=sched, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.magimg.shape == x.shape


def test_sampler_settings_carry_init_noise_scale():
    from magicfuse.diffusion.settings import SamplerSettings
    s = SamplerSettings(init_noise_scale=0.5)
    d = s.to_dict()
    assert d["init_noise_scale"] == 0.5 and SamplerSettings.from_mapping(d) == s
    # pipelines written before the setting existed sample as the paper does
    old = {k: v for k, v in d.items() if k != "init_noise_scale"}
    assert SamplerSettings.from_mapping(old).init_noise_scale == 1.0
    assert s.replace(init_noise_scale=None).init_noise_scale == 0.5
    assert s.replace(init_noise_scale=0.0).init_noise_scale == 0.0
    for bad in (1.5, -1, "half", True):
        with pytest.raises(ConfigError, match=r"ckpt\.pt.*init_noise_scale"):
            SamplerSettings.from_mapping({**d, "init_noise_scale": bad}, where="ckpt.pt: sampler settings")
