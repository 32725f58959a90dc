"""The training machinery shared by every trainer (AE, IKR/CKG denoisers, MKF).

A trainer builds a `TrainJob` (the trainable network, a loss function, an
epoch -> batches function and an exporter) and hands it to `run_training`, whose
loop reads top to bottom:

    resume from out_dir/last.pt if it exists
    for step in range(start, cfg.steps):
        batch  <- the (seed, epoch) loader, already-consumed batches skipped
        gen    <- a torch.Generator seeded from (seed, step, rank)
        loss   <- job.loss_fn(model, batch, gen)        (bf16 autocast on CUDA)
        stop with TrainingError if the loss or the gradient is not finite
        backward, clip, optimiser step, EMA update
        log / progress bar / preview / train-state checkpoint
    export the EMA weights as the final model checkpoint; write history, metrics

Exact resume: every bit of randomness of a step comes from (seed, step, rank)
and the data order from (seed, epoch), and the train-state stores model, EMA,
optimiser, step, position in the epoch and the global RNG states, so a killed
run that resumes reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from magicfuse.config import to_dict
from magicfuse.errors import CheckpointError, ConfigError, DataError, TrainingError
from magicfuse.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from magicfuse.training import distributed as ddp
from magicfuse.checkpoint import load_checkpoint, save_checkpoint
from magicfuse.data.shards import make_loader

Logger = Callable[[dict[str, float], int], None]
ArtifactFn = Callable[[Path], None]

LAST = "last.pt"


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TrainConfig:
    """Fields shared by every trainer. `batch_size` is per process under torchrun."""

    steps: int = 100
    batch_size: int = 4
    crop: int | None = 64  # square random crop (side, pixels); None = full frames
    lr: float = 1e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD only
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA (the final checkpoint then holds the raw weights)
    warmup_steps: int = 0  # linear learning-rate warm-up
    lr_decay_every: int = 0  # step decay: lr × lr_decay_gamma every this many steps (0 = never)
    lr_decay_gamma: float = 0.5
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    sample_every: int = 0  # preview grids every this many steps (0 = never)
    # score the (EMA) model with the trainer's own evaluation every this many steps (0 = only
    # once, after training): the scores go to the history (loss.csv, history.json, loss.png)
    # and to the logger as "eval/<name>" at that step, so MLflow plots them against steps
    eval_every: int = 0
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    split: str = "train"
    init_from: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every,
                    "ckpt_every": self.ckpt_every}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {value}")
        nonneg = {"sample_every": self.sample_every, "eval_every": self.eval_every, "num_workers": self.num_workers,
                  "warmup_steps": self.warmup_steps, "lr_decay_every": self.lr_decay_every,
                  "grad_clip": self.grad_clip, "weight_decay": self.weight_decay}
        for key, value in nonneg.items():
            if value < 0:
                raise ConfigError(f"{name}.{key} must be >= 0, got {value}")
        if self.crop is not None and self.crop < 1:
            raise ConfigError(f"{name}.crop must be a positive side length or null, got {self.crop}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{name}.lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{name}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.lr_decay_gamma <= 1.0:
            raise ConfigError(f"{name}.lr_decay_gamma must be in (0, 1], got {self.lr_decay_gamma}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{name}.betas must be in [0, 1), got {self.betas}")


# Fields that may change between a run and its resumption (they do not change the maths).
RESUMABLE_CHANGES = frozenset(
    {"steps", "log_every", "ckpt_every", "sample_every", "eval_every", "num_workers", "device", "progress",
     "init_from"}
)


@dataclass
class TrainResult:
    checkpoint: Path  # the final model checkpoint (MKF: the pipeline bundle)
    final_metrics: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    images_per_s: float
    files: dict[str, Path] = field(default_factory=dict)  # every exported file by role (rank 0)
    model: nn.Module | None = field(default=None, repr=False)  # the trained network (raw weights), every rank


@dataclass
class TrainJob:
    """What a trainer hands to `run_training`.

    * `loss_fn(model, batch, generator) -> (loss, metrics)`: `model` is the
      trainable network (DDP-wrapped under torchrun), `batch` is on the device,
      `generator` a per-step torch.Generator on the device; `metrics` are scalar
      tensors (detached) logged beside the loss.
    * `make_loader(epoch)` -> iterable of batches for that epoch (rank-aware).
    * `export(module, out_dir) -> {role: path}`: writes the final model files from
      `module` (the EMA weights when EMA is on); the first entry is the main one.
    * `evaluate(module) -> metrics`, `preview(module, batch, generator) -> (3,H,W)
      image in [0,1]`: optional, run on rank 0 only.
    """

    name: str
    model: nn.Module
    model_config: dict[str, Any]
    loss_fn: Callable[[nn.Module, dict[str, Any], torch.Generator], tuple[Tensor, dict[str, Tensor]]]
    make_loader: Callable[[int], Iterable[dict[str, Any]]]
    export: Callable[[nn.Module, Path], dict[str, Path]]
    manifest_hash: str | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    preview: Callable[[nn.Module, dict[str, Any], torch.Generator], Tensor] | None = None
    find_unused_parameters: bool = False


# --------------------------------------------------------------------------- small helpers


def shard_loader(shards_dir: str | Path, cfg: TrainConfig, info: ddp.DistInfo,
                 members: tuple[str, ...]) -> Callable[[int], Iterable[dict[str, Any]]]:
    """A `TrainJob.make_loader`: the `cfg.split` shards with `members`, square `cfg.crop` crops,
    shuffled per epoch and split by rank."""
    crop = None if cfg.crop is None else (cfg.crop, cfg.crop)

    def loader(epoch: int):
        return make_loader(shards_dir, cfg.split, batch_size=cfg.batch_size, crop=crop,
                           num_workers=cfg.num_workers, seed=cfg.seed, epoch=epoch, rank=info.rank,
                           world_size=info.world_size, shuffle=True, members=members)

    return loader


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. building a network) under a fixed global torch seed, restoring the RNG after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, platforms and processes)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, step, rank)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, rank, 0x5EED))
    return gen


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up, then step decay."""
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    if cfg.lr_decay_every:
        lr *= cfg.lr_decay_gamma ** (step // cfg.lr_decay_every)
    return lr


def make_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the network to train has no trainable parameters")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {cfg.optimizer!r}")


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def batch_images(batch: dict[str, Any]) -> int:
    for key in ("degraded", "clean", "infrared"):
        if key in batch and torch.is_tensor(batch[key]):
            return int(batch[key].shape[0])
    return len(batch.get("key", ()))


def freeze(module: nn.Module) -> nn.Module:
    """Evaluation mode, no gradients: for the networks a trainer keeps fixed."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so
    short runs are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p for p in model.parameters()]
        for e, p in zip(ema_p, cur_p):
            if p.dtype.is_floating_point:
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state_dict": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["state_dict"])


# --------------------------------------------------------------------------- RNG state


def capture_rng(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _py_state_to_plain(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_plain_to_py_state(state["python"]))
    if device.type == "cuda" and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _plain_to_py_state(st: list) -> tuple:
    return (st[0], tuple(st[1]), st[2])


# --------------------------------------------------------------------------- data stream


class BatchStream:
    """Endless batches, epoch after epoch, from `make_loader(epoch)`.

    `epoch` and `index` (batches consumed in that epoch) are the resume point: a new
    stream at (epoch, index) rebuilds that epoch's loader and skips `index` batches.
    """

    def __init__(self, make_loader: Callable[[int], Iterable[dict[str, Any]]], epoch: int = 0, index: int = 0):
        self.make_loader = make_loader
        self.epoch = int(epoch)
        self.index = 0
        self._skip = int(index)
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = iter(self.make_loader(self.epoch))
                self.index = 0
                while self._skip > 0:
                    try:
                        next(self._it)
                    except StopIteration:
                        break
                    self._skip -= 1
                    self.index += 1
                self._skip = 0
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise DataError(f"the training data yields no batch (epoch {self.epoch})") from None
                self.epoch += 1
                self._it = None
                continue
            self.index += 1
            return batch


# --------------------------------------------------------------------------- checkpoints


def _save(path: Path, payload: dict[str, Any]) -> None:
    save_checkpoint(path, payload)


def _load(path: Path, kind: str) -> dict[str, Any]:
    return load_checkpoint(path, kind=kind)


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.dtype.is_floating_point)


def _check_resume_config(path: Path, saved: dict[str, Any], current: dict[str, Any], stage: str,
                         saved_stage: str | None) -> None:
    if saved_stage != stage:
        raise CheckpointError(f"{path}: train-state of stage {saved_stage!r}, cannot resume stage {stage!r}")
    diffs = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"{path}: cannot resume, the training configuration changed ({detail}); "
            f"use another output folder or delete {path} to start over"
        )


# --------------------------------------------------------------------------- outputs


def _write_outputs(out_dir: Path, name: str, history: list[dict[str, float]], metrics: dict[str, float],
                   artifacts: ArtifactFn | None) -> None:
    write_json_atomic(out_dir / "history.json", history)
    write_json_atomic(out_dir / "metrics.json", {name: metrics})
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    write_text_atomic(out_dir / "loss.csv", buf.getvalue())
    if history:
        png = _loss_plot(history, name)
        if png is not None:
            write_bytes_atomic(out_dir / "loss.png", png)
            if artifacts is not None:
                artifacts(out_dir / "loss.png")


def eval_panels(keys: Any) -> list[list[str]]:
    """Group the ``eval/*`` history keys into plot panels: one per metric, a key that extends
    another with ``_<suffix>`` (``psnr_baseline``, ``x0_mse_other_cond``) drawn beside it, and
    ``eval_samples`` (a count, not a score) left out."""
    names = sorted(k for k in set(keys) if k.startswith("eval/") and k != "eval/eval_samples")
    heads = [k for k in names if not any(k != h and k.startswith(h + "_") for h in names)]
    return [[h] + [k for k in names if k.startswith(h + "_")] for h in heads]


def _loss_plot(history: list[dict[str, float]], name: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [h for h in history if "loss" in h]
    panels = eval_panels(k for h in history for k in h)
    cols = min(4, 1 + len(panels))
    nrows = -(-(1 + len(panels)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols if panels else 6, 3.2 * nrows), dpi=100,
                             squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name} training loss")
    if rows and all(h["loss"] > 0 for h in rows):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    for ev, keys in zip(flat[1:], panels):  # one scale per metric: a 17 dB PSNR does not flatten a +0.2 contrast
        for k, style in zip(keys, ("-o", "--", ":", "-.")):
            pts = [(h["step"], h[k]) for h in history if k in h]
            ev.plot([p[0] for p in pts], [p[1] for p in pts], style, label=k.removeprefix("eval/"))
        ev.set_xlabel("step")
        ev.set_title(f"{name}: {keys[0].removeprefix('eval/')}", fontsize=9)
        ev.grid(alpha=0.3)
        if len(keys) > 1:
            ev.legend(fontsize=7)
    for unused in flat[1 + len(panels):]:
        unused.axis("off")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _write_preview(path: Path, image: Tensor) -> None:
    import cv2

    img = image.detach().float().clamp(0, 1).cpu()
    if img.dim() == 4:
        img = torch.cat(list(img), dim=-1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    if not ok:
        raise TrainingError(f"{path}: could not encode the preview image")
    write_bytes_atomic(path, buf.tobytes())


# --------------------------------------------------------------------------- the loop


def _record_eval(history: list[dict[str, float]], step: int, scores: dict[str, float],
                 logger: Logger | None) -> None:
    """Put the evaluation `scores` of `step` into the history (the row of that step when it
    has one, else a row of its own) and log them as "eval/<name>"."""
    named = {f"eval/{k}": float(v) for k, v in scores.items()}
    if not named:
        return
    if history and history[-1].get("step") == step:
        history[-1].update(named)
    else:
        history.append({"step": step, **named})
    if logger is not None:
        logger(named, step)


def run_training(cfg: TrainConfig, job: TrainJob, out_dir: str | Path, *, logger: Logger | None = None,
                 artifacts: ArtifactFn | None = None) -> TrainResult:
    """Train `job.model` for `cfg.steps` steps, resuming from `out_dir/last.pt` if present."""
    out_dir = Path(out_dir)
    info = ddp.init_distributed(cfg.device)
    device = ddp.resolve_device(cfg.device, info)
    main = info.is_main
    last = out_dir / LAST
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    model = job.model.to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = make_optimizer(cfg, model.parameters())
    progress: dict[str, Any] = {"step": 0, "epoch": 0, "index": 0, "seconds": 0.0, "images": 0,
                                "history": [], "window": {}, "window_n": 0}
    torch.manual_seed(derive_seed(cfg.seed, info.rank, 0x1417))
    np.random.seed(derive_seed(cfg.seed, info.rank) % (1 << 32))
    random.seed(derive_seed(cfg.seed, info.rank, 1))

    # ---- resume
    if last.exists():
        state = _load(last, kind="train-state")
        _check_resume_config(last, state.get("config", {}), to_dict(cfg), job.name, state.get("stage"))
        if job.manifest_hash is not None and state.get("manifest_hash") not in (None, job.manifest_hash):
            raise DataError(
                f"{last}: the training data changed since this run started (manifest hash "
                f"{state.get('manifest_hash')} -> {job.manifest_hash}); use another output folder"
            )
        model.load_state_dict(state["state_dict"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        progress = dict(state["progress"])
        restore_rng(state["rng"], device)
    start = int(progress["step"])

    train_model = ddp.wrap_model(model, device, find_unused_parameters=job.find_unused_parameters)
    batches = BatchStream(job.make_loader, progress["epoch"], progress["index"])
    history: list[dict[str, float]] = list(progress["history"])
    window: dict[str, float] = dict(progress["window"])
    window_n = int(progress["window_n"])
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=f"train {job.name}", unit="step",
               disable=not (main and cfg.progress), file=sys.stderr, dynamic_ncols=True)
    t_session = time.perf_counter()
    t_window = t_session
    window_images = 0

    def save_state(step: int, epoch: int, index: int) -> None:
        if not _all_finite(model):
            raise TrainingError(
                f"{out_dir}: weights are not finite after step {step}; not overwriting the last good "
                f"checkpoint {last}"
            )
        if main:
            _save(last, {
                "format": "magicfuse", "version": 1, "kind": "train-state", "stage": job.name,
                "config": to_dict(cfg), "model_config": job.model_config,
                "state_dict": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "lr_at(cfg, step)", "lr": lr_at(cfg, max(step - 1, 0))},
                "progress": {"step": step, "epoch": epoch, "index": index,
                             "seconds": progress["seconds"] + time.perf_counter() - t_session,
                             "images": images, "history": history, "window": window, "window_n": window_n},
                "rng": capture_rng(device),
                "manifest_hash": job.manifest_hash,
            })
        ddp.barrier()

    images = int(progress["images"])
    step = start
    try:
        while step < cfg.steps:
            batch = to_device(next(batches), device)
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = step_generator(cfg.seed, step, info.rank, device)
            model.train()
            with autocast(cfg, device):
                loss, metrics = job.loss_fn(train_model, batch, gen)
            values = ddp.all_reduce_mean(torch.stack([loss.detach().float()] +
                                                     [v.detach().float().reshape(()).to(loss.device) for v in metrics.values()]))
            values = values.tolist()
            if not math.isfinite(values[0]):
                raise TrainingError(
                    f"{out_dir}: loss is {values[0]} at step {step + 1} of stage {job.name!r}; stopped. "
                    f"The last good checkpoint is kept: {last if last.exists() else 'none written yet'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
            if ddp.any_rank(not bool(torch.isfinite(grad_norm)), device):
                raise TrainingError(
                    f"{out_dir}: gradient norm is not finite at step {step + 1} of stage {job.name!r}; "
                    f"stopped. The last good checkpoint is kept: {last if last.exists() else 'none written yet'}"
                )
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            n_img = batch_images(batch) * info.world_size
            images += n_img
            window_images += n_img

            row = {"loss": values[0], **{k: values[i + 1] for i, k in enumerate(metrics)},
                   "grad_norm": float(grad_norm), "lr": lr}
            for k, v in row.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            elapsed = time.perf_counter() - t_session
            ips = (images - int(progress["images"])) / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.4g}", img_s=f"{ips:.1f}")

            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                entry = {"step": step, **{k: v / window_n for k, v in window.items()},
                         "images_per_s": window_images / max(now - t_window, 1e-9)}
                history.append(entry)
                window, window_n, window_images, t_window = {}, 0, 0, now
                if main and logger is not None:
                    logger({k: v for k, v in entry.items() if k != "step"}, step)

            if main and cfg.sample_every and step % cfg.sample_every == 0 and job.preview is not None:
                shown = ema.module if ema is not None else model
                with torch.no_grad(), autocast(cfg, device):
                    grid = job.preview(shown, batch, torch.Generator(device=device).manual_seed(cfg.seed))
                path = out_dir / "samples" / f"step_{step:07d}.png"
                _write_preview(path, grid)
                if artifacts is not None:
                    artifacts(path)

            if main and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps \
                    and job.evaluate is not None:
                _record_eval(history, step, job.evaluate(ema.module if ema is not None else model), logger)

            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_state(step, batches.epoch, batches.index)
    finally:
        bar.close()

    # ---- export
    seconds = float(progress["seconds"]) + time.perf_counter() - t_session if step > start else float(progress["seconds"])
    images_per_s = images / seconds if seconds > 0 else 0.0
    files: dict[str, Path] = {}
    final: dict[str, float] = {}
    if main:
        final_module = ema.module if ema is not None else model
        files = dict(job.export(final_module, out_dir))
        if not files:
            raise TrainingError(f"{out_dir}: stage {job.name!r} exported no checkpoint")
        if history:
            final["loss"] = history[-1]["loss"]
        final.update({"steps": float(step), "seconds": seconds, "images_per_s": images_per_s,
                      "images": float(images)})
        if job.evaluate is not None:
            scores = {k: float(v) for k, v in job.evaluate(final_module).items()}
            final.update(scores)
            if cfg.eval_every:
                _record_eval(history, step, scores, logger)
        _write_outputs(out_dir, job.name, history, final, artifacts)
    ddp.barrier()
    if not main:
        files = {}
    checkpoint = next(iter(files.values())) if files else out_dir / f"{job.name}.pt"
    return TrainResult(checkpoint=checkpoint, final_metrics=final, history=history, seconds=seconds,
                       images_per_s=images_per_s, files=files, model=model)


def model_checkpoint_payload(kind: str, module: nn.Module, model_config: dict[str, Any], cfg: TrainConfig,
                             **extra: Any) -> dict[str, Any]:
    """The payload of a final model checkpoint (kind "ae" | "unet" | "fusion")."""
    return {"format": "magicfuse", "version": 1, "kind": kind, "config": model_config,
            "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "train_config": to_dict(cfg), **extra}


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
