"""Benchmark: magicfuse.evaluation.metrics against a straightforward per-image numpy version.

The reference below is a plain, per-image numpy + OpenCV transcription of the MATLAB
formulas in ../shared/docs/METRICS.md (each metric on its own, 2-D filters with
cv2.filter2D, no sharing, no batching). The script first checks that both agree on a
few real 640x480 MSRS pairs (synthetic images if ../shared is absent), then times
per-image seconds of the reference and of the library on batches, with the speed-up.

    .venv/bin/python benchmarks/bench_metrics.py [--threads 1] [--batches 1,6,12] [--repeats 3]

Both wall-clock and process CPU time are printed; CPU time per image is the figure
to quote on a shared machine (it does not count time spent waiting for the CPU).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = (REPO / ".." / "shared").resolve()
PAIRS = ("00012N", "00032N", "00040N", "00051N", "00055D", "00103D")


# --------------------------------------------------------------------------- reference


def ref_gray(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64)
    g = 0.298936021293775 * x[..., 0] + 0.587043074451121 * x[..., 1] + 0.114020904255103 * x[..., 2]
    return np.floor(g + 0.5).astype(np.uint8)


def ref_entropy_counts(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ref_en(f: np.ndarray) -> float:
    return ref_entropy_counts(np.bincount(f.ravel(), minlength=256))


def ref_mi(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    def joint(x: np.ndarray, y: np.ndarray) -> float:
        xi = np.minimum(x.astype(np.int64), 254)  # Hab.m: uint8 x+1 saturates
        yi = np.minimum(y.astype(np.int64), 254)
        return ref_entropy_counts(np.bincount((xi * 256 + yi).ravel(), minlength=65536))

    ha, hb, hf = ref_en(a), ref_en(b), ref_en(f)
    return (ha + hf - joint(f, a)) + (hb + hf - joint(f, b))


def ref_sd(f: np.ndarray) -> float:
    x = f.astype(np.float64)
    return float(np.sqrt(((x - x.mean()) ** 2).sum() / x.size))


def ref_sf(f: np.ndarray) -> float:
    x = f.astype(np.float64)
    rf = np.diff(x, axis=0)
    cf = np.diff(x, axis=1)
    return float(np.sqrt(np.mean(rf**2) + np.mean(cf**2)))


def ref_ag(f: np.ndarray) -> float:
    x = f.astype(np.float64)
    gy, gx = np.gradient(x)
    r, c = x.shape
    return float(np.sqrt((gx**2 + gy**2) / 2).sum() / ((r - 1) * (c - 1)))


def gauss2d(n: int, sigma: float) -> np.ndarray:
    ax = np.arange(n) - (n - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    h = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return h / h.sum()


def ref_ssim_one(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    w = gauss2d(11, 1.5)

    def filt(z: np.ndarray) -> np.ndarray:
        return cv2.filter2D(z, -1, w, borderType=cv2.BORDER_REPLICATE)

    c1, c2 = 0.01**2, 0.03**2
    mux, muy = filt(x), filt(y)
    sx2 = filt(x * x) - mux**2
    sy2 = filt(y * y) - muy**2
    sxy = filt(x * y) - mux * muy
    m = ((2 * mux * muy + c1) * (2 * sxy + c2)) / ((mux**2 + muy**2 + c1) * (sx2 + sy2 + c2))
    return float(m.mean())


def ref_ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    return 0.5 * ref_ssim_one(f, a) + 0.5 * ref_ssim_one(f, b)


def ref_psnr_mse(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    a, b, f = (z.astype(np.float64) / 255.0 for z in (a, b, f))
    mse = 0.5 * np.mean((f - a) ** 2) + 0.5 * np.mean((f - b) ** 2)
    return float(20 * np.log10(255 / np.sqrt(mse))), float(mse)


def corr2(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def ref_cc(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    a, b, f = (z.astype(np.float64) for z in (a, b, f))
    return 0.5 * (corr2(a, f) + corr2(b, f))


def ref_scd(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    a, b, f = (z.astype(np.float64) for z in (a, b, f))
    with np.errstate(invalid="ignore", divide="ignore"):
        return corr2(f - b, a) + corr2(f - a, b)


def ref_qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)

    def conv2_same(x: np.ndarray, h: np.ndarray) -> np.ndarray:  # conv2 = correlation with flipped kernel
        return cv2.filter2D(x, -1, h[::-1, ::-1].copy(), borderType=cv2.BORDER_CONSTANT)

    def grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.float64)
        sx, sy = conv2_same(x, h3), conv2_same(x, h1)
        g = np.sqrt(sx**2 + sy**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            al = np.where(sx == 0, np.pi / 2, np.arctan(sy / sx))
        return g, al

    ga, aa = grad(a)
    gb, ab = grad(b)
    gf, af = grad(f)

    def q(gs: np.ndarray, as_: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.where(gs > gf, gf / gs, np.where(gs < gf, gs / gf, gf))
        A = 1 - np.abs(as_ - af) / (np.pi / 2)
        return tg / (1 + np.exp(kg * (G - dg))) * ta / (1 + np.exp(ka * (A - da)))

    return float((q(ga, aa) * ga + q(gb, ab) * gb).sum() / (ga + gb).sum())


def ref_nabf(f: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> float:
    """analysis_nabf(f, I1, I2) on double 0-255 images."""
    vt = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 8
    ht = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=np.float64) / 8

    def sob(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.float64)
        gv = cv2.filter2D(x, -1, vt, borderType=cv2.BORDER_REFLECT_101)
        gh = cv2.filter2D(x, -1, ht, borderType=cv2.BORDER_REFLECT_101)
        g = np.sqrt(gh**2 + gv**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where((gv == 0) & (gh == 0), 0.0, np.arctan(gv / gh))
        return g, a

    gF, aF = sob(f)
    gA, aA = sob(s1)
    gB, aB = sob(s2)

    def q(gs: np.ndarray, as_: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where((gs == 0) | (gF == 0), 0.0, np.where(gs > gF, gF / gs, gs / gF))
        arel = np.abs(np.abs(as_ - aF) - np.pi / 2) * 2 / np.pi
        qg = 0.9999 / (1 + np.exp(-19 * (rel - 0.5)))
        qa = 0.9995 / (1 + np.exp(-22 * (arel - 0.5)))
        return np.sqrt(qg * qa)

    wA = np.where(gA >= 2, gA**1.5, 0.001)
    wB = np.where(gB >= 2, gB**1.5, 0.001)
    na = (gF > gA) & (gF > gB)
    return float((na * ((1 - q(gA, aA)) * wA + (1 - q(gB, aB)) * wB)).sum() / (wA + wB).sum())


def ref_vifp(ref: np.ndarray, dist: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    dist = dist.astype(np.float64)
    num = den = 0.0
    eps = 1e-10

    def valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        r = w.shape[0] // 2
        return cv2.filter2D(x, -1, w, borderType=cv2.BORDER_CONSTANT)[r:-r, r:-r]

    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        w = gauss2d(n, n / 5)
        if scale > 1:
            ref = valid(ref, w)[::2, ::2]
            dist = valid(dist, w)[::2, ::2]
        mu1, mu2 = valid(ref, w), valid(dist, w)
        s1 = valid(ref * ref, w) - mu1 * mu1
        s2 = valid(dist * dist, w) - mu2 * mu2
        s12 = valid(ref * dist, w) - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g[s1 < eps] = 0
        sv[s1 < eps] = s2[s1 < eps]
        s1[s1 < eps] = 0
        g[s2 < eps] = 0
        sv[s2 < eps] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= eps] = eps
        num += np.log10(1 + g**2 * s1 / (sv + 2)).sum()
        den += np.log10(1 + s1 / 2).sum()
    return float(num / den)


def reference_metrics(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    psnr, mse = ref_psnr_mse(a, b, f)
    return {
        "EN": ref_en(f), "SD": ref_sd(f), "SF": ref_sf(f), "AG": ref_ag(f), "MI": ref_mi(a, b, f),
        "SSIM": ref_ssim(a, b, f), "Qabf": ref_qabf(a, b, f), "PSNR": psnr, "MSE": mse,
        "VIF": ref_vifp(a, f) + ref_vifp(b, f), "SCD": ref_scd(a, b, f), "CC": ref_cc(a, b, f),
        "Nabf": ref_nabf(f, a, b),
    }


# --------------------------------------------------------------------------- data


def load_pairs() -> tuple[np.ndarray, np.ndarray, str]:
    root = SHARED / "data" / "msrs" / "test"
    if all((root / d / f"{k}.png").is_file() for d in ("ir", "vi") for k in PAIRS):
        ir, vi = [], []
        for k in PAIRS:
            a = cv2.imread(str(root / "ir" / f"{k}.png"), cv2.IMREAD_UNCHANGED)
            b = cv2.imread(str(root / "vi" / f"{k}.png"), cv2.IMREAD_UNCHANGED)
            ir.append(a if a.ndim == 2 else ref_gray(a[..., ::-1]))
            vi.append(b if b.ndim == 2 else ref_gray(b[..., ::-1]))
        return np.stack(ir), np.stack(vi), f"MSRS test pairs {', '.join(PAIRS)}"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    ir, vi = [], []
    for i in range(6):
        base = 128 + 90 * np.sin(xx / (17 + 3 * i)) * np.cos(yy / (23 + i))
        ir.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        vi.append(np.clip(255 - base * 0.7 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return np.stack(ir), np.stack(vi), "synthetic 640x480 images (../shared absent)"


def fuse_test(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A non-trivial test fusion (mean base + max-abs detail), so that every metric is defined."""
    fa = a.astype(np.float64)
    fb = b.astype(np.float64)
    base_a = cv2.blur(fa, (7, 7))
    base_b = cv2.blur(fb, (7, 7))
    da, db = fa - base_a, fb - base_b
    det = np.where(np.abs(da) >= np.abs(db), da, db)
    return np.clip(np.floor((base_a + base_b) / 2 + det + 0.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1: per core)")
    ap.add_argument("--batches", default="1,6,12", help="library batch sizes to time (comma list)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is kept")
    ap.add_argument("--ref-images", type=int, default=3, help="images timed with the reference")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from magicfuse.evaluation.metrics import compute_metrics_batch

    A, B, what = load_pairs()
    F = np.stack([fuse_test(a, b) for a, b in zip(A, B)])
    print(f"data: {what}; {A.shape[0]} pairs of {A.shape[2]}x{A.shape[1]}; threads={args.threads}")

    # agreement
    lib = compute_metrics_batch(F, A, B, chunk=max(int(x) for x in args.batches.split(",")))
    worst = 0.0
    for i in range(min(3, A.shape[0])):
        ref = reference_metrics(F[i], A[i], B[i])
        for m, v in ref.items():
            mine = float(lib[m][i])
            rel = abs(mine - v) / max(abs(v), 1e-12)
            worst = max(worst, rel)
            if not (rel < 1e-8 or (math.isnan(v) and math.isnan(mine))):
                print(f"  MISMATCH image {i} {m}: reference {v!r} library {mine!r} (rel {rel:.2e})")
                return 1
    print(f"agreement: library == reference on {min(3, A.shape[0])} images, all 13 metrics, "
          f"worst relative difference {worst:.1e}")

    def timed(fn) -> tuple[float, float]:
        best_w = best_c = float("inf")
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            best_w = min(best_w, time.perf_counter() - w0)
            best_c = min(best_c, time.process_time() - c0)
        return best_w, best_c

    nref = min(args.ref_images, A.shape[0])
    rw, rc = timed(lambda: [reference_metrics(F[i], A[i], B[i]) for i in range(nref)])
    rw, rc = rw / nref, rc / nref
    print(f"\n{'implementation':<34}{'wall s/img':>12}{'CPU s/img':>12}{'speed-up (CPU)':>16}")
    print(f"{'reference numpy, per image':<34}{rw:>12.4f}{rc:>12.4f}{'1.0x':>16}")
    for bs in (int(x) for x in args.batches.split(",")):
        reps = -(-bs // A.shape[0])
        Fb, Ab, Bb = (np.concatenate([x] * reps)[:bs] for x in (F, A, B))
        lw, lc = timed(lambda: compute_metrics_batch(Fb, Ab, Bb, chunk=bs))
        lw, lc = lw / bs, lc / bs
        print(f"{f'library, batch {bs} (one chunk)':<34}{lw:>12.4f}{lc:>12.4f}{rc / lc:>15.1f}x")
        if bs > 1:
            lw, lc = timed(lambda: compute_metrics_batch(Fb, Ab, Bb))
            lw, lc = lw / bs, lc / bs
            print(f"{f'library, batch {bs} (default chunk)':<34}{lw:>12.4f}{lc:>12.4f}{rc / lc:>15.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
