"""Compress a trained model: `python -m compression.compress --model convnext --methods prune,dynamic,static,qat`.

Methods (each for every model family; shared.nets.INT8_FP32_MODULES lists what a family keeps in fp32):
  prune    L1 unstructured pruning of PRUNE_AMOUNT of each Conv weight (the original design; Linear layers
           and a global threshold are options), fine-tuned with the masks on, then made permanent.
  dynamic  dynamic int8 of every Linear layer (torch.ao quantize_dynamic).
  static   static post-training int8 with calibration on training records: PT2E (torch.export +
           torchao's X86InductorQuantizer) — the one API that handles all four timm families in torch 2.14.
  qat      quantization-aware training from the fp32 checkpoint (PT2E QAT), distilling from the fp32 parent
           on the same crops (QAT_KD_ALPHA, shared.distill), then converted to int8.

Each variant goes to artifacts/compressed/<run>/<method>/ with its artifact, variant.json (what was done)
and metrics.json (val macro AUC, size, sparsity). A finished variant made from the run's present checkpoint
(sha256 in variant.json) is skipped (resumable); one made from an older checkpoint (the run was retrained) is
redone.
Compression is a development step, so it scores on the validation fold only; the test fold is read once,
by eval-all (artifacts/eval/<run>/<method>/result.json), which also saved `make all` ~5 min of duplicate
prediction.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn


from shared.formats.compiled import COMPILED_METHODS, COMPILED_STAMP, load_compiled
from shared.formats.dynamic_int8 import quantize_dynamic, save_dynamic
from shared.formats.exported import save_exported
from shared.formats.sparse import nonzero_parameters, save_sparse
from shared.runs import channels_last_if_configured, checkpoint_sha256, find_run, load_run
from shared.variants import finished_variant, fp32_modules_changed, recipe_changed
from shared.cache import open_cache
from shared.cli import add_kd_choice
from shared.dataset import ECGDataset, make_loader
from shared.distill import KD_TEMPERATURE, WithTeacher, teacher_logits
from shared.io import first_line, library_versions, read_json, save_weights, write_json_atomic
from shared.nets import MODELS, TRANSFORMERS, int8_fp32_modules
from shared.paths import compressed_dir, data_cache_dir
from shared.results import record_variant
from shared.inputs import InputAdapter, calibration_inputs
from shared.prediction import validation_scores
from shared.progress import bar, meter
from shared.training import train_step

# Knobs
METHODS = ("prune", "dynamic", "static", "qat")
PRUNE_AMOUNT = 0.4
PRUNE_LAYERS = "conv"          # conv | linear | conv,linear
PRUNE_GLOBAL = False           # one L1 threshold over all chosen layers instead of per layer
FINETUNE_EPOCHS = 1            # after pruning (quick profile: a few batches)
QAT_EPOCHS = 1
FINETUNE_LR_FACTOR = 0.1       # × the run's learning rate, after pruning
QAT_LR_FACTOR = 0.005          # × the run's learning rate; val AUC vs fp32 at 0.02 → 0.005: deit-kd −0.0057 → −0.0010,
                               # vit −0.0037 → −0.0015, convnext-kd −0.0014 → −0.0003, effnetv2 −0.0021 → −0.0034
                               # (0.1: vit −0.016)
QAT_KD_ALPHA = 0.5             # QAT distils from the fp32 parent on the same crops (shared.distill); 0: labels only
CALIBRATION_BATCHES = 16       # batches of random training crops (one per record) for static int8
QUICK_MAX_BATCHES = 3
ACTIVATION_RANGE = "per window for heads (shared.formats.dynamic_int8)"  # dynamic int8's activation scales

warnings.filterwarnings("ignore", message=".*quantize_dynamic.*")


def example_input(cache, adapter: InputAdapter, n: int = 2) -> torch.Tensor:
    x, _ = ECGDataset(cache, "train").__getitems__(range(n))
    return adapter.eval_inputs(x)[0][:n]


def finetune(model: nn.Module, cfg: dict, cache, adapter: InputAdapter, epochs: int, max_batches: int | None,
             desc: str, lr_factor: float = FINETUNE_LR_FACTOR, teacher: nn.Module | None = None,
             kd_alpha: float = 0.0) -> None:
    """Fine-tune on training crops; with a teacher (the fp32 parent) the loss also distils its outputs on the
    same crops (shared.distill)."""
    loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 17,
                         drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"] * lr_factor, weight_decay=cfg["weight_decay"])
    distil = teacher is not None and kd_alpha > 0
    loss_fn = WithTeacher(kd_alpha, KD_TEMPERATURE) if distil else nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(cfg["seed"] + 23)
    device = torch.device("cpu")
    for epoch in range(epochs):
        steps = min(len(loader), max_batches or len(loader))
        progress = meter(steps, f"{desc} {epoch + 1}/{epochs}", "batch", leave=False)
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            inputs = adapter.train_input(x, gen)
            targets = (y, teacher_logits(teacher, inputs)) if distil else y
            loss = train_step(model, opt, loss_fn, inputs, targets, device, False, cfg["grad_clip"])
            progress.set_postfix(loss=f"{loss:.4f}")
            progress.update()
        progress.close()


# ------------------------------------------------------------------ methods
def prune_layers(model: nn.Module, amount: float, layers: str, global_threshold: bool) -> list[tuple[nn.Module, str]]:
    import torch.nn.utils.prune as prune

    kinds = {"conv": (nn.Conv1d, nn.Conv2d), "linear": (nn.Linear,)}
    types = tuple(t for k in layers.split(",") for t in kinds[k.strip()])
    targets = [(m, "weight") for m in model.modules() if isinstance(m, types)]
    if not targets:
        raise ValueError(f"no {layers} layers to prune")
    if global_threshold:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m, name in targets:
            prune.l1_unstructured(m, name, amount=amount)
    return targets


def do_prune(model, cfg, cache, adapter, out: Path, quick: bool, amount=PRUNE_AMOUNT, layers=None,
             global_threshold=PRUNE_GLOBAL) -> dict:
    import torch.nn.utils.prune as prune

    layers = layers or ("conv,linear" if cfg["model"] in TRANSFORMERS else PRUNE_LAYERS)
    targets = prune_layers(model, amount, layers, global_threshold)
    finetune(model, cfg, cache, adapter, 1 if quick else FINETUNE_EPOCHS, QUICK_MAX_BATCHES if quick else None,
             "prune fine-tune")
    for m, name in targets:
        prune.remove(m, name)  # permanent: the zeros are now plain weights
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    sparse_keys = [f"{names[id(m)]}.weight" for m, _ in targets]
    sd = model.state_dict()
    pruned_total = sum(sd[k].numel() for k in sparse_keys)
    pruned_zero = sum(int((sd[k] == 0).sum()) for k in sparse_keys)
    save_sparse(out / "sparse.safetensors", sd, sparse_keys)
    save_weights(out / "dense.safetensors", sd)  # kept to report the dense size beside the sparse one
    total, nonzero = nonzero_parameters(sd)
    return {"artifact": "sparse.safetensors", "amount": amount, "layers": layers, "global": global_threshold,
            "finetune_epochs": 1 if quick else FINETUNE_EPOCHS, "pruned_tensors": len(sparse_keys),
            "sparsity_in_pruned_layers": pruned_zero / pruned_total, "sparsity_overall": 1 - nonzero / total,
            "nonzero_params": nonzero, "params": total,
            "dense_bytes": (out / "dense.safetensors").stat().st_size}


def do_dynamic(model, cfg, cache, adapter, out: Path, quick: bool) -> dict:
    qmodel = quantize_dynamic(model)
    save_dynamic(out / "int8.safetensors", qmodel)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    return {"artifact": "int8.safetensors", "quantized_layers": "Linear", "linear_layers": n_linear,
            "activation_range": ACTIVATION_RANGE}, qmodel


def _quantizer(is_qat: bool, fp32_modules: tuple[str, ...] = ()):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat))
    for name in fp32_modules:
        q.set_module_name_qconfig(name, None)
    return q


def do_static(model, cfg, cache, adapter, out: Path, quick: bool, batches: int = CALIBRATION_BATCHES) -> tuple:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = example_input(cache, adapter)
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
    fp32_modules, fp32_reason = int8_fp32_modules(cfg["model"])
    prepared = prepare_pt2e(graph, _quantizer(False, fp32_modules))
    n = min(batches, QUICK_MAX_BATCHES) if quick else batches
    with torch.no_grad():  # crops like training's, not every sliding window: observers cost 7× less per record
        for x in bar(calibration_inputs(cache, adapter, cfg, n), "calibrate", total=n):
            prepared(x)
    converted = convert_pt2e(prepared)
    save_exported(out / "model.pt2", converted, example)
    return {"artifact": "model.pt2", "api": "torchao PT2E + X86InductorQuantizer", "calibration_batches": n,
            "calibration_split": "train", "calibration_inputs": "random training crops",
            "fp32_modules": list(fp32_modules), "fp32_reason": fp32_reason}, converted


def do_qat(model, cfg, cache, adapter, out: Path, quick: bool, kd_alpha: float = QAT_KD_ALPHA) -> tuple:
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    teacher = copy.deepcopy(model).eval() if kd_alpha > 0 else None  # frozen: QAT updates the shared weights
    example = example_input(cache, adapter, n=4)
    batch = torch.export.Dim("batch", min=2, max=4096)
    graph = torch.export.export(model.train(), (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_qat_pt2e(graph, _quantizer(True))
    allow_exported_model_train_eval(prepared)
    epochs = 1 if quick else QAT_EPOCHS
    finetune(prepared, cfg, cache, adapter, epochs, QUICK_MAX_BATCHES if quick else None, "QAT", QAT_LR_FACTOR,
             teacher=teacher, kd_alpha=kd_alpha)
    prepared.eval()
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    converted.eval()
    save_exported(out / "model.pt2", converted, example)
    return {"artifact": "model.pt2", "api": "torchao PT2E QAT + X86InductorQuantizer", "qat_epochs": epochs,
            "qat_lr": cfg["lr"] * QAT_LR_FACTOR, "qat_lr_factor": QAT_LR_FACTOR,
            "distilled_from": "the fp32 parent" if teacher else None, "kd_alpha": kd_alpha,
            "kd_temperature": KD_TEMPERATURE}, converted


# ------------------------------------------------------------------ driver
def compress(run_dir: Path, methods: list[str], data_dir: Path | None = None, out_root: Path | None = None,
             force: bool = False, qat_kd_alpha: float = QAT_KD_ALPHA) -> dict:
    _, cfg = load_run(run_dir)
    cache = open_cache(data_dir or data_cache_dir(cfg["sampling_rate"]))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    quick = cfg.get("profile") == "quick"
    root = (out_root or compressed_dir()) / run_dir.name
    results, failures = {}, []
    source_sha256 = checkpoint_sha256(run_dir)
    for method in methods:
        out = root / method
        done = finished_variant(out, run_dir, source_sha256, force or _recipe_changed(out, method, cfg, qat_kd_alpha))
        if done is not None:
            results[method] = done
            continue
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg["seed"])
        model, _ = load_run(run_dir)  # a fresh fp32 copy for every method
        t0 = time.time()
        try:
            info, evaluated = _apply(method, model, cfg, cache, adapter, out, quick, qat_kd_alpha)
            seconds = time.time() - t0
            if method not in COMPILED_METHODS:
                evaluated = channels_last_if_configured(evaluated, cfg)
            metrics = validation_scores(evaluated, cache, adapter)
        except Exception as e:  # e.g. the X86 quantizer cannot annotate a pattern, inductor cannot lower it
            failures.append(f"{run_dir.name}/{method}: {type(e).__name__}: {first_line(e)}")
            print(f"error: {failures[-1]}", file=sys.stderr)
            continue
        info.update(method="pruned" if method == "prune" else method, run=str(run_dir.resolve()),
                    source_sha256=source_sha256, model=cfg["model"], representation=cfg["representation"],
                    seconds=round(seconds, 1),
                    versions=library_versions())
        write_json_atomic(out / "variant.json", info)
        metrics.update(method=info["method"], run=run_dir.name, artifact_bytes=(out / info["artifact"]).stat().st_size,
                       fp32_bytes=(run_dir / "best.safetensors").stat().st_size)
        results[method] = record_variant(out, metrics, run_dir, f"{run_dir.name}/{method}", f", {seconds:.0f} s" + (
            f"; fp32: {', '.join(info['fp32_modules'])}" if info.get("fp32_modules") else ""))
    if failures:
        raise CompressionFailed("; ".join(failures))
    return results


def _recipe_changed(out: Path, method: str, cfg: dict, qat_kd_alpha: float) -> bool:
    """A finished variant made by another recipe than today's is redone: a static one with other fp32 modules
    than INT8_FP32_MODULES names, a dynamic one whose heads took one activation range per batch, a QAT one
    distilled with another weight or trained at another learning rate."""
    if method == "static":
        return fp32_modules_changed(out, cfg["model"])
    if method == "dynamic":
        return recipe_changed(out, "activation_range", ACTIVATION_RANGE, None, "another activation range than")
    if method == "qat":
        return (recipe_changed(out, "kd_alpha", qat_kd_alpha, None, "another distillation weight than")
                or recipe_changed(out, "qat_lr_factor", QAT_LR_FACTOR, None, "another learning-rate factor than"))
    return False


class CompressionFailed(RuntimeError):
    pass


def _apply(method, model, cfg, cache, adapter, out, quick, qat_kd_alpha=QAT_KD_ALPHA):
    """Run one method; return (variant info, the model to evaluate)."""
    if method == "prune":
        return do_prune(model, cfg, cache, adapter, out, quick), model
    if method == "dynamic":
        return do_dynamic(model, cfg, cache, adapter, out, quick)
    if method in COMPILED_METHODS:
        info, _ = (do_static(model, cfg, cache, adapter, out, quick) if method == "static"
                   else do_qat(model, cfg, cache, adapter, out, quick, qat_kd_alpha))
        # int8 kernels exist only once inductor lowers the graph, and lowering can fail: build the package that
        # eval-all and predict load (shared.formats.compiled.load_compiled) here, and score the variant with it
        compiled = load_compiled(out, info["artifact"])
        info["compile_seconds"] = read_json(out / COMPILED_STAMP)["seconds"]
        return info, compiled
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=MODELS, help="compress artifacts/runs/<model>-<repr>-<profile>")
    src.add_argument("--run", type=Path, help="a training run folder")
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"))
    ap.add_argument("--representation", default=os.environ.get("REPR") or None)
    add_kd_choice(ap)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of %(default)s")
    ap.add_argument("--data", type=Path, default=None, help="cache folder (default from the run's sampling rate)")
    ap.add_argument("--out", type=Path, default=None, help="output root (default artifacts/compressed)")
    ap.add_argument("--force", action="store_true", help="redo finished variants")
    ap.add_argument("--qat-kd-alpha", type=float, default=QAT_KD_ALPHA,
                    help="weight of distillation from the fp32 parent in QAT (0: labels only; default %(default)s)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {METHODS}", file=sys.stderr)
        return 2
    try:
        run = args.run or find_run(args.model, args.profile, args.representation, args.kd)
        compress(run, methods, args.data, args.out, args.force, args.qat_kd_alpha)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CompressionFailed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
