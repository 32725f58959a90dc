"""`magicfuse fuse`: outputs, naming, resume, bad inputs and a fuzz run (tiny real networks)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from magicfuse import fuse_cli
from magicfuse.imageio import encode_png, read_image, write_png
from magicfuse.inference import MagicFuse
from test_inference import save_tiny_pipeline  # tests/ is on sys.path (rootdir-less test modules)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline_path(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "pipeline.pt", steps=2)


@pytest.fixture(scope="module")
def model(pipeline_path) -> MagicFuse:
    return MagicFuse.from_pretrained(pipeline_path, device="cpu")


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _cli(argv: list[str]) -> int:
    return fuse_cli.main([*argv, "-q"])


def test_fuse_writes_all_outputs_at_exact_size_and_resumes(tmp_path, pipeline_path, capsys):
    src = tmp_path / "in"
    write_png(src / "a.png", _img(30, 40))
    write_png(src / "b.png", _img(17, 23, 1))
    out = tmp_path / "out"
    rc = _cli([str(src), "-o", str(out), "--model", str(pipeline_path), "--save", "ikr,ckg,seg,grid", "--device", "cpu"])
    assert rc == 0
    assert "done 2, skipped 0, failed 0" in capsys.readouterr().out
    for stem, hw in (("a", (30, 40)), ("b", (17, 23))):
        assert read_image(out / f"{stem}_magimg.png").shape == (*hw, 3)
        assert read_image(out / f"{stem}_ikr.png").shape == (*hw, 3)
        assert read_image(out / f"{stem}_ckg.png", "any").shape == hw
        assert read_image(out / f"{stem}_seg.png").shape == (*hw, 3)
        assert read_image(out / f"{stem}_grid.png").shape[1] > 4 * hw[1]
    assert (out / fuse_cli.LEGEND_NAME).is_file()
    mtime = (out / "a_magimg.png").stat().st_mtime_ns
    rc = _cli([str(src), "-o", str(out), "--model", str(pipeline_path), "--save", "ikr,ckg,seg,grid"])
    text = capsys.readouterr().out
    assert rc == 0 and "done 0, skipped 2" in text and "exists (use --overwrite)" in text
    assert (out / "a_magimg.png").stat().st_mtime_ns == mtime
    rc = _cli([str(src / "a.png"), "-o", str(out), "--model", str(pipeline_path), "--overwrite"])
    assert rc == 0 and "done 1" in capsys.readouterr().out


def test_cli_output_matches_the_api(tmp_path, pipeline_path, model):
    from magicfuse.inference import image_seed

    img = _img(30, 40, 5)
    write_png(tmp_path / "x.png", img)
    assert _cli([str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--model", str(pipeline_path), "--seed", "7",
                 "--device", "cpu"]) == 0
    (ref,) = model.fuse(img, seeds=[image_seed(7, "x")])
    np.testing.assert_array_equal(read_image(tmp_path / "o" / "x_magimg.png"), ref.magimg)
    # --init-noise-scale reaches the sampler as the API's argument does
    assert _cli([str(tmp_path / "x.png"), "-o", str(tmp_path / "o2"), "--model", str(pipeline_path), "--seed", "7",
                 "--device", "cpu", "--init-noise-scale", "0.25"]) == 0
    (low,) = model.fuse(img, seeds=[image_seed(7, "x")], init_noise_scale=0.25)
    np.testing.assert_array_equal(read_image(tmp_path / "o2" / "x_magimg.png"), low.magimg)
    assert not np.array_equal(low.magimg, ref.magimg)


def test_name_clashes_do_not_overwrite(tmp_path):
    for d, seed in (("d1", 1), ("d2", 2)):
        write_png(tmp_path / d / "same.png", _img(8, 8, seed))
    write_png(tmp_path / "d1" / "sub" / "same.png", _img(8, 8, 3))
    (tmp_path / "d1" / "same.jpg").write_bytes((tmp_path / "d1" / "same.png").read_bytes())
    items, failed = fuse_cli.collect_inputs([str(tmp_path / "d1" / "same.png"), str(tmp_path / "d2" / "same.png")])
    assert [i.name for i in items] == ["same", "same_2"] and not failed
    items, _ = fuse_cli.collect_inputs([str(tmp_path / "d1")], recursive=True)
    assert sorted(i.name for i in items) == ["same", "same_png", "sub/same"]
    items, _ = fuse_cli.collect_inputs([str(tmp_path / "d*" / "*.png")])
    assert sorted(i.name for i in items) == ["d1/same", "d2/same"]


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_bad_inputs_fail_alone_and_the_batch_goes_on(tmp_path, pipeline_path, capsys):
    src = tmp_path / "in"
    write_png(src / "good.png", _img(20, 24))
    png = encode_png(_img(20, 24, 1))
    (src / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "text.png").write_bytes(b"hello, I am not an image")
    (src / "empty.jpg").write_bytes(b"")
    (src / "zero.png").write_bytes(_png_header(0, 10) + b"\x00" * 20)
    (src / "huge.png").write_bytes(_png_header(100000, 100000) + b"\x00" * 40)
    write_png(src / "big.png", _img(40, 60, 2))
    out = tmp_path / "out"
    rc = _cli([str(src), str(tmp_path / "missing.png"), "-o", str(out), "--model", str(pipeline_path),
               "--max-pixels", "2000"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "done 1, skipped 0, failed 7" in cap.out
    for name in ("truncated.png", "text.png", "empty.jpg", "zero.png", "huge.png", "big.png", "missing.png"):
        assert name in cap.err
    assert "max-pixels" in cap.err and "not found" in cap.err
    assert sorted(p.name for p in out.iterdir()) == ["good_magimg.png"]


def test_fatal_errors_exit_2(tmp_path, pipeline_path, capsys):
    write_png(tmp_path / "a.png", _img(8, 8))
    assert _cli([str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert _cli([str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--model", str(pipeline_path),
                 "--init-noise-scale", "1.5"]) == 2
    assert "--init-noise-scale must be in [0, 1], got 1.5" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _cli([str(tmp_path / "a.png"), "-o", str(blocker), "--model", str(pipeline_path)]) == 2
    assert "not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert _cli([str(tmp_path / "a.png"), "-o", str(ro), "--model", str(pipeline_path)]) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_registered_subcommand(monkeypatch, tmp_path, pipeline_path):
    from magicfuse import cli

    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("magicfuse.fuse_cli",))
    write_png(tmp_path / "a.png", _img(8, 8))
    assert cli.main(["fuse", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--model", str(pipeline_path), "-q"]) == 0
    assert (tmp_path / "o" / "a_magimg.png").is_file()


def test_fuzz_corrupted_files(tmp_path, model):
    """A few hundred random / corrupted byte strings: each one fails with a one-line reason
    naming the file (or, rarely, decodes into a valid image), nothing else is written,
    and valid files among them still come through."""
    rng = np.random.default_rng(1234)
    good_png = encode_png(_img(12, 16))
    import cv2

    ok, jpg = cv2.imencode(".jpg", _img(12, 16))
    good_jpg = jpg.tobytes()
    src = tmp_path / "fuzz"
    src.mkdir()
    for i in range(300):
        kind = i % 6
        if kind == 0:
            data = rng.bytes(int(rng.integers(0, 400)))
        elif kind == 1:
            data = good_png[: int(rng.integers(1, len(good_png) - 1))]
        elif kind == 2:
            data = good_jpg[: int(rng.integers(1, len(good_jpg) - 2))]
        elif kind == 3:
            data = good_png[:33] + rng.bytes(int(rng.integers(0, 300)))
        elif kind == 4:
            w, h = (int(v) for v in rng.integers(0, 2**31 - 1, 2))
            data = _png_header(w, h) + rng.bytes(64) + b"IEND"
        else:
            b = bytearray(good_png)
            for _ in range(int(rng.integers(1, 8))):
                b[int(rng.integers(8, len(b)))] = int(rng.integers(0, 256))
            data = bytes(b)
        ext = (".png", ".jpg", ".bmp", ".tif", ".webp")[i % 5]
        (src / f"f{i:03d}{ext}").write_bytes(data)
    write_png(src / "valid.png", _img(12, 16))
    items, failed = fuse_cli.collect_inputs([str(src)])
    logs: list[str] = []
    summary = fuse_cli.fuse_files(model, items, tmp_path / "out", steps=1, max_pixels=10_000, progress=False,
                                  log=logs.append, batch_size=8)
    assert len(summary.done) + len(summary.failed) == 301 and not summary.skipped
    assert any(it.name == "valid" for it in summary.done)
    assert len(summary.failed) > 250
    for it in summary.failed:
        assert it.reason and "\n" not in it.reason
    assert len(logs) == len(summary.failed) and all(str(src) in line for line in logs)
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {f"{it.name}_magimg.png" for it in summary.done}
