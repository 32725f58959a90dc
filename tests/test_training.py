"""Trainers: losses, exact resume, NaN guard, outputs, Algorithm 1 gradients, convergence."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import need_shared

from magicfuse.checkpoint import load_checkpoint, load_model, load_pipeline, save_model
from magicfuse.config import from_mapping
from magicfuse.data.boxes import Box
from magicfuse.data.classes import CLASS_ID, SEG_CLASS_WEIGHTS
from magicfuse.data.readers import PairSample
from magicfuse.data.shards import make_loader, write_shards
from magicfuse.data.synthetic import generate_scene
from magicfuse.diffusion.sampler import MagicFuseNets
from magicfuse.diffusion.schedule import make_alphas_cumprod, make_ddim_schedule
from magicfuse.diffusion.settings import SamplerSettings
from magicfuse.evaluation.dataset import load_eval_set
from magicfuse.evaluation.objects import mean_box_contrast
from magicfuse.evaluation.metrics import compute_metrics
from magicfuse.imageio import read_image
from magicfuse.inference import MagicFuse
from magicfuse.errors import CheckpointError, ConfigError, DataError, TrainingError
from magicfuse.models import build_model
from magicfuse.training import (
    AETrainConfig,
    LDMTrainConfig,
    MKFTrainConfig,
    evaluate_ldm_psnr,
    train_autoencoder,
    train_ldm,
    train_mkf,
)
from magicfuse.training import ldm as ldm_mod
from magicfuse.training.ae import load_ae_init
from magicfuse.training.ldm import ldm_loss, psnr
from magicfuse.training.loop import BatchStream, derive_seed, eval_panels, lr_at, seeded, step_generator
from magicfuse.training.losses import (
    fusion_losses,
    rgb_to_ycbcr,
    segmentation_loss,
    sobel_magnitude,
    ssim,
)
from magicfuse.training.mkf import evaluate_mkf, mkf_loss

H, W = 32, 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sample(split: str, i: int) -> PairSample:
    sc = generate_scene(0, (0 if split == "train" else 1000) + i, height=H, width=W)
    return PairSample(key=f"{split}{i:03d}", visible=sc.visible, infrared=sc.infrared, label=sc.label,
                      boxes=None, source="synthetic", split=split, paths={})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards((_sample("train", i) for i in range(8)), out, split="train", cfg={"samples_per_shard": 4})
    write_shards((_sample("test", i) for i in range(2)), out, split="test")
    return out


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    with seeded(0):
        save_model(path, build_model("ae", "ae"))
    return path


@pytest.fixture(scope="module")
def unet_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("unets")
    with seeded(1):
        save_model(d / "ikr.pt", build_model("unet", "ikr-tiny"))
    with seeded(2):
        save_model(d / "ckg.pt", build_model("unet", "ckg-tiny"))
    return d / "ikr.pt", d / "ckg.pt"


def ldm_cfg(**over) -> LDMTrainConfig:
    base = {"steps": 5, "batch_size": 3, "crop": 16, "log_every": 1, "ckpt_every": 2, "device": "cpu",
            "progress": False, "eval_samples": 0, "ema_decay": 0.9, "seed": 3}
    base.update(over)
    return from_mapping(LDMTrainConfig, base)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- losses


def test_ycbcr_known_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    y, cb, cr = rgb_to_ycbcr(rgb)
    assert torch.allclose(y.flatten(), torch.tensor([1.0, 0.299, 0.0]))
    assert torch.allclose(cb.flatten(), torch.tensor([0.5, 0.5 - 0.299 * 0.564, 0.5]))
    assert torch.allclose(cr.flatten(), torch.tensor([0.5, 0.5 + 0.701 * 0.713, 0.5]))


def test_sobel_magnitude_edge_and_flat():
    flat = torch.full((1, 1, 6, 6), 0.3)
    assert torch.equal(sobel_magnitude(flat), torch.zeros_like(flat))
    step = torch.zeros(1, 1, 6, 6)
    step[..., 3:] = 1.0  # vertical edge between columns 2 and 3
    g = sobel_magnitude(step)
    assert torch.allclose(g[0, 0, 2:4, 2], torch.tensor([4.0, 4.0]))  # |gx| = 1+2+1
    assert torch.equal(g[0, 0, :, 0], torch.zeros(6))


def test_ssim_identity_and_drop():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, 1 - x)) < 0.0


def test_fusion_losses_zero_when_targets_met_and_weighted():
    gen = torch.Generator().manual_seed(0)
    ikr = torch.rand(1, 3, 16, 16, generator=gen)
    ckg = torch.zeros(1, 1, 16, 16)  # darker and flatter than IKR: max() picks IKR everywhere
    total, terms = fusion_losses(ikr, ikr, ckg)
    assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())
    mag = ikr.clone()
    mag[:, 0] += 0.1  # shift red: contrast, texture-free, colour terms react
    total, terms = fusion_losses(mag, ikr, ckg)
    expect = 6 * terms["contrast"] + 10 * terms["texture"] + 5 * terms["cb"] + 5 * terms["cr"]
    assert float(total) == pytest.approx(float(expect), rel=1e-6)
    assert float(terms["cr"]) > 0 and float(terms["contrast"]) > 0


def test_segmentation_loss_weights_and_ignore():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 8, 8, generator=gen)
    label = torch.randint(0, 9, (2, 8, 8), generator=gen)
    label[0, :2] = 255
    ref = F.cross_entropy(logits, label, weight=torch.tensor(SEG_CLASS_WEIGHTS), ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, label), ref)
    none = segmentation_loss(logits.requires_grad_(), torch.full((2, 8, 8), 255))
    assert float(none.detach()) == 0.0 and none.requires_grad  # no NaN from an all-ignore label


def test_mkf_seg_class_weights_reach_the_loss():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 9, 8, 8, generator=gen)
    label = torch.randint(0, 9, (1, 8, 8), generator=gen)
    img = torch.rand(1, 3, 32, 32, generator=gen)
    weights = (0.1, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    cfg = from_mapping(MKFTrainConfig, {"seg_class_weights": list(weights)})
    _, terms = fusion_losses(img, img, img[:, :1], seg_logits=logits, label=label, weights=cfg.loss_weights)
    ref = F.cross_entropy(logits, label, weight=torch.tensor(weights))
    assert float(terms["seg"]) == pytest.approx(float(ref), rel=1e-6)
    _, default = fusion_losses(img, img, img[:, :1], seg_logits=logits, label=label,
                               weights=from_mapping(MKFTrainConfig, {}).loss_weights)
    assert float(default["seg"]) == pytest.approx(float(segmentation_loss(logits, label)), rel=1e-6)
    assert float(default["seg"]) != pytest.approx(float(ref), rel=1e-3)  # the premise: the weights matter here
    with pytest.raises(ConfigError, match="seg_class_weights"):
        from_mapping(MKFTrainConfig, {"seg_class_weights": [1.0, -1.0]})


# --------------------------------------------------------------------------- configs, helpers


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(LDMTrainConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="LDMTrainConfig.timesteps must be one of .*'cubic'"):
        from_mapping(LDMTrainConfig, {"timesteps": "cubic"})
    with pytest.raises(ConfigError, match="lr"):
        from_mapping(AETrainConfig, {"lr": -1.0})
    with pytest.raises(ConfigError, match="batch_size"):
        from_mapping(MKFTrainConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match=r"MKFTrainConfig.init_noise_scale must be a number in \[0, 1\]"):
        from_mapping(MKFTrainConfig, {"init_noise_scale": 2.0})
    with pytest.raises(ConfigError, match=r"LDMTrainConfig.eval_init_noise_scale must be a number in \[0, 1\]"):
        from_mapping(LDMTrainConfig, {"eval_init_noise_scale": -0.5})
    cfg = from_mapping(MKFTrainConfig, {})
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (cfg.w_contrast, cfg.w_texture, cfg.w_cb, cfg.w_cr) == (6.0, 10.0, 5.0, 5.0)


def test_lr_schedule_step_decay_and_warmup():
    cfg = from_mapping(MKFTrainConfig, {"lr_decay_every": 10, "warmup_steps": 2})
    assert lr_at(cfg, 0) == pytest.approx(5e-4)
    assert lr_at(cfg, 5) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(5e-4)
    assert lr_at(cfg, 25) == pytest.approx(2.5e-4)


def test_step_generator_is_a_function_of_seed_step_rank():
    dev = torch.device("cpu")
    a = torch.rand(4, generator=step_generator(0, 5, 0, dev))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 0, dev)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 6, 0, dev)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 1, dev)))


def test_batch_stream_resumes_mid_epoch(shards):
    def loader(epoch):
        return make_loader(shards, "train", batch_size=3, crop=(16, 16), seed=0, epoch=epoch)

    straight = BatchStream(loader)
    keys = [next(straight)["key"] for _ in range(7)]  # 3 batches (3,3,2) per epoch
    part = BatchStream(loader)
    for _ in range(4):
        next(part)
    resumed = BatchStream(loader, part.epoch, part.index)
    assert [next(resumed)["key"] for _ in range(3)] == keys[4:]
    assert keys[0] != keys[3]  # epochs are shuffled differently


# --------------------------------------------------------------------------- trainers


def test_ldm_resume_is_bit_identical(shards, ae_ckpt, tmp_path):
    straight = train_ldm(ldm_cfg(), branch="ikr", ae_checkpoint=ae_ckpt, shards_dir=shards,
                         out_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_3(metrics, step):  # after step 3: step 3 is lost, the run resumes from step 2
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_ldm(ldm_cfg(), branch="ikr", ae_checkpoint=ae_ckpt, shards_dir=shards,
                  out_dir=tmp_path / "b", logger=kill_at_3)
    mid = load_checkpoint(tmp_path / "b" / "last.pt", kind="train-state")
    assert mid["progress"]["step"] == 2 and not (tmp_path / "b" / "ikr.pt").exists()
    resumed = train_ldm(ldm_cfg(), branch="ikr", ae_checkpoint=ae_ckpt, shards_dir=shards,
                        out_dir=tmp_path / "b")

    a = load_checkpoint(tmp_path / "a" / "last.pt", kind="train-state")
    b = load_checkpoint(tmp_path / "b" / "last.pt", kind="train-state")
    assert state_equal(a["state_dict"], b["state_dict"])
    assert state_equal(a["ema"]["state_dict"], b["ema"]["state_dict"])
    fa, _ = load_model(straight.checkpoint, kind="unet")
    fb, _ = load_model(resumed.checkpoint, kind="unet")
    assert state_equal(fa.state_dict(), fb.state_dict())
    assert not state_equal(fa.state_dict(), mid["state_dict"])  # training did move the weights
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert b["progress"]["epoch"] == 1  # 8 samples in batches of 3: the run crossed an epoch


def test_resume_refuses_changed_config(shards, ae_ckpt, tmp_path):
    train_ldm(ldm_cfg(steps=2, ckpt_every=1), branch="ikr", ae_checkpoint=ae_ckpt, shards_dir=shards,
              out_dir=tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        train_ldm(ldm_cfg(steps=3, lr=2e-4), branch="ikr", ae_checkpoint=ae_ckpt, shards_dir=shards,
                  out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="stage"):
        train_ldm(ldm_cfg(steps=3), branch="ckg", ae_checkpoint=ae_ckpt, shards_dir=shards, out_dir=tmp_path)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(shards, ae_ckpt, tmp_path, monkeypatch):
    real = ldm_mod.ldm_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(ldm_mod, "ldm_loss", poisoned)
    with pytest.raises(TrainingError, match="step 3"):
        train_ldm(ldm_cfg(ckpt_every=1), branch="ckg", ae_checkpoint=ae_ckpt, shards_dir=shards,
                  out_dir=tmp_path)
    kept = load_checkpoint(tmp_path / "last.pt", kind="train-state")
    assert kept["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "ckg.pt").exists()


def test_huge_learning_rate_is_caught(shards, ae_ckpt, tmp_path):
    with pytest.raises(TrainingError, match="not finite|loss is"):
        train_ldm(ldm_cfg(lr=1e30, grad_clip=0.0, ckpt_every=100, steps=6), branch="ikr",
                  ae_checkpoint=ae_ckpt, shards_dir=shards, out_dir=tmp_path)
    assert not (tmp_path / "ikr.pt").exists()


def test_eval_panels_give_each_metric_its_own_scale():
    """loss.png: one panel per evaluation metric, its baselines beside it, no panel for the count."""
    keys = ["loss", "eval/psnr", "eval/psnr_baseline", "eval/eval_samples", "eval/person_contrast",
            "eval/x0_mse", "eval/x0_mse_other_cond", "eval/x0_power", "eval/SSIM"]
    assert eval_panels(keys) == [["eval/SSIM"], ["eval/person_contrast"], ["eval/psnr", "eval/psnr_baseline"],
                                 ["eval/x0_mse", "eval/x0_mse_other_cond"], ["eval/x0_power"]]
    assert eval_panels(["loss", "eval/eval_samples"]) == []


def test_autoencoder_outputs_and_logger(shards, tmp_path):
    seen = []
    cfg = from_mapping(AETrainConfig, {"steps": 3, "batch_size": 2, "crop": 16, "log_every": 2, "ckpt_every": 10,
                                       "device": "cpu", "progress": False, "sample_every": 3})
    art = []
    res = train_autoencoder(cfg, shards, tmp_path, logger=lambda m, s: seen.append((s, m)), artifacts=art.append)
    assert res.checkpoint == tmp_path / "ae.pt"
    model, payload = load_model(res.checkpoint, kind="ae")
    assert payload["train_config"]["steps"] == 3
    assert [s for s, _ in seen] == [2, 3] and {"loss", "l1", "ssim", "lr"} <= set(seen[0][1])
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 3] and hist == res.history
    metrics = json.loads((tmp_path / "metrics.json").read_text())["ae"]
    assert metrics["steps"] == 3 and math.isfinite(metrics["loss"]) and metrics["images_per_s"] > 0
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    assert [float(r["step"]) for r in rows] == [2, 3] and "loss" in rows[0]
    assert (tmp_path / "samples" / "step_0000003.png").exists() and (tmp_path / "loss.png").exists()
    assert tmp_path / "samples" / "step_0000003.png" in art
    # a finished run rerun is a no-op that re-exports the same weights
    again = train_autoencoder(cfg, shards, tmp_path)
    m2, _ = load_model(again.checkpoint, kind="ae")
    assert state_equal(model.state_dict(), m2.state_dict())


def test_autoencoder_latent_standardisation(shards, tmp_path):
    """latent_stats_images > 0: the exported AE encodes its training images to latents whose
    channels have mean 0 and whose spread is 1 overall, and reconstructs exactly what the raw
    AE reconstructs."""
    base = {"steps": 2, "batch_size": 2, "crop": 16, "log_every": 1, "ckpt_every": 10, "device": "cpu",
            "progress": False}
    raw = train_autoencoder(from_mapping(AETrainConfig, base), shards, tmp_path / "raw")
    std = train_autoencoder(from_mapping(AETrainConfig, {**base, "latent_stats_images": 8}), shards, tmp_path / "std")
    ae_raw, _ = load_model(raw.checkpoint, kind="ae")
    ae_std, _ = load_model(std.checkpoint, kind="ae")
    assert (ae_raw.config.latent_shift, ae_raw.config.latent_scale) == (0.0, 1.0)
    assert ae_std.config.latent_scale != 1.0 and state_equal(ae_raw.state_dict(), ae_std.state_dict())
    x = next(iter(make_loader(shards, "train", batch_size=8, crop=None, shuffle=False, members=("clean",))))["clean"]
    with torch.no_grad():
        z_raw, z = ae_raw.encode(x, noise_scale=0.0), ae_std.encode(x, noise_scale=0.0)
        shift = torch.tensor(ae_std.config.latent_shift).view(1, -1, 1, 1)
        assert shift.shape[1] == ae_std.config.latent_channels
        torch.testing.assert_close(z, (z_raw - shift) / ae_std.config.latent_scale)
        torch.testing.assert_close(ae_std.decode(z), ae_raw.decode(z_raw), atol=1e-5, rtol=1e-5)
    # the statistics are the raw channel means and the RMS spread around them, over the first
    # 8 train frames, visible and infrared (replicated to 3 channels), encoded without noise
    with torch.no_grad():
        frames = make_loader(shards, "train", batch_size=1, crop=None, shuffle=False, members=("clean", "infrared"))
        zs = [ae_raw.encode(b[m].expand(-1, 3, -1, -1), noise_scale=0.0).double()
              for _, b in zip(range(8), frames) for m in ("clean", "infrared")]
    flat = torch.cat([q.permute(1, 0, 2, 3).reshape(q.shape[1], -1) for q in zs], dim=1)
    mean = flat.mean(dim=1)
    assert float(mean.std()) > 1e-3  # premise: the raw channels' means differ
    torch.testing.assert_close(torch.tensor(ae_std.config.latent_shift, dtype=torch.float64), mean, atol=1e-6, rtol=1e-5)
    assert ae_std.config.latent_scale == pytest.approx(float((flat - mean[:, None]).pow(2).mean().sqrt()), rel=1e-5)
    # the statistics cover visible and infrared; the visible part alone is near, not at, 0/1
    centred = z - z.mean(dim=(0, 2, 3), keepdim=True)
    assert 0.3 < float(centred.pow(2).mean().sqrt()) < 3.0


@pytest.mark.needs_shared
def test_official_ae_init_beats_random(shards, tmp_path):
    official = need_shared("weights", "official_ae.pth")
    x = read_image(need_shared("data", "msrs", "test", "vi", "00012N.png"), mode="rgb")[:128, :128]
    x = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0
    errors = {}
    for name in ("random", "official"):
        with seeded(0):
            ae = build_model("ae", "ae").eval()
        if name == "official":
            load_ae_init(ae, official)
        with torch.no_grad():
            errors[name] = float((ae(x, None, torch.Generator().manual_seed(0)) - x).abs().mean())
    assert errors["official"] < 0.5 * errors["random"]
    bad = tmp_path / "bad.pth"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_ae_init(build_model("ae", "ae"), bad)


def test_ldm_loss_decreases_on_a_fixed_batch(shards, ae_ckpt):
    ae, _ = load_model(ae_ckpt, kind="ae")
    ae.requires_grad_(False)
    with seeded(0):
        unet = build_model("unet", "ikr-tiny")
    images = next(iter(make_loader(shards, "train", batch_size=2, crop=(16, 16), seed=0, shuffle=False)))
    with torch.no_grad():
        batch = {"cond": ae.encode(images["degraded"], noise_scale=0.0),
                 "z0": ae.encode(images["clean"], noise_scale=0.0)}
    abar = make_alphas_cumprod()

    def fixed_loss() -> float:
        with torch.no_grad():
            return sum(float(ldm_loss(unet, batch, torch.Generator().manual_seed(100 + k),
                                      alphas_cumprod=abar)[0]) for k in range(4)) / 4

    before = fixed_loss()
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for step in range(80):
        loss, _ = ldm_loss(unet, batch, torch.Generator().manual_seed(step), alphas_cumprod=abar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_evaluate_ldm_psnr_reports_baseline(shards, ae_ckpt, unet_ckpts):
    ae, _ = load_model(ae_ckpt, kind="ae")
    ckg, _ = load_model(unet_ckpts[1], kind="unet")
    res = evaluate_ldm_psnr(ae, ckg, "ckg", shards, split="test", samples=2, steps=3)
    loader = make_loader(shards, "test", batch_size=1, crop=None, shuffle=False, members=("degraded", "infrared"))
    base = [float(psnr(b["degraded"].mean(1, keepdim=True), b["infrared"])) for b in loader]
    assert res["psnr_baseline"] == pytest.approx(sum(base) / 2, rel=1e-5)
    assert math.isfinite(res["psnr"]) and res["eval_samples"] == 2
    again = evaluate_ldm_psnr(ae, ckg, "ckg", shards, split="test", samples=2, steps=3)
    assert again == res  # deterministic sampling
    assert {"x0_mse", "x0_mse_other_cond", "x0_power"} <= set(res)


def test_evaluate_ldm_psnr_scores_ckg_box_contrast(ae_ckpt, unet_ckpts, tmp_path):
    from magicfuse.data.boxes import Box
    from magicfuse.evaluation.objects import mean_box_contrast

    def with_boxes(i: int) -> PairSample:
        s = _sample("test", i)
        return dataclasses.replace(s, boxes=[Box(2, 10, 8, 22, 40, "person"), Box(1, 30, 30, 60, 50, "car")])

    out = tmp_path / "boxed"
    write_shards((with_boxes(i) for i in range(2)), out, split="test")
    ae, _ = load_model(ae_ckpt, kind="ae")
    ckg, _ = load_model(unet_ckpts[1], kind="unet")
    res = evaluate_ldm_psnr(ae, ckg, "ckg", out, split="test", samples=2, steps=3, seed=5)
    # the same images by hand: the sampler's stream with the evaluation's per-image seeds
    greys = []
    for n, b in enumerate(make_loader(out, "test", batch_size=1, crop=None, shuffle=False, members=("degraded",))):
        gen = torch.Generator().manual_seed(derive_seed(5, n, 0xE7A1))
        img = ldm_mod.sample_branch(ae, ckg, b["degraded"], steps=3, generator=gen,
                                    schedule=make_ddim_schedule(3)).mean(1)[0]
        greys.append(img.clamp(0, 1).mul(255).round().to(torch.uint8).numpy())
    boxes = [[{"cls": 2, "x0": 10, "y0": 8, "x1": 22, "y1": 40}, {"cls": 1, "x0": 30, "y0": 30, "x1": 60, "y1": 50}]] * 2
    assert res["person_contrast"] == pytest.approx(mean_box_contrast(greys, boxes, 2)[0], abs=1e-9)
    assert res["car_contrast"] == pytest.approx(mean_box_contrast(greys, boxes, 1)[0], abs=1e-9)
    assert res["person_contrast"] != res["car_contrast"]
    ikr, _ = load_model(unet_ckpts[0], kind="unet")  # IKR and box-less splits have no contrast
    assert "person_contrast" not in evaluate_ldm_psnr(ae, ikr, "ikr", out, split="test", samples=1, steps=2)


def test_eval_every_scores_during_training_without_changing_it(shards, ae_ckpt, tmp_path):
    plain = train_ldm(ldm_cfg(eval_samples=1, eval_steps=2), branch="ckg", ae_checkpoint=ae_ckpt,
                      shards_dir=shards, out_dir=tmp_path / "plain")
    logged: list[tuple[int, dict]] = []
    scored = train_ldm(ldm_cfg(eval_samples=1, eval_steps=2, eval_every=2), branch="ckg", ae_checkpoint=ae_ckpt,
                       shards_dir=shards, out_dir=tmp_path / "scored", logger=lambda m, s: logged.append((s, m)))
    a, _ = load_model(plain.checkpoint, kind="unet")
    b, _ = load_model(scored.checkpoint, kind="unet")
    assert state_equal(a.state_dict(), b.state_dict())  # scoring does not touch the training randomness
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in scored.history]
    evals = [(h["step"], h["eval/psnr"]) for h in scored.history if "eval/psnr" in h]
    assert [s for s, _ in evals] == [2, 4, 5]  # every 2 steps, and the final model
    assert evals[-1][1] == pytest.approx(scored.final_metrics["psnr"])
    assert [s for s, m in logged if "eval/psnr" in m] == [2, 4, 5]
    assert all("eval/psnr" not in h for h in plain.history)
    rows = list(csv.DictReader(open(tmp_path / "scored" / "loss.csv")))
    assert [r["step"] for r in rows if r["eval/psnr"]] == ["2", "4", "5"]
    with pytest.raises(ConfigError, match="eval_every"):
        ldm_cfg(eval_every=-1)


def test_mkf_gradients_reach_only_fusion(shards, ae_ckpt, unet_ckpts):
    ae, _ = load_model(ae_ckpt, kind="ae")
    ikr, _ = load_model(unet_ckpts[0], kind="unet")
    ckg, _ = load_model(unet_ckpts[1], kind="unet")
    for m in (ae, ikr, ckg):
        m.requires_grad_(False)
    frozen_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
                     (("ae", ae), ("ikr", ikr), ("ckg", ckg))}
    with seeded(0):
        fusion = build_model("fusion", "fusion-tiny")
    cfg = from_mapping(MKFTrainConfig, {"sampler_steps": 4, "crop": 16})
    batch = next(iter(make_loader(shards, "train", batch_size=1, crop=(16, 16), members=("degraded", "label"))))
    loss, terms = mkf_loss(fusion, MagicFuseNets(ae=ae, ikr=ikr, ckg=ckg), batch,
                           torch.Generator().manual_seed(0), cfg, make_ddim_schedule(4))
    assert {"contrast", "texture", "cb", "cr", "seg"} <= set(terms)
    loss.backward()
    assert all(p.grad is None for m in (ae, ikr, ckg) for p in m.parameters())
    grads = [p.grad for p in fusion.parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.5 * len(grads)


def test_train_mkf_updates_fusion_and_bundles_pipeline(shards, ae_ckpt, unet_ckpts, tmp_path):
    cfg = from_mapping(MKFTrainConfig, {"steps": 2, "sampler_steps": 4, "crop": 16, "device": "cpu",
                                        "progress": False, "log_every": 1, "thermal_classes": [2],
                                        "init_noise_scale": 0.5})
    res = train_mkf(cfg, ae_checkpoint=ae_ckpt, ikr_checkpoint=unet_ckpts[0], ckg_checkpoint=unet_ckpts[1],
                    shards_dir=shards, out_dir=tmp_path)
    assert res.checkpoint == tmp_path / "pipeline.pt" and res.files["fusion"] == tmp_path / "fusion.pt"
    nets, payload = load_pipeline(res.checkpoint)
    assert payload["sampler"] == {"steps": 4, "tau": 0.4, "thermal_classes": [2], "variant": "full",
                                  "schedule": {"num_train_steps": 1000, "beta_start": 0.00085, "beta_end": 0.012},
                                  "init_noise_scale": 0.5}
    # the pipeline samples with it; run_batch's override reaches the sampler
    runner = MagicFuse.from_pretrained(res.checkpoint, device="cpu")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    own = runner.run_batch(x, [5], outputs=("ikr",))[0].ikr
    paper = runner.run_batch(x, [5], outputs=("ikr",), init_noise_scale=1.0)[0].ikr
    as_paper = MagicFuse(nets, runner.settings.replace(init_noise_scale=1.0), device="cpu")
    assert np.array_equal(as_paper.run_batch(x, [5], outputs=("ikr",))[0].ikr, paper)
    assert not np.array_equal(own, paper)
    for name, path in (("ae", ae_ckpt), ("ikr", unet_ckpts[0]), ("ckg", unet_ckpts[1])):
        original, _ = load_model(path)
        assert state_equal(nets[name].state_dict(), original.state_dict()), name
    with seeded(cfg.seed):
        init = build_model("fusion", "fusion-tiny")
    trained, _ = load_model(res.files["fusion"], kind="fusion")
    assert state_equal(trained.state_dict(), nets["fusion"].state_dict())
    assert not state_equal(trained.state_dict(), init.state_dict())
    assert {"contrast", "texture", "cb", "cr", "seg", "trunc_step"} <= set(res.history[0])


def test_train_mkf_scores_head_and_magimg_against_steps(shards, ae_ckpt, unet_ckpts, tmp_path):
    """eval_every/eval_samples: the head's IoU on the labels and the MagImg's box contrast are
    recorded at the evaluation steps and after training, from the exported pipeline's settings."""
    boxed = tmp_path / "boxed"
    samples = [_sample("test", i) for i in range(2)]
    # one person box over the scene's left half, one car box over its lower right corner
    boxes = [Box(cls=CLASS_ID["person"], x0=2, y0=2, x1=20, y1=30), Box(cls=CLASS_ID["car"], x0=30, y0=20, x1=46, y1=30)]
    write_shards((dataclasses.replace(s, boxes=boxes) for s in samples), boxed, split="test")
    write_shards((_sample("train", i) for i in range(4)), boxed, split="train")
    cfg = from_mapping(MKFTrainConfig, {"steps": 2, "sampler_steps": 3, "crop": 16, "device": "cpu",
                                        "progress": False, "log_every": 1, "eval_every": 1, "eval_samples": 2,
                                        "thermal_classes": [1, 2]})
    res = train_mkf(cfg, ae_checkpoint=ae_ckpt, ikr_checkpoint=unet_ckpts[0], ckg_checkpoint=unet_ckpts[1],
                    shards_dir=boxed, out_dir=tmp_path / "run")
    evals = [h for h in res.history if "eval/miou" in h]
    assert [h["step"] for h in evals] == [1, 2]
    final = {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")}
    assert {"miou", "eval_samples", "person_contrast", "car_contrast", "SSIM", "MI", "Qabf", "PSNR"} <= set(final)
    assert final["eval_samples"] == 2

    # the same numbers from the exported pipeline, and by hand from `MagicFuse.fuse`'s outputs
    modules, payload = load_pipeline(res.checkpoint)
    nets = MagicFuseNets(**modules)
    settings = SamplerSettings.from_mapping(payload["sampler"])
    again = evaluate_mkf(nets, boxed, settings=settings, samples=2, seed=cfg.seed)
    assert again == final
    data = load_eval_set(boxed, "test")
    fused = MagicFuse.from_pretrained(res.checkpoint, device="cpu").fuse(
        list(data.degraded), seeds=[derive_seed(cfg.seed, n, 0x5E6) for n in range(2)], batch_size=1)
    segs, greys = [r.seg for r in fused], [r.magimg for r in fused]
    for name in ("car", "person"):
        c = CLASS_ID[name]
        pred = np.stack(segs) == c
        true = np.stack(data.label) == c
        union = int((pred | true).sum())
        assert (name + "_iou" in final) == (union > 0)
        if union:
            assert final[name + "_iou"] == pytest.approx(int((pred & true).sum()) / union, abs=1e-9)
        contrast, count = mean_box_contrast(greys, [boxes, boxes], c)
        assert count == 2 and final[name + "_contrast"] == pytest.approx(contrast, abs=1e-12)
    # the MagImg's fusion metrics against (A = infrared, B = the CLEAN visible), averaged per image
    per_image = [compute_metrics(g, ir, clean, metrics=["SSIM", "MI", "Qabf", "PSNR"])
                 for g, ir, clean in zip(greys, data.infrared, data.clean)]
    against_degraded = [compute_metrics(g, ir, deg, metrics=["SSIM"])["SSIM"]
                        for g, ir, deg in zip(greys, data.infrared, data.degraded)]
    for m in ("SSIM", "MI", "Qabf", "PSNR"):
        assert final[m] == pytest.approx(np.mean([r[m] for r in per_image]), abs=1e-9), m
    assert abs(final["SSIM"] - np.mean(against_degraded)) > 1e-6  # premise: B is the clean frame, not the input

    # scoring leaves training untouched: the same run without evaluations ends at the same weights
    plain = train_mkf(dataclasses.replace(cfg, eval_every=0, eval_samples=0), ae_checkpoint=ae_ckpt,
                      ikr_checkpoint=unet_ckpts[0], ckg_checkpoint=unet_ckpts[1], shards_dir=boxed,
                      out_dir=tmp_path / "plain")
    assert state_equal(load_model(plain.files["fusion"])[0].state_dict(), modules["fusion"].state_dict())
    assert not [h for h in plain.history if "eval/miou" in h]

    with pytest.raises(ConfigError, match="eval_samples"):
        from_mapping(MKFTrainConfig, {"eval_samples": -1})
    with pytest.raises(DataError, match=r"split 'val' has no samples to evaluate the fusion network"):
        evaluate_mkf(nets, boxed, settings=settings, split="val")


def test_train_mkf_carries_the_denoisers_schedule_and_refuses_a_mismatch(shards, ae_ckpt, tmp_path):
    """The pipeline samples with the schedule IKR and CKG were trained on (their train_config),
    and MKF training refuses two denoisers trained on different schedules."""
    d = tmp_path / "unets"
    other = {"num_train_steps": 500, "beta_start": 0.001, "beta_end": 0.02}
    with seeded(1):
        save_model(d / "ikr.pt", build_model("unet", "ikr-tiny"), train_config=other)
    with seeded(2):
        save_model(d / "ckg.pt", build_model("unet", "ckg-tiny"), train_config=other)
        save_model(d / "ckg_default.pt", build_model("unet", "ckg-tiny"), train_config={"num_train_steps": 1000})
    cfg = from_mapping(MKFTrainConfig, {"steps": 1, "sampler_steps": 4, "crop": 16, "device": "cpu",
                                        "progress": False, "log_every": 1})
    res = train_mkf(cfg, ae_checkpoint=ae_ckpt, ikr_checkpoint=d / "ikr.pt", ckg_checkpoint=d / "ckg.pt",
                    shards_dir=shards, out_dir=tmp_path / "ok")
    _, payload = load_pipeline(res.checkpoint)
    assert payload["sampler"]["schedule"] == other
    # what the pipeline runs is that schedule: 4 leading-spaced steps over 500 training steps
    runner = MagicFuse.from_pretrained(res.checkpoint, device="cpu")
    assert runner.settings.ddim().pairs == ((375, 250), (250, 125), (125, 0), (0, -1))
    with pytest.raises(ConfigError, match=r"different noise schedules.*500 steps.*1000 steps"):
        train_mkf(cfg, ae_checkpoint=ae_ckpt, ikr_checkpoint=d / "ikr.pt", ckg_checkpoint=d / "ckg_default.pt",
                  shards_dir=shards, out_dir=tmp_path / "bad")


@pytest.mark.slow
@pytest.mark.needs_shared
def test_trained_ckg_beats_grey_copy_of_input(tmp_path):
    """The pipeline's check: CKG's infrared is closer to the true infrared than a grey degraded input.

    About 3-5 minutes on two CPU cores (official AE, tiny CKG, 600 steps on 64x64 synthetic scenes).
    """
    official = need_shared("weights", "official_ae.pth")
    shards = tmp_path / "shards"

    def samples(split, n, offset):
        for i in range(n):
            sc = generate_scene(0, offset + i, height=64, width=64)
            yield PairSample(key=f"{split}{i:03d}", visible=sc.visible, infrared=sc.infrared, label=sc.label,
                             boxes=None, source="synthetic", split=split, paths={})

    write_shards(samples("train", 32, 0), shards, split="train", cfg={"samples_per_shard": 16})
    write_shards(samples("test", 4, 1000), shards, split="test")
    cfg = from_mapping(LDMTrainConfig, {"steps": 600, "batch_size": 8, "crop": 32, "lr": 1e-3, "log_every": 50,
                                        "ckpt_every": 1000, "device": "cpu", "progress": False,
                                        "eval_samples": 4, "eval_steps": 10, "ema_decay": 0.99})
    res = train_ldm(cfg, branch="ckg", ae_checkpoint=official, shards_dir=shards, out_dir=tmp_path / "run")
    assert res.history[-1]["loss"] < 0.3 * res.history[0]["loss"]
    assert res.final_metrics["psnr"] > res.final_metrics["psnr_baseline"], res.final_metrics


# --------------------------------------------------------------------------- latent pairs


def _pairs(sizes):
    from magicfuse.training.latents import LatentPairs

    cond = [torch.arange(8 * h * w, dtype=torch.float32).reshape(8, h, w) + 1000 * i for i, (h, w) in enumerate(sizes)]
    return LatentPairs([f"k{i}" for i in range(len(sizes))], cond, [c + 0.5 for c in cond])


def test_latent_loader_cuts_the_same_window_of_condition_and_target():
    from magicfuse.training.latents import latent_loader

    pairs = _pairs([(6, 8)] * 5)
    loader = latent_loader(pairs, batch_size=2, crop=16, seed=0)
    batches = list(loader(0))
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    assert sorted(k for b in batches for k in b["key"]) == pairs.keys
    for b in batches:
        assert b["cond"].shape[-2:] == (4, 4)  # 16 pixels = 4 latent cells
        torch.testing.assert_close(b["z0"] - b["cond"], torch.full_like(b["cond"], 0.5))
        for key, c in zip(b["key"], b["cond"]):
            full = pairs.cond[pairs.keys.index(key)]
            top, left = divmod(int(c[0, 0, 0] - full[0, 0, 0]), full.shape[-1])
            torch.testing.assert_close(c, full[:, top:top + 4, left:left + 4])
    again = list(latent_loader(pairs, batch_size=2, crop=16, seed=0)(0))
    assert all(torch.equal(a["cond"], b["cond"]) for a, b in zip(batches, again))
    other = list(loader(1))
    assert not all(torch.equal(a["cond"], b["cond"]) for a, b in zip(batches, other) if a["cond"].shape == b["cond"].shape)
    whole = next(iter(latent_loader(pairs, batch_size=5, crop=None, seed=0)(0)))
    assert whole["cond"].shape == (5, 8, 6, 8)


@pytest.mark.parametrize("sizes, crop, match", [
    ([(6, 8)], 18, "multiple of 4"),
    ([(6, 8), (3, 8)], 16, "larger than 1 frame"),
    ([(6, 8), (4, 8)], None, "several sizes"),
])
def test_latent_loader_errors(sizes, crop, match):
    from magicfuse.errors import DataError
    from magicfuse.training.latents import latent_loader

    with pytest.raises(DataError, match=match):
        latent_loader(_pairs(sizes), batch_size=2, crop=crop, seed=0)


def test_cached_pairs_are_a_function_of_the_autoencoder_and_data(shards, ae_ckpt, tmp_path):
    from magicfuse.data.shards import manifest_hash
    from magicfuse.training.latents import cached_pairs

    ae, _ = load_model(ae_ckpt, kind="ae")
    kw = {"seed": 0, "manifest": manifest_hash(shards), "cache_dir": tmp_path, "progress": False}
    first = cached_pairs(ae, ae_ckpt, shards, "train", "ckg", **kw)
    files = list(tmp_path.glob("latents-*.pt"))
    assert len(files) == 1 and len(first) == 8 and first.cond[0].shape == (8, H // 4, W // 4)
    again = cached_pairs(ae, ae_ckpt, shards, "train", "ckg", **kw)  # from the cache
    assert again.keys == first.keys and all(torch.equal(a, b) for a, b in zip(again.target, first.target))
    ikr = cached_pairs(ae, ae_ckpt, shards, "train", "ikr", **kw)
    assert len(list(tmp_path.glob("latents-*.pt"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(ikr.cond, first.cond))  # same degraded frames, same noise
    assert not torch.equal(ikr.target[0], first.target[0])  # clean visible vs infrared
    files[0].write_bytes(b"damaged")
    rebuilt = cached_pairs(ae, ae_ckpt, shards, "train", "ckg", **kw)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.target, first.target))


class _CopyCondDenoiser(torch.nn.Module):
    """An ε-predicting stand-in whose ẑ0 is exactly its condition latent (a perfect identity
    restorer), or, with `ignore_cond`, exactly zero whatever the condition."""

    def __init__(self, ignore_cond: bool = False) -> None:
        super().__init__()
        self.ignore_cond = ignore_cond
        self.register_buffer("abar", make_alphas_cumprod())

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        x0 = torch.zeros_like(cond) if self.ignore_cond else cond
        return (z_t - a.sqrt() * x0) / (1 - a).sqrt()


def test_condition_use_separates_a_denoiser_that_reads_its_input_from_one_that_does_not(ae_ckpt):
    ae, _ = load_model(ae_ckpt, kind="ae")
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 3, 32, 48, generator=g) for _ in range(3)]
    frames.append(torch.rand(1, 3, 40, 64, generator=g))  # another size: scored on the common window
    schedule = make_ddim_schedule(25)

    def use(net: torch.nn.Module, seed: int = 1) -> dict[str, float]:
        return ldm_mod.condition_use(ae, net, frames, frames, schedule=schedule,
                                     generator=torch.Generator().manual_seed(seed), init_noise_scale=0.5)

    with torch.no_grad():
        z = [ae.encode(f[..., :32, :48], noise_scale=0.0) for f in frames]
    power = sum(float(x.pow(2).mean()) for x in z) / 4
    other = sum(float((z[(n + 1) % 4] - z[n]).pow(2).mean()) for n in range(4)) / 4
    copy = use(_CopyCondDenoiser())
    assert copy["x0_mse"] < 1e-6  # ẑ0 = own condition = the target
    assert copy["x0_mse_other_cond"] == pytest.approx(other, rel=1e-3) and other > 0.01
    assert copy["x0_power"] == pytest.approx(power, rel=1e-4)
    blind = use(_CopyCondDenoiser(ignore_cond=True))
    assert blind["x0_mse"] == pytest.approx(blind["x0_mse_other_cond"], rel=1e-5)
    assert blind["x0_mse"] == pytest.approx(power, rel=1e-3)
    assert use(_CopyCondDenoiser(), seed=1) == copy  # the generator decides z_T
    with pytest.raises(ConfigError, match="needs >= 2 frames"):
        ldm_mod.condition_use(ae, _CopyCondDenoiser(), frames[:1], frames[:1], schedule=schedule,
                              generator=torch.Generator())
