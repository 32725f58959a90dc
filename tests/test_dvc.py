"""DVC as its users expect, on a temporary git clone of this repository's HEAD with a
micro parameter set (every stage really runs, in seconds):

* `dvc repro` completes; `dvc push` to a local remote; a second clone (of the first, so it
  has its dvc.lock) with the same remote: `dvc pull`, then `dvc status` is clean and
  `dvc repro` runs no stage;
* kill -9: `dvc repro` in a third clone, its whole process group killed with SIGKILL inside
  stages (synthesize, shards, each training stage after its first checkpoint, evaluate right
  after it registered the model), then `dvc repro` again until it completes: the metrics
  equal the uninterrupted run's, no half-written file is left in artifacts/ or reports/, and
  the registry holds as many versions as after the uninterrupted run.

Each `dvc repro` is wrapped like `make run`: `python -m magicfuse.tracking start` before,
`... end` after, with the MLflow store (sqlite) inside the clone.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project environment: dvc, and the `python` the stage commands call

# The smallest settings that still run every stage for real (~15 s a stage, most of it imports).
TRAIN = {"steps": 24, "log_every": 4, "ckpt_every": 8}
MICRO: dict[str, Any] = {
    "synthesize": {"height": 32, "width": 48, "splits": {"train": 8, "val": 2, "test": 4}},
    "shards": {"samples_per_shard": 4},
    "train_ae": {**TRAIN, "batch_size": 2, "crop": 32, "latent_stats_images": 4},
    "train_ikr": {**TRAIN, "batch_size": 2, "crop": 32, "eval_samples": 1, "eval_steps": 1},
    "train_ckg": {**TRAIN, "batch_size": 2, "crop": 32, "eval_samples": 1, "eval_steps": 1},
    "train_mkf": {**TRAIN, "batch_size": 1, "crop": 32, "sampler_steps": 2},
    "evaluate": {"max_images": 2, "batch_size": 2, "steps": 2, "taus": [0.4], "ablations": ["model4"],
                 "ablation_images": 1, "semantic": False, "grid_images": 1, "progress": False,
                 "promotion": {"visual.MagImg.SSIM": 1.0, "semantic.MagImg.mIoU": 0, "semantic.Ours-S.mIoU": 0}},
}
STAGES = ("synthesize", "shards@synthetic", "train_ae", "train_ikr", "train_ckg", "train_mkf", "evaluate")
TRAINING = {"train_ae": "ae", "train_ikr": "ikr", "train_ckg": "ckg", "train_mkf": "mkf"}
# Per-run figures that are not a function of the data and the seeds.
TIMING_KEYS = {"seconds", "images_per_s", "scenes_per_s"}
# Names a half-written file would have: magicfuse.io.atomic_path's ".<name>.XXXX.tmp", other temp names.
PARTIAL = re.compile(r"(\.tmp$|\.part$|\.partial$|^tmp[a-z0-9_]{6,}$)")

REPRO_TIMEOUT = 420  # seconds, one `dvc repro` of the micro pipeline (~2 min on 2 busy cores)
SHORT = 120


# ----------------------------------------------------------------------------- helpers


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env(clone: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAGICFUSE_PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI",
                                                             "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_STAGE")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # tiny networks on a shared 2-core machine: one thread each (OpenMP spinning costs 30x)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = SHORT, check: bool = True) -> str:
    """Run a command in its own process group; its output (stdout+stderr). The whole group is
    killed on a timeout or an interruption."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise AssertionError(f"{' '.join(args)} ran past {timeout} s in {cwd}") from None
    finally:
        _kill_group(proc)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}:\n{out[-4000:]}")
    return out


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd, dict(os.environ))


def _clone(src: Path, dst: Path) -> Path:
    _run(["git", "clone", "-q", str(src), str(dst)], dst.parent, dict(os.environ))
    return dst


def _tracked_repro(clone: Path, env: dict[str, str], timeout: float = REPRO_TIMEOUT) -> str:
    """`make run`'s sequence: a fresh MLflow pipeline run, `dvc repro`, the run closed."""
    _run([str(BIN / "python"), "-m", "magicfuse.tracking", "start"], clone, env)
    try:
        out = _run([str(BIN / "dvc"), "repro"], clone, env, timeout=timeout)
    except AssertionError:
        _run([str(BIN / "python"), "-m", "magicfuse.tracking", "end", "--status", "FAILED"], clone, env, check=False)
        raise
    _run([str(BIN / "python"), "-m", "magicfuse.tracking", "end"], clone, env)
    return out


def _metrics(clone: Path) -> dict[str, Any]:
    out = {}
    for stage in ("train_ae", "train_ikr", "train_ckg", "train_mkf", "evaluate"):
        out[stage] = json.loads((clone / "reports" / stage / "metrics.json").read_text())
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _compare(ref: dict[str, Any], got: dict[str, Any], rel: float = 0.0) -> list[str]:
    """Keys whose values differ (timing figures left out); `rel` = 0: exactly equal."""
    a, b = _flat(ref), _flat(got)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[-1] in TIMING_KEYS:
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y):
            if abs(x - y) > rel * max(abs(x), abs(y)):
                diffs.append(f"{key}: {x!r} != {y!r}")
        elif x != y:
            diffs.append(f"{key}: {x!r} != {y!r}")
    return diffs


def _partial_files(clone: Path) -> list[str]:
    bad = []
    for top in ("artifacts", "reports"):
        for p in (clone / top).rglob("*"):
            if PARTIAL.search(p.name):
                bad.append(str(p.relative_to(clone)))
    return bad


def _versions(clone: Path) -> dict[str, list[str]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    name = yaml.safe_load((clone / "params.yaml").read_text())["tracking"]["model_name"]
    out = {}
    for n in (name, f"{name}-ae", f"{name}-ikr", f"{name}-ckg"):
        out[n] = sorted(str(v.version) for v in client.search_model_versions(f"name = '{n}'"))
    return out


def _prepare(clone: Path) -> None:
    """Micro parameters committed in the clone; the local DVC settings of `make run`."""
    params = yaml.safe_load((clone / "params.yaml").read_text())
    (clone / "params.yaml").write_text(yaml.safe_dump(_deep_merge(params, MICRO), sort_keys=False))
    _git(clone, "commit", "-qam", "micro parameters")
    _run([str(BIN / "dvc"), "config", "--local", "core.analytics", "false"], clone, dict(os.environ))


# ----------------------------------------------------------------------------- the uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A clone with the micro parameters, reproduced once without interruption and pushed."""
    tmp = tmp_path_factory.mktemp("dvc")
    clone = _clone(REPO, tmp / "first")
    _prepare(clone)
    env = _env(clone, tmp)
    t0 = time.perf_counter()
    out = _tracked_repro(clone, env)
    seconds = time.perf_counter() - t0
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran and set(ran) == set(STAGES), out[-3000:]
    remote = tmp / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], clone, env)
    push = _run([str(BIN / "dvc"), "push"], clone, env)
    assert "WARNING" not in push and "ERROR" not in push, push
    _git(clone, "add", "dvc.lock", ".dvc/config")
    _git(clone, "commit", "-qm", "pipeline outputs and the DVC remote")
    print(f"\nuninterrupted dvc repro: {seconds:.0f} s; {push.strip().splitlines()[-1]}")
    return {"tmp": tmp, "clone": clone, "metrics": _metrics(clone), "versions": _versions(clone),
            "partial": _partial_files(clone)}


def test_push_then_pull_in_a_fresh_clone_is_up_to_date(reference):
    tmp = reference["tmp"]
    second = _clone(reference["clone"], tmp / "second")
    env = _env(second, tmp)
    pull = _run([str(BIN / "dvc"), "pull"], second, env)
    assert "ERROR" not in pull, pull
    status = _run([str(BIN / "dvc"), "status"], second, env)
    assert "Data and pipelines are up to date." in status, status
    repro = _run([str(BIN / "dvc"), "repro"], second, env)
    assert "Running stage" not in repro, repro
    skipped = set(re.findall(r"Stage '([^']+)' didn't change, skipping", repro))
    assert skipped == set(STAGES), repro
    assert "Data and pipelines are up to date." in repro, repro
    assert _metrics(second) == reference["metrics"]
    assert reference["partial"] == []


# ----------------------------------------------------------------------------- kill -9


class _Watched:
    """`dvc repro` in its own process group, its output collected by a thread."""

    def __init__(self, clone: Path, env: dict[str, str]):
        self.proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.chunks: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for block in iter(lambda: os.read(self.proc.stdout.fileno(), 65536), b""):
            self.chunks.append(block.decode("utf-8", "replace"))

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def stage(self) -> str | None:
        running = re.findall(r"Running stage '([^']+)'", self.text)
        return running[-1] if running else None

    def kill(self) -> None:
        _kill_group(self.proc)
        self.thread.join(timeout=10)


def _kill_point(clone: Path, stage: str, text: str) -> str | None:
    """What makes `stage` killable now (a description), else None."""
    if stage == "synthesize":
        scenes = clone / "artifacts" / "scenes"
        n = sum(1 for p in scenes.rglob("*.png")) if scenes.is_dir() else 0
        return f"{n} scene images written" if n else None
    if stage == "shards@synthetic":
        d = clone / "artifacts" / "shards" / "synthetic"
        n = sum(1 for p in d.rglob("*.tar")) if d.is_dir() else 0
        return f"{n} shard(s) written" if n else None
    if stage in TRAINING:
        if (clone / "artifacts" / TRAINING[stage] / "last.pt").exists():
            done = re.findall(r"(\d+)/\d+ \[", text.split(f"Running stage '{stage}'")[-1])
            return f"after the first checkpoint (progress bar at {done[-1] if done else '?'}/{TRAIN['steps']})"
        return None
    if stage == "evaluate":
        if "Created version" in text.split("Running stage 'evaluate'")[-1]:
            return "right after it registered the pipeline model"
        return None
    raise AssertionError(stage)


def test_kill9_inside_every_stage_then_repro_completes_with_the_same_results(reference):
    tmp = reference["tmp"]
    clone = _clone(REPO, tmp / "third")
    _prepare(clone)
    env = _env(clone, tmp)
    t0 = time.perf_counter()
    kills: list[tuple[str, str]] = []
    missed: list[str] = []
    resumed: dict[str, str] = {}
    todo = list(STAGES)
    for _attempt in range(len(STAGES) + 2):
        if not todo:
            break
        _run([str(BIN / "python"), "-m", "magicfuse.tracking", "start"], clone, env)
        run = _Watched(clone, env)
        deadline = time.monotonic() + REPRO_TIMEOUT
        try:
            while todo and run.proc.poll() is None:
                assert time.monotonic() < deadline, f"dvc repro ran past {REPRO_TIMEOUT} s:\n{run.text[-3000:]}"
                current = run.stage()
                if current is not None and current in todo and todo.index(current) > 0:
                    missed += todo[:todo.index(current)]  # finished before the watcher saw it
                    del todo[:todo.index(current)]
                if current == todo[0]:
                    why = _kill_point(clone, current, run.text)
                    if why is not None:
                        run.kill()
                        kills.append((current, why))
                        todo.pop(0)
                        break
                time.sleep(0.02)
        finally:
            run.kill()
        text = run.text
        for stage, folder in TRAINING.items():  # a resumed bar starts at its checkpoint, not at 0
            part = text.split(f"Running stage '{stage}'")
            if len(part) > 1:
                first = re.search(r"train \w+:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", part[1])
                if first and int(first.group(1)) > 0 and stage not in resumed:
                    assert f"{stage}: resuming the interrupted run" in part[1], part[1][:2000]
                    resumed[stage] = f"resumed at step {first.group(1)}"
        if run.proc.returncode == 0:  # completed before the next kill point
            missed += todo
            todo = []
            break
    final = _tracked_repro(clone, env)
    seconds = time.perf_counter() - t0
    print(f"\nkill -9 runs: {seconds:.0f} s; killed: {kills}; missed: {missed}; resumed: {resumed}")
    assert {s for s, _ in kills} >= set(TRAINING), (kills, missed)
    # every training stage killed after a checkpoint went on from it (magicfuse.training.resume;
    # the outputs are `persist: true`, else DVC deletes them and the stage starts at step 0)
    assert set(resumed) == {s for s, why in kills if s in TRAINING and "checkpoint" in why}, resumed
    assert re.search(r"Data and pipelines are up to date|Use `dvc push`", final), final[-3000:]
    status = _run([str(BIN / "dvc"), "status"], clone, env)
    assert "Data and pipelines are up to date." in status, status

    # the same results as the uninterrupted run: training resumes exactly (magicfuse.training.loop),
    # sampling and metrics are seeded per image
    metrics = _metrics(clone)
    diffs = _compare(reference["metrics"], metrics, rel=0.0)
    print(f"metrics (uninterrupted): {json.dumps(reference['metrics']['evaluate'], sort_keys=True)[:400]}")
    print(f"metrics (killed + rerun): {json.dumps(metrics['evaluate'], sort_keys=True)[:400]}")
    assert not diffs, "\n".join(diffs)
    assert _partial_files(clone) == []
    versions = _versions(clone)
    print(f"registered versions: uninterrupted {reference['versions']}, killed + rerun {versions}")
    assert versions == reference["versions"]
    if ("evaluate", "right after it registered the pipeline model") in kills:
        assert "not registered again" in final, final[-3000:]
