"""`write_synthetic_dataset`: scenes written in the MSRS layout (vi/ir/Segmentation_labels),
idempotent (files rewritten only when their bytes change) with a `scenes.json` index."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from magicfuse.data.classes import MFNET_CLASSES, MSRS_BOX_TO_MFNET
from magicfuse.errors import ConfigError, DataError
from magicfuse.io import write_bytes_atomic, write_json_atomic
from magicfuse.data.synthetic.render import GENERATOR_VERSION, generate_scene, validate


def _split_offset(split: str) -> int:
    return (zlib.crc32(split.encode("utf-8")) + 1) << 32


def scene_key(split: str, index: int, time: str | None = None) -> str:
    suffix = "" if time is None else ("N" if time == "night" else "D")
    return f"syn_{split}_{index:06d}{suffix}"


def _encode_png(array: np.ndarray, path: Path) -> bytes:
    img = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - OpenCV failure
        raise DataError(f"{path}: OpenCV could not encode the PNG")
    return buf.tobytes()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file():
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
    write_bytes_atomic(path, data)
    return True


def label_boxes(label: np.ndarray) -> str:
    """YOLO box text (MSRS classes: 0 person, 1 bicycle, 2 car) of the label's person, bike
    and car regions: one box per 8-connected region, in the order person, bicycle, car and
    then top-to-bottom, left-to-right. Empty when the scene has none."""
    h, w = label.shape
    lines = []
    for cls, mfnet in sorted(MSRS_BOX_TO_MFNET.items()):
        n, _, stats, _ = cv2.connectedComponentsWithStats((label == mfnet).astype(np.uint8), connectivity=8)
        rows = sorted((int(st[1]), int(st[0]), int(st[2]), int(st[3])) for st in stats[1:n])
        for y, x, bw, bh in rows:
            lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
    return "".join(line + "\n" for line in lines)


def write_synthetic_dataset(out_dir: str | Path, *, seed: int, splits: Mapping[str, int],
                            height: int = 96, width: int = 128, progress: bool = True) -> dict[str, Any]:
    """Write synthetic scenes in the MSRS layout and `scenes.json`; return a summary.

    `out_dir/{split}/{vi,ir,Segmentation_labels}/{key}.png`; keys `syn_{split}_{i:06d}{D|N}`;
    `out_dir/boxes/{key}.txt`: YOLO boxes of the labelled people, bikes and cars
    (`label_boxes`; the msrs reader's `boxes_dir: boxes`).
    Split `name` draws scene indices `offset(name) + i`, so splits never share scenes.
    Files already present with identical bytes are left untouched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a directory")
    if not isinstance(splits, Mapping) or not splits:
        raise ConfigError(f"write_synthetic_dataset: splits must be a non-empty mapping, got {splits!r}")
    offsets: dict[int, str] = {}
    for name, n in splits.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"write_synthetic_dataset: bad split name {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"write_synthetic_dataset: split {name!r} count must be an integer >= 0, got {n!r}")
        off = _split_offset(name)
        if off in offsets:
            raise ConfigError(f"write_synthetic_dataset: splits {offsets[off]!r} and {name!r} collide")
        offsets[off] = name
    validate(seed, 0, height, width)

    total = sum(splits.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"synthetic {width}x{height}", unit="scene")
    scenes: dict[str, dict] = {}
    keys: dict[str, list[str]] = {}
    written = skipped = 0
    try:
        for name, n in splits.items():
            keys[name] = []
            for i in range(n):
                sc = generate_scene(seed, _split_offset(name) + i, height=height, width=width)
                key = scene_key(name, i, sc.meta["time"])
                meta = dict(sc.meta, split=name, key=key)
                payloads = []
                for sub, arr in (("vi", sc.visible), ("ir", sc.infrared), ("Segmentation_labels", sc.label)):
                    path = out / name / sub / f"{key}.png"
                    payloads.append((path, _encode_png(arr, path)))
                payloads.append((out / "boxes" / f"{key}.txt", label_boxes(sc.label).encode("ascii")))
                for path, data in payloads:
                    if _write_if_changed(path, data):
                        written += 1
                    else:
                        skipped += 1
                scenes[key] = meta
                keys[name].append(key)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    index = {
        "generator": "magicfuse.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "height": int(height),
        "width": int(width),
        "splits": {k: int(v) for k, v in splits.items()},
        "classes": list(MFNET_CLASSES),
        "scenes": scenes,
    }
    write_json_atomic(out / "scenes.json", index)
    return {"out_dir": str(out), "splits": dict(index["splits"]), "keys": keys,
            "files_written": written, "files_unchanged": skipped, "scenes_json": str(out / "scenes.json")}
