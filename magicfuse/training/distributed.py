"""Distributed data parallel helpers (torchrun).

Trainers call `init_distributed()` once; without torchrun's environment it
returns a single-process `DistInfo` and every helper below is a no-op, so the
same trainer code runs on one CPU, one GPU or many GPUs:

    torchrun --nproc_per_node 4 -m magicfuse.cli train-ldm ...

Conventions: each rank loads its own part of the data (`rank`/`world_size` go
to `make_loader`), `batch_size` is per rank, only rank 0 writes checkpoints,
logs and progress bars, and every rank resumes from the same `last.pt`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from magicfuse import devices
from magicfuse.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def launched_rank() -> int:
    """The rank torchrun gave this process (its ``RANK``; 0 outside torchrun), known before
    `init_distributed` runs."""
    return _env_int("RANK", 0)


def current() -> DistInfo:
    """The process group as it stands (single process if none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", 0),
            backend=str(dist.get_backend()),
        )
    return DistInfo()


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's RANK/WORLD_SIZE/LOCAL_RANK.

    Backend: nccl when CUDA is used, gloo otherwise. Idempotent: a second call
    returns the existing group. Without WORLD_SIZE (or with WORLD_SIZE=1) it
    starts nothing and returns a single-process `DistInfo`.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ConfigError(f"torchrun environment: RANK={rank} outside 0..{world_size - 1}")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device (cuda:LOCAL_RANK under torchrun)."""
    info = info or current()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    dev = devices.resolve_device(device)  # "auto" -> cuda when available; cuda without CUDA -> ConfigError
    if dev.type == "cpu":
        return dev
    return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())


def wrap_model(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun, `model` itself otherwise."""
    if not current().enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: our networks' buffers are constants, and a trainer may call
    # the network a different number of times per step on different ranks (Algorithm 1).
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused_parameters, broadcast_buffers=False
    )
    if hasattr(model, "config"):
        wrapped.config = model.config  # the sampler reads the network's config through the wrapper
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (a copy; the input is untouched)."""
    out = value.detach().clone()
    if current().enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= current().world_size
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank (so all ranks can stop together)."""
    if not current().enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
