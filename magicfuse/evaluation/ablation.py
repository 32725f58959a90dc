"""The τ sweep (Fig. 7) and the Models I–IV ablations (Tables 6–7), as a library.

`run_ablations(nets, images, ...)` runs the joint sampler on a list of degraded
visible images once per τ in ``taus`` (variant ``full``) and once per ablation
variant (at the default τ), scores every run with the fusion metrics
(`magicfuse.evaluation.metrics`, A = real infrared, B = the visible reference the
caller passes) and, where the variant has a segmentation output, with the
segmentation head's own mIoU ("Ours-S") on the labels. `write_ablation_report`
writes the tables and the τ plot with `magicfuse.evaluation.report.write_report`.
`magicfuse.evaluation.pipeline.run_evaluation` calls both; they work standalone too.

The variants (DESIGN.md §1; `magicfuse.diffusion.sampler`):

* ``model1`` — F without the ẑ0 inputs. The paper retrains F without them. Here,
  with one trained pipeline, the SAME weights run with ``use_zhat=False`` (the ẑ0
  slots of F's input are zeros; the parameter layout is unchanged): an
  **inference-time ablation**, not a retrained one.
* ``model2`` — no segmentation head: the head of the trained F still runs (its
  state is part of F) but its output is ignored — no radiation weighting, no map.
  Again inference-time, on the same weights.
* ``model3`` — output fusion instead of noise fusion; ``model4`` — IKR only. These
  need no retraining, so they match the paper's protocol.

Every run samples through the project's one runner, `magicfuse.inference.MagicFuse`
(``run_batch`` with the variant): every image gets its own z_T, segmentation noise and
encoder noise from a generator seeded by ``image_seed(seed, key)``, exactly as
``magicfuse fuse --seed`` seeds a file whose name (relative, without suffix) is the
key. So one image gets the same starting noise in every run (τ values, variants,
subsets), runs differ only by what is being ablated, and a report image is what
``magicfuse fuse`` writes for it (same batch size; other batch sizes agree up to
rounding). Outputs are rounded to uint8 (the authors' code truncates; METRICS.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from magicfuse.data.classes import IGNORE_INDEX, MFNET_CLASSES, NUM_CLASSES
from magicfuse.diffusion.settings import VARIANTS
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.metrics import compute_metrics_batch
from magicfuse.evaluation.report import write_report
from magicfuse.evaluation.segmentation import ConfusionMatrix
from magicfuse.inference import MagicFuse, image_seed

__all__ = [
    "ABLATION_VARIANTS",
    "VARIANT_LABELS",
    "OURS_S_MIOU",
    "SampleRun",
    "AblationResult",
    "sample_set",
    "visual_means",
    "segmentation_scores",
    "run_ablations",
    "write_ablation_report",
]

ABLATION_VARIANTS: tuple[str, ...] = ("model1", "model2", "model3", "model4")

# Row names (MLflow-safe: letters, digits, spaces, '-', '.', ':' only).
VARIANT_LABELS: dict[str, str] = {
    "full": "MagicFuse full",
    "model1": "Model I - F without zhat inputs",
    "model2": "Model II - no segmentation head",
    "model3": "Model III - output fusion",
    "model4": "Model IV - IKR only",
}
VARIANT_NOTES: dict[str, str] = {
    "full": "the evaluated pipeline",
    "model1": "inference-time: same trained F with zero zhat inputs (the paper retrains F)",
    "model2": "inference-time: same trained F, head output ignored (the paper retrains F without S)",
    "model3": "no retraining needed: F fuses the final latents once",
    "model4": "no retraining needed: the IKR branch alone",
}
OURS_S_MIOU = "Ours-S mIoU"


# --------------------------------------------------------------------------- sampling


@dataclass
class SampleRun:
    """Sampler outputs for a list of images (uint8 numpy, one entry per image).

    ``magimg``/``ikr``/``ckg`` (H,W,3); ``ckg_ir`` (H,W) = the CKG image's channel
    mean; ``seg`` (H,W) uint8 class ids. Lists are None where the variant has no
    such output (e.g. ``seg`` for model2/model4, ``ckg`` for model4).
    """

    keys: list[str]
    variant: str
    tau: float
    steps: int
    magimg: list[np.ndarray]
    ikr: list[np.ndarray]
    ckg: list[np.ndarray] | None
    ckg_ir: list[np.ndarray] | None
    seg: list[np.ndarray] | None
    seconds: float = 0.0

    def head(self, n: int) -> "SampleRun":
        """The first `n` images."""
        cut = (lambda v: None if v is None else v[:n])
        return SampleRun(self.keys[:n], self.variant, self.tau, self.steps, self.magimg[:n], self.ikr[:n],
                         cut(self.ckg), cut(self.ckg_ir), cut(self.seg), self.seconds)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)


def _check_images(images: Sequence[np.ndarray], keys: Sequence[str]) -> None:
    if len(images) != len(keys):
        raise DataError(f"sample_set: {len(images)} images but {len(keys)} keys")
    if not images:
        raise DataError("sample_set: no images")
    for img, key in zip(images, keys):
        a = np.asarray(img)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise DataError(f"sample_set: image {key!r} must be uint8 (H,W,3) RGB, got {a.dtype} {a.shape}")


def sample_set(runner: MagicFuse, images: Sequence[np.ndarray], keys: Sequence[str], *,
               tau: float | None = None, variant: str = "full", seed: int = 0, batch_size: int = 8,
               progress: bool = True, desc: str | None = None) -> SampleRun:
    """Run `runner` (`MagicFuse.run_batch`) on uint8 RGB images; batches group same-size images.

    Image ``keys[i]`` is seeded with ``image_seed(seed, keys[i])``, as ``magicfuse fuse
    --seed`` seeds a file named ``<key>.png``; results do not depend on the order, and on
    the batch composition only up to float rounding of batched kernels. Big images run
    with the runner's tiling budget (on CPU, window attention above 4,096 latent positions).
    """
    _check_images(images, keys)
    if batch_size < 1:
        raise ConfigError(f"sample_set: batch_size must be >= 1, got {batch_size}")
    tau = runner.tau if tau is None else float(tau)
    n = len(images)
    out: dict[str, list[Any]] = {k: [None] * n for k in ("magimg", "ikr", "ckg", "ckg_ir", "seg")}
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(np.asarray(img).shape[:2]), []).append(i)
    bar = _progress(n, desc or f"sample[{variant}, tau={tau:g}]", progress)
    t0 = time.perf_counter()
    wanted = ("magimg", "ikr", "ckg", "ckg_rgb", "seg")
    for idx in by_size.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.from_numpy(np.stack([np.asarray(images[i]) for i in chunk])).permute(0, 3, 1, 2)
            seeds = [image_seed(seed, keys[i]) for i in chunk]
            results = runner.run_batch(x.float() / 255.0, seeds, tau=tau, variant=variant, outputs=wanted)
            for i, r in zip(chunk, results):
                out["magimg"][i], out["ikr"][i], out["ckg"][i] = r.magimg, r.ikr, r.ckg_rgb
                out["ckg_ir"][i], out["seg"][i] = r.ckg, r.seg
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()

    def full(name: str) -> list[np.ndarray] | None:
        vals = out[name]
        return None if any(v is None for v in vals) else list(vals)

    return SampleRun(keys=list(keys), variant=variant, tau=tau, steps=runner.steps,
                     magimg=full("magimg"), ikr=full("ikr"), ckg=full("ckg"), ckg_ir=full("ckg_ir"),
                     seg=full("seg"), seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- scoring


def visual_means(fused: Sequence[np.ndarray], infrared: Sequence[np.ndarray], visible: Sequence[np.ndarray],
                 metrics: Sequence[str], *, conventions: Any = "reference") -> dict[str, float]:
    """Fusion metrics per image (A = infrared, B = visible), averaged over the images.

    Images may differ in size between triples; each metric is computed per image and
    then averaged (arithmetic mean; a NaN in any image gives NaN, as in MATLAB).
    """
    if not (len(fused) == len(infrared) == len(visible)) or not fused:
        raise DataError(f"visual_means: need equal, non-zero numbers of images "
                        f"(fused {len(fused)}, infrared {len(infrared)}, visible {len(visible)})")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(fused):
        groups.setdefault(np.asarray(f).shape[:2], []).append(i)
    per: dict[str, list[float]] = {m: [] for m in metrics}
    for idx in groups.values():
        res = compute_metrics_batch(np.stack([fused[i] for i in idx]), np.stack([infrared[i] for i in idx]),
                                    np.stack([visible[i] for i in idx]), metrics=list(metrics),
                                    conventions=conventions)
        for m in metrics:
            per[m].extend(float(v) for v in res[m])
    return {m: float(np.mean(v)) for m, v in per.items()}


def segmentation_scores(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int = NUM_CLASSES,
                        class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """{"per_class_iou": {name: IoU}, "miou", "pixel_acc"} (fractions) over all images."""
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for p, y in zip(preds, labels):
        cm.update(np.asarray(p).astype(np.int64), np.asarray(y).astype(np.int64))
    if class_names is None:
        class_names = MFNET_CLASSES if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)]
    return {"per_class_iou": cm.per_class_iou(class_names), "miou": cm.miou(), "pixel_acc": cm.pixel_accuracy()}


def _has_labels(labels: Sequence[np.ndarray] | None) -> bool:
    return labels is not None and any(bool((np.asarray(y) != IGNORE_INDEX).any()) for y in labels)


# --------------------------------------------------------------------------- ablations


@dataclass
class AblationResult:
    """``tau_curve``: {τ: {metric: value, "Ours-S mIoU": %}}; ``variant_rows``: report
    rows (name, metrics, Ours-S mIoU in %, variant, protocol); ``runs``: the sampler runs."""

    tau_curve: dict[float, dict[str, float]]
    variant_rows: list[dict[str, Any]]
    runs: dict[tuple[str, float], SampleRun] = field(default_factory=dict)
    num_images: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "tau_curve": {f"{t:g}": dict(v) for t, v in self.tau_curve.items()},
            "variants": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in self.variant_rows},
        }


def _row_scores(run: SampleRun, infrared, visible, labels, metrics, num_classes, conventions) -> dict[str, Any]:
    row: dict[str, Any] = dict(visual_means(run.magimg, infrared, visible, metrics, conventions=conventions))
    if run.seg is not None and _has_labels(labels):
        row[OURS_S_MIOU] = 100.0 * segmentation_scores(run.seg, labels, num_classes)["miou"]
    else:
        row[OURS_S_MIOU] = float("nan")  # no segmentation output (model2/model4) or no labels
    return row


def run_ablations(runner: MagicFuse, images: Sequence[np.ndarray], keys: Sequence[str], *,
                  infrared: Sequence[np.ndarray], visible: Sequence[np.ndarray],
                  labels: Sequence[np.ndarray] | None = None,
                  taus: Iterable[float] = (0.0, 0.2, 0.4, 0.6, 0.8),
                  variants: Iterable[str] = ABLATION_VARIANTS,
                  tau: float | None = None, seed: int = 0, batch_size: int = 8,
                  metrics: Sequence[str] = ("EN", "SSIM", "MI", "Qabf", "PSNR"),
                  conventions: Any = "reference",
                  reuse: Mapping[tuple[str, float], SampleRun] | None = None,
                  progress: bool = True) -> AblationResult:
    """The τ sweep (variant ``full`` at each τ) and the ablation variants (at `tau`,
    default: the runner's), all sampled by `runner` (its steps and thermal classes).

    `images`: degraded visible uint8 (H,W,3) — the sampler input; `infrared` /
    `visible`: the metric sources A / B (uint8); `labels`: (H,W) class ids, 255 =
    ignore, for the Ours-S mIoU (None: n/a). `reuse` maps (variant, τ) to a
    `SampleRun` already computed on the same keys (at least as many images, same
    order, same seed and steps), e.g. the main evaluation run; it is sliced, not rerun.
    """
    n = len(images)
    _check_images(images, keys)
    tau = runner.tau if tau is None else float(tau)
    steps = runner.steps
    if len(infrared) != n or len(visible) != n or (labels is not None and len(labels) != n):
        raise DataError("run_ablations: images, infrared, visible (and labels) must have the same length")
    taus = [float(t) for t in taus]
    variants = list(variants)
    for t in taus:
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"run_ablations: tau values must lie in [0, 1], got {t}")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"run_ablations: unknown variant {v!r}; expected some of {list(VARIANTS)}")
    fusion = runner.base_nets.fusion
    num_classes = int(fusion.config.num_classes) if fusion is not None else NUM_CLASSES
    runs: dict[tuple[str, float], SampleRun] = {}

    def get(variant: str, t: float) -> SampleRun:
        k = (variant, float(t))
        if k in runs:
            return runs[k]
        if reuse is not None and k in reuse:
            r = reuse[k]
            if r.keys[:n] != list(keys) or r.steps != steps:
                raise DataError(f"run_ablations: the reused run for {k} was made on other images or steps")
            runs[k] = r.head(n)
        else:
            runs[k] = sample_set(runner, images, keys, tau=t, variant=variant, seed=seed, batch_size=batch_size,
                                 progress=progress, desc=f"ablation[{variant}, tau={t:g}]")
        return runs[k]

    tau_curve: dict[float, dict[str, float]] = {}
    for t in taus:
        tau_curve[t] = _row_scores(get("full", t), infrared, visible, labels, metrics, num_classes, conventions)

    rows: list[dict[str, Any]] = []
    for v in ["full"] + [v for v in variants if v != "full"]:
        if v == "full" and float(tau) in tau_curve:
            scores = tau_curve[float(tau)]
        else:
            scores = _row_scores(get(v, tau), infrared, visible, labels, metrics, num_classes, conventions)
        rows.append({"name": VARIANT_LABELS[v], **scores})
    return AblationResult(tau_curve=tau_curve, variant_rows=rows, runs=runs, num_images=n)


def write_ablation_report(result: AblationResult, out_dir: str | Path, *,
                          title: str = "MagicFuse ablations") -> dict[str, Path]:
    """Write the ablation table and the τ curve (CSV, JSON, PNG plot) with report.write_report."""
    notes = {VARIANT_LABELS[k]: v for k, v in VARIANT_NOTES.items()
             if any(r["name"] == VARIANT_LABELS[k] for r in result.variant_rows)}
    return write_report(out_dir, ablation_tables={"Models I-IV": result.variant_rows},
                        tau_curve=result.tau_curve,
                        extra={"images": result.num_images, **notes}, title=title)

