"""``magicfuse fuse``: fuse images from files, folders or globs into an output folder.

    magicfuse fuse INPUT... -o OUTDIR [--model models:/magicfuse@champion | PATH]
        [--steps 25] [--tau 0.4] [--init-noise-scale S] [--seed 0] [--device auto|cpu|cuda] [--batch-size 4]
        [--save ikr,ckg,seg,grid] [--recursive] [--overwrite] [--compile]
        [--max-pixels 50e6] [--tile N]

Outputs, for an input whose output name is ``NAME``:
``OUTDIR/NAME_magimg.png`` (RGB, the input's exact size) and, with ``--save``,
``NAME_ikr.png`` (RGB), ``NAME_ckg.png`` (grey infrared), ``NAME_seg.png`` (colour-coded
classes, with ``OUTDIR/seg_legend.png`` written once), ``NAME_grid.png``
(input | IKR | CKG | MagImg | segmentation side by side).

Output names: a file given directly is named by its stem; a file found in a folder
(or by a glob) keeps its path relative to that folder (the glob's fixed leading
part), so ``--recursive`` mirrors the sub-folders inside OUTDIR. When two inputs would
still get the same name (``x.png`` and ``x.jpg`` in one folder, or ``a/x.png`` and ``b/x.png`` given
directly), the later one (in input order, folders sorted) gets its extension appended
when that tells them apart (``x_jpg``), else ``_2``, ``_3``... so nothing is overwritten.

Each image's noise is seeded from ``(--seed, output name)``, so results do not depend on
the batch size, on other inputs or on resuming. Finished images are skipped on a re-run
(all requested files present) unless ``--overwrite``. Files are written atomically.

Bad inputs (unreadable, truncated, not an image, zero-size, more than ``--max-pixels``)
are reported one line each and skipped; the run goes on. Exit status: 0 all done or
skipped, 1 some input failed, 2 fatal (model missing or of the wrong kind, output
folder not writable, bad options).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from magicfuse.errors import DataError, MagicFuseError
from magicfuse.evaluation.report import make_grid
from magicfuse.evaluation.segmentation import legend_image
from magicfuse.imageio import IMAGE_EXTENSIONS, image_size, read_image, write_png
from magicfuse.inference import MagicFuse, image_seed

DEFAULT_MODEL = "models:/magicfuse@champion"
DEFAULT_MAX_PIXELS = 50_000_000
SAVE_CHOICES = ("ikr", "ckg", "seg", "grid")
LEGEND_NAME = "seg_legend.png"
_GLOB_CHARS = set("*?[")


class FatalError(MagicFuseError):
    """A problem that stops the whole run (exit status 2)."""


@dataclass
class Item:
    path: Path
    name: str  # output name relative to OUTDIR, without suffix ("sub/x")
    status: str = "pending"  # pending | done | skipped | failed
    reason: str = ""


@dataclass
class Summary:
    done: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    failed: list[Item] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        out = [f"done {len(self.done)}, skipped {len(self.skipped)}, failed {len(self.failed)} "
               f"in {self.seconds:.1f} s ({rate:.3g} images/s)"]
        out += [f"  skipped {it.path}: {it.reason}" for it in self.skipped]
        out += [f"  failed  {it.path}: {it.reason}" for it in self.failed]
        return out


# --------------------------------------------------------------------------- inputs


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def collect_inputs(inputs: Sequence[str], *, recursive: bool = False) -> tuple[list[Item], list[Item]]:
    """(items to process, items that failed already, e.g. not found), with unique output names."""
    found: list[tuple[Path, str]] = []
    failed: list[Item] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in it if f.is_file() and _is_image(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                failed.append(Item(p, p.name, "failed", "folder holds no image files"
                                   + ("" if recursive else " (use --recursive for sub-folders)")))
            found += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        elif _GLOB_CHARS & set(raw):
            base = _glob_base(raw)
            files = sorted(Path(f) for f in glob.glob(os.path.expanduser(raw), recursive=True)
                           if Path(f).is_file() and _is_image(Path(f)))
            if not files:
                failed.append(Item(p, p.name, "failed", "no image file matches this pattern"))
            for f in files:
                try:
                    rel = f.relative_to(base).with_suffix("").as_posix()
                except ValueError:
                    rel = f.stem
                found.append((f, rel))
        else:
            failed.append(Item(p, p.name, "failed", "file or folder not found"))
    items: list[Item] = []
    used: dict[str, str] = {}  # lower-cased output name -> extension of its file
    seen_paths: set[Path] = set()
    for path, name in found:
        rp = path.resolve()
        if rp in seen_paths:
            continue
        seen_paths.add(rp)
        ext = path.suffix.lstrip(".").lower()
        cand = name
        if cand.lower() in used:
            if used[cand.lower()] != ext and f"{name}_{ext}".lower() not in used:
                cand = f"{name}_{ext}"
            else:
                k = 2
                while f"{name}_{k}".lower() in used:
                    k += 1
                cand = f"{name}_{k}"
        used[cand.lower()] = ext
        items.append(Item(path, cand))
    return items, failed


def output_paths(outdir: Path, name: str, save: Sequence[str]) -> dict[str, Path]:
    kinds = ["magimg", *[s for s in SAVE_CHOICES if s in save]]
    return {k: outdir / f"{name}_{k}.png" for k in kinds}


def _check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise FatalError(f"{outdir}: output path exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".magicfuse-write-test-", dir=outdir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise FatalError(f"{outdir}: output folder is not writable ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- the run


def _grid(image: np.ndarray, r: Any) -> np.ndarray:
    h, w = image.shape[:2]
    ch = int(min(h, 256))
    cw = max(8, int(round(w * ch / h)))
    ch = max(ch, 8)
    return make_grid([[image, r.ikr, r.ckg, r.magimg, r.seg_color]], ["input", "IKR", "CKG", "MagImg", "segmentation"],
                     cell_size=(ch, cw))


def _write_outputs(paths: dict[str, Path], image: np.ndarray, r: Any) -> None:
    arrays = {"magimg": r.magimg, "ikr": r.ikr, "ckg": r.ckg, "seg": r.seg_color}
    for kind, path in paths.items():
        if kind == "grid":
            write_png(path, _grid(image, r))
        else:
            write_png(path, arrays[kind])


def fuse_files(
    model: Any,
    items: list[Item],
    outdir: Path,
    *,
    save: Sequence[str] = (),
    steps: int | None = None,
    tau: float | None = None,
    init_noise_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    tile: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Fuse ``items`` with ``model`` (a :class:`magicfuse.inference.MagicFuse`) into ``outdir``.

    The library function behind ``magicfuse fuse`` (and the benchmark). Bad files are
    recorded as failed with a one-line reason; the run goes on.
    """
    import torch
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    summary = Summary()
    t0 = time.perf_counter()
    need = {"magimg"} | {s for s in save if s in ("ikr", "ckg", "seg")}
    if "grid" in save:
        need |= {"ikr", "ckg", "seg"}

    def fail(it: Item, reason: str) -> None:
        it.status, it.reason = "failed", " ".join(str(reason).split())
        summary.failed.append(it)
        log(f"magicfuse fuse: {it.path}: {it.reason}")

    # 1. skip finished ones, read headers, bucket by size (order of first appearance)
    buckets: dict[tuple[int, int], list[Item]] = {}
    for it in items:
        paths = output_paths(outdir, it.name, save)
        if not overwrite and all(p.is_file() for p in paths.values()):
            it.status, it.reason = "skipped", "exists (use --overwrite)"
            summary.skipped.append(it)
            continue
        try:
            h, w = image_size(it.path)
            if max_pixels is not None and h * w > max_pixels:
                raise DataError(f"image is {w}×{h} = {h * w} pixels, more than --max-pixels={max_pixels}")
        except MagicFuseError as exc:
            fail(it, str(exc).removeprefix(f"{it.path}: "))
            continue
        buckets.setdefault((h, w), []).append(it)

    todo = sum(len(v) for v in buckets.values())
    if "seg" in save and todo:
        legend = outdir / LEGEND_NAME
        if overwrite or not legend.is_file():
            write_png(legend, legend_image())
    bar = tqdm(total=todo, unit="img", desc="fuse", disable=not progress or todo == 0, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for (h, w), group in buckets.items():
            for c in range(0, len(group), max(1, batch_size)):
                chunk = group[c:c + batch_size]
                ok: list[tuple[Item, np.ndarray]] = []
                for it in chunk:
                    try:
                        img = read_image(it.path, "rgb", max_pixels=max_pixels)
                        if img.shape[:2] != (h, w):  # header and pixels disagree (e.g. EXIF rotation)
                            raise DataError(f"decoded size {img.shape[1]}×{img.shape[0]} differs from the header")
                        ok.append((it, img))
                    except MagicFuseError as exc:
                        fail(it, str(exc).removeprefix(f"{it.path}: "))
                        bar.update(1)
                # EXIF rotation can swap sizes: regroup by the decoded size
                by_size: dict[tuple[int, int], list[tuple[Item, np.ndarray]]] = {}
                for it, img in ok:
                    by_size.setdefault(img.shape[:2], []).append((it, img))
                for sub in by_size.values():
                    batch = torch.stack([torch.from_numpy(img).permute(2, 0, 1) for _, img in sub]).float() / 255.0
                    seeds = [image_seed(seed, it.name) for it, _ in sub]
                    try:
                        results = model.run_batch(batch, seeds, steps=steps, tau=tau, outputs=tuple(need), tile=tile,
                                                  init_noise_scale=init_noise_scale)
                    except (MagicFuseError, RuntimeError, MemoryError) as exc:
                        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        for it, _ in sub:
                            fail(it, f"fusion failed: {msg}")
                        bar.update(len(sub))
                        continue
                    for (it, img), r in zip(sub, results):
                        try:
                            _write_outputs(output_paths(outdir, it.name, save), img, r)
                        except (MagicFuseError, OSError) as exc:
                            fail(it, f"cannot write outputs: {exc}")
                        else:
                            it.status = "done"
                            summary.done.append(it)
                        bar.update(1)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _parse_save(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SAVE_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown output(s) {bad}; choose from {','.join(SAVE_CHOICES)}")
    return parts


def _parse_pixels(text: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels such as 50e6, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--max-pixels must be positive, got {text}")
    return int(v)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def run(args: argparse.Namespace) -> int:
    """Entry point of ``magicfuse fuse`` (returns the exit status)."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    outdir = Path(args.output)
    try:
        if args.tau is not None and not 0.0 <= args.tau <= 1.0:
            raise FatalError(f"--tau must be in [0, 1], got {args.tau}")
        if args.init_noise_scale is not None and not 0.0 <= args.init_noise_scale <= 1.0:
            raise FatalError(f"--init-noise-scale must be in [0, 1], got {args.init_noise_scale}")
        if args.tile is not None and args.tile < 0:
            raise FatalError(f"--tile must be >= 0 (0 = never window or tile), got {args.tile}")
        items, failed = collect_inputs(args.inputs, recursive=args.recursive)
        for it in failed:
            say(f"magicfuse fuse: {it.path}: {it.reason}")
        _check_outdir(outdir)
        if args.quiet:  # MLflow's own bar while it fetches a registered model's files
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        model = MagicFuse.from_pretrained(args.model, device=args.device, compile=args.compile,
                                          tile="auto" if args.tile is None else args.tile)
    except MagicFuseError as exc:
        say(f"magicfuse fuse: error: {exc}")
        return 2
    summary = fuse_files(model, items, outdir, save=args.save, steps=args.steps, tau=args.tau,
                         init_noise_scale=args.init_noise_scale, seed=args.seed,
                         batch_size=args.batch_size, overwrite=args.overwrite, max_pixels=args.max_pixels,
                         progress=not args.quiet, log=say)
    summary.failed = failed + summary.failed
    for line in summary.lines():
        print(line)
    return summary.exit_code


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="fuse images (files, folders, globs) into MagImg / IKR / CKG / segmentation PNGs",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Output names mirror folder structure; clashes get the extension or _2, _3... appended. "
               "Exit status: 0 ok, 1 some inputs failed, 2 fatal error.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLflow model URI, pipeline checkpoint or model folder (default {DEFAULT_MODEL})")
    p.add_argument("--steps", type=_positive, default=None, help="DDIM steps (default: the model's, 25)")
    p.add_argument("--tau", type=float, default=None, help="radiation weight cap τ in [0,1] (default: the model's)")
    p.add_argument("--init-noise-scale", type=float, default=None, metavar="S",
                   help="scale of the starting noise z_T in [0,1]: 1 = the paper's N(0, I), lower = fewer "
                        "invented details (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed (each image: hash of seed and its output name)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--batch-size", type=_positive, default=4, help="images per batch (same-size images only)")
    p.add_argument("--save", type=_parse_save, default=(), metavar="LIST",
                   help="extra outputs, comma-separated: ikr,ckg,seg,grid")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA)")
    p.add_argument("--max-pixels", type=_parse_pixels, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images with more pixels (default {DEFAULT_MAX_PIXELS:.0e})")
    p.add_argument("--tile", type=int, default=None,
                   help="attention window size in latent pixels, used for every image (default: automatic — "
                        "global attention up to 32,768 latent pixels on a GPU (then windows of 64), 4,096 on the "
                        "CPU (then windows of 32); networks and autoencoder tiled only beyond 16.8 MP); 0 = never window or tile")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m magicfuse.fuse_cli ...`` (same as ``magicfuse fuse ...``)."""
    parser = argparse.ArgumentParser(prog="magicfuse")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    args = parser.parse_args(["fuse", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
