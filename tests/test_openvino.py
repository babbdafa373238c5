"""OpenVINO IR + NNCF int8 variants of real quick runs, and the checks that keep a collapsed variant from being
recommended."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_module
from shared.runs import load_run
from shared.variants import load_variant
from shared.cache import open_cache
from shared.results import check_against_parent, collapse_warning, deploy_choice
from shared.inputs import InputAdapter

INT8_AUC_TOLERANCE = 0.05  # a 1-epoch quick run on ~50 validation records: int8 within this of the fp32 IR


@pytest.fixture(scope="module", params=["vit", "resnet"])
def exported(request, quick_vit_run, quick_resnet_run, sample_cache, tmp_path_factory):
    run = quick_vit_run if request.param == "vit" else quick_resnet_run
    root = tmp_path_factory.mktemp(f"ov-{request.param}")
    r = run_module("compression.openvino_export", "--run", run, "--data", sample_cache, "--out", root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return run, root / run.name, r


def _windows(run, sample_cache, n=8):
    from shared.dataset import ECGDataset

    cfg = json.loads((run / "config.json").read_text())
    cache = open_cache(sample_cache)
    x, _ = ECGDataset(cache, "val").__getitems__(range(n))
    return InputAdapter(cfg, cache.sampling_rate).eval_inputs(x)[0]


def test_fp32_ir_matches_pytorch_within_1e_4(exported, sample_cache):
    run, root, _ = exported
    model, _ = load_run(run)
    ir, _, info = load_variant(root / "openvino_fp32")
    x = _windows(run, sample_cache)
    with torch.no_grad():
        assert (ir(x) - model(x)).abs().max().item() < 1e-4
    assert info["method"] == "openvino_fp32" and (root / "openvino_fp32" / "model.bin").exists()


def test_each_batch_size_runs_its_own_static_program(exported, sample_cache):
    """The IR's batch axis stays dynamic; the wrapper compiles one fixed-shape program per batch size (faster on
    the CPU plugin) and keeps only the latest few."""
    run, root, _ = exported
    ir, _, _ = load_variant(root / "openvino_int8")
    assert ir.ir.input(0).get_partial_shape()[0].is_dynamic
    x = _windows(run, sample_cache)
    whole = ir(x)
    parts = torch.cat([ir(x[:3]), ir(x[3:])])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    batches = sorted(shape[0] for _, shape in ir.programs)
    assert batches == [1, 3, len(x) - 3, len(x)]  # batch 1 compiled at load
    ir.max_programs = 2
    ir(x[:2])
    assert [shape[0] for _, shape in ir.programs] == [len(x) - 3, 2]
    with pytest.raises(ValueError, match="expects inputs N×"):  # only the batch may vary
        ir(x[..., :-1])


def test_int8_is_smaller_and_close_in_auc(exported):
    run, root, _ = exported
    fp32 = json.loads((root / "openvino_fp32" / "metrics.json").read_text())
    int8 = json.loads((root / "openvino_int8" / "metrics.json").read_text())
    assert int8["artifact_bytes"] < 0.5 * fp32["artifact_bytes"]
    assert abs(int8["val"]["macro_auc"] - fp32["val"]["macro_auc"]) < INT8_AUC_TOLERANCE
    info = json.loads((root / "openvino_int8" / "variant.json").read_text())
    assert info["calibration_split"] == "train" and info["calibration_batches"] >= 1
    assert "val_auc_change_vs_fp32" in int8


def test_ir_holds_no_pickle_and_loads_in_a_fresh_process(exported, sample_cache, tmp_path):
    run, root, _ = exported
    for variant in ("openvino_fp32", "openvino_int8"):
        xml = (root / variant / "model.xml").read_bytes()
        assert xml.lstrip().startswith(b"<?xml") and b"\x80\x04" not in (root / variant / "model.bin").read_bytes()[:2]
    np.save(tmp_path / "x.npy", _windows(run, sample_cache, 2).numpy())
    code = ("import sys, numpy as np, torch; from shared.variants import load_variant; "
            f"m, _, _ = load_variant({str(root / 'openvino_int8')!r}); "
            f"print(m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).shape)")
    import subprocess, sys
    from conftest import REPO
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "torch.Size([" in r.stdout, r.stderr[-1000:]


def test_rerun_skips_finished_variants_and_redoes_a_retrained_one(exported, sample_cache, tmp_path):
    run, root, _ = exported
    again = run_module("compression.openvino_export", "--run", run, "--data", sample_cache, "--out", root.parent,
                       check=True)
    assert again.stdout.count("done already") == 2
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    out = tmp_path / "compressed"
    shutil.copytree(root, out / run.name)
    for v in ("openvino_fp32", "openvino_int8"):  # variants point at the copied run
        info = json.loads((out / run.name / v / "variant.json").read_text())
        (out / run.name / v / "variant.json").write_text(json.dumps({**info, "run": str(copy)}))
    from safetensors.torch import load_file, save_file
    w = load_file(str(copy / "best.safetensors"))
    k = next(iter(w))
    w[k] = w[k] * 1.01
    save_file(w, str(copy / "best.safetensors"))  # retrained under the same name
    redo = run_module("compression.openvino_export", "--run", copy, "--data", sample_cache, "--out", out,
                      "--variants", "openvino_fp32", check=True)
    assert "older checkpoint" in redo.stdout and "done already" not in redo.stdout


def test_predict_runs_an_openvino_variant(exported, sample_dir):
    run, root, _ = exported
    r = run_module("eval.predict", sample_dir / "records100" / "00000" / "00001_lr", "--model",
                   root / "openvino_int8", "--json")
    assert r.returncode == 0, r.stderr[-1000:]
    assert len(json.loads(r.stdout)["predictions"]) == 1


# ------------------------------------------------------------------ no silent collapse
def _result(run, variant, val, speed):
    return {"run": run, "artifact": f"{run}/{variant}", "variant": variant, "bytes": 1,
            "splits": {"val": {"macro_auc": val}, "test": {"macro_auc": val}},
            "efficiency": {"throughput_b32_t1": speed}}


def test_collapsed_variants_are_flagged_and_never_recommended():
    results = [_result("r", "fp32", 0.920, 100), _result("r", "static", 0.763, 900),
               _result("r", "openvino_int8", 0.917, 400), _result("r", "dynamic", 0.912, 500)]
    c = deploy_choice(results)
    assert [r["variant"] for r in c["flagged"]] == ["static"]
    assert c["recommended"]["variant"] == "openvino_int8"  # dynamic is faster but loses 0.008 > 0.005
    assert deploy_choice([_result("r", "fp32", 0.9, 100)])["recommended"]["variant"] == "fp32"
    assert collapse_warning("r/static", 0.763, 0.923).startswith("warning: r/static loses 0.1600")
    assert collapse_warning("r/qat", 0.918, 0.923) is None


def test_compression_records_the_change_and_warns(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {"macro_auc": 0.923}}))
    m = check_against_parent({"val": {"macro_auc": 0.763}}, tmp_path, "effnetv2/static")
    assert m["flagged"] and m["val_auc_change_vs_fp32"] == pytest.approx(-0.16)
    assert "effnetv2/static loses 0.1600" in capsys.readouterr().err


def test_the_op_profile_accounts_for_the_whole_forward(exported):
    from compression.profile_openvino import profile

    _, root, _ = exported
    ms, rows = profile(root / "openvino_int8" / "model.xml", batch=2)
    assert ms > 0 and rows and abs(sum(share for _, share, _ in rows) - 1) < 1e-6
    assert all(kind and kernels for kind, _, kernels in rows)  # every operation type names the kernels that ran


@pytest.mark.parametrize("profile", ["quick", "cpu"])
def test_convnext_export_form_is_the_same_function_without_permutes(profile, tmp_path):
    """The channels-first ConvNeXt gives the trained network's logits, and OpenVINO sees one MVN per LayerNorm and
    no Transpose (the permutes its CPU plugin ran slowly)."""
    import openvino as ov
    from shared.config import resolve
    from shared.export_form import for_export
    from shared.runs import build_from_config
    from shared.variants import export_form_changed

    cfg = resolve("convnext", profile)
    torch.manual_seed(0)
    model = build_from_config(cfg).eval()
    with torch.no_grad():  # non-trivial affine parameters, so a wrong axis or a dropped scale shows
        for name, p in model.named_parameters():
            if "norm" in name or "gamma" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") or "gamma" in name else 0.0))
    exported = for_export(model, "convnext")
    assert exported is not model and not any(type(m).__name__ == "LayerNorm2d" for m in exported.modules())
    shape = [4, *resolve_input_shape(cfg)]
    x = torch.randn(shape)
    with torch.no_grad():
        reference = model(x)
        assert (exported(x) - reference).abs().max().item() < 1e-4
    ir = ov.convert_model(exported, example_input=x[:2])
    types = [op.get_type_name() for op in ir.get_ordered_ops()]
    n_norms = sum(type(m).__name__ in ("LayerNorm2d", "LayerNorm") for m in model.modules())
    assert types.count("MVN") == n_norms and "Transpose" not in types
    out = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x.numpy())[0]
    assert np.abs(out - reference.numpy()).max() < 1e-4
    assert for_export(model, "vit") is model  # families without a form are converted as trained
    (tmp_path / "variant.json").write_text(json.dumps({"fp32_modules": []}))  # an IR from before the form
    assert export_form_changed(tmp_path, "convnext") and not export_form_changed(tmp_path, "vit")



def resolve_input_shape(cfg):
    from shared.nets import architecture_kwargs
    from shared.representations import input_shape

    n_samples = int(round(cfg["crop_seconds"] * cfg["sampling_rate"]))
    extra = {k: v for k, v in architecture_kwargs(cfg).items() if k == "row_repeat"}
    return input_shape(cfg["representation"], 12, n_samples, **extra)


def test_weights_plain_int8_leaves_in_fp32_are_stored_int8(sample_cache, tmp_path, monkeypatch):
    """NNCF's post-training int8 of the trained effnetv2 leaves its squeeze-excitation convolutions in fp32 (4.1 of
    9.3 MB; it quantizes them in a freshly initialized one, so NNCF is made to leave them here): the recipe stores
    such weights int8 (weight-only) and records the fp32 weight bytes before and after."""
    import nncf
    import openvino as ov
    from compression.openvino_export import convert_fp32, fp32_weight_bytes, quantize_int8, val_windows
    from shared.config import resolve
    from shared.runs import build_from_config

    plain = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **kw: plain(*a, **{**kw, "ignored_scope": nncf.IgnoredScope(
        patterns=[r".*\.se\.conv_.*"])}))
    cfg = resolve("effnetv2", "quick")
    torch.manual_seed(0)
    model = build_from_config(cfg).eval()
    cache = open_cache(sample_cache)
    adapter = InputAdapter(cfg, cache.sampling_rate)
    convert_fp32(model, "effnetv2", val_windows(cache, adapter, records=4), tmp_path)
    (tmp_path / "int8").mkdir()
    info = quantize_int8(tmp_path / "model.xml", tmp_path / "int8", cache, adapter, cfg, batches=1, fp32_auc=0.0)
    assert info["fp32_weight_bytes_after_quantization"] > 4e6 and info["fp32_weight_bytes"] == 0
    assert fp32_weight_bytes(ov.Core().read_model(str(tmp_path / "int8" / "model.xml"))) == 0
    assert fp32_weight_bytes(ov.Core().read_model(str(tmp_path / "model.xml"))) > 20e6


@pytest.mark.parametrize("aucs, tried, control", [
    ({"performance": 0.90, "mixed": 0.80}, ["performance"], None),           # within budget: the fastest kept
    ({"performance": 0.80, "mixed": 0.899}, ["performance", "mixed"], None),  # symmetric loses: asymmetric kept
    ({"performance": 0.85, "mixed": 0.80}, ["performance", "mixed"], "performance")])  # both lose: the better one
def test_cnn_int8_tries_asymmetric_activations_before_accuracy_control(sample_cache, tmp_path, monkeypatch,
                                                                       aucs, tried, control):
    """Symmetric activations first (fastest); asymmetric (MIXED) when they lose more than the budget; accuracy
    control only when both do, with the preset that lost less."""
    import nncf
    from compression import openvino_export as ove
    from shared.config import resolve
    from shared.runs import build_from_config

    calls = []
    plain = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **kw: calls.append(kw["preset"]) or plain(*a, **kw))
    monkeypatch.setattr(ove, "_rest_weights_int8", lambda q, *a, score=True: (
        q, aucs[calls[-1].name.lower()] if score else None))
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control",
                        lambda ir, calib, *a, preset, **kw: calls.append(("control", preset)) or plain(ir, calib))
    cfg = resolve("resnet1d_wang", "quick")
    model = build_from_config(cfg).eval()
    cache = open_cache(sample_cache)
    adapter = InputAdapter(cfg, cache.sampling_rate)
    ove.convert_fp32(model, "resnet1d_wang", ove.val_windows(cache, adapter, records=4), tmp_path)
    (tmp_path / "int8").mkdir()
    info = ove.quantize_int8(tmp_path / "model.xml", tmp_path / "int8", cache, adapter, cfg, batches=1,
                             fp32_auc=0.9, budget=0.005)
    assert info["presets"] == tried and [p.name.lower() for p in calls[:len(tried)]] == tried
    if control is None:
        assert len(calls) == len(tried) and info["api"] == "nncf.quantize (post-training)"
        assert info["preset"] == tried[-1]
    else:
        assert calls[-1] == ("control", getattr(nncf.QuantizationPreset, control.upper()))
        assert info["api"] == ove.ACCURACY_CONTROL and info["preset"] == control
    assert ove.PRESETS == ("performance", "mixed")  # tried in this order for every family, transformers too


def test_an_ir_that_needed_accuracy_control_before_the_presets_is_redone(tmp_path):
    from compression.openvino_export import ACCURACY_CONTROL, REST_WEIGHTS, int8_recipe_changed
    from shared.export_form import export_form
    from shared.nets import int8_fp32_modules

    def made(**info):
        (tmp_path / "variant.json").write_text(json.dumps({
            "fp32_modules": list(int8_fp32_modules("effnetv2")[0]), "export_form": export_form("effnetv2"),
            "rest_weights": REST_WEIGHTS, **info}))
        return int8_recipe_changed(tmp_path, "effnetv2")

    assert not made(api="nncf.quantize (post-training)")          # plain PTQ within budget: the same either way
    assert made(api=ACCURACY_CONTROL)                               # only symmetric tried before accuracy control
    assert not made(api=ACCURACY_CONTROL, presets=["performance", "mixed"])


def test_a_transformer_ir_quantized_with_the_mixed_preset_alone_is_redone(tmp_path):
    from compression.openvino_export import REST_WEIGHTS, int8_recipe_changed
    from shared.export_form import export_form

    def made(tried):
        (tmp_path / "variant.json").write_text(json.dumps({
            "fp32_modules": [], "export_form": export_form("vit"), "rest_weights": REST_WEIGHTS,
            "api": "nncf.quantize (post-training)", "presets": tried}))
        return int8_recipe_changed(tmp_path, "vit")

    assert made(["mixed"])                     # made before transformers tried the symmetric preset first
    assert not made(["performance"])           # within budget at the first preset
    assert not made(["performance", "mixed"])  # the symmetric one lost too much: the same either way
