"""Benchmark of the data stage. Prints figures; asserts nothing (speed goals are not unit tests).

1. records/s of the cache build vs a plain sequential `wfdb.rdsamp` loop over the same records.
2. wall time, peak RSS and disk use of `python -m data_prep.build_cache` on a full-size synthetic PTB-XL
   (100 or 500 Hz).
3. with --train-step: peak RSS of one PROFILE=full training step per model on the CPU, on that cache
   (nothing may load the whole signal array: the memory-mapped cache is read batch by batch).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DEFAULT_SAMPLE = Path(os.environ.get("PTBXL_SAMPLE") or REPO / "tests" / "data" / "ptbxl-mini")


def bench_vs_wfdb(sample: Path, sampling_rate: int) -> None:
    import pandas as pd
    import wfdb
    from tqdm import tqdm

    db = pd.read_csv(sample / "ptbxl_database.csv")
    col = "filename_lr" if sampling_rate == 100 else "filename_hr"
    paths = [sample / p for p in db[col] if (sample / f"{p}.hea").exists()]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep.build_cache", "--ptbxl-dir", str(sample), "--out",
                        f"{tmp}/cache", "--sampling-rate", str(sampling_rate)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep.build_cache", "--ptbxl-dir", str(sample), "--out",
                        f"{tmp}/cache", "--sampling-rate", str(sampling_rate)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        noop = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in tqdm(paths, desc="wfdb.rdsamp loop", unit="rec", mininterval=1):
        wfdb.rdsamp(str(p))
    ref = time.perf_counter() - t0
    n = len(paths)
    print(f"\n[{sampling_rate} Hz, {n} records of {sample}]")
    print(f"  build_cache (whole process, labels+checks+cache written): {ours:7.2f} s  {n / ours:8.0f} rec/s")
    print(f"  plain wfdb.rdsamp loop (reading only):                    {ref:7.2f} s  {n / ref:8.0f} rec/s")
    print(f"  speed-up: {ref / ours:.1f}x   (goal >= 10x)")
    print(f"  no-op rerun (whole process incl. interpreter start): {noop:.2f} s")


MODELS = ("vit", "deit", "effnetv2", "convnext", "resnet1d_wang", "xresnet1d101")
BUILD_GOAL_S = {100: 60, 500: 180}
RSS_GOAL_MB = 2048


def measured_run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` from the repo root, output to `log`: exit status, wall time, peak RSS, peak anonymous memory.

    os.wait4 gives the exact peak RSS of this one child, or of the largest of its own waited-for children
    (build workers, loader workers): the largest process, never their sum. That peak also counts the cache's
    memory-mapped pages, which the kernel drops at will; psutil polling (every 0.2 s) adds the whole process
    tree's summed anonymous memory (RSS minus file-backed pages), the figure that shows an array loaded whole.
    """
    import threading

    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    stop = threading.Event()
    anon = {"peak": None}
    poller = threading.Thread(target=_poll_anonymous, args=(proc.pid, stop, anon), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    stop.set()
    poller.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_anon_mb": anon["peak"], "log": log}


def _poll_anonymous(pid: int, stop, anon: dict) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    peak = 0
    while not stop.wait(0.2):
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                m = p.memory_info()
                total += m.rss - getattr(m, "shared", 0)
        except psutil.Error:
            continue
        peak = max(peak, total)
    anon["peak"] = peak / 2**20


def disk_mb(path: Path) -> float:
    """Blocks actually allocated under `path` (du), not apparent sizes."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) / 2**20


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _failure(run: dict) -> str:
    lines = run["log"].read_text(errors="replace").strip().splitlines()
    return f"FAILED (exit {run['rc']}): {lines[-1] if lines else 'no output'}"


def bench_full_size(args) -> None:
    from data_prep.synth import make_dataset

    records, fs = args.full_records, args.sampling_rate
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = args.keep_synth or tmp / "synth"
        if not (src / "ptbxl_database.csv").exists() or not (src / f"records{fs}").is_dir():
            print(f"\nwriting {records} synthetic records ({fs} Hz) to {src} ...")
            make_dataset(src, records, (fs,), seed=0, checksums=False, workers=os.cpu_count() or 1)
        build_src = short_eval_view(src, tmp / "view", args.eval_records, fs) if args.eval_records else src
        cache = tmp / "cache"
        build = measured_run([sys.executable, "-m", "data_prep.build_cache", "--ptbxl-dir", str(build_src), "--out",
                              str(cache), "--sampling-rate", str(fs)], tmp / "build.log")
        print(f"\n[synthetic PTB-XL: {records} records at {fs} Hz ({src})]")
        print(f"  source WFDB files on disk: {disk_mb(src / f'records{fs}'):.0f} MB")
        if build["rc"] != 0:
            print(f"  build_cache {_failure(build)}")
            return
        print(f"  build_cache wall time: {build['wall_s']:.1f} s (goal < {BUILD_GOAL_S[fs]} s)")
        print(f"  peak RSS of the largest process: {build['peak_rss_mb']:.0f} MB (goal < {RSS_GOAL_MB} MB); "
              f"peak anonymous memory of all its processes: {_mb(build['peak_anon_mb'])} MB")
        print(f"  cache on disk: {disk_mb(cache):.0f} MB "
              f"(signals.npy {(cache / 'signals.npy').stat().st_size / 2**20:.0f} MB)")
        if args.train_step:
            bench_train_step(cache, args, tmp)


def short_eval_view(src: Path, dest: Path, keep: int, fs: int) -> Path:
    """`src` with all but `keep` records of folds 9 (val) and 10 (test) moved to fold 8 (train): the same
    full-size memory map and a larger training split, but models.train's three scoring passes (validation before
    and after the epoch, then test) read 2×`keep` records, not ~4,400 — hours less for the 2-D models on a CPU."""
    import csv
    from collections import Counter

    dest.mkdir()
    for name in (f"records{fs}", "scp_statements.csv"):
        (dest / name).symlink_to((src / name).resolve())
    with open(src / "ptbxl_database.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    seen: Counter = Counter()
    for row in rows:
        fold = int(float(row["strat_fold"]))
        seen[fold] += 1
        if fold in (9, 10) and seen[fold] > keep:
            row["strat_fold"] = "8"
    with open(dest / "ptbxl_database.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return dest


def bench_train_step(cache: Path, args, tmp: Path) -> None:
    """One PROFILE=full training step per model on the CPU. Each run also scores validation before and after
    its epoch and the test fold once (models.train always does), so most of its wall time is evaluation."""
    sets = ["max_train_batches=2", "epochs=1", f"sampling_rate={args.sampling_rate}", *args.train_set]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    split = split_sizes(cache)
    print(f"\n[PROFILE=full, CPU, --set {' --set '.join(sets)}; {split}]")
    print(f"  {'model':<14} {'wall s':>8} {'peak RSS MB':>12} {'peak anon MB':>13}  status")
    for model in args.models:
        cmd = [sys.executable, "-m", "models.train", "--model", model, "--profile", "full", "--data", str(cache),
               "--out", str(tmp / "runs" / model), "--no-progress", "--force"]
        for item in sets:
            cmd += ["--set", item]
        run = measured_run(cmd, tmp / f"train-{model}.log", env)
        status = "ok" if run["rc"] == 0 else _failure(run)
        print(f"  {model:<14} {run['wall_s']:8.1f} {run['peak_rss_mb']:12.0f} {_mb(run['peak_anon_mb']):>13}  {status}",
              flush=True)
    print(f"  (RSS goal < {RSS_GOAL_MB} MB; peak RSS includes memory-mapped cache pages, anonymous memory does not)")


def split_sizes(cache: Path) -> str:
    from shared.io import read_json

    per_split = read_json(cache / "manifest.json")["counts"]["per_split"]
    return ", ".join(f"{k} {v['records']}" for k, v in per_split.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scale check at 500 Hz with one training step per model (the synthetic source and the cache need "
               "~8 GB under TMPDIR; --eval-records keeps the scoring passes from taking hours on a CPU):\n"
               "  python -m data_prep.benchmark --no-wfdb --sampling-rate 500 --train-step --eval-records 256")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                    help="PTB-XL folder for part 1 (env PTBXL_SAMPLE; default: the subset in tests/data)")
    ap.add_argument("--no-wfdb", action="store_true", help="skip part 1 (the comparison with a wfdb.rdsamp loop)")
    ap.add_argument("--full-records", type=int, default=21799,
                    help="records of the synthetic PTB-XL in part 2 (default: full size, %(default)s; 0 skips it)")
    ap.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100,
                    help="sampling rate of part 2 (default %(default)s)")
    ap.add_argument("--keep-synth", type=Path, default=None,
                    help="write the synthetic folder here and keep it, or reuse it if it is already there")
    ap.add_argument("--train-step", action="store_true",
                    help="after the build, one PROFILE=full training step per model on the CPU (part 3)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                    help=f"models for --train-step (default: all of {' '.join(MODELS)})")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra models.train --set override for --train-step (repeatable)")
    ap.add_argument("--eval-records", type=int, default=0, metavar="N",
                    help="keep only N records in each of folds 9 and 10, the rest moved to training (same cache size); "
                         "0 (default) keeps PTB-XL's folds")
    args = ap.parse_args(argv)
    if not args.no_wfdb:
        for fs in (100, 500):
            bench_vs_wfdb(args.sample, fs)
    if args.full_records:
        bench_full_size(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
