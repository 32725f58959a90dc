"""WebDataset shards with a parquet manifest, and the training data loader.

Writing
-------
`write_shards(samples, out_dir, split=..., ...)` turns dataset samples
(`magicfuse.data.readers.PairSample`) into WebDataset tar shards
``out_dir/{split}/shard-%06d.tar``. Every sample becomes the members

* ``{key}.clean.png``     clean visible image (RGB)
* ``{key}.degraded.png``  the clean image degraded with a per-sample RNG (RGB)
* ``{key}.infrared.png``  infrared (L), when the sample has one
* ``{key}.label.png``     label (L, MFNet ids, 255 = ignore), when present
* ``{key}.json``          source, split, original key and paths, size, the exact
  degradation recipe, has_label / has_infrared

One shard set serves both pair types of the paper: degraded->clean visible (IKR)
and degraded visible->infrared (CKG); the loader picks the members.

The writer is

* deterministic: the degradation RNG of a sample is derived from
  (seed, source, split, key), never from iteration order, and tar members carry
  fixed metadata, so the same inputs and seed give byte-identical shards;
* atomic: a shard is written to a temporary file and renamed when complete;
* resumable: ``{split}/progress.json`` (written atomically) lists the finished
  shards with their sha256 and manifest rows; a rerun keeps the verified shards and
  continues from the first unfinished one.

``out_dir/manifest.parquet`` indexes every sample of every split written there.

Reading
-------
`make_loader(shards_dir, split, batch_size=..., crop=..., ...)` returns a
`torch.utils.data.DataLoader` over a `ShardDataset` (a plain
`IterableDataset` reading the tars with `tarfile`, decoding PNGs with OpenCV).
Shards are split across distributed ranks and DataLoader workers (or samples,
when there are fewer shards than rank x worker slots), so that every sample is
seen exactly once per epoch; order and crops are deterministic in (seed, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magicfuse.config import from_mapping, to_dict
from magicfuse.data.degrade import DegradationConfig, degrade_with_config
from magicfuse.errors import ConfigError, DataError
from magicfuse.imageio import encode_png
from magicfuse.io import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic

__all__ = [
    "MEMBERS",
    "ShardConfig",
    "ShardWriteResult",
    "ShardDataset",
    "write_shards",
    "read_manifest",
    "manifest_hash",
    "list_shards",
    "verify_shards",
    "make_loader",
    "collate_samples",
    "sample_seed",
]

PROGRESS_NAME = "progress.json"
MANIFEST_NAME = "manifest.parquet"
SHARD_PATTERN = "shard-%06d.tar"
PROGRESS_VERSION = 1
MEMBERS: tuple[str, ...] = ("clean", "degraded", "infrared", "label")
_MEMBER_EXT = {"clean": "clean.png", "degraded": "degraded.png", "infrared": "infrared.png", "label": "label.png"}
_IGNORE = 255
_SAFE = re.compile(r"[^A-Za-z0-9_-]")

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


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """Settings of the shard writer (params.yaml section `shards`); `degradation` is
    the nested `magicfuse.data.degrade.DegradationConfig`."""

    samples_per_shard: int = 256
    seed: int = 0
    max_samples: int | None = None
    png_compression: int = 1  # zlib level of the PNG members: 1 is ~as small as 3 and faster to write
    degradation: DegradationConfig = dataclasses.field(default_factory=DegradationConfig)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"ShardConfig.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"ShardConfig.max_samples must be >= 1 or null, got {self.max_samples}")
        if not 0 <= self.png_compression <= 9:
            raise ConfigError(f"ShardConfig.png_compression must be in 0..9, got {self.png_compression}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "ShardConfig":
        return from_mapping(cls, mapping)


@dataclasses.dataclass(frozen=True)
class ShardWriteResult:
    out_dir: Path
    split: str
    shards: tuple[Path, ...]
    num_samples: int
    kept_shards: int  # shards found complete and verified from an earlier run
    written_shards: int
    manifest: Path
    seconds: float


# --------------------------------------------------------------------------- helpers


def _encode_png(array: np.ndarray, name: str, level: int) -> bytes:
    return encode_png(array, compression=level, name=name)


def _decode_png(data: bytes, color: bool, where: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise DataError(f"{where}: member is not a decodable PNG")
    if color:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _digest_int(*parts: Any) -> int:
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:16], "little")


def sample_seed(seed: int, source: str, split: str, key: str) -> int:
    """The 128-bit seed of a sample's degradation RNG (independent of iteration order)."""
    return _digest_int("degrade", seed, source, split, key)


def _safe_key(source: str, key: str) -> str:
    # WebDataset splits member names at the first dot of the basename: keys must
    # have neither dots nor slashes.
    return f"{_SAFE.sub('_', source)}-{_SAFE.sub('_', str(key))}"




def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable).encode("utf-8")


def _rel(path: Any, root: Path | None) -> str | None:
    if path is None:
        return None
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def _sample_paths(sample: Any, root: Path | None) -> dict[str, str | None]:
    """Original file paths of a sample, relative to the reader's root when under it
    (so that shards do not depend on where the data set lives)."""
    paths = getattr(sample, "paths", None)
    if not paths:
        return {}
    if isinstance(paths, Mapping):
        return {str(k): _rel(v, root) for k, v in paths.items()}
    return {"path": _rel(paths, root)}


def _check_sample(sample: Any, where: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    vis = np.asarray(sample.visible)
    if vis.dtype != np.uint8 or vis.ndim != 3 or vis.shape[2] != 3:
        raise DataError(f"{where}: visible image must be uint8 HxWx3, got {vis.dtype} {vis.shape}")
    h, w = vis.shape[:2]
    ir = getattr(sample, "infrared", None)
    lab = getattr(sample, "label", None)
    out = [vis]
    for name, arr in (("infrared", ir), ("label", lab)):
        if arr is None:
            out.append(None)
            continue
        arr = np.asarray(arr)
        if arr.dtype != np.uint8 or arr.ndim != 2:
            raise DataError(f"{where}: {name} must be uint8 HxW, got {arr.dtype} {arr.shape}")
        if arr.shape != (h, w):
            raise DataError(f"{where}: {name} is {arr.shape[0]}x{arr.shape[1]} but visible is {h}x{w}")
        out.append(arr)
    return out[0], out[1], out[2]


def _degrade(image: np.ndarray, rng: np.random.Generator, degradation_cfg: DegradationConfig
             ) -> tuple[np.ndarray, list]:
    degraded, recipe = degrade_with_config(image, rng, degradation_cfg)
    degraded = np.asarray(degraded)
    if degraded.dtype != np.uint8 or degraded.shape != image.shape:
        raise DataError(f"degradation returned {degraded.dtype} {degraded.shape} for a {image.shape} image")
    return degraded, list(recipe)


def _resolve_degradation_cfg(cfg: ShardConfig, degradation_cfg: Any) -> DegradationConfig:
    if degradation_cfg is None:
        return cfg.degradation
    if isinstance(degradation_cfg, Mapping):
        return from_mapping(DegradationConfig, degradation_cfg, "degradation")
    if not isinstance(degradation_cfg, DegradationConfig):
        raise ConfigError(f"degradation_cfg must be a DegradationConfig or a mapping, got {degradation_cfg!r}")
    return degradation_cfg


def _encode_sample(sample: Any, split: str, source_name: str | None, seed: int,
                   degradation_cfg: DegradationConfig, root: Path | None, level: int
                   ) -> tuple[str, list[tuple[str, bytes]], dict[str, Any]]:
    source = str(source_name or getattr(sample, "source", None) or "unknown")
    orig_key = str(sample.key)
    where = f"sample {orig_key!r} of {source}/{split}"
    raw_paths = getattr(sample, "paths", None)
    if raw_paths and isinstance(raw_paths, Mapping):
        where += f" ({', '.join(f'{k}={v}' for k, v in sorted(raw_paths.items()) if v)})"
    paths = _sample_paths(sample, root)
    vis, ir, lab = _check_sample(sample, where)
    key = _safe_key(source, orig_key)
    rng = np.random.default_rng(sample_seed(seed, source, split, orig_key))
    degraded, recipe = _degrade(vis, rng, degradation_cfg)
    h, w = vis.shape[:2]
    record = {
        "key": key,
        "orig_key": orig_key,
        "source": source,
        "split": split,
        "sample_split": getattr(sample, "split", None),
        "paths": paths,
        "height": h,
        "width": w,
        "recipe": recipe,
        "has_label": lab is not None,
        "has_infrared": ir is not None,
        "seed": seed,
    }
    boxes = getattr(sample, "boxes", None)
    if boxes is not None:
        record["boxes"] = boxes
    members = [("clean.png", _encode_png(vis, where, level)), ("degraded.png", _encode_png(degraded, where, level))]
    if ir is not None:
        members.append(("infrared.png", _encode_png(ir, where, level)))
    if lab is not None:
        members.append(("label.png", _encode_png(lab, where, level)))
    members.append(("json", _json_bytes(record)))
    row = {
        "key": key,
        "orig_key": orig_key,
        "source": source,
        "split": split,
        "height": h,
        "width": w,
        "has_label": lab is not None,
        "has_infrared": ir is not None,
        "recipe": json.dumps(recipe, sort_keys=True, default=_jsonable),
        "degradations": [str(step.get("name", "?")) if isinstance(step, Mapping) else str(step) for step in recipe],
    }
    return key, members, row


def _load_progress(split_dir: Path) -> dict[str, Any] | None:
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


def _cleanup_split(split_dir: Path, keep: set[str]) -> None:
    for p in split_dir.iterdir():
        if p.name.endswith(".tmp") or (p.name.startswith("shard-") and p.name.endswith(".tar") and p.name not in keep):
            p.unlink()


def _is_reader(samples: Any) -> bool:
    return all(hasattr(samples, a) for a in ("keys", "kind", "__getitem__", "__len__"))


def _remaining(samples: Any, done: list[str], source_name: str | None, progress_path: Path) -> Iterator[Any]:
    """Iterator over the samples after the `done` keys, checking that they come first.

    A Reader is skipped through by key, without reading pixels; other iterables are
    consumed sample by sample.
    """
    def mismatch(want: str, got: str) -> DataError:
        return DataError(
            f"{progress_path}: the input changed since the interrupted run (sample {want!r} expected, "
            f"got {got!r}); pass overwrite=True"
        )

    def short() -> DataError:
        return DataError(f"{progress_path}: the input has fewer samples than the shards already written; "
                         "pass overwrite=True")

    if _is_reader(samples):
        source = str(source_name or samples.kind or "unknown")
        keys = [_safe_key(source, str(k)) for k in samples.keys()]
        if len(keys) < len(done):
            raise short()
        for want, got in zip(done, keys):
            if want != got:
                raise mismatch(want, got)
        return (samples[i] for i in range(len(done), len(keys)))
    it = iter(samples)
    for want in done:
        try:
            sample = next(it)
        except StopIteration:
            raise short() from None
        got = _safe_key(str(source_name or getattr(sample, "source", None) or "unknown"), str(sample.key))
        if got != want:
            raise mismatch(want, got)
    return it


def _write_manifest(out_dir: Path) -> Path:
    rows: list[dict[str, Any]] = []
    for split_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        prog = _load_progress(split_dir)
        if prog is None:
            continue
        for shard in prog["shards"]:
            rel = f"{split_dir.name}/{shard['name']}"
            for i, row in enumerate(shard["rows"]):
                rows.append({**row, "shard": rel, "index_in_shard": i})
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = out_dir / MANIFEST_NAME
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path


# --------------------------------------------------------------------------- writer


def write_shards(
    samples: Iterable[Any],
    out_dir: str | Path,
    *,
    split: str,
    source_name: str | None = None,
    cfg: ShardConfig | Mapping[str, Any] | None = None,
    degradation_cfg: Any = None,
    overwrite: bool = False,
    paths_root: str | Path | None = None,
    progress: bool = True,
) -> ShardWriteResult:
    """Write `samples` (PairSamples, e.g. a Reader) as shards of `split` under `out_dir`.

    `source_name` overrides each sample's `source`. `degradation_cfg` (a
    `DegradationConfig` or a mapping) overrides `cfg.degradation`. With
    `overwrite=True` the split's earlier shards are discarded instead of resumed.
    Original file paths go into each sample's JSON relative to `paths_root`
    (default: the reader's `root`, when `samples` has one).
    The input must yield the same samples in the same order on a resumed run (the
    keys are checked). Returns a `ShardWriteResult`; rewrites `out_dir/manifest.parquet`.
    """
    t0 = time.perf_counter()
    if cfg is None:
        cfg = ShardConfig()
    elif isinstance(cfg, Mapping):
        cfg = from_mapping(ShardConfig, cfg, "shards")
    if not split or _SAFE.sub("_", split) != split:
        raise DataError(f"split name {split!r} must be non-empty and use only letters, digits, '_' and '-'")
    deg_cfg = _resolve_degradation_cfg(cfg, degradation_cfg)
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    progress_path = split_dir / PROGRESS_NAME
    fingerprint = {
        "samples_per_shard": cfg.samples_per_shard,
        "seed": cfg.seed,
        "max_samples": cfg.max_samples,
        "png_compression": cfg.png_compression,
        "degradation": to_dict(deg_cfg),
        "source_name": source_name,
        "split": split,
    }
    fingerprint = json.loads(_json_bytes(fingerprint))

    prog = None if overwrite else _load_progress(split_dir)
    kept: list[dict[str, Any]] = []
    if prog is not None:
        if prog.get("fingerprint") != fingerprint:
            raise DataError(
                f"{progress_path}: shards there were written with other settings "
                f"({prog.get('fingerprint')} != {fingerprint}); pass overwrite=True or delete {split_dir}"
            )
        for shard in prog["shards"]:
            path = split_dir / shard["name"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                break
            kept.append(shard)
        if prog.get("complete") and len(kept) == len(prog["shards"]):
            manifest = _write_manifest(out_dir)
            return ShardWriteResult(out_dir, split, tuple(split_dir / s["name"] for s in kept),
                                    sum(len(s["rows"]) for s in kept), len(kept), 0, manifest,
                                    time.perf_counter() - t0)
    _cleanup_split(split_dir, {s["name"] for s in kept})

    state = {"version": PROGRESS_VERSION, "fingerprint": fingerprint, "complete": False, "shards": list(kept)}
    write_json_atomic(progress_path, state)

    done = [row["key"] for shard in kept for row in shard["rows"]]
    it = _remaining(samples, done, source_name, progress_path)
    seen: set[str] = set(done)
    root_attr = paths_root if paths_root is not None else getattr(samples, "root", None)
    root = Path(root_attr).resolve() if root_attr is not None else None

    total = len(seen)
    written = 0
    shard_index = len(kept)
    rows: list[dict[str, Any]] = []
    # The open shard: members stream into a temporary file (no shard is held in memory)
    # that atomic_path renames onto the shard name when the ExitStack closes cleanly.
    stack: contextlib.ExitStack | None = None
    tar: tarfile.TarFile | None = None

    def open_shard() -> None:
        nonlocal stack, tar
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(split_dir / (SHARD_PATTERN % shard_index)))
        tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT))

    def close_shard() -> None:
        nonlocal stack, tar, shard_index, written
        assert stack is not None
        stack.close()
        stack = tar = None
        name = SHARD_PATTERN % shard_index
        state["shards"].append({"name": name, "sha256": sha256_file(split_dir / name), "rows": list(rows)})
        write_json_atomic(progress_path, state)
        shard_index += 1
        written += 1
        rows.clear()
        if progress:
            print(f"[shards] {split}: {name} written ({total} samples so far)", file=sys.stderr, flush=True)

    end = object()
    try:
        while cfg.max_samples is None or total < cfg.max_samples:
            sample = next(it, end)
            if sample is end:
                break
            key, members, row = _encode_sample(sample, split, source_name, cfg.seed, deg_cfg, root,
                                               cfg.png_compression)
            if key in seen:
                raise DataError(f"duplicate sample key {key!r} in split {split!r} (source key {sample.key!r})")
            seen.add(key)
            if tar is None:
                open_shard()
            for ext, data in members:
                _tar_add(tar, f"{key}.{ext}", data)
            rows.append(row)
            total += 1
            if len(rows) == cfg.samples_per_shard:
                close_shard()
        if rows:
            close_shard()
    except BaseException:
        if stack is not None:  # drop the half-written shard's temporary file
            stack.__exit__(*sys.exc_info())
        raise
    if total == 0:
        raise DataError(f"no samples to write for split {split!r} into {split_dir}")
    state["complete"] = True
    state["num_samples"] = total
    write_json_atomic(progress_path, state)
    manifest = _write_manifest(out_dir)
    return ShardWriteResult(out_dir, split, tuple(split_dir / s["name"] for s in state["shards"]), total,
                            len(kept), written, manifest, time.perf_counter() - t0)


# --------------------------------------------------------------------------- manifest


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
    prog = _load_progress(split_dir)
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


# --------------------------------------------------------------------------- loader


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive members of one WebDataset tar."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    raise DataError(f"{path}: member {info.name!r} has no extension (not a WebDataset shard)")
                prefix = info.name[: len(info.name) - len(base)]
                k, ext = base.split(".", 1)
                k = prefix + k
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise DataError(f"{path}: member {info.name!r} is truncated")
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path}: corrupt or truncated tar shard ({exc})") from None
    if key is not None:
        yield key, group


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(_digest_int(*parts))


class ShardDataset(IterableDataset):
    """Iterable over the samples of a split; splits work across ranks and workers.

    Yields dicts of uint8 numpy arrays (`clean`/`degraded` HxWx3, `infrared`
    HxW, `label` HxW) and `key`; `collate_samples` turns them into float tensors.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        *,
        crop: tuple[int, int] | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        members: Sequence[str] = MEMBERS,
        shuffle_buffer: int = 64,
        skip_missing: bool = False,
        with_meta: bool = False,
    ) -> None:
        super().__init__()
        self.shards = list_shards(shards_dir, split)
        bad = [m for m in members if m not in MEMBERS]
        if bad or not members:
            raise DataError(f"members {list(members)}: each must be one of {list(MEMBERS)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} / world_size {world_size} is not a valid process grid")
        if crop is not None:
            crop = (int(crop[0]), int(crop[1]))
            if crop[0] < 1 or crop[1] < 1:
                raise DataError(f"crop {crop} must be positive (height, width)")
        self.split = split
        self.crop = crop
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.members = tuple(members)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.skip_missing = bool(skip_missing)
        self.with_meta = bool(with_meta)  # also decode the {key}.json record into out["meta"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # which (shard, sample filter) this worker reads
    def _plan(self, worker: int, num_workers: int) -> tuple[list[Path], int, int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(_rng("shards", self.seed, self.epoch).permutation(len(order)))
        shards = [self.shards[i] for i in order]
        slots = self.world_size * num_workers
        if len(shards) >= slots:
            mine = shards[self.rank :: self.world_size][worker::num_workers]
            return mine, 1, 0
        # fewer shards than slots: every slot reads all shards and keeps every slots-th sample
        return shards, slots, self.rank * num_workers + worker

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[str, dict[str, bytes], Path]]:
        shards, stride, offset = self._plan(worker, num_workers)
        i = 0
        for path in shards:
            for key, group in _iter_tar(path):
                if i % stride == offset:
                    yield key, group, path
                i += 1

    def _decode(self, key: str, group: dict[str, bytes], path: Path) -> dict[str, Any] | None:
        out: dict[str, Any] = {"key": key}
        where = f"{path}: sample {key!r}"
        for m in self.members:
            ext = _MEMBER_EXT[m]
            if ext not in group:
                if m == "label":
                    out[m] = None
                    continue
                if self.skip_missing:
                    return None
                raise DataError(f"{where} has no {ext} member (drop {m!r} from members, or skip_missing=True)")
            out[m] = _decode_png(group[ext], m in ("clean", "degraded"), f"{where} {ext}")
        if self.with_meta:
            if "json" not in group:
                raise DataError(f"{where} has no json member")
            try:
                out["meta"] = json.loads(group["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{where}: json member is not valid JSON ({exc})") from None
        shapes = {m: out[m].shape[:2] for m in self.members if out[m] is not None}
        if len(set(shapes.values())) > 1:
            raise DataError(f"{where}: members differ in size {shapes}")
        h, w = next(iter(shapes.values()))
        if "label" in self.members and out["label"] is None:
            out["label"] = np.full((h, w), _IGNORE, np.uint8)
        if self.crop is not None:
            ch, cw = self.crop
            if h < ch or w < cw:
                raise DataError(f"{where} is {h}x{w}, smaller than the crop {ch}x{cw}")
            rng = _rng("crop", self.seed, self.epoch, key)
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            for m in self.members:
                out[m] = np.ascontiguousarray(out[m][top : top + ch, left : left + cw])
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        raw = self._raw(worker, num_workers)
        if not self.shuffle:
            for key, group, path in raw:
                s = self._decode(key, group, path)
                if s is not None:
                    yield s
            return
        rng = _rng("buffer", self.seed, self.epoch, self.rank, worker)
        buf: list[tuple[str, dict[str, bytes], Path]] = []
        for item in raw:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                s = self._decode(*buf.pop())
                if s is not None:
                    yield s
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            s = self._decode(*buf.pop())
            if s is not None:
                yield s


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples: images float32 [0,1] (B,C,H,W), label int64 (B,H,W), key list."""
    out: dict[str, Any] = {"key": [s["key"] for s in batch]}
    for m in MEMBERS:
        if m not in batch[0]:
            continue
        shapes = {s["key"]: s[m].shape[:2] for s in batch}
        if len(set(shapes.values())) > 1:
            raise DataError(
                f"samples of one batch differ in size ({shapes}); pass crop=(h, w) to make_loader"
            )
        arr = np.stack([s[m] for s in batch])
        if m == "label":
            out[m] = torch.from_numpy(arr).long()
            continue
        # channel-first on the uint8 array (4x fewer bytes to move), then one float pass
        arr = arr[:, None] if m == "infrared" else np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
        out[m] = torch.from_numpy(arr).float().div_(255.0)
    return out


def make_loader(
    shards_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    crop: tuple[int, int] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    members: Sequence[str] = MEMBERS,
    drop_last: bool = False,
    shuffle_buffer: int = 64,
    skip_missing: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over a shard split yielding {"clean","degraded","infrared","label","key"} batches.

    Every sample is seen exactly once per epoch across all ranks and workers (ranks
    may get unequal counts). Order and crops depend only on (seed, epoch); call
    `loader.dataset.set_epoch(e)` (workers are not persistent) or build a new loader
    for the next epoch.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    ds = ShardDataset(
        shards_dir, split, crop=crop, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
        shuffle=shuffle, members=members, shuffle_buffer=shuffle_buffer, skip_missing=skip_missing,
    )
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
