"""Compression on quick-profile checkpoints trained on the real sample."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_module
from shared.formats.compiled import COMPILED_FILE, COMPILED_STAMP, compiled_is_current, load_compiled
from shared.formats.dynamic_int8 import load_dynamic, quantize_dynamic, save_dynamic
from shared.formats.exported import inference_ready, save_exported
from shared.hardware import host_cpu, native_bf16
from shared.runs import build_from_config, checkpoint_sha256, load_run
from shared.variants import load_variant, variant_is_current
from shared.cache import open_cache
from shared.dataset import ECGDataset
from shared.inputs import InputAdapter


@pytest.fixture(scope="module")
def quick_run(quick_vit_run):
    return quick_vit_run


def _batch(sample_cache, cfg, n=16):
    cache = open_cache(sample_cache)
    x, _ = ECGDataset(cache, "val").__getitems__(range(n))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    return cache, adapter, adapter.eval_inputs(x)[0][:n]


def forward_in_fresh_process(load_expression: str, x: torch.Tensor, tmp_path) -> np.ndarray:
    """The output for x of `load_expression` (load_compiled, load_exported and Path in scope) in a new interpreter."""
    np.save(tmp_path / "x.npy", x.numpy())
    code = (f"import sys, numpy as np, torch; from pathlib import Path;"
            f"from shared.formats.compiled import load_compiled; from shared.formats.exported import load_exported; m = {load_expression};"
            f"np.save({str(tmp_path / 'y.npy')!r}, m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).detach().numpy())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(tmp_path / "y.npy")


def test_prune_cli_sparsity_and_reload_keeps_zeros(quick_run, sample_cache, tmp_path):
    r = run_module("compression.compress", "--run", quick_run, "--data", sample_cache, "--out", tmp_path,
                   "--methods", "prune,dynamic")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / quick_run.name / "prune" / "variant.json").read_text())
    assert info["sparsity_in_pruned_layers"] == pytest.approx(0.4, abs=1e-3)
    model, cfg, _ = load_variant(tmp_path / quick_run.name / "prune")
    from torch import nn
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert zeros / total == pytest.approx(0.4, abs=1e-3)  # zeros survive save → load
    sparse = (tmp_path / quick_run.name / "prune" / "sparse.safetensors").stat().st_size
    assert sparse < 0.8 * info["dense_bytes"]
    m = json.loads((tmp_path / quick_run.name / "prune" / "metrics.json").read_text())
    assert 0 < m["val"]["macro_auc"] <= 1
    # a finished variant is not redone
    again = run_module("compression.compress", "--run", quick_run, "--data", sample_cache, "--out", tmp_path,
                       "--methods", "prune")
    assert "done already" in again.stdout


def test_dynamic_artifact_matches_in_memory_and_fp32(quick_run, sample_cache, tmp_path):
    fp32, cfg = load_run(quick_run)
    _, _, x = _batch(sample_cache, cfg)
    q = quantize_dynamic(load_run(quick_run)[0])
    save_dynamic(tmp_path / "int8.safetensors", q)
    loaded = load_dynamic(tmp_path / "int8.safetensors", build_from_config(cfg))
    with torch.no_grad():
        a, b, ref = q(x), loaded(x), fp32(x)
    torch.testing.assert_close(a, b)
    assert (torch.sigmoid(a) - torch.sigmoid(ref)).abs().max() < 0.05
    assert (tmp_path / "int8.safetensors").stat().st_size < 0.5 * (quick_run / "best.safetensors").stat().st_size


@pytest.mark.parametrize("method", ["static", "qat"])
def test_int8_pt2_loads_in_fresh_process_and_matches(method, quick_run, sample_cache, tmp_path):
    from compression.compress import do_qat, do_static

    model, cfg = load_run(quick_run)
    cache, adapter, x = _batch(sample_cache, cfg)
    out = tmp_path / method
    out.mkdir()
    info, converted = (do_static if method == "static" else do_qat)(model, cfg, cache, adapter, out, quick=True)
    inference_ready(converted)
    with torch.no_grad():
        in_memory = converted(x)
        fp32 = load_run(quick_run)[0](x)
    assert (torch.sigmoid(in_memory) - torch.sigmoid(fp32)).abs().max() < (0.05 if method == "static" else 0.2)
    fresh = forward_in_fresh_process(f"load_exported(Path({str(out / 'model.pt2')!r}))", x, tmp_path)
    np.testing.assert_allclose(fresh, in_memory.numpy(), atol=1e-5)
    assert (out / "model.pt2").stat().st_size < 0.5 * (quick_run / "best.safetensors").stat().st_size


def test_compiled_int8_package_matches_the_program_and_goes_stale_with_it(tmp_path):
    """The AOTInductor package eval-all and predict run: one build serves batch 1 and batch n alike, is reused,
    and is rebuilt when damaged or when the exported program, torch or the CPU it was built for changes. A small conv net keeps
    the C++ build short; the ECG models take the same path in compress (compression.compress._apply)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from compression.compress import _quantizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    x = torch.randn(6, 1, 12, 40)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prepared = prepare_pt2e(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)).module(), _quantizer(False))
    with torch.no_grad():
        prepared(x)
    converted = convert_pt2e(prepared)
    save_exported(tmp_path / "model.pt2", converted, x)
    assert not compiled_is_current(tmp_path)
    compiled = load_compiled(tmp_path)
    assert compiled_is_current(tmp_path)
    with torch.no_grad():
        reference = inference_ready(converted)(x)
        for n in (1, len(x)):
            torch.testing.assert_close(compiled(x[:n]), reference[:n], atol=0.05, rtol=0.05)
        assert (reference - net(x)).abs().max() < 0.2  # and the int8 program is still the network
    built = (tmp_path / COMPILED_FILE).stat().st_mtime_ns
    load_compiled(tmp_path)
    assert (tmp_path / COMPILED_FILE).stat().st_mtime_ns == built  # reused, not rebuilt
    # damaged under an intact stamp: rebuilt. In a fresh process, as eval-all meets it: one process that already
    # loaded a package from this path got stale kernels when it reloaded the rebuilt one (torch 2.14).
    (tmp_path / COMPILED_FILE).write_bytes(b"not a package")
    fresh = forward_in_fresh_process(f"load_compiled(Path({str(tmp_path)!r}))", x, tmp_path)
    torch.testing.assert_close(torch.from_numpy(fresh), reference, atol=0.05, rtol=0.05)
    stamp = json.loads((tmp_path / COMPILED_STAMP).read_text())
    for key, other in (("source_sha256", "0" * 64), ("torch", "0.0"), ("cpu", "another CPU")):
        (tmp_path / COMPILED_STAMP).write_text(json.dumps({**stamp, key: other}))
        assert not compiled_is_current(tmp_path), key


def test_host_cpu_names_the_instruction_sets_that_decide_int8_and_bf16_speed_and_native_bf16(tmp_path):
    """The report prints it beside every latency; packages are stamped with it, so two CPUs must differ."""
    intel, amd = tmp_path / "intel", tmp_path / "amd"
    intel.write_text("model name\t: Xeon X\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n")
    amd.write_text("model name\t: EPYC Y\nflags\t\t: fpu avx2\n")
    a, b = host_cpu(intel), host_cpu(amd)
    assert a.startswith("Xeon X (") and "; AVX2, AVX-512, VNNI, bf16, AMX-int8; flags " in a
    assert b.startswith("EPYC Y (") and "; AVX2; flags " in b
    assert a.rsplit(" ", 1)[1] != b.rsplit(" ", 1)[1]
    assert native_bf16(intel) is True and native_bf16(amd) is False
    assert native_bf16(tmp_path / "no-cpuinfo") is None  # unknown: eval-all scores bf16 rather than guess


def test_a_package_that_cannot_be_built_is_one_line_naming_the_program_and_leaves_nothing(tmp_path, monkeypatch):
    """When inductor cannot lower a graph (as for xresnet1d101) the caller gets the program's path and the cause
    in one line — compress reports it per variant, predict prints it — and no half package or stamp is left."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(3, 4)
    batch = torch.export.Dim("batch", min=1, max=4096)
    save_exported(tmp_path / "model.pt2", torch.export.export(net, (x,), dynamic_shapes=({0: batch},)).module(), x)

    def fails(*args, **kwargs):
        raise RuntimeError("Attempting to broadcast a dimension of length 68\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    with pytest.raises(ValueError) as err:
        load_compiled(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "model.pt2") in message and "broadcast a dimension" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


@pytest.mark.parametrize("module", ["compression.compress", "compression.export_onnx"])
def test_missing_run_is_one_line_naming_the_folder(module, tmp_path):
    r = run_module(module, "--model", "convnext", "--profile", "cpu", env={"ARTIFACTS": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "runs" / "convnext-strip-cpu") in lines[0]
    assert "make train-convnext PROFILE=cpu" in lines[0]


def test_a_variant_of_an_older_checkpoint_is_not_current(tmp_path):
    run, variant = tmp_path / "run", tmp_path / "variant"
    run.mkdir(), variant.mkdir()
    (run / "best.safetensors").write_bytes(b"weights v1")
    assert not variant_is_current(variant, run, checkpoint_sha256(run))  # nothing made yet
    (variant / "variant.json").write_text(json.dumps({"source_sha256": checkpoint_sha256(run)}))
    (variant / "metrics.json").write_text("{}")
    assert variant_is_current(variant, run, checkpoint_sha256(run))
    (run / "best.safetensors").write_bytes(b"weights v2")  # the run was retrained
    assert not variant_is_current(variant, run, checkpoint_sha256(run))
    (variant / "variant.json").write_text("{}")  # no record of its checkpoint: made again
    assert not variant_is_current(variant, run, checkpoint_sha256(run))


def test_dynamic_int8_heads_do_not_depend_on_the_batch():
    """One outlier window must not set the activation scale of the windows batched with it (effnetv2's pooled
    features: mostly < 1, ~1 % of windows up to 34)."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(64, 5)).eval()
    x = torch.rand(16, 64)
    x[3] *= 40
    q = quantize_dynamic(head)
    alone = torch.cat([q(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(q(x), alone)
    assert (q(x) - head(x)).abs()[[0, 1, 2, 4]].max() < 0.02  # the ordinary windows keep their precision


def test_variants_of_an_earlier_recipe_are_redone(tmp_path, capsys):
    from compression.compress import ACTIVATION_RANGE, QAT_LR_FACTOR, _recipe_changed

    def changed(folder, method, model, alpha=0.5):
        return _recipe_changed(folder, method, {"model": model}, alpha)

    out = tmp_path / "static"
    out.mkdir()
    (out / "variant.json").write_text(json.dumps({"fp32_modules": []}))
    assert changed(out, "static", "effnetv2")  # made before its pool stayed fp32
    assert not changed(out, "static", "convnext")  # convnext keeps nothing in fp32
    (out / "variant.json").write_text(json.dumps({"fp32_modules": ["global_pool"]}))
    assert not changed(out, "static", "effnetv2")
    dyn = tmp_path / "dynamic"
    dyn.mkdir()
    (dyn / "variant.json").write_text("{}")  # its head took one activation range per batch
    assert changed(dyn, "dynamic", "vit") and "redoing it" in capsys.readouterr().out
    (dyn / "variant.json").write_text(json.dumps({"activation_range": ACTIVATION_RANGE}))
    assert not changed(dyn, "dynamic", "vit")
    qat = tmp_path / "qat"
    qat.mkdir()
    (qat / "variant.json").write_text(json.dumps({"kd_alpha": 0.5}))
    assert changed(qat, "qat", "vit")  # made before the learning-rate factor was recorded
    (qat / "variant.json").write_text(json.dumps({"kd_alpha": 0.5, "qat_lr_factor": QAT_LR_FACTOR}))
    assert not changed(qat, "qat", "vit") and changed(qat, "qat", "vit", alpha=0.0)  # --qat-kd-alpha 0: redone
    (qat / "variant.json").write_text(json.dumps({"kd_alpha": 0.5, "qat_lr_factor": 4 * QAT_LR_FACTOR}))
    assert changed(qat, "qat", "vit")
