"""Training throughput of the IKR / CKG denoisers (images/s), through the real trainer.

Builds a small synthetic shard set in a temporary folder, then runs
`magicfuse.training.ldm.train_ldm` for each branch with the chosen UNet preset and
prints the steady-state images/s (the mean over the logging windows after the
first, which holds start-up and cuDNN autotuning).

    python benchmarks/bench_train.py                          # tiny presets, CPU
    python benchmarks/bench_train.py --preset paper --device cuda --steps 30
Compare with DESIGN.md §6 (authors' nets on an H200, 256x256 crops, fp32 eager:
IKR batch 16 ~ 163 images/s, CKG batch 4 ~ 51 images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from magicfuse.checkpoint import save_model  # noqa: E402
from magicfuse.data.degrade import DegradationConfig  # noqa: E402
from magicfuse.data.readers import open_reader  # noqa: E402
from magicfuse.data.shards import ShardConfig, write_shards  # noqa: E402
from magicfuse.data.synthetic import write_synthetic_dataset  # noqa: E402
from magicfuse.models.presets import build_model  # noqa: E402
from magicfuse.training.ldm import LDMTrainConfig, train_ldm  # noqa: E402

OFFICIAL_AE = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "official_ae.pth"
BATCH = {"ikr": 16, "ckg": 4}  # Table 1


def make_shards(root: Path, n: int, height: int, width: int, kinds: tuple[str, ...] | None) -> Path:
    scenes = root / "scenes"
    write_synthetic_dataset(scenes, seed=0, splits={"train": n}, height=height, width=width, progress=False)
    out = root / "shards"
    write_shards(open_reader("msrs", scenes, "train"), out, split="train", source_name="synthetic",
                 cfg=ShardConfig(samples_per_shard=64, seed=0),
                 degradation_cfg=DegradationConfig(kinds=kinds) if kinds else None, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    ap.add_argument("--branches", default="ikr,ckg")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--crop", type=int, default=None, help="default 256 (paper) / 64 (tiny)")
    ap.add_argument("--batch", type=int, default=None, help="default: Table 1 (paper) / 8 (tiny)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (default fp32)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--degradations", default=None,
                    help="comma-separated degradation kinds for the shards (default: all; the ones done in "
                         "numpy - haze,rain,low_light,over_exposure,motion_blur - need no Albumentations)")
    args = ap.parse_args()

    crop = args.crop or (256 if args.preset == "paper" else 64)
    size = (crop, crop * 5 // 4) if crop > 96 else (96, 128)  # scenes just big enough for the crop
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        kinds = tuple(args.degradations.split(",")) if args.degradations else None
        shards = make_shards(tmp, args.scenes, *size, kinds)
        print(f"shards: {args.scenes} scenes of {size[1]}x{size[0]} in {time.perf_counter() - t0:.1f} s")
        ae_path = OFFICIAL_AE if OFFICIAL_AE.is_file() else tmp / "ae.pt"
        if not OFFICIAL_AE.is_file():
            save_model(ae_path, build_model("ae", "ae"), "ae")
        for branch in args.branches.split(","):
            batch = args.batch or (BATCH[branch] if args.preset == "paper" else 8)
            cfg = LDMTrainConfig(model=f"{branch}-{args.preset}", steps=args.steps, batch_size=batch, crop=crop,
                                 log_every=args.log_every, ckpt_every=args.steps, eval_samples=0,
                                 amp=args.amp, device=device, progress=False, num_workers=args.workers,
                                 ema_decay=0.0)  # no EMA copy: keeps the final checkpoint small
            res = train_ldm(cfg, branch=branch, ae_checkpoint=ae_path, shards_dir=shards,
                            out_dir=tmp / f"out-{branch}")
            windows = [h["images_per_s"] for h in res.history][1:] or [res.images_per_s]
            steady = sum(windows) / len(windows)
            rows.append({"branch": branch, "preset": cfg.model, "batch": batch, "crop": crop,
                         "precision": "bf16" if args.amp and device == "cuda" else "fp32",
                         "images_per_s": steady, "overall_images_per_s": res.images_per_s,
                         "final_loss": res.final_metrics.get("loss")})
            print(f"{branch}: {cfg.model} batch {batch} crop {crop}: {steady:.1f} images/s steady "
                  f"({res.images_per_s:.1f} overall incl. start-up)")
    print(f"\ntraining throughput on {name}")
    print(f"{'branch':6} {'preset':10} {'batch':>5} {'crop':>5} {'prec':>5} {'images/s':>9}")
    for r in rows:
        print(f"{r['branch']:6} {r['preset']:10} {r['batch']:5d} {r['crop']:5d} {r['precision']:>5} "
              f"{r['images_per_s']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
