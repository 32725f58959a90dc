"""Self-describing checkpoints: atomic save, checked load.

Every file is a plain dict (tensors, dicts, lists, strings, numbers only, so it loads
with ``torch.load(weights_only=True)``)::

    {"format": "magicfuse", "version": 1,
     "kind": "ae" | "unet" | "fusion" | "pipeline" | "train-state",
     "config": {...}, "state_dict": {...}, ...extra}

A ``pipeline`` file bundles the four networks and the sampler settings::

    {"format": "magicfuse", "version": 1, "kind": "pipeline",
     "models": {"ae"|"ikr"|"ckg"|"fusion": {"kind", "config", "state_dict"}},
     "sampler": SamplerSettings.to_dict() (steps, tau, thermal_classes, variant, schedule), ...extra}

Loading problems raise ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from magicfuse.diffusion.settings import SamplerSettings
from magicfuse.errors import CheckpointError, ConfigError, MagicFuseError
from magicfuse.io import atomic_path
from magicfuse.models.presets import build_model, model_config, model_kind

FORMAT = "magicfuse"
VERSION = 1
KINDS = ("ae", "unet", "fusion", "pipeline", "train-state")
MODEL_KINDS = ("ae", "unet", "fusion")
PIPELINE_PARTS = {"ae": "ae", "ikr": "unet", "ckg": "unet", "fusion": "fusion"}


def _cpu_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()}


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (must name its "kind") atomically; format/version are filled in."""
    path = Path(path)
    kind = payload.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: cannot save a checkpoint of kind {kind!r}; expected one of {list(KINDS)}")
    full = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(full, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(
    path: str | Path,
    *,
    kind: str | tuple[str, ...] | None = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read and check a MagicFuse checkpoint; `kind` (one or several) is the expected kind."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zip errors...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt, truncated or not a torch file): {first}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found a {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        hint = ""
        if {"encoder", "decoder"} <= set(payload) or any(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " (it looks like a raw state dict; convert it with `magicfuse import-official`)"
        raise CheckpointError(f"{path}: not a MagicFuse checkpoint (no \"format\": \"magicfuse\" marker){hint}")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not supported (this library reads <= {VERSION})")
    found = payload.get("kind")
    if found not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {found!r}")
    if kind is not None:
        wanted = (kind,) if isinstance(kind, str) else tuple(kind)
        if found not in wanted:
            raise CheckpointError(f"{path}: this is a {found!r} checkpoint, expected {' or '.join(map(repr, wanted))}")
    if found in MODEL_KINDS:
        _check_entry(payload, str(path))
    if found == "pipeline":
        models = payload.get("models")
        if not isinstance(models, dict):
            raise CheckpointError(f"{path}: pipeline checkpoint has no \"models\" dict")
        missing = [p for p in PIPELINE_PARTS if p not in models]
        if missing:
            raise CheckpointError(f"{path}: pipeline checkpoint lacks the network(s) {missing}")
        for name, entry in models.items():
            _check_entry(entry, f"{path} [models.{name}]")
        if not isinstance(payload.get("sampler"), dict):
            raise CheckpointError(f"{path}: pipeline checkpoint has no \"sampler\" settings dict")
        try:
            SamplerSettings.from_mapping(payload["sampler"], where=f"{path}: sampler settings")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    return payload


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected a dict with kind/config/state_dict")
    if entry.get("kind") not in MODEL_KINDS:
        raise CheckpointError(f"{where}: network kind {entry.get('kind')!r} is not one of {list(MODEL_KINDS)}")
    if not isinstance(entry.get("config"), dict):
        raise CheckpointError(f"{where}: missing the network \"config\" dict")
    if not isinstance(entry.get("state_dict"), dict):
        raise CheckpointError(f"{where}: missing the \"state_dict\" dict")


# -- networks ------------------------------------------------------------------------------


def validate_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str, *, limit: int = 8) -> None:
    """Raise CheckpointError unless `state_dict` has exactly `model`'s names and shapes.

    `model` may live on the meta device (nothing is allocated).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected] + not_tensors
    mismatched = [f"{k}: file {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:limit])}{more}")
        raise CheckpointError(f"{source}: weights do not fit the {type(model).__name__}: " + "; ".join(parts))


def model_from_entry(entry: Mapping[str, Any], source: str) -> nn.Module:
    """Build the network described by {"kind","config","state_dict"} and load its weights (strict)."""
    try:
        with torch.device("meta"):
            skeleton = build_model(entry["kind"], entry["config"])
    except MagicFuseError as exc:
        raise CheckpointError(f"{source}: invalid network config: {exc}") from None
    state_dict = entry["state_dict"]
    validate_state_dict(skeleton, state_dict, source)
    ref = skeleton.state_dict()
    converted = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != ref[k].dtype:
            v = v.to(ref[k].dtype)
        converted[k] = v
    skeleton.load_state_dict(converted, strict=True, assign=True)
    for p in skeleton.parameters():
        p.requires_grad_(True)
    return skeleton.eval()


def model_entry(model: nn.Module) -> dict[str, Any]:
    """{"kind","config","state_dict"} of a built network (tensors copied to CPU)."""
    return {"kind": model_kind(model), "config": model_config(model), "state_dict": _cpu_state_dict(model.state_dict())}


def save_model(path: str | Path, model: nn.Module, kind: str | None = None,
               config: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Save one network with its kind and config (defaults: taken from the model)."""
    entry = model_entry(model)
    if kind is not None and kind != entry["kind"]:
        raise CheckpointError(f"{path}: model is a {entry['kind']!r} network, not {kind!r}")
    if config is not None:
        entry["config"] = dict(config)
    return save_checkpoint(path, {**extra, **entry})


def load_model(path: str | Path, kind: str | None = None, *, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode, payload) from a single-network checkpoint."""
    payload = load_checkpoint(path, kind=kind or MODEL_KINDS, map_location=map_location)
    return model_from_entry(payload, str(path)), payload


def pipeline_payload(models: Mapping[str, Mapping[str, Any]], *, sampler: SamplerSettings | Mapping[str, Any],
                     **extra: Any) -> dict[str, Any]:
    """Payload of a pipeline bundle from {"ae","ikr","ckg","fusion"} entries; `sampler` is
    checked and stored as `SamplerSettings.to_dict`."""
    if not isinstance(sampler, SamplerSettings):
        sampler = SamplerSettings.from_mapping(sampler)
    missing = [p for p in PIPELINE_PARTS if p not in models]
    if missing:
        raise CheckpointError(f"pipeline bundle needs the networks {list(PIPELINE_PARTS)}; missing {missing}")
    for name, entry in models.items():
        want = PIPELINE_PARTS.get(name)
        if want is not None and entry.get("kind") != want:
            raise CheckpointError(f"pipeline bundle: {name!r} must be a {want!r} network, got {entry.get('kind')!r}")
    return {**extra, "kind": "pipeline", "models": {k: dict(v) for k, v in models.items()}, "sampler": sampler.to_dict()}


def save_pipeline(path: str | Path, ae: nn.Module, ikr: nn.Module, ckg: nn.Module, fusion: nn.Module, *,
                  sampler: SamplerSettings | Mapping[str, Any], **extra: Any) -> Path:
    """Bundle the four networks and the `SamplerSettings` in one file."""
    models = {name: model_entry(m) for name, m in (("ae", ae), ("ikr", ikr), ("ckg", ckg), ("fusion", fusion))}
    return save_checkpoint(path, pipeline_payload(models, sampler=sampler, **extra))


def load_pipeline(path: str | Path, *, map_location: Any = "cpu") -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """({"ae","ikr","ckg","fusion": network in eval mode}, payload) from a pipeline bundle."""
    payload = load_checkpoint(path, kind="pipeline", map_location=map_location)
    modules = {}
    for name, entry in payload["models"].items():
        want = PIPELINE_PARTS.get(name)
        if want is not None and entry["kind"] != want:
            raise CheckpointError(f"{path} [models.{name}]: expected a {want!r} network, found {entry['kind']!r}")
        modules[name] = model_from_entry(entry, f"{path} [models.{name}]")
    return modules, payload
