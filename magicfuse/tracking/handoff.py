"""Stage outputs handed from one machine to the next through MLflow (no shared disk).

On a cluster every step runs on some worker with its own working directory. A step logs
the files the next steps need (checkpoints, shard folders, scenes) as artifacts of its own
MLflow stage run; the next step, on another worker, resolves them by that run id, downloads
them through the tracking server into its own cache and puts them where the local code
expects them (`artifacts/...` of its working directory). Nothing is trusted blindly: every
file carries its sha256 in the run's manifest and is checked after the download.

Layout in a stage run (artifact paths):

    handoff/manifest.json          {"files": [{"path", "kind", "artifact", "sha256", "bytes"}]}
    handoff/files/<path>           a file, under its path relative to the working directory
    handoff/files/<path>.tar       a folder, as one uncompressed tar (sorted, mtime 0)

A run whose manifest was written carries the tag ``magicfuse.handoff = complete``; until
then the run holds no usable outputs (a step killed while uploading is run again).

Resuming on another worker: `CheckpointMirror` copies a training stage's `last.pt` (and its
`.stage.json` record) to the *pipeline* run under ``resume/<stage>/`` each time the trainer
writes a new one; `restore_checkpoint` puts them back before the stage runs again, and the
stage resumes exactly as it does locally (`magicfuse.training.resume`).

The cache is content-addressed (``<cache>/<sha256>``; `MAGICFUSE_CACHE`, default
``~/.cache/magicfuse/handoff``): a file a worker already holds is not downloaded again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from magicfuse.io import atomic_path, read_json_object, sha256_file, write_json_atomic
from magicfuse.mlflow_store import use_tracking_store
from magicfuse.tracking.runs import TrackingError, child_runs, close_dead_runs
from magicfuse.training.loop import LAST
from magicfuse.training.resume import RECORD

__all__ = ["HANDOFF", "MANIFEST", "RESUME", "CheckpointMirror", "cache_dir", "client", "close_stale_runs", "fetch",
           "find_stage_run", "mirrored", "publish", "restore_checkpoint"]

HANDOFF = "handoff"
MANIFEST = f"{HANDOFF}/manifest.json"
RESUME = "resume"
COMPLETE_TAG = "magicfuse.handoff"
LOCAL_RECORD = Path("artifacts") / ".handoff.json"  # path -> sha256 of what fetch() placed here


def client() -> Any:
    import mlflow

    use_tracking_store()
    return mlflow.MlflowClient()


def cache_dir() -> Path:
    """`MAGICFUSE_CACHE`, else ~/.cache/magicfuse/handoff."""
    return Path(os.environ.get("MAGICFUSE_CACHE") or Path.home() / ".cache" / "magicfuse" / "handoff")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise TrackingError(f"handoff: {path} is outside the working directory {root}; only files under it "
                            f"can be handed to another machine") from None


def _tar_folder(folder: Path, dest: Path) -> None:
    """`folder` as one uncompressed tar with sorted names, mtime 0 and no owners: the same
    content gives the same bytes (and sha256)."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False, filter=clean)


def publish(run_id: str, paths: Iterable[str | Path], *, root: str | Path | None = None) -> dict[str, Any]:
    """Log `paths` (files or folders under `root`, default the working directory) to the MLflow
    run `run_id` under handoff/, then the manifest, then tag the run complete. Returns the manifest."""
    root = Path(root or Path.cwd())
    mlc = client()
    entries = []
    with tempfile.TemporaryDirectory(prefix="magicfuse-handoff-") as tmp:
        for raw in paths:
            path = Path(raw) if Path(raw).is_absolute() else root / raw
            rel = _relative(path, root)
            if path.is_dir():
                upload = Path(tmp) / (Path(rel).name + ".tar")
                _tar_folder(path, upload)
                kind = "dir"
            elif path.is_file():
                upload, kind = path, "file"
            else:
                raise TrackingError(f"handoff: {path} does not exist; the stage did not write it")
            parent = f"{HANDOFF}/files/{Path(rel).parent.as_posix()}".rstrip("/.")
            print(f"handoff: uploading {rel} ({upload.stat().st_size / 1e6:.1f} MB) to run {run_id}", flush=True)
            mlc.log_artifact(run_id, str(upload), artifact_path=parent)
            entries.append({"path": rel, "kind": kind, "artifact": f"{parent}/{upload.name}",
                            "sha256": sha256_file(upload), "bytes": upload.stat().st_size})
        manifest = {"format": "magicfuse-handoff", "version": 1, "files": entries}
        mpath = Path(tmp) / "manifest.json"
        write_json_atomic(mpath, manifest)
        mlc.log_artifact(run_id, str(mpath), artifact_path=HANDOFF)
    mlc.set_tag(run_id, COMPLETE_TAG, "complete")
    return manifest


def _download(run_id: str, artifact: str, dst: Path) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst)))
    except Exception as exc:  # MlflowException, OSError, requests errors: say what was being fetched
        raise TrackingError(f"handoff: could not download {artifact!r} of MLflow run {run_id}: "
                            f"{type(exc).__name__}: {exc}") from None


def _manifest(run_id: str) -> dict[str, Any]:
    mlc = client()
    try:
        run = mlc.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"handoff: MLflow run {run_id} not found in {mlc.tracking_uri}: {exc}") from None
    if run.data.tags.get(COMPLETE_TAG) != "complete":
        raise TrackingError(f"handoff: MLflow run {run_id} ({run.info.run_name}) has no complete handoff manifest; "
                            f"its step did not finish publishing its outputs")
    with tempfile.TemporaryDirectory(prefix="magicfuse-handoff-") as tmp:
        path = _download(run_id, MANIFEST, Path(tmp))
        try:
            manifest = json.loads(path.read_text())
            files = manifest["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrackingError(f"handoff: the manifest of MLflow run {run_id} is unreadable: {exc}") from None
    return {"files": files, "run_name": run.info.run_name}


def _cached(entry: dict[str, Any], run_id: str) -> Path:
    """The cache file holding `entry`'s bytes, downloaded and checked if not there yet."""
    cache = cache_dir()
    target = cache / entry["sha256"]
    if target.is_file() and target.stat().st_size == entry["bytes"]:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        t0 = time.perf_counter()
        got = _download(run_id, entry["artifact"], Path(tmp))
        digest = sha256_file(got)
        if digest != entry["sha256"]:
            raise TrackingError(f"handoff: {entry['path']} from MLflow run {run_id} has sha256 {digest}, its manifest "
                                f"says {entry['sha256']}: the download is corrupt or the artifact was replaced")
        os.replace(got, target)
        print(f"handoff: downloaded {entry['path']} ({entry['bytes'] / 1e6:.1f} MB) from run {run_id} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def fetch(run_id: str, *, root: str | Path | None = None) -> list[str]:
    """Put the outputs run `run_id` published under `root` (default the working directory), each
    checked against its sha256; files already there with the same bytes are left alone. Returns
    their paths (relative to `root`)."""
    root = Path(root or Path.cwd())
    manifest = _manifest(run_id)
    record = read_json_object(root / LOCAL_RECORD) or {}
    placed = []
    for entry in manifest["files"]:
        rel = entry["path"]
        dest = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise TrackingError(f"handoff: MLflow run {run_id} names a path outside the working directory: {rel!r}")
        if entry["kind"] == "file":
            if dest.is_file() and sha256_file(dest) == entry["sha256"]:
                placed.append(rel)
                continue
            src = _cached(entry, run_id)
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        elif entry["kind"] == "dir":
            if dest.is_dir() and record.get(rel) == entry["sha256"]:
                placed.append(rel)
                continue
            src = _cached(entry, run_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
            try:
                with tarfile.open(src) as tar:
                    tar.extractall(staging, filter="data")
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(staging, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            record[rel] = entry["sha256"]
            write_json_atomic(root / LOCAL_RECORD, record)
        else:
            raise TrackingError(f"handoff: MLflow run {run_id}: unknown entry kind {entry['kind']!r} for {rel}")
        placed.append(rel)
    print(f"handoff: {len(placed)} output(s) of {manifest['run_name']} (run {run_id}) in place: {', '.join(placed)}",
          flush=True)
    return placed


def find_stage_run(pipeline_run_id: str, stage: str, *, published: bool = True) -> Any | None:
    """The latest FINISHED run of `stage` under the pipeline run; `published`: only one whose
    outputs were published completely."""
    client()
    for run in child_runs(pipeline_run_id, stage):
        if run.info.status == "FINISHED" and (not published or run.data.tags.get(COMPLETE_TAG) == "complete"):
            return run
    return None


def close_stale_runs(pipeline_run_id: str, stage: str) -> list[str]:
    """Mark runs of `stage` under the pipeline run that are still RUNNING as KILLED (their process
    died, e.g. kill -9 of a worker); returns their ids. Called before the stage runs again."""
    client()
    return close_dead_runs(pipeline_run_id, stage)


# ----------------------------------------------------------------------------- resuming elsewhere


def restore_checkpoint(pipeline_run_id: str, stage: str, out_dir: str | Path) -> bool:
    """Put the last checkpoint `CheckpointMirror` logged for `stage` (pipeline run
    `pipeline_run_id`) into `out_dir`, emptied first, so that the stage resumes from it. Not
    when there is none, when it is of a finished run, or when `out_dir` holds this worker's own
    interrupted run of the same stage and inputs (at least as recent). True if restored."""
    out_dir = Path(out_dir)
    mlc = client()
    names = {Path(a.path).name for a in mlc.list_artifacts(pipeline_run_id, f"{RESUME}/{stage}")}
    if not {LAST, RECORD} <= names:
        return False
    with tempfile.TemporaryDirectory(prefix="magicfuse-resume-") as tmp:
        record_file = _download(pipeline_run_id, f"{RESUME}/{stage}/{RECORD}", Path(tmp))
        mirrored = read_json_object(record_file)
        if mirrored is None or mirrored.get("complete"):
            return False
        local = read_json_object(out_dir / RECORD)
        if (local is not None and not local.get("complete") and (out_dir / LAST).is_file()
                and local.get("fingerprint") == mirrored.get("fingerprint")):
            print(f"handoff: {stage}: {out_dir} holds this worker's own interrupted run; resuming from it", flush=True)
            return False
        got = _download(pipeline_run_id, f"{RESUME}/{stage}/{LAST}", Path(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for name, src in ((LAST, got), (RECORD, record_file)):
            with atomic_path(out_dir / name) as dst:
                shutil.copyfile(src, dst)
    print(f"handoff: {stage}: restored {out_dir / LAST} from pipeline run {pipeline_run_id} "
          f"({RESUME}/{stage}/); the stage resumes from it", flush=True)
    return True


class CheckpointMirror:
    """Copy `out_dir/last.pt` and its `.stage.json` to the pipeline run (``resume/<stage>/``)
    whenever the trainer writes a new `last.pt` (polled every `interval` s, in a thread), so
    that a step whose worker dies resumes on another one. Use as a context manager."""

    def __init__(self, pipeline_run_id: str, stage: str, out_dir: str | Path, *, interval: float = 1.0):
        self.run_id, self.stage, self.out_dir, self.interval = pipeline_run_id, stage, Path(out_dir), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-mirror-{stage}", daemon=True)
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()  # sync() from the thread and from a caller: one upload per change
        self.uploads = 0
        self.error: str | None = None

    def __enter__(self) -> "CheckpointMirror":
        with contextlib.suppress(FileNotFoundError):  # a restored checkpoint is already in MLflow
            st = (self.out_dir / LAST).stat()
            self._seen = (st.st_mtime_ns, st.st_size)
        self._client = client()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # keep training; say why the mirror is behind
                if self.error is None:
                    print(f"handoff: could not mirror {self.out_dir}/last.pt to MLflow: {exc}", flush=True)
                self.error = str(exc)

    def sync(self) -> bool:
        """Upload the current last.pt if it changed since the last upload; True if uploaded."""
        with self._lock:
            try:
                st = (self.out_dir / LAST).stat()
            except FileNotFoundError:
                return False
            if self._seen == (st.st_mtime_ns, st.st_size):
                return False
            with tempfile.TemporaryDirectory(prefix="magicfuse-mirror-") as tmp:
                # last.pt is replaced atomically by the trainer: a copy is one whole checkpoint
                for name in (RECORD, LAST):
                    shutil.copyfile(self.out_dir / name, Path(tmp) / name)
                self._client.log_artifacts(self.run_id, tmp, artifact_path=f"{RESUME}/{self.stage}")
            self._seen = (st.st_mtime_ns, st.st_size)
            self.uploads += 1
            return True


@contextlib.contextmanager
def mirrored(pipeline_run_id: str | None, stage: str, out_dir: str | Path | None) -> Iterator[CheckpointMirror | None]:
    """`CheckpointMirror` when there is a pipeline run and an output folder, else nothing."""
    if pipeline_run_id is None or out_dir is None:
        yield None
        return
    with CheckpointMirror(pipeline_run_id, stage, out_dir) as mirror:
        yield mirror

