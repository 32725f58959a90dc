"""Benchmark: magicfuse.evaluation.metrics against per-image reference implementations.

Three implementations of the same formulas (../shared/docs/METRICS.md, the MATLAB
evaluation code of Linfeng-Tang/Image-Fusion) are compared on real 640x480 MSRS pairs
(synthetic 640x480 images if ../shared is absent), with a non-trivial test fusion F:

1. **numpy reference (primary baseline)** -- what a researcher porting the MATLAB
   scripts to numpy would write: one function per metric, one image at a time, every
   metric on its own (nothing shared between metrics: SSIM filters F twice, Qabf and
   Nabf each compute their own Sobel responses, VIF(A, F) and VIF(B, F) are separate
   calls, MI recomputes the entropies).  2-D filtering is plain numpy written the way
   MATLAB defines ``filter2`` / ``conv2``: pad by the border rule (``np.pad``: 'edge'
   for ssim's replicate, zeros for conv2 'same', 'reflect' for per_extn_im_fn's mirror,
   none for 'valid'), then accumulate, for every kernel offset (u, v), the shifted slice
   times the weight h(u, v) -- the full 2-D kernel (11x11 for SSIM; 17, 9, 5, 3 square
   for VIF), no separability, no FFT.  conv2 is filter2 with the kernel rotated by 180
   degrees.  Histograms use ``np.histogram`` (256 bins) and ``np.histogram2d``
   (256x256; Hab.m's saturating uint8 ``x + 1`` is emulated by ``min(x + 1, 255)``).
   No cv2, no scipy.
2. **optimised per-image reference (cv2 filters)** -- the same per-image, per-metric
   code, but every 2-D filter is OpenCV's optimised C ``cv2.filter2D`` (float64, with the
   matching border type) and histograms use ``np.bincount``.  This is a *fast* per-image
   baseline, shown for context; it is not the "straightforward numpy" one.
3. **library** -- ``magicfuse.evaluation.metrics.compute_metrics_batch`` (torch float64,
   batched over images, intermediates shared between metrics, separable filters).

Before any timing the script checks that all three agree on every image and all 13
metrics (relative difference < 1e-9; NaN only where all are NaN), and stops otherwise.
It then prints seconds per image (wall clock and process CPU time) for each, and the
library's speed-up over both references.  The library raises glibc's heap trim threshold
(process-wide, see ``metrics._keep_heap``); the agreement check runs it first, so the
references are timed with the same allocator setting (it spares them page faults too).  On a shared machine quote the CPU-time
figures: they do not count time spent waiting for a core.  ``--threads 1`` (default)
pins torch and OpenCV to one thread, so every figure is per core.

    .venv/bin/python benchmarks/bench_metrics.py [--threads 1] [--batches 1,6,12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = (REPO / ".." / "shared").resolve()
PAIRS = ("00012N", "00032N", "00040N", "00051N", "00055D", "00103D")
AGREE_RTOL = 1e-9


# --------------------------------------------------------------------------- filtering back ends
# Both back ends give MATLAB filter2(h, x, shape) semantics (correlation); the border
# names are those of the MATLAB code: "replicate" (imgaussfilt 'replicate' in ssim),
# "zero" (conv2/filter2 'same'), "mirror" (per_extn_im_fn: reflection without repeating
# the edge pixel).


def np_filter2_valid(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """MATLAB filter2(h, x, 'valid'): out(i, j) = sum_{u,v} h(u, v) x(i+u, j+v), plain numpy."""
    kh, kw = h.shape
    rows, cols = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = np.zeros((rows, cols), dtype=np.float64)
    for u in range(kh):
        for v in range(kw):
            out += h[u, v] * x[u : u + rows, v : v + cols]
    return out


_NP_PAD = {"replicate": "edge", "zero": "constant", "mirror": "reflect"}


def np_filter2_same(x: np.ndarray, h: np.ndarray, border: str) -> np.ndarray:
    """MATLAB filter2(h, x, 'same') after padding x by the border rule (odd kernels)."""
    ph, pw = h.shape[0] // 2, h.shape[1] // 2
    return np_filter2_valid(np.pad(x, ((ph, ph), (pw, pw)), mode=_NP_PAD[border]), h)


def np_hist(x: np.ndarray) -> np.ndarray:
    return np.histogram(x, bins=256, range=(0, 256))[0]


def np_hist2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hab.m: h(x+1, y+1) += 1 with uint8 arithmetic (x + 1 saturates at 255)."""
    xi = np.minimum(x.astype(np.int64) + 1, 255).ravel()
    yi = np.minimum(y.astype(np.int64) + 1, 255).ravel()
    return np.histogram2d(xi, yi, bins=256, range=[[1, 257], [1, 257]])[0]


_CV_BORDER = {"replicate": cv2.BORDER_REPLICATE, "zero": cv2.BORDER_CONSTANT, "mirror": cv2.BORDER_REFLECT_101}


def cv_filter2_same(x: np.ndarray, h: np.ndarray, border: str) -> np.ndarray:
    return cv2.filter2D(x, cv2.CV_64F, h, borderType=_CV_BORDER[border])


def cv_filter2_valid(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    r, c = h.shape[0] // 2, h.shape[1] // 2
    return cv2.filter2D(x, cv2.CV_64F, h, borderType=cv2.BORDER_CONSTANT)[r : x.shape[0] - r, c : x.shape[1] - c]


def cv_hist(x: np.ndarray) -> np.ndarray:
    return np.bincount(x.ravel(), minlength=256)


def cv_hist2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xi = np.minimum(x.astype(np.int64), 254)  # Hab.m: uint8 x+1 saturates
    yi = np.minimum(y.astype(np.int64), 254)
    return np.bincount((xi * 256 + yi).ravel(), minlength=65536)


@dataclass(frozen=True)
class Ops:
    name: str
    filter2_same: Callable[[np.ndarray, np.ndarray, str], np.ndarray]
    filter2_valid: Callable[[np.ndarray, np.ndarray], np.ndarray]
    hist: Callable[[np.ndarray], np.ndarray]
    hist2: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def conv2_same(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """MATLAB conv2(x, h, 'same'): filter2 with the kernel rotated by 180 degrees, zero border."""
        return self.filter2_same(x, np.ascontiguousarray(h[::-1, ::-1]), "zero")


NUMPY = Ops("numpy reference, per image", np_filter2_same, np_filter2_valid, np_hist, np_hist2)
CV2 = Ops("optimised per-image ref. (cv2 filters)", cv_filter2_same, cv_filter2_valid, cv_hist, cv_hist2)


# --------------------------------------------------------------------------- reference formulas


def ref_gray(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64)
    g = 0.298936021293775 * x[..., 0] + 0.587043074451121 * x[..., 1] + 0.114020904255103 * x[..., 2]
    return np.floor(g + 0.5).astype(np.uint8)


def ref_entropy_counts(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ref_en(f: np.ndarray, ops: Ops) -> float:
    return ref_entropy_counts(ops.hist(f))


def ref_mi(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    """MI_evaluation.m: MI(A,F) + MI(B,F) in bits, joint histogram per Hab.m."""
    def mi(x: np.ndarray, y: np.ndarray) -> float:
        return ref_en(x, ops) + ref_en(y, ops) - ref_entropy_counts(ops.hist2(x, y))

    return mi(f, a) + mi(f, b)


def ref_sd(f: np.ndarray, ops: Ops) -> float:
    x = f.astype(np.float64)
    return float(np.sqrt(((x - x.mean()) ** 2).sum() / x.size))


def ref_sf(f: np.ndarray, ops: Ops) -> float:
    x = f.astype(np.float64)
    rf = np.diff(x, axis=0)
    cf = np.diff(x, axis=1)
    return float(np.sqrt(np.mean(rf**2) + np.mean(cf**2)))


def ref_ag(f: np.ndarray, ops: Ops) -> float:
    x = f.astype(np.float64)
    gy, gx = np.gradient(x)
    r, c = x.shape
    return float(np.sqrt((gx**2 + gy**2) / 2).sum() / ((r - 1) * (c - 1)))


def gauss2d(n: int, sigma: float) -> np.ndarray:
    """MATLAB fspecial('gaussian', n, sigma)."""
    ax = np.arange(n) - (n - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    h = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return h / h.sum()


def ref_ssim_one(x: np.ndarray, y: np.ndarray, ops: Ops) -> float:
    """MATLAB ssim(x, y) on double 0-255 data (DynamicRange 1), mean of the full map."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    w = gauss2d(11, 1.5)

    def filt(z: np.ndarray) -> np.ndarray:
        return ops.filter2_same(z, w, "replicate")

    c1, c2 = 0.01**2, 0.03**2
    mux, muy = filt(x), filt(y)
    sx2 = filt(x * x) - mux**2
    sy2 = filt(y * y) - muy**2
    sxy = filt(x * y) - mux * muy
    m = ((2 * mux * muy + c1) * (2 * sxy + c2)) / ((mux**2 + muy**2 + c1) * (sx2 + sy2 + c2))
    return float(m.mean())


def ref_ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    return 0.5 * ref_ssim_one(f, a, ops) + 0.5 * ref_ssim_one(f, b, ops)


def ref_mse(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    a, b, f = (z.astype(np.float64) / 255.0 for z in (a, b, f))
    return float(0.5 * np.mean((f - a) ** 2) + 0.5 * np.mean((f - b) ** 2))


def ref_psnr(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    return float(20 * np.log10(255 / np.sqrt(ref_mse(a, b, f, ops))))


def corr2(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def ref_cc(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    a, b, f = (z.astype(np.float64) for z in (a, b, f))
    return 0.5 * (corr2(a, f) + corr2(b, f))


def ref_scd(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    a, b, f = (z.astype(np.float64) for z in (a, b, f))
    with np.errstate(invalid="ignore", divide="ignore"):
        return corr2(f - b, a) + corr2(f - a, b)


def ref_qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray, ops: Ops) -> float:
    """analysis_Qabf.m."""
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)

    def grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.float64)
        sx, sy = ops.conv2_same(x, h3), ops.conv2_same(x, h1)
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


def ref_nabf(f: np.ndarray, s1: np.ndarray, s2: np.ndarray, ops: Ops) -> float:
    """analysis_nabf(f, I1, I2) on double 0-255 images."""
    vt = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 8
    ht = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=np.float64) / 8

    def sob(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.float64)
        gv = ops.filter2_same(x, vt, "mirror")
        gh = ops.filter2_same(x, ht, "mirror")
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


def ref_vifp(ref: np.ndarray, dist: np.ndarray, ops: Ops) -> float:
    """vifp_mscale.m (pixel-domain multiscale VIF, 'valid' filtering)."""
    ref = ref.astype(np.float64)
    dist = dist.astype(np.float64)
    num = den = 0.0
    eps = 1e-10
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        w = gauss2d(n, n / 5)
        if scale > 1:
            ref = ops.filter2_valid(ref, w)[::2, ::2]
            dist = ops.filter2_valid(dist, w)[::2, ::2]
        mu1, mu2 = ops.filter2_valid(ref, w), ops.filter2_valid(dist, w)
        s1 = ops.filter2_valid(ref * ref, w) - mu1 * mu1
        s2 = ops.filter2_valid(dist * dist, w) - mu2 * mu2
        s12 = ops.filter2_valid(ref * dist, w) - mu1 * mu2
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


def reference_metrics(f: np.ndarray, a: np.ndarray, b: np.ndarray, ops: Ops) -> dict[str, float]:
    """All 13 metrics of one image, each computed on its own (nothing shared)."""
    return {
        "EN": ref_en(f, ops), "SD": ref_sd(f, ops), "SF": ref_sf(f, ops), "AG": ref_ag(f, ops),
        "MI": ref_mi(a, b, f, ops), "SSIM": ref_ssim(a, b, f, ops), "Qabf": ref_qabf(a, b, f, ops),
        "PSNR": ref_psnr(a, b, f, ops), "MSE": ref_mse(a, b, f, ops),
        "VIF": ref_vifp(a, f, ops) + ref_vifp(b, f, ops), "SCD": ref_scd(a, b, f, ops),
        "CC": ref_cc(a, b, f, ops), "Nabf": ref_nabf(f, a, b, ops),
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


def _rel(x: float, y: float) -> float:
    if math.isnan(x) or math.isnan(y):
        return 0.0 if (math.isnan(x) and math.isnan(y)) else math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-12)


def check_agreement(results: dict[str, list[dict[str, float]]]) -> tuple[bool, dict[str, float]]:
    """Pairwise worst relative difference per metric; prints every disagreement."""
    names = list(results)
    ok = True
    worst: dict[str, float] = {}
    for i, p in enumerate(names):
        for q in names[i + 1 :]:
            w = 0.0
            for k, (rp, rq) in enumerate(zip(results[p], results[q])):
                for m in rp:
                    r = _rel(rp[m], rq[m])
                    w = max(w, r)
                    if not r < AGREE_RTOL:
                        ok = False
                        print(f"  MISMATCH image {k} {m}: {p} {rp[m]!r} vs {q} {rq[m]!r} (rel {r:.2e})")
            worst[f"{p} vs {q}"] = w
    return ok, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1: per core)")
    ap.add_argument("--batches", default="1,6,12", help="library batch sizes to time (comma list)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is kept")
    ap.add_argument("--ref-images", type=int, default=0,
                    help="images timed with the two references (default 0 = all pairs)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from magicfuse.evaluation.metrics import METRIC_NAMES, compute_metrics_batch

    A, B, what = load_pairs()
    F = np.stack([fuse_test(a, b) for a, b in zip(A, B)])
    n = A.shape[0]
    batches = [int(x) for x in args.batches.split(",")]
    print(f"data: {what}; {n} pairs of {A.shape[2]}x{A.shape[1]}; threads={args.threads}")

    # ---- agreement (before any timing): all images, all metrics, all three implementations
    lib = compute_metrics_batch(F, A, B)
    results = {
        "numpy": [reference_metrics(F[i], A[i], B[i], NUMPY) for i in range(n)],
        "cv2": [reference_metrics(F[i], A[i], B[i], CV2) for i in range(n)],
        "library": [{m: float(lib[m][i]) for m in METRIC_NAMES} for i in range(n)],
    }
    ok, worst = check_agreement(results)
    if not ok:
        print(f"agreement FAILED (tolerance: relative {AGREE_RTOL:g})")
        return 1
    print(f"agreement: numpy reference == cv2 reference == library on {n} images x "
          f"{len(METRIC_NAMES)} metrics (relative tolerance {AGREE_RTOL:g}); worst relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))

    # ---- timing
    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        best_w = best_c = float("inf")
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            best_w = min(best_w, time.perf_counter() - w0)
            best_c = min(best_c, time.process_time() - c0)
        return best_w, best_c

    nref = n if args.ref_images <= 0 else min(args.ref_images, n)
    ref_times = {}
    for ops in (NUMPY, CV2):
        w, c = timed(lambda: [reference_metrics(F[i], A[i], B[i], ops) for i in range(nref)])
        ref_times[ops.name] = (w / nref, c / nref)
    np_c = ref_times[NUMPY.name][1]
    cv_c = ref_times[CV2.name][1]

    print(f"\nseconds per 640x480 image (best of {args.repeats}); references timed on {nref} images; "
          f"speed-up = reference CPU s/img / row CPU s/img")
    head = f"{'implementation':<42}{'wall s/img':>11}{'CPU s/img':>11}{'vs numpy (CPU)':>16}{'vs cv2 (CPU)':>14}"
    print(head)
    print("-" * len(head))

    def row(label: str, w: float, c: float) -> None:
        print(f"{label:<42}{w:>11.4f}{c:>11.4f}{np_c / c:>15.1f}x{cv_c / c:>13.1f}x")

    for name, (w, c) in ref_times.items():
        row(name, w, c)
    for bs in batches:
        total = -(-max(n, bs) // bs) * bs  # all pairs, in calls of `bs` images (tiled if bs > n)
        reps = -(-total // n)
        Fb, Ab, Bb = (np.concatenate([x] * reps)[:total] for x in (F, A, B))
        calls = [(s, s + bs) for s in range(0, total, bs)]
        chunks = [("one chunk", bs)] if bs == 1 else [("one chunk", bs), ("default chunk", None)]
        for label, ch in chunks:
            kw = {} if ch is None else {"chunk": ch}
            w, c = timed(lambda: [compute_metrics_batch(Fb[s:e], Ab[s:e], Bb[s:e], **kw) for s, e in calls])
            lab = f"library, batch {bs}" + ("" if bs == 1 else f" ({label})")
            row(lab, w / total, c / total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
