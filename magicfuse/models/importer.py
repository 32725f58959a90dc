"""Convert the authors' released checkpoints into MagicFuse checkpoints.

Our networks use the authors' parameter names, so conversion is: read the file,
unwrap known containers (``state_dict``, ``model``, ``params_ema``, ``ema``, ``net``,
``params``), strip known prefixes (``module.``, ``model.diffusion_model.``),
validate every name and shape against our network (built on the meta device, so
even the 517 M-parameter CKG costs no memory), and wrap the result with its kind and
config. With all four parts the output is one pipeline bundle; otherwise one
checkpoint per part.

Inputs: AE — a dict with ``encoder``/``decoder`` state dicts; IKR/CKG — UNet state
dicts; MKF — the fusion network's state dict.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from magicfuse.checkpoint import pipeline_payload, save_checkpoint, validate_state_dict
from magicfuse.config import to_dict
from magicfuse.diffusion.settings import SamplerSettings
from magicfuse.errors import CheckpointError
from magicfuse.models.presets import build_model, resolve_config

CONTAINER_KEYS = ("state_dict", "model", "params_ema", "ema", "net", "params", "module")
PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "model.")
PART_PRESETS = {"ae": "ae", "ikr": "ikr-paper", "ckg": "ckg-paper", "fusion": "fusion-paper"}
PART_KIND = {"ae": "ae", "ikr": "unet", "ckg": "unet", "fusion": "fusion"}
# The authors' released sampler: 25 DDIM steps, tau = 0.4, only "person" (class 2) is thermal,
# the default schedule (linear beta 0.00085..0.012 over 1000 steps).
OFFICIAL_SAMPLER = SamplerSettings(steps=25, tau=0.4, thermal_classes=(2,))


def read_torch_file(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """torch.load with weights_only=True (or a full unpickle when `allow_pickle`, for trusted files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except (MemoryError, KeyboardInterrupt):
        raise
    except pickle.UnpicklingError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        hint = "" if allow_pickle else " (if it holds Python objects and you trust it, retry with --allow-pickle)"
        raise CheckpointError(f"{path}: cannot be read safely: {msg}{hint}") from None
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file (corrupt or truncated?): {msg}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap containers and strip known prefixes until a plain name -> tensor dict remains."""
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or seen > 4:
            raise CheckpointError(f"{source}: no state dict (name -> tensor mapping) found in the file")
        inner = next((obj[k] for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors and any(k.startswith("model.diffusion_model.") for k in tensors):
                obj = tensors  # a full LDM checkpoint with extra entries
                break
            raise CheckpointError(
                f"{source}: no state dict found; top-level keys are {sorted(map(str, obj))[:10]} "
                f"(expected tensors or one of {list(CONTAINER_KEYS)})"
            )
        obj = inner
        seen += 1
    sd = dict(obj)
    if any(k.startswith("model.diffusion_model.") for k in sd):  # LDM: keep the denoiser only
        sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_part(part: str, path: str | Path, *, preset: str | None = None,
                 allow_pickle: bool = False) -> dict[str, Any]:
    """One official file -> {"kind","config","state_dict"}, names and shapes validated."""
    kind = PART_KIND[part]
    cfg = resolve_config(kind, preset or PART_PRESETS[part])
    source = f"{path} ({part})"
    raw = read_torch_file(path, allow_pickle=allow_pickle)
    if part == "ae":
        if isinstance(raw, Mapping) and not ({"encoder", "decoder"} <= set(raw)):
            raw = next((raw[k] for k in CONTAINER_KEYS if isinstance(raw.get(k), Mapping)), raw)
        if not isinstance(raw, Mapping) or not {"encoder", "decoder"} <= set(raw):
            keys = sorted(map(str, raw))[:10] if isinstance(raw, Mapping) else type(raw).__name__
            raise CheckpointError(f"{source}: expected a dict with 'encoder' and 'decoder' state dicts, found {keys}")
        sd = {}
        for sub in ("encoder", "decoder"):
            for k, v in extract_state_dict(raw[sub], f"{source} [{sub}]").items():
                sd[f"{sub}.{k}"] = v
    else:
        sd = extract_state_dict(raw, source)
    with torch.device("meta"):
        skeleton = build_model(kind, cfg)
    validate_state_dict(skeleton, sd, source)
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected floating point")
        if not bool(torch.isfinite(v.sum(dtype=torch.float64))):  # NaN/inf anywhere make the sum non-finite
            raise CheckpointError(f"{source}: tensor {k} holds NaN or infinite values")
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    return {"kind": kind, "config": to_dict(cfg), "state_dict": sd}


def import_official(
    *,
    ae: str | Path | None = None,
    ikr: str | Path | None = None,
    ckg: str | Path | None = None,
    mkf: str | Path | None = None,
    out: str | Path,
    bundle: bool | None = None,
    presets: Mapping[str, str] | None = None,
    sampler: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> list[Path]:
    """Convert the given official files; return the written paths.

    ``bundle`` None: a pipeline bundle at `out` (a file) when all four parts are given,
    else one checkpoint per part in directory `out` (``ae.pt``, ``ikr.pt``, ``ckg.pt``,
    ``fusion.pt``). ``presets`` overrides the target preset per part
    (keys ae/ikr/ckg/fusion). ``sampler`` overrides the bundle's sampler settings
    (default: the authors' — 25 steps, tau 0.4, thermal class 2 "person").
    """
    files = {"ae": ae, "ikr": ikr, "ckg": ckg, "fusion": mkf}
    given = {k: Path(v) for k, v in files.items() if v is not None}
    if not given:
        raise CheckpointError("import-official: give at least one of --ae, --ikr, --ckg, --mkf")
    presets = dict(presets or {})
    unknown = sorted(set(presets) - set(PART_PRESETS))
    if unknown:
        raise CheckpointError(f"import-official: unknown part(s) {unknown} in presets; use {sorted(PART_PRESETS)}")
    if bundle is None:
        bundle = len(given) == 4
    if bundle and len(given) != 4:
        missing = [("--mkf" if k == "fusion" else f"--{k}") for k in files if k not in given]
        raise CheckpointError(f"import-official: a pipeline bundle needs all four files; missing {missing}")
    entries = {part: convert_part(part, path, preset=presets.get(part), allow_pickle=allow_pickle)
               for part, path in given.items()}
    out = Path(out)
    provenance = {str(part): str(path) for part, path in given.items()}
    if bundle:
        settings = OFFICIAL_SAMPLER.replace(**dict(sampler or {}))
        payload = pipeline_payload(entries, sampler=settings, source="official", imported_from=provenance)
        return [save_checkpoint(out, payload)]
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory (separate checkpoints go into a directory)")
    written = []
    for part, entry in entries.items():
        written.append(save_checkpoint(out / f"{part}.pt", {**entry, "source": "official",
                                                            "imported_from": provenance[part], "part": part}))
    return written


def _cmd(args: argparse.Namespace) -> int:
    sampler: dict[str, Any] = {}
    if args.tau is not None:
        sampler["tau"] = args.tau
    if args.steps is not None:
        sampler["steps"] = args.steps
    if args.thermal_classes is not None:
        sampler["thermal_classes"] = list(args.thermal_classes)
    written = import_official(ae=args.ae, ikr=args.ikr, ckg=args.ckg, mkf=args.mkf, out=args.out,
                              bundle=False if args.separate else None, sampler=sampler,
                              allow_pickle=args.allow_pickle)
    for path in written:
        print(f"wrote {path}")
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-official",
        help="convert the authors' checkpoints into MagicFuse checkpoints",
        description="Convert the authors' AE/IKR/CKG/MKF checkpoints. With all four: one pipeline "
                    "bundle at OUT; otherwise one checkpoint per part inside directory OUT.",
    )
    p.add_argument("--ae", type=Path, help="autoencoder file (dict with encoder/decoder)")
    p.add_argument("--ikr", type=Path, help="IKR UNet state dict")
    p.add_argument("--ckg", type=Path, help="CKG UNet state dict")
    p.add_argument("--mkf", type=Path, help="fusion network (MKF) state dict")
    p.add_argument("-o", "--out", type=Path, required=True, help="bundle file, or directory for separate files")
    p.add_argument("--separate", action="store_true", help="write separate checkpoints even with all four parts")
    p.add_argument("--tau", type=float, default=None, help="bundle sampler tau (default 0.4)")
    p.add_argument("--steps", type=int, default=None, help="bundle sampler DDIM steps (default 25)")
    p.add_argument("--thermal-classes", type=int, nargs="+", default=None,
                   help="bundle sampler thermal class ids (default: 2, person, as the authors' code)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle the input files (only for files you trust)")
    p.set_defaults(func=_cmd)
