"""Throughput and peak memory of `magicfuse fuse` (through `magicfuse.fuse_cli.fuse_files`,
the function the CLI runs).

CPU (default): the tiny profile (random weights; real AE from ../shared/weights when
present), 640×480 and 2048×1024 images (the real frames from
../shared/data/magicfuse_official/inputs when present, else synthetic), automatic attention
windows / tiling (the device's budget, magicfuse.tiling.TilingBudget.for_device).
Each configuration runs in a fresh subprocess so that its peak RSS is its own.

    .venv/bin/python benchmarks/bench_fuse.py [--steps 4] [--images 2]
    .venv/bin/python benchmarks/bench_fuse.py --steps 25 --sizes 480x640 --tiles auto,0   # windows vs global
    .venv/bin/python benchmarks/bench_fuse.py --paper --device cuda   # paper nets, bf16 + compile, batch 1 and 4
    .venv/bin/python benchmarks/bench_fuse.py --model artifacts/mkf/pipeline.pt --sizes 480x640  # a trained model

Prints a table: device, profile, size, tile setting, batch, steps, images/s, s/image, peak memory,
and — when several ``--tiles`` are given — the mean / max absolute difference (grey levels) of each
setting's MagImgs from the first setting's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
AE_WEIGHTS = SHARED / "weights" / "official_ae.pth"
INPUTS = SHARED / "data" / "magicfuse_official" / "inputs"
sys.path.insert(0, str(REPO))


def _build_pipeline(path: Path, profile: str) -> None:
    import torch

    from magicfuse.checkpoint import model_from_entry, save_pipeline
    from magicfuse.models import build_model

    torch.manual_seed(0)
    sfx = "paper" if profile == "paper" else "tiny"
    if AE_WEIGHTS.is_file():
        from magicfuse.models.importer import convert_part

        ae = model_from_entry(convert_part("ae", AE_WEIGHTS), str(AE_WEIGHTS))
    else:
        ae = build_model("ae", "ae")
    nets = [build_model("unet", f"ikr-{sfx}"), build_model("unet", f"ckg-{sfx}"), build_model("fusion", f"fusion-{sfx}")]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output convs -> small random weights (eps != 0)
        for net in nets:
            for p in net.parameters():
                if p.ndim > 1 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_pipeline(path, ae, *nets, sampler={"steps": 25, "tau": 0.4, "thermal_classes": [2]})


def _images(folder: Path, size: tuple[int, int], n: int) -> None:
    import cv2
    import numpy as np

    from magicfuse.imageio import read_image, write_png

    h, w = size
    real = sorted(p for p in INPUTS.glob("*.png")) if INPUTS.is_dir() else []
    real = [p for p in real if read_image(p).shape[:2] == (h, w)]
    rng = np.random.default_rng(0)
    for i in range(n):
        if real:
            img = read_image(real[i % len(real)])
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx / w, yy / h, 0.5 + 0.0 * xx], -1) * 200
            img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            img = cv2.GaussianBlur(img, (5, 5), 0)
        write_png(folder / f"img{i:03d}.png", img)


def worker(cfg: dict) -> dict:
    import torch

    from magicfuse.fuse_cli import collect_inputs, fuse_files
    from magicfuse.inference import MagicFuse

    torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _images(tmp / "in", tuple(cfg["size"]), cfg["images"] + cfg["warmup"])
        tile = cfg["tile"] if cfg["tile"] == "auto" else int(cfg["tile"])
        model = MagicFuse.from_pretrained(cfg["model"], device=cfg["device"], compile=cfg["compile"], tile=tile)
        items, _ = collect_inputs([str(tmp / "in")])
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if cfg["warmup"]:
            fuse_files(model, items[:cfg["warmup"]], tmp / "warm", steps=cfg["steps"], batch_size=cfg["batch"],
                       progress=False, log=lambda m: None)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = fuse_files(model, items[cfg["warmup"]:], Path(cfg["out"]), steps=cfg["steps"], batch_size=cfg["batch"],
                       progress=False, log=lambda m: print(m, file=sys.stderr))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        dev_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else _cpu_name()
        gpu_peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else None
    return {"done": len(s.done), "failed": len(s.failed), "seconds": dt, "device": dev_name,
            "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "gpu_gib": gpu_peak}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paper", action="store_true", help="paper architecture (needs a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 4 on CPU, 25 for --paper)")
    ap.add_argument("--images", type=int, default=2, help="timed images per configuration")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sizes", default=None, help="comma list HxW (default 480x640,1024x2048; paper: 480x640)")
    ap.add_argument("--batches", default=None, help="comma list (default 1; paper: 1,4)")
    ap.add_argument("--tiles", default="auto",
                    help="comma list of tile settings: auto (the device's budget), 0 (global attention, no "
                         "tiling) or N (attention windows of N latent pixels); default auto")
    ap.add_argument("--model", default=None,
                    help="a trained pipeline checkpoint (e.g. artifacts/mkf/pipeline.pt of the real profile) "
                         "instead of random tiny/paper networks; its own sampler steps unless --steps")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    profile = "paper" if args.paper else "tiny"
    if args.model:
        if not Path(args.model).is_file():
            raise SystemExit(f"--model: {args.model}: no such pipeline checkpoint")
        from magicfuse.checkpoint import load_pipeline

        profile = Path(args.model).name
        steps = args.steps or int(load_pipeline(args.model, map_location="cpu")[1]["sampler"]["steps"])
    else:
        steps = args.steps or (25 if args.paper else 4)
    sizes = args.sizes or ("480x640" if args.paper else "480x640,1024x2048")
    sizes = [tuple(int(v) for v in s.split("x")) for s in sizes.split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if args.paper else "1")).split(",")]
    tiles = [t.strip() for t in args.tiles.split(",")]
    for t in tiles:
        if t != "auto" and not (t.isdigit()):
            raise SystemExit(f"--tiles: {t!r} is not 'auto' or a non-negative integer")
    compile_ = args.paper and not args.no_compile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model).resolve()
        else:
            model = Path(tmp) / f"pipeline-{profile}.pt"
            _build_pipeline(model, profile)
        for size, batch in itertools.product(sizes, batches):
            first_out = None
            for tile in tiles:
                n = max(args.images, batch)
                out = Path(tmp) / f"out-{size[0]}x{size[1]}-b{batch}-t{tile}"
                cfg = {"model": str(model), "device": args.device, "size": size, "batch": batch, "steps": steps,
                       "images": n, "warmup": batch if (compile_ or args.device != "cpu") else 0,
                       "compile": compile_, "threads": args.threads, "tile": tile, "out": str(out)}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                      text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"worker failed for {cfg}")
                r = json.loads(line[7:])
                first_out = first_out or out
                delta = _difference(first_out, out) if len(tiles) > 1 else None
                rows.append((r["device"], profile, f"{size[1]}x{size[0]}", tile, batch, steps,
                             r["done"] / r["seconds"], r["seconds"] / max(r["done"], 1), r["rss_gib"], r["gpu_gib"],
                             r["failed"], delta))
                print(f"... {rows[-1]}", file=sys.stderr)
    print(f"\nmagicfuse fuse benchmark — {rows[0][0]}; precision: "
          f"{'bf16 autocast' if args.device != 'cpu' else 'fp32'}{' + torch.compile' if compile_ else ''}; "
          "tile auto = the device's attention-window / tiling budget, 0 = global attention, untiled")
    print(f"| profile | size (W×H) | tile | batch | steps | images/s | s/image | peak RSS GiB | peak GPU GiB "
          f"| mean / max abs diff vs tile {tiles[0]} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dev, prof, size, tile, batch, st, ips, spi, rss, gpu, failed, delta in rows:
        g = f"{gpu:.2f}" if gpu is not None else "–"
        d = f"{delta[0]:.3f} / {delta[1]:.0f}" if delta is not None else "–"
        print(f"| {prof} | {size} | {tile} | {batch} | {st} | {ips:.4f} | {spi:.2f} | {rss:.2f} | {g} | {d} |"
              + (f" ({failed} failed)" if failed else ""))


def _difference(a: Path, b: Path) -> tuple[float, float]:
    """Mean and max absolute difference (grey levels) between same-named MagImgs of two runs."""
    import numpy as np

    from magicfuse.imageio import read_image

    names = sorted(p.name for p in a.glob("*_magimg.png"))
    if not names:
        return float("nan"), float("nan")
    diffs = [np.abs(read_image(a / n).astype(np.int16) - read_image(b / n).astype(np.int16)) for n in names]
    return float(np.mean([d.mean() for d in diffs])), float(max(d.max() for d in diffs))


if __name__ == "__main__":
    main()
