"""The pipeline as a cluster runs it, with real servers on 127.0.0.1 (slow, ~8 min on 2 cores):

* `mlflow server` (sqlite backend, --artifacts-destination in a temporary folder) and
  `prefect server start`, each on a free loopback port;
* work pools `magicfuse-cpu` (the pipeline flow) and `magicfuse-gpu` (the steps), deployed
  with `prefect deploy --all` from prefect.yaml;
* three process workers, each in its own git clone of HEAD (no shared artifacts/ folder):
  `orchestrator` on magicfuse-cpu, `worker-a` and `worker-b` on magicfuse-gpu (one flow run
  at a time each, like one GPU each).

Run 1: the `magicfuse-cluster/cluster` deployment with a micro parameter set completes; IKR
and CKG ran on different workers at overlapping times (Prefect's flow-run records); every
checkpoint a step read came from its upstream run through the MLflow server (hash-checked),
none from a shared disk; the registry has @champion.

Run 2: the worker running train_ckg is killed with SIGKILL together with the step's process
(a lost machine) after the step's first checkpoint was mirrored to MLflow; the heartbeat
automation (`python -m flows.cluster --install-crash-detection`) marks the run Crashed, the
pipeline starts the step again on the other worker, it resumes from the MLflow checkpoint (its
first logged training step is past the checkpoint), the dead MLflow run is marked KILLED, and
the pipeline completes. Run 3: a failed step fails the pipeline with its own message.
Everything is torn down, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_dvc import BIN, MICRO, REPO, _clone, _kill_group, _run

pytestmark = pytest.mark.slow

PIPELINE_TIMEOUT = 900  # one micro pipeline through the cluster (~3 min on 2 idle cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


class Cluster:
    """The servers and workers; `stop()` kills every process group it started."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen, Any]] = []
        self.mlflow_port, self.prefect_port = _free_port(), _free_port()
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.prefect_api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.art_dest = tmp / "mlflow-artifacts"
        self.clones: dict[str, Path] = {}
        self.workers: dict[str, subprocess.Popen] = {}

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAGICFUSE_"))}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(self.tmp / "prefect-home"), "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "NO_ALBUMENTATIONS_UPDATE": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        fh = open(log, "w")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((proc, fh))
        return proc

    def start(self) -> None:
        self.art_dest.mkdir()
        mlflow = self.spawn("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
            "--artifacts-destination", str(self.art_dest)], self.tmp, self.env())
        prefect = self.spawn("prefect-server", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
            self.tmp, self.env())
        _wait_http(f"{self.mlflow_uri}/health", mlflow, self.tmp / "mlflow-server.log")
        _wait_http(f"{self.prefect_api}/health", prefect, self.tmp / "prefect-server.log")
        for name in ("orchestrator", "worker-a", "worker-b"):
            self.clones[name] = _clone(REPO, self.tmp / name)
        cli = str(BIN / "prefect")
        for pool in ("magicfuse-cpu", "magicfuse-gpu"):
            _run([cli, "work-pool", "create", pool, "--type", "process"], self.tmp, self.env())
        out = _run([cli, "--no-prompt", "deploy", "--all"], self.clones["orchestrator"], self.env(), timeout=300)
        assert "magicfuse-step/train_ckg" in out and "magicfuse-cluster/cluster" in out, out[-3000:]
        # a flow run whose machine dies sends no more heartbeats: Crashed after 3 x 30 s
        out = _run([str(BIN / "python"), "-m", "flows.cluster", "--install-crash-detection", "30",
                    "--missed-heartbeats", "3"], self.clones["orchestrator"], self.env())
        assert "is marked Crashed" in out, out[-2000:]
        for name, pool, limit in (("orchestrator", "magicfuse-cpu", "4"), ("worker-a", "magicfuse-gpu", "1"),
                                  ("worker-b", "magicfuse-gpu", "1")):
            clone = self.clones[name]
            self.workers[name] = self.spawn(name, [cli, "worker", "start", "--pool", pool, "--type", "process", "--name", name,
                              "--limit", limit], clone,
                       self.env(MAGICFUSE_HOME=str(clone), MAGICFUSE_WORKER_NAME=name,
                                MAGICFUSE_CACHE=str(self.tmp / f"cache-{name}")))

    def stop(self) -> None:
        for proc, fh in reversed(self.procs):
            _kill_group(proc)
            fh.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp.glob("*.log")))

    def python(self, code: str, timeout: float = PIPELINE_TIMEOUT, **kw: Any) -> Any:
        """Run `code` (which prints one JSON line last) with the cluster's settings; its result."""
        out = _run([str(BIN / "python"), "-c", code], self.clones["orchestrator"], self.env(), timeout=timeout, **kw)
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


RUN_PIPELINE = """
import json, sys
from prefect.deployments import run_deployment
fr = run_deployment("magicfuse-cluster/cluster", parameters={"overrides": json.loads(sys.argv[1])}, poll_interval=1)
print(json.dumps({"state": fr.state.type.value, "message": fr.state.message, "id": str(fr.id)}))
"""

FLOW_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(limit=200)
        flows = {f.id: f.name for f in await c.read_flows()}
        return [{"flow": flows.get(r.flow_id), "name": r.name, "state": r.state.type.value if r.state else None,
                 "params": {k: v for k, v in r.parameters.items() if k in ("stage", "source", "pipeline_run_id")},
                 "start": r.start_time.timestamp() if r.start_time else None,
                 "end": r.end_time.timestamp() if r.end_time else None, "pid": r.infrastructure_pid}
                for r in runs]
print(json.dumps(asyncio.run(main())))
"""


def _run_pipeline(cluster: Cluster, overrides: dict[str, Any]) -> dict[str, Any]:
    code = RUN_PIPELINE.replace("sys.argv[1]", repr(json.dumps(overrides)))
    try:
        return cluster.python(code)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None


def _steps(cluster: Cluster, pipeline_run_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in cluster.python(FLOW_RUNS, timeout=120):
        if r["flow"] == "magicfuse-step" and r["params"].get("pipeline_run_id") == pipeline_run_id:
            stage = r["params"]["stage"] + (f"@{r['params']['source']}" if r["params"].get("source") else "")
            out.setdefault(stage, []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["start"] or 0)
    return out


def _client(cluster: Cluster) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=cluster.mlflow_uri)


def _pipeline_run_id(cluster: Cluster, flow_run_id: str) -> str:
    client = _client(cluster)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`magicfuse.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])
    assert runs, "no MLflow pipeline run"
    return runs[0].info.run_id


def test_cluster_pipeline_two_workers_mlflow_handoff(cluster):
    # the denoisers train long enough (~30 s) that they overlap although a worker takes ~10 s
    # to start a flow run
    overrides = json.loads(json.dumps(MICRO))
    for branch in ("train_ikr", "train_ckg"):
        overrides[branch].update({"steps": 300, "ckpt_every": 100, "log_every": 50})
    result = _run_pipeline(cluster, overrides)
    assert result["state"] == "COMPLETED", f"{result}\n{cluster.logs()}"
    pipe = _pipeline_run_id(cluster, result["id"])
    steps = _steps(cluster, pipe)
    assert sorted(steps) == ["evaluate", "shards@synthetic", "synthesize", "train_ae", "train_ckg", "train_ikr",
                             "train_mkf"], steps
    assert all(len(r) == 1 and r[0]["state"] == "COMPLETED" for r in steps.values()), steps

    # the flow-run timeline: IKR and CKG on different workers, at overlapping times
    t0 = min(r[0]["start"] for r in steps.values())
    print("\nflow-run timeline (seconds after the first step started):")
    for stage, (r,) in sorted(steps.items(), key=lambda kv: kv[1][0]["start"]):
        print(f"  {stage:<18} {r['name']:<34} {r['start'] - t0:7.1f} -> {r['end'] - t0:7.1f}  pid {r['pid']}")
    ikr, ckg = steps["train_ikr"][0], steps["train_ckg"][0]
    workers = {ikr["name"].rsplit(" on ", 1)[1], ckg["name"].rsplit(" on ", 1)[1]}
    assert workers == {"worker-a", "worker-b"}, (ikr["name"], ckg["name"])
    assert ikr["start"] < ckg["end"] and ckg["start"] < ikr["end"], "IKR and CKG did not overlap"

    # every checkpoint went through the MLflow server: logged by its stage run (sha256 manifest),
    # stored in the server's artifact destination, and byte-identical where a later step used it
    client = _client(cluster)
    stage_runs = {}
    for stage in ("train_ae", "train_ikr", "train_ckg", "train_mkf"):
        runs = client.search_runs([client.get_run(pipe).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{pipe}' and tags.`magicfuse.stage` = '{stage}'")
        assert len(runs) == 1 and runs[0].data.tags.get("magicfuse.handoff") == "complete", stage
        stage_runs[stage] = runs[0]
    manifests = {}
    for stage, run in stage_runs.items():
        path = client.download_artifacts(run.info.run_id, "handoff/manifest.json", str(cluster.tmp))
        (entry,) = json.loads(Path(path).read_text())["files"]
        manifests[stage] = entry
        stored = list(cluster.art_dest.rglob(f"{run.info.run_id}/artifacts/{entry['artifact']}"))
        assert len(stored) == 1, f"{stage}: {entry['artifact']} not in the server's artifact destination"
    mkf_worker = stage_runs["train_mkf"].data.tags["magicfuse.worker"]
    clone = cluster.clones[mkf_worker]
    import hashlib

    for stage in ("train_ae", "train_ikr", "train_ckg"):
        local = clone / manifests[stage]["path"]
        assert hashlib.sha256(local.read_bytes()).hexdigest() == manifests[stage]["sha256"], stage
    # the branch mkf's worker did not train reached it only through MLflow
    other = [s for s in ("train_ikr", "train_ckg") if stage_runs[s].data.tags["magicfuse.worker"] != mkf_worker]
    assert len(other) == 1
    assert f"handoff: downloaded {manifests[other[0]]['path']}" in (cluster.tmp / f"{mkf_worker}.log").read_text()
    assert not (cluster.clones["orchestrator"] / "artifacts").exists(), "the pipeline flow wrote artifacts"

    version = client.get_model_version_by_alias("magicfuse", "champion")
    assert version.version == "1"
    assert client.get_run(pipe).info.status == "FINISHED"


def test_cluster_worker_killed_step_resumes_from_mlflow_checkpoint(cluster):
    """kill -9 of the worker running train_ckg, with its flow-run process (a machine lost), after
    the step's first checkpoint reached MLflow: Prefect's heartbeat automation marks the run
    Crashed, the pipeline starts the step again on the other worker, which resumes from MLflow."""
    import threading

    overrides = json.loads(json.dumps(MICRO))
    overrides["train_ckg"].update({"steps": 400, "ckpt_every": 8, "log_every": 4})
    client = _client(cluster)
    killed: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.time() + PIPELINE_TIMEOUT
        while time.time() < deadline and "pid" not in killed:
            time.sleep(1)
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          filter_string="tags.`magicfuse.kind` = 'pipeline' and attributes.status = 'RUNNING'")
                for run in runs:
                    if any(a.path.endswith("last.pt") for a in client.list_artifacts(run.info.run_id, "resume/train_ckg")):
                        rows = [r for r in cluster.python(FLOW_RUNS, timeout=60)
                                if r["flow"] == "magicfuse-step" and r["params"].get("stage") == "train_ckg"
                                and r["state"] == "RUNNING" and r["params"].get("pipeline_run_id") == run.info.run_id]
                        if rows and rows[0]["pid"]:
                            worker = rows[0]["name"].rsplit(" on ", 1)[1]
                            pid = int(str(rows[0]["pid"]).rsplit(":", 1)[-1])
                            os.killpg(cluster.workers[worker].pid, signal.SIGKILL)  # the worker ...
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)  # ... and the step it ran
                            killed.update(pid=pid, pipeline=run.info.run_id, worker=worker, at=time.time())
                            return
            except Exception as exc:  # servers busy: try again
                killed.setdefault("errors", []).append(repr(exc))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = _run_pipeline(cluster, overrides)
    thread.join(timeout=5)
    assert "pid" in killed, f"train_ckg was never killed: {killed}\n{cluster.logs()}"
    assert result["state"] == "COMPLETED", f"{result}\n{cluster.logs()}"
    pipe = killed["pipeline"]
    ckg = _steps(cluster, pipe)["train_ckg"]
    assert [r["state"] for r in ckg] == ["CRASHED", "COMPLETED"], ckg
    survivor = ckg[1]["name"].rsplit(" on ", 1)[1]
    assert survivor != killed["worker"], ckg
    print(f"\ntrain_ckg: {ckg[0]['name']} crashed (worker killed), marked Crashed "
          f"{ckg[0]['end'] - killed['at']:.0f} s after the kill; {ckg[1]['name']} completed")

    runs = client.search_runs([client.get_run(pipe).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{pipe}' and tags.`magicfuse.stage` = 'train_ckg'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"], [r.info.status for r in runs]
    first_step = min(m.step for m in client.get_metric_history(runs[1].info.run_id, "train/loss"))
    assert first_step > 8, f"the second attempt logged step {first_step}: it started over instead of resuming"
    assert runs[1].data.metrics["final.steps"] == 400
    print(f"train_ckg resumed: its second run's first logged step is {first_step}")
    log = (cluster.tmp / f"{survivor}.log").read_text()
    assert f"train_ckg: restored artifacts/ckg/last.pt from pipeline run {pipe}" in log


def test_cluster_failed_step_fails_pipeline_with_its_message(cluster):
    overrides = json.loads(json.dumps(MICRO))
    overrides["shards"]["sources"] = {"synthetic": {"root": "artifacts/no-such-scenes"}}
    result = _run_pipeline(cluster, overrides)
    assert result["state"] == "FAILED", result
    assert "step shards@synthetic failed" in result["message"], result
    assert "artifacts/no-such-scenes does not exist" in result["message"], result
