"""Stage outputs handed between machines through MLflow (magicfuse.tracking.handoff), against a
real MLflow store: a file and a folder published by one "worker" arrive byte-identical in
another working directory, are checked by sha256, cached by content, and a training
checkpoint mirrored to the pipeline run comes back on another worker."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from conftest import sqlite_store
from magicfuse import pipeline
from magicfuse.tracking import handoff
from magicfuse.tracking.runs import TrackingError


@pytest.fixture
def store(tmp_path, monkeypatch, pytestconfig):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path, pytestconfig))
    monkeypatch.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("MAGICFUSE_CACHE", str(tmp_path / "cache-a"))
    from magicfuse import tracking

    tracking.configure("handoff-test")
    return tmp_path


def _worker(tmp_path: Path, name: str, monkeypatch) -> Path:
    root = tmp_path / name
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MAGICFUSE_CACHE", str(tmp_path / f"cache-{name}"))
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_fetch_roundtrip_cache_and_corruption(store, monkeypatch, capsys):
    from magicfuse import tracking

    a = _worker(store, "a", monkeypatch)
    (a / "artifacts/ae").mkdir(parents=True)
    (a / "artifacts/ae/ae.pt").write_bytes(os.urandom(5000))
    shards = a / "artifacts/shards/synthetic"
    (shards / "train").mkdir(parents=True)
    (shards / "train/000.tar").write_bytes(os.urandom(3000))
    (shards / "manifest.parquet").write_bytes(b"PAR1" + os.urandom(100))
    pipe = tracking.start_pipeline_run(record=None, experiment="handoff-test")
    with tracking.stage_run("train_ae", parent_run_id=pipe, experiment="handoff-test") as run:
        pass
    run_id = run.info.run_id
    with pytest.raises(TrackingError, match="no complete handoff manifest"):
        handoff.fetch(run_id)  # nothing published yet
    assert handoff.find_stage_run(pipe, "train_ae") is None
    assert handoff.find_stage_run(pipe, "train_ae", published=False).info.run_id == run_id

    manifest = handoff.publish(run_id, ["artifacts/ae/ae.pt", "artifacts/shards/synthetic"])
    assert [(e["path"], e["kind"]) for e in manifest["files"]] == [("artifacts/ae/ae.pt", "file"),
                                                                    ("artifacts/shards/synthetic", "dir")]
    assert handoff.find_stage_run(pipe, "train_ae").info.run_id == run_id
    with pytest.raises(TrackingError, match="does not exist"):
        handoff.publish(run_id, ["artifacts/nothing.pt"])

    b = _worker(store, "b", monkeypatch)
    capsys.readouterr()
    placed = handoff.fetch(run_id)
    assert placed == ["artifacts/ae/ae.pt", "artifacts/shards/synthetic"]
    assert (b / "artifacts/ae/ae.pt").read_bytes() == (a / "artifacts/ae/ae.pt").read_bytes()
    assert _digest(b / "artifacts/shards/synthetic") == _digest(shards)
    assert capsys.readouterr().out.count("handoff: downloaded") == 2

    # the same worker again: nothing downloaded, nothing rewritten
    before = (b / "artifacts/ae/ae.pt").stat().st_mtime_ns
    handoff.fetch(run_id)
    assert "handoff: downloaded" not in capsys.readouterr().out
    assert (b / "artifacts/ae/ae.pt").stat().st_mtime_ns == before
    # a changed local file is put back from the (content-addressed) cache, not downloaded
    (b / "artifacts/ae/ae.pt").write_bytes(b"changed")
    handoff.fetch(run_id)
    assert "handoff: downloaded" not in capsys.readouterr().out
    assert (b / "artifacts/ae/ae.pt").read_bytes() == (a / "artifacts/ae/ae.pt").read_bytes()

    # the stored artifact replaced behind MLflow's back: a third worker refuses it by its sha256
    import mlflow
    from urllib.parse import urlparse

    art_root = Path(urlparse(mlflow.MlflowClient().get_run(run_id).info.artifact_uri).path)
    (art_root / "handoff/files/artifacts/ae/ae.pt").write_bytes(b"tampered")
    _worker(store, "c", monkeypatch)
    with pytest.raises(TrackingError, match=r"artifacts/ae/ae.pt from MLflow run .* has sha256 .* manifest says"):
        handoff.fetch(run_id)
    assert not Path("artifacts/ae/ae.pt").exists()


def test_deterministic_folder_archive(tmp_path):
    folder = tmp_path / "f"
    (folder / "x").mkdir(parents=True)
    (folder / "x/b.bin").write_bytes(b"b" * 10)
    (folder / "a.txt").write_text("a")
    handoff._tar_folder(folder, tmp_path / "one.tar")
    time.sleep(0.01)
    os.utime(folder / "a.txt")  # another mtime: same archive bytes
    handoff._tar_folder(folder, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_checkpoint_mirror_restores_on_another_worker(store, monkeypatch):
    from magicfuse import tracking
    from magicfuse.training.resume import RECORD

    a = _worker(store, "a", monkeypatch)
    out = a / "artifacts/ikr"
    out.mkdir(parents=True)
    (out / RECORD).write_text(json.dumps({"fingerprint": {"stage": "train_ikr"}, "complete": False}))
    pipe = tracking.start_pipeline_run(record=None, experiment="handoff-test")
    def wait_for(n: int) -> None:
        deadline = time.time() + 30
        while mirror.uploads < n and time.time() < deadline:  # the thread picks it up
            time.sleep(0.05)
        assert mirror.uploads == n, mirror.error

    with handoff.CheckpointMirror(pipe, "train_ikr", out, interval=0.05) as mirror:
        assert mirror.sync() is False  # no last.pt yet
        (out / "last.pt").write_bytes(b"step 8" + os.urandom(64))
        wait_for(1)
        assert mirror.sync() is False  # unchanged: not uploaded again
        (out / "last.pt").write_bytes(b"step 16" + os.urandom(64))
        wait_for(2)
        time.sleep(0.3)
    assert mirror.uploads == 2 and mirror.error is None
    latest = (out / "last.pt").read_bytes()

    b = _worker(store, "b", monkeypatch)
    # worker b holds a *finished* run of the stage (an earlier pipeline): the mirrored one replaces it
    (b / "artifacts/ikr").mkdir(parents=True)
    (b / "artifacts/ikr/last.pt").write_bytes(b"old finished run")
    (b / "artifacts/ikr/ikr.pt").write_bytes(b"old model")
    (b / "artifacts/ikr" / RECORD).write_text(json.dumps({"fingerprint": {"stage": "train_ikr"}, "complete": True}))
    assert handoff.restore_checkpoint(pipe, "train_ikr", b / "artifacts/ikr") is True
    assert (b / "artifacts/ikr/last.pt").read_bytes() == latest
    assert not (b / "artifacts/ikr/ikr.pt").exists()
    assert json.loads((b / "artifacts/ikr" / RECORD).read_text())["complete"] is False
    # its own interrupted run of the same stage and inputs: kept (at least as recent as the mirror)
    (b / "artifacts/ikr/last.pt").write_bytes(b"step 24, local")
    assert handoff.restore_checkpoint(pipe, "train_ikr", b / "artifacts/ikr") is False
    assert (b / "artifacts/ikr/last.pt").read_bytes() == b"step 24, local"
    assert handoff.restore_checkpoint(pipe, "train_ckg", b / "artifacts/ckg") is False  # none mirrored


def test_stale_running_runs_are_closed(store, monkeypatch):
    import mlflow

    from magicfuse import tracking

    _worker(store, "a", monkeypatch)
    pipe = tracking.start_pipeline_run(record=None, experiment="handoff-test")
    client = mlflow.MlflowClient()
    exp = client.get_run(pipe).info.experiment_id
    dead = client.create_run(exp, run_name="train_ckg", tags={"mlflow.parentRunId": pipe,
                                                              "magicfuse.stage": "train_ckg"})
    assert handoff.close_stale_runs(pipe, "train_ckg") == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert handoff.close_stale_runs(pipe, "train_ckg") == []


def test_stage_outputs_and_upstream():
    params = pipeline.load_params("params.yaml")
    assert pipeline.stage_name("shards", "synthetic") == "shards@synthetic"
    assert pipeline.stage_outputs(params, "train_ikr") == [Path("artifacts/ikr/ikr.pt")]
    assert pipeline.stage_outputs(params, "train_mkf") == [Path("artifacts/mkf/pipeline.pt")]
    assert pipeline.stage_outputs(params, "shards", "synthetic") == [Path("artifacts/shards/synthetic")]
    assert pipeline.stage_upstream(params, "shards", "synthetic") == ["synthesize"]
    assert pipeline.stage_upstream(params, "train_mkf") == ["shards@synthetic", "train_ae", "train_ikr", "train_ckg"]
    assert pipeline.stage_upstream(params, "evaluate") == ["shards@synthetic", "train_mkf"]
    from magicfuse.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.stage_outputs(params, "train_xyz")
    with pytest.raises(ConfigError, match="name it"):
        pipeline.stage_name("shards")
