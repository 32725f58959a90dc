"""Checkpoints (atomic, self-describing, checked) and the importer of the authors' checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import need_shared
from magicfuse.checkpoint import (
    load_checkpoint,
    load_model,
    load_pipeline,
    save_checkpoint,
    save_model,
    save_pipeline,
    validate_state_dict,
)
from magicfuse.cli import main as cli_main
from magicfuse.diffusion.settings import NoiseSchedule, SamplerSettings
from magicfuse.errors import CheckpointError, ConfigError
from magicfuse.models import AutoEncoder, ConditionalUNet, FusionNet, build_model
from magicfuse.models.importer import import_official

torch.set_num_threads(2)


def layout_state_dict(section, seed=0):
    """Random tensors with exactly the authors' names and shapes."""
    spec = json.loads(need_shared("weights", "official_layout.json").read_text())[section]["tensors"]
    sizes = [int(torch.Size(shape).numel()) for shape in spec.values()]
    flat = torch.empty(sum(sizes)).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(seed))
    return {k: t.view(shape) for (k, shape), t in zip(spec.items(), flat.split(sizes))}


def fusion_inputs(b=1, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, 8, h, w, generator=g) for _ in range(5)], torch.randn(b, 9, h, w, generator=g)


# -- our own checkpoints -----------------------------------------------------------------------

def test_save_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_model("fusion", "fusion-tiny").eval()
    path = save_model(tmp_path / "f.pt", net, "fusion", step=12, note="hello")
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]  # no temporary files left
    loaded, payload = load_model(path)
    assert isinstance(loaded, FusionNet) and not loaded.training
    assert payload["format"] == "magicfuse" and payload["version"] == 1 and payload["kind"] == "fusion"
    assert payload["step"] == 12 and payload["note"] == "hello"
    assert payload["config"]["channels"] == 32
    assert all(p.requires_grad for p in loaded.parameters())
    (zp, zf_, zf, ep, ef), seg = fusion_inputs()
    with torch.no_grad():
        a = net(zp, zf_, zf, ep, ef, 40, seg)
        b = loaded(zp, zf_, zf, ep, ef, 40, seg)
    assert torch.equal(a.w, b.w) and torch.equal(a.seg_logits, b.seg_logits)
    with pytest.raises(CheckpointError, match="not 'unet'"):
        save_model(tmp_path / "g.pt", net, "unet")


def test_wrong_kind_is_named(tmp_path):
    save_model(tmp_path / "ae.pt", AutoEncoder())
    with pytest.raises(CheckpointError, match=r"ae\.pt: this is a 'ae' checkpoint, expected 'fusion'"):
        load_checkpoint(tmp_path / "ae.pt", kind="fusion")
    with pytest.raises(CheckpointError, match="expected 'unet'"):
        load_model(tmp_path / "ae.pt", kind="unet")
    save_checkpoint(tmp_path / "state.pt", {"kind": "train-state", "step": 3})
    with pytest.raises(CheckpointError, match="'train-state' checkpoint"):
        load_model(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="kind 'weights'"):
        save_checkpoint(tmp_path / "x.pt", {"kind": "weights"})


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable torch checkpoint"):
        load_checkpoint(text)
    good = save_model(tmp_path / "good.pt", build_model("unet", "ikr-tiny"))
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: not a readable torch checkpoint"):
        load_checkpoint(trunc)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict checkpoint, found a list"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save(build_model("unet", "ikr-tiny").state_dict(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"raw\.pt: not a MagicFuse checkpoint.*import-official"):
        load_checkpoint(tmp_path / "raw.pt")
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    payload["version"] = 1
    payload["state_dict"]["out.2.weight"] = torch.zeros(8, 16, 3, 1)
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape\.pt: .*shape mismatch 1: out\.2\.weight"):
        load_model(tmp_path / "shape.pt")


def test_pipeline_round_trip(tmp_path):
    torch.manual_seed(0)
    nets = dict(ae=AutoEncoder(), ikr=build_model("unet", "ikr-tiny"), ckg=build_model("unet", "ckg-tiny"),
                fusion=build_model("fusion", "fusion-tiny"))
    sampler = {"steps": 20, "tau": 0.3, "thermal_classes": [1, 2],
               "schedule": {"num_train_steps": 500, "beta_start": 0.001, "beta_end": 0.02}}
    path = save_pipeline(tmp_path / "p.pt", **nets, sampler=sampler, profile="tiny")
    modules, payload = load_pipeline(path)
    assert sorted(modules) == ["ae", "ckg", "fusion", "ikr"]
    # the settings round-trip as SamplerSettings (the variant and z_T scale are filled in with their defaults)
    assert payload["sampler"] == {**sampler, "variant": "full", "init_noise_scale": 1.0} and payload["profile"] == "tiny"
    assert SamplerSettings.from_mapping(payload["sampler"]).schedule == NoiseSchedule(500, 0.001, 0.02)
    assert set(payload["models"]["ikr"]) == {"kind", "config", "state_dict"}
    for name, net in nets.items():
        a, b = net.state_dict(), modules[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a misspelt setting is refused when saving, and a file carrying one is refused when loading
    with pytest.raises(ConfigError, match=r"unknown sampler setting\(s\) \['tua'\]"):
        save_pipeline(tmp_path / "bad.pt", **nets, sampler={**sampler, "tua": 0.4})
    raw = torch.load(path, weights_only=True)
    raw["sampler"]["steps"] = 0
    torch.save(raw, tmp_path / "bad_steps.pt")
    with pytest.raises(CheckpointError, match=r"bad_steps\.pt: sampler settings.*steps must be an integer >= 1"):
        load_pipeline(tmp_path / "bad_steps.pt")
    with pytest.raises(CheckpointError, match="'pipeline' checkpoint"):
        load_model(path)
    with pytest.raises(CheckpointError, match="'ikr' must be a 'unet'"):
        save_pipeline(tmp_path / "q.pt", nets["ae"], nets["fusion"], nets["ckg"], nets["fusion"], sampler=sampler)


# -- the importer ----------------------------------------------------------------------------

@pytest.mark.needs_shared
def test_import_real_autoencoder(tmp_path):
    src = need_shared("weights", "official_ae.pth")
    written = import_official(ae=src, out=tmp_path / "conv")
    assert written == [tmp_path / "conv" / "ae.pt"]
    ae, payload = load_model(written[0], kind="ae")
    assert payload["source"] == "official" and payload["imported_from"] == str(src)
    official = torch.load(src, weights_only=True)
    for part in ("encoder", "decoder"):
        ours = getattr(ae, part).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in official[part].items())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y = ae.decode(ae.encode(x, generator=torch.Generator().manual_seed(0)))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1


@pytest.mark.needs_shared
def test_import_ikr_layout_with_wrappers(tmp_path):
    sd = layout_state_dict("ikr_unet")
    wrapped = {"state_dict": {f"model.diffusion_model.{k}": v for k, v in sd.items()},
               "global_step": 7}  # LDM-style file
    torch.save(wrapped, tmp_path / "ikr.ckpt")
    (path,) = import_official(ikr=tmp_path / "ikr.ckpt", out=tmp_path / "conv")
    net, payload = load_model(path, kind="unet")
    assert payload["config"]["model_channels"] == 64
    with torch.device("meta"):
        ref = ConditionalUNet(build_model("unet", "ikr-paper").config)
    ref.load_state_dict(sd, strict=True, assign=True)
    z, cond = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        out = net(z, torch.tensor([520]), cond)
        assert torch.equal(out, ref.eval()(z, torch.tensor([520]), cond))
    assert out.abs().sum() > 0


@pytest.mark.needs_shared
def test_import_fusion_layout_with_module_prefix(tmp_path):
    sd = layout_state_dict("fusion", seed=1)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "mkf.pth")
    (path,) = import_official(mkf=tmp_path / "mkf.pth", out=tmp_path / "conv")
    assert path.name == "fusion.pt"
    net, _ = load_model(path, kind="fusion")
    (zp, zf_, zf, ep, ef), seg = fusion_inputs()
    with torch.no_grad():
        out = net(zp, zf_, zf, ep, ef, torch.tensor([960]), seg)
    assert out.w.shape == (1, 8, 4, 6) and out.seg_logits.shape == (1, 9, 4, 6)
    assert torch.equal(net.segproj[9].weight, sd["segproj.9.weight"])


@pytest.mark.needs_shared
def test_ckg_layout_names_and_shapes_validate_on_meta():
    spec = json.loads(need_shared("weights", "official_layout.json").read_text())["ckg_unet"]["tensors"]
    with torch.device("meta"):
        skeleton = build_model("unet", "ckg-paper")
        sd = {k: torch.empty(shape) for k, shape in spec.items()}
    validate_state_dict(skeleton, sd, "ckg.pth")  # exact fit: no error
    skeleton.load_state_dict(sd, strict=True, assign=True)
    bad = dict(sd)
    del bad["middle_block.1.proj_in.weight"]
    bad["input_blocks.1.0.in_layers.2.weight"] = torch.empty(256, 256, 3, 1, device="meta")
    bad["extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError) as err:
        validate_state_dict(skeleton, bad, "ckg.pth")
    msg = str(err.value)
    assert msg.startswith("ckg.pth: ")
    assert "missing 1: middle_block.1.proj_in.weight" in msg
    assert "unexpected 1: extra.weight" in msg
    assert "shape mismatch 1: input_blocks.1.0.in_layers.2.weight" in msg


@pytest.mark.needs_shared
def test_import_mismatch_names_file_and_keys(tmp_path):
    sd = layout_state_dict("fusion")
    sd["estimate.1.weight"] = torch.zeros(8, 96, 1, 1)
    torch.save(sd, tmp_path / "bad_mkf.pth")
    with pytest.raises(CheckpointError, match=r"bad_mkf\.pth \(fusion\).*estimate\.1\.weight"):
        import_official(mkf=tmp_path / "bad_mkf.pth", out=tmp_path / "conv")
    sd["estimate.1.weight"] = torch.zeros(8, 96, 3, 3)
    sd["normout.bias"] = torch.tensor([0.0] * 7 + [float("nan")])
    torch.save(sd, tmp_path / "nan_mkf.pth")
    with pytest.raises(CheckpointError, match=r"nan_mkf\.pth \(fusion\): tensor normout\.bias holds NaN"):
        import_official(mkf=tmp_path / "nan_mkf.pth", out=tmp_path / "conv")
    # the AE file given as a UNet: no state dict where one is expected
    with pytest.raises(CheckpointError, match=r"official_ae\.pth \(ikr\)"):
        import_official(ikr=need_shared("weights", "official_ae.pth"), out=tmp_path / "conv")
    assert not (tmp_path / "conv").exists()  # nothing written on failure


def test_import_bundle_with_tiny_presets_and_cli(tmp_path, capsys):
    torch.manual_seed(0)
    ae = AutoEncoder()
    torch.save({"encoder": ae.encoder.state_dict(), "decoder": ae.decoder.state_dict()}, tmp_path / "ae.pth")
    torch.save(build_model("unet", "ikr-tiny").state_dict(), tmp_path / "ikr.pth")
    torch.save({"params_ema": build_model("unet", "ckg-tiny").state_dict()}, tmp_path / "ckg.pth")
    fusion = build_model("fusion", "fusion-tiny")
    torch.save(fusion.state_dict(), tmp_path / "mkf.pth")
    files = dict(ae=tmp_path / "ae.pth", ikr=tmp_path / "ikr.pth", ckg=tmp_path / "ckg.pth", mkf=tmp_path / "mkf.pth")
    presets = {"ikr": "ikr-tiny", "ckg": "ckg-tiny", "fusion": "fusion-tiny"}
    (path,) = import_official(**files, out=tmp_path / "bundle.pt", presets=presets)
    modules, payload = load_pipeline(path)
    assert payload["sampler"]["tau"] == 0.4 and payload["sampler"]["thermal_classes"] == [2]
    assert payload["sampler"]["steps"] == 25
    assert torch.equal(modules["fusion"].estimate[1].weight, fusion.estimate[1].weight)
    with pytest.raises(CheckpointError, match="needs all four"):
        import_official(ae=files["ae"], out=tmp_path / "b2.pt", bundle=True)

    # the CLI: paper presets, so the tiny UNet does not fit and the error names the file
    assert cli_main(["import-official", "--ae", str(files["ae"]), "-o", str(tmp_path / "cli")]) == 0
    assert f"wrote {tmp_path / 'cli' / 'ae.pt'}" in capsys.readouterr().out
    assert cli_main(["import-official", "--ikr", str(files["ikr"]), "-o", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "ikr.pth (ikr)" in err and "missing" in err


def test_unsafe_pickle_needs_opt_in(tmp_path):
    class Box:  # an arbitrary Python object inside the file
        pass

    import sys

    mod = sys.modules[__name__]
    mod.Box = Box
    Box.__module__ = __name__
    Box.__qualname__ = "Box"
    torch.save({"state_dict": build_model("unet", "ikr-tiny").state_dict(), "meta": Box()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"pickled\.pth: cannot be read safely.*--allow-pickle"):
        import_official(ikr=tmp_path / "pickled.pth", out=tmp_path / "o", presets={"ikr": "ikr-tiny"})
    (path,) = import_official(ikr=tmp_path / "pickled.pth", out=tmp_path / "o", presets={"ikr": "ikr-tiny"},
                              allow_pickle=True)
    assert load_model(path)[1]["config"]["model_channels"] == 16
