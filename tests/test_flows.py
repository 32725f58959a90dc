"""Prefect flows (flows/pipeline.py) and their deployments (prefect.yaml).

The end-to-end test runs the whole tiny pipeline flow offline under
`prefect_test_harness` (a temporary local Prefect server), in a temporary project
folder with its own sqlite MLflow store.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

prefect = pytest.importorskip("prefect")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also set by pytest (pythonpath = ["."]); kept for direct runs
    sys.path.insert(0, str(REPO))

from flows import pipeline as fp  # noqa: E402
from magicfuse import pipeline  # noqa: E402
from magicfuse.errors import ConfigError, MagicFuseError  # noqa: E402

# Small enough for ~a minute on 2 CPU cores; every stage still really runs.
TINY = {
    "synthesize": {"height": 32, "width": 48, "splits": {"train": 6, "val": 2, "test": 2}},
    "shards": {"samples_per_shard": 4},
    "train_ae": {"steps": 2, "batch_size": 2, "crop": 32, "log_every": 1, "ckpt_every": 2},
    "train_ikr": {"steps": 2, "batch_size": 2, "crop": 32, "log_every": 1, "ckpt_every": 2,
                  "eval_samples": 1, "eval_steps": 1},
    "train_ckg": {"steps": 2, "batch_size": 2, "crop": 32, "log_every": 1, "ckpt_every": 2,
                  "eval_samples": 1, "eval_steps": 1},
    "train_mkf": {"steps": 2, "batch_size": 1, "crop": 32, "log_every": 1, "ckpt_every": 2, "sampler_steps": 2},
    "evaluate": {"max_images": 2, "batch_size": 2, "taus": [0.4], "ablations": ["model4"], "ablation_images": 1,
                 "segformer": {"max_steps": 2, "epochs": 1, "batch_size": 2, "eval_batch_size": 2},
                 "segformer_train_images": 4, "grid_images": 1, "progress": False},
}


# ----------------------------------------------------------------------------- parameters


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_resolve_params_profile_and_overrides(tmp_path):
    params = _write(tmp_path / "params.yaml", {"profile": "tiny", "train_ae": {"steps": 300, "lr": 0.001},
                                               "tracking": {"model_name": "magicfuse"}})
    _write(tmp_path / "profiles" / "paper.yaml", {"train_ae": {"steps": 100000}})

    assert fp.resolve_params(str(params))["train_ae"] == {"steps": 300, "lr": 0.001}
    paper = fp.resolve_params(str(params), profile="paper")
    assert paper["profile"] == "paper" and paper["train_ae"] == {"steps": 100000, "lr": 0.001}
    over = fp.resolve_params(str(params), profile="paper", overrides={"train_ae": {"lr": 0.5}})
    assert over["train_ae"] == {"steps": 100000, "lr": 0.5}
    assert over["tracking"] == {"model_name": "magicfuse"}

    # a file that selects paper, asked for tiny: the file as written, no profile merge
    _write(tmp_path / "p2.yaml", {"profile": "paper", "train_ae": {"steps": 3}})
    assert fp.resolve_params(str(tmp_path / "p2.yaml"), profile="tiny")["train_ae"] == {"steps": 3}
    assert fp.resolve_params(str(tmp_path / "p2.yaml"))["train_ae"] == {"steps": 100000}

    with pytest.raises(ConfigError, match=r"profile 'huge' selected but .*profiles/huge.yaml does not exist"):
        fp.resolve_params(str(params), profile="huge")
    with pytest.raises(ConfigError, match="parameters file not found"):
        fp.resolve_params(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="overrides must be a mapping"):
        fp.resolve_params(str(params), overrides=["train_ae.steps=1"])


def test_parse_set():
    assert fp.parse_set(["train_ae.steps=5", "train_mkf.thermal_classes=[2]", "profile=paper", "a.b.c=x"]) == {
        "train_ae": {"steps": 5}, "train_mkf": {"thermal_classes": [2]}, "profile": "paper", "a": {"b": {"c": "x"}}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        fp.parse_set(["train_ae.steps"])
    with pytest.raises(ConfigError, match="already given a value"):
        fp.parse_set(["a=1", "a.b=2"])


def test_command_line_reports_bad_parameters(tmp_path, capsys):
    assert fp.main(["--params", str(tmp_path / "missing.yaml")]) == 1
    assert "parameters file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- deployments


def test_prefect_yaml_deployments_match_the_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    cfg = PrefectYamlModel.model_validate(raw)
    names, pools, stages = set(), {}, {}
    for dep in cfg.deployments:
        assert dep.work_pool is not None
        file, func = dep.entrypoint.split(":")
        assert (REPO / file).is_file()
        flow_obj = load_flow_from_entrypoint(str(REPO / file) + ":" + func)
        name = f"{flow_obj.name}/{dep.name}"
        names.add(name)
        pools[name] = dep.work_pool.name
        flow_obj.validate_parameters(dict(dep.parameters))  # raises on unknown or mistyped parameters
        if flow_obj.name == "magicfuse-step":
            stages[dep.name] = dep.parameters["stage"]
    assert {"magicfuse-pipeline/gpu", "train/gpu", "evaluate/gpu", "data/gpu", "magicfuse-cluster/cluster"} <= names
    # the cluster: one step deployment per stage, named as flows/cluster.py starts them, on the GPU pool;
    # the pipeline flow (it only waits) on the CPU pool
    from magicfuse.pipeline import STAGES

    assert {s: s for s in STAGES} == {k: v for k, v in stages.items() if k == v}
    assert pools["magicfuse-cluster/cluster"] == "magicfuse-cpu"
    assert {p for n, p in pools.items() if n != "magicfuse-cluster/cluster"} == {"magicfuse-gpu"}
    ddp = next(d for d in cfg.deployments if d.name == "train_ikr-ddp4")
    assert ddp.work_pool.job_variables["env"]["MAGICFUSE_NPROC_PER_NODE"] == "4"
    step = raw["pull"][0]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $MAGICFUSE_HOME }}"


def test_flow_parameters_reject_unknown_keys():
    with pytest.raises(Exception, match="params"):
        fp.magicfuse_pipeline.validate_parameters({"param_path": "params.yaml"})


# ----------------------------------------------------------------------------- end to end

from conftest import sqlite_store  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    # The harness's own default startup timeout (30 s) is not enough on a loaded 2-core
    # machine: the server's first start (migrations) has taken 20 s with one other job running.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow  # ~2 min on 2 busy CPU cores (every stage really trains, evaluates and registers)
def test_pipeline_flow_end_to_end(prefect_harness, tmp_path, monkeypatch, pytestconfig):
    import mlflow

    from magicfuse.checkpoint import load_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path, pytestconfig))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)

    state = fp.magicfuse_pipeline(params_path=str(REPO / "params.yaml"), overrides=TINY, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run_id = result["pipeline_run_id"]
    assert os.environ.get("MAGICFUSE_PIPELINE_RUN_ID") is None  # restored after the flow

    ckpt = tmp_path / "artifacts" / "mkf" / "pipeline.pt"
    modules, payload = load_pipeline(ckpt)
    assert set(modules) == {"ae", "ikr", "ckg", "fusion"} and payload["sampler"]["steps"] == 2
    assert set(result["train"]) == {"train_ae", "train_ikr", "train_ckg", "train_mkf"}

    client = mlflow.MlflowClient()
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["magicfuse.orchestrator"] == "prefect"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert {"synthesize", "shards@synthetic", "train_ae", "train_ikr", "train_ckg", "train_mkf",
            "evaluate"} <= set(by_name)
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_name["train_ae"].data.params["train_ae.steps"] == "2"

    # train_ikr and train_ckg ran concurrently: their stage runs overlap in time
    ikr, ckg = by_name["train_ikr"].info, by_name["train_ckg"].info
    assert ikr.start_time < ckg.end_time and ckg.start_time < ikr.end_time

    versions = client.search_model_versions("name = 'magicfuse'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("magicfuse", "champion").version) == "1"
    assert versions[0].run_id == by_name["evaluate"].info.run_id


def test_real_profile_merges_to_valid_configs_and_disables_the_synthetic_source():
    """profiles/real.yaml: the synthetic source is switched off, MSRS is read with the fixed split
    lists, train frames at half size, and every section builds its typed config."""
    from magicfuse import pipeline
    from magicfuse.config import from_mapping, section
    from magicfuse.evaluation.pipeline import EvaluateConfig
    from magicfuse.models.presets import PRESETS
    from magicfuse.training.ae import AETrainConfig
    from magicfuse.training.ldm import LDMTrainConfig
    from magicfuse.training.mkf import MKFTrainConfig

    params = fp.resolve_params(str(REPO / "params.yaml"), profile="real")
    assert params["shards"]["sources"]["synthetic"] is None
    assert pipeline.active_sources(params) == ["msrs"]
    assert pipeline.shard_dirs(params) == [Path(params["shards"]["out_dir"]) / "msrs"]
    src = from_mapping(pipeline.SourceConfig, params["shards"]["sources"]["msrs"])
    assert src.splits == ("train", "val")
    assert src.reader_options("train")["scale"] == 0.5 and "scale" not in src.reader_options("val")
    assert src.reader_options("val")["names_file"] == "splits/{split}.txt"
    assert src.reader_options("val")["unboxed"] == "background"
    for name, cls in (("train_ae", AETrainConfig), ("train_ikr", LDMTrainConfig), ("train_ckg", LDMTrainConfig),
                      ("train_mkf", MKFTrainConfig)):
        cfg = section(params, name, cls)
        assert cfg.model in PRESETS
    assert section(params, "train_ikr", LDMTrainConfig).eval_split == "val"
    assert EvaluateConfig.from_mapping(params["evaluate"]).split == "val"
    assert params["tracking"]["model_name"] != fp.resolve_params(str(REPO / "params.yaml"))["tracking"]["model_name"]
    # the tiny default keeps its one synthetic source
    assert pipeline.active_sources(fp.resolve_params(str(REPO / "params.yaml"))) == ["synthetic"]


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_every_shipped_profile_merges_to_valid_configs(profile):
    """A typo in a profile's keys or values fails here, not minutes into a run (validate_params
    builds every section's typed config)."""
    params = fp.resolve_params(str(REPO / "params.yaml"), profile=profile)
    assert params["profile"] == profile
    pipeline.validate_params(params, where=f"profiles/{profile}.yaml")


def test_synthetic_long_profile_keeps_the_default_test_scenes_and_scales_scenes_and_ckg_steps():
    tiny = fp.resolve_params(str(REPO / "params.yaml"))
    long = fp.resolve_params(str(REPO / "params.yaml"), profile="synthetic-long")
    # the same test and val scenes (a split's scenes depend on its name and size only), so the
    # two profiles' reports score the same images
    assert long["synthesize"]["splits"]["test"] == tiny["synthesize"]["splits"]["test"]
    assert long["synthesize"]["splits"]["val"] == tiny["synthesize"]["splits"]["val"]
    assert long["synthesize"]["splits"]["train"] > tiny["synthesize"]["splits"]["train"]
    assert long["train_ckg"]["steps"] > tiny["train_ckg"]["steps"]
    assert long["train_ckg"]["model"] == tiny["train_ckg"]["model"]
    # the settings its documented figures were measured with (docs/QUALITY.md)
    assert (long["synthesize"]["splits"]["train"], long["train_ckg"]["steps"]) == (1280, 6400)
    assert long["train_ckg"]["timesteps"] == "uniform"


def test_disabled_source_and_bad_split_options_are_clear_errors(tmp_path):
    from magicfuse import pipeline
    from magicfuse.config import from_mapping

    params = fp.resolve_params(str(REPO / "params.yaml"), profile="real")
    with pytest.raises(ConfigError, match=r"shards.sources.synthetic is disabled.*flows.pipeline --profile real"):
        pipeline.shards(params, "synthetic")
    off = {**params, "shards": {**params["shards"], "sources": {"synthetic": None}}}
    with pytest.raises(ConfigError, match="enable at least one data source"):
        pipeline.active_sources(off)
    src = from_mapping(pipeline.SourceConfig, {"kind": "msrs", "root": "x", "splits": ["train"],
                                               "split_options": {"val": {"scale": 0.5}}})
    with pytest.raises(ConfigError, match=r"split\(s\) \['val'\] that are not in splits"):
        src.reader_options("train")


@pytest.mark.slow  # ~3 min on 2 CPU cores: real 640x480 val frames, the authors' autoencoder
def test_real_profile_end_to_end_on_shared_msrs(prefect_harness, tmp_path, monkeypatch, pytestconfig):
    """The `real` profile, data to registered model, with a few steps on ../shared/data."""
    import mlflow

    from conftest import need_shared
    from magicfuse.checkpoint import load_pipeline
    from magicfuse.models.presets import PRESETS

    msrs = need_shared("data", "msrs")
    boxes = need_shared("data", "msrs_detection_labels", "fusion", "test")
    ae = need_shared("weights", "official_ae.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path, pytestconfig))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)
    few = {"steps": 2, "log_every": 1, "ckpt_every": 2}
    overrides = {
        "shards": {"max_samples": 4, "sources": {"msrs": {"root": str(msrs), "options": {"boxes_dir": str(boxes)}}}},
        "train_ae": {**few, "init_from": str(ae), "batch_size": 1, "latent_stats_images": 2},
        "train_ikr": {**few, "batch_size": 2, "eval_samples": 1, "eval_steps": 1},
        "train_ckg": {**few, "batch_size": 2, "eval_samples": 1, "eval_steps": 1},
        "train_mkf": {**few, "batch_size": 1, "sampler_steps": 2},
        "evaluate": {"max_images": 1, "steps": 2, "taus": [0.4], "ablation_images": 1, "progress": False},
    }
    state = fp.magicfuse_pipeline(params_path=str(REPO / "params.yaml"), profile="real", overrides=overrides,
                                  return_state=True)
    assert state.is_completed(), state.message
    modules, payload = load_pipeline(tmp_path / "artifacts" / "mkf" / "pipeline.pt")
    assert modules["ikr"].config == PRESETS["ikr-small"][1] and modules["fusion"].config == PRESETS["fusion-small"][1]
    assert not (tmp_path / "artifacts" / "shards" / "synthetic").exists()
    shard_root = tmp_path / "artifacts" / "shards" / "msrs"
    assert sorted(p.name for p in shard_root.iterdir() if p.is_dir()) == ["train", "val"]

    import json

    metrics = json.loads((tmp_path / "reports" / "evaluate" / "report" / "metrics.json").read_text())
    assert metrics["settings"]["images"] == 1 and metrics["settings"]["captured_inputs"] is True
    assert {"ssim_ckg", "ssim_grey_input", "captured"} <= set(metrics["ckg_infrared"])
    objects = metrics["objects"]
    assert objects["real infrared"]["person boxes"] + objects["real infrared"]["car boxes"] > 0
    assert set(objects) >= {"visible (clean)", "CKG", "MagImg", "CKG (captured input)", "MagImg (captured input)"}
    assert metrics["ikr_by_degradation"]["all"]["images"] == 1
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("magicfuse-real", "champion").version) == "1"


def test_misspelt_sections_are_errors_in_files_profiles_and_overrides(tmp_path):
    params = _write(tmp_path / "params.yaml", {"profile": "tiny", "train_ae": {"steps": 1}})
    assert fp.resolve_params(str(params))["train_ae"] == {"steps": 1}  # premise: a good file loads
    _write(tmp_path / "bad.yaml", {"train_ae": {"steps": 1}, "train_ikrr": {"steps": 5}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown section\(s\) 'train_ikrr' \(did you mean 'train_ikr'\?\)"):
        fp.resolve_params(str(tmp_path / "bad.yaml"))
    _write(tmp_path / "profiles" / "oops.yaml", {"evalute": {"max_images": 2}})
    with pytest.raises(ConfigError, match=r"oops\.yaml: unknown section\(s\) 'evalute' \(did you mean 'evaluate'\?\)"):
        fp.resolve_params(str(params), profile="oops")
    with pytest.raises(ConfigError, match=r"overrides: unknown section\(s\) 'trainae'"):
        fp.resolve_params(str(params), overrides=fp.parse_set(["trainae.steps=3"]))
    # every section of the real files is known
    for prof in (None, "paper", "real"):
        fp.resolve_params(str(REPO / "params.yaml"), profile=prof)


@pytest.mark.parametrize("where, override, message", [
    ("a key inside a training section", "train_ikr.stesp=3", r"train_ikr: unknown key\(s\) \['stesp'\]"),
    ("a reader option of a shard source", "shards.sources.synthetic.options.boxes_dri=x",
     r"shards\.sources\.synthetic \(split 'train'\): msrs reader: unknown option\(s\) \['boxes_dri'\]"),
    ("a degradation key", "shards.degradation.kindz=[haze]", r"shards\.degradation: unknown key\(s\) \['kindz'\]"),
    ("a promotion path", "evaluate.promotion={semantics.MagImg.mIoU: 1}",
     r"promotion: 'semantics\.MagImg\.mIoU' does not start with a section of metrics\.json"),
    ("the top-level device", "device=tpu", r"device must be auto, cpu or cuda\[:N\], got 'tpu'"),
    ("an evaluation dict value", "evaluate.segformer={epohcs: 2}", r"epohcs"),
])
def test_the_whole_parameters_file_is_validated_before_any_stage(where, override, message):
    """A typo anywhere in params.yaml, a profile or a --set override fails when the parameters
    are read (naming the key), not silently and not after earlier stages ran."""
    good = fp.resolve_params(str(REPO / "params.yaml"))
    assert good["train_ikr"]["steps"] > 0  # premise: the shipped file validates
    with pytest.raises(ConfigError, match=message):
        fp.resolve_params(str(REPO / "params.yaml"), overrides=fp.parse_set([override]))
    # stages (DVC) read through the same validation
    params = pipeline.read_params(REPO / "params.yaml")
    params = fp.deep_merge(params, fp.parse_set([override]))
    with pytest.raises(ConfigError, match=message):
        pipeline.validate_params(params)


# ----------------------------------------------------------------------------- torchrun launcher


def test_resolved_parameters_are_not_merged_with_their_profile_again(tmp_path):
    """What the torchrun launcher hands its ranks: a merged copy whose own values win."""
    merged = fp.resolve_params(str(REPO / "params.yaml"), "real", {"train_ikr": {"steps": 7}})
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "real.yaml").write_text((REPO / "profiles" / "real.yaml").read_text())
    path = _write(tmp_path / "merged.yaml", merged)
    assert pipeline.load_params(path, resolved=True)["train_ikr"]["steps"] == 7
    # premise: merging the profile again would bring back the profile's own value
    assert pipeline.load_params(path)["train_ikr"]["steps"] != 7


def test_a_stage_failing_under_torchrun_fails_with_its_own_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no artifacts/ae/ae.pt here
    params = fp.resolve_params(str(REPO / "params.yaml"), None, TINY)
    with pytest.raises(MagicFuseError, match=r"train_ckg failed under torchrun \(2 processes.*"
                                                       r"autoencoder checkpoint not found"):
        pipeline.run_stage_distributed("train_ckg", params, 2, timeout_s=300)
    with pytest.raises(ConfigError, match="not a training stage"):
        pipeline.run_stage_distributed("evaluate", params, 2)


@pytest.mark.slow  # ~1 min on 2 CPU cores: two torchrun ranks start torch and train 2 steps
def test_a_training_stage_under_torchrun_trains_once_and_registers_once(tmp_path, monkeypatch, pytestconfig):
    import mlflow

    from magicfuse.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path, pytestconfig))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)
    params = fp.resolve_params(str(REPO / "params.yaml"), None, {**TINY, "device": "cpu"})
    pipeline.synthesize(params)
    pipeline.shards(params)
    pipeline.train_ae(params)

    summary = pipeline.run_stage_distributed("train_ikr", params, 2, timeout_s=600)
    assert summary["checkpoint"].endswith("ikr.pt") and summary["metrics"]["steps"] == 2
    # both ranks' batches were counted: each rank holds 3 of the 6 training frames, so its two
    # steps take batches of 2 and 1 (one process alone would count 2 + 2 = 4)
    assert summary["metrics"]["images"] == 2 * (2 + 1)
    net, payload = load_model(tmp_path / "artifacts" / "ikr" / "ikr.pt", kind="unet")
    assert payload["train_config"]["steps"] == 2

    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'train_ikr'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 opened no run of its own
    assert [str(v.version) for v in client.search_model_versions("name = 'magicfuse-ikr'")] == ["1"]


def test_cluster_step_nproc_job_variable(monkeypatch):
    """The job variable env.MAGICFUSE_NPROC_PER_NODE selects torchrun for a cluster step."""
    from flows import cluster

    monkeypatch.delenv(cluster.NPROC_ENV, raising=False)
    assert cluster._nproc(None) == 1
    monkeypatch.setenv(cluster.NPROC_ENV, "4")
    assert cluster._nproc(None) == 4
    assert cluster._nproc(2) == 2  # an explicit parameter wins
    monkeypatch.setenv(cluster.NPROC_ENV, "four")
    with pytest.raises(ConfigError, match="MAGICFUSE_NPROC_PER_NODE='four'"):
        cluster._nproc(None)
    with pytest.raises(ConfigError, match=">= 1"):
        cluster._nproc(0)


def test_cluster_timeline_table():
    from flows.cluster import format_timeline

    rows = [{"stage": "train_ikr", "worker": "worker-a", "start": "2026-12-03T10:00:10+00:00",
             "end": "2026-12-03T10:00:40+00:00", "flow_run": "train_ikr on worker-a"},
            {"stage": "synthesize", "worker": "worker-b", "start": "2026-12-03T10:00:00+00:00",
             "end": "2026-12-03T10:00:02.500000+00:00", "flow_run": "synthesize on worker-b"}]
    lines = format_timeline(rows).splitlines()
    assert lines[1].split()[:4] == ["train_ikr", "worker-a", "10.0", "40.0"]
    assert lines[2].split()[:4] == ["synthesize", "worker-b", "0.0", "2.5"]
