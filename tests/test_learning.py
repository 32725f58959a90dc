"""Learning checks: every trainable part, trained through the project's own trainers on a
handful of fixed REAL crops, reaches a stated quality (docs/QUALITY.md has the numbers
and what each check caught).

The crops: 64×64 windows centred on a person box of the first MSRS training frames
(`msrs/splits/train.txt`, never the val names), with coarse labels from the MSRS
boxes (inside a box: its class; outside every box: background). The chain is the
pipeline's: autoencoder → IKR and CKG on its latents → MKF (Algorithm 1) on all three.
Each network overfits these crops; the bars say it can learn at all, and they fail on
the broken versions (the authors' InstanceNorm AE trained from scratch, ε-predicting
tiny denoisers, training on separately encoded crops).

Slow: about 6 minutes on two CPU cores in all. Skipped without ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need_shared
from magicfuse.checkpoint import load_pipeline
from magicfuse.config import from_mapping
from magicfuse.data.boxes import rasterize_boxes, read_yolo_boxes
from magicfuse.data.classes import MSRS_BOX_CLASSES, MSRS_BOX_TO_MFNET
from magicfuse.data.readers import PairSample
from magicfuse.data.shards import make_loader, write_shards
from magicfuse.diffusion.sampler import MagicFuseNets, magicfuse_sample
from magicfuse.imageio import read_image
from magicfuse.training import (
    AETrainConfig,
    LDMTrainConfig,
    MKFTrainConfig,
    train_autoencoder,
    train_ldm,
    train_mkf,
)
from magicfuse.training.ae import load_autoencoder
from magicfuse.training.ldm import psnr

pytestmark = [pytest.mark.slow, pytest.mark.needs_shared]

CROP = 64
N_CROPS = 8
PERSON = 2  # MFNet id


def _person_crops(n: int) -> list[PairSample]:
    """`n` 64×64 crops, one per MSRS training frame that has a person box 16-40 px tall,
    centred on the largest such box (so people are a minority of the crop's pixels);
    labels rasterised from every box of the frame."""
    msrs = need_shared("data", "msrs")
    boxes_dir = need_shared("data", "msrs_detection_labels", "fusion", "test")
    names = sorted((msrs / "splits" / "train.txt").read_text().split())
    out: list[PairSample] = []
    for name in names:
        box_file = boxes_dir / f"{name}.txt"
        if not box_file.is_file():
            continue
        vi = read_image(msrs / "test" / "vi" / f"{name}.png", "rgb")
        ir = read_image(msrs / "test" / "ir" / f"{name}.png", "gray")
        h, w = vi.shape[:2]
        boxes = read_yolo_boxes(box_file, w, h, MSRS_BOX_TO_MFNET, names=MSRS_BOX_CLASSES)
        people = [b for b in boxes if b.cls == PERSON and 16 <= b.y1 - b.y0 <= 40]
        if not people:
            continue
        big = max(people, key=lambda b: b.area)
        cy, cx = int((big.y0 + big.y1) / 2), int((big.x0 + big.x1) / 2)
        top = min(max(cy - CROP // 2, 0), h - CROP)
        left = min(max(cx - CROP // 2, 0), w - CROP)
        label = rasterize_boxes(boxes, h, w, ignore_unboxed=False)
        win = (slice(top, top + CROP), slice(left, left + CROP))
        out.append(PairSample(key=name, visible=np.ascontiguousarray(vi[win]), infrared=np.ascontiguousarray(ir[win]),
                              label=np.ascontiguousarray(label[win]), boxes=None, source="msrs", split="train"))
        if len(out) == n:
            return out
    pytest.skip(f"fewer than {n} MSRS training frames with a person box in {boxes_dir}")


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_crops")
    samples = _person_crops(N_CROPS)
    # strong degradations (the mild ones leave the input within ~1 dB of the clean crop,
    # which would not tell a restoring IKR from a copying one)
    cfg = {"seed": 0, "degradation": {"kinds": ["low_light", "haze", "rain"], "composite_prob": 0.0}}
    write_shards(samples, out, split="train", cfg=cfg, progress=False)
    return out


def _fit_batch(shards: Path) -> dict:
    """All the training crops, in shard order (the checks measure how well each part fits
    them; evaluating another split would meet other degradations of the same crops)."""
    return next(iter(make_loader(shards, "train", batch_size=N_CROPS, crop=None, shuffle=False,
                                 members=("clean", "degraded", "infrared", "label"))))


@pytest.fixture(scope="module")
def ae_run(real_shards, tmp_path_factory):
    cfg = from_mapping(AETrainConfig, {
        "model": "ae-tiny", "steps": 600, "batch_size": 8, "crop": CROP, "lr": 2e-3, "chroma_weight": 5.0,
        "ema_decay": 0.99, "log_every": 50, "ckpt_every": 600, "device": "cpu", "progress": False, "seed": 0})
    return train_autoencoder(cfg, real_shards, tmp_path_factory.mktemp("ae"))


def _ldm(branch: str, ae_run, real_shards, tmp_path_factory):
    cfg = from_mapping(LDMTrainConfig, {
        "steps": 1000, "batch_size": 8, "crop": None, "lr": 2e-3, "ema_decay": 0.99, "log_every": 50,
        "ckpt_every": 1000, "device": "cpu", "progress": False, "seed": 1, "eval_samples": N_CROPS,
        "eval_steps": 25, "eval_split": "train"})
    return train_ldm(cfg, branch=branch, ae_checkpoint=ae_run.checkpoint, shards_dir=real_shards,
                     out_dir=tmp_path_factory.mktemp(branch))


@pytest.fixture(scope="module")
def ikr_run(ae_run, real_shards, tmp_path_factory):
    return _ldm("ikr", ae_run, real_shards, tmp_path_factory)


@pytest.fixture(scope="module")
def ckg_run(ae_run, real_shards, tmp_path_factory):
    return _ldm("ckg", ae_run, real_shards, tmp_path_factory)


@torch.no_grad()
def _ae_psnr(ae_ckpt: Path, shards: Path) -> tuple[float, float]:
    """Mean PSNR of the autoencoder's reconstruction of the fit crops: (visible, infrared)."""
    ae = load_autoencoder(ae_ckpt).eval()
    b = _fit_batch(shards)
    ir = b["infrared"].expand(-1, 3, -1, -1)
    g = torch.Generator().manual_seed(0)
    return (float(psnr(ae(b["clean"], None, g), b["clean"]).mean()),
            float(psnr(ae(ir, None, g).mean(1, keepdim=True), b["infrared"]).mean()))


def test_autoencoder_reconstructs_real_crops_at_30_db(ae_run, real_shards):
    vis, ir = _ae_psnr(ae_run.checkpoint, real_shards)
    print(f"autoencoder on {N_CROPS} real crops: visible {vis:.2f} dB, infrared {ir:.2f} dB")
    assert vis >= 30.0 and ir >= 30.0, (vis, ir)


def _check_denoiser(run, branch: str, ae_run, real_shards) -> None:
    m = run.final_metrics
    vis, ir = _ae_psnr(ae_run.checkpoint, real_shards)
    ceiling = vis if branch == "ikr" else ir
    print(f"{branch}: sampled {m['psnr']:.2f} dB, baseline {m['psnr_baseline']:.2f} dB, autoencoder {ceiling:.2f} dB")
    # premise: the sampled check ran on all the crops and the baseline is the trivial one
    assert m["eval_samples"] == N_CROPS
    assert m["psnr"] >= 25.0 or m["psnr"] >= ceiling - 2.0, (m, ceiling)
    assert m["psnr"] > m["psnr_baseline"] + 3.0, m


def test_ikr_reproduces_its_real_targets(ikr_run, ae_run, real_shards):
    _check_denoiser(ikr_run, "ikr", ae_run, real_shards)


def test_ckg_reproduces_its_real_targets(ckg_run, ae_run, real_shards):
    _check_denoiser(ckg_run, "ckg", ae_run, real_shards)


def _person_iou(pred: torch.Tensor, label: torch.Tensor) -> float:
    p, t = pred == PERSON, label == PERSON
    return float((p & t).sum()) / max(float((p | t).sum()), 1.0)


@torch.no_grad()
def _head_outputs(pipeline_ckpt: Path, shards: Path):
    modules, payload = load_pipeline(pipeline_ckpt)
    nets = MagicFuseNets(**modules)
    b = _fit_batch(shards)
    s = payload["sampler"]
    out = magicfuse_sample(nets, b["degraded"], steps=s["steps"], tau=s["tau"],
                           thermal_classes=tuple(s["thermal_classes"]), generator=torch.Generator().manual_seed(0))
    return out, b["label"][:, 0] if b["label"].ndim == 4 else b["label"]


def test_fusion_and_head_learn_algorithm_1(ae_run, ikr_run, ckg_run, real_shards, tmp_path):
    cfg = from_mapping(MKFTrainConfig, {
        "steps": 300, "batch_size": 4, "crop": None, "optimizer": "adam", "lr": 2e-3, "sampler_steps": 10,
        "thermal_classes": [1, 2], "log_every": 25, "ckpt_every": 300, "device": "cpu", "progress": False,
        "seed": 3})
    res = train_mkf(cfg, ae_checkpoint=ae_run.checkpoint, ikr_checkpoint=ikr_run.checkpoint,
                    ckg_checkpoint=ckg_run.checkpoint, shards_dir=real_shards, out_dir=tmp_path)
    first, last = res.history[0]["loss"], np.mean([h["loss"] for h in res.history[-3:]])
    print(f"mkf: loss {first:.4f} -> {last:.4f}")
    assert last < 0.6 * first, (first, last)

    out, label = _head_outputs(res.checkpoint, real_shards)
    # premise: the crops hold people and background
    share = float((label == PERSON).float().mean())
    assert 0.02 < share < 0.8, share
    iou = _person_iou(out.seg, label)
    chance = share  # IoU of calling every pixel "person"
    w = out.w.float()
    print(f"mkf: person IoU {iou:.3f} (chance {chance:.3f}), w std {float(w.std()):.4f}")
    assert iou > chance + 0.15, (iou, chance)
    assert float(w.std()) > 0.02, float(w.std())  # a per-pixel weight, not a constant
