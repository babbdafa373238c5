"""Export a trained run to ONNX and to an ONNX Runtime int8 model:
`python -m compression.export_onnx --run artifacts/runs/vit-leads-cpu` (or --model vit --profile cpu, or --best).

Variants (each in artifacts/compressed/<run>/<variant>/ with model.onnx, variant.json, metrics.json):
  onnx_fp32  the fp32 network, exported with torch.onnx.export(dynamo=True) — the TorchScript exporter
             (dynamo=False) only if that fails — with a dynamic batch axis: input "input" N×…, output
             "logits" N×5. Checked against PyTorch before it is kept.
  onnx_int8  int8 of onnx_fp32 with onnxruntime.quantization, after quant_pre_process. Static: quantize_static
             in QDQ format (per-channel int8 weights, ACTIVATION_TYPE activations) calibrated (MinMax) on
             CALIBRATION_BATCHES batches of TRAINING records, windowed exactly as at evaluation. Only QUANT_OPS
             nodes are quantized; the stem (the node that reads the raw ECG) and MatMuls of two activations
             (attention) stay fp32: quantizing them cost the most accuracy. --int8 auto (default) uses
             quantize_dynamic instead when only MatMuls (and a Gemm head, left fp32) are to quantize (vit,
             deit): measured faster and closer to fp32 than QDQ on this CPU; --int8 static forces QDQ.

metrics.json holds val macro AUC (predict_dataset, as compression does; test is eval-all's), the file sizes and
max_abs_diff_vs_torch: the largest probability difference from the PyTorch fp32 model on COMPARE_RECORDS
real val records. A finished variant (metrics.json present, made from the run's present checkpoint) is skipped
unless --force.
`make export-<model>` exports one model's run; `make export` the best run of PROFILE by val macro AUC.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader


from shared.cli import add_output_args, add_run_choice, chosen_run, comma_list, exit_code
from shared.runs import checkpoint_sha256, load_run
from shared.variants import finished_variant
from shared.cache import open_cache
from shared.dataset import ECGDataset, make_loader
from shared.io import atomic_path, first_line, library_versions, read_json, write_json_atomic
from shared.paths import compressed_dir, data_cache_dir, runs_dir
from shared.results import record_variant
from shared.inputs import InputAdapter
from shared.prediction import validation_scores

# Knobs
VARIANTS = ("onnx_fp32", "onnx_int8")
DYNAMO = True                   # torch.onnx.export(dynamo=True) first; TorchScript exporter as fallback
FALLBACK_OPSET = 17             # opset of the TorchScript fallback (dynamo picks its own, recorded)
EXPORT_TOLERANCE = 1e-3         # max |logit difference| vs PyTorch an export must meet to be kept
CALIBRATION_BATCHES = 8         # batches (of the run's batch_size) of training records, as compression
QUICK_MAX_BATCHES = 3           # quick profile
CALIBRATION_CHUNK = 64          # windows per calibration forward (bounds activation memory)
INT8_MODE = "auto"              # static (QDQ, calibrated) | dynamic (quantize_dynamic: MatMul weights only) |
                                # auto: dynamic when every node to quantize is a MatMul (vit, deit: measured
                                # faster and closer to fp32 than QDQ), static QDQ when there are convolutions
ACTIVATION_TYPE = "QUInt8"      # QUInt8 | QInt8 (u8 × s8 weights is MLAS's AVX512-VNNI kernel; measured: QInt8
                                # gives the same speed and outputs on vit)
WEIGHT_TYPE = "QInt8"
PER_CHANNEL = True
REDUCE_RANGE = False            # 7-bit weights: only needed on CPUs without VNNI (u8s8 overflow)
CALIBRATE_METHOD = "MinMax"     # MinMax | Entropy | Percentile (the latter two: histograms, slower)
QUANT_OPS = ("Conv", "MatMul", "Gemm")   # int8 kernels; Add/Mul/Softmax/LayerNorm… stay fp32
KEEP_STEM_FP32 = True           # the Conv/MatMul/Gemm that reads the model input stays fp32
KEEP_ACTIVATION_MATMULS_FP32 = True      # MatMuls with no constant operand (attention QKᵀ, AV)
COMPARE_RECORDS = 32            # val records for max_abs_diff_vs_torch
AUC_WARN = 0.005                # warn when int8 loses more val macro AUC than this (the deploy budget)
EVAL_CHUNK = 256

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def real_inputs(cache, adapter: InputAdapter, split: str = "val", records: int = COMPARE_RECORDS) -> torch.Tensor:
    ds = ECGDataset(cache, split)
    x, _ = ds.__getitems__(range(min(records, len(ds))))
    return adapter.eval_inputs(x)[0]


def prob_diff(model, reference: torch.nn.Module, inputs: torch.Tensor) -> dict:
    with torch.no_grad():
        d = (torch.sigmoid(model(inputs).float()) - torch.sigmoid(reference(inputs).float())).abs()
    return {"max_abs_diff_vs_torch": float(d.max()), "mean_abs_diff_vs_torch": float(d.mean()),
            "compared_windows": int(len(inputs))}


# ------------------------------------------------------------------ fp32 export
def _export_dynamo(model, example: torch.Tensor, path: Path) -> dict:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    return {"export": "torch.onnx.export(dynamo=True)"}


def _export_torchscript(model, example: torch.Tensor, path: Path) -> dict:
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=FALLBACK_OPSET)
    return {"export": "torch.onnx.export(dynamo=False)"}


def export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamo: bool = DYNAMO) -> dict:
    """Write `path` atomically; return how it was exported. Each exporter's output is checked against PyTorch
    (and on another batch size, to prove the batch axis is dynamic) before it is kept."""
    import contextlib
    import io

    import onnx

    from shared.formats.onnx_model import OnnxModel

    model = model.eval()
    with torch.no_grad():
        ref = model(example)
    tries = ([_export_dynamo] if dynamo else []) + [_export_torchscript]
    errors = []
    for exporter in tries:
        t0 = time.time()
        try:
            with atomic_path(path) as tmp:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    info = exporter(model, example, tmp)
                onnx.checker.check_model(str(tmp))
                session = OnnxModel(tmp, threads=torch.get_num_threads())
                for part in (example, example[:1]):
                    diff = float((session(part) - ref[:len(part)]).abs().max())
                    if not diff <= EXPORT_TOLERANCE:
                        raise ValueError(f"outputs differ from PyTorch by {diff:.2e} (batch {len(part)})")
                del session
        except Exception as e:
            errors.append(f"{exporter.__name__[1:]}: {type(e).__name__}: {first_line(e)}")
            print(f"export failed, {errors[-1]}", file=sys.stderr)
            continue
        proto = onnx.load(str(path), load_external_data=False)
        info.update(opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                    export_seconds=round(time.time() - t0, 1), export_errors=errors,
                    input_name="input", output_name="logits", input_shape=["batch", *example.shape[1:]])
        return info
    raise RuntimeError("every ONNX exporter failed: " + "; ".join(errors))


# ------------------------------------------------------------------ int8 (ONNX Runtime static QDQ)
class TrainCalibration(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over `batches` shuffled training batches, windowed as at evaluation."""

    def __init__(self, cache, adapter: InputAdapter, cfg: dict, batches: int, chunk: int = CALIBRATION_CHUNK,
                 input_name: str = "input"):
        self.loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 31)
        self.adapter, self.batches, self.chunk, self.input_name = adapter, batches, chunk, input_name
        self.records = self.windows = 0
        self._it = self._chunks()

    def _chunks(self):
        for i, (x, _) in enumerate(self.loader):
            if i >= self.batches:
                break
            inputs = self.adapter.eval_inputs(x)[0]
            self.records += len(x)
            self.windows += len(inputs)
            for start in range(0, len(inputs), self.chunk):
                yield inputs[start:start + self.chunk].numpy()

    def get_next(self):
        part = next(self._it, None)
        return None if part is None else {self.input_name: part}

    def rewind(self):
        self.records = self.windows = 0
        self._it = self._chunks()


def fp32_nodes(model_path: Path, op_types=QUANT_OPS, stem: bool = KEEP_STEM_FP32,
               activation_matmuls: bool = KEEP_ACTIVATION_MATMULS_FP32) -> dict[str, list[str]]:
    """Names of the nodes to keep in fp32: the stem (reads the model input, possibly through shape-only ops)
    and MatMuls of two activations."""
    import onnx

    shape_only = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")
    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    graph_inputs = {i.name for i in g.input} - inits
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:  # nodes are in topological order: follow the input through shape-only ops
        if n.op_type in shape_only and n.input and n.input[0] in graph_inputs:
            graph_inputs.update(n.output)

    def constant(name: str) -> bool:  # an initializer, possibly behind shape-only ops
        while name not in inits:
            n = producer.get(name)
            if n is None or n.op_type not in shape_only + ("DequantizeLinear",):
                return False
            name = n.input[0]
        return True

    out = {"stem": [], "activation_matmuls": []}
    for n in g.node:
        if n.op_type not in op_types or not n.name:  # (an unnamed node cannot be excluded)
            continue
        if stem and any(i in graph_inputs for i in n.input):
            out["stem"].append(n.name)
        elif activation_matmuls and n.op_type == "MatMul" and not any(constant(i) for i in n.input[:2]):
            out["activation_matmuls"].append(n.name)
    return out


def quantizable_ops(model_path: Path, exclude: set[str], op_types=QUANT_OPS) -> set[str]:
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    return {n.op_type for n in g.node if n.op_type in op_types and n.name not in exclude}


def quantize_int8(fp32_path: Path, out_path: Path, cache, adapter: InputAdapter, cfg: dict, batches: int,
                  activation_type: str = ACTIVATION_TYPE, mode: str = INT8_MODE) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre))
            pre_process = "quant_pre_process"
        except Exception as e:  # e.g. symbolic shape inference meets a Squeeze it cannot type (resnet1d_wang)
            print(f"quant_pre_process failed ({type(e).__name__}: {first_line(e)}); "
                  "retrying without symbolic shape inference", file=sys.stderr)
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            pre_process = "quant_pre_process(skip_symbolic_shape=True)"
        keep = fp32_nodes(pre)
        requested = mode
        if mode == "auto":
            ops = quantizable_ops(pre, set(keep["stem"] + keep["activation_matmuls"]))
            mode = "dynamic" if "MatMul" in ops and ops <= {"MatMul", "Gemm"} else "static"  # Gemm head: fp32
        if mode == "dynamic":  # int8 weights, activations quantized per batch at run time: no calibration
            settings = {"api": "onnxruntime.quantization.quantize_dynamic", "mode": "dynamic", "requested": requested,
                        "pre_process": f"onnxruntime.quantization.shape_inference.{pre_process}",
                        "weight_type": WEIGHT_TYPE, "per_channel": PER_CHANNEL, "reduce_range": REDUCE_RANGE,
                        "op_types_to_quantize": ["MatMul"], "fp32_nodes": keep, "calibration_batches": 0}
            with atomic_path(out_path) as tmp:
                quantize_dynamic(str(pre), str(tmp), weight_type=getattr(QuantType, WEIGHT_TYPE),
                                 per_channel=PER_CHANNEL, reduce_range=REDUCE_RANGE, op_types_to_quantize=["MatMul"],
                                 nodes_to_exclude=keep["stem"] + keep["activation_matmuls"])
            return settings
        if mode != "static":
            raise ValueError(f"unknown int8 mode {mode!r}; choose static, dynamic or auto")
        reader = TrainCalibration(cache, adapter, cfg, batches)
        settings = {"api": "onnxruntime.quantization.quantize_static", "mode": "static", "requested": requested,
                    "format": "QDQ",
                    "pre_process": f"onnxruntime.quantization.shape_inference.{pre_process}",
                    "activation_type": activation_type, "weight_type": WEIGHT_TYPE, "per_channel": PER_CHANNEL,
                    "reduce_range": REDUCE_RANGE, "calibrate_method": CALIBRATE_METHOD,
                    "op_types_to_quantize": list(QUANT_OPS), "fp32_nodes": keep}
        with atomic_path(out_path) as tmp:
            quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ,
                            activation_type=getattr(QuantType, activation_type),
                            weight_type=getattr(QuantType, WEIGHT_TYPE), per_channel=PER_CHANNEL,
                            reduce_range=REDUCE_RANGE, calibrate_method=getattr(CalibrationMethod, CALIBRATE_METHOD),
                            op_types_to_quantize=list(QUANT_OPS),
                            nodes_to_exclude=keep["stem"] + keep["activation_matmuls"])
            # (not extra_options CalibMaxIntermediateOutputs: in ORT 1.32 it drops the ranges it collected)
    settings.update(calibration_batches=batches, calibration_split="train", calibration_records=reader.records,
                    calibration_windows=reader.windows)
    return settings


# ------------------------------------------------------------------ driver
def export(run_dir: Path, variants=VARIANTS, data_dir: Path | None = None, out_root: Path | None = None,
           force: bool = False, batches: int | None = None, activation_type: str = ACTIVATION_TYPE,
           dynamo: bool = DYNAMO, mode: str = INT8_MODE) -> dict:
    run_dir = Path(run_dir)
    root = (out_root or compressed_dir()) / run_dir.name
    results, failures = {}, []
    todo = []
    source_sha256 = checkpoint_sha256(run_dir)
    for variant in variants:
        done = finished_variant(root / variant, run_dir, source_sha256, force)
        if done is not None:
            results[variant] = done
        else:
            todo.append(variant)
    if not todo:
        return results
    torch_model, cfg = load_run(run_dir)
    cache = open_cache(data_dir or data_cache_dir(cfg["sampling_rate"]))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    if batches is None:
        batches = QUICK_MAX_BATCHES if cfg.get("profile") == "quick" else CALIBRATION_BATCHES
    compare = real_inputs(cache, adapter)
    for variant in todo:
        (root / variant).mkdir(parents=True, exist_ok=True)
        try:
            results[variant] = _export_variant(variant, run_dir, source_sha256, torch_model, cfg, cache, adapter,
                                               compare, root, batches, activation_type, dynamo, mode)
        except Exception as e:  # the exporter or the quantizer cannot handle this network: report, go on
            failures.append(f"{run_dir.name}/{variant}: {type(e).__name__}: {first_line(e)}")
            print(f"error: {failures[-1]}", file=sys.stderr)
    if failures:
        raise ExportFailed("; ".join(failures))
    return results


class ExportFailed(RuntimeError):
    pass


def _export_variant(variant, run_dir, source_sha256, torch_model, cfg, cache, adapter, compare, root, batches,
                    activation_type, dynamo, mode) -> dict:
    from shared.formats.onnx_model import OnnxModel

    out = root / variant
    fp32_onnx = root / "onnx_fp32" / "model.onnx"
    t0 = time.time()
    if variant == "onnx_fp32":
        info = export_fp32(torch_model, compare[:8], out / "model.onnx", dynamo=dynamo)
    elif variant == "onnx_int8":
        if not fp32_onnx.exists():
            raise FileNotFoundError(f"{fp32_onnx}: export onnx_fp32 first (--variants onnx_fp32,onnx_int8)")
        info = quantize_int8(fp32_onnx, out / "model.onnx", cache, adapter, cfg, batches, activation_type, mode)
        fp32_json = root / "onnx_fp32" / "variant.json"
        fp32_info = read_json(fp32_json) if fp32_json.exists() else {}
        info.update(source="onnx_fp32/model.onnx", export=fp32_info.get("export"), opset=fp32_info.get("opset"),
                    input_name="input", output_name="logits", input_shape=fp32_info.get("input_shape"))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    seconds = time.time() - t0
    info.update(artifact="model.onnx", method=variant, run=str(run_dir.resolve()),
                source_sha256=source_sha256, model=cfg["model"],
                representation=cfg["representation"], seconds=round(seconds, 1),
                versions={**library_versions(), **_onnx_versions()})
    write_json_atomic(out / "variant.json", info)
    session = OnnxModel(out / "model.onnx")
    metrics = validation_scores(session, cache, adapter, chunk=EVAL_CHUNK)
    metrics.update(method=variant, run=run_dir.name, artifact_bytes=(out / "model.onnx").stat().st_size,
                   fp32_bytes=(run_dir / "best.safetensors").stat().st_size,
                   **prob_diff(session, torch_model, compare))
    fp32_metrics = root / "onnx_fp32" / "metrics.json"
    if variant == "onnx_int8" and fp32_metrics.exists():
        change = metrics["val"]["macro_auc"] - read_json(fp32_metrics)["val"]["macro_auc"]
        metrics["val_auc_change_vs_onnx_fp32"] = change
        if change < -AUC_WARN:
            print(f"warning: {run_dir.name}/onnx_int8 loses {-change:.4f} val macro AUC against onnx_fp32 "
                  f"(more than {AUC_WARN}); try --int8 dynamic, or keep this model in fp32", file=sys.stderr)
    return record_variant(out, metrics, run_dir, f"{run_dir.name}/{variant}",
                          f", max |Δp| vs torch {metrics['max_abs_diff_vs_torch']:.4f}, {seconds:.0f} s "
                          f"({info.get('export')})")


def _onnx_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("onnx", "onnxscript"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def best_run(profile: str, root: Path | None = None) -> Path:
    """The training run of `profile` (artifacts/runs/*-<profile>*) with the highest val macro AUC."""
    scored = []
    for run in sorted((root or runs_dir()).glob(f"*-{profile}*")):
        if not (run / "best.safetensors").exists() or not (run / "metrics.json").exists():
            continue
        try:
            auc = read_json(run / "metrics.json")["val"]["macro_auc"]
        except (KeyError, TypeError, ValueError):
            continue
        if auc is not None and np.isfinite(auc):
            scored.append((float(auc), run))
    if not scored:
        raise FileNotFoundError(f"{root or runs_dir()}: no finished training run of profile {profile!r} "
                                f"(make train-<model> PROFILE={profile})")
    auc, run = max(scored, key=lambda t: t[0])
    print(f"best {profile} run by val macro AUC: {run.name} ({auc:.4f}; {len(scored)} runs compared)")
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.export_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_choice(ap, "export", best=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of %(default)s")
    ap.add_argument("--calibration-batches", type=int, default=None,
                    help=f"training batches for int8 calibration (default {CALIBRATION_BATCHES}, quick "
                         f"{QUICK_MAX_BATCHES})")
    ap.add_argument("--int8", choices=("auto", "static", "dynamic"), default=INT8_MODE,
                    help="onnx_int8: static QDQ (calibrated), dynamic (MatMul weights only) or auto: dynamic when "
                         "the network has no convolution to quantize (default %(default)s)")
    ap.add_argument("--activation-type", choices=("QUInt8", "QInt8"), default=ACTIVATION_TYPE,
                    help="int8 activation type (default %(default)s)")
    ap.add_argument("--no-dynamo", action="store_true", help="use the TorchScript exporter (dynamo=False)")
    add_output_args(ap)
    args = ap.parse_args(argv)

    def work():
        variants = comma_list(args.variants, VARIANTS)
        run = best_run(args.profile) if args.best else chosen_run(args)
        export(run, variants, args.data, args.out, args.force, args.calibration_batches, args.activation_type,
               dynamo=not args.no_dynamo, mode=args.int8)
    return exit_code(work, already_reported=(ExportFailed,))


if __name__ == "__main__":
    sys.exit(main())
