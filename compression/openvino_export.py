"""OpenVINO IR and NNCF int8 of a trained run: `python -m compression.openvino_export --model vit`
(`make export-openvino-<model>`; part of `make compress-all`).

Variants (each in artifacts/compressed/<run>/<variant>/ with model.xml + model.bin, variant.json, metrics.json):
  openvino_fp32  the fp32 network converted straight from PyTorch (openvino.convert_model), batch axis dynamic;
                 kept only if its outputs match PyTorch's within EXPORT_TOLERANCE on real validation windows.
  openvino_int8  nncf.quantize (post-training; model_type TRANSFORMER for vit/deit) of the fp32 IR, calibrated on
                 the same training inputs as PT2E static int8 (shared.inputs.calibration_inputs). CNNs first get
                 symmetric activations (PERFORMANCE preset, the fastest on CPU); when that loses more than
                 AUC_BUDGET val macro AUC against openvino_fp32, asymmetric ones (MIXED: SiLU/GELU outputs have a
                 negative tail on which symmetric int8 spends half its levels; ~20 % slower). When the better
                 preset still loses more, nncf.quantize_with_accuracy_control (with that preset) reverts the most
                 harmful layers to fp32 until the loss is within the budget (on validation only). Weights the plain
                 int8 pass leaves in fp32 (NNCF does not quantize e.g. effnetv2's squeeze-excitation convolutions,
                 4.1 of its 9.3 MB) are then stored int8, weight-only (nncf.compress_weights, REST_WEIGHTS).
Scored on the validation fold only (eval-all reads test once). A finished variant of the run's present
checkpoint is skipped unless --force. Loading an IR runs no Python code (shared/formats/openvino_model.py).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from shared.cli import add_output_args, add_run_choice, chosen_run, comma_list, exit_code
from shared.runs import checkpoint_sha256, load_run, read_config
from shared.variants import (artifact_bytes, export_form_changed, finished_variant, fp32_modules_changed,
                             recipe_changed)
from shared.cache import open_cache
from shared.export_form import export_form, for_export
from shared.dataset import ECGDataset
from shared.io import first_line, library_versions, read_json, write_json_atomic
from shared.nets import TRANSFORMERS, int8_fp32_modules
from shared.paths import compressed_dir, data_cache_dir
from shared.results import record_variant
from shared.inputs import InputAdapter, calibration_inputs
from shared.prediction import validation_scores

# Knobs
VARIANTS = ("openvino_fp32", "openvino_int8")
EXPORT_TOLERANCE = 1e-4         # max |logit difference| vs PyTorch the fp32 IR must meet
CALIBRATION_BATCHES = 16        # as PT2E static int8 (compression/compress.py)
QUICK_MAX_BATCHES = 3
AUC_BUDGET = 0.005              # int8 may lose at most this much val macro AUC before accuracy control runs
PRESETS = ("performance", "mixed")  # NNCF activation presets tried in turn until one keeps the budget; effnetv2
                                # structured int8 -0.0108 -> -0.0039 val; the pruned vit / deit-kd IRs' int8 alone
                                # 2.02x / 2.19x (mixed) -> 2.28x / 2.49x (performance) at the same val AUC
REST_WEIGHTS = "int8"           # weights plain PTQ leaves in fp32: "int8" (weight-only, INT8_SYM) or "fp32";
                                # effnetv2: 2.38x -> 3.40x smaller, val 0.9278 -> 0.9284 (docs/benchmarks.md)
COMPARE_RECORDS = 16            # val records for the fp32 check and max_abs_diff_vs_torch
EVAL_CHUNK = 256

warnings.filterwarnings("ignore", category=UserWarning)   # includes torch.jit's TracerWarning (the converter traces)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


ACCURACY_CONTROL = "nncf.quantize_with_accuracy_control"


class ExportFailed(RuntimeError):
    pass


def val_windows(cache, adapter: InputAdapter, records: int = COMPARE_RECORDS) -> torch.Tensor:
    ds = ECGDataset(cache, "val")
    x, _ = ds.__getitems__(range(min(records, len(ds))))
    return adapter.eval_inputs(x)[0]


def convert_fp32(model: torch.nn.Module, family: str, compare: torch.Tensor, out: Path) -> dict:
    """The fp32 IR of `model` in its export form (shared/export_form.py), checked against `model` itself."""
    import openvino as ov

    shape = [-1, *compare.shape[1:]]
    with torch.no_grad():
        ir = ov.convert_model(for_export(model, family), example_input=compare[:2], input=[ov.PartialShape(shape)])
        reference = model.eval()(compare).numpy()
    ov.save_model(ir, str(out / "model.xml"), compress_to_fp16=False)
    from shared.formats.openvino_model import OpenVinoModel

    diff = float(np.abs(OpenVinoModel(out / "model.xml")(compare).numpy() - reference).max())
    if diff > EXPORT_TOLERANCE:
        raise ValueError(f"{out / 'model.xml'}: logits differ from PyTorch by {diff:.2e} (> {EXPORT_TOLERANCE})")
    return {"converter": "openvino.convert_model", "input_shape": ["batch", *compare.shape[1:]],
            "export_form": export_form(family), "max_abs_logit_diff_vs_torch": diff}


def fp32_weight_bytes(ir) -> int:
    """Bytes of fp32 weight tensors feeding a convolution or matrix product of an IR (what int8 left in fp32)."""
    total = 0
    for op in ir.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() == "f32":
            users = {i.get_node().get_type_name() for i in op.output(0).get_target_inputs()}
            if users & {"Convolution", "GroupConvolution", "MatMul"} and len(op.get_output_shape(0)) >= 2:
                total += op.get_byte_size()
    return total


def int8_recipe_changed(variant_dir: Path, model: str) -> bool:
    """An int8 IR made by an earlier recipe (other fp32 modules, export form, leftover-weight storage, or
    accuracy control run before every activation preset was tried)."""
    return (fp32_modules_changed(variant_dir, model) or export_form_changed(variant_dir, model)
            or recipe_changed(variant_dir, "rest_weights", REST_WEIGHTS, "fp32", "leftover fp32 weights stored as")
            or _presets_changed(Path(variant_dir)))


def _presets_changed(variant_dir: Path) -> bool:
    """An IR that needed accuracy control must have tried every preset first; one made by plain PTQ must have
    tried today's presets in order up to the one it kept (earlier: transformers tried mixed alone)."""
    path = variant_dir / "variant.json"
    if not path.exists():
        return False
    info, wanted = read_json(path), list(PRESETS)
    if info.get("api") == ACCURACY_CONTROL:
        return recipe_changed(variant_dir, "presets", wanted, wanted[:1], "accuracy control after the presets")
    tried = info.get("presets") or wanted[:1]
    return recipe_changed(variant_dir, "presets", wanted[:len(tried)], tried, "another order of activation presets than")


def _validation_items(cache, adapter: InputAdapter, chunk: int = 32) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Validation records in chunks: (windows, labels, windows per record) for NNCF's accuracy control."""
    ds = ECGDataset(cache, "val")
    items = []
    for start in range(0, len(ds), chunk):
        x, y = ds.__getitems__(range(start, min(start + chunk, len(ds))))
        inputs, n_win = adapter.eval_inputs(x)
        items.append((inputs.numpy(), np.asarray(y), n_win))
    return items


def _macro_auc_of(compiled, items) -> float:
    from shared.metrics import macro_auc

    probs, labels = [], []
    for inputs, y, n_win in items:
        logits = np.asarray(compiled(inputs)[0])
        probs.append((1 / (1 + np.exp(-logits))).reshape(len(y), n_win, -1).mean(1))
        labels.append(y)
    return float(macro_auc(np.concatenate(labels), np.concatenate(probs)))


def quantize_int8(fp32_xml: Path, out: Path, cache, adapter: InputAdapter, cfg: dict, batches: int,
                  fp32_auc: float, budget: float = AUC_BUDGET) -> dict:
    """NNCF int8 of an fp32 IR; accuracy control when plain PTQ loses more than `budget` val macro AUC against
    `fp32_auc`. Weights left in fp32 are then stored int8 (REST_WEIGHTS) where that keeps within the budget."""
    import nncf
    import openvino as ov

    ir = ov.Core().read_model(str(fp32_xml))
    calib = [x.numpy() for x in calibration_inputs(cache, adapter, cfg, batches)]
    model_type = nncf.ModelType.TRANSFORMER if cfg["model"] in TRANSFORMERS else None
    fp32_modules, fp32_reason = int8_fp32_modules(cfg["model"])
    # the converted IR names each node after the module it came from: "__module.global_pool.pool/aten::…"
    ignored = nncf.IgnoredScope(patterns=[rf".*__module\.{re.escape(m)}[./].*" for m in fp32_modules], validate=False)
    info = {"api": "nncf.quantize (post-training)", "calibration_batches": len(calib),
            "calibration_records": int(sum(len(c) for c in calib)), "calibration_split": "train",
            "model_type": "transformer" if model_type else "default", "fp32_modules": list(fp32_modules),
            "export_form": export_form(cfg["model"]), "rest_weights": REST_WEIGHTS, "auc_budget": budget,
            "fp32_reason": fp32_reason, "presets": [], "ptq_val_macro_auc_by_preset": {}}
    items = _validation_items(cache, adapter)
    best = None
    for name in PRESETS:  # the fastest preset that keeps the budget, else the least lossy
        q = nncf.quantize(ir, nncf.Dataset(calib), model_type=model_type, subset_size=len(calib),
                          ignored_scope=ignored, preset=_preset(name))
        q, q_auc = _rest_weights_int8(q, ignored, items, fp32_auc, budget, info)
        info["presets"].append(name)
        info["ptq_val_macro_auc_by_preset"][name] = q_auc
        if best is None or q_auc > best[2]:
            best = (name, q, q_auc)
        if fp32_auc - q_auc <= budget:
            break
    info["preset"], q, info["ptq_val_macro_auc"] = best
    if fp32_auc - info["ptq_val_macro_auc"] > budget:
        print(f"{out}: plain PTQ loses {fp32_auc - info['ptq_val_macro_auc']:.4f} val macro AUC ({info['preset']} "
              f"preset); running NNCF accuracy control (max drop {budget:.4f})", flush=True)
        q = nncf.quantize_with_accuracy_control(
            ir, nncf.Dataset(calib), nncf.Dataset(items, lambda item: item[0]),
            validation_fn=lambda compiled, data: _macro_auc_of(compiled, data), max_drop=budget,
            drop_type=nncf.DropType.ABSOLUTE, model_type=model_type, subset_size=len(calib), ignored_scope=ignored,
            preset=_preset(info["preset"]))
        info["api"] = ACCURACY_CONTROL
        q, _ = _rest_weights_int8(q, ignored, items, fp32_auc, budget, info, score=False)
    ov.save_model(q, str(out / "model.xml"), compress_to_fp16=False)
    return info


def _preset(name: str):
    import nncf

    return {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[name]


def _rest_weights_int8(q, ignored, items, fp32_auc: float, budget: float, info: dict, score: bool = True):
    """(IR, its val macro AUC): `q` with the weights NNCF left in fp32 stored int8 (weight-only), unless
    REST_WEIGHTS is "fp32" or that loses more than `budget` where `q` does not. Records the fp32 weight bytes.
    score=False: the AUC (None) is not computed when nothing is to be decided (record_ir scores the saved IR)."""
    import nncf
    import openvino as ov

    def auc(model):
        return _macro_auc_of(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), items)

    info["fp32_weight_bytes_after_quantization"] = left = fp32_weight_bytes(q)
    info["fp32_weight_bytes"] = left
    if REST_WEIGHTS != "int8" or not left:
        return q, auc(q) if score else None
    packed = nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT8_SYM, ignored_scope=ignored)
    packed_auc, plain_auc = auc(packed), None
    if fp32_auc - packed_auc > budget and fp32_auc - (plain_auc := auc(q)) <= budget:
        return q, plain_auc  # weight-only int8 of what accuracy control kept in fp32 costs too much: keep it
    info["fp32_weight_bytes"] = fp32_weight_bytes(packed)
    return packed, packed_auc


def export(run_dir: Path, variants=VARIANTS, data_dir: Path | None = None, out_root: Path | None = None,
           force: bool = False, batches: int | None = None) -> dict:
    run_dir = Path(run_dir)
    root = (out_root or compressed_dir()) / run_dir.name
    source_sha256 = checkpoint_sha256(run_dir)
    model = read_config(run_dir)["model"]
    recipe_of = {"openvino_int8": int8_recipe_changed}  # the fp32 IR's recipe is its export form alone
    results = {v: finished_variant(root / v, run_dir, source_sha256,
                                   force or recipe_of.get(v, export_form_changed)(root / v, model))
               for v in variants}
    todo = [v for v, done in results.items() if done is None]
    if not todo:
        return results
    model, cfg = load_run(run_dir)
    cache = open_cache(data_dir or data_cache_dir(cfg["sampling_rate"]))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    if batches is None:
        batches = QUICK_MAX_BATCHES if cfg.get("profile") == "quick" else CALIBRATION_BATCHES
    failures = []
    for variant in todo:
        try:
            results[variant] = _export_variant(variant, run_dir, source_sha256, model, cfg, cache, adapter, root,
                                               batches)
        except Exception as e:  # the converter or NNCF cannot handle this network: report, go on
            failures.append(f"{run_dir.name}/{variant}: {type(e).__name__}: {first_line(e)}")
            print(f"error: {failures[-1]}", file=sys.stderr)
    if failures:
        raise ExportFailed("; ".join(failures))
    return results


def _export_variant(variant, run_dir, source_sha256, model, cfg, cache, adapter, root, batches) -> dict:
    out = root / variant
    out.mkdir(parents=True, exist_ok=True)
    compare = val_windows(cache, adapter)
    t0 = time.time()
    if variant == "openvino_fp32":
        info = convert_fp32(model, cfg["model"], compare, out)
    else:
        fp32 = root / "openvino_fp32"
        if not (fp32 / "metrics.json").exists():
            raise FileNotFoundError(f"{fp32}: make openvino_fp32 first (--variants openvino_fp32,openvino_int8)")
        info = quantize_int8(fp32 / "model.xml", out, cache, adapter, cfg, batches,
                             read_json(fp32 / "metrics.json")["val"]["macro_auc"])
    seconds = time.time() - t0
    info.update(artifact="model.xml", weights="model.bin", method=variant, run=str(run_dir.resolve()),
                source_sha256=source_sha256, model=cfg["model"], representation=cfg["representation"],
                seconds=round(seconds, 1), versions={**library_versions(), **_versions()})
    return record_ir(out, info, run_dir, model, cache, adapter, compare, f"{run_dir.name}/{variant}", seconds)


def record_ir(out: Path, info: dict, run_dir: Path, model: torch.nn.Module, cache, adapter: InputAdapter,
              compare: torch.Tensor, label: str, seconds: float) -> dict:
    """Write variant.json, score the IR on validation, measure how far it strays from the torch model it was
    made from on the same windows, flag a collapse against the run's fp32 model, write metrics.json, say it
    in one line. Also used for the structured network's int8 (compression/prune_structured.py)."""
    from shared.formats.openvino_model import OpenVinoModel

    write_json_atomic(out / "variant.json", info)
    ov_model = OpenVinoModel(out / "model.xml")
    metrics = validation_scores(ov_model, cache, adapter, chunk=EVAL_CHUNK)
    with torch.no_grad():
        diff = (torch.sigmoid(ov_model(compare)) - torch.sigmoid(model(compare))).abs().max().item()
    metrics.update(method=info["method"], run=run_dir.name, artifact_bytes=artifact_bytes(out / "model.xml"),
                   fp32_bytes=(run_dir / "best.safetensors").stat().st_size, max_abs_diff_vs_torch=diff,
                   **({"source": info["source"]} if "source" in info else {}))
    return record_variant(out, metrics, run_dir, label, f", max |Δp| vs its torch model {diff:.4f}, {seconds:.0f} s")


def _versions() -> dict:
    import nncf
    import openvino as ov

    return {"openvino": ov.get_version(), "nncf": nncf.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.openvino_export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_choice(ap, "export")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of %(default)s")
    ap.add_argument("--calibration-batches", type=int, default=None,
                    help=f"training batches for int8 calibration (default {CALIBRATION_BATCHES}, quick "
                         f"{QUICK_MAX_BATCHES})")
    add_output_args(ap)
    args = ap.parse_args(argv)
    return exit_code(lambda: export(chosen_run(args), comma_list(args.variants, VARIANTS), args.data, args.out,
                                    args.force, args.calibration_batches), already_reported=(ExportFailed,))


if __name__ == "__main__":
    sys.exit(main())
