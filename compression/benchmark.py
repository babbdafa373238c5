"""Side-by-side figures for one trained model and its compressed variants, in one process, on this CPU:
file size, parameters / non-zeros, val macro AUC (test macro AUC from eval-all's result.json where it has
scored the variant; compress itself never reads the test fold), and throughput (samples/s) at batch 1 and 32
with 1 and 2 threads, for fp32, bf16 autocast, pruned, dynamic int8, static int8 and QAT int8, and the
ONNX Runtime fp32 / int8 exports of compression/export_onnx.py (their sessions follow torch.set_num_threads).

Prints a Markdown table and writes artifacts/compressed/<run>/benchmark.json. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared import artifacts as art  # noqa: E402
from shared.cache import CacheError, open_cache  # noqa: E402
from shared.dataset import ECGDataset  # noqa: E402
from shared.io import first_line, read_json, write_json_atomic  # noqa: E402
from shared.paths import compressed_dir, data_cache_dir, eval_dir, runs_dir  # noqa: E402
from shared.timing import time_forward  # noqa: E402
from shared.training import InputAdapter, autocast, predict_dataset, scores  # noqa: E402

VARIANTS = ("fp32", "bf16", "prune", "dynamic", "static", "qat", "onnx_fp32", "onnx_int8", "openvino_fp32",
            "openvino_int8")
BATCHES = (1, 32)
THREADS = (1, 2)
RUNS = 20          # timed forward passes per setting (after warm-up)
WARMUP = 3

warnings.filterwarnings("ignore")


def throughput(model, x: torch.Tensor, bf16: bool = False) -> float:
    with autocast(torch.device("cpu"), bf16):
        return len(x) / float(np.median(time_forward(model, x, RUNS, WARMUP)))


def evaluated_test_auc(run: str, variant: str) -> float | None:
    """Test macro AUC as eval-all scored it, or None before `make eval-all`."""
    result = eval_dir() / run / variant / "result.json"
    return read_json(result)["splits"]["test"]["macro_auc"] if result.exists() else None


def open_run(run: Path) -> tuple[torch.nn.Module, dict, dict]:
    """(fp32 model, config, metrics) of a finished training run: the figures compare against its metrics.json."""
    if not (run / "metrics.json").exists():
        what = "unfinished training run" if run.is_dir() else "no such training run"
        raise FileNotFoundError(f"{run}: {what} (no metrics.json); train it first (make train-<model>)")
    fp32, cfg = art.load_run(run)
    return fp32, cfg, read_json(run / "metrics.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training run folder (artifacts/runs/<run>)")
    ap.add_argument("--compressed", type=Path, default=None, help="default artifacts/compressed/<run>")
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)
    run = args.run if args.run.exists() else runs_dir() / str(args.run)
    root = args.compressed or compressed_dir() / run.name
    try:
        fp32, cfg, run_metrics = open_run(run)
        cache = open_cache(args.data or data_cache_dir(cfg.get("sampling_rate", 100)))
    except (FileNotFoundError, ValueError, CacheError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    adapter = InputAdapter(cfg, cache.sampling_rate)
    x_all, _ = ECGDataset(cache, "val").__getitems__(range(32))
    inputs = adapter.eval_inputs(x_all)[0][:32]
    rows = []
    for variant in VARIANTS:
        vdir = root / variant
        if variant in ("fp32", "bf16"):
            model, size = fp32, (run / "best.safetensors").stat().st_size
            total, nonzero = art.nonzero_parameters(fp32.state_dict())
            if variant == "fp32":
                val, test = run_metrics["val"]["macro_auc"], run_metrics["test"]["macro_auc"]
            else:
                aucs = []
                for split in ("val", "test"):
                    with autocast(torch.device("cpu"), True):
                        probs, labels = predict_dataset(fp32, ECGDataset(cache, split), adapter)
                    aucs.append(scores(labels, probs, cache.classes)["macro_auc"])
                val, test = aucs
        else:
            if not (vdir / "metrics.json").exists():
                make = {"onnx": "export-<model>", "openvino": "export-openvino-<model>"}.get(variant.split("_")[0],
                                                                                         "quantize-<model> or prune-<model>")
                print(f"skip {variant}: {vdir} has no finished variant (make {make})")
                continue
            model, _, info = art.load_variant(vdir, compiled=variant in art.COMPILED_METHODS)
            m = read_json(vdir / "metrics.json")
            size, val = m["artifact_bytes"], m["val"]["macro_auc"]
            test = m["test"]["macro_auc"] if "test" in m else evaluated_test_auc(run.name, variant)
            total, nonzero = (info.get("params"), info.get("nonzero_params")) if variant == "prune" else \
                art.nonzero_parameters(fp32.state_dict())
        row = {"variant": variant, "bytes": size, "params": total, "nonzero": nonzero, "val_auc": val,
               "test_auc": test}
        for threads in THREADS:
            torch.set_num_threads(threads)
            for b in BATCHES:
                row[f"b{b}_t{threads}"] = throughput(model, inputs[:b], bf16=variant == "bf16")
        rows.append(row)
        print(f"{variant}: done", flush=True)
    base = rows[0]
    lines = [f"### {run.name} on this CPU ({os.cpu_count()} cores)", "",
             "| variant | size MB | × smaller | non-zeros | val AUC | Δ val | test AUC | "
             + " | ".join(f"b{b}/{t}t s/s" for t in THREADS for b in BATCHES) + " | b32/2t × fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(THREADS) * len(BATCHES) + 1)]
    for r in rows:
        speeds = " | ".join(f"{r[f'b{b}_t{t}']:.1f}" for t in THREADS for b in BATCHES)
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {base['bytes'] / r['bytes']:.2f} | "
                     f"{r['nonzero']:,} | {r['val_auc']:.4f} | {r['val_auc'] - base['val_auc']:+.4f} | "
                     f"{'—' if r['test_auc'] is None else format(r['test_auc'], '.4f')} | {speeds} | {r['b32_t2'] / base['b32_t2']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_json_atomic(root / "benchmark.json", {"run": run.name, "rows": rows, "markdown": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
