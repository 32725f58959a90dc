"""Score a folder of fused images against folders of infrared and visible sources.

Pairs are matched by file stem (any image extension). Every image is read as uint8;
3/4-channel images are scored on their luminance with MATLAB ``rgb2gray`` (the alpha
channel is dropped), as METRICS.md prescribes. Metrics come from
`magicfuse.evaluation.metrics` (reference conventions unless named options say
otherwise). ``magicfuse evaluate`` is the command-line front end (`add_cli`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from magicfuse.errors import DataError
from magicfuse.evaluation.metrics import (
    ALL,
    MetricConventions,
    parse_metric_names,
    compute_metrics_batch,
    resolve_conventions,
    rgb2gray,
)
from magicfuse.imageio import IMAGE_EXTENSIONS, read_image
from magicfuse.io import write_json_atomic, write_text_atomic

__all__ = ["FolderEvaluation", "evaluate_folders", "format_table", "add_cli"]

_BATCH = 12  # same-size images scored together


class FolderEvaluation(tuple):
    """``(rows, means)``; also ``.rows``, ``.means``, ``.skipped`` (list of {name, reason})
    and ``.conventions``."""

    rows: list[dict[str, Any]]
    means: dict[str, float]
    skipped: list[dict[str, str]]
    conventions: MetricConventions

    def __new__(cls, rows: list[dict[str, Any]], means: dict[str, float],
                skipped: list[dict[str, str]], conventions: MetricConventions) -> "FolderEvaluation":
        self = super().__new__(cls, (rows, means))
        self.rows, self.means, self.skipped, self.conventions = rows, means, skipped, conventions
        return self


def _index_folder(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {role} folder does not exist or is not a directory")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in found:
            raise DataError(
                f"{folder}: two {role} images share the stem {p.stem!r} ({found[p.stem].name}, {p.name}); "
                "pairs are matched by stem, so keep one"
            )
        found[p.stem] = p
    return found


def _read_gray(path: Path) -> np.ndarray:
    arr = read_image(path, mode="any")
    if arr.ndim == 3:
        arr = rgb2gray(np.ascontiguousarray(arr[..., :3]))
    return arr


def _finite_or_none(v: float) -> float | None:
    return None if (v is None or (isinstance(v, float) and not math.isfinite(v))) else float(v)


def evaluate_folders(
    fused_dir: str | Path,
    ir_dir: str | Path,
    vis_dir: str | Path,
    *,
    metrics: Iterable[str] | str | None = ALL,
    conventions: str | MetricConventions | Mapping[str, Any] = "reference",
    skip_bad: bool = False,
    out_json: str | Path | None = None,
    out_csv: str | Path | None = None,
    **options: Any,
) -> FolderEvaluation:
    """Score every fused image whose stem has an infrared and a visible image.

    A fused image without both sources, or whose size differs from them, is an error
    naming the files; with ``skip_bad=True`` it is skipped instead and listed in
    ``.skipped`` (and in the JSON). Returns ``(rows, means)``: one dict per image
    (``name``, ``fused``, ``ir``, ``vis`` paths and the metric values) in stem order,
    and the arithmetic mean of each metric over the images (NaN if any image's value is
    NaN, e.g. SCD when F equals a source). ``options`` are convention overrides
    (``ssim``, ``mi``, ``psnr``, ``nabf_order``, ``ag``).
    """
    conv = resolve_conventions(conventions, **options)
    names = parse_metric_names(metrics)
    fused_dir, ir_dir, vis_dir = Path(fused_dir), Path(ir_dir), Path(vis_dir)
    fused = _index_folder(fused_dir, "fused")
    irs = _index_folder(ir_dir, "infrared")
    viss = _index_folder(vis_dir, "visible")
    if not fused:
        raise DataError(f"{fused_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) to evaluate")

    skipped: list[dict[str, str]] = []

    def bad(stem: str, reason: str) -> None:
        if not skip_bad:
            raise DataError(reason)
        skipped.append({"name": stem, "reason": reason})

    # read, check and group by size
    groups: dict[tuple[int, int], list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
    order: list[str] = []
    for stem, fpath in fused.items():
        missing = [role for role, d in (("infrared", irs), ("visible", viss)) if stem not in d]
        if missing:
            bad(stem, f"{fpath}: no {' and no '.join(missing)} image with stem {stem!r} in "
                      f"{ir_dir if 'infrared' in missing else vis_dir}")
            continue
        f, a, b = _read_gray(fpath), _read_gray(irs[stem]), _read_gray(viss[stem])
        if not (f.shape == a.shape == b.shape):
            bad(stem, f"size mismatch for {stem!r}: fused {fpath} is {f.shape[1]}x{f.shape[0]}, "
                      f"infrared {irs[stem]} is {a.shape[1]}x{a.shape[0]}, "
                      f"visible {viss[stem]} is {b.shape[1]}x{b.shape[0]} (WxH); metrics need same-size images")
            continue
        groups[f.shape].append((stem, f, a, b))
        order.append(stem)

    values: dict[str, dict[str, float]] = {}
    for items in groups.values():
        for s in range(0, len(items), _BATCH):
            part = items[s : s + _BATCH]
            res = compute_metrics_batch(
                np.stack([x[1] for x in part]), np.stack([x[2] for x in part]), np.stack([x[3] for x in part]),
                metrics=names, conventions=conv,
            )
            for i, (stem, *_rest) in enumerate(part):
                values[stem] = {m: float(res[m][i]) for m in names}

    rows = [
        {"name": stem, "fused": str(fused[stem]), "ir": str(irs[stem]), "vis": str(viss[stem]), **values[stem]}
        for stem in sorted(order)
    ]
    if rows:
        means = {m: float(np.mean([r[m] for r in rows])) for m in names}
    else:
        means = {m: float("nan") for m in names}
    result = FolderEvaluation(rows, means, skipped, conv)
    if out_json is not None:
        write_json_atomic(out_json, _json_payload(result, names, fused_dir, ir_dir, vis_dir))
    if out_csv is not None:
        write_text_atomic(out_csv, _csv_text(result, names))
    return result


def _json_payload(res: FolderEvaluation, names: tuple[str, ...], fused_dir: Path, ir_dir: Path,
                  vis_dir: Path) -> dict[str, Any]:
    return {
        "fused_dir": str(fused_dir), "ir_dir": str(ir_dir), "vis_dir": str(vis_dir),
        "conventions": {k: getattr(res.conventions, k) for k in MetricConventions.__dataclass_fields__},
        "metrics": list(names),
        "count": len(res.rows),
        "mean": {m: _finite_or_none(res.means[m]) for m in names},
        "per_image": [{k: (_finite_or_none(v) if k in names else v) for k, v in r.items()} for r in res.rows],
        "skipped": res.skipped,
    }


def _csv_text(res: FolderEvaluation, names: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", *names])
    for r in res.rows:
        w.writerow([r["name"], *(repr(r[m]) for m in names)])
    w.writerow(["mean", *(repr(res.means[m]) for m in names)])
    return buf.getvalue()


def format_table(res: FolderEvaluation) -> str:
    """Per-metric mean as a small text table, plus the skipped images."""
    lines = [f"{len(res.rows)} image(s) scored; conventions: "
             + ", ".join(f"{k}={getattr(res.conventions, k)}" for k in MetricConventions.__dataclass_fields__)]
    width = max((len(m) for m in res.means), default=6)
    lines.append(f"{'metric':<{width}}  {'mean':>14}")
    for m, v in res.means.items():
        lines.append(f"{m:<{width}}  {v:>14.6g}")
    for s in res.skipped:
        lines.append(f"skipped {s['name']}: {s['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _cmd(args: argparse.Namespace) -> int:
    res = evaluate_folders(
        args.fused, args.ir, args.vis,
        metrics=args.metrics, skip_bad=args.skip_bad, out_json=args.json, out_csv=args.csv,
        ssim=args.ssim, mi=args.mi, psnr=args.psnr, nabf_order=args.nabf_order, ag=args.ag,
    )
    print(format_table(res))
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="fusion metrics of a folder of fused images (METRICS.md conventions)",
        description="Score fused images against infrared and visible sources matched by file stem. "
                    "Reference conventions of METRICS.md unless an option names another one.",
    )
    p.add_argument("--fused", type=Path, required=True, help="folder of fused images")
    p.add_argument("--ir", type=Path, required=True, help="folder of infrared images (A)")
    p.add_argument("--vis", type=Path, required=True, help="folder of visible images (B)")
    p.add_argument("--metrics", default=",".join(ALL), help=f"comma list (default all: {','.join(ALL)})")
    p.add_argument("--ssim", choices=("mean", "sum", "l255"), default=None,
                   help="SSIM convention (default mean: 1/2 ssim(F,A) + 1/2 ssim(F,B), DynamicRange 1)")
    p.add_argument("--mi", choices=("bits", "nats", "bits-no-quirk"), default=None,
                   help="MI convention (default bits, with the Hab.m uint8 quirk)")
    p.add_argument("--psnr", choices=("reference", "plain", "maxF"), default=None,
                   help="PSNR/MSE convention (default reference: images/255, peak 255)")
    p.add_argument("--nabf-order", choices=("correct", "driver"), default=None,
                   help="Nabf argument order (default correct: analysis_nabf(F, IR, VIS))")
    p.add_argument("--ag", choices=("matlab", "cddfuse"), default=None,
                   help="AG normalisation (default matlab: (rows-1)(cols-1))")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and report) fused images without sources or with another size, instead of failing")
    p.add_argument("--json", type=Path, default=None, help="write per-image values and means as JSON")
    p.add_argument("--csv", type=Path, default=None, help="write per-image values and means as CSV")
    p.set_defaults(func=_cmd)
