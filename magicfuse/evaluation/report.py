"""Evaluation report writer: Markdown + HTML report, DVC metrics and plot data, grids.

``write_report(out_dir, ...)`` writes, atomically (``magicfuse.io``):

* ``report.md`` — Markdown tables with a fixed number format per table, and a
  short statement of the conventions and of which rows use the real infrared;
* ``report.html`` — the same content, self-contained (images embedded as data URIs);
* ``metrics.json`` — ``{"visual": {row: {metric: v}}, "semantic": {...},
  "ablation": {table: {row: {...}}}, "extra": {...}}`` for ``dvc metrics show``
  (NaN becomes null);
* ``visual.csv``, ``semantic.csv``, ``ablation_<name>.csv`` — the tables as CSV;
* ``tau_curve.csv`` / ``tau_curve.json`` (columns ``tau``, metrics...) for ``dvc plots``
  and ``tau_curve.png``, one panel per metric against τ (matplotlib, Agg backend);
* ``grids/NN_<title>.png`` — the qualitative grids.

Table rows are dicts: ``"name"`` (required), metric values (numbers; None/NaN are
shown as "n/a"), and optionally ``"uses_infrared": True`` for rows that cheat by
using the real infrared image (classical fusions such as
``magicfuse.evaluation.baselines``): such rows are marked with † in the tables.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from magicfuse.errors import DataError
from magicfuse.io import write_bytes_atomic, write_json_atomic, write_text_atomic

__all__ = ["write_report", "make_grid", "markdown_table", "format_value", "INFRARED_FLAG"]

INFRARED_FLAG = "uses_infrared"
_DAGGER = "†"

VISUAL_CONVENTIONS = (
    "Visual metrics follow METRICS.md (the convention of the MATLAB evaluation code of the "
    "authors' group): A = infrared, B = visible, F = fused; colour images are scored on their "
    "luminance; EN in bits; MI in bits summed over both sources; SSIM the mean of SSIM(F,A) and "
    "SSIM(F,B) with MATLAB's constants for double data; PSNR with images in [0,1] and peak 255 "
    "(hence values around 60 dB); Qabf Xydeas–Petrović. Each metric is averaged over the images."
)
SEMANTIC_CONVENTIONS = (
    "Semantic scores: a SegFormer is retrained from the same random initialisation and seed on "
    "each image set and scored on that set's test images. IoU per class and mIoU are in percent. "
    "mIoU is the mean over all 9 MFNet classes including 'unlabelled', as in the paper's tables; "
    "a class absent from both labels and predictions of the whole test set has no IoU (n/a) and "
    "is left out of the mean. Pixels labelled 255 are ignored."
)


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------
def format_value(value: Any, fmt: str = "{:.3f}") -> str:
    """One cell: numbers with `fmt`, None/NaN as "n/a", everything else as text."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return fmt.format(v)
    return str(value)


def _check_rows(rows: Sequence[Mapping[str, Any]], table: str) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"report table {table!r}: row {i} is a {type(row).__name__}, expected a dict")
        if "name" not in row:
            raise DataError(f"report table {table!r}: row {i} has no 'name' ({sorted(row)})")
        name = str(row["name"])
        if name in seen:
            raise DataError(f"report table {table!r}: duplicate row name {name!r}")
        seen.add(name)
        out.append(dict(row))
    return out


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in ("name", INFRARED_FLAG) and key not in cols:
                cols.append(key)
    return cols


def _display_name(row: Mapping[str, Any]) -> str:
    return f"{row['name']} {_DAGGER}" if row.get(INFRARED_FLAG) else str(row["name"])


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], fmt: str = "{:.3f}",
                   columns: Sequence[str] | None = None, *, name_header: str = "name") -> str:
    """A GitHub-flavoured Markdown table of `rows` ("name" first, then `columns`)."""
    rows = _check_rows(rows, "table")
    cols = list(columns) if columns is not None else _columns(rows)
    lines = ["| " + " | ".join([_md_escape(name_header)] + [_md_escape(c) for c in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for row in rows:
        cells = [_md_escape(_display_name(row))] + [_md_escape(format_value(row.get(c), fmt)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(rows: Sequence[Mapping[str, Any]], fmt: str, name_header: str = "name") -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [name_header] + cols)
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(_display_name(row))}</td>"]
        cells += [f'<td class="num">{html.escape(format_value(row.get(c), fmt))}</td>' for c in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _csv_text(rows: Sequence[Mapping[str, Any]], first: str = "name") -> str:
    cols = [c for c in _columns(rows) if c != first]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([first] + cols)
    for row in rows:
        vals = []
        for c in [first] + cols:
            v = row.get(c)
            if isinstance(v, (float, np.floating)) and math.isnan(float(v)):
                v = ""
            elif v is None:
                v = ""
            elif isinstance(v, (np.integer, np.floating)):
                v = v.item()
            vals.append(v)
        w.writerow(vals)
    return buf.getvalue()


def _json_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_value(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v


def _table_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["name"]): {k: _json_value(v) for k, v in r.items() if k not in ("name", INFRARED_FLAG)}
            for r in rows}


def _describe(fmt: str) -> str:
    m = re.fullmatch(r"\{:\.(\d+)f\}", fmt)
    return f"with {m.group(1)} decimals" if m else f"as {fmt}"


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s[:60] or "item"


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def _to_rgb_u8(img: np.ndarray, where: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        raise DataError(f"{where}: expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return img[..., :3]
    raise DataError(f"{where}: expected (H,W), (H,W,1), (H,W,3) or (H,W,4), got shape {img.shape}")


def _png_bytes(img: np.ndarray) -> bytes:
    rgb = _to_rgb_u8(img, "png")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV fails only on absurd input
        raise DataError(f"could not encode a {rgb.shape} image as PNG")
    return buf.tobytes()


def _fit(img: np.ndarray, cell_h: int, cell_w: int, background: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(cell_h / h, cell_w / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST
    small = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
    out = np.full((cell_h, cell_w, 3), background, np.uint8)
    y0, x0 = (cell_h - nh) // 2, (cell_w - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def _caption(text: str, height: int, width: int, background: int) -> np.ndarray:
    strip = np.full((height, width, 3), background, np.uint8)
    scale = max(height / 36.0, 0.3)
    font = cv2.FONT_HERSHEY_SIMPLEX
    # shrink the text until it fits the width
    while scale > 0.25:
        (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
        if tw <= width - 4:
            break
        scale *= 0.9
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    x = max((width - tw) // 2, 2)
    y = (height + th) // 2
    cv2.putText(strip, text, (x, y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def make_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str],
              cell_size: int | tuple[int, int] = (120, 160), *,
              row_labels: Sequence[str] | None = None, pad: int = 4,
              caption_height: int = 22, background: int = 255) -> np.ndarray:
    """A qualitative grid: one row per sample, one column per image kind, captions on top.

    rows: ``rows[r][c]`` uint8 images, grey ``(H,W)`` or RGB ``(H,W,3)``, any size; each is
    scaled to fit ``cell_size = (h, w)`` keeping its aspect ratio (area interpolation
    when shrinking, nearest when enlarging so label colours stay exact).
    labels: one caption per column (e.g. input, IKR, CKG, MagImg, segmentation).
    row_labels: optional caption per row, drawn in a strip on the left.
    Returns ``uint8 (H, W, 3)`` RGB of height
    ``caption_height + n_rows*cell_h + (n_rows+1)*pad`` and width
    ``[label strip] + n_cols*cell_w + (n_cols+1)*pad``.
    """
    if isinstance(cell_size, int):
        cell_size = (cell_size, cell_size)
    ch, cw = int(cell_size[0]), int(cell_size[1])
    if ch < 8 or cw < 8:
        raise ValueError(f"cell_size must be at least 8×8, got {cell_size}")
    if not rows:
        raise DataError("make_grid: no rows")
    ncol = len(labels)
    for r, row in enumerate(rows):
        if len(row) != ncol:
            raise DataError(f"make_grid: row {r} has {len(row)} images but there are {ncol} column labels")
    if row_labels is not None and len(row_labels) != len(rows):
        raise DataError(f"make_grid: {len(row_labels)} row labels for {len(rows)} rows")
    nrow = len(rows)
    left = 0
    if row_labels is not None:
        longest = max(len(str(t)) for t in row_labels)
        left = min(max(8 * longest + 8, 40), 3 * cw)
    H = caption_height + nrow * ch + (nrow + 1) * pad
    W = left + ncol * cw + (ncol + 1) * pad
    grid = np.full((H, W, 3), background, np.uint8)
    for c, text in enumerate(labels):
        x = left + pad + c * (cw + pad)
        grid[0:caption_height, x:x + cw] = _caption(str(text), caption_height, cw, background)
    for r, row in enumerate(rows):
        y = caption_height + pad + r * (ch + pad)
        if row_labels is not None:
            strip = _caption(str(row_labels[r]), caption_height, left, background)
            yc = y + (ch - caption_height) // 2
            grid[yc:yc + caption_height, 0:left] = strip
        for c, img in enumerate(row):
            x = left + pad + c * (cw + pad)
            grid[y:y + ch, x:x + cw] = _fit(_to_rgb_u8(img, f"make_grid cell ({r},{c})"), ch, cw, background)
    return grid


# ---------------------------------------------------------------------------------------
# Tau curve
# ---------------------------------------------------------------------------------------
def _tau_records(tau_curve: Mapping[Any, Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    recs = []
    metrics: list[str] = []
    for tau, vals in tau_curve.items():
        try:
            t = float(tau)
        except (TypeError, ValueError):
            raise DataError(f"tau_curve: key {tau!r} is not a number") from None
        if not isinstance(vals, Mapping):
            raise DataError(f"tau_curve[{tau!r}]: expected a dict of metrics, got {type(vals).__name__}")
        for k in vals:
            if k not in metrics:
                metrics.append(str(k))
        recs.append({"tau": t, **{str(k): _json_value(v) for k, v in vals.items()}})
    recs.sort(key=lambda r: r["tau"])
    return recs, metrics


def _tau_plot_png(recs: list[dict[str, Any]], metrics: list[str]) -> bytes:
    # Agg canvas on a bare Figure: no pyplot, no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(metrics), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    taus = [r["tau"] for r in recs]
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ys = [r.get(m) for r in recs]
        ys = [float("nan") if y is None else float(y) for y in ys]
        ax.plot(taus, ys, marker="o")
        ax.set_title(m)
        ax.set_xlabel("τ")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
def write_report(out_dir: str | Path, *,
                 visual_table: Sequence[Mapping[str, Any]] = (),
                 semantic_table: Sequence[Mapping[str, Any]] = (),
                 ablation_tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 tau_curve: Mapping[Any, Mapping[str, Any]] | None = None,
                 tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 grids: Sequence[tuple[str, np.ndarray]] = (),
                 extra: Mapping[str, Any] | None = None,
                 title: str = "MagicFuse evaluation report",
                 visual_format: str = "{:.3f}",
                 semantic_format: str = "{:.2f}",
                 ablation_format: str = "{:.3f}") -> dict[str, Path]:
    """Write the report files into `out_dir` (created if needed); return ``{key: path}``.

    Keys: "markdown", "html", "metrics", "visual_csv", "semantic_csv",
    "ablation_csv:<name>", "table_csv:<name>" (the further `tables`, each under its own heading), "tau_csv", "tau_json", "tau_plot", "grid:<NN>" (present
    only for the parts that were given, except markdown/html/metrics, always written).
    Semantic rows are expected in percent (``SegResult.to_row``).
    """
    out = Path(out_dir)
    visual = _check_rows(visual_table, "visual")
    semantic = _check_rows(semantic_table, "semantic")
    ablations = {str(k): _check_rows(v, f"ablation {k}") for k, v in (ablation_tables or {}).items()}
    further = {str(k): _check_rows(v, f"table {k}") for k, v in (tables or {}).items() if v}
    extra = dict(extra or {})
    paths: dict[str, Path] = {}

    # -- data files --------------------------------------------------------------------
    if visual:
        paths["visual_csv"] = out / "visual.csv"
        write_text_atomic(paths["visual_csv"], _csv_text(visual))
    if semantic:
        paths["semantic_csv"] = out / "semantic.csv"
        write_text_atomic(paths["semantic_csv"], _csv_text(semantic))
    for name, rows in ablations.items():
        key = f"ablation_csv:{name}"
        paths[key] = out / f"ablation_{_slug(name)}.csv"
        write_text_atomic(paths[key], _csv_text(rows))
    for name, rows in further.items():
        key = f"table_csv:{name}"
        paths[key] = out / f"table_{_slug(name)}.csv"
        write_text_atomic(paths[key], _csv_text(rows))

    tau_recs: list[dict[str, Any]] = []
    tau_png = b""
    tau_metrics: list[str] = []
    if tau_curve:
        tau_recs, tau_metrics = _tau_records(tau_curve)
        paths["tau_csv"] = out / "tau_curve.csv"
        write_text_atomic(paths["tau_csv"], _csv_text(tau_recs, first="tau"))
        paths["tau_json"] = out / "tau_curve.json"
        write_json_atomic(paths["tau_json"], tau_recs)
        paths["tau_plot"] = out / "tau_curve.png"
        tau_png = _tau_plot_png(tau_recs, tau_metrics)
        write_bytes_atomic(paths["tau_plot"], tau_png)

    grid_files: list[tuple[str, str, bytes]] = []
    for i, item in enumerate(grids):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"report grids[{i}]: expected (title, uint8 image)")
        gtitle, img = item
        png = _png_bytes(_to_rgb_u8(img, f"report grid {gtitle!r}"))
        rel = f"grids/{i:02d}_{_slug(str(gtitle))}.png"
        write_bytes_atomic(out / rel, png)
        paths[f"grid:{i:02d}"] = out / rel
        grid_files.append((str(gtitle), rel, png))

    metrics: dict[str, Any] = {}
    if visual:
        metrics["visual"] = _table_json(visual)
    if semantic:
        metrics["semantic"] = _table_json(semantic)
    if ablations:
        metrics["ablation"] = {k: _table_json(v) for k, v in ablations.items()}
    if further:
        metrics["tables"] = {k: _table_json(v) for k, v in further.items()}
    if extra:
        metrics["extra"] = _json_value(extra)
    paths["metrics"] = out / "metrics.json"
    write_json_atomic(paths["metrics"], metrics)

    # -- text ------------------------------------------------------------------------
    cheaters = [str(r["name"]) for r in visual + semantic + [r for rs in ablations.values() for r in rs]
                if r.get(INFRARED_FLAG)]
    cheaters = list(dict.fromkeys(cheaters))
    if cheaters:
        cheat_text = (f"Rows marked {_DAGGER} ({', '.join(cheaters)}) use the real infrared image; "
                      "MagicFuse and its branches see only the visible image, so these rows are "
                      "references, not competitors.")
    else:
        cheat_text = "No row uses the real infrared image."

    md: list[str] = [f"# {title}", ""]
    htm: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def section(heading: str, paragraphs: Sequence[str], rows: Sequence[Mapping[str, Any]] | None, fmt: str,
                name_header: str = "name") -> None:
        md.extend([f"## {heading}", ""])
        htm.append(f"<h2>{html.escape(heading)}</h2>")
        for p in paragraphs:
            md.extend([p, ""])
            htm.append(f"<p>{html.escape(p)}</p>")
        if rows is not None:
            md.extend([markdown_table(rows, fmt, name_header=name_header), ""])
            htm.append(_html_table(rows, fmt, name_header))

    section("Conventions", [VISUAL_CONVENTIONS, SEMANTIC_CONVENTIONS, cheat_text,
                            f"Numbers are printed with fixed formats: visual metrics {_describe(visual_format)}, "
                            f"semantic scores {_describe(semantic_format)}, ablations {_describe(ablation_format)}; "
                            "n/a = undefined (e.g. SCD when F equals a source, IoU of a class absent from "
                            "labels and predictions)."],
            None, "")
    if visual:
        section("Visual quality", [], visual, visual_format)
    if semantic:
        section("Semantic quality (SegFormer retrained per image set; IoU in %)", [], semantic, semantic_format)
    for name, rows in ablations.items():
        section(f"Ablation: {name}", [], rows, ablation_format)
    for name, rows in further.items():
        section(name, [], rows, visual_format)
    if tau_recs:
        tau_rows = [{"name": format_value(r["tau"], "{:g}"), **{m: r.get(m) for m in tau_metrics}} for r in tau_recs]
        section("Threshold τ sweep", ["Metrics against the radiation threshold τ (eq. 11)."], tau_rows,
                visual_format, name_header="τ")
        md.extend(["![metrics against tau](tau_curve.png)", ""])
        htm.append('<img alt="metrics against tau" src="data:image/png;base64,'
                   + base64.b64encode(tau_png).decode() + '">')
    if grid_files:
        md.extend(["## Qualitative results", ""])
        htm.append("<h2>Qualitative results</h2>")
        for gtitle, rel, png in grid_files:
            md.extend([f"### {gtitle}", "", f"![{_md_escape(gtitle)}]({rel})", ""])
            htm.append(f"<h3>{html.escape(gtitle)}</h3>")
            htm.append(f'<img alt="{html.escape(gtitle)}" src="data:image/png;base64,'
                       f'{base64.b64encode(png).decode()}">')
    if extra:
        md.extend(["## Run information", ""])
        htm.append("<h2>Run information</h2><ul>")
        for k, v in extra.items():
            text = format_value(v, "{:g}") if not isinstance(v, (Mapping, list, tuple)) else str(_json_value(v))
            md.append(f"* **{_md_escape(str(k))}**: {_md_escape(text)}")
            htm.append(f"<li><b>{html.escape(str(k))}</b>: {html.escape(text)}</li>")
        md.append("")
        htm.append("</ul>")

    paths["markdown"] = out / "report.md"
    write_text_atomic(paths["markdown"], "\n".join(md).rstrip() + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:3px 8px}"
             "td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#eee}"
             "img{max-width:100%}")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
           + "\n".join(htm) + "\n</body></html>\n")
    paths["html"] = out / "report.html"
    write_text_atomic(paths["html"], doc)
    return paths

