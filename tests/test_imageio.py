"""magicfuse.imageio: every accepted layout gives the documented array; every bad file
gives an ImageReadError naming the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import need_shared
from magicfuse.errors import DataError, ImageReadError
from magicfuse.imageio import (
    decode_image,
    decode_png,
    encode_png,
    image_size,
    read_image,
    to_gray,
    write_png,
)


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _pil_save(arr_or_im, path: Path, fmt: str = "PNG", **kw) -> Path:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    im.save(path, fmt, **kw)
    return path


def _expect_error(path: Path, *needles: str, mode: str = "rgb", **kw) -> str:
    with pytest.raises(ImageReadError) as exc:
        read_image(path, mode, **kw)
    msg = str(exc.value)
    assert path.name in msg, msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# --- good inputs -------------------------------------------------------------------


def test_rgb_png_roundtrip_and_channel_order(tmp_path):
    a = _rand((17, 23, 3))
    p = _pil_save(a, tmp_path / "rgb.png")  # PIL writes RGB order
    out = read_image(p, "rgb")
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, a)
    assert out.flags["C_CONTIGUOUS"]


def test_gray_png_to_rgb_replicates_and_gray_keeps(tmp_path):
    g = _rand((9, 11))
    p = _pil_save(g, tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(p, "gray"), g)
    rgb = read_image(p, "rgb")
    assert rgb.shape == (9, 11, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], g)


def test_infrared_one_vs_three_identical_channels_give_same_gray(tmp_path):
    g = _rand((12, 15), seed=3)
    p1 = _pil_save(g, tmp_path / "ir1.png")
    p3 = _pil_save(np.dstack([g, g, g]), tmp_path / "ir3.png")
    np.testing.assert_array_equal(read_image(p1, "gray"), g)
    np.testing.assert_array_equal(read_image(p3, "gray"), g)


def test_gray_from_colour_uses_rounded_luminance(tmp_path):
    a = np.zeros((2, 2, 3), np.uint8)
    a[0, 0] = (10, 20, 30)  # 2.99 + 11.74 + 3.42 = 18.15 -> 18
    a[0, 1] = (255, 255, 255)  # 255
    a[1, 0] = (255, 0, 0)  # 76.245 -> 76
    a[1, 1] = (0, 0, 255)  # 29.07 -> 29
    p = _pil_save(a, tmp_path / "colour.png")
    np.testing.assert_array_equal(read_image(p, "gray"), [[18, 255], [76, 29]])
    big = _rand((40, 50, 3), seed=5)
    ref = np.floor(big[..., 0] * 0.299 + big[..., 1] * 0.587 + big[..., 2] * 0.114 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(to_gray(big), ref)


def test_palette_png_rgb_uses_palette_and_label_keeps_indices(tmp_path):
    idx = (np.arange(6 * 7).reshape(6, 7) % 5).astype(np.uint8)
    palette = [200, 10, 10, 10, 200, 10, 10, 10, 200, 7, 7, 7, 250, 250, 0]
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    p = _pil_save(im, tmp_path / "pal.png")
    assert Image.open(p).mode == "P"
    rgb = read_image(p, "rgb")
    pal = np.array(palette, np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(rgb, pal[idx])
    np.testing.assert_array_equal(read_image(p, "label"), idx)
    gray = read_image(p, "gray")
    np.testing.assert_array_equal(gray, to_gray(pal[idx]))


def test_sixteen_bit_png_scaled_by_shift(tmp_path):
    v = np.array([[0, 257, 0x1234], [0xFFFF, 0x00FF, 0x8000]], np.uint16)
    p = tmp_path / "16.png"
    cv2.imwrite(str(p), v)
    out = read_image(p, "gray")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 0x12], [0xFF, 0, 0x80]])
    # 16-bit labels are kept when they fit in 0..255, rejected otherwise
    lab = np.array([[0, 3], [8, 255]], np.uint16)
    pl = tmp_path / "lab16.png"
    cv2.imwrite(str(pl), lab)
    np.testing.assert_array_equal(read_image(pl, "label"), lab.astype(np.uint8))
    _expect_error(p, "16-bit label", mode="label")


def test_sixteen_bit_rgb_png(tmp_path):
    a = _rand((5, 6, 3), seed=8).astype(np.uint16) * 257
    p = tmp_path / "rgb16.png"
    cv2.imwrite(str(p), a[..., ::-1])  # OpenCV writes BGR
    np.testing.assert_array_equal(read_image(p, "rgb"), (a >> 8).astype(np.uint8))


def test_rgba_drops_alpha_without_compositing(tmp_path):
    a = _rand((8, 9, 4), seed=2)
    a[..., 3] = 0  # fully transparent: colours must still come back as stored
    p = _pil_save(a, tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(p, "rgb"), a[..., :3])
    np.testing.assert_array_equal(read_image(p, "any"), a)


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[:16] = (220, 30, 30)
    a[16:] = (30, 30, 220)
    p = _pil_save(Image.fromarray(a).convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert Image.open(p).mode == "CMYK"
    out = read_image(p, "rgb")
    np.testing.assert_array_equal(out, np.asarray(Image.open(p).convert("RGB")))
    assert np.abs(out.astype(int) - a).mean() < 3


def test_exif_orientation_6_jpeg_is_rotated(tmp_path):
    a = np.zeros((40, 60, 3), np.uint8)  # landscape, bright block top-left
    a[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _pil_save(a, tmp_path / "rot6.jpg", "JPEG", quality=95, exif=exif)
    out = read_image(p, "rgb")
    assert out.shape == (60, 40, 3)  # portrait after rotating 90° clockwise
    assert out[:10, -10:].mean() > 200 and out[-10:, :10].mean() < 40  # block now top-right
    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)))
    assert np.abs(out.astype(int) - ref).max() <= 2
    assert image_size(p) == (60, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations_match_pillow(tmp_path, orientation):
    a = _rand((5, 7, 3), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _pil_save(a, tmp_path / f"o{orientation}.png", exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(read_image(p, "rgb"), ref)


def test_label_mode(tmp_path):
    lab = (np.arange(30).reshape(5, 6) % 9).astype(np.uint8)
    np.testing.assert_array_equal(read_image(_pil_save(lab, tmp_path / "l.png"), "label"), lab)
    np.testing.assert_array_equal(read_image(_pil_save(np.dstack([lab] * 3), tmp_path / "l3.png"), "label"), lab)
    colour = np.dstack([lab, lab, (lab + 1) % 9])
    _expect_error(_pil_save(colour, tmp_path / "colour_label.png"), "different channels", mode="label")
    rgba = np.dstack([lab, lab, lab, np.full_like(lab, 128)])
    _expect_error(_pil_save(rgba, tmp_path / "alpha_label.png"), "alpha", mode="label")
    bits = _pil_save(Image.fromarray(lab > 4), tmp_path / "bits.png")
    np.testing.assert_array_equal(read_image(bits, "label"), (lab > 4).astype(np.uint8))
    np.testing.assert_array_equal(read_image(bits, "gray"), (lab > 4).astype(np.uint8) * 255)


# --- bad inputs --------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.png", "not found")
    d = tmp_path / "dir.png"
    d.mkdir()
    _expect_error(d, "directory")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    _expect_error(p, "empty")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "text.png"
    p.write_text("this is not an image\n")
    _expect_error(p, "not a recognised image")


def test_truncated_png(tmp_path):
    data = encode_png(_rand((64, 64, 3)))
    for cut, name in ((len(data) // 2, "half.png"), (len(data) - 12, "noiend.png")):
        p = tmp_path / name
        p.write_bytes(data[:cut])
        _expect_error(p, "truncated")


def test_truncated_jpeg(tmp_path):
    ok, buf = cv2.imencode(".jpg", _rand((64, 64, 3)))
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.tobytes()[: len(buf) * 2 // 3])
    _expect_error(p, "truncated")


def test_corrupt_png_body(tmp_path):
    data = bytearray(encode_png(_rand((50, 60, 3))))
    data[100:140] = bytes(40)
    p = tmp_path / "corrupt.png"
    p.write_bytes(bytes(data))
    _expect_error(p, "corrupt")


def test_zero_size_png(tmp_path):
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    p = tmp_path / "zero.png"
    p.write_bytes(png)
    _expect_error(p, "zero-size")


def test_max_pixels_and_bad_mode_and_float(tmp_path):
    p = _pil_save(_rand((10, 20, 3)), tmp_path / "big.png")
    assert read_image(p, max_pixels=200).shape == (10, 20, 3)
    _expect_error(p, "max_pixels=199", max_pixels=199)
    _expect_error(p, "unsupported read mode", mode="bgr")
    f = tmp_path / "float.tiff"
    cv2.imwrite(str(f), np.zeros((4, 5), np.float32))
    _expect_error(f, "float32", mode="gray")


# --- writing -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3), (7, 9, 4)])
def test_write_png_roundtrip(tmp_path, shape):
    a = _rand(shape, seed=11)
    p = tmp_path / "sub" / "out.png"
    write_png(p, a)
    assert [x.name for x in p.parent.iterdir()] == ["out.png"]  # no temp file left behind
    np.testing.assert_array_equal(read_image(p, "any"), a)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), a)  # channel order as Pillow sees it
    data = encode_png(a)
    np.testing.assert_array_equal(decode_png(data, "any"), a)
    assert data == p.read_bytes()


def test_write_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        write_png(tmp_path / "f.png", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="shape"):
        write_png(tmp_path / "c.png", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(DataError, match="zero-size"):
        encode_png(np.zeros((0, 4), np.uint8))
    assert not list(tmp_path.iterdir())
    with pytest.raises(ImageReadError, match="member.png"):
        decode_png(b"GIF89a...", name="member.png")


def test_decode_image_bytes_name_in_error():
    with pytest.raises(ImageReadError, match="shard-000001.tar:key.png"):
        decode_image(b"", "rgb", name="shard-000001.tar:key.png")


# --- the real developer samples ----------------------------------------------------


def test_real_msrs_pair():
    vi = need_shared("data", "msrs", "test", "vi", "00012N.png")
    ir = need_shared("data", "msrs", "test", "ir", "00012N.png")
    v = read_image(vi, "rgb")
    t = read_image(ir, "gray")
    assert v.shape == (480, 640, 3) and t.shape == (480, 640)
    np.testing.assert_array_equal(v, np.asarray(Image.open(vi).convert("RGB")))
    np.testing.assert_array_equal(t, np.asarray(Image.open(ir)))


def test_real_llvip_and_tno_three_identical_channel_infrared():
    llvip = need_shared("data", "llvip", "infrared", "test")
    tno = need_shared("data", "tno", "ir")
    for p in (sorted(llvip.glob("*.jpg"))[0], sorted(tno.glob("*.png"))[0]):
        t = read_image(p, "gray")
        ref = np.asarray(Image.open(p).convert("RGB"))
        assert t.ndim == 2 and t.shape == ref.shape[:2]
        assert np.abs(t.astype(int) - ref[..., 0]).max() <= 1  # JPEG decoders may differ by 1


def test_real_palette_pngs():
    folder = need_shared("data", "dspfusion_hybrid", "val")
    vi, ir = folder / "VI" / "00001D_Norm.png", folder / "IR" / "00001D_Norm.png"
    assert Image.open(vi).mode == "P" and Image.open(ir).mode == "P"
    np.testing.assert_array_equal(read_image(vi, "rgb"), np.asarray(Image.open(vi).convert("RGB")))
    t = read_image(ir, "gray")
    assert t.shape == (480, 640)
    np.testing.assert_array_equal(t, to_gray(np.asarray(Image.open(ir).convert("RGB"))))
