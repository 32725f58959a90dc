"""Logged models: the whole pipeline (`magicfuse.inference.MagicFusePyfunc`) and each trained
part (`ComponentPyfunc`: autoencoder, IKR, CKG) as registered MLflow pyfunc models, with
signatures from a real example, pinned requirements and the package code, and
`load_model` to load them back. MLflow is imported inside the functions (it takes seconds to import).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from magicfuse.checkpoint import load_checkpoint
from magicfuse.checkpoint import load_model as load_network
from magicfuse.data.degrade import degrade
from magicfuse.data.synthetic import generate_scene
from magicfuse.devices import resolve_device
from magicfuse.diffusion.settings import NoiseSchedule, SamplerSettings
from magicfuse.errors import CheckpointError, ConfigError, DataError
from magicfuse.imageio import to_uint8
from magicfuse.inference import PYFUNC_MAX_PIXELS, _pyfunc_class
from magicfuse.io import sha256_file
from magicfuse.mlflow_store import configure
from magicfuse.tracking.runs import TrackingError
from magicfuse.training.ae import load_autoencoder
from magicfuse.training.ldm import sample_branch


# ----------------------------------------------------------------------------- logged models
#
# Every model goes into MLflow as a pyfunc wrapper around our own checkpoint file(s)
# (the checkpoint is an artifact; the wrapper rebuilds the networks with
# magicfuse.checkpoint). `mlflow.pytorch.log_model` is not used: its torch.export
# default fails on our multi-input networks, and a pickled nn.Module would tie the
# model to the class layout. Inputs and outputs are numpy uint8 images, following
# the data-layer conventions: visible (B,H,W,3) RGB, infrared (B,H,W).

COMPONENT_KINDS = ("ae", "ikr", "ckg")
PIPELINE_ARTIFACT = "pipeline"
_REQUIREMENT_PACKAGES = ("torch", "numpy", "opencv-python-headless", "pyyaml", "mlflow", "cloudpickle")


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model: the installed versions of what the wrappers import.

    Giving them explicitly keeps MLflow from inferring requirements (which loads the model
    in a subprocess: slow, and needs nothing from the network either way). The
    `magicfuse` package itself travels inside the model (`code_paths`).
    """
    from importlib import metadata

    reqs = []
    for pkg in _REQUIREMENT_PACKAGES:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
            continue
        reqs.append(f"{pkg}=={version.split('+')[0]}")
    return reqs


def _images_to_tensor(images: Any, where: str) -> Any:
    """uint8 (B,H,W,3) (or one (H,W,3)) RGB array -> float32 (B,3,H,W) tensor in [0,1]."""
    if hasattr(images, "to_numpy") and not isinstance(images, np.ndarray):  # a pandas frame/series
        images = images.to_numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"{where}: expected uint8 RGB images of shape (B,H,W,3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise DataError(f"{where}: expected dtype uint8 images, got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{where}: empty image batch of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)


def _int_param(params: Mapping[str, Any] | None, name: str, default: int) -> int:
    value = (params or {}).get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or int(value) != value:
        raise ConfigError(f"predict: parameter {name!r} must be an integer, got {value!r}")
    return int(value)


class _ComponentModel:
    """pyfunc wrapper of one trained part (autoencoder, IKR or CKG denoiser).

    * ``ae``:  images (B,H,W,3) uint8 -> reconstructions D(E(x)) (B,H,W,3) uint8
    * ``ikr``: degraded images -> restored images (B,H,W,3) uint8 (single DDIM stream)
    * ``ckg``: degraded images -> generated infrared (B,H,W) uint8 (channel mean of the decoded image)

    Artifacts: ``"ae"`` (autoencoder checkpoint, ours or the authors') and, for the
    branches, ``"unet"`` (our "unet" checkpoint). Predict params: ``seed`` (encoder
    noise and z_T; same seed => same bytes), ``steps`` (DDIM steps, branches only).
    Runs on CUDA when available (model config ``device`` overrides); the random draws
    come from a CPU generator, so a seed gives the same bytes on the same device.
    """

    def __init__(self, kind: str, *, steps: int = 25, seed: int = 0):
        if kind not in COMPONENT_KINDS:
            raise ConfigError(f"component model kind must be one of {list(COMPONENT_KINDS)}, got {kind!r}")
        self.kind = kind
        self.steps = int(steps)
        self.seed = int(seed)

    def load_context(self, context) -> None:  # noqa: ANN001
        self.device = resolve_device((getattr(context, "model_config", None) or {}).get("device") or "auto",
                                     what="model_config device")
        self.ae = load_autoencoder(context.artifacts["ae"]).eval().to(self.device)
        self.unet = None
        if self.kind != "ae":
            self.unet, payload = load_network(context.artifacts["unet"], kind="unet")
            # sample over the schedule the denoiser was trained with
            self.schedule = NoiseSchedule.of_denoiser(payload.get("train_config"))
            self.unet.eval().to(self.device)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - no hints: MLflow reads them as a schema
        x = _images_to_tensor(model_input, f"magicfuse {self.kind} model").to(self.device)
        seed = _int_param(params, "seed", self.seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if self.kind == "ae":
                h, w = x.shape[-2:]
                ph, pw = (-h) % 4, (-w) % 4
                if ph or pw:
                    mode = "reflect" if ph < h and pw < w else "replicate"
                    x = F.pad(x, (0, pw, 0, ph), mode=mode)
                out = self.ae(x, None, gen)[..., :h, :w]
            else:
                steps = _int_param(params, "steps", self.steps)
                out = sample_branch(self.ae, self.unet, x, steps=steps, generator=gen,
                                    schedule=self.schedule.ddim(steps, self.device))
                if self.kind == "ckg":
                    out = out.mean(dim=1, keepdim=True)
        return to_uint8(out)


def _component_pyfunc_class() -> type:
    """`ComponentPyfunc`: `_ComponentModel` as an `mlflow.pyfunc.PythonModel`.

    Built on first use (module `__getattr__`) so that importing this module does not
    import MLflow's pyfunc machinery (~3 s); pickles by reference as
    `magicfuse.tracking.ComponentPyfunc`.
    """
    existing = globals().get("ComponentPyfunc")
    if existing is not None:
        return existing
    import mlflow.pyfunc

    cls = type("ComponentPyfunc", (_ComponentModel, mlflow.pyfunc.PythonModel),
               {"__module__": __name__, "__qualname__": "ComponentPyfunc", "__doc__": _ComponentModel.__doc__})
    globals()["ComponentPyfunc"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "ComponentPyfunc":
        return _component_pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _example_image(example_hw: tuple[int, int], seed: int = 0) -> Any:
    """One (1,H,W,3) uint8 degraded visible image: a synthetic scene with a fixed degradation."""
    h, w = (int(v) for v in example_hw)
    scene = generate_scene(seed, 0, height=h, width=w)
    degraded, _ = degrade(scene.visible, seed)
    return degraded[None]


def _image_signature(example_in: Any, example_out: Any, params: Mapping[str, Any]) -> Any:
    """infer_signature on the example, then free the batch and spatial sizes (any B, H, W)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    inferred = infer_signature(example_in, example_out, params=dict(params))

    def free(schema: Any, arr: Any) -> Any:
        spec = schema.inputs[0]
        shape = (-1, -1, -1) + tuple(arr.shape[3:])
        return Schema([TensorSpec(np.dtype(spec.type), shape, spec.name)])

    return ModelSignature(inputs=free(inferred.inputs, example_in), outputs=free(inferred.outputs, example_out),
                          params=inferred.params)


def _log_pyfunc(python_model: Any, artifacts: dict[str, str], *, registered_name: str, example_in: Any,
                example_out: Any, params: Mapping[str, Any], tags: Mapping[str, str] | None,
                name: str, run_name: str, example_params: Mapping[str, Any] | None = None,
                model_config: Mapping[str, Any] | None = None) -> Any:
    """`model_config`: the wrapper's settings and their defaults. MLflow lets a loader override
    only the keys logged here (`load_model(uri, model_config={"device": "cpu"})`), and ignores
    every key of a model logged without one."""
    import mlflow

    signature = _image_signature(example_in, example_out, params)
    own_run = mlflow.active_run() is None
    if own_run:
        configure()
        mlflow.start_run(run_name=run_name, tags={"magicfuse.kind": "model-logging"})
    try:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=python_model,
            artifacts=artifacts,
            signature=signature,
            input_example=(example_in, dict(params if example_params is None else example_params)),
            pip_requirements=pip_requirements(),
            code_paths=[str(_package_dir())],
            model_config=dict(model_config or {"device": "auto"}),
        )
    finally:
        if own_run:
            mlflow.end_run()
    # The version is created with its tags in one step: a process killed in between (kill -9
    # during `dvc repro`) would leave a version without magicfuse.checkpoint_sha256, which the
    # rerun could not recognise (magicfuse.pipeline registers a checkpoint only once).
    all_tags = {key: str(value) for key, value in {**(tags or {}), "magicfuse.model_uri": info.model_uri}.items()}
    mv = mlflow.register_model(info.model_uri, registered_name, tags=all_tags)
    if mv is None or mv.version is None:
        raise TrackingError(f"MLflow did not register model {registered_name!r} (run {info.run_id})")
    return mlflow.MlflowClient().get_model_version(registered_name, str(mv.version))




def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: {what} checkpoint not found")
    return p.resolve()


def log_pipeline_model(checkpoint_path: str | Path, *, registered_name: str = "magicfuse",
                       example_hw: tuple[int, int] = (96, 128), tags: Mapping[str, str] | None = None) -> Any:
    """Log the full MagicFuse pipeline (a pipeline checkpoint) as a registered pyfunc model.

    The wrapper is `magicfuse.inference.MagicFusePyfunc` (artifact "pipeline" = the
    checkpoint): degraded visible uint8 (B,H,W,3) -> MagImg uint8 (B,H,W,3); predict
    params `seed`, `steps`, `tau`, `batch_size` (defaults: the checkpoint's sampler
    settings). The signature comes from running the model once on a synthetic degraded
    image of size `example_hw`; the stored input example asks for one DDIM step (MLflow
    re-runs it to validate the logged model). Logs into the active run (else a run of
    its own) and returns the new `ModelVersion`, tagged with the checkpoint's sha256.
    """
    from mlflow.pyfunc import PythonModelContext

    MagicFusePyfunc = _pyfunc_class()
    ckpt = _existing(checkpoint_path, "pipeline")
    payload = load_checkpoint(ckpt, kind="pipeline")
    settings = SamplerSettings.from_mapping(payload["sampler"], where=f"{ckpt}: sampler settings")
    sampler = settings.to_dict()
    params = {"seed": 0, "steps": settings.steps, "tau": settings.tau, "batch_size": 4}
    example_params = {**params, "steps": 1}
    example_in = _example_image(example_hw)
    probe = MagicFusePyfunc()
    probe.load_context(PythonModelContext(artifacts={PIPELINE_ARTIFACT: str(ckpt)}, model_config={}))
    example_out = probe.predict(None, example_in, example_params)
    all_tags = {"magicfuse.kind": "pipeline", "magicfuse.checkpoint_sha256": sha256_file(ckpt),
                "magicfuse.sampler": json.dumps(sampler, sort_keys=True, default=str), **(tags or {})}
    return _log_pyfunc(MagicFusePyfunc(), {PIPELINE_ARTIFACT: str(ckpt)}, registered_name=registered_name,
                       example_in=example_in, example_out=example_out, params=params,
                       example_params=example_params, tags=all_tags, name="magicfuse",
                       run_name=f"log-model-{registered_name}",
                       model_config={"device": "auto", "max_pixels": PYFUNC_MAX_PIXELS})


def log_component_model(kind: str, checkpoint_path: str | Path, ae_checkpoint: str | Path | None = None, *,
                        registered_name: str | None = None, example_hw: tuple[int, int] = (32, 48),
                        steps: int = 25, seed: int = 0, tags: Mapping[str, str] | None = None) -> Any:
    """Log one trained part as a registered pyfunc model (default name "magicfuse-<kind>").

    `kind` "ae": `checkpoint_path` is the autoencoder. "ikr"/"ckg": it is the denoiser
    ("unet" checkpoint) and `ae_checkpoint` the autoencoder it was trained with.
    Predict params `seed` and `steps` default to the given values. Returns the `ModelVersion`.
    """
    from mlflow.pyfunc import PythonModelContext

    if kind not in COMPONENT_KINDS:
        raise ConfigError(f"log_component_model: kind must be one of {list(COMPONENT_KINDS)}, got {kind!r}")
    ckpt = _existing(checkpoint_path, kind)
    if kind == "ae":
        artifacts = {"ae": str(ckpt)}
    else:
        if ae_checkpoint is None:
            raise ConfigError(f"log_component_model: the {kind} model needs ae_checkpoint (the autoencoder it uses)")
        artifacts = {"unet": str(ckpt), "ae": str(_existing(ae_checkpoint, "autoencoder"))}
    params = {"seed": int(seed)} if kind == "ae" else {"seed": int(seed), "steps": int(steps)}
    cls = _component_pyfunc_class()
    model = cls(kind, steps=steps, seed=seed)
    probe = cls(kind, steps=steps, seed=seed)
    probe.load_context(PythonModelContext(artifacts=artifacts, model_config={}))
    example_in = _example_image(example_hw)
    # The example request runs one DDIM step: its output has the same shape and dtype as
    # with `steps`, and MLflow re-runs the example when it validates the logged model.
    example_params = {**params, "steps": 1} if "steps" in params else dict(params)
    example_out = probe.predict(None, example_in, example_params)
    all_tags = {"magicfuse.kind": kind, "magicfuse.checkpoint_sha256": sha256_file(ckpt), **(tags or {})}
    name = registered_name or f"magicfuse-{kind}"
    return _log_pyfunc(model, artifacts, registered_name=name, example_in=example_in, example_out=example_out,
                       params=params, example_params=example_params, tags=all_tags, name=f"magicfuse-{kind}",
                       run_name=f"log-model-{name}")


def load_model(uri: str, *, model_config: Mapping[str, Any] | None = None) -> Any:
    """`mlflow.pyfunc.load_model` on the configured tracking store, e.g. "models:/magicfuse@champion".
    `model_config` reaches the wrapper's context, e.g. {"device": "cpu"} (default: CUDA when available)."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI") and mlflow.get_tracking_uri().startswith("file:"):
        configure()
    try:
        return mlflow.pyfunc.load_model(uri, model_config=dict(model_config) if model_config else None)
    except Exception as exc:  # MlflowException, missing artifacts...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot load MLflow model {uri!r}: {first}") from None
