"""Trust boundaries: loading an artifact never runs code from it, and a model is scored with its own thresholds."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module
from shared.formats import compiled
from shared.formats.compiled import (COMPILED_FILE, COMPILED_STAMP, compiled_is_current, compiled_stamp, load_compiled,
                                     stamp_context)
from shared.formats.exported import load_program
from shared.io import sha256_file
from shared import trust
from shared.safe_pt2 import UnsafeArchive, check_archive
from shared.thresholds import read_thresholds, write_thresholds


# ------------------------------------------------------------------ crafted torch.export archives
class _Payload:
    """Unpickling it creates a folder: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _program_bytes() -> bytes:
    net = torch.nn.Sequential(torch.nn.Conv1d(12, 4, 3), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5))
    ep = torch.export.export(net.eval(), (torch.randn(2, 12, 50),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _rewrite(archive: bytes, edit) -> bytes:
    """A copy of the archive with edit(name, bytes) -> bytes (or None to drop) applied to each entry."""
    src, out = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = edit(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)
        for name, data in edit.extra.items() if hasattr(edit, "extra") else []:
            dst.writestr(name, data)
    return out.getvalue()


def _json_edit(suffix: str, change):
    def edit(name, data):
        return json.dumps(change(json.loads(data))).encode() if name.endswith(suffix) else data
    return edit


def _pickled_weight(marker):
    def change(cfg):
        cfg["config"][next(iter(cfg["config"]))]["use_pickle"] = True
        return cfg

    def edit(name, data):
        if name.endswith("weights_config.json"):
            return json.dumps(change(json.loads(data))).encode()
        if name.endswith("/data/weights/weight_0"):
            return pickle.dumps(_Payload(marker))
        return data
    return edit


def _opaque_constant(marker):
    def edit(name, data):
        if name.endswith("constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                                "tensor_meta": None}}}).encode()
        return data
    edit.extra = {"archive/data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))}
    return edit


def _sympy_expression(marker):
    def change(program):
        text = json.dumps(program).replace("Symbol('s", f"Max(__import__('os').mkdir('{marker}') or 1, Symbol('s", 1)
        head, sep, tail = text.partition("__import__")
        close = tail.index("True)") + len("True)")
        return json.loads(head + sep + tail[:close] + ")" + tail[close:])
    return _json_edit("models/model.json", change)


def _graph_target(marker):
    def change(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.mkdir"
        return program
    return _json_edit("models/model.json", change)


def _guards(marker):
    def change(program):
        program["guards_code"] = [f"__import__('os').mkdir('{marker}')"]
        return program
    return _json_edit("models/model.json", change)


def _sample_inputs(marker):
    def edit(name, data):
        if "/data/sample_inputs/" in name:
            buf = io.BytesIO()
            torch.save(_Payload(marker), buf)
            return buf.getvalue()
        return data
    return edit


CRAFTED = {"pickled weight": _pickled_weight, "opaque constant": _opaque_constant,
           "sympy expression": _sympy_expression, "graph target": _graph_target, "guards code": _guards,
           "sample inputs": _sample_inputs}


@pytest.fixture(scope="module")
def program() -> bytes:
    return _program_bytes()


def test_a_plain_exported_program_passes_the_check(program, tmp_path):
    (tmp_path / "model.pt2").write_bytes(program)
    check_archive(tmp_path / "model.pt2")
    assert load_program(tmp_path / "model.pt2").module()(torch.randn(3, 12, 50)).shape == (3, 5)


def test_the_pickled_weight_payload_really_runs_under_plain_torch_export_load(program, tmp_path):
    """Proof that the crafted file is a real attack: torch.export.load alone creates the marker."""
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    path.write_bytes(_rewrite(program, _pickled_weight(marker)))
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"], capture_output=True,
                   timeout=120, cwd=REPO)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_archives_are_refused_and_their_payload_never_runs(kind, program, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    path.write_bytes(_rewrite(program, CRAFTED[kind](marker)))
    with pytest.raises(UnsafeArchive, match="refused to load") as e:
        load_program(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_predict_refuses_a_crafted_static_variant_in_one_line(program, quick_resnet_run, sample_dir, tmp_path):
    marker = tmp_path / "ran"
    variant = tmp_path / "compressed" / "x" / "static"
    variant.mkdir(parents=True)
    (variant / "model.pt2").write_bytes(_rewrite(program, _pickled_weight(marker)))
    (variant / "variant.json").write_text(json.dumps({"method": "static", "artifact": "model.pt2",
                                                      "run": str(quick_resnet_run)}))
    record = sample_dir / "records100" / "00000" / "00001_lr"
    for module, args in (("eval.predict", [record, "--model", variant]),
                         ("eval.evaluate", ["--artifact", variant, "--data", sample_dir, "--ids", "1"])):
        r = run_module(module, *args, env={"ARTIFACTS": str(tmp_path)})
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and "refused to load" in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ compiled packages (native code)
def _fake_build(variant: Path, calls: list):
    def build(variant_dir, artifact="model.pt2"):
        calls.append("build")
        (variant_dir / COMPILED_FILE).write_bytes(b"package built here")
        stamp = compiled_stamp(variant_dir / artifact)
        sha = sha256_file(variant_dir / COMPILED_FILE)
        (variant_dir / COMPILED_STAMP).write_text(json.dumps(
            {**stamp, "package_sha256": sha, "hmac": trust.sign(sha, stamp_context(stamp))}))
        return variant_dir / COMPILED_FILE
    return build


def test_a_compiled_package_from_elsewhere_is_rebuilt_not_loaded(program, tmp_path, monkeypatch):
    variant = tmp_path / "static"
    variant.mkdir()
    (variant / "model.pt2").write_bytes(program)
    monkeypatch.setenv("PTBXL_KEY_DIR", str(tmp_path / "their-key"))  # the machine that shipped the folder
    calls, loaded = [], []
    _fake_build(variant, calls)(variant)
    assert compiled_is_current(variant)  # its own stamp matches, on its own machine
    monkeypatch.setenv("PTBXL_KEY_DIR", str(tmp_path / "our-key"))  # here: same stamp fields, another key
    assert not compiled_is_current(variant)
    monkeypatch.setattr(compiled, "build_compiled", _fake_build(variant, calls))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p: loaded.append(Path(p).read_bytes()))
    calls.clear()
    load_compiled(variant)
    assert calls == ["build"] and loaded == [b"package built here"]
    assert compiled_is_current(variant)  # rebuilt here, so trusted here
    (variant / COMPILED_FILE).write_bytes(b"swapped in later, same stamp")
    assert not compiled_is_current(variant)


def test_the_key_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("PTBXL_KEY_DIR", str(tmp_path / "k"))
    sig = trust.sign("abc", "ctx")
    assert trust.verify("abc", sig, "ctx") and not trust.verify("abd", sig, "ctx") and not trust.verify("abc", sig)
    assert (trust.key_path().stat().st_mode & 0o777) == 0o600


# ------------------------------------------------------------------ ONNX
def _onnx_file(path: Path, domain: str = "", external: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    if external:
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("float_data")
        w.external_data.add(key="location", value="../../../etc/passwd")
    node = helper.make_node("Add", ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_onnx_models_with_external_data_or_custom_operators_are_refused(tmp_path):
    from shared.formats.onnx_model import OnnxModel

    ok = OnnxModel(_onnx_file(tmp_path / "ok.onnx"), threads=1)
    assert ok(torch.zeros(2)).tolist() == [1.0, 2.0]
    for path, text in ((_onnx_file(tmp_path / "ext.onnx", external=True), "external file"),
                       (_onnx_file(tmp_path / "custom.onnx", domain="evil.ops"), "custom domain")):
        with pytest.raises(ValueError, match=text) as e:
            OnnxModel(path, threads=1)
        assert str(path) in str(e.value)


def test_safetensors_and_checkpoints_refuse_pickled_code(tmp_path):
    from shared.io import load_checkpoint, load_weights

    marker = tmp_path / "ran"
    torch.save({"state": _Payload(marker)}, tmp_path / "last.pt")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "best.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception):
        load_weights(tmp_path / "best.safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------ thresholds belong to the model
def _copy_run(run: Path, root: Path) -> Path:
    dst = root / "runs" / run.name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("thresholds*.json"))
    return dst


def _predict(record, run, artifacts):
    r = run_module("eval.predict", record, "--model", run, "--json", env={"ARTIFACTS": str(artifacts)})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout), r.stderr


def test_predict_uses_the_thresholds_stored_beside_the_model_it_loads(quick_resnet_run, sample_dir, tmp_path):
    a, b = _copy_run(quick_resnet_run, tmp_path / "a"), _copy_run(quick_resnet_run, tmp_path / "b")
    write_thresholds(a, [0.11] * 5, "validation fold of root a")
    write_thresholds(b, [0.93] * 5, "validation fold of root b")
    record = sample_dir / "records100" / "00000" / "00001_lr"
    out, _ = _predict(record, a, tmp_path / "b")  # ARTIFACTS names the other root: must not matter
    assert set(out["thresholds"].values()) == {0.11} and str(a) in out["threshold_source"]
    none = _copy_run(quick_resnet_run, tmp_path / "c")
    out, err = _predict(record, none, tmp_path / "a")
    assert set(out["thresholds"].values()) == {0.5} and "none tuned for this model yet" in out["threshold_source"]
    assert "none tuned for this model yet" in err


def test_thresholds_of_an_earlier_checkpoint_are_not_used(quick_resnet_run, tmp_path):
    run = _copy_run(quick_resnet_run, tmp_path)
    write_thresholds(run, [0.2] * 5, "validation")
    assert read_thresholds(run)[0] is not None
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "best.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, str(run / "best.safetensors"))  # a retrained model under the same name
    values, why = read_thresholds(run)
    assert values is None and "another version" in why


def test_predict_prints_every_good_record_and_one_line_per_bad_one(quick_resnet_run, sample_dir, tmp_path):
    good = [sample_dir / "records100" / "00000" / "00001_lr", sample_dir / "records100" / "00000" / "00002_lr"]
    bad = tmp_path / "nowhere" / "00009_lr"
    r = run_module("eval.predict", good[0], bad, good[1], "--model", quick_resnet_run,
                   env={"ARTIFACTS": str(tmp_path)})
    assert r.returncode == 2
    assert "00001_lr" in r.stdout and "00002_lr" in r.stdout and "00009_lr" not in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "00009_lr" in errors[0] and "1 of 3 records" in errors[1]
