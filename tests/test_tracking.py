"""MLflow model logging, registry and @champion promotion (magicfuse.tracking).

One sqlite tracking store per module (creating its tables costs ~10 s); every model
is a real tiny random-weight network saved with magicfuse.checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from magicfuse import tracking  # noqa: E402
from magicfuse.checkpoint import load_model as load_network, save_model, save_pipeline  # noqa: E402
from magicfuse.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from magicfuse.models import build_model  # noqa: E402
from magicfuse.training.ldm import sample_branch  # noqa: E402

from conftest import sqlite_store  # noqa: E402

CPU = {"device": "cpu"}  # outputs are compared with CPU references: pin the device (bf16 on CUDA)

SAMPLER = {"steps": 2, "tau": 0.4, "thermal_classes": [1, 2]}


@pytest.fixture(scope="module")
def store(tmp_path_factory, pytestconfig):
    """A fresh sqlite tracking store; the working directory is a temp folder too."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", sqlite_store(root, pytestconfig))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)
        tracking.configure()
        yield root


@pytest.fixture(scope="module")
def parts(store):
    """Checkpoints of a tiny random-weight AE, IKR and CKG, plus a pipeline bundle."""
    torch.manual_seed(0)
    nets = {"ae": build_model("ae", "ae"), "ikr": build_model("unet", "ikr-tiny"),
            "ckg": build_model("unet", "ckg-tiny"), "fusion": build_model("fusion", "fusion-tiny")}
    paths = {k: save_model(store / "ckpt" / f"{k}.pt", nets[k]) for k in ("ae", "ikr", "ckg")}
    paths["pipeline"] = save_pipeline(store / "ckpt" / "pipeline.pt", nets["ae"], nets["ikr"], nets["ckg"],
                                      nets["fusion"], sampler=SAMPLER)
    return paths


def _image(h: int, w: int, seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)


def _spec(schema) -> tuple[str, tuple[int, ...]]:
    (spec,) = schema.inputs
    return str(spec.type), tuple(spec.shape)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------- components


def test_ae_model_round_trip_matches_the_network(parts):
    mv = tracking.log_component_model("ae", parts["ae"], example_hw=(16, 24))
    assert mv.name == "magicfuse-ae" and mv.tags["magicfuse.kind"] == "ae"
    model = tracking.load_model(f"models:/magicfuse-ae/{mv.version}", model_config=CPU)
    sig = model.metadata.signature
    assert _spec(sig.inputs) == _spec(sig.outputs) == ("uint8", (-1, -1, -1, 3))
    assert model.metadata.get_input_schema() is not None
    assert model.metadata.saved_input_example_info is not None

    img = _image(38, 50, batch=2)  # not a multiple of 4: the wrapper pads and crops back
    out = model.predict(img, params={"seed": 7})
    assert out.shape == (2, 38, 50, 3) and out.dtype == np.uint8

    ae, _ = load_network(parts["ae"], kind="ae")
    x = torch.nn.functional.pad(_as_tensor(img), (0, 2, 0, 2), mode="reflect")
    with torch.no_grad():
        ref = ae(x, None, torch.Generator().manual_seed(7))[..., :38, :50]
    np.testing.assert_array_equal(out, _to_uint8(ref))


def test_branch_models_sample_deterministically(parts):
    ikr = tracking.log_component_model("ikr", parts["ikr"], ae_checkpoint=parts["ae"], steps=2, example_hw=(16, 24))
    ckg = tracking.log_component_model("ckg", parts["ckg"], ae_checkpoint=parts["ae"], steps=2, example_hw=(16, 24),
                                       registered_name="mf-ckg", tags={"origin": "test"})
    assert ckg.name == "mf-ckg" and ckg.tags["origin"] == "test"
    assert ckg.tags["magicfuse.checkpoint_sha256"] and len(ckg.tags["magicfuse.checkpoint_sha256"]) == 64

    m_ikr = tracking.load_model(f"models:/magicfuse-ikr/{ikr.version}", model_config=CPU)
    m_ckg = tracking.load_model(f"models:/mf-ckg/{ckg.version}", model_config=CPU)
    params = m_ikr.metadata.signature.params.to_dict()
    assert {p["name"]: p["default"] for p in params} == {"seed": 0, "steps": 2}

    assert m_ikr.unwrap_python_model().device == torch.device("cpu")  # model_config reached the wrapper
    img = _image(24, 32, seed=3)
    restored = m_ikr.predict(img)
    assert restored.shape == (1, 24, 32, 3) and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, m_ikr.predict(img, params={"seed": 0}))
    assert not np.array_equal(restored, m_ikr.predict(img, params={"seed": 1}))

    ae, _ = load_network(parts["ae"], kind="ae")
    unet, _ = load_network(parts["ikr"], kind="unet")
    ref = sample_branch(ae, unet, _as_tensor(img), steps=2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(restored, _to_uint8(ref))

    assert _spec(m_ckg.metadata.signature.outputs) == ("uint8", (-1, -1, -1))
    infrared = m_ckg.predict(img, params={"steps": 1})
    assert infrared.shape == (1, 24, 32) and infrared.dtype == np.uint8


def test_component_errors_are_clear(parts, tmp_path):
    with pytest.raises(ConfigError, match="kind must be one of"):
        tracking.log_component_model("fusion", parts["ae"])
    with pytest.raises(ConfigError, match="needs ae_checkpoint"):
        tracking.log_component_model("ikr", parts["ikr"])
    with pytest.raises(CheckpointError, match="missing.pt: ikr checkpoint not found"):
        tracking.log_component_model("ikr", tmp_path / "missing.pt", ae_checkpoint=parts["ae"])
    model = tracking.ComponentPyfunc("ae")
    with pytest.raises(DataError, match=r"shape \(B,H,W,3\)"):
        model.predict(None, np.zeros((1, 3, 16, 16), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        model.predict(None, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(tracking.TrackingError, match="cannot load MLflow model"):
        tracking.load_model("models:/no-such-model/1")


# ----------------------------------------------------------------------------- pipeline + registry


def _register(ckpt, name: str, score: float):
    with mlflow.start_run(run_name=f"eval-{score}"):
        mlflow.log_metric("eval.score", score)
        return tracking.log_pipeline_model(ckpt, registered_name=name, example_hw=(32, 48))


def test_pipeline_model_registry_and_promotion(parts):
    name = "magicfuse-test"
    v1 = _register(parts["pipeline"], name, 0.50)
    v2 = _register(parts["pipeline"], name, 0.70)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert v1.tags["magicfuse.kind"] == "pipeline" and '"steps": 2' in v1.tags["magicfuse.sampler"]

    d1 = tracking.promote_if_better(name, v1.version, metric="eval.score")
    assert d1.promoted and "no @champion yet" in d1.reason
    d2 = tracking.promote_if_better(name, v2.version, metric="eval.score")
    assert d2.promoted and d2.champion_version == "1" and d2.champion == pytest.approx(0.5)

    v3 = _register(parts["pipeline"], name, 0.60)
    d3 = tracking.promote_if_better(name, v3.version, metric="eval.score")
    assert not d3.promoted and d3.champion_version == "2"
    client = mlflow.MlflowClient()
    reason = client.get_model_version(name, "3").tags["magicfuse.promotion"]
    assert "does not beat @champion v2" in reason and "0.6" in reason and "0.7" in reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    # lower is better: v3's 0.6 beats v2's 0.7
    d3b = tracking.promote_if_better(name, v3.version, metric="eval.score", higher_is_better=False)
    assert d3b.promoted and str(client.get_model_version_by_alias(name, "champion").version) == "3"
    again = tracking.promote_if_better(name, v3.version, metric="eval.score")
    assert again.promoted and "already holds @champion" in again.reason

    with pytest.raises(tracking.TrackingError, match="metric 'eval.nope' not found"):
        tracking.promote_if_better(name, v1.version, metric="eval.nope")

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config=CPU)
    assert _spec(model.metadata.signature.inputs) == ("uint8", (-1, -1, -1, 3))
    img = _image(24, 36, seed=5)
    out = model.predict(img)
    assert out.shape == (1, 24, 36, 3) and out.dtype == np.uint8
    one = model.predict(img, params={"steps": 1})
    np.testing.assert_array_equal(one, model.predict(img, params={"steps": 1}))  # deterministic
    defaults = {p["name"]: p["default"] for p in model.metadata.signature.params.to_dict()}
    assert defaults == {"seed": 0, "steps": 2, "tau": 0.4, "batch_size": 4}
    assert not np.array_equal(one, model.predict(img, params={"steps": 1, "seed": 1}))
    two = model.predict(np.concatenate([img, _image(24, 36, seed=6)]), params={"steps": 1})
    assert two.shape == (2, 24, 36, 3)

    # the logged model_config's keys are overridable at load time (MLflow ignores every key of a
    # model logged without one): a lower pixel limit reaches the wrapper and refuses the same image
    small = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={**CPU, "max_pixels": 100})
    assert small.unwrap_python_model().max_pixels == 100 and model.unwrap_python_model().max_pixels > 24 * 36
    with pytest.raises(DataError, match="limit of 100 pixels"):
        small.predict(img, params={"steps": 1})


def test_pipeline_and_stage_runs_nest(store, tmp_path):
    record = tmp_path / "run.json"
    run_id = tracking.start_pipeline_run("pipeline-test", record=record)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAGICFUSE_PIPELINE_RUN_ID", run_id)
        with tracking.stage_run("train_ae", params={"train_ae": {"steps": 3, "lr": 1e-3}}) as run:
            tracking.MetricLogger("train/")({"loss": 0.25, "bad": float("nan")}, step=2)
            tracking.log_metrics({"final": {"psnr": 21.5, "label": "x"}})
            tracking.log_metrics({"visual": {"IKR (captured input)": {"EN": 7.5}}}, prefix="eval.")
    tracking.end_pipeline_run("FINISHED", run_id=run_id)
    client = mlflow.MlflowClient()
    child = client.get_run(run.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run_id
    assert child.data.params["train_ae.steps"] == "3"
    assert child.data.metrics == {"train/loss": 0.25, "final.psnr": 21.5, "eval.visual.IKR_captured_input.EN": 7.5}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_killed_pipeline_runs_are_closed_by_the_next_start(store, tmp_path):
    """kill -9 of `make run` leaves its pipeline run and the stage run in progress RUNNING; the
    next `tracking start` closes both as KILLED and leaves finished runs alone."""
    record = tmp_path / "run.json"
    first = tracking.start_pipeline_run("pipeline-test", record=record)
    client = mlflow.MlflowClient()
    exp = client.get_run(first).info.experiment_id
    done = client.create_run(exp, run_name="train_ae", tags={"mlflow.parentRunId": first, "magicfuse.stage": "train_ae"})
    client.set_terminated(done.info.run_id, "FINISHED")
    dead = client.create_run(exp, run_name="train_ikr", tags={"mlflow.parentRunId": first, "magicfuse.stage": "train_ikr"})
    second = tracking.start_pipeline_run("pipeline-test", record=record)
    assert second != first
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(done.info.run_id).info.status == "FINISHED"
    assert client.get_run(second).info.status == "RUNNING"
    tracking.end_pipeline_run("FINISHED", run_id=second)
    third = tracking.start_pipeline_run("pipeline-test", record=record)  # a finished one is left alone
    assert client.get_run(second).info.status == "FINISHED"
    tracking.end_pipeline_run("FINISHED", run_id=third)
