"""`make data`: PTB-XL (a local folder, a zip, or a download) → one verified, memory-mappable cache.

Every later stage reads only the cache (see shared/cache.py for its layout). Re-running with an
unchanged source and options is a no-op; anything else rebuilds into a temporary folder that is
renamed into place only when complete, so a killed run never leaves a cache a later stage accepts.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Knobs (overridable on the command line / through make variables).
SAMPLING_RATE = 100
TRAIN_FOLDS = "1-8"
VAL_FOLDS = "9"
TEST_FOLDS = "10"
MAX_LISTED_PROBLEMS = 1000  # per-record problems listed in the manifest (all are counted)


from shared import cache as cache_fmt
from shared.config import parse_ranges
from shared.io import library_versions, read_json, sha256_file, write_json_atomic
from shared.paths import data_cache_dir, download_dir


class SourceError(RuntimeError):
    pass


def parse_folds(text: str) -> list[int]:
    """'1-8' or '1,2,3' → [1, ..., 8]."""
    return parse_ranges(text)


# ---------------------------------------------------------------- source
def resolve_source(ptbxl_dir: str | None, sampling_rate: int, base_url: str | None) -> Path:
    """A PTB-XL folder to read: PTBXL_DIR as given, a zip extracted safely, or a verified download."""
    from data_prep import download

    if ptbxl_dir:
        src = Path(ptbxl_dir).expanduser()
        if not src.exists():
            raise SourceError(f"{src}: PTBXL_DIR does not exist")
        if src.is_file() and src.suffix == ".zip":
            try:
                return download.extract_zip_once(src, download_dir().parent / f"extracted-{src.stem}")
            except download.DownloadError as e:
                raise SourceError(str(e)) from None
        if not (src / "ptbxl_database.csv").exists():
            raise SourceError(f"{src}: not a PTB-XL folder (ptbxl_database.csv missing)")
        return src
    dest = download_dir()
    try:
        return download.fetch_ptbxl(dest, sampling_rate, base_url=base_url or download.DEFAULT_BASE_URL)
    except download.DownloadError as e:
        raise SourceError(str(e)) from None


def source_fingerprint(src: Path, sampling_rate: int, options: dict) -> str:
    """Cheap identity of the source + options: csv bytes and (name, size, mtime) of every record file."""
    h = hashlib.sha256()
    h.update(repr(sorted(options.items())).encode())
    h.update(f"format={cache_fmt.FORMAT_VERSION}".encode())
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        p = src / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    records = src / f"records{sampling_rate}"
    for dirpath, dirnames, filenames in os.walk(records):
        dirnames.sort()
        with os.scandir(dirpath) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.is_file():
                    st = entry.stat()
                    h.update(f"{dirpath}/{entry.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- npy writing without holding N×12×T in memory
def _npy_header(shape: tuple, dtype: np.dtype, length: int | None = None) -> bytes:
    """A .npy v1.0 header, padded to `length` bytes so a smaller N can be written over it in place."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    body = repr(d).encode("latin1")
    total = length or ((10 + len(body) + 1 + 63) // 64) * 64 + 64  # room for N to shrink or grow a digit
    pad = total - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header does not fit")
    return b"\x93NUMPY\x01\x00" + (total - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


# ---------------------------------------------------------------- build
def _read_one(job):
    """Worker: read and validate one record → ('ok', float32 12×T) or ('error', kind, message)."""
    from shared.records import RecordError, read_record

    path, fs = job
    try:
        return ("ok", read_record(path, expected_fs=fs)[0])
    except RecordError as e:
        return ("error", e.kind, str(e))


def _read_all(jobs: list, workers: int):
    """Records in order; 2 processes on a 2-core machine roughly halve the wall time of a full build."""
    if workers <= 1 or len(jobs) < 1000:
        yield from map(_read_one, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_read_one, jobs, chunksize=128)


class _Problems:
    """Per-record problems: all counted, the first MAX_LISTED_PROBLEMS listed; --strict stops at the first."""

    def __init__(self, strict: bool):
        self.strict, self.listed, self.counts = strict, [], Counter()

    def add(self, ecg_id, kind: str, message: str) -> None:
        if self.strict:
            raise SourceError(f"{message} (ecg_id {ecg_id}; --strict)")
        self.counts[kind] += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append({"ecg_id": ecg_id, "kind": kind, "message": message})


def _select(src: Path, sampling_rate: int, folds: dict[str, list[int]], problems: _Problems):
    """The labelled records of the split's folds (shared/database.py, as `evaluate --data` reads them)."""
    from shared.database import DatabaseError, select

    split_folds = {f for fs in folds.values() for f in fs}
    try:
        selection = select(src, sampling_rate, keep=lambda ecg_id, fold: fold in split_folds)
    except DatabaseError as e:
        raise SourceError(str(e)) from None
    for p in selection.problems:
        problems.add(p["ecg_id"], p["kind"], p["message"])
    return selection


def _stream_signals(entries: list, tmp: Path, sampling_rate: int, folds: dict[str, list[int]],
                    problems: _Problems, workers: int) -> dict:
    """Read every record and append it to tmp/signals.npy in order, hashing the bytes as they are written and
    summing the training records' per-lead moments (the normalization). Returns rows, classes and statistics."""
    from shared.progress import meter
    from shared.records import LEADS

    fold_to_split = {f: s for s, fs in folds.items() for f in fs}
    n_samples = 10 * sampling_rate
    delay = float(os.environ.get("DATA_PREP_TEST_DELAY_S", "0"))  # test-only: widens the kill window
    acc = {"rows": [], "classes": [], "warnings": [], "sum": np.zeros(len(LEADS)), "sq": np.zeros(len(LEADS)),
           "n_train_values": 0}
    header = _npy_header((len(entries), len(LEADS), n_samples), np.float32)
    with open(tmp / "signals.npy", "wb") as fsig:
        fsig.write(header)
        results = _read_all([(e.path, sampling_rate) for e in entries], 1 if delay else workers)
        # hashed while written, on a second thread (hashlib releases the GIL): no second pass over 1 GB
        data_hash, hasher = hashlib.sha256(), ThreadPoolExecutor(1)
        bar = meter(len(entries), f"records {sampling_rate} Hz", "rec", mininterval=0.5)
        for e, result in zip(entries, results):
            bar.update()
            if result[0] == "error":
                problems.add(e.ecg_id, result[1], result[2])
                continue
            raw = _add_record(acc, e, result[1], fold_to_split[e.fold])
            fsig.write(raw)
            hasher.submit(data_hash.update, raw)
            if delay:
                time.sleep(delay)
        hasher.shutdown(wait=True)
        bar.close()
        n = len(acc["rows"])
        fsig.seek(0)
        fsig.write(_npy_header((n, len(LEADS), n_samples), np.float32, length=len(header)))
        fsig.truncate(len(header) + n * len(LEADS) * n_samples * 4)
    acc["data_sha256"] = data_hash.hexdigest()
    return acc


def _add_record(acc: dict, e, signal: np.ndarray, split: str) -> bytes:
    """Account one read record (meta row, classes, flat-lead warning, training moments); its bytes to write."""
    from shared.records import LEADS

    flat = np.ptp(signal, axis=1) == 0
    if flat.any() and len(acc["warnings"]) < MAX_LISTED_PROBLEMS:
        acc["warnings"].append(f"{e.path}: flat lead(s) {', '.join(np.array(LEADS)[flat])} (kept)")
    if split == "train":
        s64 = signal.astype(np.float64)
        acc["sum"] += s64.sum(axis=1)
        acc["sq"] += np.einsum("ij,ij->i", s64, s64)
        acc["n_train_values"] += signal.shape[1]
    r = e.row
    acc["rows"].append([e.ecg_id, r["patient_id"], r["age"], r["sex"], e.fold, split, "|".join(e.classes)])
    acc["classes"].append(e.classes)
    return signal.tobytes()


def _manifest(src: Path, tmp: Path, sampling_rate: int, folds: dict, strict: bool, fingerprint: str,
              selection, problems: _Problems, acc: dict, labels: np.ndarray, seconds: float) -> dict:
    """manifest.json: where the cache came from, what was kept and skipped and why, the train-only
    normalization, every file's sha256 and the library versions."""
    from shared.labels import CLASSES
    from shared.records import LEADS

    mean = acc["sum"] / acc["n_train_values"]
    std = np.sqrt(np.maximum(acc["sq"] / acc["n_train_values"] - mean ** 2, 1e-12))
    split_of = np.array([r[5] for r in acc["rows"]])
    per_split = {s: {"records": int((split_of == s).sum()),
                     **{c: int(labels[split_of == s, i].sum()) for i, c in enumerate(CLASSES)}}
                 for s in cache_fmt.SPLITS}
    db_path = selection.database
    return {
        "format": cache_fmt.FORMAT, "format_version": cache_fmt.FORMAT_VERSION, "complete": True,
        "created_unix": time.time(),
        "source": {"path": str(src), "fingerprint": fingerprint, "database_sha256": sha256_file(db_path),
                   "statements_sha256": sha256_file(src / "scp_statements.csv")},
        "sampling_rate": sampling_rate, "n_samples": 10 * sampling_rate, "leads": list(LEADS),
        "classes": list(CLASSES), "units": "mV", "folds": folds, "strict": strict,
        "counts": {"records_in_database": selection.rows, "kept": len(acc["rows"]),
                   "dropped_no_diagnostic_class": selection.no_class, "not_in_any_split": selection.not_selected,
                   "skipped": dict(problems.counts), "skipped_total": sum(problems.counts.values()),
                   "per_split": per_split},
        "problems": problems.listed, "warnings": acc["warnings"],
        "normalization": {"fitted_on": "train", "mean": mean.tolist(), "std": std.tolist()},
        "files": {
            "signals.npy": {"bytes": (tmp / "signals.npy").stat().st_size, "data_sha256": acc["data_sha256"],
                            "data_sha256_covers": "the array bytes after the .npy header"},
            **{name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
               for name in ("labels.npy", "meta.csv")}},
        "versions": library_versions(),
        "build_seconds": round(seconds, 2),
    }


def build(src: Path, out: Path, sampling_rate: int, folds: dict[str, list[int]], strict: bool,
          fingerprint: str = "", workers: int = 2) -> dict:
    """Build the cache into a temporary folder beside `out` and rename it into place when complete."""
    from shared.labels import multi_hot

    t0 = time.time()
    problems = _Problems(strict)
    selection = _select(src, sampling_rate, folds, problems)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        acc = _stream_signals(selection.entries, tmp, sampling_rate, folds, problems, workers)
        if not acc["rows"]:
            raise SourceError(f"{src}: no usable records (skipped: {dict(problems.counts)}, "
                              f"no class: {selection.no_class})")
        if acc["n_train_values"] == 0:
            raise SourceError(f"{src}: no training records in folds {folds['train']}")
        labels = multi_hot(acc["classes"])
        np.save(tmp / "labels.npy", labels)
        _write_meta(tmp / "meta.csv", acc["rows"])
        manifest = _manifest(src, tmp, sampling_rate, folds, strict, fingerprint, selection, problems, acc, labels,
                             time.time() - t0)
        write_json_atomic(tmp / "manifest.json", manifest)
        cache_fmt.record_verified(tmp, manifest["files"])  # just hashed: a no-op run need not hash them again
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


META_COLUMNS = ("ecg_id", "patient_id", "age", "sex", "strat_fold", "split", "labels")


def _write_meta(path: Path, rows: list) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(META_COLUMNS)
        w.writerows(rows)


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Leftovers of killed runs (their pid no longer alive) are deleted; they are never read."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def _built_from(out: Path) -> str:
    try:
        return str(read_json(out / "manifest.json")["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return "/path/to/ptb-xl"


def _use_existing(out: Path) -> bool:
    """No source named: a complete cache is used as it is (later make targets depend on `data`) once its files
    match the manifest. A corrupted one is an error naming the fix: the fallback without a source, a download,
    would not repair a cache built from a local copy, and fails offline."""
    try:
        built_from = cache_fmt.verify_cache(out)["source"]["path"]
    except cache_fmt.CacheCorrupt as e:
        raise SourceError(f"{e.path}: {e.problem}; rebuild the cache with `make data PTBXL_DIR={_built_from(out)}` "
                          f"(or --force, which downloads PTB-XL when no source is given)") from None
    except (cache_fmt.CacheError, OSError, KeyError, TypeError):
        return False
    print(f"{out}: using the existing cache (built from {built_from}; PTBXL_DIR=... to check a source)")
    return True


def _up_to_date(out: Path, fingerprint: str, src: Path) -> bool:
    """Built from this very source and options, and its files still match the manifest. A corrupted cache is
    rebuilt from the source at hand (the natural fix), saying so in one line."""
    try:
        manifest = read_json(out / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("source", {}).get("fingerprint") != fingerprint:
            return False
        cache_fmt.verify_cache(out)
        return True
    except cache_fmt.CacheCorrupt as e:
        print(f"warning: {e.path}: {e.problem}; rebuilding the cache from {src}", file=sys.stderr)
        return False
    except (cache_fmt.CacheError, OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.build_cache",
        description="Build the PTB-XL cache (signals.npy, labels.npy, meta.csv, manifest.json) that every "
                    "later stage reads. A no-op when the source and options are unchanged.")
    ap.add_argument("--ptbxl-dir", default=os.environ.get("PTBXL_DIR") or None,
                    help="a PTB-XL folder in PhysioNet's layout, or its .zip (env PTBXL_DIR); "
                         "omit to download PTB-XL from PhysioNet")
    ap.add_argument("--sampling-rate", type=int, choices=(100, 500),
                    default=int(os.environ.get("SAMPLING_RATE", SAMPLING_RATE)), help="env SAMPLING_RATE")
    ap.add_argument("--train-folds", default=TRAIN_FOLDS, help="strat_folds for training (default %(default)s)")
    ap.add_argument("--val-folds", default=VAL_FOLDS, help="default %(default)s")
    ap.add_argument("--test-folds", default=TEST_FOLDS, help="default %(default)s")
    ap.add_argument("--out", type=Path, default=None, help="cache folder (default artifacts/data/ptbxl-<fs>hz)")
    ap.add_argument("--base-url", default=os.environ.get("PTBXL_BASE_URL"), help="download mirror (env PTBXL_BASE_URL)")
    ap.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    args = ap.parse_args(argv)

    out = (args.out or data_cache_dir(args.sampling_rate)).resolve()
    folds = {"train": parse_folds(args.train_folds), "val": parse_folds(args.val_folds),
             "test": parse_folds(args.test_folds)}
    try:
        overlap = set(folds["train"]) & set(folds["val"]) | set(folds["train"]) & set(folds["test"]) | \
            set(folds["val"]) & set(folds["test"])
        if overlap:
            raise SourceError(f"folds {sorted(overlap)} are in more than one split")
        _remove_stale_temporaries(out)  # on every run: a no-op run must not keep a dead build's temporary folder
        if not args.ptbxl_dir and not args.force and (out / "manifest.json").exists() and _use_existing(out):
            return 0
        src = resolve_source(args.ptbxl_dir, args.sampling_rate, args.base_url).resolve()
        options = {"sampling_rate": args.sampling_rate, "folds": repr(folds), "strict": args.strict}
        fingerprint = source_fingerprint(src, args.sampling_rate, options)
        if not args.force and (out / "manifest.json").exists() and _up_to_date(out, fingerprint, src):
            print(f"{out}: up to date (source and options unchanged)")
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = build(src, out, args.sampling_rate, folds, args.strict, fingerprint)
    except (SourceError, cache_fmt.CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    splits = ", ".join(f"{k} {v['records']}" for k, v in c["per_split"].items())
    print(f"{out}: {c['kept']} records ({splits}); "
          f"dropped {c['dropped_no_diagnostic_class']} without diagnostic class, skipped {c['skipped_total']} bad "
          f"{dict(c['skipped']) or ''}; {manifest['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
