"""MagicFuse.from_pretrained(...).fuse(...), the pyfunc wrapper and tiling (tiny real networks)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from magicfuse.checkpoint import save_model, save_pipeline
from magicfuse.diffusion.sampler import MagicFuseNets, magicfuse_sample
from magicfuse.errors import CheckpointError, ConfigError, DataError
from magicfuse.inference import MagicFuse, _pyfunc_class, image_seed, to_image_tensor
from magicfuse.models import build_model
from magicfuse.models.unet import UNetConfig
from magicfuse.tiling import (TiledAutoEncoder, TiledDenoiser, TiledFusion, TilingBudget, WindowedAttention, needs_tiling,
                              tile_starts, wrap_for_tiling)

STEPS = 3
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_zero_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The UNets' output convs start at zero (eps = 0); give them small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


# The random-weight CKG of these tests: the 24-channel, 4-head layout the tiling bounds below
# were measured with (`ckg-tiny` until 2026-12-04). Pinned here so that the tiling checks do
# not move when the default's preset changes: with random weights the windowed/tiled error
# depends on the layout (the 16-channel, 2-head `ckg-tiny` gives max |Δ| 22.8/255 in the
# windowed-attention check; the trained one is checked in docs/QUALITY.md).
CKG_TEST_LAYOUT = UNetConfig(model_channels=24, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,),
                             num_heads=4, num_groups=8, prediction="v")


def tiny_modules(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "ae": build_model("ae", "ae").eval(),
        "ikr": _randomise_zero_init(build_model("unet", "ikr-tiny"), seed + 1),
        "ckg": _randomise_zero_init(build_model("unet", CKG_TEST_LAYOUT), seed + 2),
        "fusion": build_model("fusion", "fusion-tiny").eval(),
    }


def save_tiny_pipeline(path: Path, steps: int = STEPS) -> Path:
    m = tiny_modules()
    return save_pipeline(path, m["ae"], m["ikr"], m["ckg"], m["fusion"],
                         sampler={"steps": steps, "tau": 0.4, "thermal_classes": [2]})


@pytest.fixture(scope="module")
def pipeline_path(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "pipeline.pt")


@pytest.fixture(scope="module")
def model(pipeline_path) -> MagicFuse:
    return MagicFuse.from_pretrained(pipeline_path, device="cpu")


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_reads_sampler_settings(model):
    assert model.steps == STEPS and model.tau == pytest.approx(0.4) and model.thermal_classes == (2,)
    assert model.device.type == "cpu"


def test_missing_and_wrong_kind_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        MagicFuse.from_pretrained(tmp_path / "nope.pt", device="cpu")
    ae_only = save_model(tmp_path / "ae.pt", build_model("ae", "ae"))
    with pytest.raises(CheckpointError, match=r"ae\.pt.*'ae'.*expected 'pipeline'"):
        MagicFuse.from_pretrained(ae_only, device="cpu")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        MagicFuse.from_pretrained(bad, device="cpu")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="emptydir.*ae.*ikr"):
        MagicFuse.from_pretrained(empty, device="cpu")


def test_mlflow_uri_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(CheckpointError, match="models:/no-such-model@champion"):
        MagicFuse.from_pretrained("models:/no-such-model@champion", device="cpu")


def test_mlflow_model_folder_with_pipeline_artifact(tmp_path, pipeline_path):
    folder = tmp_path / "downloaded_model"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "artifacts" / "pipeline.pt").write_bytes(pipeline_path.read_bytes())
    m = MagicFuse.from_pretrained(folder, device="cpu")
    assert m.steps == STEPS


def test_authors_folder_is_converted(tmp_path):
    """A folder of the authors' raw files (the real AE; IKR/CKG/MKF as raw state dicts of
    the paper architecture would be ~2 GB, so this checks the tiny parts are rejected by
    name/shape validation, i.e. the folder really goes through the importer)."""
    ae_file = SHARED / "weights" / "official_ae.pth"
    if not ae_file.is_file():
        pytest.skip(f"needs {ae_file}")
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "official_ae.pth").symlink_to(ae_file.resolve())
    m = tiny_modules()
    torch.save(m["ikr"].state_dict(), folder / "ikr.pt")
    torch.save(m["ckg"].state_dict(), folder / "ckg.pt")
    torch.save(m["fusion"].state_dict(), folder / "mkf.pth")
    with pytest.raises(CheckpointError, match=r"ikr\.pt.*do not fit"):
        MagicFuse.from_pretrained(folder, device="cpu")


# ----------------------------------------------------------------------------- inputs


def test_input_kinds_give_the_same_result(model):
    from PIL import Image

    arr = _rgb(30, 40)
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    # batch_size=1: every input runs in the same batch shape, so equality is exact (batches of
    # different sizes round differently on CPU; that bound is the bucketing test's business)
    res = model.fuse([arr, Image.fromarray(arr), ten, ten[None], arr.astype(np.float32) / 255],
                     seeds=[5] * 5, batch_size=1)
    assert len(res) == 5
    for r in res:
        assert r.magimg.shape == (30, 40, 3) and r.magimg.dtype == np.uint8
        assert r.ikr.shape == (30, 40, 3) and r.ckg.shape == (30, 40) and r.ckg.dtype == np.uint8
        assert r.seg.shape == (30, 40) and r.seg.dtype == np.uint8 and r.seg.max() < 9
        assert r.seg_color.shape == (30, 40, 3)
        np.testing.assert_array_equal(r.magimg, res[0].magimg)
        np.testing.assert_array_equal(r.seg, res[0].seg)


def test_grey_input_is_replicated(model):
    grey = _rgb(30, 40)[..., 0]
    r1, r2 = model.fuse([grey, np.repeat(grey[..., None], 3, axis=2)], seeds=[1, 1])
    np.testing.assert_array_equal(r1.magimg, r2.magimg)


@pytest.mark.parametrize("hw", [(30, 40), (17, 23), (1, 5), (33, 64)])
def test_odd_sizes_come_back_exact(model, hw):
    (r,) = model.fuse(_rgb(*hw), outputs=("magimg", "seg"))
    assert r.magimg.shape == (*hw, 3) and r.seg.shape == hw and r.ikr is None and r.ckg is None


def test_bucketing_keeps_order_and_batching_does_not_change_results(model):
    sizes = [(30, 40), (20, 24), (30, 40), (17, 23), (20, 24), (30, 40)]
    imgs = [_rgb(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    a = model.fuse(imgs, batch_size=4, seed=3)
    b = model.fuse(imgs, batch_size=1, seed=3)
    assert [r.index for r in a] == list(range(6))
    for (h, w), ra, rb in zip(sizes, a, b):
        assert ra.magimg.shape == (h, w, 3)
        # same noise per image; CPU kernels for batch 1 vs 4 round differently (measured: ≤ 1 level)
        assert np.abs(ra.magimg.astype(int) - rb.magimg.astype(int)).max() <= 2
        assert (ra.seg == rb.seg).mean() > 0.99
    # the same image alone, with its per-image seed, matches the mixed call (size-17×23 bucket has one image)
    (alone,) = model.fuse([imgs[3]], seeds=[image_seed(3, 3)], batch_size=4)
    np.testing.assert_array_equal(alone.magimg, a[3].magimg)
    np.testing.assert_array_equal(alone.magimg, b[3].magimg)


def test_seed_controls_the_output(model):
    img = _rgb(30, 40)
    r0 = model.fuse(img, seed=0)[0].magimg
    assert np.array_equal(r0, model.fuse(img, seed=0)[0].magimg)
    assert not np.array_equal(r0, model.fuse(img, seed=1)[0].magimg)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5, 3), np.uint8), "zero-size"),
    (np.zeros((4, 5, 2), np.uint8), "shape"),
    (np.zeros((2, 3, 4, 5, 3), np.uint8), "shape"),
    (np.full((4, 5, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 5, 3), 3.0, np.float32), r"\[0, 1\]"),
    (np.zeros((4, 5, 3), np.int32), "dtype"),
    (torch.zeros(4, 5, 5), "shape"),
    (torch.zeros(3, 4, 5, dtype=torch.int64), "dtype"),
    ("a string", "PIL image, a numpy array or a torch tensor"),
])
def test_bad_arrays_give_clear_errors(bad, match):
    with pytest.raises(DataError, match=match):
        to_image_tensor(bad, name="image 7")


def test_fuzz_odd_arrays_never_crash(model):
    rng = np.random.default_rng(0)
    dtypes = [np.uint8, np.float32, np.float64, np.int16, np.bool_]
    ok = 0
    for i in range(200):
        ndim = int(rng.integers(0, 5))
        shape = tuple(int(s) for s in rng.integers(0, 6, ndim))
        dt = dtypes[int(rng.integers(len(dtypes)))]
        arr = (rng.random(shape) * rng.choice([1, 255, 1e6])).astype(dt)
        try:
            t = to_image_tensor(arr, name=f"fuzz {i}")
        except DataError as exc:
            assert f"fuzz {i}" in str(exc)
            continue
        assert t.shape[0] == 3 and t.min() >= 0 and t.max() <= 1
        ok += 1
    assert ok > 0
    (r,) = model.fuse(np.zeros((1, 1), np.uint8), outputs=("magimg",))  # a 1×1 image works
    assert r.magimg.shape == (1, 1, 3)


# ----------------------------------------------------------------------------- pyfunc


def test_pyfunc_load_context_and_predict(pipeline_path, model):
    cls = _pyfunc_class()
    import mlflow.pyfunc

    assert issubclass(cls, mlflow.pyfunc.PythonModel)
    py = cls(device="cpu")
    py.load_context(types.SimpleNamespace(artifacts={"pipeline": str(pipeline_path)}))
    batch = np.stack([_rgb(30, 40, 1), _rgb(30, 40, 2)])
    out = py.predict(None, batch)
    assert out.shape == (2, 30, 40, 3) and out.dtype == np.uint8
    ref = model.fuse(list(batch), outputs=("magimg",))
    np.testing.assert_array_equal(out[1], ref[1].magimg)
    out2 = py.predict([batch[0], batch[1]], params={"seed": 0})
    np.testing.assert_array_equal(out2, out)
    with pytest.raises(DataError, match="share a size"):
        py.predict(None, [_rgb(30, 40), _rgb(20, 20)])
    with pytest.raises(CheckpointError, match="pipeline"):
        cls().load_context(types.SimpleNamespace(artifacts={}))


# ----------------------------------------------------------------------------- tiling


def test_tile_starts_cover_and_align():
    assert tile_starts(10, 16, 4) == [0]
    s = tile_starts(80, 32, 8)
    assert s[0] == 0 and s[-1] == 48 and all(b - a <= 24 for a, b in zip(s, s[1:]))


def _gradient(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.15 * (xx - yy)], 0)[None]


def test_tiled_autoencoder_is_exact_with_exact_statistics():
    """With the norm statistics of the whole image (proxy ≥ image, or enough refinement
    passes) and a halo covering the receptive field, tiling the AE changes nothing."""
    ae = tiny_modules()["ae"]
    x = _gradient(128, 160)
    noise = torch.randn(1, 32, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ae.encode(x, noise=noise)
        img = ae.decode(z)
        exact = TiledAutoEncoder(ae, 64, 16, halo=64, proxy=1024)
        assert (exact.encode(x, noise=noise) - z).abs().max() < 1e-4
        assert (exact.decode(z) - img).abs().max() * 255 < 0.01
        refined = TiledAutoEncoder(ae, 64, 16, halo=64, proxy=32, stat_passes=22)
        assert (refined.encode(x, noise=noise) - z).abs().max() < 1e-4


def _sample_both(budget: TilingBudget):
    m = tiny_modules()
    nets = MagicFuseNets(m["ae"], m["ikr"], m["ckg"], m["fusion"])
    x = _gradient(256, 320)
    wrapped = wrap_for_tiling(nets, (256, 320), budget)
    # person only as the thermal class: the random head calls many pixels car, and a pixel whose
    # argmax flips under windowing jumps between capped and uncapped w (the figures below)
    kw = dict(steps=2, thermal_classes=(2,))
    with torch.no_grad():
        a = magicfuse_sample(nets, x, generator=torch.Generator().manual_seed(0), **kw)
        b = magicfuse_sample(wrapped, x, generator=torch.Generator().manual_seed(0), **kw)
    return wrapped, a, b


def _assert_no_seams(a, b, starts: list[int], overlap: int) -> None:
    """The column-to-column change of the wrapped MagImg inside the overlap bands (and
    anywhere) is no larger than the untiled one's at the same columns by more than 25 %."""

    def col_change(img: torch.Tensor) -> torch.Tensor:
        return (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2)) * 255

    ga, gb = col_change(a.magimg), col_change(b.magimg)
    bands = [c for s in starts[1:] for c in range(4 * s - 2, 4 * (s + overlap) + 2)]
    assert gb[bands].mean() <= 1.25 * ga[bands].mean() + 1.0
    assert gb.max() <= 1.25 * ga.max() + 1.0


def test_windowed_attention_sampling_close_to_untiled_without_seams():
    """256×320 smooth gradient, tiny random-weight nets, 2 DDIM steps: attention windows of
    32 latent pixels, overlap 8, halo 8 (the fusion network's 64×80 attention maps get 12
    windows), everything else on the whole latent. Measured: mean |Δ| 0.088/255, max 1.5/255,
    98 % of segmentation pixels equal. Bounds: mean < 0.5/255, max < 8/255, agreement > 0.9."""
    budget = TilingBudget(max_attention_tokens=0, tile=32, overlap=8, halo=8)
    wrapped, a, b = _sample_both(budget)
    assert isinstance(wrapped.ikr, WindowedAttention) and isinstance(wrapped.fusion, WindowedAttention)
    assert not isinstance(wrapped.ae, TiledAutoEncoder)
    diff = (a.magimg - b.magimg).abs() * 255
    assert diff.mean() < 0.5 and diff.max() < 8
    assert (a.seg == b.seg).float().mean() > 0.9
    _assert_no_seams(a, b, tile_starts(80, 32, 8), 8)


def test_tiled_networks_sampling_close_to_untiled_without_seams():
    """The bounded-memory fallback: whole networks on latent tiles of 32, overlap 8, halo 8.
    Per-tile GroupNorm statistics and receptive field make the denoisers differ much more
    than windowed attention (random weights amplify this; measured: mean |Δ| 11.6/255, 97 %
    of segmentation pixels equal). Bounds: mean |Δ| < 16/255, agreement > 0.9, no seams."""
    budget = TilingBudget(max_attention_tokens=0, tile=32, overlap=8, halo=8, max_latent_pixels=0,
                          net_tile=32, net_overlap=8, net_halo=8, max_image_pixels=1 << 40)
    wrapped, a, b = _sample_both(budget)
    assert isinstance(wrapped.ikr, TiledDenoiser) and isinstance(wrapped.ikr.unet, WindowedAttention)
    assert isinstance(wrapped.fusion, TiledFusion)
    diff = (a.magimg - b.magimg).abs() * 255
    assert diff.mean() < 16
    assert (a.seg == b.seg).float().mean() > 0.9
    _assert_no_seams(a, b, tile_starts(80, 32, 8), 8)


def test_wrap_for_tiling_picks_the_regime_by_size():
    m = tiny_modules()
    nets = MagicFuseNets(m["ae"], m["ikr"], m["ckg"], m["fusion"])
    budget = TilingBudget(max_attention_tokens=1200, max_latent_pixels=4800, max_image_pixels=160 * 160)
    assert needs_tiling((120, 160), budget) == ("whole", False)  # 30×40 = 1200 latent pixels
    assert wrap_for_tiling(nets, (120, 160), budget) is nets
    assert needs_tiling((240, 320), budget) == ("windowed", True)  # 4800 latent pixels
    w = wrap_for_tiling(nets, (240, 320), budget)
    assert isinstance(w.ckg, WindowedAttention) and w.ckg.net is nets.ckg and isinstance(w.ae, TiledAutoEncoder)
    assert needs_tiling((244, 320), budget)[0] == "tiled"  # padded to 256 rows: 5120 latent pixels
    t = wrap_for_tiling(nets, (244, 320), budget)
    assert isinstance(t.fusion, TiledFusion) and t.fusion.fusion.net is nets.fusion
    assert wrap_for_tiling(t, (244, 320), budget).ikr is t.ikr  # wrappers are not wrapped again
    never = TilingBudget.forced(0)
    assert wrap_for_tiling(nets, (4096, 4096), never) is nets
    with pytest.raises(ConfigError, match="net_overlap"):
        TilingBudget(net_tile=32, net_overlap=32)


@pytest.mark.slow
def test_compiled_model_matches_eager_with_and_without_attention_windows(pipeline_path):
    """--compile goes through WindowedAttention (the window is a keyword of the compiled
    networks): same bytes as eager up to kernel rounding, with and without windows."""
    img = _rgb(64, 96, seed=3)
    eager = MagicFuse.from_pretrained(pipeline_path, device="cpu")
    compiled = MagicFuse.from_pretrained(pipeline_path, device="cpu", compile=True)
    for tile in (0, 8):
        (a,) = eager.fuse(img, steps=2, tile=tile, outputs=("magimg",))
        (b,) = compiled.fuse(img, steps=2, tile=tile, outputs=("magimg",))
        assert np.abs(a.magimg.astype(int) - b.magimg.astype(int)).max() <= 1


def test_fuse_with_tiling_runs_and_keeps_size(model):
    (r,) = model.fuse(_rgb(70, 90), tile=8, outputs=("magimg", "seg"))
    assert r.magimg.shape == (70, 90, 3) and r.seg.shape == (70, 90)


@pytest.mark.slow
def test_4k_synthetic_image_runs_with_tiling(model):
    img = (np.stack(np.meshgrid(np.linspace(0, 255, 3840), np.linspace(0, 255, 2160)), -1).mean(-1)).astype(np.uint8)
    (r,) = model.fuse(img, steps=1, outputs=("magimg",))
    assert r.magimg.shape == (2160, 3840, 3)
