"""The evaluation suite end to end on a tiny random-weight pipeline and tiny synthetic shards."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from magicfuse.checkpoint import save_pipeline
from magicfuse.errors import ConfigError, DataError
from magicfuse.evaluation.ablation import (
    OURS_S_MIOU,
    VARIANT_LABELS,
    run_ablations,
    sample_set,
    visual_means,
    write_ablation_report,
)
from magicfuse.evaluation.scores import ssim_to
from magicfuse.inference import MagicFuse
from magicfuse.evaluation.pipeline import (
    BASELINE_ROWS,
    ROW_CKG,
    ROW_DEGRADED,
    ROW_IKR,
    ROW_MAGIMG,
    ROW_OURS_S,
    EvaluateConfig,
    load_eval_set,
    resolve_metric_path,
    run_evaluation,
)

H, W = 32, 48
TAUS = (0.0, 0.2, 0.4, 0.6, 0.8)


def _nets():
    from magicfuse.diffusion.sampler import MagicFuseNets
    from magicfuse.models.presets import build_model

    torch.manual_seed(0)
    nets = MagicFuseNets(build_model("ae", "ae").eval(), build_model("unet", "ikr-tiny").eval(),
                         build_model("unet", "ckg-tiny").eval(), build_model("fusion", "fusion-tiny").eval())
    # The UNets' output convs start at zero (eps = 0: every stream would equal z_T); perturb all
    # weights so that IKR, CKG and MagImg differ and the tests can tell them apart.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (nets.ikr, nets.ckg):
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return nets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from magicfuse.data.readers import open_reader
    from magicfuse.data.shards import ShardConfig, write_shards
    from magicfuse.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("evalsuite")
    scenes = root / "scenes"
    write_synthetic_dataset(scenes, seed=0, splits={"train": 2, "test": 2}, height=H, width=W, progress=False)
    shards = root / "shards"
    for split in ("train", "test"):
        write_shards(open_reader("msrs", scenes, split), shards, split=split,
                     cfg=ShardConfig(samples_per_shard=8, seed=0), progress=False)
    nets = _nets()
    ckpt = save_pipeline(root / "pipeline.pt", nets.ae, nets.ikr, nets.ckg, nets.fusion,
                         sampler={"steps": 2, "tau": 0.4, "thermal_classes": [1, 2], "variant": "full"})
    cfg = EvaluateConfig.from_mapping({
        "max_images": 2, "batch_size": 2, "ablation_images": 1, "segformer_train_images": 2, "grid_images": 2,
        "segformer": {"epochs": 2, "max_steps": 2, "batch_size": 2, "eval_batch_size": 4},
        "progress": False, "device": "cpu",
    })
    first = run_evaluation(cfg, pipeline_checkpoint=ckpt, shards_dir=shards, out_dir=root / "report")
    return {"root": root, "shards": shards, "ckpt": ckpt, "cfg": cfg, "nets": nets, "result": first}


def _runner(setup, **settings):
    n = setup["nets"]
    sampler = {"steps": 2, "tau": 0.4, "thermal_classes": [1, 2], **settings}
    return MagicFuse({"ae": n.ae, "ikr": n.ikr, "ckg": n.ckg, "fusion": n.fusion}, sampler, device="cpu")


def test_report_files_and_metrics_json(setup):
    res = setup["result"]
    out = setup["root"] / "report"
    for name in ("report.md", "report.html", "metrics.json", "tau_curve.csv"):
        assert (out / name).is_file(), name
    figs = sorted((out / "figures").glob("*.png"))
    assert any(p.name == "tau_curve.png" for p in figs) and len(figs) >= 2
    assert not (out / "grids").exists()
    md = (out / "report.md").read_text()
    assert "](figures/" in md and "](grids/" not in md
    for p in figs:  # every figure the markdown links to exists
        assert f"figures/{p.name}" in md
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(res["metrics"]))
    assert set(res["paths"]) >= {"markdown", "html", "metrics", "tau_csv", "figures"}


def test_visual_rows(setup):
    m = setup["result"]["metrics"]
    vis = m["visual"]
    assert set(vis) == {ROW_DEGRADED, ROW_IKR, ROW_CKG, ROW_MAGIMG, *BASELINE_ROWS.values()}
    for name, row in vis.items():
        assert row["uses_infrared"] is (name in BASELINE_ROWS.values())
        for k in ("EN", "SSIM", "MI", "Qabf", "PSNR"):
            assert isinstance(row[k], float) and math.isfinite(row[k]), (name, k)
    # classical fusions of clean VIS + real IR score a PSNR (reference convention) around 60 dB
    assert 50 < vis[BASELINE_ROWS["mean"]]["PSNR"] < 80
    # the mean fusion is the best F for PSNR of all (METRICS.md): it must beat max fusion
    assert vis[BASELINE_ROWS["mean"]]["PSNR"] > vis[BASELINE_ROWS["max"]]["PSNR"]
    # the three sampler outputs are different images (not one stream reported three times)
    assert len({vis[r]["PSNR"] for r in (ROW_IKR, ROW_CKG, ROW_MAGIMG)}) == 3
    md = (setup["root"] / "report" / "report.md").read_text()
    assert "IR-VIS mean †" in md


def test_semantic_rows(setup):
    sem = setup["result"]["metrics"]["semantic"]
    assert list(sem) == [ROW_DEGRADED, ROW_IKR, ROW_MAGIMG, ROW_OURS_S]
    for row in sem.values():
        assert 0.0 <= row["mIoU"] <= 100.0
        assert {"unlabelled", "car", "person"} <= set(row)
    runs = setup["result"]["metrics"]["semantic_protocol"]["runs"]
    assert all(r["train_steps"] == 2 for r in runs.values())


def test_tau_curve_and_ablations(setup):
    m = setup["result"]["metrics"]
    assert sorted(float(t) for t in m["tau_curve"]) == list(TAUS)
    for vals in m["tau_curve"].values():
        assert {"EN", "SSIM", "MI", "Qabf", "PSNR", OURS_S_MIOU} <= set(vals)
    # tau reaches the sampler: the MagImgs (hence PSNR) change between tau = 0 and 0.8
    assert m["tau_curve"]["0"]["PSNR"] != m["tau_curve"]["0.8"]["PSNR"]
    with open(setup["root"] / "report" / "tau_curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["tau"]) for r in rows] == list(TAUS)
    models = m["ablation"]["models"]
    for v in ("model1", "model2", "model3", "model4"):
        assert VARIANT_LABELS[v] in models
    assert VARIANT_LABELS["full"] in models
    # no segmentation output without the head (Model II) or without F (Model IV)
    assert models[VARIANT_LABELS["model2"]][OURS_S_MIOU] is None
    assert models[VARIANT_LABELS["model4"]][OURS_S_MIOU] is None
    assert models[VARIANT_LABELS["model1"]][OURS_S_MIOU] is not None
    # the full row at the default tau is the tau-curve point (same run)
    assert models[VARIANT_LABELS["full"]] == m["tau_curve"]["0.4"]
    assert "INFERENCE-TIME" in (setup["root"] / "report" / "report.md").read_text()


def test_promotion_and_ckg_psnr(setup):
    m = setup["result"]["metrics"]
    score = m["promotion_score"]
    assert isinstance(score, float) and math.isfinite(score)
    expect = m["semantic"][ROW_MAGIMG]["mIoU"] + 0.01 * m["semantic"][ROW_OURS_S]["mIoU"]
    assert score == pytest.approx(expect)
    ck = m["ckg_infrared"]
    assert math.isfinite(ck["psnr_ckg_db"]) and math.isfinite(ck["psnr_grey_input_db"])
    assert ck["gain_db"] == pytest.approx(ck["psnr_ckg_db"] - ck["psnr_grey_input_db"])


def test_deterministic(setup, tmp_path):
    again = run_evaluation(setup["cfg"], pipeline_checkpoint=setup["ckpt"], shards_dir=setup["shards"],
                           out_dir=tmp_path / "again")
    a = dict(setup["result"]["metrics"])
    b = dict(again["metrics"])
    for d in (a, b):
        d.pop("seconds")
        d["settings"] = {k: v for k, v in d["settings"].items() if k != "checkpoint"}
        d["semantic_protocol"] = {k: v for k, v in d["semantic_protocol"].items() if k != "runs"}
    assert a == b


def test_metric_names_are_mlflow_safe(setup):
    import re

    def walk(d, p=""):
        for k, v in d.items():
            key = f"{p}{k}"
            if isinstance(v, dict):
                yield from walk(v, key + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield "eval." + key.replace(" ", "_")

    keys = list(walk(setup["result"]["metrics"]))
    assert "eval.promotion_score" in keys
    bad = [k for k in keys if not re.match(r"^[/\w.\- :]*$", k)]
    assert not bad


# --------------------------------------------------------------------------- library pieces


def test_sampling_independent_of_batching_and_order(setup):
    runner = _runner(setup)
    ev = load_eval_set(setup["shards"], "test", 2)
    kw = dict(tau=0.4, seed=5, progress=False)
    a = sample_set(runner, ev.degraded, ev.keys, batch_size=2, **kw)
    b = sample_set(runner, ev.degraded[::-1], ev.keys[::-1], batch_size=1, **kw)
    for x, y in zip(a.magimg, b.magimg[::-1]):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    c = sample_set(runner, ev.degraded[:1], ev.keys[:1], batch_size=1, **{**kw, "seed": 6})
    assert (a.magimg[0] != c.magimg[0]).any()


def test_model1_uses_same_weights_with_zero_zhat(setup):
    runner = _runner(setup)
    v1 = runner.nets_for_variant("model1")
    f = runner.base_nets.fusion
    assert v1.fusion is not f and v1.fusion.config.use_zhat is False
    for (k, p), (k2, q) in zip(f.state_dict().items(), v1.fusion.state_dict().items()):
        assert k == k2 and torch.equal(p, q)
    assert runner.nets_for_variant("model3") is runner.nets
    with pytest.raises(ConfigError, match="variant"):
        runner.nets_for_variant("model9")


def test_report_magimg_is_what_magicfuse_fuse_writes(setup, tmp_path):
    """The report's MagImg of an image equals, byte for byte, what `magicfuse fuse --seed`
    writes for the input file the report saved (same batch size: 1 on both sides)."""
    from magicfuse.cli import main as cli_main
    from magicfuse.imageio import read_image

    cfg = EvaluateConfig.from_mapping({"max_images": 2, "batch_size": 1, "ablation_images": 1, "grid_images": 2,
                                       "semantic": False, "taus": [0.4], "ablations": [], "seed": 11,
                                       "promotion": {"semantic.Ours-S.mIoU": 1.0},
                                       "progress": False, "device": "cpu"})
    out = tmp_path / "report"
    run_evaluation(cfg, pipeline_checkpoint=setup["ckpt"], shards_dir=setup["shards"], out_dir=out)
    images = out / "figures" / "images"
    saved = sorted(images.glob("*_magimg.png"))
    assert len(saved) == 2
    rc = cli_main(["fuse", str(images / "input"), "--recursive", "-o", str(tmp_path / "cli"), "--model",
                   str(setup["ckpt"]), "--seed", "11", "--batch-size", "1", "--device", "cpu", "-q"])
    assert rc == 0
    for p in saved:
        mine = read_image(tmp_path / "cli" / p.name, "rgb")
        report = read_image(p, "rgb")
        assert mine.shape == report.shape == (H, W, 3)
        assert np.array_equal(mine, report), p.name
    # premise: the two images differ from each other and from their inputs (a real sampler output)
    a, b = (read_image(p, "rgb") for p in saved)
    assert not np.array_equal(a, b)
    # another seed gives other bytes (the seed reaches both sides)
    rc = cli_main(["fuse", str(images / "input"), "--recursive", "-o", str(tmp_path / "cli2"), "--model",
                   str(setup["ckpt"]), "--seed", "12", "--batch-size", "1", "--device", "cpu", "-q"])
    assert rc == 0 and not np.array_equal(read_image(tmp_path / "cli2" / saved[0].name, "rgb"),
                                          read_image(saved[0], "rgb"))


def test_run_ablations_standalone_reuse_and_report(setup, tmp_path):
    runner = _runner(setup)
    ev = load_eval_set(setup["shards"], "test", 2)
    kw = dict(seed=0, batch_size=2, progress=False)
    main = sample_set(runner, ev.degraded, ev.keys, tau=0.4, **kw)
    res = run_ablations(runner, ev.degraded, ev.keys, infrared=ev.infrared, visible=ev.clean, labels=ev.label,
                        taus=(0.0, 0.4), variants=("model4",), tau=0.4, metrics=("EN", "PSNR"),
                        reuse={("full", 0.4): main}, **kw)
    assert res.runs[("full", 0.4)].magimg[0] is main.magimg[0]  # reused, not rerun
    assert [r["name"] for r in res.variant_rows] == [VARIANT_LABELS["full"], VARIANT_LABELS["model4"]]
    # Model IV's MagImg is the IKR image of the same noise: equal to the full run's IKR output
    for x, y in zip(res.runs[("model4", 0.4)].magimg, main.ikr):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    paths = write_ablation_report(res, tmp_path / "abl")
    assert paths["tau_csv"].is_file() and paths["markdown"].is_file()
    with pytest.raises(ConfigError, match="variant"):
        run_ablations(runner, ev.degraded, ev.keys, infrared=ev.infrared, visible=ev.clean, variants=("model9",),
                      **kw)


def test_config_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        EvaluateConfig.from_mapping({"bogus": 1})
    with pytest.raises(ConfigError, match="ablations"):
        EvaluateConfig(ablations=("model5",))
    with pytest.raises(ConfigError, match="tau"):
        EvaluateConfig(taus=(0.2, 1.5))
    with pytest.raises(ConfigError, match="EvaluateConfig.init_noise_scale"):
        EvaluateConfig(init_noise_scale=1.2)
    with pytest.raises(ConfigError, match="metric"):
        EvaluateConfig(metrics=("EN", "FOO"))
    with pytest.raises(ConfigError):
        EvaluateConfig(segformer={"variant": "b9"})
    with pytest.raises(ConfigError, match="dotted"):
        EvaluateConfig(promotion={"score": 1.0})
    with pytest.raises(DataError, match="not found"):
        run_evaluation(EvaluateConfig(split="nosuch", progress=False), pipeline_checkpoint=setup["ckpt"],
                       shards_dir=setup["shards"], out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="semantic"):
        run_evaluation(EvaluateConfig(semantic=False, progress=False), pipeline_checkpoint=setup["ckpt"],
                       shards_dir=setup["shards"], out_dir=tmp_path / "x")
    from magicfuse.errors import CheckpointError

    with pytest.raises(CheckpointError):
        run_evaluation(EvaluateConfig(progress=False), pipeline_checkpoint=tmp_path / "none.pt",
                       shards_dir=setup["shards"], out_dir=tmp_path / "x")


def test_resolve_metric_path():
    m = {"semantic": {"Ours-S": {"mIoU": 12.5}}, "tau_curve": {"0.4": {"EN": 3.0}}}
    assert resolve_metric_path(m, "semantic.Ours-S.mIoU") == 12.5
    assert resolve_metric_path(m, "tau_curve.0.4.EN") == 3.0  # keys containing dots
    with pytest.raises(ConfigError, match="available"):
        resolve_metric_path(m, "semantic.MagImg.mIoU")


def test_ckg_ssim_is_wangs_8bit_ssim():
    """The CKG-vs-infrared SSIM is Wang et al.'s SSIM with 8-bit constants (a grey visible frame
    scores about 0.4 against its infrared), checked against an independent computation."""
    import cv2

    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.uniform(0, 255, (96, 128)), (0, 0), 3).astype(np.uint8)
    b = np.clip(0.6 * a + 0.4 * cv2.GaussianBlur(rng.uniform(0, 255, (96, 128)), (0, 0), 2), 0, 255).astype(np.uint8)

    def wang(x, y):  # 11x11 Gaussian window, sigma 1.5, interior of the map only
        x, y = x.astype(np.float64), y.astype(np.float64)
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        g = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
        mx, my = g(x), g(y)
        sxx, syy, sxy = g(x * x) - mx * mx, g(y * y) - my * my, g(x * y) - mx * my
        m = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        return float(m[5:-5, 5:-5].mean())

    assert ssim_to([a], [a]) == pytest.approx(1.0)
    ours, ref = ssim_to([b], [a]), wang(b, a)
    assert 0.2 < ref < 0.95  # premise: a partly similar pair
    assert ours == pytest.approx(ref, abs=0.02)
    # the fusion table's MATLAB convention (near-zero constants) gives another number
    assert abs(visual_means([b], [a], [a], ("SSIM",))["SSIM"] - ours) > 0.01
