"""The shard folder format shared by the writer and the loader: member names, the progress
file, the parquet manifest and its schema, and the checks of a written split
(`list_shards`, `verify_shards`, `manifest_hash`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from magicfuse.errors import DataError
from magicfuse.io import sha256_file

PROGRESS_NAME = "progress.json"
MANIFEST_NAME = "manifest.parquet"
SHARD_PATTERN = "shard-%06d.tar"
PROGRESS_VERSION = 1
MEMBERS: tuple[str, ...] = ("clean", "degraded", "infrared", "label")
MEMBER_EXT = {"clean": "clean.png", "degraded": "degraded.png", "infrared": "infrared.png", "label": "label.png"}
IGNORE_LABEL = 255
UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("orig_key", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("has_label", pa.bool_()),
        ("has_infrared", pa.bool_()),
        ("recipe", pa.string()),
        ("degradations", pa.list_(pa.string())),
        ("shard", pa.string()),
        ("index_in_shard", pa.int32()),
    ]
)


def digest_int(*parts: Any) -> int:
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:16], "little")


def load_progress(split_dir: Path) -> dict[str, Any] | None:
    path = split_dir / PROGRESS_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable progress file ({exc}); delete it to rewrite the split") from None
    if not isinstance(data, dict) or data.get("version") != PROGRESS_VERSION or not isinstance(data.get("shards"), list):
        raise DataError(f"{path}: not a magicfuse shard progress file (version {PROGRESS_VERSION})")
    return data


def read_manifest(out_dir: str | Path) -> pa.Table:
    """The parquet manifest of a shard folder (one row per sample)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: shard manifest not found (run write_shards first)")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable parquet manifest ({exc})") from None


def manifest_hash(out_dir: str | Path | Sequence[str | Path]) -> str:
    """sha256 (hex) of the manifest file's bytes: identifies a shard set in checkpoints.

    For several shard folders (several sources), the sha256 of their hashes in order.
    """
    if isinstance(out_dir, (list, tuple)):
        if len(out_dir) == 1:
            return manifest_hash(out_dir[0])
        return hashlib.sha256("".join(manifest_hash(d) for d in out_dir).encode()).hexdigest()
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: shard manifest not found (run write_shards first)")
    return sha256_file(path)


def list_shards(shards_dir: str | Path | Sequence[str | Path], split: str) -> list[Path]:
    """The shard files of `split`, sorted; DataError if the folder or the shards are missing.

    `shards_dir` may be a list of shard folders (one per source): their shards are
    concatenated in the given order, and each folder must hold the split.
    """
    if isinstance(shards_dir, (list, tuple)):
        if not shards_dir:
            raise DataError("no shard folders given")
        return [p for d in shards_dir for p in list_shards(d, split)]
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise DataError(f"{shards_dir}: shards folder not found")
    split_dir = shards_dir / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in shards_dir.iterdir() if p.is_dir())
        raise DataError(f"{split_dir}: split {split!r} not found in {shards_dir} (splits there: {have})")
    shards = sorted(split_dir.glob("shard-*.tar"))
    if not shards:
        raise DataError(f"{split_dir}: no shard-*.tar files (empty split)")
    return shards


def verify_shards(shards_dir: str | Path, split: str) -> int:
    """Check every shard of `split` against the sha256 in its progress file; returns the sample count."""
    split_dir = Path(shards_dir) / split
    prog = load_progress(split_dir)
    if prog is None:
        raise DataError(f"{split_dir / PROGRESS_NAME}: progress file not found")
    if not prog.get("complete"):
        raise DataError(f"{split_dir}: split is incomplete (an interrupted write_shards); rerun it")
    n = 0
    for shard in prog["shards"]:
        path = split_dir / shard["name"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {PROGRESS_NAME} is missing")
        if sha256_file(path) != shard["sha256"]:
            raise DataError(f"{path}: sha256 differs from the one recorded when it was written (corrupt shard)")
        n += len(shard["rows"])
    return n
