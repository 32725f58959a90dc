"""Speed and memory of the joint MagicFuse sampler (random network weights).

    python benchmarks/bench_sampler.py                      # tiny profile, CPU, 128x96, batch 1 and 8
    python benchmarks/bench_sampler.py --paper --device cuda  # paper nets, 640x480, batch 1 and 4,
                                                              # fp32 eager and bf16 + torch.compile

Each configuration reports images/s, s/image and peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``); on CPU the
peak resident set size of a fresh child process per configuration
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), both absolute and as the growth
over the state just before the first sampler call (networks and inputs in place).
The autoencoder uses the authors' released weights (../shared/weights/official_ae.pth)
when that file exists; the denoisers and the fusion network are random (speed does
not depend on the values). Sizes are WIDTHxHEIGHT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from _common import parse_size  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OFFICIAL_AE = REPO / ".." / "shared" / "weights" / "official_ae.pth"


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda for --paper, else cpu)")
    p.add_argument("--profile", choices=("tiny", "paper"), default=None)
    p.add_argument("--paper", action="store_true", help="shortcut for --profile paper with its default sizes/batches/modes")
    p.add_argument("--sizes", default=None, help="comma-separated WIDTHxHEIGHT (default 128x96 tiny, 640x480 paper)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8 tiny, 1,4 paper)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--modes", default=None,
                   help="comma-separated of fp32, bf16, fp32-compile, bf16-compile (default fp32 tiny, fp32,bf16-compile paper)")
    p.add_argument("--warmup", type=int, default=1, help="untimed sampler calls per configuration (compile happens here)")
    p.add_argument("--iters", type=int, default=2, help="timed sampler calls per configuration")
    p.add_argument("--variant", default="full")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.paper:
        a.profile = a.profile or "paper"
    a.profile = a.profile or "tiny"
    paper = a.profile == "paper"
    a.device = a.device or ("cuda" if paper else "cpu")
    a.sizes = a.sizes or ("640x480" if paper else "128x96")
    a.batches = a.batches or ("1,4" if paper else "1,8")
    a.modes = a.modes or ("fp32,bf16-compile" if paper else "fp32")
    for m in a.modes.split(","):
        if m not in ("fp32", "bf16", "fp32-compile", "bf16-compile"):
            p.error(f"unknown mode {m!r}")
    return a


def _build(profile: str, device, compile_nets: bool):
    import torch

    from magicfuse.diffusion.sampler import MagicFuseNets
    from magicfuse.models.presets import build_model

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device (fast for the 0.5 B-parameter CKG)
        ae = build_model("ae", "ae")
        nets = MagicFuseNets(
            ae=ae,
            ikr=build_model("unet", f"ikr-{profile}"),
            ckg=build_model("unet", f"ckg-{profile}"),
            fusion=build_model("fusion", f"fusion-{profile}"),
        )
    ae_note = "random"
    if OFFICIAL_AE.is_file():
        sd = torch.load(OFFICIAL_AE, map_location="cpu", weights_only=True)
        ae.encoder.load_state_dict(sd["encoder"])
        ae.decoder.load_state_dict(sd["decoder"])
        ae_note = "official"
    for m in nets.modules():
        m.to(device).eval().requires_grad_(False)
    if compile_nets:
        nets.ikr = torch.compile(nets.ikr)
        nets.ckg = torch.compile(nets.ckg)
        nets.fusion = torch.compile(nets.fusion)
        nets.ae.encoder = torch.compile(nets.ae.encoder)
        nets.ae.decoder = torch.compile(nets.ae.decoder)
    nparams = {k: sum(p.numel() for p in getattr(nets, k).parameters()) for k in ("ae", "ikr", "ckg", "fusion")}
    return nets, ae_note, nparams


def _run_one(cfg: dict) -> dict:
    """One configuration in this process; returns the measurements."""
    import contextlib

    import torch

    from magicfuse.diffusion.sampler import magicfuse_sample

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    precision, _, comp = cfg["mode"].partition("-")
    nets, ae_note, nparams = _build(cfg["profile"], device, comp == "compile")
    w, h = cfg["size"]
    b = cfg["batch"]
    image = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    def once(seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        with amp:
            out = magicfuse_sample(nets, image, steps=cfg["steps"], variant=cfg["variant"], generator=g)
        return out

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i in range(cfg["warmup"]):
        once(i)
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(cfg["iters"]):
        out = once(100 + i)
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    assert out.magimg.shape == (b, 3, h, w)
    res = {
        **cfg,
        "size": f"{w}x{h}",
        "images_per_s": b * cfg["iters"] / dt,
        "s_per_image": dt / (b * cfg["iters"]),
        "warmup_s": warm_s,
        "ae_weights": ae_note,
        "params_M": {k: round(v / 1e6, 3) for k, v in nparams.items()},
    }
    if cuda:
        res["peak_mem_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        res["device_name"] = torch.cuda.get_device_name(device)
    else:
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        res["peak_mem_MiB"] = rss1 / 1024
        res["peak_mem_growth_MiB"] = (rss1 - rss0) / 1024
        res["device_name"] = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return res


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    if a.child:
        print(json.dumps(_run_one(json.loads(a.child))))
        return 0
    import torch

    sizes = [parse_size(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    modes = a.modes.split(",")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    results = []
    for mode in modes:
        for size in sizes:
            for b in batches:
                cfg = dict(profile=a.profile, device=a.device, mode=mode, size=size, batch=b, steps=a.steps,
                           warmup=a.warmup, iters=a.iters, variant=a.variant, threads=a.threads)
                if a.device == "cpu":
                    # A fresh process per configuration, so that max RSS belongs to it alone.
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr, file=sys.stderr)
                        return proc.returncode
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                else:
                    res = _run_one(cfg)
                results.append(res)
                print(f"  done {mode} {res['size']} batch {b}: {res['images_per_s']:.3f} images/s, "
                      f"{res['s_per_image']:.3f} s/image, peak {res['peak_mem_MiB']:.0f} MiB, "
                      f"warmup {res['warmup_s']:.1f} s", flush=True)

    r0 = results[0]
    print(f"\nMagicFuse sampler — profile {a.profile}, {a.steps} steps, variant {a.variant}, "
          f"torch {torch.__version__}, device: {r0['device_name']}")
    print(f"params (M): {r0['params_M']}; AE weights: {r0['ae_weights']}; warmup {a.warmup}, timed iters {a.iters}")
    growth = "growth MiB" if a.device == "cpu" else ""
    head = f"{'mode':<14}{'size':>10}{'batch':>7}{'images/s':>11}{'s/image':>10}{'peak MiB':>11}{growth:>12}{'warmup s':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        extra = f"{r['peak_mem_growth_MiB']:>12.1f}" if "peak_mem_growth_MiB" in r else ""
        print(f"{r['mode']:<14}{r['size']:>10}{r['batch']:>7}{r['images_per_s']:>11.3f}{r['s_per_image']:>10.3f}"
              f"{r['peak_mem_MiB']:>11.1f}{extra}{r['warmup_s']:>10.1f}")
    if a.json:
        from magicfuse.io import write_json_atomic

        write_json_atomic(a.json, results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
