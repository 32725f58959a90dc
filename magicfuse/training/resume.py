"""Training output folders kept between runs, so that an interrupted stage resumes.

DVC deletes a stage's outputs before it runs the stage again, which would throw away
`last.pt`; the training outputs are therefore `persist: true` in dvc.yaml, and this module
decides, when a training stage starts, whether what is in its folder may be resumed:

* the folder holds an *interrupted* run (no completion mark) of the same stage with the same
  training configuration (fields that do not change the maths aside, `loop.RESUMABLE_CHANGES`)
  and the same input files (upstream checkpoints, shard manifests): it is kept, and the
  trainer resumes from `last.pt`;
* anything else (a finished run that DVC reruns because something changed, other inputs,
  another configuration, an unrecorded folder): the folder is emptied and training starts over.

The record is `<out_dir>/.stage.json` (written atomically; no timestamps, so the folder's DVC
hash depends only on what was trained).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from magicfuse.io import read_json_object, sha256_file, write_json_atomic
from magicfuse.training.loop import LAST, RESUMABLE_CHANGES

RECORD = ".stage.json"

__all__ = ["RECORD", "fingerprint", "prepare_out_dir", "mark_complete"]


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Iterable[str | Path]) -> dict[str, Any]:
    """What a resumable run must share with the current one: stage, the training configuration
    that changes the maths, and the sha256 of every input file that exists."""
    files = {str(p): sha256_file(p) for p in map(Path, inputs) if Path(p).is_file()}
    conf = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"stage": stage, "config": conf, "inputs": files}, sort_keys=True, default=str))


def prepare_out_dir(out_dir: str | Path, stage: str, config: Mapping[str, Any],
                    inputs: Iterable[str | Path]) -> str:
    """Keep `out_dir` for resuming or empty it (see the module docstring), then record the
    current run as started. Returns "resume", "fresh" or "start over", and says which."""
    out_dir = Path(out_dir)
    current = fingerprint(stage, config, inputs)
    decision = "fresh"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        record = read_json_object(out_dir / RECORD)
        if record is None:
            why = "no record of the run that wrote it"
        elif record.get("complete"):
            why = "it holds a finished run"
        elif record.get("fingerprint") != current:
            why = "its run had another configuration or other inputs"
        elif not (out_dir / LAST).is_file():
            why = f"its interrupted run wrote no {LAST} yet"
        else:
            why = ""
        if why:
            print(f"{stage}: starting over in {out_dir} ({why})", flush=True)
            shutil.rmtree(out_dir)
            decision = "start over"
        else:
            print(f"{stage}: resuming the interrupted run from {out_dir / LAST}", flush=True)
            decision = "resume"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RECORD, {"fingerprint": current, "complete": False})
    return decision


def mark_complete(out_dir: str | Path) -> None:
    """Record the run in `out_dir` as finished: a later start empties the folder."""
    path = Path(out_dir) / RECORD
    record = read_json_object(path) or {}
    write_json_atomic(path, {**record, "complete": True})
