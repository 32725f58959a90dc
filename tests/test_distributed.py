"""DDP on CPU (gloo): two torchrun processes train one denoiser and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from magicfuse.data.readers import PairSample
from magicfuse.data.shards import write_shards
from magicfuse.data.synthetic import generate_scene
from magicfuse.training import distributed as ddp

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from magicfuse.checkpoint import save_model
    from magicfuse.config import from_mapping
    from magicfuse.models import build_model
    from magicfuse.training import LDMTrainConfig, train_ldm
    from magicfuse.training import distributed as ddp

    shards, out = sys.argv[1], sys.argv[2]
    info = ddp.init_distributed("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    if info.is_main:
        torch.manual_seed(0)
        save_model(os.path.join(out, "ae.pt"), build_model("ae", "ae"))
    ddp.barrier()
    cfg = from_mapping(LDMTrainConfig, {"steps": 3, "batch_size": 2, "crop": 16, "device": "cpu",
                                        "progress": False, "eval_samples": 0, "log_every": 1,
                                        "ckpt_every": 2, "ema_decay": 0.9})
    res = train_ldm(cfg, branch="ckg", ae_checkpoint=os.path.join(out, "ae.pt"), shards_dir=shards,
                    out_dir=os.path.join(out, "run"))
    torch.save(res.model.state_dict(), os.path.join(out, f"rank{info.rank}.pt"))
    with open(os.path.join(out, f"rank{info.rank}.txt"), "w") as fh:
        fh.write(f"{res.final_metrics.get('images', -1)} {len(res.files)}")
    ddp.cleanup()
    """
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_single_process_helpers_are_noops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = ddp.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap_model(model, torch.device("cpu")) is model
    ddp.barrier()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(ddp.all_reduce_mean(t), t)
    assert ddp.any_rank(True, torch.device("cpu")) and not ddp.any_rank(False, torch.device("cpu"))
    assert ddp.resolve_device("cpu").type == "cpu"


def test_bad_torchrun_environment_is_a_clear_error(monkeypatch):
    from magicfuse.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        ddp.init_distributed("cpu")


def test_two_ranks_hold_identical_weights(tmp_path):
    shards = tmp_path / "shards"
    samples = []
    for i in range(8):
        sc = generate_scene(0, i, height=32, width=32)
        samples.append(PairSample(key=f"s{i}", visible=sc.visible, infrared=sc.infrared, label=sc.label,
                                  boxes=None, source="synthetic", split="train", paths={}))
    write_shards(samples, shards, split="train", cfg={"samples_per_shard": 2})
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(shards), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    torch.manual_seed(0)  # the trainer builds the UNet under seeded(cfg.seed = 0)
    from magicfuse.models import build_model
    from magicfuse.training.loop import seeded

    with seeded(0):
        init = build_model("unet", "ckg-tiny").state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # the weights did train
    # rank 0 wrote the checkpoint; rank 1 wrote nothing; images count both ranks' batches
    img0, files0 = (tmp_path / "rank0.txt").read_text().split()
    _, files1 = (tmp_path / "rank1.txt").read_text().split()
    assert (files0, files1) == ("1", "0") and float(img0) == 3 * 2 * 2
    assert (tmp_path / "run" / "ckg.pt").exists() and (tmp_path / "run" / "last.pt").exists()
