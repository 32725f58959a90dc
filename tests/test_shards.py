"""Shard writer, manifest and loader: determinism, atomic resume, exact coverage, aligned crops."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from magicfuse.config import from_mapping
from magicfuse.data.readers import PairSample
from magicfuse.data.shards import (
    MANIFEST_NAME,
    ShardConfig,
    list_shards,
    make_loader,
    manifest_hash,
    read_manifest,
    verify_shards,
    write_shards,
)
from magicfuse.data.synthetic import generate_scene
from magicfuse.errors import ConfigError, DataError

H, W = 48, 64
N = 10


def make_sample(i: int, *, height: int = H, width: int = W, seed: int = 0, source: str = "synthetic") -> PairSample:
    scene = generate_scene(seed, i, height=height, width=width)
    return PairSample(
        key=f"{i:05d}",
        visible=scene.visible,
        infrared=scene.infrared,
        label=scene.label,
        boxes=None,
        source=source,
        split="train",
        paths={},
    )


@pytest.fixture(scope="module")
def samples() -> list[PairSample]:
    return [make_sample(i) for i in range(N)]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def split_bytes(out: Path, split: str = "train") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / split).iterdir())}


def decode(data: bytes, color: bool) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color else img


CFG4 = ShardConfig(samples_per_shard=4, seed=7)


@pytest.fixture(scope="module")
def written(tmp_path_factory, samples) -> Path:
    out = tmp_path_factory.mktemp("shards")
    res = write_shards(samples, out, split="train", cfg=CFG4)
    assert res.num_samples == N and res.written_shards == 3 and res.kept_shards == 0
    return out


# --------------------------------------------------------------------------- writer


def test_layout_and_members_round_trip(written, samples):
    shards = list_shards(written, "train")
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    first = tar_members(shards[0])
    key = "synthetic-00000"
    assert sorted(first)[:5] == sorted(f"{key}.{e}" for e in ("clean.png", "degraded.png", "infrared.png", "json", "label.png"))
    assert len(first) == 4 * 5
    s = samples[0]
    np.testing.assert_array_equal(decode(first[f"{key}.clean.png"], True), s.visible)
    np.testing.assert_array_equal(decode(first[f"{key}.infrared.png"], False), s.infrared)
    np.testing.assert_array_equal(decode(first[f"{key}.label.png"], False), s.label)
    rec = json.loads(first[f"{key}.json"])
    assert rec["orig_key"] == "00000" and rec["source"] == "synthetic" and rec["split"] == "train"
    assert (rec["height"], rec["width"]) == (H, W)
    assert rec["has_label"] and rec["has_infrared"]
    assert isinstance(rec["recipe"], list) and rec["recipe"] and all("name" in step for step in rec["recipe"])
    degraded = decode(first[f"{key}.degraded.png"], True)
    assert degraded.shape == s.visible.shape and not np.array_equal(degraded, s.visible)
    # fixed tar metadata
    with tarfile.open(shards[0]) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_recipe_reproduces_degraded_image(written, samples):
    from magicfuse.data import degrade

    if not hasattr(degrade, "apply_recipe"):
        pytest.skip("magicfuse.data.degrade has no apply_recipe")
    for name, data in tar_members(list_shards(written, "train")[1]).items():
        if name.endswith(".json"):
            rec = json.loads(data)
            key = rec["key"]
            clean = samples[int(rec["orig_key"])].visible
            got = decode(tar_members(list_shards(written, "train")[1])[f"{key}.degraded.png"], True)
            np.testing.assert_array_equal(degrade.apply_recipe(clean, rec["recipe"]), got)


def test_deterministic_bytes_and_order_independence(tmp_path, written, samples):
    a = tmp_path / "a"
    write_shards(samples, a, split="train", cfg=CFG4)
    assert split_bytes(a) == split_bytes(written)
    assert (a / MANIFEST_NAME).read_bytes() == (written / MANIFEST_NAME).read_bytes()
    assert manifest_hash(a) == manifest_hash(written)
    # the degradation of a sample does not depend on its position in the input
    rev = tmp_path / "rev"
    write_shards(samples[::-1], rev, split="train", cfg=CFG4)
    fwd = {k: v for p in list_shards(written, "train") for k, v in tar_members(p).items()}
    bwd = {k: v for p in list_shards(rev, "train") for k, v in tar_members(p).items()}
    assert fwd == bwd
    # another seed gives other degradations
    other = tmp_path / "other"
    write_shards(samples, other, split="train", cfg=ShardConfig(samples_per_shard=4, seed=8))
    oth = {k: v for p in list_shards(other, "train") for k, v in tar_members(p).items()}
    assert oth["synthetic-00000.clean.png"] == fwd["synthetic-00000.clean.png"]
    differ = [k for k in fwd if k.endswith("degraded.png") and fwd[k] != oth[k]]
    assert len(differ) >= N // 2


def crashing(samples, after: int):
    for i, s in enumerate(samples):
        if i == after:
            raise RuntimeError("simulated crash")
        yield s


def test_crash_then_resume_equals_uninterrupted(tmp_path, written, samples):
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(crashing(samples, 6), out, split="train", cfg=CFG4)
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["progress.json", "shard-000000.tar"]  # the half shard never appeared
    assert not list(out.rglob("*.tmp"))
    assert not (out / MANIFEST_NAME).exists()
    prog = json.loads((out / "train" / "progress.json").read_text())
    assert not prog["complete"] and [s["name"] for s in prog["shards"]] == ["shard-000000.tar"]
    with pytest.raises(DataError, match="incomplete"):
        verify_shards(out, "train")

    res = write_shards(samples, out, split="train", cfg=CFG4)
    assert (res.kept_shards, res.written_shards, res.num_samples) == (1, 2, N)
    assert split_bytes(out) == split_bytes(written)
    assert (out / MANIFEST_NAME).read_bytes() == (written / MANIFEST_NAME).read_bytes()
    assert verify_shards(out, "train") == N

    # a rerun of a complete split keeps everything and does not read the input
    res = write_shards(crashing(samples, 0), out, split="train", cfg=CFG4)
    assert (res.kept_shards, res.written_shards, res.num_samples) == (3, 0, N)

    # a corrupted shard (and a stale temp file) are replaced on rerun
    p = out / "train" / "shard-000001.tar"
    p.write_bytes(p.read_bytes()[:-2000])
    (out / "train" / ".shard-000002.tar.abc.tmp").write_bytes(b"junk")
    with pytest.raises(DataError, match="shard-000001.tar"):
        verify_shards(out, "train")
    res = write_shards(samples, out, split="train", cfg=CFG4)
    assert (res.kept_shards, res.written_shards) == (1, 2)
    assert split_bytes(out) == split_bytes(written)


def test_resume_refuses_changed_input_or_settings(tmp_path, samples):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError):
        write_shards(crashing(samples, 5), out, split="train", cfg=CFG4)
    with pytest.raises(DataError, match="input changed"):
        write_shards(samples[::-1], out, split="train", cfg=CFG4)
    with pytest.raises(DataError, match="other settings"):
        write_shards(samples, out, split="train", cfg=ShardConfig(samples_per_shard=4, seed=99))
    res = write_shards(samples[::-1], out, split="train", cfg=CFG4, overwrite=True)
    assert (res.kept_shards, res.num_samples) == (0, N)


def test_max_samples_duplicates_and_empty(tmp_path, samples):
    res = write_shards(samples, tmp_path / "m", split="val", cfg={"samples_per_shard": 2, "max_samples": 3})
    assert res.num_samples == 3 and len(res.shards) == 2
    with pytest.raises(DataError, match="duplicate sample key"):
        write_shards([samples[0], samples[1], samples[0]], tmp_path / "d", split="train", cfg=CFG4)
    with pytest.raises(DataError, match="no samples"):
        write_shards([], tmp_path / "e", split="train", cfg=CFG4)
    bad = dataclasses.replace(make_sample(0), infrared=make_sample(0).infrared[:-1])
    with pytest.raises(DataError, match="infrared"):
        write_shards([bad], tmp_path / "b", split="train", cfg=CFG4)


def test_config_from_mapping():
    cfg = from_mapping(ShardConfig, {"samples_per_shard": 8, "seed": 3, "max_samples": None})
    assert cfg == ShardConfig(samples_per_shard=8, seed=3)
    with pytest.raises(ConfigError, match="unknown"):
        from_mapping(ShardConfig, {"shard_size": 8})
    with pytest.raises(ConfigError):
        ShardConfig(samples_per_shard=0)
    with pytest.raises(ConfigError, match="kinds"):
        from_mapping(ShardConfig, {"degradation": {"kinds": ["snowstorm"]}})


def test_degradation_config_is_used(tmp_path, samples):
    cfg = from_mapping(ShardConfig, {"samples_per_shard": 5, "degradation": {"kinds": ["haze"], "composite_prob": 0.0}})
    write_shards(samples, tmp_path / "h", split="train", cfg=cfg)
    assert {tuple(r["degradations"]) for r in read_manifest(tmp_path / "h").to_pylist()} == {("haze",)}
    # an explicit degradation_cfg overrides the nested one
    write_shards(samples[:3], tmp_path / "l", split="train", cfg=cfg,
                 degradation_cfg={"kinds": ["low_light", "rain"], "composite_prob": 0.0})
    names = {n for r in read_manifest(tmp_path / "l").to_pylist() for n in r["degradations"]}
    assert names and names <= {"low_light", "rain"}


# --------------------------------------------------------------------------- manifest


def test_manifest_rows(tmp_path, written, samples):
    table = read_manifest(written)
    assert table.num_rows == N
    assert set(table.column_names) >= {
        "key", "source", "split", "height", "width", "has_label", "has_infrared", "recipe", "degradations", "shard",
    }
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"synthetic-{i:05d}" for i in range(N)]
    assert {r["shard"] for r in rows} == {f"train/shard-{i:06d}.tar" for i in range(3)}
    for r in rows:
        assert (r["height"], r["width"], r["split"], r["source"]) == (H, W, "train", "synthetic")
        assert r["has_label"] and r["has_infrared"]
        members = tar_members(written / r["shard"])
        rec = json.loads(members[f"{r['key']}.json"])
        assert json.loads(r["recipe"]) == rec["recipe"]
        assert r["degradations"] == [step["name"] for step in rec["recipe"]]
    # a second split in the same folder joins the manifest; samples without infrared/label are allowed
    plain = [PairSample(key=f"p{i}", visible=s.visible, infrared=None, label=None, boxes=None,
                        source="pairs", split="test", paths={}) for i, s in enumerate(samples[:3])]
    write_shards(plain, written.parent / "two", split="test", cfg=CFG4)
    write_shards(samples, written.parent / "two", split="train", cfg=CFG4)
    two = read_manifest(written.parent / "two").to_pylist()
    assert len(two) == N + 3
    test_rows = [r for r in two if r["split"] == "test"]
    assert [r["key"] for r in test_rows] == ["pairs-p0", "pairs-p1", "pairs-p2"]
    assert not any(r["has_infrared"] or r["has_label"] for r in test_rows)
    with pytest.raises(DataError, match="manifest"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match="manifest"):
        manifest_hash(tmp_path)


def test_webdataset_reads_our_shards(written):
    import webdataset as wds

    ds = wds.WebDataset(str(list_shards(written, "train")[0]), shardshuffle=False)
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"synthetic-{i:05d}" for i in range(4)]
    assert set(got[0]) >= {"clean.png", "degraded.png", "infrared.png", "label.png", "json"}


# --------------------------------------------------------------------------- loader


def test_loader_batches(written):
    loader = make_loader(written, "train", batch_size=4, crop=(32, 40), seed=1)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b["clean"].shape == (4, 3, 32, 40) and b["clean"].dtype == torch.float32
    assert b["degraded"].shape == (4, 3, 32, 40) and b["degraded"].dtype == torch.float32
    assert b["infrared"].shape == (4, 1, 32, 40) and b["infrared"].dtype == torch.float32
    assert b["label"].shape == (4, 32, 40) and b["label"].dtype == torch.int64
    for m in ("clean", "degraded", "infrared"):
        assert 0.0 <= float(b[m].min()) and float(b[m].max()) <= 1.0
    assert set(torch.unique(b["label"]).tolist()) <= set(range(9)) | {255}
    # crop=None keeps full frames; members can be chosen; drop_last drops the short batch
    full = list(make_loader(written, "train", batch_size=4, crop=None, members=("degraded", "infrared"),
                            drop_last=True, shuffle=False))
    assert len(full) == 2 and set(full[0]) == {"degraded", "infrared", "key"}
    assert full[0]["degraded"].shape == (4, 3, H, W)
    assert full[0]["key"] == [f"synthetic-{i:05d}" for i in range(4)]


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize("per_shard", [2, 8])  # 5 shards (shard-level split) and 2 shards (sample-level split)
def test_every_sample_once_across_ranks_and_workers(tmp_path, samples, per_shard):
    out = tmp_path / "s"
    write_shards(samples, out, split="train", cfg=ShardConfig(samples_per_shard=per_shard, seed=7))
    seen: list[str] = []
    for rank in range(2):
        loader = make_loader(out, "train", batch_size=2, crop=(16, 16), num_workers=2, seed=3, epoch=1,
                             rank=rank, world_size=2)
        got = keys_of(loader)
        assert got, f"rank {rank} received nothing"
        seen += got
    assert sorted(seen) == [f"synthetic-{i:05d}" for i in range(N)]


def test_epochs_shuffle_deterministically(written):
    def run(epoch, workers=0):
        return list(make_loader(written, "train", batch_size=3, crop=(24, 24), seed=5, epoch=epoch,
                                num_workers=workers))

    e0, e0b, e1 = run(0), run(0), run(1)
    k0, k1 = [k for b in e0 for k in b["key"]], [k for b in e1 for k in b["key"]]
    assert sorted(k0) == sorted(k1) == [f"synthetic-{i:05d}" for i in range(N)]
    assert k0 != k1
    assert [k for b in e0b for k in b["key"]] == k0
    for a, b in zip(e0, e0b):
        assert torch.equal(a["clean"], b["clean"]) and torch.equal(a["label"], b["label"])
    # set_epoch on the dataset gives the same as a fresh loader for that epoch
    loader = make_loader(written, "train", batch_size=3, crop=(24, 24), seed=5, epoch=0)
    loader.dataset.set_epoch(1)
    assert keys_of(loader) == k1
    # crops vary with the epoch
    c0 = {k: b["clean"][i] for b in e0 for i, k in enumerate(b["key"])}
    c1 = {k: b["clean"][i] for b in e1 for i, k in enumerate(b["key"])}
    assert sum(not torch.equal(c0[k], c1[k]) for k in c0) >= N // 2


def test_crops_are_aligned_across_members(tmp_path):
    # visible encodes the pixel position; infrared and label are functions of it
    yy, xx = np.mgrid[0:60, 0:80]
    code = ((yy * 80 + xx) % 251).astype(np.uint8)
    vis = np.stack([code, (yy * 3).astype(np.uint8), (xx * 3).astype(np.uint8)], axis=-1)
    s = [PairSample(key=f"c{i}", visible=np.roll(vis, i, axis=1), infrared=255 - np.roll(code, i, axis=1),
                    label=np.roll(code, i, axis=1) % 9, boxes=None, source="grid", split="train", paths={})
         for i in range(6)]
    out = tmp_path / "g"
    write_shards(s, out, split="train", cfg=CFG4)
    tops = set()
    for b in make_loader(out, "train", batch_size=3, crop=(20, 30), seed=0):
        clean_code = torch.round(b["clean"][:, 0] * 255).long()
        ir = torch.round(b["infrared"][:, 0] * 255).long()
        assert torch.equal(ir, 255 - clean_code)
        assert torch.equal(b["label"], clean_code % 9)
        tops |= set(torch.round(b["clean"][:, 1, 0, 0] * 255).long().tolist())
    assert len(tops) > 1  # crop positions differ between samples


def test_label_absent_is_ignore_and_infrared_absent_is_an_error(tmp_path, samples):
    out = tmp_path / "nolab"
    plain = [PairSample(key=f"p{i}", visible=s.visible, infrared=None, label=None, boxes=None,
                        source="pairs", split="train", paths={}) for i, s in enumerate(samples[:3])]
    write_shards(plain, out, split="train", cfg=CFG4)
    b = next(iter(make_loader(out, "train", batch_size=3, members=("clean", "degraded", "label"))))
    assert torch.all(b["label"] == 255) and b["label"].dtype == torch.int64
    with pytest.raises(DataError, match="infrared"):
        next(iter(make_loader(out, "train", batch_size=3)))
    assert list(make_loader(out, "train", batch_size=3, skip_missing=True)) == []


def test_mixed_sizes_need_a_crop(tmp_path, samples):
    out = tmp_path / "mix"
    mixed = [samples[0], make_sample(1, height=40, width=56)]
    write_shards(mixed, out, split="train", cfg=CFG4)
    with pytest.raises(DataError, match="crop"):
        list(make_loader(out, "train", batch_size=2, crop=None))
    b = next(iter(make_loader(out, "train", batch_size=2, crop=(32, 32))))
    assert b["clean"].shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="smaller than the crop"):
        list(make_loader(out, "train", batch_size=2, crop=(44, 44)))


def data_error_of(fn) -> str:
    try:
        fn()
    except DataError as exc:
        exc.__traceback__ = None  # free the frames (and the loader iterator) now, not in a later gc pass
        return str(exc)
    raise AssertionError("no DataError raised")


def test_loader_errors_name_the_file(tmp_path, written):
    with pytest.raises(DataError, match="not found"):
        make_loader(tmp_path / "nope", "train", batch_size=1)
    with pytest.raises(DataError, match="split 'val' not found"):
        make_loader(written, "val", batch_size=1)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="empty split"):
        make_loader(tmp_path / "empty", "train", batch_size=1)
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    shard = list_shards(written, "train")[0]
    (bad / "shard-000000.tar").write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match="shard-000000.tar"):
        list(make_loader(tmp_path / "bad", "train", batch_size=1, shuffle=False))
    # raised in a worker process: same type, names the file. (A DataLoader iterator that is only freed
    # by the cyclic gc, as one held by a pytest.raises traceback, waits 5 s for its worker to join.)
    assert "shard-000000.tar" in data_error_of(
        lambda: list(make_loader(tmp_path / "bad", "train", batch_size=1, num_workers=1)))
    (bad / "shard-000000.tar").write_bytes(b"\x01" * 5000)
    with pytest.raises(DataError, match="shard-000000.tar"):
        list(make_loader(tmp_path / "bad", "train", batch_size=1))
    with pytest.raises(DataError, match="members"):
        make_loader(written, "train", batch_size=1, members=("rgb",))
    with pytest.raises(DataError, match="rank"):
        make_loader(written, "train", batch_size=1, rank=2, world_size=2)


# --------------------------------------------------------------------------- from readers


def test_from_msrs_reader_with_resume(tmp_path):
    from magicfuse.data.readers import open_reader
    from magicfuse.data.synthetic import write_synthetic_dataset

    root = tmp_path / "msrs"
    write_synthetic_dataset(root, seed=0, splits={"train": 7}, height=H, width=W, progress=False)
    reader = open_reader("msrs", root, "train")
    ref = tmp_path / "ref"
    res = write_shards(reader, ref, split="train", cfg=ShardConfig(samples_per_shard=3, seed=1))
    assert res.num_samples == 7 and len(res.shards) == 3
    rows = read_manifest(ref).to_pylist()
    assert [r["orig_key"] for r in rows] == reader.keys()
    assert {r["source"] for r in rows} == {"msrs"}
    rec = json.loads(tar_members(res.shards[0])[f"{rows[0]['key']}.json"])
    # original paths are stored relative to the reader's root: shards do not depend on where data lives
    assert rec["paths"]["visible"] == f"train/vi/{rows[0]['orig_key']}.png"
    assert rec["paths"]["label"] == f"train/Segmentation_labels/{rows[0]['orig_key']}.png"

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError):
        write_shards(crashing(reader, 4), out, split="train", cfg=ShardConfig(samples_per_shard=3, seed=1),
                     paths_root=root)
    res = write_shards(reader, out, split="train", cfg=ShardConfig(samples_per_shard=3, seed=1))
    assert (res.kept_shards, res.written_shards) == (1, 2)
    assert split_bytes(out) == split_bytes(ref)
    b = next(iter(make_loader(out, "train", batch_size=7, crop=(32, 32))))
    assert b["clean"].shape == (7, 3, 32, 32) and b["label"].max() <= 8


def test_finished_split_is_redone_when_its_reader_input_changes(tmp_path):
    """A finished split is reused only while its input is the same: more scenes (e.g. a larger
    `synthesize.splits`) or a rewritten file make write_shards start over, never keep stale shards."""
    from magicfuse.data.readers import open_reader
    from magicfuse.data.synthetic import write_synthetic_dataset

    root, out = tmp_path / "msrs", tmp_path / "shards"
    cfg = ShardConfig(samples_per_shard=3, seed=1)
    write_synthetic_dataset(root, seed=0, splits={"train": 4}, height=H, width=W, progress=False)
    first = write_shards(open_reader("msrs", root, "train"), out, split="train", cfg=cfg, progress=False)
    assert first.num_samples == 4
    again = write_shards(open_reader("msrs", root, "train"), out, split="train", cfg=cfg, progress=False)
    assert (again.num_samples, again.kept_shards, again.written_shards) == (4, 2, 0)  # unchanged: reused

    write_synthetic_dataset(root, seed=0, splits={"train": 7}, height=H, width=W, progress=False)
    grown = write_shards(open_reader("msrs", root, "train"), out, split="train", cfg=cfg, progress=False)
    assert (grown.num_samples, grown.kept_shards, grown.written_shards) == (7, 0, 3)
    assert len(read_manifest(out)) == 7

    reader = open_reader("msrs", root, "train")
    vis = root / "train" / "vi" / f"{reader.keys()[0]}.png"
    img = cv2.imread(str(vis))
    cv2.imwrite(str(vis), 255 - img)  # same key, other pixels
    redone = write_shards(open_reader("msrs", root, "train"), out, split="train", cfg=cfg, progress=False)
    assert (redone.num_samples, redone.written_shards) == (7, 3)


@pytest.mark.needs_shared
def test_real_msrs_pairs(tmp_path):
    from magicfuse.data.readers import open_reader

    from conftest import need_shared

    root = need_shared("data", "msrs")
    with pytest.warns(UserWarning, match="labels"):
        reader = open_reader("msrs", root, "test")
    res = write_shards(reader, tmp_path, split="test", cfg=ShardConfig(samples_per_shard=2, max_samples=3))
    assert res.num_samples == 3
    rows = read_manifest(tmp_path).to_pylist()
    assert [(r["height"], r["width"], r["has_infrared"], r["has_label"]) for r in rows] == [(480, 640, True, False)] * 3
    batches = list(make_loader(tmp_path, "test", batch_size=3, crop=(256, 256), num_workers=0))
    b = batches[0]
    assert b["clean"].shape == (3, 3, 256, 256) and b["infrared"].shape == (3, 1, 256, 256)
    assert torch.all(b["label"] == 255)
    assert float(b["clean"].std()) > 0.05  # real image content survived the round trip


def test_several_sources_load_together(tmp_path, samples):
    """Training reads the shard folders of all sources (params.yaml shards.sources) as one set."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(samples[:5], a, split="train", source_name="srcA", cfg=CFG4)
    write_shards(samples[5:], b, split="train", source_name="srcB", cfg=CFG4)
    keys = keys_of(make_loader([a, b], "train", batch_size=3, crop=(16, 16), seed=1))
    assert sorted(keys) == sorted([f"srcA-{i:05d}" for i in range(5)] + [f"srcB-{i:05d}" for i in range(5, N)])
    assert manifest_hash([a, b]) != manifest_hash(a) and manifest_hash([a]) == manifest_hash(a)
    with pytest.raises(DataError, match="split 'val' not found"):
        make_loader([a, b], "val", batch_size=2)


def test_with_meta_gives_the_boxes_and_recipe_of_real_pairs(tmp_path):
    """The evaluation reads each sample's json record (boxes, degradation recipe) back."""
    from magicfuse.data.readers import open_reader
    from magicfuse.data.shards import ShardDataset

    from conftest import need_shared

    root = need_shared("data", "msrs")
    boxes = need_shared("data", "msrs_detection_labels", "fusion", "test")
    reader = open_reader("msrs", root, "val", folder="test", names_file="splits/{split}.txt", boxes_dir=boxes,
                         labels_from_boxes=True, unboxed="background", scale=0.25)
    write_shards(reader, tmp_path, split="val", cfg=ShardConfig(samples_per_shard=2, max_samples=3))
    got = list(ShardDataset(tmp_path, "val", shuffle=False, members=("clean", "label"), with_meta=True))
    assert [g["key"].split("-", 1)[1] for g in got] == reader.keys()[:3]
    for g, key in zip(got, reader.keys()[:3]):
        want = reader[key].boxes
        assert [(b["cls"], b["x0"], b["y1"]) for b in g["meta"]["boxes"]] == [(b.cls, b.x0, b.y1) for b in want]
        assert g["meta"]["recipe"] and all("name" in step for step in g["meta"]["recipe"])
        assert g["clean"].shape == (120, 160, 3)
    assert "meta" not in next(iter(ShardDataset(tmp_path, "val", shuffle=False, members=("clean",))))
