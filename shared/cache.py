"""The data cache that `make data` writes and every later stage reads.

Layout of artifacts/data/ptbxl-<fs>hz/ (written to a temporary folder, renamed into place last):
  signals.npy   N×12×T float32, physical units (mV), memory-mapped by readers
  labels.npy    N×5 uint8 multi-hot, columns in shared.labels.CLASSES order
  meta.csv      ecg_id, patient_id, age, sex, strat_fold, split, labels
  manifest.json source, options, counts, train-only per-lead normalization, checksums, versions
  verified.json each file's (size, mtime, ctime, inode) when its sha256 last matched the manifest's
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.io import read_json, sha256_file, write_json_atomic

FORMAT = "ptbxl-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
VERIFIED = "verified.json"


class CacheError(ValueError):
    """A data cache that cannot be used: bad input, which every command reports in one line."""


class CacheCorrupt(CacheError):
    """A complete cache whose files no longer match its manifest: rebuilding, not downloading, is the fix.
    `path` and `problem` let `make data` name its own fix instead of the generic one."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}; rerun `make data`")


@dataclass
class ECGCache:
    root: Path
    signals: np.ndarray  # memory-mapped N×12×T
    labels: np.ndarray  # N×5
    meta: "object"  # pandas DataFrame
    manifest: dict

    @property
    def sampling_rate(self) -> int:
        return int(self.manifest["sampling_rate"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def split_indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.meta["split"].to_numpy() == split)

    def norm_stats(self) -> tuple[np.ndarray, np.ndarray]:
        norm = self.manifest["normalization"]
        return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)


def validate_cache(root: Path) -> dict:
    """Return the manifest if `root` holds a complete cache, else raise CacheError saying why."""
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise CacheError(f"{root}: no complete data cache (manifest.json missing); run `make data`")
    try:
        manifest = read_json(manifest_path)
    except ValueError as e:
        raise CacheError(str(e)) from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{manifest_path}: cache format {manifest.get('format')!r} v{manifest.get('format_version')} "
                         f"is not {FORMAT!r} v{FORMAT_VERSION}; rerun `make data`")
    if not manifest.get("complete"):
        raise CacheError(f"{manifest_path}: cache marked incomplete; rerun `make data`")
    for name, info in manifest["files"].items():
        path = root / name
        if not path.exists():
            raise CacheCorrupt(path, "missing from the cache")
        if path.stat().st_size != info["bytes"]:
            raise CacheCorrupt(path, f"size {path.stat().st_size} differs from the manifest's {info['bytes']}")
    return manifest


def file_identity(path: Path) -> list[int]:
    """What any write or replacement changes: size, mtime, ctime (which no tool can set back) and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def record_verified(root: Path, names) -> None:
    """Remember the files as they are now, known to match the manifest; a read-only cache just stays unrecorded."""
    try:
        write_json_atomic(root / VERIFIED, {name: file_identity(root / name) for name in names})
    except OSError:
        pass


def verify_cache(root: Path) -> dict:
    """validate_cache plus every file's sha256 against the manifest's; a file is hashed only when its identity
    differs from the one recorded when it last matched, so a no-op `make data` need not read 1-5 GB, yet an edit
    in place (same size, new mtime and ctime) is still caught."""
    manifest = validate_cache(root)
    try:
        verified = read_json(root / VERIFIED)
    except (OSError, ValueError):
        verified = None
    verified = verified if isinstance(verified, dict) else {}
    files = manifest["files"]
    unverified = [n for n in files if verified.get(n) != file_identity(root / n)]
    if not unverified:
        return manifest
    identities = {n: file_identity(root / n) for n in unverified}  # before hashing: a write meanwhile shows next time
    for name in unverified:
        info, path = files[name], root / name
        if "data_sha256" in info:
            key, digest = "data_sha256", _npy_data_sha256(path, manifest)
        else:
            key, digest = "sha256", sha256_file(path)
        if digest != info.get(key):
            raise CacheCorrupt(path, f"contents differ from manifest.json's {key} (corrupted or edited)")
    if identities == {n: file_identity(root / n) for n in unverified}:
        record_verified(root, files)
    return manifest


def _npy_data_sha256(path: Path, manifest: dict, chunk: int = 1 << 22) -> str:
    """sha256 of the array bytes after the .npy header (what the build hashes while it writes); the header,
    outside that hash, must give the manifest's shape."""
    import hashlib

    expected = (manifest["counts"]["kept"], len(manifest["leads"]), manifest["n_samples"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
        except ValueError as e:
            raise CacheCorrupt(path, f"not a .npy file ({e})") from None
        if (shape, fortran, dtype) != (expected, False, np.dtype("<f4")):
            raise CacheCorrupt(path, f".npy header says {dtype} {shape}, not the manifest's float32 {expected}")
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_cache(root: str | os.PathLike) -> ECGCache:
    import pandas as pd

    root = Path(root)
    manifest = validate_cache(root)
    signals = np.load(root / "signals.npy", mmap_mode="r")
    labels = np.load(root / "labels.npy")
    meta = pd.read_csv(root / "meta.csv")
    if not (len(signals) == len(labels) == len(meta)):
        raise CacheError(f"{root}: signals/labels/meta lengths differ; rerun `make data`")
    return ECGCache(root, signals, labels, meta, manifest)
