"""Fusion metrics (METRICS.md): golden values, known values, conventions, folder evaluation, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation import fusion_eval
from magicfuse.evaluation.metrics import (
    ALL,
    MetricConventions,
    compute_metrics,
    compute_metrics_batch,
    resolve_conventions,
    rgb2gray,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
GOLDEN = SHARED / "docs" / "metrics_golden.json"
MSRS_TEST = SHARED / "data" / "msrs" / "test"

# Golden tolerance: relative 1e-7 (absolute 1e-12 for values that are 0, e.g. Nabf of a
# copied source). Measured agreement is ~1e-10 or better (SSIM worst, ~1e-10).
GOLD_RTOL = 1e-7
GOLD_ATOL = 1e-12


@pytest.fixture(autouse=True)
def _one_thread():
    """The metrics are many small ops: on a busy 2-core box extra threads only contend."""
    t, c = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(t)
    cv2.setNumThreads(c)


def _golden() -> tuple[dict, np.ndarray, np.ndarray]:
    if not GOLDEN.is_file():
        pytest.skip(f"needs {GOLDEN} (the shared docs folder is absent)")
    gold = json.loads(GOLDEN.read_text())
    ir, vi = [], []
    for k in gold["pairs"]:
        pi, pv = MSRS_TEST / "ir" / f"{k}.png", MSRS_TEST / "vi" / f"{k}.png"
        if not (pi.is_file() and pv.is_file()):
            pytest.skip(f"needs the MSRS test pair {k} in {MSRS_TEST} (shared data absent)")
        a = cv2.imread(str(pi), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(pv), cv2.IMREAD_UNCHANGED)
        ir.append(a if a.ndim == 2 else rgb2gray(a[..., ::-1].copy()))
        vi.append(b if b.ndim == 2 else rgb2gray(b[..., ::-1].copy()))
    return gold, np.stack(ir), np.stack(vi)


def _trivial(A: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "F=VIS": B,
        "F=IR": A,
        "F=mean": np.floor((A.astype(np.float64) + B) / 2 + 0.5).astype(np.uint8),
        "F=max": np.maximum(A, B),
    }


def _assert_golden(name: str, got: dict[str, float], want: dict[str, float | None]) -> None:
    for m, v in want.items():
        if v is None:
            assert math.isnan(got[m]), f"{name} {m}: expected NaN (undefined), got {got[m]}"
        else:
            assert got[m] == pytest.approx(v, rel=GOLD_RTOL, abs=GOLD_ATOL), f"{name} {m}"


# --------------------------------------------------------------------------- golden


def test_golden_trivial_fusions_msrs():
    gold, A, B = _golden()
    for name, F in _trivial(A, B).items():
        res = compute_metrics_batch(F, A, B)
        means = {m: float(np.mean(v)) for m, v in res.items()}
        assert set(means) == set(gold["values"][name])
        _assert_golden(name, means, gold["values"][name])


def test_golden_mi_quirk_matters_and_other_conventions():
    gold, A, B = _golden()
    F = np.maximum(A, B)
    ref = compute_metrics_batch(F, A, B, metrics=["MI", "SSIM", "PSNR"])
    nq = compute_metrics_batch(F, A, B, metrics=["MI"], mi="bits-no-quirk")
    nats = compute_metrics_batch(F, A, B, metrics=["MI"], mi="nats")
    # METRICS.md: without the quirk MI is lower by up to 0.06 on these sets (6.85 -> 6.79 on its set)
    diff = float(np.mean(ref["MI"]) - np.mean(nq["MI"]))
    assert 0 < diff < 0.06
    np.testing.assert_allclose(nats["MI"], nq["MI"] * math.log(2), rtol=1e-12)
    summed = compute_metrics_batch(F, A, B, metrics=["SSIM"], ssim="sum")
    np.testing.assert_allclose(summed["SSIM"], 2 * ref["SSIM"], rtol=1e-12)
    plain = compute_metrics_batch(F, A, B, metrics=["PSNR"], psnr="plain")
    np.testing.assert_allclose(plain["PSNR"], ref["PSNR"] - 20 * math.log10(255), rtol=1e-12)


# --------------------------------------------------------------------------- known values


def _rand(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_entropy_known_values():
    two = np.zeros((8, 8), np.uint8)
    two[:, 4:] = 200
    src = _rand((8, 8), 0)
    assert compute_metrics(two, src, src, metrics=["EN"])["EN"] == pytest.approx(1.0, abs=1e-15)
    four = np.tile(np.array([0, 1, 2, 3], np.uint8), (8, 2))
    assert compute_metrics(four, src, src, metrics=["EN"])["EN"] == pytest.approx(2.0, abs=1e-15)
    flat = np.full((8, 8), 7, np.uint8)
    assert compute_metrics(flat, src, src, metrics=["EN"])["EN"] == 0.0


def test_identical_images():
    x = _rand((40, 50), 1)
    r = compute_metrics(x, x, x)
    assert r["SSIM"] == pytest.approx(1.0, abs=1e-12)
    assert r["MSE"] == 0.0 and math.isinf(r["PSNR"])
    assert r["CC"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(r["SCD"])  # F equals a source
    assert r["Nabf"] == 0.0  # no pixel where F's edge is stronger than both sources'
    # MI(X,X) = 2 H(X) (bits) when no level 255/254 merge is involved
    y = (x // 2).astype(np.uint8)
    r2 = compute_metrics(y, y, y, metrics=["EN", "MI"])
    assert r2["MI"] == pytest.approx(2 * r2["EN"], rel=1e-12)


def test_psnr_known_value_and_scales():
    a = np.full((16, 16), 100, np.uint8)
    f = np.full((16, 16), 101, np.uint8)
    r = compute_metrics(f, a, a, metrics=["PSNR", "MSE"])
    assert r["MSE"] == pytest.approx((1 / 255) ** 2, rel=1e-12)
    assert r["PSNR"] == pytest.approx(20 * math.log10(255 * 255), rel=1e-12)
    p = compute_metrics(f, a, a, metrics=["PSNR", "MSE"], psnr="plain")
    assert p["MSE"] == pytest.approx(1.0) and p["PSNR"] == pytest.approx(20 * math.log10(255))
    mx = compute_metrics(f, a, a, metrics=["PSNR"], psnr="maxF")
    assert mx["PSNR"] == pytest.approx(20 * math.log10(101))


def test_simple_statistics_known_values():
    f = np.array([[0, 2], [4, 6]], np.uint8)
    src = np.array([[1, 3], [5, 9]], np.uint8)
    r = compute_metrics(f, src, src, metrics=["SD", "SF", "AG"])
    assert r["SD"] == pytest.approx(math.sqrt(5.0))  # population SD of 0,2,4,6
    assert r["SF"] == pytest.approx(math.sqrt(16 + 4))  # row diffs 4, col diffs 2
    # MATLAB gradient of a 2x2 ramp: gx = 2, gy = 4 everywhere; sum sqrt(10) * 4 / (1*1)
    assert r["AG"] == pytest.approx(4 * math.sqrt(10.0))
    c = compute_metrics(f, src, src, metrics=["AG"], ag="cddfuse")
    assert c["AG"] == pytest.approx(math.sqrt(10.0))


def test_mi_quirk_only_touches_levels_254_255():
    a, b = _rand((30, 30), 2), _rand((30, 30), 3)
    f = np.maximum(a, b)
    low = [x // 2 for x in (f, a, b)]  # no 254/255 anywhere: quirk has no effect
    q = compute_metrics(*low, metrics=["MI"])["MI"]
    nq = compute_metrics(*low, metrics=["MI"], mi="bits-no-quirk")["MI"]
    assert q == pytest.approx(nq, rel=1e-14)
    q = compute_metrics(f, a, b, metrics=["MI"])["MI"]
    nq = compute_metrics(f, a, b, metrics=["MI"], mi="bits-no-quirk")["MI"]
    assert q != pytest.approx(nq, rel=1e-9)


def test_conventions_are_named_and_distinct():
    a, b = _rand((48, 64), 4), _rand((48, 64), 5)
    f = np.maximum(a, b)
    ref = compute_metrics(f, a, b)
    assert compute_metrics(f, a, b, conventions="reference") == ref
    l255 = compute_metrics(f, a, b, metrics=["SSIM"], ssim="l255")["SSIM"]
    assert l255 > ref["SSIM"]  # larger constants stabilise: higher scores
    drv = compute_metrics(f, a, b, metrics=["Nabf"], nabf_order="driver")["Nabf"]
    assert drv != pytest.approx(ref["Nabf"], rel=1e-6)
    assert compute_metrics(f, a, b, metrics=["Nabf"], conventions={"nabf_order": "driver"})["Nabf"] == drv
    assert resolve_conventions("reference", ssim=None) == MetricConventions()
    with pytest.raises(ConfigError, match="ssim"):
        compute_metrics(f, a, b, ssim="summed")
    with pytest.raises(ConfigError, match="unknown metric convention option"):
        compute_metrics(f, a, b, ssim_window=7)
    with pytest.raises(ConfigError, match="preset"):
        compute_metrics(f, a, b, conventions="cddfuse")
    with pytest.raises(ConfigError, match="unknown fusion metric"):
        compute_metrics(f, a, b, metrics=["EN", "QABF2"])
    assert list(compute_metrics(f, a, b, metrics="en,qabf")) == ["EN", "Qabf"]


def test_batch_equals_single_and_chunking_is_invisible():
    F = _rand((5, 33, 47), 6)
    A = _rand((5, 33, 47), 7)
    B = _rand((5, 33, 47), 8)
    full = compute_metrics_batch(F, A, B, chunk=5)
    one = compute_metrics_batch(F, A, B, chunk=1)
    for m in ALL:
        assert full[m].shape == (5,)
        np.testing.assert_allclose(full[m], one[m], rtol=1e-13, atol=1e-15)
    s = compute_metrics(F[3], A[3], B[3])
    for m in ALL:
        assert s[m] == pytest.approx(float(full[m][3]), rel=1e-13, abs=1e-15)


def test_rgb_input_is_scored_on_matlab_luminance():
    rgb = _rand((20, 24, 3), 9)
    a, b = _rand((20, 24), 10), _rand((20, 24), 11)
    assert compute_metrics(rgb, a, b) == compute_metrics(rgb2gray(rgb), a, b)
    px = np.array([[[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]], np.uint8)
    assert rgb2gray(px).tolist() == [[255, 76, 150, 29, 0]]


def test_bad_inputs_are_clear_errors():
    a = _rand((20, 24), 12)
    with pytest.raises(DataError, match="sizes differ"):
        compute_metrics(a, a, _rand((20, 25), 13))
    with pytest.raises(DataError, match="uint8"):
        compute_metrics(a.astype(np.float32), a, a)
    with pytest.raises(DataError, match="shape"):
        compute_metrics(a[None, None], a, a)
    with pytest.raises(DataError, match="sizes differ"):
        compute_metrics_batch(np.stack([a, a]), np.stack([a, a]), a[None])


# --------------------------------------------------------------------------- folders + CLI


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = arr if arr.ndim == 2 else arr[..., ::-1]
    assert cv2.imwrite(str(path), bgr)


def test_evaluate_folders_golden_max(tmp_path):
    gold, A, B = _golden()
    F = np.maximum(A, B)
    for k, f, a, b in zip(gold["pairs"], F, A, B):
        _write(tmp_path / "fused" / f"{k}.png", f)
        _write(tmp_path / "ir" / f"{k}.png", a)
        _write(tmp_path / "vi" / f"{k}.bmp", b)  # any image extension pairs by stem
    res = fusion_eval.evaluate_folders(
        tmp_path / "fused", tmp_path / "ir", tmp_path / "vi",
        out_json=tmp_path / "out" / "m.json", out_csv=tmp_path / "out" / "m.csv",
    )
    rows, means = res
    assert [r["name"] for r in rows] == sorted(gold["pairs"])
    _assert_golden("folders F=max", means, gold["values"]["F=max"])
    data = json.loads((tmp_path / "out" / "m.json").read_text())
    assert data["count"] == 6 and data["skipped"] == []
    assert data["mean"]["Qabf"] == pytest.approx(gold["values"]["F=max"]["Qabf"], rel=GOLD_RTOL)
    assert data["conventions"]["ssim"] == "mean"
    table = list(csv.reader((tmp_path / "out" / "m.csv").open()))
    assert table[0][0] == "name" and table[-1][0] == "mean" and len(table) == 8
    assert float(table[-1][table[0].index("MI")]) == pytest.approx(gold["values"]["F=max"]["MI"], rel=GOLD_RTOL)


def _small_folders(tmp_path: Path) -> None:
    for i, stem in enumerate(["a", "b", "c"]):
        a, b = _rand((24, 32), 20 + i), _rand((24, 32), 30 + i)
        _write(tmp_path / "ir" / f"{stem}.png", a)
        _write(tmp_path / "vis" / f"{stem}.png", np.stack([b, b, b], -1))
        _write(tmp_path / "fused" / f"{stem}.png", np.maximum(a, b))


def test_evaluate_folders_colour_missing_and_size_errors(tmp_path):
    _small_folders(tmp_path)
    rgb = _rand((24, 32, 3), 40)
    _write(tmp_path / "fused" / "c.png", rgb)  # colour fused image: scored on rgb2gray
    rows, means = fusion_eval.evaluate_folders(tmp_path / "fused", tmp_path / "ir", tmp_path / "vis",
                                               metrics=["EN", "SSIM"])
    want = compute_metrics(rgb2gray(rgb), cv2.imread(str(tmp_path / "ir" / "c.png"), 0),
                           cv2.imread(str(tmp_path / "vis" / "c.png"), 0), metrics=["EN", "SSIM"])
    assert rows[2]["EN"] == want["EN"] and rows[2]["SSIM"] == want["SSIM"]
    assert means["EN"] == pytest.approx(np.mean([r["EN"] for r in rows]))

    _write(tmp_path / "fused" / "d.png", _rand((24, 32), 41))  # no sources
    _write(tmp_path / "fused" / "b.png", _rand((24, 30), 42))  # wrong size
    with pytest.raises(DataError, match=r"size mismatch for 'b'.*fused.*b\.png"):
        fusion_eval.evaluate_folders(tmp_path / "fused", tmp_path / "ir", tmp_path / "vis")
    res = fusion_eval.evaluate_folders(tmp_path / "fused", tmp_path / "ir", tmp_path / "vis",
                                       metrics="EN", skip_bad=True)
    assert [r["name"] for r in res.rows] == ["a", "c"]
    assert {s["name"] for s in res.skipped} == {"b", "d"}
    assert "no infrared and no visible" in next(s["reason"] for s in res.skipped if s["name"] == "d")
    with pytest.raises(DataError, match="does not exist"):
        fusion_eval.evaluate_folders(tmp_path / "nope", tmp_path / "ir", tmp_path / "vis")
    _write(tmp_path / "ir" / "a.bmp", _rand((24, 32), 43))
    with pytest.raises(DataError, match="share the stem 'a'"):
        fusion_eval.evaluate_folders(tmp_path / "fused", tmp_path / "ir", tmp_path / "vis")


def test_cli_evaluate(tmp_path, monkeypatch, capsys):
    from magicfuse import cli

    if "magicfuse.evaluation.fusion_eval" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "magicfuse.evaluation.fusion_eval"))
    _small_folders(tmp_path)
    out = tmp_path / "r.json"
    rc = cli.main(["evaluate", "--fused", str(tmp_path / "fused"), "--ir", str(tmp_path / "ir"),
                   "--vis", str(tmp_path / "vis"), "--metrics", "EN,SSIM,MI", "--ssim", "sum",
                   "--mi", "nats", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 image(s) scored" in text and "ssim=sum" in text and "MI" in text
    data = json.loads(out.read_text())
    assert data["metrics"] == ["EN", "SSIM", "MI"] and data["conventions"]["mi"] == "nats"
    direct = fusion_eval.evaluate_folders(tmp_path / "fused", tmp_path / "ir", tmp_path / "vis",
                                          metrics=["SSIM"], ssim="sum")
    assert data["mean"]["SSIM"] == pytest.approx(direct.means["SSIM"], rel=1e-15)
    rc = cli.main(["evaluate", "--fused", str(tmp_path / "missing"), "--ir", str(tmp_path / "ir"),
                   "--vis", str(tmp_path / "vis")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
