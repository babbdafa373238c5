"""Where an OpenVINO IR spends its time: per-operation-type share of one forward pass from the CPU plugin's
performance counters (PERF_COUNT), with the kernels that ran (e.g. brgconv_avx512_amx_1x1_i8, jit_avx512_f32).
Shows what int8 can and cannot speed up in a network, e.g. `python -m compression.profile_openvino
artifacts/compressed/convnext-strip-cpu/openvino_fp32/model.xml artifacts/compressed/convnext-strip-cpu/openvino_int8/model.xml`.
Times are for one process on this CPU; compare shares and the fp32/int8 pair, not absolute figures across hosts.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

BATCH = 32
THREADS = 1
RUNS = 5        # profiled forward passes, after WARMUP
WARMUP = 3
TOP = 8         # operation types listed per IR


def profile(xml: Path, batch: int = BATCH, threads: int = THREADS) -> tuple[float, list[tuple[str, float, str]]]:
    """(ms per forward, [(operation type, share of the time, its kernels)]) of one IR on random input."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    shape = [batch] + [d.get_length() for d in list(model.input(0).get_partial_shape())[1:]]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(WARMUP):
        request.infer({0: x})
    per_type, kernels = collections.Counter(), collections.defaultdict(collections.Counter)
    for _ in range(RUNS):
        request.infer({0: x})
        for p in request.profiling_info:
            us = p.real_time.total_seconds() * 1e6
            per_type[p.node_type] += us
            kernels[p.node_type][p.exec_type] += us
    total = sum(per_type.values()) or 1.0
    rows = [(kind, us / total, ", ".join(f"{k} {v / us:.0%}" for k, v in kernels[kind].most_common(2)))
            for kind, us in per_type.most_common() if us > 0]  # inputs, constants, results take no time
    return total / RUNS / 1000, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.profile_openvino", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("xml", nargs="+", type=Path, help="OpenVINO IR files (model.xml with model.bin beside it)")
    ap.add_argument("--batch", type=int, default=BATCH, help="windows per forward (default %(default)s)")
    ap.add_argument("--threads", type=int, default=THREADS, help="CPU threads (default %(default)s)")
    ap.add_argument("--top", type=int, default=TOP, help="operation types listed per IR (default %(default)s)")
    args = ap.parse_args(argv)
    for xml in args.xml:
        if not xml.exists() or not xml.with_suffix(".bin").exists():
            print(f"error: {xml}: OpenVINO IR not found (model.xml and model.bin)", file=sys.stderr)
            return 2
        ms, rows = profile(xml, args.batch, args.threads)
        print(f"{xml}: {ms:.1f} ms per batch of {args.batch}, {args.threads} thread(s)")
        for kind, share, kernels in rows[:args.top]:
            print(f"  {kind:24s} {share:6.1%}  {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
