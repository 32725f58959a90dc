"""Writing shards: deterministic, atomic, resumable (see `magicfuse.data.shards`)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magicfuse.config import from_mapping, to_dict
from magicfuse.data.degrade import DegradationConfig, degrade_with_config
from magicfuse.data.shards.format import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    PROGRESS_NAME,
    PROGRESS_VERSION,
    SHARD_PATTERN,
    UNSAFE_KEY_CHARS,
    digest_int,
    load_progress,
)
from magicfuse.errors import ConfigError, DataError
from magicfuse.imageio import encode_png
from magicfuse.io import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic


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


def _encode_png(array: np.ndarray, name: str, level: int) -> bytes:
    return encode_png(array, compression=level, name=name)


def sample_seed(seed: int, source: str, split: str, key: str) -> int:
    """The 128-bit seed of a sample's degradation RNG (independent of iteration order)."""
    return digest_int("degrade", seed, source, split, key)


def _safe_key(source: str, key: str) -> str:
    # WebDataset splits member names at the first dot of the basename: keys must
    # have neither dots nor slashes.
    return f"{UNSAFE_KEY_CHARS.sub('_', source)}-{UNSAFE_KEY_CHARS.sub('_', str(key))}"




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
        prog = load_progress(split_dir)
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
    if not split or UNSAFE_KEY_CHARS.sub("_", split) != split:
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

    prog = None if overwrite else load_progress(split_dir)
    signature = samples.signature() if hasattr(samples, "signature") else None
    if (prog is not None and prog.get("complete") and signature is not None
            and prog.get("input") not in (None, signature)):
        if progress:
            print(f"[shards] {split}: the input changed since these shards were finished; writing them again",
                  file=sys.stderr, flush=True)
        prog = None  # a finished split of other input: start over (an interrupted one must match, below)
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
    if signature is not None:
        state["input"] = signature
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
