"""Latent pairs for the denoiser trainers: every frame encoded ONCE, whole, then cropped in latent space.

Why (measured, see docs/QUALITY.md): the autoencoder is a convolutional network whose
output near a pixel depends on the whole input it sees (the authors' InstanceNorm
normalises each feature map over the image; zero padding adds border effects). A
32-pixel crop encoded on its own gave latents that differ from the same window of the
whole frame's latent by an MSE of 0.14 (the latents' variance is 0.23), so denoisers
trained on encoded crops learned a latent "dialect" that full-frame sampling never
shows them. Here the condition c = E(degraded frame) and the target z0 = E(clean
frame) (IKR) or E(infrared frame) (CKG) are encoded at full frame size, and training
crops are windows of those latents: the UNet trains on exactly the latents it samples
from. It also makes a training step cost only the UNet (the encoder runs once per
frame instead of twice per sample per step).

The encoder's Gaussian noise input is drawn per frame from (seed, key), so the set is
a pure function of (autoencoder weights, shards, branch, split, seed) and is cached
on disk under that fingerprint; a resumed run reloads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from magicfuse.errors import DataError
from magicfuse.io import atomic_path, sha256_file
from magicfuse.models.autoencoder import DOWNSCALE
from magicfuse.data.shards import make_loader

LATENT_FORMAT = 1


@dataclass
class LatentPairs:
    """Condition/target latents of one split, one (8,h,w) float32 pair per frame (CPU)."""

    keys: list[str]
    cond: list[Tensor]
    target: list[Tensor]

    def __len__(self) -> int:
        return len(self.keys)

    def sizes(self) -> set[tuple[int, int]]:
        return {tuple(c.shape[-2:]) for c in self.cond}


def _digest(*parts: Any) -> int:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def branch_members(branch: str) -> tuple[str, str]:
    """(condition member, target member) of the shard samples for a branch."""
    return ("degraded", "clean") if branch == "ikr" else ("degraded", "infrared")


def _as_rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def encode_pairs(ae: nn.Module, shards_dir: str | Path | Sequence[str | Path], split: str, branch: str, *,
                 seed: int, device: torch.device | str = "cpu", progress: bool = True) -> LatentPairs:
    """Encode the condition and target frames of every sample of `split` at full size."""
    device = torch.device(device)
    cond_m, target_m = branch_members(branch)
    loader = make_loader(shards_dir, split, batch_size=1, crop=None, num_workers=0, shuffle=False,
                         members=(cond_m, target_m))
    keys: list[str] = []
    cond: list[Tensor] = []
    target: list[Tensor] = []
    bar = tqdm(desc=f"encode {branch} {split} frames", unit="frame", disable=not progress)
    for batch in loader:
        key = batch["key"][0]
        images = [batch[cond_m], _as_rgb(batch[target_m])]
        h, w = images[0].shape[-2:]
        if h % DOWNSCALE or w % DOWNSCALE:
            raise DataError(f"{shards_dir}: sample {key!r} is {h}x{w}; frames must be multiples of {DOWNSCALE} "
                            "pixels to be encoded whole (resize or crop the source images)")
        pair = []
        for j, img in enumerate(images):
            gen = torch.Generator(device=device).manual_seed(_digest(seed, key, j))
            pair.append(ae.encode(img.to(device), generator=gen).float().cpu()[0])
        keys.append(key)
        cond.append(pair[0])
        target.append(pair[1])
        bar.update(1)
    bar.close()
    if not keys:
        raise DataError(f"{shards_dir}: split {split!r} has no samples to train the {branch} denoiser on")
    return LatentPairs(keys, cond, target)


def _fingerprint(ae_checkpoint: str | Path, manifest: str | None, branch: str, split: str, seed: int) -> str:
    blob = json.dumps({"format": LATENT_FORMAT, "ae": sha256_file(ae_checkpoint), "manifest": manifest,
                       "branch": branch, "split": split, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_pairs(ae: nn.Module, ae_checkpoint: str | Path, shards_dir: Any, split: str, branch: str, *,
                 seed: int, manifest: str | None, cache_dir: str | Path, device: torch.device | str = "cpu",
                 progress: bool = True) -> LatentPairs:
    """`encode_pairs`, cached in `cache_dir/latents-<fingerprint>.pt` (written atomically)."""
    path = Path(cache_dir) / f"latents-{_fingerprint(ae_checkpoint, manifest, branch, split, seed)}.pt"
    if path.is_file():
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return LatentPairs(list(raw["keys"]), list(raw["cond"]), list(raw["target"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    pairs = encode_pairs(ae, shards_dir, split, branch, seed=seed, device=device, progress=progress)
    with atomic_path(path) as tmp:
        torch.save({"keys": pairs.keys, "cond": pairs.cond, "target": pairs.target}, tmp)
    return pairs


def latent_loader(pairs: LatentPairs, *, batch_size: int, crop: int | None, seed: int, rank: int = 0,
                  world_size: int = 1) -> Callable[[int], Iterable[dict[str, Any]]]:
    """A `TrainJob.make_loader` over latent pairs: each epoch a (seed, epoch) permutation split by
    rank, and per sample a random square window of `crop` PIXELS (`crop // 4` latent cells; the
    same window in condition and target), or whole latents when `crop` is None."""
    if crop is not None:
        if crop % DOWNSCALE:
            raise DataError(f"crop {crop} must be a multiple of {DOWNSCALE} pixels (the latent downscale)")
        small = [k for k, c in zip(pairs.keys, pairs.cond) if min(c.shape[-2:]) * DOWNSCALE < crop]
        if small:
            raise DataError(f"crop {crop} is larger than {len(small)} frame(s), e.g. {small[0]!r} "
                            f"({pairs.cond[pairs.keys.index(small[0])].shape[-2] * DOWNSCALE}x"
                            f"{pairs.cond[pairs.keys.index(small[0])].shape[-1] * DOWNSCALE})")
    elif len(pairs.sizes()) > 1:
        raise DataError(f"frames of several sizes {sorted(pairs.sizes())}: set a crop to train on them together")
    lc = None if crop is None else crop // DOWNSCALE
    n = len(pairs)

    def loader(epoch: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng(_digest("order", seed, epoch)).permutation(n)[rank::world_size]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            conds, targets, keys = [], [], []
            for i in idx:
                c, z = pairs.cond[i], pairs.target[i]
                if lc is not None:
                    rng = np.random.default_rng(_digest("crop", seed, epoch, pairs.keys[i]))
                    top = int(rng.integers(0, c.shape[-2] - lc + 1))
                    left = int(rng.integers(0, c.shape[-1] - lc + 1))
                    c, z = c[:, top:top + lc, left:left + lc], z[:, top:top + lc, left:left + lc]
                conds.append(c)
                targets.append(z)
                keys.append(pairs.keys[i])
            yield {"cond": torch.stack(conds), "z0": torch.stack(targets), "key": keys}

    return loader
