"""The evaluation suite behind the ``evaluate`` DVC stage and Prefect task.

`run_evaluation(cfg, pipeline_checkpoint=..., shards_dir=..., out_dir=...)`:

1. loads the pipeline bundle (`magicfuse.checkpoint.load_pipeline`) and the test
   split of the shards (degraded visible = the sampler's input; clean visible, real
   infrared and labels = references);
2. runs the joint sampler through the project's one runner, `magicfuse.inference.MagicFuse`
   (the checkpoint's `SamplerSettings` unless the config overrides steps / τ / thermal
   classes; per-image seeded noise, see `ablation.sample_set`) → MagImg, IKR image, CKG
   image, segmentation map. The grid images' inputs and MagImgs are also written as PNGs
   (``figures/images/input/<key>.png``, ``figures/images/<key>_magimg.png``):
   ``magicfuse fuse figures/images/input --recursive --seed <evaluate.seed> --batch-size
   <evaluate.batch_size>`` writes the same bytes;
3. **visual table** (Tables 2/4 shape): rows ``degraded input``, ``IKR``, ``CKG``,
   ``MagImg`` and, because the synthetic test split has a real infrared image,
   the classical fusions mean / max / Laplacian pyramid of the CLEAN visible and
   the REAL infrared (marked ``uses_infrared`` / † — references, not competitors:
   MagicFuse never sees the infrared). Metrics: A = real infrared, B = the visible
   reference chosen by ``cfg.reference_visible`` (default ``clean``; METRICS.md
   leaves this open — the choice is written into the report);
4. **semantic table** (Tables 3/5 shape, IoU in %): ``Ours-S`` (the segmentation
   head on the test labels) and the paper's protocol — a SegFormer retrained from
   the same seed on the degraded / IKR-enhanced / MagImg versions of (a subset of)
   the TRAIN split and scored on the matching test images
   (`magicfuse.evaluation.segformer.run_protocol`);
5. **ablations** (`magicfuse.evaluation.ablation.run_ablations`): the τ sweep
   (Fig. 7) and Models I–IV (Tables 6–7) on the first ``cfg.ablation_images``
   test images — the main run is reused for τ = default;
6. **CKG infrared PSNR**: the CKG image's channel mean against the real infrared,
   next to a grey copy of the degraded input against the real infrared;
7. qualitative grids; the report (`magicfuse.evaluation.report.write_report`):
   ``report.md``, ``report.html``, ``metrics.json``, ``tau_curve.csv`` and the
   PNGs under ``figures/`` (what ``dvc.yaml`` declares);
8. ``promotion_score``: a weighted sum of metrics named by dotted paths into
   ``metrics`` (`EvaluateConfig.promotion`), used to move the ``@champion`` alias.

The returned ``metrics`` dict is exactly what ``metrics.json`` holds. Its row
names use only letters, digits, spaces and ``- . :`` so that MLflow accepts the
flattened keys.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from magicfuse.checkpoint import load_pipeline
from magicfuse.config import to_dict
from magicfuse.data.classes import MFNET_CLASSES, MFNET_PALETTE, NUM_CLASSES
from magicfuse.devices import resolve_device
from magicfuse.diffusion.settings import SamplerSettings
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.ablation import (
    OURS_S_MIOU,
    VARIANT_LABELS,
    VARIANT_NOTES,
    SampleRun,
    run_ablations,
    sample_set,
    segmentation_scores,
    visual_means,
)
from magicfuse.evaluation.baselines import BASELINES
from magicfuse.evaluation.config import (
    BASELINE_ROWS,
    FIGURES,
    ROW_CKG,
    ROW_DEGRADED,
    ROW_IKR,
    ROW_MAGIMG,
    ROW_OURS_S,
    SEGFORMER_DEFAULTS,
    EvaluateConfig,
)
from magicfuse.evaluation.dataset import EvalSet, load_eval_set
from magicfuse.evaluation.scores import (
    contrast_row,
    gray,
    json_safe,
    psnr_by_degradation,
    psnr_u8,
    resolve_metric_path,
    seg_row,
    ssim_to,
)
from magicfuse.evaluation.objects import mean_box_contrast
from magicfuse.evaluation.report import INFRARED_FLAG, make_grid, write_report
from magicfuse.evaluation.segformer import config_from_mapping, run_protocol
from magicfuse.evaluation.segmentation import colorize, legend_image
from magicfuse.imageio import write_png
from magicfuse.inference import MagicFuse
from magicfuse.io import write_json_atomic, write_text_atomic

__all__ = ["EvaluateConfig", "EvalSet", "load_eval_set", "run_evaluation", "resolve_metric_path",
           "ROW_DEGRADED", "ROW_IKR", "ROW_CKG", "ROW_MAGIMG", "ROW_OURS_S", "BASELINE_ROWS"]

# --------------------------------------------------------------------------- helpers


def _sampler_settings(cfg: EvaluateConfig, payload: Mapping[str, Any], ckpt: Path) -> SamplerSettings:
    """The checkpoint's sampler settings with the config's overrides (steps, τ, thermal classes,
    z_T scale)."""
    s = SamplerSettings.from_mapping(payload.get("sampler"), where=f"{ckpt}: sampler settings")
    if s.variant != "full":
        raise ConfigError(f"{ckpt}: the checkpoint's sampler variant is {s.variant!r}; the evaluation suite "
                          "evaluates full pipelines (ablations are derived from them)")
    return s.replace(steps=cfg.steps, tau=cfg.tau, thermal_classes=cfg.thermal_classes,
                     init_noise_scale=cfg.init_noise_scale)


def _write_images(folder: Path, keys: Sequence[str], inputs: Sequence[np.ndarray],
                  magimgs: Sequence[np.ndarray]) -> None:
    """Inputs as ``input/<key>.png`` and MagImgs as ``<key>_magimg.png`` (the names
    ``magicfuse fuse`` reads and writes, so the CLI reproduces these files)."""
    for key, x, m in zip(keys, inputs, magimgs):
        write_png(folder / "input" / f"{key}.png", x)
        write_png(folder / f"{key}_magimg.png", m)


def _publish_figures(out: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """Move the PNGs write_report wrote (grids/, tau_curve.png) under figures/ — the folder
    dvc.yaml declares — and point report.md's links there (report.html embeds them)."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    md_path = paths.get("markdown")
    md = md_path.read_text() if md_path is not None else ""
    moved: dict[str, Path] = {}
    for key, p in list(paths.items()):
        if not (key.startswith("grid:") or key == "tau_plot"):
            continue
        p = Path(p)
        if p.parent == fig_dir:
            continue
        rel_old = p.relative_to(out).as_posix()
        dst = fig_dir / p.name
        shutil.move(str(p), str(dst))
        md = md.replace(f"]({rel_old})", f"]({FIGURES}/{p.name})")
        moved[key] = dst
    grids_dir = out / "grids"
    if grids_dir.is_dir() and not any(grids_dir.iterdir()):
        grids_dir.rmdir()
    if moved and md_path is not None:
        write_text_atomic(md_path, md)
    return {**paths, **moved}


# --------------------------------------------------------------------------- main


@dataclass
class _Run:
    """What every step of one evaluation reads: the config, the runner, the test images."""

    cfg: EvaluateConfig
    ckpt: Path
    out: Path
    runner: MagicFuse
    test: EvalSet
    num_classes: int
    class_names: tuple[str, ...]
    say: Callable[..., None]

    @property
    def settings(self) -> SamplerSettings:
        return self.runner.settings

    @property
    def labelled(self) -> bool:
        return self.test.has_labels()

    @property
    def reference_visible(self) -> list[np.ndarray]:
        return self.test.clean if self.cfg.reference_visible == "clean" else self.test.degraded

    @property
    def sample_kw(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "progress": self.cfg.progress}

    @property
    def ablation_images(self) -> int:
        n = len(self.test)
        return n if self.cfg.ablation_images is None else min(self.cfg.ablation_images, n)


def _prepare(cfg: EvaluateConfig, ckpt: Path, shards_dir: Any, out: Path) -> _Run:
    """Load the pipeline and the test images; check, before minutes of sampling, that the
    pipeline is a full one and that every promotion path can be computed."""
    modules, payload = load_pipeline(ckpt, map_location="cpu")
    fus_cfg = modules["fusion"].config
    if not (fus_cfg.use_zhat and fus_cfg.seg_head):
        raise ConfigError(f"{ckpt}: the fusion network is an ablation (use_zhat={fus_cfg.use_zhat}, "
                          f"seg_head={fus_cfg.seg_head}); evaluate a full pipeline")
    num_classes = int(fus_cfg.num_classes)
    class_names = MFNET_CLASSES if num_classes == NUM_CLASSES else tuple(str(i) for i in range(num_classes))
    runner = MagicFuse(modules, _sampler_settings(cfg, payload, ckpt),
                       device=resolve_device(cfg.device, what="evaluate.device"), source=str(ckpt))
    test = load_eval_set(shards_dir, cfg.split, cfg.max_images)
    if not test.has_infrared():
        missing = [k for k, ir in zip(test.keys, test.infrared) if ir is None][:5]
        raise DataError(f"evaluation: split {cfg.split!r} has samples without infrared (e.g. {missing}); "
                        "the visual metrics need the real infrared as source A")
    labelled = test.has_labels()
    for path in cfg.promotion_terms:
        if path.startswith("semantic.") and not labelled:
            raise ConfigError(f"evaluate.promotion uses {path!r} but split {cfg.split!r} has no labels")
        if path.startswith("semantic.") and not path.startswith(f"semantic.{ROW_OURS_S}.") and not cfg.semantic:
            raise ConfigError(f"evaluate.promotion uses {path!r} but evaluate.semantic is false")
    say = print if cfg.progress else (lambda *a, **k: None)
    return _Run(cfg, ckpt, out, runner, test, num_classes, tuple(class_names), say)


def _visual_rows(run: _Run, main: SampleRun, captured: SampleRun | None) -> list[dict[str, Any]]:
    """Tables 2/4: the input, the branch outputs, the MagImg, the classical IR-VIS fusions
    (references that see the real infrared, marked †) and, if sampled, the captured inputs."""
    t, cfg, ref = run.test, run.cfg, run.reference_visible
    sets = [(ROW_DEGRADED, t.degraded), (ROW_IKR, main.ikr), (ROW_CKG, main.ckg), (ROW_MAGIMG, main.magimg)]
    rows = [{"name": name, **visual_means(imgs, t.infrared, ref, cfg.metrics)} for name, imgs in sets]
    for key, fn in BASELINES.items():
        fused = [fn(c, ir) for c, ir in zip(t.clean, t.infrared)]
        rows.append({"name": BASELINE_ROWS.get(key, f"IR-VIS {key}"), INFRARED_FLAG: True,
                     **visual_means(fused, t.infrared, ref, cfg.metrics)})
    if captured is not None:
        for name, imgs in (("IKR (captured input)", captured.ikr), ("CKG (captured input)", captured.ckg),
                           ("MagImg (captured input)", captured.magimg)):
            rows.append({"name": name, **visual_means(imgs, t.infrared, ref, cfg.metrics)})
    return rows


def _ckg_scores(ckg_ir: Sequence[np.ndarray], inputs: Sequence[np.ndarray],
                infrared: Sequence[np.ndarray]) -> dict[str, float]:
    """The CKG infrared against the real infrared, beside a grey copy of the input (PSNR peak
    255; SSIM for 8-bit images, see `scores.ssim_to`)."""
    grey = [gray(d) for d in inputs]
    out = {"psnr_ckg_db": float(np.mean([psnr_u8(c, ir) for c, ir in zip(ckg_ir, infrared)])),
           "psnr_grey_input_db": float(np.mean([psnr_u8(g, ir) for g, ir in zip(grey, infrared)])),
           "ssim_ckg": ssim_to(ckg_ir, infrared), "ssim_grey_input": ssim_to(grey, infrared)}
    out["gain_db"] = out["psnr_ckg_db"] - out["psnr_grey_input_db"]
    return out


def _object_rows(run: _Run, main: SampleRun, captured: SampleRun | None) -> list[dict[str, Any]]:
    """Thermal objects: the box contrast of every image set (empty without boxes)."""
    t, classes = run.test, run.cfg.contrast_classes
    if not (t.has_boxes() and classes):
        return []
    sets = [("visible (clean)", t.clean), (ROW_DEGRADED, t.degraded), ("real infrared", t.infrared),
            (ROW_IKR, main.ikr), (ROW_CKG, main.ckg_ir), (ROW_MAGIMG, main.magimg)]
    if captured is not None:
        sets += [("CKG (captured input)", captured.ckg_ir), ("MagImg (captured input)", captured.magimg)]
    return [contrast_row(name, imgs, t.boxes, classes) for name, imgs in sets]


def _semantic(run: _Run, main: SampleRun, shards_dir: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tables 3/5: the SegFormer protocol's image sets (when run), then Ours-S (the head)."""
    cfg, t = run.cfg, run.test
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    if run.labelled:
        rows.append(seg_row(ROW_OURS_S, segmentation_scores(main.seg, t.label, run.num_classes, run.class_names)))
    if cfg.semantic and run.labelled:
        protocol_rows, info = _segformer_protocol(run, main, shards_dir)
        rows = protocol_rows + rows
    else:
        info["skipped"] = "evaluate.semantic is false" if not cfg.semantic else f"split {cfg.split!r} has no labels"
    return rows, info


def _ablations(run: _Run, main: SampleRun, with_contrast: bool):
    """The τ sweep and Models I-IV on the first images (the main run is reused for the
    default τ); with boxes, the MagImg's thermal-object contrast along the sweep."""
    t, cfg, n = run.test, run.cfg, run.ablation_images
    tau = run.settings.tau
    abl = run_ablations(run.runner, t.degraded[:n], t.keys[:n], infrared=t.infrared[:n],
                        visible=run.reference_visible[:n], labels=t.label[:n] if run.labelled else None,
                        taus=cfg.taus, variants=cfg.ablations, tau=tau, metrics=cfg.sweep_metrics,
                        reuse={("full", tau): main}, **run.sample_kw)
    if with_contrast:  # eq. 11 should move it
        for tv, row in abl.tau_curve.items():
            for cname, cls in cfg.contrast_classes.items():
                row[f"{cname} contrast"] = mean_box_contrast(abl.runs[("full", tv)].magimg, t.boxes[:n], cls)[0]
    return abl


def _grids(run: _Run, main: SampleRun) -> list[tuple[str, np.ndarray]]:
    """The qualitative grid (and the class legend); the grid images' inputs and MagImgs are
    also written as PNGs for `magicfuse fuse` to reproduce (`_write_images`)."""
    t = run.test
    n = min(run.cfg.grid_images, len(t))
    if not n:
        return []
    cols = ["input", "IKR", "CKG", "MagImg", "segmentation", "label", "real IR"]
    rows = [[t.degraded[i], main.ikr[i], main.ckg[i], main.magimg[i], colorize(main.seg[i]),
             colorize(t.label[i]), t.infrared[i]] for i in range(n)]
    grids = [("Degraded input, branch outputs, MagImg and segmentation", make_grid(rows, cols, row_labels=t.keys[:n]))]
    _write_images(run.out / FIGURES / "images", t.keys[:n], t.degraded[:n], main.magimg[:n])
    if run.num_classes <= len(MFNET_PALETTE):
        grids.append(("Class colours", legend_image(run.class_names, MFNET_PALETTE[:run.num_classes])))
    return grids


def _table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}


def _report_notes(run: _Run, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The report's settings and protocol notes."""
    cfg, s, ckg_ir = run.cfg, run.settings, metrics["ckg_infrared"]
    vis_label = "clean visible frame" if cfg.reference_visible == "clean" else "degraded input (the sampler's input)"
    captured = ckg_ir.get("captured")
    return {
        "checkpoint": str(run.ckpt),
        "images": f"{len(run.test)} from split {cfg.split!r} (first in shard order); ablations and tau sweep on the "
                  f"first {run.ablation_images}",
        "sampler": f"{s.steps} DDIM steps, tau = {s.tau:g}, thermal classes {list(s.thermal_classes)}, per-image "
                   f"seeded noise (seed {cfg.seed}), z_T scale {s.init_noise_scale:g}, device {run.runner.device}",
        "visual metric sources": f"A = real infrared, B = {vis_label} (evaluate.reference_visible = "
                                 f"{cfg.reference_visible!r}); the degraded-input row is the input itself scored as F",
        "outputs to uint8": "rounded (the authors' code truncates)",
        "CKG infrared vs real infrared (PSNR dB peak 255 / SSIM, Wang's 8-bit constants)":
            f"CKG {ckg_ir['psnr_ckg_db']:.2f} / {ckg_ir['ssim_ckg']:.3f}; grey copy of the degraded input "
            f"{ckg_ir['psnr_grey_input_db']:.2f} / {ckg_ir['ssim_grey_input']:.3f}; gain {ckg_ir['gain_db']:+.2f} dB"
            + ("" if captured is None else
               f"; captured input: CKG {captured['psnr_ckg_db']:.2f} / {captured['ssim_ckg']:.3f}, "
               f"grey copy {captured['psnr_grey_input_db']:.2f} / {captured['ssim_grey_input']:.3f}"),
        "semantic protocol": (metrics["semantic_protocol"].get("summary")
                              or f"skipped: {metrics['semantic_protocol'].get('skipped')}"),
        "ablation protocol": "Models I and II are INFERENCE-TIME ablations on the same trained weights "
                             "(Model I: zero zhat inputs to F; Model II: segmentation head output ignored); the "
                             "paper's Table 6 retrains F for them. Models III and IV need no retraining. "
                             f"Ablation rows report the MagImg metrics and {OURS_S_MIOU} (%, n/a without a "
                             "segmentation output).",
        **{f"variant {VARIANT_LABELS[v]}": VARIANT_NOTES[v] for v in ("full",) + tuple(cfg.ablations)},
        "promotion_score": f"{metrics['promotion_score']} = {metrics['promotion']['formula']}",
    }


def run_evaluation(cfg: EvaluateConfig | Mapping[str, Any] | None = None, *,
                   pipeline_checkpoint: str | Path,
                   shards_dir: str | Path | Sequence[str | Path],
                   out_dir: str | Path) -> dict[str, Any]:
    """Evaluate a trained pipeline bundle on the shards; write the report into `out_dir`.

    Returns ``{"metrics": <what metrics.json holds>, "paths": {name: str path}}``.
    ``metrics["promotion_score"]`` is the number the model registry compares.
    """
    t_start = time.perf_counter()
    if cfg is None:
        cfg = EvaluateConfig()
    elif isinstance(cfg, Mapping):
        cfg = EvaluateConfig.from_mapping(cfg)
    run = _prepare(cfg, Path(pipeline_checkpoint), shards_dir, Path(out_dir))
    t, s = run.test, run.settings
    run.say(f"evaluate: {len(t)} {cfg.split} images, steps={s.steps}, tau={s.tau:g}, "
            f"thermal classes={list(s.thermal_classes)}, z_T scale={s.init_noise_scale:g}, device={run.runner.device}")

    main = sample_set(run.runner, t.degraded, t.keys, desc=f"MagicFuse[{cfg.split}]", **run.sample_kw)
    run.say(f"evaluate: sampled {len(t)} images in {main.seconds:.1f} s")
    captured = None
    if cfg.captured_inputs:  # the frames as captured (night frames are real low light)
        captured = sample_set(run.runner, t.clean, t.keys, desc=f"MagicFuse[{cfg.split}, as captured]",
                              **run.sample_kw)
        run.say(f"evaluate: sampled {len(t)} captured frames in {captured.seconds:.1f} s")

    visual_rows = _visual_rows(run, main, captured)
    ckg_ir = _ckg_scores(main.ckg_ir, t.degraded, t.infrared)
    if captured is not None:
        ckg_ir["captured"] = _ckg_scores(captured.ckg_ir, t.clean, t.infrared)
    object_rows = _object_rows(run, main, captured)
    ikr_rows = (psnr_by_degradation(main.ikr, t.degraded, t.clean, t.degradations)
                if len(t.degradations) == len(t) else [])
    semantic_rows, semantic_info = _semantic(run, main, shards_dir)
    abl = _ablations(run, main, with_contrast=bool(object_rows))
    grids = _grids(run, main)

    vis_json = _table(visual_rows)
    for r in vis_json.values():
        r[INFRARED_FLAG] = bool(r.get(INFRARED_FLAG, False))
    metrics: dict[str, Any] = json_safe({
        "visual": vis_json,
        "semantic": _table(semantic_rows),
        "semantic_protocol": semantic_info,
        "ablation": {"models": _table(abl.variant_rows)},
        "tau_curve": {f"{tv:g}": dict(v) for tv, v in abl.tau_curve.items()},
        "ckg_infrared": ckg_ir,
        "objects": _table(object_rows),
        "ikr_by_degradation": _table(ikr_rows),
        "settings": {
            "checkpoint": str(run.ckpt), "split": cfg.split, "images": len(t), "steps": s.steps, "tau": s.tau,
            "thermal_classes": list(s.thermal_classes), "init_noise_scale": s.init_noise_scale, "seed": cfg.seed,
            "device": str(run.runner.device),
            "reference_visible": cfg.reference_visible, "ablation_images": run.ablation_images,
            "captured_inputs": cfg.captured_inputs,
        },
    })
    promotion = cfg.promotion_terms
    terms = {p: w * resolve_metric_path(metrics, p) for p, w in promotion.items()}
    score = float(sum(terms.values()))
    metrics["promotion_score"] = score if math.isfinite(score) else None
    metrics["promotion"] = {"formula": " + ".join(f"{w:g} * {p}" for p, w in promotion.items()), "terms": terms}
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)

    paths = write_report(run.out, visual_table=visual_rows, semantic_table=semantic_rows,
                         ablation_tables={"Models I-IV (Tables 6-7)": abl.variant_rows},
                         tau_curve=abl.tau_curve, grids=grids, extra=_report_notes(run, metrics),
                         tables={"Thermal objects: box contrast (box mean minus ring mean, in grey standard "
                                 "deviations of the image)": object_rows,
                                 "IKR: PSNR (dB) against the clean frame per degradation": ikr_rows})
    paths = _publish_figures(run.out, paths)
    write_json_atomic(paths["metrics"], metrics)  # the full nested metrics (a superset of the report's)
    run.say(f"evaluate: report in {run.out} ({metrics['seconds']:.1f} s), promotion_score = "
            f"{metrics['promotion_score']}")
    return {"metrics": metrics, "paths": {k: str(v) for k, v in paths.items()} | {"figures": str(run.out / FIGURES)}}


def _segformer_protocol(run: _Run, main: SampleRun, shards_dir: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SegFormer retrained on degraded / IKR / MagImg train images, scored on the matching test images."""
    cfg, test = run.cfg, run.test
    seg_map = dict(cfg.segformer)
    seg_map.setdefault("device", str(run.runner.device))
    seg_map.setdefault("num_classes", run.num_classes)
    for k, v in SEGFORMER_DEFAULTS.items():
        if k != "class_weights" or seg_map["num_classes"] == NUM_CLASSES:
            seg_map.setdefault(k, v)
    seg_cfg = config_from_mapping(seg_map)
    train = load_eval_set(shards_dir, cfg.segformer_train_split, cfg.segformer_train_images)
    if not train.has_labels():
        raise DataError(f"evaluation: split {cfg.segformer_train_split!r} (SegFormer training) has no labels; "
                        "set evaluate.semantic: false or point segformer_train_split at a labelled split")
    sizes = {im.shape[:2] for im in train.degraded + test.degraded}
    if len(sizes) > 1:
        raise DataError(f"evaluation: the SegFormer protocol needs one image size; found {sorted(sizes)} "
                        "(evaluate a single-size data set or set evaluate.semantic: false)")
    run.say(f"evaluate: sampling {len(train)} {cfg.segformer_train_split} images for the SegFormer protocol")
    tr = sample_set(run.runner, train.degraded, train.keys, desc=f"MagicFuse[{cfg.segformer_train_split}]",
                    **run.sample_kw)

    def tens(imgs: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # uint8 (N,3,H,W)

    ytr = torch.from_numpy(np.stack(train.label)).long()
    yte = torch.from_numpy(np.stack(test.label)).long()
    sets = {
        ROW_DEGRADED: (tens(train.degraded), ytr, tens(test.degraded), yte),
        ROW_IKR: (tens(tr.ikr), ytr, tens(main.ikr), yte),
        ROW_MAGIMG: (tens(tr.magimg), ytr, tens(main.magimg), yte),
    }
    results = run_protocol(sets, seg_cfg, progress=cfg.progress)
    rows = [r.to_row(name) for name, r in results.items()]
    info = {
        "train_split": cfg.segformer_train_split, "train_images": len(train), "test_images": len(test),
        "segformer": to_dict(seg_cfg),
        "runs": {name: {k: v for k, v in r.to_dict().items() if k != "per_class_iou"} for name, r in results.items()},
        "summary": (f"SegFormer-{seg_cfg.variant} trained from scratch (seed {seg_cfg.seed}) on {len(train)} "
                    f"{cfg.segformer_train_split!r} images of each set, scored on the {len(test)} matching test "
                    f"images; {ROW_OURS_S} = the MagicFuse segmentation head on the test labels"),
    }
    return rows, info
