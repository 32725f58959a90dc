"""The evaluated images: one split of the shards decoded to uint8 arrays (`load_eval_set`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from magicfuse.data.classes import IGNORE_INDEX
from magicfuse.data.shards import ShardDataset
from magicfuse.errors import DataError


@dataclass
class EvalSet:
    """Images of one split, uint8 numpy: ``degraded``/``clean`` (H,W,3), ``infrared`` and
    ``label`` (H,W) (label 255 where unlabelled; infrared None when a sample has none);
    ``boxes`` (the reader's boxes as dicts, None when the source has none) and
    ``degradations`` (the names of the degradations applied to the input) per sample."""

    keys: list[str]
    degraded: list[np.ndarray]
    clean: list[np.ndarray]
    infrared: list[np.ndarray | None]
    label: list[np.ndarray]
    boxes: list[list[dict[str, Any]] | None] = field(default_factory=list)
    degradations: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def has_labels(self) -> bool:
        return any(bool((y != IGNORE_INDEX).any()) for y in self.label)

    def has_infrared(self) -> bool:
        return all(ir is not None for ir in self.infrared)

    def has_boxes(self) -> bool:
        return any(b is not None for b in self.boxes)


def load_eval_set(shards_dir: str | Path | Sequence[str | Path], split: str,
                  max_images: int | None = None) -> EvalSet:
    """The first `max_images` samples of `split` (shard order, folders in the given
    order) with every member decoded to uint8 numpy arrays."""
    dirs = [Path(shards_dir)] if isinstance(shards_dir, (str, Path)) else [Path(d) for d in shards_dir]
    if not dirs:
        raise DataError("evaluation: no shards folder given")
    present = [d for d in dirs if (d / split).is_dir()]
    if not present:
        raise DataError(f"evaluation: split {split!r} not found in any of the shards folders "
                        f"{[str(d) for d in dirs]}")
    out = EvalSet([], [], [], [], [])
    for d in present:
        for s in ShardDataset(d, split, shuffle=False, members=("clean", "degraded", "infrared", "label"),
                              skip_missing=False, with_meta=True):
            out.keys.append(str(s["key"]))
            meta = s["meta"]
            out.boxes.append(meta.get("boxes"))
            out.degradations.append(tuple(str(step.get("name", "?")) if isinstance(step, Mapping) else str(step)
                                          for step in meta.get("recipe") or ()))
            out.degraded.append(s["degraded"])
            out.clean.append(s["clean"])
            out.infrared.append(s.get("infrared"))
            out.label.append(s["label"])
            if max_images is not None and len(out) >= max_images:
                return out
    if len(out) == 0:
        raise DataError(f"evaluation: split {split!r} of {[str(d) for d in present]} holds no samples")
    return out
