"""`pretrained = "/path/to/file"`: ImageNet-style weights from a local file, for networks without the Hugging Face
hub. Loads exactly into the same architecture, adapts (not re-initialises) into the ECG layouts, never touches
the network, and a missing, damaged or pickled-object file is one line. Random-init timm models stand in for the
downloaded weights: the loading path is the same and nothing is fetched."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from conftest import REPO, run_module
from models import tune
from shared import config as config_mod
from shared.nets import PretrainedFileError, build_model

VIT_KW = dict(timm_kwargs={"global_pool": "avg", "depth": 6})  # models/configs/vit.toml's cut-down vit


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: the hub is switched off and any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access while loading a local weights file: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def save(path: Path, model: torch.nn.Module) -> dict:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "epoch": 3}, path)  # the usual training-checkpoint wrapping
    return tensors


def imagenet(arch: str, path: Path) -> dict:
    """A stand-in for downloaded ImageNet weights: the architecture as timm publishes it (3 channels, 224 px,
    1000 classes), randomly initialised, saved to `path`."""
    torch.manual_seed(0)
    return save(path, timm.create_model(arch, pretrained=False))


def one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrained weights from")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name,rep,n,suffix,kw", [
    ("vit", "leads", 200, ".safetensors", VIT_KW),
    ("deit", "leads", 250, ".pth", {}),
    ("effnetv2", "rows", 250, ".pth", {}),
    ("convnext", "rows", 250, ".safetensors", {}),
])
def test_weights_of_the_same_architecture_load_exactly(name, rep, n, suffix, kw, tmp_path, capsys):
    torch.manual_seed(1)
    path = tmp_path / f"{name}{suffix}"
    source = save(path, build_model(name, rep, n, **kw))  # same layout, same 5 classes: nothing to adapt
    torch.manual_seed(2)
    model = build_model(name, rep, n, pretrained=str(path), **kw)
    state = model.state_dict()
    assert state.keys() == source.keys()
    assert all(torch.equal(state[k], source[k]) for k in state)  # the head too: the file has 5 classes
    line = one_line(capsys)
    assert f"{len(state)}/{len(state)} tensors copied as they are" in line and "kept (5 classes)" in line


def test_imagenet_vit_is_adapted_to_the_leads_plane(tmp_path, capsys):
    path = tmp_path / "vit_tiny.safetensors"
    src = imagenet("vit_tiny_patch16_224", path)
    model = build_model("vit", "leads", 250, pretrained=str(path), **VIT_KW)  # 1×12×250, patches 12×10
    state = model.state_dict()
    assert model.patch_embed.grid_size == (1, 25) and state["pos_embed"].shape == (1, 26, 192)
    # patch embedding: resampled to 12x10 (timm's pseudo-inverse resize), then summed over the 3 input channels
    expected = resample_patch_embed(src["patch_embed.proj.weight"], [12, 10]).sum(1, keepdim=True)
    assert state["patch_embed.proj.weight"].shape == (192, 1, 12, 10)
    assert torch.allclose(state["patch_embed.proj.weight"], expected, atol=1e-5)
    pos = resample_abs_pos_embed(src["pos_embed"], new_size=[1, 25], num_prefix_tokens=1)
    assert torch.allclose(state["pos_embed"], pos, atol=1e-6)
    assert torch.equal(state["pos_embed"][:, 0], src["pos_embed"][:, 0])  # the class token's own slot
    corr = torch.corrcoef(torch.stack([state["pos_embed"][0, 1:].flatten(), pos[0, 1:].flatten()]))[0, 1]
    assert corr > 0.999
    for k in ("cls_token", "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias"):  # 6 of the file's 12 blocks
        assert torch.equal(state[k], src[k])
    assert state["head.weight"].shape == (5, 192)
    line = one_line(capsys)
    assert line.startswith(f"pretrained weights from {path}: ")
    for part in ("patch_embed.proj 3→1 input channels summed, 16x16→12x10 kernel resampled",
                 "pos_embed resampled 14x14→1x25", "head re-initialised (1000→5 classes)",
                 "not in the file, initialised: fc_norm", "tensors of the file unused (blocks.6-11, norm)"):
        assert part in line, line


def test_imagenet_cnn_stems_are_adapted_to_one_and_twelve_channels(tmp_path, capsys):
    path = tmp_path / "effnetv2.pth"
    src = imagenet("tf_efficientnetv2_b0", path)
    rows = build_model("effnetv2", "rows", 250, pretrained=str(path)).state_dict()  # 1 channel: summed
    assert torch.equal(rows["conv_stem.weight"], src["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(rows["blocks.0.0.conv.weight"], src["blocks.0.0.conv.weight"])
    assert "conv_stem 3→1 input channels summed" in one_line(capsys)

    path = tmp_path / "convnext.safetensors"
    src = imagenet("convnext_atto", path)
    strip = build_model("convnext", "strip", 250, pretrained=str(path)).state_dict()  # 12 channels, middle row
    stem = src["stem.0.weight"].repeat(1, 4, 1, 1) * (3 / 12)
    assert torch.allclose(strip["stem.0.weight"], stem[:, :, 2:3, :], atol=1e-7)
    line = one_line(capsys)
    assert "stem.0 3→12 input channels repeated, scaled 3/12" in line and "middle row (strip)" in line
    assert "head.fc re-initialised (1000→5 classes)" in line


@pytest.mark.parametrize("name,arch,rep,n,expect", [
    ("deit", "deit_tiny_distilled_patch16_224", "leads", 250, "head, head_dist re-initialised (1000→5 classes)"),
    ("vit", "vit_tiny_patch16_224", "seed", 1000, "pos_embed resampled 14x14→13x16"),
    ("convnext", "convnext_atto", "rows", 250, "stem.0 3→1 input channels summed"),
])
def test_every_family_says_in_one_line_what_was_adapted(name, arch, rep, n, expect, tmp_path, capsys):
    path = tmp_path / f"{arch}.safetensors"
    imagenet(arch, path)
    build_model(name, rep, n, pretrained=str(path))
    assert expect in one_line(capsys)


def test_bad_files_are_refused_in_one_line(tmp_path):
    vit = tmp_path / "vit.safetensors"
    imagenet("vit_tiny_patch16_224", vit)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(vit.read_bytes()[: vit.stat().st_size // 2])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled object, not a state_dict
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"weights": Payload()}, tmp_path / "payload.pth")
    convnext = tmp_path / "convnext.safetensors"
    imagenet("convnext_atto", convnext)
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        truncated: "damaged or not a safetensors file",
        tmp_path / "module.pth": "refused — it holds pickled Python objects (torch.nn.modules.linear.Linear)",
        tmp_path / "payload.pth": "refused — it holds pickled Python objects",
        convnext: "weights of another architecture",  # convnext weights named as a vit's
    }
    (tmp_path / "empty.pth").write_bytes(b"")
    cases[tmp_path / "empty.pth"] = "damaged or not a PyTorch weights file"
    for path, problem in cases.items():
        with pytest.raises(PretrainedFileError) as e:
            build_model("vit", "leads", 250, pretrained=str(path), **VIT_KW)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg, msg
    assert not marker.exists()  # weights_only=True: the pickled call never ran
    cut = tmp_path / "strip_run.safetensors"  # a strip run's kernels are cut to one row: not timm's shapes
    save(cut, build_model("convnext", "strip", 250))
    with pytest.raises(PretrainedFileError, match=r"do not fit convnext_atto \(stem.0.weight is \[40, 12, 1, 4\] in "
                                                  r"the file, \[40, 12, 4, 4\] in the model"):
        build_model("convnext", "strip", 250, pretrained=str(cut))
    with pytest.raises(ValueError, match="1-D network"):
        config_mod.resolve("resnet1d_wang", "quick", overrides={"pretrained": str(vit)})
    with pytest.raises(ValueError, match="use false, true"):
        config_mod.resolve("vit", "quick", overrides={"pretrained": 3})


def test_train_with_a_weights_file_and_one_line_errors(sample_cache, tmp_path):
    path = tmp_path / "vit_tiny.safetensors"
    imagenet("vit_tiny_patch16_224", path)
    env = {"HF_HUB_OFFLINE": "1", "ARTIFACTS": str(tmp_path / "art")}
    common = ["--model", "vit", "--profile", "quick", "--data", sample_cache, "--no-progress", "--set", "threads=1",
              "--set", "epochs=1", "--set", "max_train_batches=2", "--set", "eval_stride_seconds=10"]
    # as `make ... SET='pretrained="/path"'` passes it after the shell has taken the quotes off, and quoted too
    for value in (str(path), json.dumps(str(path))):
        assert config_mod.parse_value(value) == str(path)
    out = tmp_path / "run"
    r = run_module("models.train", *common, "--out", out, "--set", f"pretrained={path}", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("pretrained weights from")]
    assert len(lines) == 1 and "pos_embed resampled 14x14→1x20" in lines[0], r.stdout[-2000:]
    assert json.loads((out / "config.json").read_text())["pretrained"] == str(path)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights at all")
    for target, problem in ((tmp_path / "missing.safetensors", "no such file"), (bad, "damaged")):
        r = run_module("models.train", *common, "--out", tmp_path / "refused", "--set", f"pretrained={target}",
                       env=env)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith(f"error: {target}: ") and problem in err, r.stderr[-2000:]
        assert "\n" not in err and not (tmp_path / "refused").exists()
    assert tune.main(["--model", "vit", "--trials", "1", "--set", f"pretrained={bad}"]) == 2


@pytest.mark.skipif(subprocess.run(["make", "--version"], capture_output=True).returncode != 0,
                    reason="GNU make is not installed")
def test_make_set_passes_a_quoted_path(tmp_path):
    """README: make train-vit REPR=seed SET='pretrained="/path/vit_tiny.safetensors"'."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_LOG"\n')
    fake.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()
    log = tmp_path / "args"
    weights = "/data/weights/vit_tiny.safetensors"
    r = subprocess.run(["make", "--no-print-directory", "train-vit", "REPR=seed", f"SET=pretrained=\"{weights}\"",
                        f"PYTHON={fake}", f"VENV_STAMP={stamp}", "NO_DATA=1", f"ARTIFACTS={tmp_path}"],
                       cwd=REPO, env={**os.environ, "ARGS_LOG": str(log)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = log.read_text().splitlines()
    value = args[args.index("--set") + 1]
    assert value == f"pretrained={weights}" and config_mod.parse_value(value.split("=", 1)[1]) == weights
    assert args[args.index("--representation") + 1] == "seed"


def test_hub_weights_without_the_internet_are_one_line(sample_cache, tmp_path):
    """pretrained = true needs the hub; offline, training stops in one line that points at the file option."""
    r = run_module("models.train", "--model", "vit", "--profile", "quick", "--data", sample_cache,
                   "--out", tmp_path / "run", "--no-progress", "--set", "pretrained=true",
                   env={"HF_HUB_OFFLINE": "1"})
    errors = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "pretrained = \"/path/to/file" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "metrics.json").exists()
