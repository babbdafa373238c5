"""Side-by-side figures for one trained model and every variant of it, in one process, on this CPU:
file size, parameters / non-zeros, MACs per window (torch.utils.flop_counter on the network the variant
computes), val macro AUC (test macro AUC from eval-all's result.json where it has scored the variant;
compression never reads the test fold), and windows/s at batch 1 and 32 with 1 and 2 threads — for fp32,
bf16 autocast, pruned, structured, dynamic / static / QAT int8, ONNX Runtime and OpenVINO fp32 / int8.

Ratios, never absolute times, are what compare across machines: each row's speed-up over the run's fp32
PyTorch model (timed in alternating rounds with it, so that a host slowing down under other load shifts both
sides of each ratio alike) and over the same runtime's fp32 (what int8 or pruning buys apart from the runtime), the
achieved GMAC/s, and the speed-up the MAC ratio alone predicts. `--isa AVX2` runs the same measurement
again with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA: PyTorch's and OpenVINO's CPU kernels), as a user
without AVX-512/VNNI would see it; ONNX Runtime's MLAS does not read that variable, so its rows stay uncapped.

Prints Markdown tables and writes artifacts/compressed/<run>/benchmark[-<isa>].json. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch


from shared.formats.compiled import COMPILED_METHODS
from shared.formats.sparse import nonzero_parameters
from shared.hardware import host_cpu
from shared.runs import load_run
from shared.variants import load_variant
from shared.cache import CacheError, open_cache
from shared.cli import add_run_choice, chosen_run
from shared.dataset import ECGDataset
from shared.io import first_line, read_json, write_json_atomic
from shared.paths import compressed_dir, data_cache_dir, eval_dir
from shared.results import COLLAPSE_AUC, DEPLOY_AUC_BUDGET
from shared.timing import time_forward
from shared.inputs import InputAdapter
from shared.prediction import autocast, predict_dataset, scores

VARIANTS = ("fp32", "bf16", "prune", "structured", "dynamic", "static", "qat", "onnx_fp32", "onnx_int8",
            "openvino_fp32", "openvino_int8", "structured_openvino_fp32", "structured_openvino_int8")
# the fp32 row of the same runtime, for "× same runtime fp32": what int8 alone, or pruning alone, buys there
RUNTIME_FP32 = {"onnx_int8": "onnx_fp32", "openvino_int8": "openvino_fp32",
                "structured_openvino_fp32": "openvino_fp32", "structured_openvino_int8": "structured_openvino_fp32"}
BATCHES = (1, 32)
THREADS = (1, 2)
ROUNDS = 4         # alternating rounds of a variant's and the fp32 model's forwards per setting
RUNS = 5           # timed forward passes per model and round (after warm-up)
WARMUP = 3         # untimed forwards before each model in the first two rounds (1 in each later one)

warnings.filterwarnings("ignore")


def throughput(model, x: torch.Tensor, bf16: bool = False) -> float:
    with autocast(torch.device("cpu"), bf16):
        return len(x) / float(np.median(time_forward(model, x, ROUNDS * RUNS, WARMUP)))


def paired_speedup(model, fp32, x: torch.Tensor, bf16: bool = False) -> tuple[float, float]:
    """(windows/s of `model`, its speed-up over `fp32`): the median of per-round time ratios over ROUNDS rounds
    that alternate the two (which goes first alternates too). Timed minutes apart, one model's figure would carry
    the host's drift between them."""
    times, ratios = [], []
    for i in range(ROUNDS):
        warmup = WARMUP if i < 2 else 1
        timed = {}
        for name in (("model", "fp32") if i % 2 == 0 else ("fp32", "model")):
            with autocast(torch.device("cpu"), bf16 and name == "model"):
                timed[name] = time_forward(model if name == "model" else fp32, x, RUNS, warmup)
        ratios.append(float(np.median(timed["fp32"]) / np.median(timed["model"])))
        times.extend(timed["model"])
    return len(x) / float(np.median(times)), float(np.median(ratios))


def evaluated_test_auc(run: str, variant: str, variant_dir: Path) -> float | None:
    """Test macro AUC as eval-all scored this variant folder, or None: before `make eval-all`, for another
    folder of the same name (--compressed elsewhere), or when the variant was made again after it was scored."""
    result = eval_dir() / run / variant / "result.json"
    if not result.exists() or result.stat().st_mtime <= (variant_dir / "metrics.json").stat().st_mtime:
        return None
    scored = read_json(result)
    if Path(scored.get("path", "")).resolve() != variant_dir.resolve():
        return None
    return scored["splits"]["test"]["macro_auc"]


def macs_per_window(model: torch.nn.Module, window: torch.Tensor) -> int | None:
    """Multiply-accumulates of one window through an eager network (FLOPs / 2), or None for graphs that the
    flop counter cannot run (exported int8 programs, ONNX / OpenVINO sessions)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, torch.nn.Module):
        return None
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(window[:1])
        return int(counter.get_total_flops() // 2)
    except Exception:
        return None


def open_run(run: Path) -> tuple[torch.nn.Module, dict, dict]:
    """(fp32 model, config, metrics) of a finished training run: the figures compare against its metrics.json."""
    if not (run / "metrics.json").exists():
        what = "unfinished training run" if run.is_dir() else "no such training run"
        raise FileNotFoundError(f"{run}: {what} (no metrics.json); train it first (make train-<model>)")
    fp32, cfg = load_run(run)
    return fp32, cfg, read_json(run / "metrics.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_choice(ap, "benchmark the variants of")
    ap.add_argument("--compressed", type=Path, default=None, help="default artifacts/compressed/<run>")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--isa", default=None, help="also measure with oneDNN capped at this ISA (e.g. AVX2), in a "
                                                "second process")
    args = ap.parse_args(argv)
    try:
        run = chosen_run(args)
        root = args.compressed or compressed_dir() / run.name
        fp32, cfg, run_metrics = open_run(run)
        cache = open_cache(args.data or data_cache_dir(cfg["sampling_rate"]))
    except (FileNotFoundError, ValueError, CacheError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    adapter = InputAdapter(cfg, cache.sampling_rate)
    x_all, _ = ECGDataset(cache, "val").__getitems__(range(32))
    inputs = adapter.eval_inputs(x_all)[0][:32]
    rows = [r for r in (measure(v, run, root, fp32, cfg, cache, adapter, run_metrics, inputs) for v in VARIANTS) if r]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    md = table(run.name, rows, isa) + "\n" + "\n".join(summary(rows)) + "\n"
    print(md)
    write_json_atomic(root / f"benchmark{'-' + isa.lower() if isa else ''}.json",
                      {"run": run.name, "isa_cap": isa, "cpu": host_cpu(), "rows": rows, "markdown": md})
    if args.isa and not isa:
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": args.isa.upper(), "DNNL_MAX_CPU_ISA": args.isa.upper()}
        cmd = [sys.executable, "-m", "compression.benchmark", "--run", str(run), "--compressed", str(root)]
        return subprocess.run(cmd + (["--data", str(args.data)] if args.data else []), env=env).returncode
    return 0


def measure(variant, run, root, fp32, cfg, cache, adapter, run_metrics, inputs) -> dict | None:
    """One row: size, parameters, MACs, AUCs and windows/s of one variant (None when it is not made)."""
    vdir = root / variant
    if variant in ("fp32", "bf16"):
        model, size, info = fp32, (run / "best.safetensors").stat().st_size, {}
        val, test = bf16_aucs(fp32, cache, adapter) if variant == "bf16" else \
            (run_metrics["val"]["macro_auc"], run_metrics["test"]["macro_auc"])
    else:
        if not (vdir / "metrics.json").exists():
            make = {"onnx": "export-<model>", "openvino": "export-openvino-<model>"}.get(
                variant.split("_")[0], "quantize-<model>, prune-<model> or prune-structured-<model>")
            print(f"skip {variant}: {vdir} has no finished variant (make {make})")
            return None
        model, _, info = load_variant(vdir, compiled=variant in COMPILED_METHODS)
        m = read_json(vdir / "metrics.json")
        size, val = m["artifact_bytes"], m["val"]["macro_auc"]
        test = m["test"]["macro_auc"] if "test" in m else evaluated_test_auc(run.name, variant, vdir)
    # the network the variant computes, for its parameters and MACs (int8 graphs and runtimes hide theirs)
    network = model if variant in ("fp32", "bf16", "prune", "structured") else \
        load_variant(root / "structured")[0] if variant.startswith("structured_openvino") else fp32
    if variant != "prune":
        total, nonzero = nonzero_parameters(network.state_dict())
    else:
        total, nonzero = info.get("params"), info.get("nonzero_params")
    row = {"variant": variant, "bytes": size, "params": total, "nonzero": nonzero, "val_auc": val, "test_auc": test,
           "macs": macs_per_window(network, inputs), "x_fp32": {}}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for b in BATCHES:
            key = f"b{b}_t{threads}"
            if variant == "fp32":
                row[key], row["x_fp32"][key] = throughput(model, inputs[:b]), 1.0
            else:
                row[key], row["x_fp32"][key] = paired_speedup(model, fp32, inputs[:b], bf16=variant == "bf16")
    print(f"{variant}: done", flush=True)
    return row


def bf16_aucs(fp32, cache, adapter) -> tuple[float, float]:
    aucs = []
    for split in ("val", "test"):
        with autocast(torch.device("cpu"), True):
            probs, labels = predict_dataset(fp32, ECGDataset(cache, split), adapter)
        aucs.append(scores(labels, probs, cache.classes)["macro_auc"])
    return aucs[0], aucs[1]


def table(run_name: str, rows: list[dict], isa: str | None) -> str:
    base = rows[0]
    by = {r["variant"]: r for r in rows}
    lines = [f"### {run_name} on {host_cpu()}" + (f", oneDNN capped at {isa}" if isa else ""), "",
             "| variant | size MB | × smaller | non-zeros | MMACs/window | val AUC | Δ val | test AUC | "
             + " | ".join(f"b{b}/{t}t w/s" for t in THREADS for b in BATCHES)
             + " | b32/1t × fp32 | b1/1t × fp32 | b32/1t × same-runtime fp32 | GMAC/s b32/1t | MAC-predicted × |",
             "|---|" + "---:|" * (7 + len(THREADS) * len(BATCHES) + 5)]
    for r in rows:
        speeds = " | ".join(f"{r[f'b{b}_t{t}']:.1f}" for t in THREADS for b in BATCHES)
        same = by.get(RUNTIME_FP32.get(r["variant"], "fp32"))
        macs = r["macs"] or base["macs"]
        lines.append(
            f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {base['bytes'] / r['bytes']:.2f} | {r['nonzero']:,} | "
            f"{_num(macs, 1e-6, '.1f')} | {r['val_auc']:.4f} | {r['val_auc'] - base['val_auc']:+.4f} | "
            f"{_num(r['test_auc'], 1, '.4f')} | {speeds} | {_x(r, 'b32_t1'):.2f} | "
            f"{_x(r, 'b1_t1'):.2f} | {_num(same and _x(r, 'b32_t1') / _x(same, 'b32_t1'), 1, '.2f')} | "
            f"{_num(macs and macs * r['b32_t1'], 1e-9, '.1f')} | {_num(base['macs'] and macs and base['macs'] / macs, 1, '.2f')} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """What a deployment decision needs, in a few lines: the recommended artifact (fastest at batch 32 on one
    thread within DEPLOY_AUC_BUDGET validation macro AUC of fp32, as the report chooses), the smallest such one,
    what int8 buys over its own runtime's fp32, what structured pruning alone buys, and what collapsed."""
    base, by = rows[0], {r["variant"]: r for r in rows}

    def vs_fp32(r):
        return (f"{r['variant']}: b32/1t {_x(r, 'b32_t1'):.2f}× fp32, b1/1t "
                f"{_x(r, 'b1_t1'):.2f}×, {base['bytes'] / r['bytes']:.2f}× smaller, "
                f"Δ val {r['val_auc'] - base['val_auc']:+.4f}")

    ok = [r for r in rows if base["val_auc"] - r["val_auc"] <= DEPLOY_AUC_BUDGET]
    lines = [f"- recommended (fastest b32/1t within {DEPLOY_AUC_BUDGET} val AUC): "
             + vs_fp32(max(ok, key=lambda r: _x(r, "b32_t1"))),
             "- smallest within the same budget: " + vs_fp32(max(ok, key=lambda r: base["bytes"] / r["bytes"]))]
    for int8, fp in RUNTIME_FP32.items():
        if int8 in by and fp in by:
            lines.append(f"- {int8} over {fp}: b32/1t {_x(by[int8], 'b32_t1') / _x(by[fp], 'b32_t1'):.2f}×, "
                         f"b1/1t {_x(by[int8], 'b1_t1') / _x(by[fp], 'b1_t1'):.2f}×")
    if "structured" in by:
        r = by["structured"]
        lines.append(f"- structured fp32 alone: {1 - r['params'] / base['params']:.1%} fewer parameters, "
                     f"b32/1t {_x(r, 'b32_t1'):.2f}×, b1/1t {_x(r, 'b1_t1'):.2f}×")
    collapsed = [f"{r['variant']} ({r['val_auc'] - base['val_auc']:+.4f})" for r in rows
                 if base["val_auc"] - r["val_auc"] > COLLAPSE_AUC]
    lines.append(f"- flagged (lose > {COLLAPSE_AUC} val AUC): {', '.join(collapsed) or 'none'}")
    return lines


def _x(row: dict, key: str) -> float:
    """The row's speed-up over the fp32 PyTorch model, timed alternately with it (paired_speedup)."""
    return row["x_fp32"][key]


def _num(v, scale, spec) -> str:
    return "—" if v is None else format(v * scale, spec)


if __name__ == "__main__":
    sys.exit(main())
