"""Device names -> ``torch.device``: the one place that reads "auto", "cpu", "cuda[:N]"."""

from __future__ import annotations

import torch

from magicfuse.errors import ConfigError, MagicFuseError


def resolve_device(device: str | torch.device, *, error: type[MagicFuseError] = ConfigError,
                   what: str = "device") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" -> a torch.device.

    Raises `error` (a MagicFuseError subclass, e.g. DataError for user input) naming `what`
    for an unknown name or a CUDA device on a machine without CUDA.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise error(f"{what} must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(f"{what} must be auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{what} {str(device)!r} requested but CUDA is not available here")
    return dev
