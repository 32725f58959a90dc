"""Reading shards for training: `ShardDataset` and `make_loader` (see `magicfuse.data.shards`)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from magicfuse.data.shards.format import IGNORE_LABEL, MEMBER_EXT, MEMBERS, digest_int, list_shards
from magicfuse.errors import DataError


def decode_member(data: bytes, color: bool, where: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise DataError(f"{where}: member is not a decodable PNG")
    if color:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


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
    return np.random.default_rng(digest_int(*parts))


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
            ext = MEMBER_EXT[m]
            if ext not in group:
                if m == "label":
                    out[m] = None
                    continue
                if self.skip_missing:
                    return None
                raise DataError(f"{where} has no {ext} member (drop {m!r} from members, or skip_missing=True)")
            out[m] = decode_member(group[ext], m in ("clean", "degraded"), f"{where} {ext}")
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
            out["label"] = np.full((h, w), IGNORE_LABEL, np.uint8)
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
