"""The data cache that `make data` writes and every later stage reads.

Layout of artifacts/data/ptbxl-<fs>hz/ (written to a temporary folder, renamed into place last):
  signals.npy   N×12×T float32, physical units (mV), memory-mapped by readers
  labels.npy    N×5 uint8 multi-hot, columns in shared.labels.CLASSES order
  meta.csv      ecg_id, patient_id, age, sex, strat_fold, split, labels
  manifest.json source, options, counts, train-only per-lead normalization, checksums, versions
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.io import read_json

FORMAT = "ptbxl-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


class CacheError(RuntimeError):
    pass


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
            raise CacheError(f"{path}: missing from the cache; rerun `make data`")
        if path.stat().st_size != info["bytes"]:
            raise CacheError(f"{path}: size {path.stat().st_size} differs from the manifest's {info['bytes']}; "
                             f"rerun `make data`")
    return manifest


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
