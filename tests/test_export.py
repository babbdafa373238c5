"""ONNX export and ONNX Runtime int8 on quick-profile checkpoints trained on the real sample
(a transformer, vit, and a 1-D CNN, resnet1d_wang)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_module
from shared.runs import load_run
from shared.cache import open_cache
from shared.dataset import ECGDataset
from shared.formats.onnx_model import OnnxModel
from shared.inputs import InputAdapter

def _export(run, sample_cache, base):
    proc = run_module("compression.export_onnx", "--run", run, "--data", sample_cache, "--out", base / "compressed",
                      "--calibration-batches", "1", check=True)
    return run, base / "compressed" / run.name, proc


@pytest.fixture(scope="module")
def exported_vit(quick_vit_run, sample_cache, tmp_path_factory):
    return _export(quick_vit_run, sample_cache, tmp_path_factory.mktemp("export-vit"))


@pytest.fixture(scope="module")
def exported_cnn(quick_resnet_run, sample_cache, tmp_path_factory):
    return _export(quick_resnet_run, sample_cache, tmp_path_factory.mktemp("export-cnn"))


@pytest.fixture(params=["exported_vit", "exported_cnn"])
def exported(request):
    """(training run, its variant root, the export's CompletedProcess) for a transformer and a 1-D CNN."""
    return request.getfixturevalue(request.param)


def _inputs(sample_cache, cfg, n=16):
    cache = open_cache(sample_cache)
    x, _ = ECGDataset(cache, "val").__getitems__(range(n))
    return InputAdapter(cfg, cache.sampling_rate).eval_inputs(x)[0]


def test_fp32_onnx_matches_pytorch_on_real_batches(exported, sample_cache):
    run, root, _ = exported
    model, cfg = load_run(run)
    x = _inputs(sample_cache, cfg)
    onnx_fp32 = OnnxModel(root / "onnx_fp32" / "model.onnx")
    with torch.no_grad():
        for part in (x, x[:1], x[:5]):  # the batch axis is dynamic
            torch.testing.assert_close(onnx_fp32(part), model(part), atol=1e-4, rtol=1e-4)
    info = json.loads((root / "onnx_fp32" / "variant.json").read_text())
    assert info["method"] == "onnx_fp32" and info["run"] == str(run.resolve()) and info["model"] == cfg["model"]
    assert info["export"].startswith("torch.onnx.export(dynamo=")
    metrics = json.loads((root / "onnx_fp32" / "metrics.json").read_text())
    assert metrics["max_abs_diff_vs_torch"] < 1e-4
    run_val = json.loads((run / "metrics.json").read_text())["val"]["macro_auc"]
    assert metrics["val"]["macro_auc"] == pytest.approx(run_val, abs=1e-4)
    # the session follows torch's thread count unless pinned
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        onnx_fp32(x[:2])
        assert (1, None) in onnx_fp32.programs
    finally:
        torch.set_num_threads(n)


def test_int8_onnx_is_close_to_fp32_and_smaller(exported, sample_cache):
    run, root, _ = exported
    _, cfg = load_run(run)
    x = _inputs(sample_cache, cfg)
    p32 = torch.sigmoid(OnnxModel(root / "onnx_fp32" / "model.onnx")(x))
    p8 = torch.sigmoid(OnnxModel(root / "onnx_int8" / "model.onnx")(x))
    assert (p8 - p32).abs().max() < 0.1
    info = json.loads((root / "onnx_int8" / "variant.json").read_text())
    assert info["method"] == "onnx_int8" and info["per_channel"] and info["fp32_nodes"]["stem"]
    # auto: a CNN gets calibrated static QDQ, a transformer (only MatMuls to quantize) dynamic int8
    if cfg["model"] == "vit":
        assert info["mode"] == "dynamic" and info["fp32_nodes"]["activation_matmuls"]
    else:
        assert info["mode"] == "static" and info["format"] == "QDQ" and info["calibration_split"] == "train"
        assert info["calibration_batches"] == 1 and info["calibration_windows"] > 0
    metrics = json.loads((root / "onnx_int8" / "metrics.json").read_text())
    assert 0 < metrics["val"]["macro_auc"] <= 1 and metrics["max_abs_diff_vs_torch"] < 0.1
    assert metrics["artifact_bytes"] == (root / "onnx_int8" / "model.onnx").stat().st_size
    assert metrics["artifact_bytes"] < 0.5 * (root / "onnx_fp32" / "model.onnx").stat().st_size
    assert metrics["artifact_bytes"] < 0.5 * metrics["fp32_bytes"]


def test_static_qdq_forced_on_transformer(exported_vit, sample_cache, tmp_path):
    """--int8 static on vit: the QDQ path (calibrated on training records) also stays close to fp32."""
    from compression.export_onnx import quantize_int8

    run, root, _ = exported_vit
    _, cfg = load_run(run)
    cache = open_cache(sample_cache)
    adapter = InputAdapter(cfg, cache.sampling_rate)
    info = quantize_int8(root / "onnx_fp32" / "model.onnx", tmp_path / "qdq.onnx", cache, adapter, cfg, 1,
                         mode="static")
    assert info["mode"] == "static" and info["format"] == "QDQ" and info["calibration_windows"] > 0
    x = _inputs(sample_cache, cfg)
    p32 = torch.sigmoid(OnnxModel(root / "onnx_fp32" / "model.onnx")(x))
    assert (torch.sigmoid(OnnxModel(tmp_path / "qdq.onnx")(x)) - p32).abs().max() < 0.1
    assert (tmp_path / "qdq.onnx").stat().st_size < 0.5 * (root / "onnx_fp32" / "model.onnx").stat().st_size


def test_variants_load_in_fresh_process_and_match(exported, sample_cache, tmp_path):
    run, root, _ = exported
    _, cfg = load_run(run)
    x = _inputs(sample_cache, cfg, n=4)
    np.save(tmp_path / "x.npy", x.numpy())
    code = (f"import sys, numpy as np, torch;"
            f"from shared.variants import load_variant;"
            f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}));"
            f"outs = {{}};\n"
            f"for v in ('onnx_fp32', 'onnx_int8'):\n"
            f"    m, cfg, info = load_variant({str(root)!r} + '/' + v); assert info['method'] == v\n"
            f"    outs[v] = m.eval()(x).numpy()\n"
            f"np.savez({str(tmp_path / 'y.npz')!r}, **outs)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    y = np.load(tmp_path / "y.npz")
    for v in ("onnx_fp32", "onnx_int8"):
        np.testing.assert_allclose(y[v], OnnxModel(root / v / "model.onnx")(x).numpy(), atol=1e-5)


def test_rerun_skips_finished_variants(exported, sample_cache):
    run, root, _ = exported
    mtimes = {v: (root / v / "model.onnx").stat().st_mtime_ns for v in ("onnx_fp32", "onnx_int8")}
    again = run_module("compression.export_onnx", "--run", run, "--data", sample_cache, "--out", root.parent, check=True)
    assert again.stdout.count("done already") == 2
    assert mtimes == {v: (root / v / "model.onnx").stat().st_mtime_ns for v in mtimes}


def test_best_picks_highest_val_auc(tmp_path):
    from compression.export_onnx import best_run

    for name, auc in (("a-leads-cpu", 0.8), ("b-rows-cpu", 0.9), ("c-rows-quick", 0.99), ("d-rows-cpu", None)):
        run = tmp_path / name
        run.mkdir()
        (run / "best.safetensors").write_bytes(b"")
        if auc is not None:
            (run / "metrics.json").write_text(json.dumps({"val": {"macro_auc": auc}}))
    assert best_run("cpu", tmp_path).name == "b-rows-cpu"
    assert best_run("quick", tmp_path).name == "c-rows-quick"
    with pytest.raises(FileNotFoundError):
        best_run("full", tmp_path)
