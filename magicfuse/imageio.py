"""Robust image reading and PNG writing.

Every reader in the library goes through :func:`read_image`. It returns exactly one
of a few well-defined array kinds, or raises :class:`~magicfuse.errors.ImageReadError`
with a one-line message that names the file and the problem. It never returns
silently wrong data.

Modes
-----
``"rgb"``   uint8 ``H×W×3`` RGB. Grey images are replicated to three channels, an
            alpha channel is dropped (not composited: the colour values are kept as
            stored), palette images are expanded through their palette, CMYK JPEGs are
            converted to RGB (by Pillow).
``"gray"``  uint8 ``H×W`` (infrared). One channel is returned as is; three identical
            channels (the way many data sets store infrared) give that channel; three
            different channels give the luminance ``round(0.299 R + 0.587 G + 0.114 B)``
            (exact rounding, ties up). Alpha is dropped first.
``"label"`` uint8 ``H×W`` class ids, kept as stored: a palette PNG gives its **indices**
            (not the palette colours), a 1-bit PNG gives 0/1, a 3-channel label with
            identical channels gives one of them. A colour-coded label (different
            channels) is rejected: convert it to ids first.
``"any"``   uint8 as stored: ``H×W``, ``H×W×3`` RGB or ``H×W×4`` RGBA (the MFNet
            reader uses it for its RGB+T PNGs).

Common rules
------------
* EXIF orientation (JPEG, WebP, TIFF, PNG ``eXIf``) is applied, as a viewer would.
  Invalid orientation values are ignored.
* 16-bit images are brought to 8 bits by ``value >> 8`` (full-range 16-bit assumed:
  65535 -> 255). Data that use a narrower range, such as raw 14-bit thermal frames,
  come out dark; normalise such files yourself before use. In ``"label"`` mode
  16-bit labels are kept when every value fits in 0..255, else rejected.
* Float and 32-bit integer images are rejected.
* Truncation is checked explicitly (a PNG must contain its ``IEND`` chunk, a JPEG its
  end-of-image marker after the last scan), because some decoders fill the missing
  part with grey instead of failing.

OpenCV decodes whatever it decodes correctly (plain 8/16-bit grey, RGB, RGBA); Pillow
handles the header, palette, CMYK and the cases OpenCV does not know.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from magicfuse.errors import DataError, ImageReadError
from magicfuse.io import write_bytes_atomic

Mode = Literal["rgb", "gray", "label", "any"]
MODES: tuple[str, ...] = ("rgb", "gray", "label", "any")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_EXIF_ORIENTATION = 0x0112
_PIL_ONLY_MODES = {"P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}

__all__ = [
    "IMAGE_EXTENSIONS",
    "MODES",
    "read_image",
    "decode_image",
    "decode_png",
    "encode_png",
    "write_png",
    "image_size",
    "apply_orientation",
    "to_gray",
]


def _fail(name: str, problem: str) -> ImageReadError:
    problem = " ".join(str(problem).split())  # one line
    return ImageReadError(f"{name}: {problem}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(str(path), "file not found") from None
    except IsADirectoryError:
        raise _fail(str(path), "is a directory, not an image file") from None
    except PermissionError:
        raise _fail(str(path), "permission denied") from None
    except OSError as exc:
        raise _fail(str(path), f"cannot read file: {exc.strerror or exc}") from None


def read_image(path: str | Path, mode: Mode = "rgb", *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 in the given mode (see the module docstring).

    ``max_pixels`` bounds ``width × height`` (checked on the header, before decoding).
    Raises :class:`ImageReadError` naming the file on every failure.
    """
    if mode not in MODES:
        raise _fail(str(path), f"unsupported read mode {mode!r}; use one of {list(MODES)}")
    path = Path(path)
    return decode_image(_read_bytes(path), mode, name=str(path), max_pixels=max_pixels)


def decode_png(data: bytes, mode: Mode = "rgb", *, name: str = "<png bytes>") -> np.ndarray:
    """Decode PNG bytes (e.g. a shard member) with the rules of :func:`read_image`."""
    if not data.startswith(_PNG_SIGNATURE):
        raise _fail(name, "not PNG data (missing PNG signature)")
    return decode_image(data, mode, name=name)


def decode_image(
    data: bytes, mode: Mode = "rgb", *, name: str = "<bytes>", max_pixels: int | None = None
) -> np.ndarray:
    """Decode encoded image bytes with the rules of :func:`read_image`."""
    if mode not in MODES:
        raise _fail(name, f"unsupported read mode {mode!r}; use one of {list(MODES)}")
    if len(data) == 0:
        raise _fail(name, "empty file (0 bytes)")
    im, width, height, fmt, orientation = _open_header(data, name, max_pixels)
    _check_complete(data, fmt, name)

    arr: np.ndarray | None = None
    pil_mode = im.mode
    use_pil = pil_mode in _PIL_ONLY_MODES or (mode == "label" and pil_mode == "1")
    if not use_pil:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None:
            if arr.shape[:2] != (height, width):
                # OpenCV decoded something other than the header describes (e.g. a
                # multi-frame file); trust Pillow instead.
                arr = None
            else:
                arr = _from_cv(arr, name)
    if arr is None:
        arr = _decode_pil(im, mode, name)

    arr = apply_orientation(arr, orientation)
    arr = _to_uint8(arr, mode, name)
    return np.ascontiguousarray(_convert(arr, mode, name))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image as :func:`read_image` would return it (EXIF
    orientation applied), read from the header only."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except FileNotFoundError:
        raise _fail(str(path), "file not found") from None
    except OSError as exc:
        raise _fail(str(path), f"cannot read file: {exc.strerror or exc}") from None
    if not head:
        raise _fail(str(path), "empty file (0 bytes)")
    # The EXIF block sits in the first 64 KiB of a JPEG; for other formats read it all.
    data = head if head[:2] == b"\xff\xd8" else _read_bytes(path)
    _, width, height, _, orientation = _open_header(data, str(path), None)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


# --- decoding helpers ---------------------------------------------------------------


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _open_header(data: bytes, name: str, max_pixels: int | None):
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        if w == 0 or h == 0:
            raise _fail(name, f"zero-size image ({w}×{h})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_PNG_SIGNATURE):
            raise _fail(name, "corrupt PNG (signature present but the header cannot be read)") from None
        if data.startswith(b"\xff\xd8"):
            raise _fail(name, "corrupt JPEG (start marker present but the header cannot be read)") from None
        raise _fail(name, f"not a recognised image format (starts with {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise _fail(name, f"image too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise _fail(name, f"corrupt image header: {exc}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise _fail(name, f"zero-size image ({width}×{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise _fail(name, f"image is {width}×{height} = {width * height} pixels, more than max_pixels={max_pixels}")
    fmt = im.format or ""
    orientation = 1
    try:
        if fmt in ("JPEG", "MPO", "WEBP", "TIFF") or (fmt == "PNG" and b"eXIf" in data):
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not break the pixels
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    return im, width, height, fmt, orientation


def _check_complete(data: bytes, fmt: str, name: str) -> None:
    if fmt == "PNG":
        if data.rfind(b"IEND") < 0:
            raise _fail(name, "truncated PNG (no IEND chunk)")
    elif fmt in ("JPEG", "MPO"):
        sos = data.rfind(b"\xff\xda")
        eoi = data.rfind(b"\xff\xd9")
        if sos < 0:
            raise _fail(name, "corrupt JPEG (no image scan)")
        if eoi < sos:
            raise _fail(name, "truncated JPEG (no end-of-image marker after the last scan)")


def _from_cv(arr: np.ndarray, name: str) -> np.ndarray:
    """OpenCV's BGR/BGRA channel order -> RGB/RGBA."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    raise _fail(name, f"unsupported channel layout {arr.shape}")


def _decode_pil(im: Image.Image, mode: str, name: str) -> np.ndarray:
    try:
        im.load()
        pil_mode = im.mode
        if pil_mode in ("P", "PA"):
            if mode == "label":
                arr = np.asarray(im)
                return arr[..., 0] if arr.ndim == 3 else arr  # PA: indices + alpha
            has_alpha = pil_mode == "PA" or "transparency" in im.info
            return np.asarray(im.convert("RGBA" if (has_alpha and mode == "any") else "RGB"))
        if pil_mode == "1":
            arr = np.asarray(im).astype(np.uint8)
            return arr if mode == "label" else arr * np.uint8(255)
        if pil_mode in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
            arr = np.asarray(im)
            if pil_mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            if pil_mode == "LA":
                arr = np.dstack([arr[..., 0]] * 3 + [arr[..., 1]])
            return arr
        if pil_mode in ("I", "F"):
            return np.asarray(im)  # rejected by _to_uint8 with a clear message
        return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(name, f"corrupt or truncated image data: {exc}") from None


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an ``H×W[×C]`` array, as a viewer shows it."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _to_uint8(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.uint16:
        if mode == "label":
            if int(arr.max(initial=0)) > 255:
                raise _fail(name, f"16-bit label with values up to {int(arr.max())}; class ids must fit in 0..255")
            return arr.astype(np.uint8)
        return (arr >> 8).astype(np.uint8)
    raise _fail(name, f"unsupported sample type {arr.dtype} (only 8- and 16-bit images are read)")


def to_gray(arr: np.ndarray) -> np.ndarray:
    """uint8 RGB(A) or grey -> uint8 grey: identical channels give that channel, else
    the luminance ``round(0.299 R + 0.587 G + 0.114 B)`` (exact integer rounding)."""
    if arr.ndim == 2:
        return arr
    rgb = arr[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return r
    y = r.astype(np.uint32) * 299 + g.astype(np.uint32) * 587 + b.astype(np.uint32) * 114
    return ((y + 500) // 1000).astype(np.uint8)


def _convert(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if arr.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise _fail(name, f"unsupported channel layout {arr.shape}")
    if arr.ndim == 3 and channels == 1:
        arr = arr[..., 0]
    if mode == "any":
        return arr
    if mode == "rgb":
        if arr.ndim == 2:
            return np.repeat(arr[..., None], 3, axis=2)
        return arr[..., :3]
    if mode == "gray":
        return to_gray(arr)
    # label
    if arr.ndim == 2:
        return arr
    if channels == 4 and not bool((arr[..., 3] == 255).all()):
        raise _fail(name, "label image has a non-opaque alpha channel; store class ids in a 1-channel PNG")
    c0 = arr[..., 0]
    if np.array_equal(c0, arr[..., 1]) and np.array_equal(c0, arr[..., 2]):
        return c0
    raise _fail(
        name,
        f"label image has {channels} different channels (a colour-coded label?); "
        "labels must hold class ids in one channel (or a palette PNG)",
    )


# --- writing ------------------------------------------------------------------------


def _check_writable(array: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise DataError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise DataError(f"{name}: PNG arrays must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise DataError(f"{name}: expected H×W, H×W×3 (RGB) or H×W×4 (RGBA), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: cannot write a zero-size image {array.shape}")
    return array


def encode_png(array: np.ndarray, *, compression: int = 3, name: str = "<array>") -> bytes:
    """uint8 ``H×W`` / ``H×W×3`` RGB / ``H×W×4`` RGBA -> PNG bytes (OpenCV encoder)."""
    array = _check_writable(array, name)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise DataError(f"{name}: PNG encoding failed for an array of shape {array.shape}")
    return buf.tobytes()


def write_png(path: str | Path, array: np.ndarray, *, compression: int = 3) -> None:
    """Write a uint8 ``H×W`` / RGB / RGBA array as PNG, atomically."""
    write_bytes_atomic(path, encode_png(array, compression=compression, name=str(path)))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B,C,H,W) in [0,1] -> uint8 numpy (B,H,W,C), rounded (the authors' code
    truncates; METRICS.md); C = 1 gives (B,H,W)."""
    arr = (x.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr
