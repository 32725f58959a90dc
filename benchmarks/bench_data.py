"""Speed of the data layer: synthetic generation, shard writing, shard reading.

    python benchmarks/bench_data.py                         # n=64, sizes 128x96 and 640x480
    python benchmarks/bench_data.py --n 256 --sizes 640x480 --workers 0,2,4

For each size (WIDTHxHEIGHT) it reports

* generation: scenes/s of ``magicfuse.data.synthetic.generate_scene``;
* writing: samples/s of ``write_shards`` (degradation + 4 PNG encodes + tar + manifest);
* reading: samples/s of one full epoch of ``make_loader`` (tar read + PNG decode +
  collate to float tensors), full frames (no crop), for each worker count; the
  time includes worker start-up, as a training epoch would.

Shards go to a temporary folder (or --out) that is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from _common import parse_size  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="samples per size")
    p.add_argument("--sizes", default="128x96,640x480", help="comma-separated WIDTHxHEIGHT")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="shard folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the shards written")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    a.sizes = [parse_size(s) for s in a.sizes.split(",") if s]
    a.workers = [int(w) for w in a.workers.split(",") if w]
    if a.n < 1:
        p.error("--n must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import torch

    from magicfuse.data.readers import PairSample
    from magicfuse.data.shards import ShardConfig, make_loader, write_shards
    from magicfuse.data.synthetic import generate_scene

    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_data_"))
    print(f"# bench_data: n={a.n} per size, batch {a.batch_size}, {a.samples_per_shard} samples/shard, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'size':>9} {'stage':<26} {'items/s':>9} {'seconds':>8}")
    results = []
    try:
        for w, h in a.sizes:
            size = f"{w}x{h}"

            t = time.perf_counter()
            scenes = [generate_scene(a.seed, i, height=h, width=w) for i in range(a.n)]
            dt = time.perf_counter() - t
            results.append({"size": size, "stage": "generate", "per_s": a.n / dt, "seconds": dt})
            print(f"{size:>9} {'generate (scenes/s)':<26} {a.n / dt:9.1f} {dt:8.2f}", flush=True)

            samples = [
                PairSample(key=f"{i:06d}", visible=s.visible, infrared=s.infrared, label=s.label, boxes=None,
                           source="synthetic", split="train", paths={})
                for i, s in enumerate(scenes)
            ]
            out = root / size
            cfg = ShardConfig(samples_per_shard=a.samples_per_shard, seed=a.seed)
            t = time.perf_counter()
            res = write_shards(samples, out, split="train", cfg=cfg, overwrite=True, progress=False)
            dt = time.perf_counter() - t
            mib = sum(p.stat().st_size for p in res.shards) / 2**20
            results.append({"size": size, "stage": "write", "per_s": a.n / dt, "seconds": dt, "shard_mib": mib})
            print(f"{size:>9} {'write (samples/s)':<26} {a.n / dt:9.1f} {dt:8.2f}   "
                  f"{len(res.shards)} shards, {mib:.1f} MiB", flush=True)

            for nw in a.workers:
                loader = make_loader(out, "train", batch_size=a.batch_size, crop=None, num_workers=nw,
                                     seed=a.seed)
                t = time.perf_counter()
                count = 0
                for batch in loader:
                    count += len(batch["key"])
                dt = time.perf_counter() - t
                if count != a.n:
                    raise RuntimeError(f"loader returned {count} samples, expected {a.n}")
                stage = f"read {nw} workers"
                results.append({"size": size, "stage": stage, "per_s": count / dt, "seconds": dt})
                print(f"{size:>9} {stage + ' (samples/s)':<26} {count / dt:9.1f} {dt:8.2f}", flush=True)
            del scenes, samples
    finally:
        if not a.keep and not a.out:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
