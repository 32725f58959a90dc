from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from magicfuse.config import from_mapping, to_dict
from magicfuse.data.classes import MFNET_CLASSES
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.segformer import (
    SegformerProtocolConfig,
    build_segformer,
    run_protocol,
    to_tensors,
    train_and_evaluate_segformer,
)


def toy_set(n: int, seed: int, h: int = 64, w: int = 64):
    """Coloured discs/squares on a grey background; the colour says the class (1, 2, 3)."""
    g = np.random.default_rng(seed)
    x = np.zeros((n, 3, h, w), np.float32)
    y = np.zeros((n, h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    colours = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.9, 0.1), 3: (0.1, 0.1, 0.9)}
    for i in range(n):
        x[i] = g.uniform(0.3, 0.5)
        for _ in range(3):
            c = int(g.integers(1, 4))
            r = int(g.integers(8, 16))
            cy, cx = (int(v) for v in g.integers(r, [h - r, w - r]))
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if c != 3 else ((abs(yy - cy) < r) & (abs(xx - cx) < r))
            x[i][:, m] = np.array(colours[c], np.float32)[:, None]
            y[i][m] = c
    x += g.normal(0, 0.02, x.shape).astype(np.float32)
    return torch.from_numpy(x.clip(0, 1)), torch.from_numpy(y)


# One intra-op thread: these toy models gain nothing from two, and stay fast when other
# processes share the cores (two OpenMP threads then spin and slow down ~5x).
FAST = SegformerProtocolConfig(variant="tiny", epochs=0, max_steps=6, batch_size=4, lr=2e-3, seed=3, num_threads=1)


def test_two_runs_give_identical_results_and_leave_global_rng_alone():
    tx, ty = toy_set(8, 0)
    ex, ey = toy_set(4, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = train_and_evaluate_segformer(tx, ty, ex, ey, FAST, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    b = train_and_evaluate_segformer(tx, ty, ex, ey, FAST, progress=False)
    assert a.train_steps == b.train_steps == 6
    assert a.miou == b.miou
    assert a.final_loss == b.final_loss
    np.testing.assert_array_equal(a.confusion, b.confusion)
    assert list(a.per_class_iou) == list(MFNET_CLASSES)
    # a different seed starts from different weights
    c = train_and_evaluate_segformer(tx, ty, ex, ey, dataclasses.replace(FAST, seed=4), progress=False)
    assert c.final_loss != a.final_loss


def test_it_learns_an_easy_task():
    tx, ty = toy_set(8, 0)
    ex, ey = toy_set(4, 1)
    cfg = dataclasses.replace(FAST, epochs=10, max_steps=0, seed=0)
    res = train_and_evaluate_segformer(tx, ty, ex, ey, cfg, progress=False)
    majority = float((ey == 0).float().mean())  # always predicting background: 0.68
    assert res.pixel_acc > majority + 0.05, (res.pixel_acc, majority)
    assert res.miou > 0.4, res.per_class_iou
    assert res.train_steps == 10 * 2


def test_crop_and_different_test_size_and_run_protocol_rows():
    tx, ty = toy_set(4, 0, 48, 64)
    ex, ey = toy_set(2, 1, 40, 56)  # odd size: logits are upsampled to label size
    cfg = dataclasses.replace(FAST, max_steps=2, crop=(32, 32))
    res = run_protocol({"degraded": (tx, ty, ex, ey), "MagImg": (tx.flip(-1), ty.flip(-1), ex, ey)}, cfg,
                       progress=False)
    assert set(res) == {"degraded", "MagImg"}
    row = res["MagImg"].to_row("MagImg")
    assert row["name"] == "MagImg" and set(MFNET_CLASSES) <= set(row)
    assert row["mIoU"] == pytest.approx(100 * res["MagImg"].miou)
    assert int(res["degraded"].confusion.sum()) == 2 * 40 * 56


def test_variants_and_config():
    tiny = build_segformer(SegformerProtocolConfig(variant="tiny"))
    b0 = build_segformer(SegformerProtocolConfig(variant="b0"))
    n_tiny = sum(p.numel() for p in tiny.parameters())
    n_b0 = sum(p.numel() for p in b0.parameters())
    assert n_tiny < 600_000
    assert 3.6e6 < n_b0 < 3.8e6  # SegFormer-B0: 3.7 M parameters
    out = tiny(pixel_values=torch.rand(1, 3, 64, 96)).logits
    assert out.shape == (1, 9, 16, 24)  # 1/4 resolution
    cfg = from_mapping(SegformerProtocolConfig, {"variant": "b1", "crop": [64, 96], "epochs": 2})
    assert cfg.crop == (64, 96)
    assert from_mapping(SegformerProtocolConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="variant"):
        SegformerProtocolConfig(variant="b5")
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(SegformerProtocolConfig, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="class_weights"):
        SegformerProtocolConfig(class_weights=(1.0, 2.0))


def test_bad_data_is_reported():
    tx, ty = toy_set(2, 0, 32, 32)
    with pytest.raises(DataError, match="training set.*\\[0,1\\]"):
        train_and_evaluate_segformer(tx * 255, ty, tx, ty, FAST, progress=False)
    with pytest.raises(DataError, match="test set.*do not match"):
        train_and_evaluate_segformer(tx, ty, tx, ty[:1], FAST, progress=False)
    with pytest.raises(DataError, match="id 12"):
        train_and_evaluate_segformer(tx, torch.full_like(ty, 12), tx, ty, FAST, progress=False)
    with pytest.raises(DataError, match="every label pixel"):
        train_and_evaluate_segformer(tx, torch.full_like(ty, 255), tx, ty, FAST, progress=False)
    with pytest.raises(DataError, match="must be"):
        run_protocol({"x": (tx, ty)}, FAST, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_device_without_cuda_is_a_config_error():
    tx, ty = toy_set(2, 0, 32, 32)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train_and_evaluate_segformer(tx, ty, tx, ty, dataclasses.replace(FAST, device="cuda"), progress=False)


def test_to_tensors_converts_numpy_samples():
    g = np.random.default_rng(0)
    ims = [g.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(3)]
    lbs = [g.integers(0, 9, (6, 8), dtype=np.uint8) for _ in range(3)]
    x, y = to_tensors(ims, lbs)
    assert x.shape == (3, 3, 6, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[1, 2, 4, 5] == pytest.approx(ims[1][4, 5, 2] / 255)
    assert int(y[2, 3, 1]) == lbs[2][3, 1]
    with pytest.raises(DataError, match="share one size"):
        to_tensors(ims[:1] + [ims[1][:4]], lbs[:1] + [lbs[1][:4]])
    with pytest.raises(DataError, match="2 images but 3 labels"):
        to_tensors(ims[:2], lbs)
