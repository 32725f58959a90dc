from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from magicfuse.errors import DataError
from magicfuse.evaluation.baselines import (
    BASELINES,
    USES_INFRARED,
    fuse_laplacian_pyramid,
    fuse_max,
    fuse_mean,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)
from magicfuse.evaluation.report import format_value, make_grid, markdown_table, write_report

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def pair(seed=0, h=60, w=80, rgb=False):
    g = np.random.default_rng(seed)
    vis = g.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    ir = g.integers(0, 256, (h, w), dtype=np.uint8)
    return vis, ir


# ---------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------
def test_mean_rounds_half_up_and_max_is_elementwise():
    vis, ir = pair()
    expected = np.floor((vis.astype(np.float64) + ir) / 2 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(fuse_mean(vis, ir), expected)
    np.testing.assert_array_equal(fuse_mean(vis, ir), ((vis.astype(int) + ir + 1) // 2).astype(np.uint8))
    assert fuse_mean(np.array([[1]], np.uint8), np.array([[2]], np.uint8))[0, 0] == 2  # 1.5 -> 2
    np.testing.assert_array_equal(fuse_max(vis, ir), np.maximum(vis, ir))
    # (H,W,1) inputs behave as (H,W)
    np.testing.assert_array_equal(fuse_max(vis[..., None], ir[..., None]), np.maximum(vis, ir))


def test_rgb_fusion_works_on_luminance_and_keeps_chroma():
    vis, ir = pair(1, rgb=True)
    ycc = rgb_to_ycbcr(vis)
    np.testing.assert_allclose(ycbcr_to_rgb(ycc), vis, atol=1e-9)
    # Y matches OpenCV's full-range conversion to within its fixed-point rounding
    y_cv = cv2.cvtColor(vis, cv2.COLOR_RGB2YCrCb)[..., 0]
    assert np.abs(ycc[..., 0] - y_cv).max() <= 0.51
    for fn in (fuse_mean, fuse_max):
        out = fn(vis, ir)
        assert out.shape == vis.shape and out.dtype == np.uint8
    # a grey visible image given as RGB gives the grey result (chroma 0 -> exact)
    grey, ir = pair(2)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for fn in (fuse_mean, fuse_max, fuse_laplacian_pyramid):
        out = fn(rgb, ir)
        ref = fn(grey, ir)
        assert np.abs(out.astype(int) - ref[..., None]).max() <= 1
    # where no clipping happens, the fused Y is the mean of visible Y and IR (±1 for rounding)
    vis = np.full((8, 8, 3), (120, 100, 90), np.uint8)
    ir = np.full((8, 8), 200, np.uint8)
    fy = rgb_to_ycbcr(fuse_mean(vis, ir))
    assert abs(fy[0, 0, 0] - (rgb_to_ycbcr(vis)[0, 0, 0] + 200) / 2) <= 1.0
    np.testing.assert_allclose(fy[0, 0, 1:], rgb_to_ycbcr(vis)[0, 0, 1:], atol=1.0)


def test_laplacian_pyramid_properties():
    vis, ir = pair(3, 96, 128)
    # identical inputs give the input back
    for img in (vis, ir):
        out = fuse_laplacian_pyramid(img, img, levels=4)
        assert np.abs(out.astype(int) - img).max() <= 1
    # levels=1 is the mean fusion
    np.testing.assert_array_equal(fuse_laplacian_pyramid(vis, ir, levels=1), fuse_mean(vis, ir))
    out = fuse_laplacian_pyramid(vis, ir, levels=5)
    assert out.dtype == np.uint8 and out.shape == vis.shape
    # a flat image plus a sharp detail: the detail survives in the fusion (max-abs)
    a = np.full((64, 64), 100, np.uint8)
    b = a.copy()
    b[30:34, 30:34] = 250
    f = fuse_laplacian_pyramid(a, b, levels=4).astype(int)
    assert f[31, 31] - f[5, 5] > 80  # a mean fusion would keep only 75
    assert abs(f[5, 5] - 100) <= 1
    with pytest.raises(DataError, match="at most"):
        fuse_laplacian_pyramid(vis[:8, :8], ir[:8, :8], levels=4)


def test_baselines_reject_bad_input():
    vis, ir = pair()
    with pytest.raises(DataError, match="sizes differ"):
        fuse_mean(vis, ir[:-1])
    with pytest.raises(DataError, match="uint8"):
        fuse_max(vis.astype(np.float32), ir)
    with pytest.raises(DataError, match="infrared must be"):
        fuse_mean(vis, np.stack([ir] * 3, -1))
    assert set(BASELINES) == set(USES_INFRARED) and all(USES_INFRARED.values())


def test_laplacian_pyramid_on_real_msrs_pair_scores_between_sources():
    root = SHARED / "data" / "msrs" / "test"
    if not (root / "vi").is_dir():
        pytest.skip(f"needs {root} (the shared developer data folder is absent)")
    name = sorted(p.name for p in (root / "vi").iterdir())[0]
    vis = cv2.cvtColor(cv2.imread(str(root / "vi" / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ir = cv2.imread(str(root / "ir" / name), cv2.IMREAD_GRAYSCALE)
    out = fuse_laplacian_pyramid(vis, ir, levels=4)
    assert out.shape == vis.shape and out.dtype == np.uint8
    y = rgb_to_ycbcr(out)[..., 0]
    yv = rgb_to_ycbcr(vis)[..., 0]
    # the fusion correlates with both sources (it keeps both)
    assert np.corrcoef(y.ravel(), ir.ravel())[0, 1] > 0.3
    assert np.corrcoef(y.ravel(), yv.ravel())[0, 1] > 0.3


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
VISUAL = [
    {"name": "MagImg", "EN": 6.8312, "SSIM": 0.4861, "MI": 2.4123, "Qabf": 0.6431, "PSNR": 65.987},
    {"name": "LP fusion", "uses_infrared": True, "EN": 6.83, "SSIM": 0.486, "MI": float("nan"),
     "Qabf": 0.643, "PSNR": 65.99},
]
SEMANTIC = [
    {"name": "degraded VIS", "unlabelled": 97.1234, "car": 80.5, "person": float("nan"), "mIoU": 54.09},
    {"name": "MagImg", "unlabelled": 97.5, "car": 85.25, "person": 60.0, "mIoU": 62.19},
]


def test_write_report_writes_everything(tmp_path):
    grid = make_grid([[np.zeros((30, 40, 3), np.uint8), np.full((30, 40), 200, np.uint8)]],
                     ["input", "MagImg"], (32, 48))
    tau = {0.4: {"mIoU": 62.0, "EN": 6.8}, 0.0: {"mIoU": 55.0, "EN": 6.5}, 0.8: {"mIoU": 60.0, "EN": 7.0}}
    paths = write_report(
        tmp_path / "rep",
        visual_table=VISUAL,
        semantic_table=SEMANTIC,
        ablation_tables={"Table 6": [{"name": "Model I", "mIoU": 58.0}, {"name": "full", "mIoU": 62.19}]},
        tau_curve=tau,
        grids=[("MFNet 00001D", grid)],
        extra={"seed": 0, "profile": "tiny"},
    )
    for key in ("markdown", "html", "metrics", "visual_csv", "semantic_csv", "tau_csv", "tau_json",
                "tau_plot", "grid:00", "ablation_csv:Table 6"):
        assert paths[key].is_file(), key
    md = paths["markdown"].read_text()
    assert "| MagImg | 6.831 | 0.486 | 2.412 | 0.643 | 65.987 |" in md
    assert "| LP fusion † | 6.830 | 0.486 | n/a | 0.643 | 65.990 |" in md
    assert "| degraded VIS | 97.12 | 80.50 | n/a | 54.09 |" in md
    assert "LP fusion" in md.split("use the real infrared")[0]
    assert "| Model I | 58.000 |" in md
    assert "grids/00_MFNet_00001D.png" in md
    htm = paths["html"].read_text()
    assert htm.count("data:image/png;base64,") == 2 and "<td>LP fusion †</td>" in htm
    # metrics.json round-trips, NaN -> null, flags left out
    m = json.loads(paths["metrics"].read_text())
    assert m["visual"]["MagImg"]["PSNR"] == 65.987
    assert m["visual"]["LP fusion"]["MI"] is None and "uses_infrared" not in m["visual"]["LP fusion"]
    assert m["semantic"]["MagImg"]["mIoU"] == 62.19
    assert m["ablation"]["Table 6"]["Model I"]["mIoU"] == 58.0
    assert m["extra"] == {"seed": 0, "profile": "tiny"}
    # tau curve sorted by tau
    rows = list(csv.DictReader(paths["tau_csv"].open()))
    assert [float(r["tau"]) for r in rows] == [0.0, 0.4, 0.8]
    assert float(rows[1]["mIoU"]) == 62.0
    assert json.loads(paths["tau_json"].read_text())[0] == {"tau": 0.0, "mIoU": 55.0, "EN": 6.5}
    png = cv2.imread(str(paths["tau_plot"]))
    assert png is not None and png.shape[0] > 100
    saved = cv2.imread(str(paths["grid:00"]))[..., ::-1]
    np.testing.assert_array_equal(saved, grid)
    # no temporary files left behind
    assert not [p for p in (tmp_path / "rep").rglob(".*.tmp")]


def test_report_rejects_bad_rows(tmp_path):
    with pytest.raises(DataError, match="no 'name'"):
        write_report(tmp_path, visual_table=[{"EN": 1.0}])
    with pytest.raises(DataError, match="duplicate"):
        write_report(tmp_path, semantic_table=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(DataError, match="not a number"):
        write_report(tmp_path, tau_curve={"x": {"EN": 1}})


def test_markdown_table_and_format():
    assert format_value(float("nan")) == "n/a" and format_value(None) == "n/a"
    assert format_value(1.23456, "{:.2f}") == "1.23" and format_value(np.float32(2)) == "2.000"
    t = markdown_table([{"name": "a|b", "x": 1}], "{:.1f}")
    assert t.splitlines()[2] == "| a\\|b | 1.0 |"


def test_make_grid_shape_and_content():
    red = np.zeros((60, 80, 3), np.uint8)
    red[..., 0] = 255
    grey = np.full((30, 40), 7, np.uint8)
    seg = np.zeros((12, 16, 3), np.uint8)
    seg[:, :8] = (64, 0, 128)
    g = make_grid([[red, grey, seg], [grey, red, seg]], ["input", "IKR", "seg"], (48, 64),
                  pad=4, caption_height=20)
    assert g.dtype == np.uint8
    assert g.shape == (20 + 2 * 48 + 3 * 4, 3 * 64 + 4 * 4, 3)
    # cell (0,0) is red, cell (0,1) grey, seg colours kept exactly (nearest upscaling)
    y0 = 20 + 4
    assert tuple(g[y0 + 24, 4 + 32]) == (255, 0, 0)
    assert tuple(g[y0 + 24, 4 + 64 + 4 + 32]) == (7, 7, 7)
    seg_cell = g[y0:y0 + 48, 4 + 2 * 68:4 + 2 * 68 + 64].reshape(-1, 3)
    assert {tuple(c) for c in seg_cell} <= {(64, 0, 128), (0, 0, 0), (255, 255, 255)}
    # captions are drawn
    assert (g[:20] < 128).any()
    with_labels = make_grid([[red], [grey]], ["x"], 32, row_labels=["a", "b"])
    assert with_labels.shape[1] > 32 + 8
    with pytest.raises(DataError, match="row 0 has 2 images"):
        make_grid([[red, red]], ["one"], 32)
    with pytest.raises(DataError, match="uint8"):
        make_grid([[red.astype(np.float32)]], ["one"], 32)
