"""Inference for users: ``MagicFuse.from_pretrained(source).fuse(images)``.

Sources (:meth:`MagicFuse.from_pretrained`):

* an MLflow model URI — ``models:/magicfuse@champion``, ``models:/magicfuse/3``,
  ``runs:/<run id>/<path>`` (any URI with a scheme that is not an existing file). The
  model is downloaded with ``mlflow.artifacts.download_artifacts``; the logged pyfunc
  model keeps our pipeline checkpoint as the artifact named ``pipeline``, found as
  ``artifacts/pipeline*.pt`` inside the downloaded folder (or any ``pipeline*.pt`` below it);
* a MagicFuse pipeline checkpoint (``.pt``, kind ``"pipeline"``);
* a folder holding a downloaded MLflow model (an ``MLmodel`` file) or a pipeline
  checkpoint named ``pipeline*.pt``;
* a folder of the authors' released checkpoints: four torch files (``.pt``, ``.pth``,
  ``.ckpt``, ``.bin``) whose names contain, as a word separated by ``_``/``-``/``.``,
  ``ae`` (or ``autoencoder``), ``ikr``, ``ckg`` and ``mkf`` (or ``fusion``) — for
  example ``official_ae.pth``, ``ikr.pt``, ``ckg_last.ckpt``, ``mkf-epoch30.pth``.
  They are converted with :func:`magicfuse.models.importer.import_official` into a
  temporary pipeline bundle (the authors' sampler: 25 steps, τ = 0.4, person thermal).

Problems raise :class:`~magicfuse.errors.CheckpointError` naming the path.

Inputs of :meth:`MagicFuse.fuse`: PIL images; numpy arrays ``H×W×3`` (RGB), ``H×W×4``
(alpha dropped), ``H×W`` or ``H×W×1`` (grey, replicated) — uint8, or float in [0, 1];
torch tensors ``(3,H,W)``/``(1,H,W)``/``(H,W)`` or a batch ``(B,3,H,W)``, float in
[0, 1] (uint8 tensors are divided by 255). Any size (the sampler pads and crops back).

Determinism: every image gets its own generator, seeded from ``(seed, index)`` (index
= position in the list passed to ``fuse``, or an explicit per-image seed), from which
its z_T, segmentation noise and encoder noise are drawn on the CPU. So the batch size
and the grouping by size do not change any image's noise, and the networks use no batch
statistics; the same call gives the same bytes on the same device. Different batch
sizes may select different kernels (CPU and CUDA), so batch 1 vs 4 agree only up to
rounding (measured on CPU: at most 1 level of 255 in the MagImg).

Precision: on CUDA the networks run under bf16 autocast (``amp="auto"`` or ``"bf16"``;
``"fp32"`` turns it off) and can be ``torch.compile``d (``compile=True``); on the CPU
everything is float32. The latent arithmetic of the sampler is float32 everywhere.

Big images: see :mod:`magicfuse.tiling` — ``tile`` ("auto": the device's
:class:`TilingBudget`; an integer: always window attention with that many latent pixels per
window side; 0: never window or tile; or a :class:`TilingBudget`) decides when attention runs
over windows and when the networks run on tiles (bounded memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from magicfuse.checkpoint import load_pipeline
from magicfuse.devices import resolve_device
from magicfuse.diffusion.sampler import MagicFuseNets, magicfuse_sample
from magicfuse.diffusion.settings import VARIANTS, SamplerSettings
from magicfuse.errors import CheckpointError, ConfigError, DataError, MagicFuseError
from magicfuse.evaluation.segmentation import colorize
from magicfuse.imageio import to_uint8
from magicfuse.mlflow_store import use_tracking_store
from magicfuse.models.fusion import FusionNet
from magicfuse.models.geometry import padded_latent_size, required_multiple, unwrap
from magicfuse.models.importer import import_official
from magicfuse.tiling import TilingBudget, wrap_for_tiling

OUTPUTS: tuple[str, ...] = ("magimg", "ikr", "ckg", "seg")
RUN_OUTPUTS: tuple[str, ...] = OUTPUTS + ("ckg_rgb",)  # run_batch may also return the CKG image in colour
OFFICIAL_PARTS: dict[str, tuple[str, ...]] = {
    "ae": ("ae", "autoencoder"),
    "ikr": ("ikr",),
    "ckg": ("ckg",),
    "mkf": ("mkf", "fusion"),
}
TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:/")

__all__ = ["MagicFuse", "FuseResult", "MagicFusePyfunc", "to_image_tensor", "image_seed",
           "resolve_source", "OUTPUTS"]


# --------------------------------------------------------------------------- results


@dataclass
class FuseResult:
    """One image's outputs, all at the input's exact size (None when not requested).

    ``magimg`` uint8 H×W×3 RGB; ``ikr`` uint8 H×W×3 (the IKR-enhanced visible image);
    ``ckg`` uint8 H×W (the generated infrared: channel mean of the CKG image);
    ``seg`` uint8 H×W MFNet class ids; ``seg_color`` uint8 H×W×3 (palette colours);
    ``ckg_rgb`` uint8 H×W×3 (the CKG image before the channel mean; only on request).
    """

    magimg: np.ndarray | None = None
    ikr: np.ndarray | None = None
    ckg: np.ndarray | None = None
    seg: np.ndarray | None = None
    seg_color: np.ndarray | None = None
    ckg_rgb: np.ndarray | None = None
    index: int = 0
    seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        for a in (self.magimg, self.ikr, self.ckg, self.seg):
            if a is not None:
                return int(a.shape[0]), int(a.shape[1])
        return (0, 0)


# --------------------------------------------------------------------------- inputs


def to_image_tensor(image: Any, *, name: str = "image") -> torch.Tensor:
    """One image (PIL, numpy, tensor — see the module docstring) -> float32 (3,H,W) in [0,1], CPU.

    Raises :class:`DataError` naming ``name`` for empty, wrongly shaped, non-finite or
    out-of-range inputs.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise DataError(f"{name}: zero-size image ({image.width}×{image.height})")
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{name}: expected a uint8 or float array, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = arr[..., :3] if arr.shape[2] >= 3 else arr
        elif arr.ndim != 2:
            raise DataError(f"{name}: expected an array H×W, H×W×1, H×W×3 or H×W×4, got shape {arr.shape}")
        if arr.dtype != np.uint8 and arr.dtype != np.float32:
            arr = arr.astype(np.float32)  # float16/64/128 alike (torch has no float128)
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. np.asarray(PIL image))
            arr = arr.copy()
        t = torch.from_numpy(arr)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        if arr.dtype == np.uint8:
            t = t.float() / 255.0
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise DataError(f"{name}: expected a tensor (3,H,W), (1,H,W) or (H,W), got shape {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif not t.is_floating_point():
            raise DataError(f"{name}: expected a float tensor in [0,1] (or uint8), got dtype {t.dtype}")
    else:
        raise DataError(f"{name}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise DataError(f"{name}: zero-size image ({t.shape[-1]}×{t.shape[-2]})")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name}: image holds NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise DataError(f"{name}: float image values must lie in [0, 1], found {lo:.4g}..{hi:.4g} "
                        "(divide 8-bit data by 255, or pass uint8)")
    t = t.clamp(0.0, 1.0)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def _flatten_inputs(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        out: list[Any] = []
        for x in images:
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                out.extend(x.unbind(0))
            else:
                out.append(x)
        return out
    return [images]


def image_seed(seed: int, key: int | str) -> int:
    """The per-image seed: a stable 63-bit hash of (seed, key) — key is the index in a
    ``fuse`` call or a string such as a relative file name (the CLI)."""
    h = hashlib.sha256(f"magicfuse:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- sources


def _find_pipeline_in(folder: Path) -> Path | None:
    cands = sorted(folder.glob("artifacts/pipeline*.pt")) or sorted(folder.rglob("pipeline*.pt"))
    return cands[0] if cands else None


def _official_files(folder: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {k: [] for k in OFFICIAL_PARTS}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in TORCH_EXTENSIONS:
            continue
        words = set(re.split(r"[_\-.\s]+", p.stem.lower()))
        for part, names in OFFICIAL_PARTS.items():
            if words & set(names):
                found[part].append(p)
    missing = [k for k, v in found.items() if not v]
    if missing:
        listing = ", ".join(p.name for p in sorted(folder.iterdir())[:12]) or "empty"
        raise CheckpointError(
            f"{folder}: not a model folder — no pipeline checkpoint (pipeline*.pt / MLmodel) and no authors' "
            f"checkpoint for {missing} (expected torch files named with ae, ikr, ckg, mkf; found: {listing})")
    ambiguous = {k: [p.name for p in v] for k, v in found.items() if len(v) > 1}
    if ambiguous:
        raise CheckpointError(f"{folder}: several files match one part of the authors' checkpoints: {ambiguous}")
    return {k: v[0] for k, v in found.items()}


def resolve_source(source: str | Path, workdir: Path) -> Path:
    """The pipeline checkpoint file behind ``source`` (downloading/converting into
    ``workdir`` when needed). Raises CheckpointError naming the source."""
    text = str(source)
    path = Path(text).expanduser()
    if _URI.match(text) and not path.exists() and not re.match(r"^[A-Za-z]:[\\/]", text):
        try:
            import mlflow.artifacts
        except ImportError as exc:  # pragma: no cover - mlflow is a dependency
            raise CheckpointError(f"{text}: MLflow is needed to load a model URI ({exc})") from None
        use_tracking_store()  # $MLFLOW_TRACKING_URI, else the project's local sqlite store
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(workdir / "mlflow")))
        except MagicFuseError:
            raise
        except Exception as exc:  # MlflowException, connection errors, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{text}: cannot download the model from MLflow: {first}") from None
        if local.is_file():
            return local
        found = _find_pipeline_in(local)
        if found is None:
            raise CheckpointError(f"{text}: the downloaded model has no pipeline checkpoint (artifacts/pipeline*.pt)")
        return found
    if not path.exists():
        raise CheckpointError(f"{path}: model not found (expected a pipeline .pt file, a model folder or an MLflow "
                              "URI such as models:/magicfuse@champion)")
    if path.is_file():
        return path
    found = _find_pipeline_in(path)
    if found is not None:
        return found
    files = _official_files(path)
    out = workdir / "official_pipeline.pt"
    import_official(ae=files["ae"], ikr=files["ikr"], ckg=files["ckg"], mkf=files["mkf"], out=out, bundle=True)
    return out


def _variant_nets(nets: MagicFuseNets, variant: str) -> MagicFuseNets:
    """See :meth:`MagicFuse.nets_for_variant`."""
    if variant == "model4":
        return nets
    f = unwrap(nets.fusion) if nets.fusion is not None else None  # a torch.compile wrapper prefixes its state
    if f is None:
        raise ConfigError(f"variant {variant!r} needs the fusion network")
    cfg = f.config
    if variant != "model1":
        if not cfg.use_zhat or not cfg.seg_head:
            raise ConfigError(f"variant {variant!r} needs a full fusion network (use_zhat and seg_head); this one "
                              f"has use_zhat={cfg.use_zhat}, seg_head={cfg.seg_head}")
        return nets
    if not cfg.seg_head:
        raise ConfigError("variant 'model1' needs a fusion network with a segmentation head")
    if not cfg.use_zhat:
        return nets
    param = next(f.parameters())
    f1 = FusionNet(dataclasses.replace(cfg, use_zhat=False)).to(device=param.device, dtype=param.dtype)
    f1.load_state_dict(f.state_dict(), strict=True)
    f1.eval().requires_grad_(False)
    return MagicFuseNets(ae=nets.ae, ikr=nets.ikr, ckg=nets.ckg, fusion=f1)


# --------------------------------------------------------------------------- the pipeline


class MagicFuse:
    """A loaded MagicFuse pipeline: ``fuse(images) -> list[FuseResult]``.

    The project's one runner from networks to images: `magicfuse fuse`, the MLflow pyfunc,
    the evaluation report, the τ sweep and the ablations all sample through
    :meth:`run_batch` (per-image seeded noise, the device's tiling budget, bf16 autocast on
    CUDA, rounding to uint8), so a report image is reproduced by ``magicfuse fuse --seed``.
    ``sampler``: the pipeline's :class:`SamplerSettings` (or their dict, as stored in a
    pipeline checkpoint); None = the defaults.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module],
                 sampler: SamplerSettings | Mapping[str, Any] | None = None, *,
                 device: str | torch.device = "auto", compile: bool = False, amp: str = "auto",
                 tile: Any = "auto", source: str = "<modules>"):
        self.device = resolve_device(device, error=DataError)
        self.source = source
        self.settings = sampler if isinstance(sampler, SamplerSettings) else \
            SamplerSettings.from_mapping(sampler, where=f"{source}: sampler settings")
        if amp not in ("auto", "bf16", "fp32"):
            raise DataError(f"amp must be auto, bf16 or fp32, got {amp!r}")
        self.amp_dtype = torch.bfloat16 if (self.device.type == "cuda" and amp in ("auto", "bf16")) else None
        mods = {k: m.to(self.device).eval().requires_grad_(False) for k, m in modules.items()}
        self.base_nets = MagicFuseNets(ae=mods["ae"], ikr=mods["ikr"], ckg=mods.get("ckg"), fusion=mods.get("fusion"))
        self.nets = self.base_nets
        if compile:
            self.nets = MagicFuseNets(
                ae=mods["ae"],
                ikr=torch.compile(mods["ikr"]),
                ckg=torch.compile(mods["ckg"]) if mods.get("ckg") is not None else None,
                fusion=torch.compile(mods["fusion"]) if mods.get("fusion") is not None else None,
            )
        self._variant_nets: dict[str, MagicFuseNets] = {}
        self.tile = tile
        self.multiple = required_multiple(self.base_nets)
        self.latent_channels = int(self.base_nets.ae.config.latent_channels)
        self.noise_channels = int(self.base_nets.ae.config.noise_channels)
        self.noise_scale = float(self.base_nets.ae.config.noise_scale)
        f = self.base_nets.fusion
        self.num_classes = int(f.config.num_classes) if f is not None and f.config.seg_head else 0

    # the settings' fields, for reading
    steps = property(lambda self: self.settings.steps)
    tau = property(lambda self: self.settings.tau)
    thermal_classes = property(lambda self: self.settings.thermal_classes)
    variant = property(lambda self: self.settings.variant)

    # ---- loading
    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str | torch.device = "auto", compile: bool = False,
                        amp: str = "auto", tile: Any = "auto") -> "MagicFuse":
        """Load from an MLflow URI, a pipeline checkpoint, or a folder (see the module docstring)."""
        with tempfile.TemporaryDirectory(prefix="magicfuse-load-") as tmp:
            path = resolve_source(source, Path(tmp))
            modules, payload = load_pipeline(path)
        return cls(modules, payload.get("sampler"), device=device, compile=compile, amp=amp, tile=tile,
                   source=str(source))

    # ---- tiling
    def budget(self, tile: Any = None):
        tile = self.tile if tile is None else tile
        if isinstance(tile, TilingBudget):
            return tile
        if tile == "auto" or tile is None:
            return TilingBudget.for_device(self.device)
        if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
            return TilingBudget.forced(int(tile))
        raise DataError(f"tile must be 'auto', an integer attention window size (0 = never) or a TilingBudget, "
                        f"got {tile!r}")

    # ---- noise
    def _noises(self, seeds: Sequence[int], hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        h, w = padded_latent_size(hw[0], hw[1], self.multiple)
        zs, ss, ns = [], [], []
        for sd in seeds:
            g = torch.Generator().manual_seed(int(sd))
            zs.append(torch.randn((1, self.latent_channels, h, w), generator=g))
            if self.num_classes:
                ss.append(torch.randn((1, self.num_classes, h, w), generator=g))
            n = torch.randn((1, self.noise_channels, h, w), generator=g)
            ns.append(n * self.noise_scale)
        dev = self.device
        seg = torch.cat(ss).to(dev) if ss else None
        return torch.cat(zs).to(dev), seg, torch.cat(ns).to(dev)

    # ---- variants
    def nets_for_variant(self, variant: str | None = None) -> MagicFuseNets:
        """The networks that run `variant` (default: the settings'), from this ONE pipeline.

        ``model1`` runs a copy of F with ``use_zhat=False`` and the same weights (its ẑ0
        inputs are zeros: an inference-time ablation); the other variants use the networks
        as they are (`magicfuse_sample` handles them).
        """
        variant = self.variant if variant is None else variant
        if variant not in VARIANTS:
            raise ConfigError(f"unknown sampler variant {variant!r}; expected one of {list(VARIANTS)}")
        if variant not in self._variant_nets:
            self._variant_nets[variant] = _variant_nets(self.nets, variant)
        return self._variant_nets[variant]

    # ---- running
    def run_batch(self, batch: torch.Tensor, seeds: Sequence[int], *, steps: int | None = None,
                  tau: float | None = None, variant: str | None = None, outputs: Sequence[str] = OUTPUTS,
                  tile: Any = None, init_noise_scale: float | None = None) -> list[FuseResult]:
        """One same-size batch (B,3,H,W) in [0,1] with one seed per image -> results.

        ``steps``, ``tau``, ``variant`` and ``init_noise_scale`` override the pipeline's sampler
        settings (None keeps them).

        ``outputs`` may also name ``"ckg_rgb"`` (the CKG image before the channel mean).
        """
        unknown = sorted(set(outputs) - set(RUN_OUTPUTS))
        if unknown:
            raise DataError(f"unknown output(s) {unknown}; choose from {list(OUTPUTS)}")
        if batch.ndim != 4 or batch.shape[0] != len(seeds):
            raise DataError(f"run_batch: expected (B,3,H,W) and B seeds, got {tuple(batch.shape)} and {len(seeds)} seeds")
        s = self.settings.replace(steps=steps, tau=tau, variant=variant, init_noise_scale=init_noise_scale)
        hw = (int(batch.shape[2]), int(batch.shape[3]))
        nets = wrap_for_tiling(self.nets_for_variant(s.variant), hw, self.budget(tile))
        noise, seg_noise, ae_noise = self._noises(seeds, hw)
        if s.variant == "model4" or self.num_classes == 0:
            seg_noise = None
        amp = (torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        # one memory layout whatever the caller's strides (a channels-last view selects other
        # convolution kernels, whose rounding differs by up to a grey level)
        x = batch.to(self.device, torch.float32).contiguous()
        decode = {"magimg", "ikr", "ckg"} & {("ckg" if o == "ckg_rgb" else o) for o in outputs}
        with torch.inference_mode(), amp:
            out = magicfuse_sample(nets, x, steps=s.steps, tau=s.tau,
                                   thermal_classes=s.thermal_classes, variant=s.variant, noise=noise,
                                   seg_noise=seg_noise, ae_noise=ae_noise, decode=sorted(decode),
                                   schedule=s.ddim(self.device), init_noise_scale=s.init_noise_scale)
        tensors = {"magimg": out.magimg, "ikr": out.ikr, "ckg": out.ckg_ir, "ckg_rgb": out.ckg, "seg": out.seg}
        fields = {name: (None if t is None or name not in outputs else
                         t.to(torch.uint8).cpu().numpy() if name == "seg" else to_uint8(t))
                  for name, t in tensors.items()}
        results = []
        for i, sd in enumerate(seeds):
            r = FuseResult(seed=int(sd))
            for name, arr in fields.items():
                if arr is not None:
                    setattr(r, name, np.ascontiguousarray(arr[i]))
            if r.seg is not None:
                r.seg_color = colorize(r.seg)
            results.append(r)
        return results

    def fuse_iter(self, images: Any, *, steps: int | None = None, tau: float | None = None, seed: int = 0,
                  seeds: Sequence[int] | None = None, batch_size: int = 4, outputs: Sequence[str] = OUTPUTS,
                  tile: Any = None, variant: str | None = None,
                  init_noise_scale: float | None = None) -> Iterator[FuseResult]:
        """Like :meth:`fuse`, yielding results as batches finish (grouped by size, so not
        in input order; each result's ``index`` gives its position)."""
        items = _flatten_inputs(images)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if seeds is not None and len(seeds) != len(items):
            raise DataError(f"{len(seeds)} seeds for {len(items)} images")
        tensors = [to_image_tensor(x, name=f"image {i}") for i, x in enumerate(items)]
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            buckets.setdefault((int(t.shape[1]), int(t.shape[2])), []).append(i)
        for idxs in buckets.values():
            for c in range(0, len(idxs), batch_size):
                chunk = idxs[c:c + batch_size]
                sds = [int(seeds[i]) if seeds is not None else image_seed(seed, i) for i in chunk]
                batch = torch.stack([tensors[i] for i in chunk])
                for i, r in zip(chunk, self.run_batch(batch, sds, steps=steps, tau=tau, variant=variant,
                                                      outputs=outputs, tile=tile,
                                                      init_noise_scale=init_noise_scale)):
                    r.index = i
                    yield r

    def fuse(self, images: Any, *, steps: int | None = None, tau: float | None = None, seed: int = 0,
             seeds: Sequence[int] | None = None, batch_size: int = 4, outputs: Sequence[str] = OUTPUTS,
             tile: Any = None, variant: str | None = None,
             init_noise_scale: float | None = None) -> list[FuseResult]:
        """Fuse one image or many (see the module docstring for accepted inputs).

        Images are grouped by size and run ``batch_size`` at a time; results come back
        in input order, each at its input's exact size. ``steps``/``tau``/``init_noise_scale``
        default to the checkpoint's sampler settings, ``variant`` to its variant (an ablation of
        :mod:`magicfuse.diffusion.sampler` runs on the same weights). ``seed`` seeds every image's own generator from
        ``(seed, index)``; ``seeds`` gives explicit per-image seeds instead.
        """
        results = list(self.fuse_iter(images, steps=steps, tau=tau, seed=seed, seeds=seeds,
                                      batch_size=batch_size, outputs=outputs, tile=tile, variant=variant,
                                      init_noise_scale=init_noise_scale))
        results.sort(key=lambda r: r.index)
        return results

    def __repr__(self) -> str:
        return (f"MagicFuse(source={self.source!r}, device={self.device}, steps={self.steps}, tau={self.tau}, "
                f"thermal_classes={self.thermal_classes}, init_noise_scale={self.settings.init_noise_scale:g})")


# --------------------------------------------------------------------------- MLflow pyfunc

# The most pixels one predict call (one HTTP request to the model server) may hold, all its
# images together: one 4K UHD frame. The model config's or `configure`'s max_pixels changes it.
PYFUNC_MAX_PIXELS = 3840 * 2160
PYFUNC_PARAMS: tuple[str, ...] = ("seed", "steps", "tau", "batch_size")
_RGB_HINT = "the model takes RGB images as integers 0..255 (uint8), shaped (H, W, 3) or (B, H, W, 3)"


def _value_range(arr: np.ndarray) -> str:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind in "fc" else arr
    if finite.size == 0:
        return "no finite values"
    return f"min {finite.min():.6g}, max {finite.max():.6g}"


def _check_image_array(arr: np.ndarray, what: str, *, batch: bool) -> np.ndarray:
    """One array of the input -> uint8-valued (B,H,W,3) (``batch``: (B,H,W,3) or (H,W,3)
    allowed; else (H,W,3) only). Raises DataError starting with ``what`` (if any)."""
    at = f"{what}: " if what else ""
    if arr.size == 0:
        raise DataError(f"{at}empty input (shape {arr.shape}, no pixels); {_RGB_HINT}")
    kind = arr.dtype.kind
    if kind in "US":
        raise DataError(f"{at}not an image: the input is text (dtype {arr.dtype}); {_RGB_HINT}")
    if kind == "O":
        raise DataError(f"{at}not an image: its values are not all numbers (dtype object); {_RGB_HINT}")
    if kind == "b":
        raise DataError(f"{at}wrong dtype: the image holds booleans; {_RGB_HINT}")
    if kind in "fc":
        raise DataError(f"{at}wrong dtype: the image holds {'complex numbers' if kind == 'c' else 'floats'} "
                        f"({arr.dtype}, {_value_range(arr)}); {_RGB_HINT}. A float image in [0, 1] is refused "
                        "rather than read as a black one: multiply it by 255 and round")
    if kind not in "iu":
        raise DataError(f"{at}not an image (dtype {arr.dtype}); {_RGB_HINT}")
    shapes = "(H, W, 3) or (B, H, W, 3)" if batch else "(H, W, 3)"
    if arr.ndim == 0:
        raise DataError(f"{at}a single number, not an image; expected RGB images shaped {shapes}")
    if arr.ndim == 2:
        raise DataError(f"{at}wrong shape {arr.shape}: no channel axis; expected RGB images shaped {shapes} "
                        "(send a grey image as three equal channels)")
    if arr.ndim not in ((3, 4) if batch else (3,)):
        raise DataError(f"{at}wrong shape {arr.shape} ({arr.ndim} dimensions); expected RGB images shaped {shapes}")
    if arr.shape[-1] != 3:
        raise DataError(f"{at}wrong shape {arr.shape}: {arr.shape[-1]} channels, expected 3 (RGB) in an image "
                        f"shaped {shapes}")
    return arr if arr.ndim == 4 else arr[None]


def check_pyfunc_input(model_input: Any, *, max_pixels: int | None = PYFUNC_MAX_PIXELS) -> np.ndarray:
    """What the pyfunc model — and so the model server — accepts, checked: -> uint8 (B,H,W,3).

    Accepted: RGB images as integers 0..255 (any integer dtype: JSON numbers arrive as int64)
    — one (H,W,3) array, a (B,H,W,3) batch or a list of (H,W,3) arrays of one size — with at
    most ``max_pixels`` pixels in all (None: no limit). Anything else raises
    :class:`DataError` saying what is wrong: floats (an image in [0, 1] is refused, not
    truncated to a black one), text, booleans, nested values that are not numbers, named
    inputs, another shape (H×W without a channel axis, 1, 4 or 5 channels), empty input,
    values outside 0..255, or too many pixels. Pure numpy; the values are scanned only once
    the size is within the limit.
    """
    x = model_input
    if hasattr(x, "to_numpy") and not isinstance(x, np.ndarray):  # a pandas frame or series
        x = x.to_numpy()
    if isinstance(x, (list, tuple)):
        if not x:
            raise DataError(f"empty input (no images); {_RGB_HINT}")
        parts = [_check_image_array(np.asarray(v), f"image {i}", batch=False) for i, v in enumerate(x)]
        sizes = sorted({p.shape[1:3] for p in parts})
        if len(sizes) != 1:
            raise DataError(f"images of one call must share a size, got {sizes}")
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
    elif isinstance(x, np.ndarray):
        arr = _check_image_array(x, "", batch=True)
    elif isinstance(x, dict):
        raise DataError(f"expected one image array, got named inputs {sorted(map(str, x))}; send the image(s) "
                        'as {"inputs": [[[r, g, b], ...], ...]}')
    else:
        raise DataError(f"expected an image array, got {type(x).__name__}; {_RGB_HINT}")
    b, h, w = (int(v) for v in arr.shape[:3])
    if max_pixels is not None and b * h * w > max_pixels:
        raise DataError(f"too large: {b} image(s) of {w}×{h} = {b * h * w:,} pixels, more than the limit of "
                        f"{int(max_pixels):,} pixels per request (send smaller images or fewer per request)")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 255:
        raise DataError(f"values out of range: image values must be integers 0..255 (uint8 RGB), got min {lo}, "
                        f"max {hi}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _int_value(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def check_pyfunc_params(params: Mapping[str, Any] | None, settings: SamplerSettings) -> dict[str, Any]:
    """The pyfunc's predict params, checked against the pipeline's sampler ``settings``:
    ``seed`` (integer), ``steps`` (1..the training schedule's steps), ``tau`` (0..1),
    ``batch_size`` (>= 1); missing or None ones take the settings' values (seed 0, batch 4).
    Raises DataError naming the parameter."""
    p = dict(params or {})
    unknown = sorted(set(p) - set(PYFUNC_PARAMS))
    if unknown:
        raise DataError(f"unknown parameter(s) {unknown}; expected some of {list(PYFUNC_PARAMS)}")
    seed, steps, batch_size = (_int_value(p, k) for k in ("seed", "steps", "batch_size"))
    tau = p.get("tau")
    if tau is not None and (isinstance(tau, (bool, np.bool_)) or not isinstance(tau, (int, float, np.number))):
        raise DataError(f"parameter 'tau' must be a number in [0, 1], got {tau!r}")
    try:
        s = settings.replace(steps=steps, tau=None if tau is None else float(tau))
    except ConfigError as exc:
        raise DataError(f"bad parameter: {exc}") from None
    if batch_size is not None and batch_size < 1:
        raise DataError(f"parameter 'batch_size' must be >= 1, got {batch_size}")
    return {"seed": 0 if seed is None else seed, "steps": s.steps, "tau": s.tau,
            "batch_size": 4 if batch_size is None else batch_size}


def _max_pixels(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or int(value) != value or value < 1:
        raise ConfigError(f"MagicFusePyfunc: max_pixels must be a positive integer or None, got {value!r}")
    return int(value)


class _PyfuncMethods:
    """MLflow pyfunc wrapper: the artifact ``"pipeline"`` is our pipeline checkpoint.

    ``predict(model_input, params)``: RGB images as integers 0..255 — a (B,H,W,3) batch, one
    (H,W,3) image or a list of (H,W,3) images of one size, at most ``max_pixels`` pixels in
    all — -> uint8 (B,H,W,3) MagImgs. ``params`` may set ``seed``, ``steps``, ``tau``,
    ``batch_size``. Wrong inputs or params (see :func:`check_pyfunc_input`,
    :func:`check_pyfunc_params`) raise an error that is both a :class:`DataError` and an
    MLflow ``INVALID_PARAMETER_VALUE`` exception, so the model server answers 400 with the
    message. One prediction runs at a time per loaded model: the networks already use every
    torch thread, and concurrent requests would multiply the peak memory.

    Settings: ``device`` and ``max_pixels`` (default :data:`PYFUNC_MAX_PIXELS`; None = no
    limit), from MLflow's model config when the model was logged with one, else through
    :meth:`configure` after loading (what ``magicfuse.serve`` does).
    """

    def __init__(self, device: str = "auto"):
        self.device = device
        self.model: MagicFuse | None = None

    def load_context(self, context: Any) -> None:
        artifacts = getattr(context, "artifacts", None) or {}
        if "pipeline" not in artifacts:
            raise CheckpointError(f"MagicFusePyfunc: the model has no 'pipeline' artifact (found {sorted(artifacts)})")
        # MLflow's model_config (e.g. mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})) wins;
        # MLflow passes it only to models logged with a model_config (else see `configure`)
        config = getattr(context, "model_config", None) or {}
        self.max_pixels = _max_pixels(config.get("max_pixels", PYFUNC_MAX_PIXELS))
        self._lock = threading.Lock()  # made here, not in __init__: the logged instance is pickled
        self._pipeline = artifacts["pipeline"]
        self.model = MagicFuse.from_pretrained(self._pipeline, device=config.get("device") or self.device)

    def configure(self, *, device: str | None = None, max_pixels: int | None = PYFUNC_MAX_PIXELS) -> None:
        """Settings after loading, for the model server: ``device`` (the pipeline is loaded
        again there if it is elsewhere) and ``max_pixels`` per request (None: no limit)."""
        if self.model is None:
            raise MagicFuseError("MagicFusePyfunc: load_context was not called")
        self.max_pixels = _max_pixels(max_pixels)
        if device is not None and resolve_device(device, error=DataError) != self.model.device:
            self.model = MagicFuse.from_pretrained(self._pipeline, device=device)

    def predict(self, context: Any, model_input: Any = None, params: Mapping[str, Any] | None = None) -> np.ndarray:
        if model_input is None:  # called as predict(model_input) without a context
            context, model_input = None, context
        if self.model is None:
            raise MagicFuseError("MagicFusePyfunc: load_context was not called")
        try:
            images = check_pyfunc_input(model_input, max_pixels=getattr(self, "max_pixels", PYFUNC_MAX_PIXELS))
            p = check_pyfunc_params(params, self.model.settings)
        except DataError as exc:
            raise _pyfunc_input_error()(f"MagicFuse: {exc}") from None
        with self._lock:
            res = self.model.fuse(list(images), steps=p["steps"], tau=p["tau"], seed=p["seed"],
                                  batch_size=p["batch_size"], outputs=("magimg",))
        return np.stack([r.magimg for r in res])


_PYFUNC_CLASS: type | None = None
_PYFUNC_INPUT_ERROR: type | None = None


def _pyfunc_input_error() -> type:
    """``PyfuncInputError``: a :class:`DataError` that is also an MLflow exception with error
    code ``INVALID_PARAMETER_VALUE``, which the MLflow model server answers with HTTP 400 and
    the message (any other exception from ``predict`` becomes a 400 with a generic message)."""
    global _PYFUNC_INPUT_ERROR
    if _PYFUNC_INPUT_ERROR is None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        def __init__(self: Any, message: str) -> None:
            MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

        cls = type("PyfuncInputError", (MlflowException, DataError),
                   {"__module__": __name__, "__init__": __init__, "__doc__": _pyfunc_input_error.__doc__})
        _PYFUNC_INPUT_ERROR = cls
    return _PYFUNC_INPUT_ERROR


def _pyfunc_class() -> type:
    """``MagicFusePyfunc``, built on first use on ``mlflow.pyfunc.PythonModel`` (importing
    MLflow takes seconds, so ``import magicfuse.inference`` does not)."""
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is None:
        from mlflow.pyfunc import PythonModel

        cls = type("MagicFusePyfunc", (_PyfuncMethods, PythonModel), {"__module__": __name__,
                                                                       "__doc__": _PyfuncMethods.__doc__})
        cls.__qualname__ = "MagicFusePyfunc"
        _PYFUNC_CLASS = cls
    return _PYFUNC_CLASS


def __getattr__(name: str) -> Any:
    if name == "MagicFusePyfunc":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
