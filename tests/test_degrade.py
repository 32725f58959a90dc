from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from magicfuse.config import from_mapping, to_dict
from magicfuse.data.degrade import (
    ALL_KINDS,
    DEGRADATIONS,
    DegradationConfig,
    apply_recipe,
    augment_geometry,
    degrade,
    degrade_with_config,
    road_depth_proxy,
)
from magicfuse.data.synthetic import generate_scene
from magicfuse.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_scene(11, 3, height=96, width=128).visible


def _lum(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _grad_energy(img: np.ndarray) -> float:
    y = _lum(img)
    return float((np.diff(y, axis=0) ** 2).mean() + (np.diff(y, axis=1) ** 2).mean())


def _hf_energy(img: np.ndarray) -> float:
    y = _lum(img).astype(np.float32)
    return float((cv2.Laplacian(y, cv2.CV_32F) ** 2).mean())


def _dark_channel(img: np.ndarray) -> float:
    return float(cv2.erode(img.min(axis=2), np.ones((7, 7), np.uint8)).mean())


def _blockiness(img: np.ndarray) -> float:
    """Mean jump across 8-pixel block borders divided by the mean jump elsewhere."""
    y = _lum(img)
    dx = np.abs(np.diff(y, axis=1))
    border = dx[:, 7::8].mean()
    inner = np.delete(dx, np.s_[7::8], axis=1).mean()
    return float(border / (inner + 1e-9))


def _one(image, kind, seed=0):
    out, recipe = degrade(image, seed, kinds=[kind], composite_prob=0.0)
    assert len(recipe) == 1 and recipe[0]["name"] == kind
    assert out.shape == image.shape and out.dtype == np.uint8
    return out, recipe


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_deterministic_reproducible_json(image, kind):
    a, ra = _one(image, kind, 5)
    b, rb = _one(image, kind, 5)
    assert a.tobytes() == b.tobytes() and ra == rb
    loaded = json.loads(json.dumps(ra))
    assert apply_recipe(image, loaded).tobytes() == a.tobytes()
    assert not np.array_equal(a, image)
    c, rc = _one(image, kind, 6)
    assert rc != ra


def test_generator_rng_and_composites(image):
    rng = np.random.default_rng(123)
    sizes = []
    for _ in range(30):
        out, recipe = degrade(image, rng, composite_prob=1.0)
        names = [s["name"] for s in recipe]
        sizes.append(len(names))
        assert 2 <= len(names) <= 3 and len(set(names)) == len(names)
        assert names == sorted(names, key=ALL_KINDS.index)
        assert not {"low_light", "over_exposure"} <= set(names)
        assert apply_recipe(image, json.loads(json.dumps(recipe))).tobytes() == out.tobytes()
    assert set(sizes) == {2, 3}
    singles = [len(degrade(image, s, composite_prob=0.0)[1]) for s in range(10)]
    assert singles == [1] * 10


def test_low_light_darkens(image):
    for s in range(5):
        out, _ = _one(image, "low_light", s)
        assert _lum(out).mean() < 0.75 * _lum(image).mean()


def test_over_exposure_brightens(image):
    for s in range(5):
        out, _ = _one(image, "over_exposure", s)
        assert _lum(out).mean() > 1.25 * _lum(image).mean()
        assert (out == 255).mean() > (image == 255).mean()


def test_haze_lowers_contrast_raises_dark_channel_more_at_the_top(image):
    for s in range(5):
        out, _ = _one(image, "haze", s)
        assert _grad_energy(out) < 0.9 * _grad_energy(image)  # local contrast drops
        assert _dark_channel(out) > _dark_channel(image) + 10
        diff = np.abs(out.astype(int) - image.astype(int)).mean(axis=(1, 2))
        assert diff[:20].mean() > diff[-20:].mean()  # far (top) hazier than near (bottom)


def test_haze_with_given_depth(image):
    zero = np.zeros(image.shape[:2], np.float32)
    out, recipe = degrade(image, 0, kinds=["haze"], composite_prob=0.0, depth=zero)
    assert recipe[0]["depth"] == "given"
    # depth 0 everywhere and no darker-is-farther term: t = 1, nothing changes
    no_lum = [{**recipe[0], "lum_weight": 0.0}]
    assert np.array_equal(apply_recipe(image, no_lum, depth=zero), image)
    if recipe[0]["lum_weight"] > 0:  # the drawn recipe adds depth from luminance: the image changes
        assert not np.array_equal(out, image)
    ramp = np.tile(np.linspace(0, 1, image.shape[1], dtype=np.float32), (image.shape[0], 1))
    out, recipe = degrade(image, 1, kinds=["haze"], composite_prob=0.0, depth=ramp)
    assert apply_recipe(image, recipe, depth=ramp).tobytes() == out.tobytes()
    with pytest.raises(ConfigError, match="depth"):
        apply_recipe(image, recipe)
    with pytest.raises(DataError, match="shape"):
        degrade(image, 1, kinds=["haze"], composite_prob=0.0, depth=ramp[:10])


def test_depth_proxy_shape():
    d = road_depth_proxy(50, 20, horizon=0.4)
    assert d.shape == (50, 20)
    assert d[0].max() == pytest.approx(1.0) and d[-1].max() == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(d[:, 0]) <= 1e-7)  # farther toward the top


@pytest.mark.parametrize("kind", ["motion_blur", "defocus_blur"])
def test_blur_lowers_gradient_energy(image, kind):
    for s in range(4):
        out, _ = _one(image, kind, s)
        assert _grad_energy(out) < 0.8 * _grad_energy(image)


def test_noise_raises_high_frequency_energy(image):
    for s in range(4):
        out, recipe = _one(image, "gaussian_noise", s)
        assert _hf_energy(out) > 1.3 * _hf_energy(image)
        assert abs(_lum(out).mean() - _lum(image).mean()) < 5  # zero-mean noise


def test_jpeg_blockiness(image):
    smooth = cv2.GaussianBlur(image, (0, 0), 2.0)
    for s in range(4):
        out, recipe = _one(smooth, "jpeg", s)
        assert recipe[0]["quality"] <= 40
        assert out.tobytes() != smooth.tobytes()
        assert _blockiness(out) > _blockiness(smooth) + 0.2


def test_rain_adds_bright_streaks(image):
    for s in range(4):
        out, _ = _one(image, "rain", s)
        brighter = (out.astype(int) - image.astype(int)).min(axis=2) > 30
        assert brighter.mean() > 0.003
        # streaks are elongated: the bright pixels continue in the next row more often than not
        assert (brighter[1:] & brighter[:-1]).sum() > 0.3 * brighter.sum()


def test_bad_inputs(image):
    with pytest.raises(ConfigError, match="unknown degradation"):
        degrade(image, 0, kinds=["fog"])
    with pytest.raises(DataError, match="uint8"):
        degrade(image.astype(np.float32), 0)
    with pytest.raises(DataError, match="H×W×3"):
        degrade(image[:, :, 0], 0)
    with pytest.raises(ConfigError, match="missing"):
        apply_recipe(image, [{"name": "jpeg"}])
    with pytest.raises(ConfigError, match="unknown degradation"):
        apply_recipe(image, [{"name": "sepia"}])
    with pytest.raises(ConfigError, match="rng"):
        degrade(image, -3)


def test_config(image):
    cfg = from_mapping(DegradationConfig, {"kinds": ["haze", "jpeg"], "composite_prob": 1.0})
    assert cfg.kinds == ("haze", "jpeg")
    out, recipe = degrade_with_config(image, 4, cfg)
    assert [s["name"] for s in recipe] == ["haze", "jpeg"]
    assert to_dict(DegradationConfig())["kinds"] == list(DEGRADATIONS)
    with pytest.raises(ConfigError, match="unknown degradation"):
        from_mapping(DegradationConfig, {"kinds": ["snow"]})
    with pytest.raises(ConfigError, match="composite_prob"):
        DegradationConfig(composite_prob=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(DegradationConfig, {"kind": ["haze"]})


# ----------------------------------------------------------------------------- geometry


def _square_triplet(h=60, w=80):
    vis = np.full((h, w, 3), 40, np.uint8)
    vis[10:30, 50:70] = (250, 200, 100)  # off-centre so flips move it
    ir = np.full((h, w), 20, np.uint8)
    ir[10:30, 50:70] = 230
    lab = np.zeros((h, w), np.uint8)
    lab[10:30, 50:70] = 2
    return vis, ir, lab


@pytest.mark.parametrize("crop", [None, (40, 40), (72, 96)])
def test_augment_geometry_keeps_alignment(crop):
    vis, ir, lab = _square_triplet()
    flips = set()
    for seed in range(12):
        v, i, l_, rec = augment_geometry(seed, vis, ir, lab, crop=crop)
        flips.add(rec["hflip"])
        json.dumps(rec)
        if crop is not None:
            assert v.shape[:2] == i.shape == l_.shape == tuple(crop)
        bright = v[:, :, 0] > 150
        assert np.array_equal(bright, l_ == 2)
        assert np.array_equal(i > 128, l_ == 2)
        # padded area: ignore label and black image
        pad = l_ == 255
        assert np.all(v[pad] == 0) and np.all(i[pad] == 0)
        if crop == (72, 96):
            assert pad.any()
        else:
            assert not pad.any()
        v2, i2, l2, rec2 = augment_geometry(seed, vis, ir, lab, crop=crop)
        assert v2.tobytes() == v.tobytes() and l2.tobytes() == l_.tobytes() and rec2 == rec
    assert flips == {True, False}


def test_augment_geometry_flip_moves_square_and_scale_rotate_stay_aligned():
    vis, ir, lab = _square_triplet()
    v, i, l_, rec = augment_geometry(0, vis, ir, lab, hflip_prob=1.0)
    assert rec["hflip"] and np.array_equal(l_, lab[:, ::-1]) and np.array_equal(v, vis[:, ::-1])
    v, i, l_, rec = augment_geometry(3, vis, ir, lab, hflip_prob=0.0, scale_range=(0.8, 1.2), rotate_limit=10)
    inside = l_ == 2
    assert inside.sum() > 100
    # nearest-neighbour labels vs bilinear images: agree away from the square's edge
    core = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert np.all(v[core][:, 0] > 200) and np.all(i[core] > 200)
    outside = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    assert np.all(v[outside & (l_ == 0)][:, 0] < 60)
    assert set(np.unique(l_)) <= {0, 2, 255}


def test_augment_geometry_optional_targets_and_errors():
    vis, ir, lab = _square_triplet()
    v, i, l_, rec = augment_geometry(1, vis, None, lab, crop=(30, 30))
    assert i is None and v.shape == (30, 30, 3) and l_.shape == (30, 30)
    with pytest.raises(DataError, match="label"):
        augment_geometry(1, vis, ir, lab[:10])
    with pytest.raises(ConfigError, match="crop"):
        augment_geometry(1, vis, ir, lab, crop=(0, 10))
