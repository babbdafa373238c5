"""Benchmark of the data stage. Prints figures; asserts nothing (speed goals are not unit tests).

1. records/s of the cache build vs a plain sequential `wfdb.rdsamp` loop over the same records.
2. wall time and peak RSS of `python -m data_prep.build_cache` on a full-size synthetic PTB-XL.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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


def bench_full_size(records: int, keep: Path | None) -> None:
    from data_prep.synth import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        src = keep if keep else Path(tmp) / "synth"
        if not (src / "ptbxl_database.csv").exists():
            print(f"\nwriting {records} synthetic records (100 Hz) to {src} ...")
            make_dataset(src, records, (100,), seed=0, checksums=False, workers=os.cpu_count() or 1)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep.build_cache", "--ptbxl-dir", str(src), "--out",
                        f"{tmp}/cache"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size_mb = (Path(tmp) / "cache" / "signals.npy").stat().st_size / 2**20
    print(f"\n[full-size synthetic PTB-XL: {records} records, 100 Hz]")
    print(f"  build_cache wall time: {wall:.1f} s (goal < 60 s)")
    print(f"  peak RSS of the largest child process: {peak_mb:.0f} MB (goal < 2048 MB)")
    print(f"  signals.npy: {size_mb:.0f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=Path(os.environ.get("PTBXL_SAMPLE", DEFAULT_SAMPLE)))
    ap.add_argument("--full-records", type=int, default=21799, help="0 skips the full-size run")
    ap.add_argument("--keep-synth", type=Path, default=None, help="reuse/keep the synthetic folder here")
    args = ap.parse_args(argv)
    for fs in (100, 500):
        bench_vs_wfdb(args.sample, fs)
    if args.full_records:
        bench_full_size(args.full_records, args.keep_synth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
