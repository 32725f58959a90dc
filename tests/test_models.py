"""Networks: exact paper layouts, AE conventions on real images, tiny presets, ablation flags, eq. 11."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import need_shared
from magicfuse.errors import ConfigError, DataError
from magicfuse.models import (
    PRESETS,
    AutoEncoder,
    ConditionalUNet,
    FusionConfig,
    FusionNet,
    UNetConfig,
    build_model,
    count_parameters,
    model_config,
    radiation_weight,
)
from magicfuse.models.fusion import timestep_embedding as fusion_temb
from magicfuse.models.unet import Attention, timestep_embedding as unet_temb

torch.set_num_threads(2)


def meta_build(kind, preset):
    with torch.device("meta"):
        return build_model(kind, preset)


def layout(section):
    path = need_shared("weights", "official_layout.json")
    return json.loads(path.read_text())[section]


# -- exact paper architectures -------------------------------------------------------------

@pytest.mark.parametrize("kind,preset,count", [
    ("unet", "ikr-paper", 39_652_104),
    ("unet", "ckg-paper", 517_670_920),
    ("fusion", "fusion-paper", 2_742_148),
])
def test_paper_parameter_counts(kind, preset, count):
    assert count_parameters(meta_build(kind, preset)) == count


def test_ae_parameter_counts():
    ae = meta_build("ae", "ae")
    assert count_parameters(ae.encoder) == 220_968
    assert count_parameters(ae.decoder) == 188_163


@pytest.mark.parametrize("section,kind,preset", [
    ("ikr_unet", "unet", "ikr-paper"),
    ("ckg_unet", "unet", "ckg-paper"),
    ("fusion", "fusion", "fusion-paper"),
])
@pytest.mark.needs_shared
def test_state_dict_equals_official_layout(section, kind, preset):
    want = layout(section)
    model = meta_build(kind, preset)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want["tensors"]
    assert count_parameters(model) == want["num_parameters"]


@pytest.mark.needs_shared
def test_ae_state_dict_equals_official_layout():
    ae = meta_build("ae", "ae")
    for part in ("encoder", "decoder"):
        want = layout(part)
        got = {k: list(v.shape) for k, v in getattr(ae, part).state_dict().items()}
        assert got == want["tensors"]


# -- autoencoder ---------------------------------------------------------------------------

def _read_rgb(path):
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return np.ascontiguousarray(img[:, :, ::-1])


def official_ae():
    sd = torch.load(need_shared("weights", "official_ae.pth"), map_location="cpu", weights_only=True)
    ae = AutoEncoder()
    ae.encoder.load_state_dict(sd["encoder"])
    ae.decoder.load_state_dict(sd["decoder"])
    return ae.eval()


def _ae_psnrs(files):
    ae = official_ae()
    gen = torch.Generator().manual_seed(0)
    psnrs = []
    for f in files:
        x = torch.from_numpy(_read_rgb(f)).permute(2, 0, 1)[None].float() / 255
        assert x.shape[-2:] == (480, 640)
        with torch.no_grad():
            z = ae.encode(x, generator=gen)
            y = ae.decode(z)
        assert z.shape == (1, 8, 120, 160)
        assert z.min() >= -1 and z.max() <= 1
        y = (y * 255).round() / 255
        psnrs.append(10 * math.log10(1.0 / float(((y - x) ** 2).mean())))
    return psnrs


@pytest.mark.needs_shared
def test_official_ae_reconstructs_real_msrs_images():
    files = sorted(need_shared("data", "msrs", "test", "vi").glob("*.png"))
    psnrs = _ae_psnrs([files[0], files[1], files[-2], files[-1]])  # two night, two day frames (~38 dB)
    assert np.mean(psnrs) >= 33.0, psnrs


@pytest.mark.slow
@pytest.mark.needs_shared
def test_official_ae_reconstructs_all_msrs_images():
    files = sorted(need_shared("data", "msrs", "test", "vi").glob("*.png"))
    psnrs = _ae_psnrs(files)
    # The issue's bar is the mean (the authors' code gives ~35 dB); single hard frames dip
    # below 30 dB (29.8 dB seen), so the floor only guards against broken frames.
    assert np.mean(psnrs) >= 33.0 and min(psnrs) >= 27.0, psnrs


def test_encode_noise_is_explicit_and_seedable():
    torch.manual_seed(0)
    ae = AutoEncoder().eval()
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        a = ae.encode(x, generator=torch.Generator().manual_seed(7))
        b = ae.encode(x, generator=torch.Generator().manual_seed(7))
        c = ae.encode(x, generator=torch.Generator().manual_seed(8))
        noise = torch.randn(ae.noise_shape(x), generator=torch.Generator().manual_seed(7))
        d = ae.encode(x, noise=noise)
        z0 = ae.encode(x, noise_scale=0.0)
        z1 = ae.encode(x, noise=torch.zeros(ae.noise_shape(x)))
    assert a.shape == (2, 8, 4, 6)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.allclose(a, c)
    assert torch.equal(z0, z1)
    with pytest.raises(DataError, match="noise must have shape"):
        ae.encode(x, noise=torch.zeros(2, 32, 5, 6))


def test_ae_rejects_sizes_not_divisible_by_4():
    ae = AutoEncoder()
    with pytest.raises(DataError, match="multiples of 4"):
        ae.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(DataError, match=r"\(B,3,H,W\)"):
        ae.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(DataError, match="latent"):
        ae.decode(torch.rand(1, 4, 8, 8))


def test_decode_clamps_latents_to_unit_range():
    ae = AutoEncoder().eval()
    z = torch.rand(1, 8, 4, 4) * 2 - 1
    with torch.no_grad():
        big = ae.decode(z.sign() * 5)
        sat = ae.decode(z.sign())
    assert torch.equal(big, sat)


# -- UNet ----------------------------------------------------------------------------------

def _randomize_zero_inits(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("preset", ["ikr-tiny", "ckg-tiny"])
def test_tiny_unet_forward(preset):
    torch.manual_seed(0)
    net = build_model("unet", preset).eval()
    n = count_parameters(net)
    assert 100_000 < n < 1_000_000
    z, cond = torch.randn(2, 8, 13, 10), torch.randn(2, 8, 13, 10)  # odd latent sizes work
    with torch.no_grad():
        assert torch.count_nonzero(net(z, torch.tensor([0, 999]), cond)) == 0  # LDM zero-init output conv
        _randomize_zero_inits(net)
        e = net(z, torch.tensor([10, 900]), cond)
        assert e.shape == (2, 8, 13, 10)
        assert not torch.allclose(e, net(z, torch.tensor([500, 900]), cond))  # depends on t
        assert not torch.allclose(e, net(z, torch.tensor([10, 900]), cond + 1))  # depends on cond
        # a scalar t is broadcast to the batch
        assert torch.allclose(net(z, 40, cond), net(z, torch.tensor([40, 40]), cond))
        # per-sample independence (no batch mixing)
        assert torch.allclose(net(z[:1], torch.tensor([10]), cond[:1]), e[:1], atol=1e-5)
    with pytest.raises(DataError, match="cond"):
        net(z, 0, torch.randn(2, 8, 12, 10))


def test_ikr_paper_forward_small_latent():
    torch.manual_seed(0)
    net = build_model("unet", "ikr-paper").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 8, 8, 8), torch.tensor([960]), torch.randn(1, 8, 8, 8))
    assert out.shape == (1, 8, 8, 8)


def test_sdpa_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    att = Attention(dim=16, heads=4, dim_head=4, dropout=0.0)
    x = torch.randn(2, 10, 16)
    q, k, v = (m(x).view(2, 10, 4, 4).transpose(1, 2) for m in (att.to_q, att.to_k, att.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    ref = att.to_out((w @ v).transpose(1, 2).reshape(2, 10, 16))
    assert torch.allclose(att(x, (2, 5)), ref, atol=1e-5)


def test_timestep_embeddings_known_values():
    t = torch.tensor([0.0, 10.0])
    e = unet_temb(t, 8)  # LDM: [cos(t f), sin(t f)], f_i = 10000^(-i/4)
    f = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(10 * f), torch.sin(10 * f)]))
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    g = fusion_temb(t, 8)  # DDPM: [sin, cos], f_i = 10000^(-i/3)
    f2 = 10000 ** (-torch.arange(4) / 3)
    assert torch.allclose(g[1], torch.cat([torch.sin(10 * f2), torch.cos(10 * f2)]))


# -- fusion network ------------------------------------------------------------------------

def _fusion_inputs(b=2, h=6, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(b, 8, h, w, generator=g) for _ in range(5)]
    return z, torch.randn(b, 9, h, w, generator=g)


def test_fusion_tiny_forward_and_recurrent_state():
    torch.manual_seed(0)
    net = build_model("fusion", "fusion-tiny").eval()
    assert count_parameters(net) < 300_000
    (zp, zf_, zf, ep, ef), seg = _fusion_inputs()
    with torch.no_grad():
        out = net(zp, zf_, zf, ep, ef, torch.tensor([960, 40]), seg)
        out2 = net(zp, zf_, zf, ep, ef, torch.tensor([960, 40]), out.seg_state)
    assert out.w.shape == (2, 8, 6, 8)
    assert out.seg_logits.shape == (2, 9, 6, 8)
    assert out.seg_state is out.seg_logits
    assert len(out.zeta) == 2 * net.config.num_blocks and out.zeta[0].shape == (2, 32, 6, 8)
    assert not torch.allclose(out.seg_logits, out2.seg_logits)  # the state feeds back
    assert torch.allclose(out.w, out2.w)  # the weight does not depend on the seg state
    with pytest.raises(DataError, match="seg_state"):
        net(zp, zf_, zf, ep, ef, 10, None)
    with pytest.raises(DataError, match="eps_phi"):
        net(zp, zf_, zf, ep, ef[:, :, :5], 10, seg)


def test_fusion_model1_ignores_zhat_inputs():
    torch.manual_seed(0)
    full = FusionNet(FusionConfig(channels=32, num_blocks=2, num_groups=8)).eval()
    m1 = FusionNet(FusionConfig(channels=32, num_blocks=2, num_groups=8, use_zhat=False)).eval()
    m1.load_state_dict(full.state_dict())  # same layout
    (zp, zf_, zf, ep, ef), seg = _fusion_inputs()
    with torch.no_grad():
        a = m1(zp, zf_, zf, ep, ef, 100, seg)
        b = m1(zp * 3, -zf_, zf, ep, ef, 100, seg)
        c = full(zp, zf_, zf, ep, ef, 100, seg)
        d = full(zp * 3, -zf_, zf, ep, ef, 100, seg)
        zeros = torch.zeros_like(zp)
        e = full(zeros, zeros, zf, ep, ef, 100, seg)
    assert torch.equal(a.w, b.w) and torch.equal(a.seg_logits, b.seg_logits)
    assert not torch.allclose(c.w, d.w)
    assert torch.allclose(a.w, e.w)  # Model I == zeros in the ẑ0 slots


def test_fusion_model2_has_no_seg_head():
    with_head = meta_build("fusion", "fusion-paper")
    no_head = meta_build("fusion", {"seg_head": False})
    assert count_parameters(with_head) - count_parameters(no_head) == 10 * (105 * 9 * 9 + 9)
    torch.manual_seed(0)
    net = FusionNet(FusionConfig(channels=32, num_blocks=2, num_groups=8, seg_head=False)).eval()
    (zp, zf_, zf, ep, ef), _ = _fusion_inputs()
    with torch.no_grad():
        out = net(zp, zf_, zf, ep, ef, 5, None)
    assert out.seg_logits is None and out.seg_state is None
    assert out.w.shape == (2, 8, 6, 8)


# -- eq. 11 ----------------------------------------------------------------------------------

def test_radiation_weight_hand_example():
    w = torch.tensor([[[[0.9, 0.9], [0.2, 1.3]]]])  # (1,1,2,2)
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 2, 0, 0] = 5  # person at (0,0)
    seg[0, 1, 0, 1] = 5  # car at (0,1)
    seg[0, 2, 1, 1] = 5  # person at (1,1)
    seg[0, 2, 1, 0] = 5  # person at (1,0), w already below tau
    out = radiation_weight(w, seg, thermal_classes=(2,), tau=0.4)
    assert torch.allclose(out, torch.tensor([[[[0.4, 0.9], [0.2, 0.4]]]]))
    both = radiation_weight(w, seg, thermal_classes=(1, 2), tau=0.4)
    assert torch.allclose(both, torch.tensor([[[[0.4, 0.4], [0.2, 0.4]]]]))
    assert torch.equal(radiation_weight(w, seg, thermal_classes=(), tau=0.4), w)
    assert torch.equal(radiation_weight(w, None), w)
    w8 = torch.full((1, 8, 2, 2), 0.7)  # broadcast over the 8 latent channels
    assert torch.allclose(radiation_weight(w8, seg, (2,), 0.0)[0, :, 0, 0], torch.zeros(8))
    with pytest.raises(DataError, match="do not match"):
        radiation_weight(w, torch.zeros(1, 3, 4, 4))


# -- presets / factory -----------------------------------------------------------------------

def test_build_model_inputs_and_errors():
    cfg = PRESETS["ikr-tiny"][1]
    a = build_model("unet", "ikr-tiny")
    b = build_model("unet", model_config(a))
    c = build_model("unet", cfg)
    assert model_config(a) == model_config(b) == model_config(c)
    assert model_config(a)["channel_mult"] == [1, 2, 2]
    assert isinstance(build_model("unet", {"model_channels": 32, "num_groups": 8, "channel_mult": [1, 2]}),
                      ConditionalUNet)
    with pytest.raises(ConfigError, match="is a 'fusion' network"):
        build_model("unet", "fusion-tiny")
    with pytest.raises(ConfigError, match="unknown key"):
        build_model("unet", {"model_chanels": 32})
    with pytest.raises(ConfigError, match="unknown preset"):
        build_model("unet", "ikr-huge")
    with pytest.raises(ConfigError, match="unknown model kind"):
        build_model("vae", "ae")
    with pytest.raises(ConfigError, match="num_groups"):
        build_model("unet", UNetConfig(model_channels=20, num_groups=8))
    assert all(kind in ("ae", "unet", "fusion") for kind, _ in PRESETS.values())
