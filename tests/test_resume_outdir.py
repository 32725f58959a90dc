"""magicfuse.training.resume: which training folders a rerun resumes and which it empties
(DVC keeps them between runs: `persist: true`)."""

from __future__ import annotations

from magicfuse.training.resume import RECORD, mark_complete, prepare_out_dir

CFG = {"steps": 24, "lr": 0.002, "seed": 0, "log_every": 4, "device": "cpu"}


def _interrupted(out, inputs, cfg=CFG):
    assert prepare_out_dir(out, "train_ikr", cfg, inputs) in ("fresh", "start over")
    (out / "last.pt").write_bytes(b"state")
    return out


def test_an_interrupted_run_with_the_same_inputs_is_kept(tmp_path, capsys):
    ae = tmp_path / "ae.pt"
    ae.write_bytes(b"ae")
    out = _interrupted(tmp_path / "ikr", [ae])
    # steps/log_every/device may change between a run and its resumption (loop.RESUMABLE_CHANGES)
    assert prepare_out_dir(out, "train_ikr", {**CFG, "steps": 48, "device": "cuda"}, [ae]) == "resume"
    assert (out / "last.pt").read_bytes() == b"state"
    assert "resuming the interrupted run" in capsys.readouterr().out


def test_a_finished_run_other_inputs_or_config_start_over(tmp_path, capsys):
    ae = tmp_path / "ae.pt"
    ae.write_bytes(b"ae")
    out = _interrupted(tmp_path / "a", [ae])
    mark_complete(out)
    assert prepare_out_dir(out, "train_ikr", CFG, [ae]) == "start over"
    assert sorted(p.name for p in out.iterdir()) == [RECORD]
    assert "it holds a finished run" in capsys.readouterr().out

    out = _interrupted(tmp_path / "b", [ae])
    ae.write_bytes(b"another autoencoder")
    assert prepare_out_dir(out, "train_ikr", CFG, [ae]) == "start over"
    assert not (out / "last.pt").exists()

    out = _interrupted(tmp_path / "c", [ae])
    assert prepare_out_dir(out, "train_ikr", {**CFG, "lr": 0.001}, [ae]) == "start over"

    out = tmp_path / "d"  # a folder no stage recorded
    out.mkdir()
    (out / "last.pt").write_bytes(b"?")
    assert prepare_out_dir(out, "train_ikr", CFG, [ae]) == "start over"
    assert "no record of the run" in capsys.readouterr().out
    assert prepare_out_dir(tmp_path / "e", "train_ikr", CFG, [ae]) == "fresh"
