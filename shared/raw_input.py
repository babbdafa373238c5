"""Getting raw WFDB records into a trained model the way training saw them — for evaluation on any
PTB-XL-layout folder and for `predict`: the training cache's per-lead normalization, resampling to the
model's rate, and a small in-memory dataset that `prediction.predict_dataset` accepts."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.records import RecordError, read_record


TRAINED_SECONDS = 10.0  # every PTB-XL record, and so every training input, is 10 s long


class InputError(ValueError):
    """Input a model cannot score; the message is one line naming the file and the problem.

    `kind` groups problems for the counts of skipped records (as RecordError's do in the data manifest)."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def normalization(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead (mean, std) the model was trained with: the config's own copy when training saved one,
    else the training cache's manifest."""
    if "normalization" in cfg:
        norm = cfg["normalization"]
    else:
        from shared.io import read_json
        from shared.paths import data_cache_dir

        candidates = [Path(cfg["data"]) / "manifest.json"] if cfg.get("data") else []
        candidates.append(data_cache_dir(cfg["sampling_rate"]) / "manifest.json")
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise InputError(f"{candidates[0]}: the model's training normalization is unknown (no config copy and "
                             "no training cache); run `make data` with the training data")
        norm = read_json(found)["normalization"]
    return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)


def resample(signal: np.ndarray, fs_from: float, fs_to: float) -> np.ndarray:
    """Polyphase resampling along time (anti-aliased), e.g. 500 → 100 Hz."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    if abs(fs_from - fs_to) < 1e-9:
        return signal
    ratio = Fraction(fs_to / fs_from).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def load_signal(path: str | Path, sampling_rate: int, min_seconds: float,
                expected_fs: float | None = None) -> np.ndarray:
    """One record (path without extension) as 12×T float32 mV at `sampling_rate`; warns when resampling and when
    the record is shorter than the training records. `expected_fs`: refuse any other rate instead of resampling."""
    path = Path(path)
    if path.suffix in (".hea", ".dat"):
        path = path.with_suffix("")
    try:
        signal, fs = read_record(path, expected_fs=expected_fs, expected_seconds=None)
    except RecordError as e:
        raise InputError(str(e), e.kind) from None
    seconds = signal.shape[1] / fs
    if signal.shape[1] < min_seconds * fs:
        raise InputError(f"{path}: {seconds:.2f} s long, the model needs at least {min_seconds:g} s", "too_short")
    if seconds < TRAINED_SECONDS - 1e-9:
        warnings.warn(f"{path}: {seconds:.1f} s long; the models were trained on {TRAINED_SECONDS:g} s records, "
                      "results may be less reliable", stacklevel=2)
    if abs(fs - sampling_rate) > 1e-6:
        warnings.warn(f"{path}: resampling {fs:g} Hz → {sampling_rate} Hz for the model", stacklevel=2)
        signal = resample(signal, fs, sampling_rate)
    return signal


@dataclass
class ArrayDataset:
    """Normalized B×12×T records + labels in memory, with the `__getitems__` interface of ECGDataset."""
    x: np.ndarray
    y: np.ndarray
    ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, positions):
        idx = np.asarray(list(positions), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.x[idx])), torch.from_numpy(self.y[idx].astype(np.float32))

    @property
    def labels(self) -> np.ndarray:
        return self.y


def normalize(x: np.ndarray, cfg: dict) -> np.ndarray:
    mean, std = normalization(cfg)
    return ((x - mean[None, :, None]) / std[None, :, None]).astype(np.float32)


def fit_length(signals: list[np.ndarray], n_samples: int) -> np.ndarray:
    """Stack records (each at least n_samples long) cut to their centre n_samples, the extent the cache holds."""
    out = np.empty((len(signals), 12, n_samples), np.float32)
    for i, s in enumerate(signals):
        start = (s.shape[1] - n_samples) // 2
        out[i] = s[:, start:start + n_samples]
    return out


def load_ptbxl_folder(folder: str | Path, sampling_rate: int, folds: list[int] | None = None,
                      ecg_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int], list[dict]]:
    """Records of any folder in PhysioNet's PTB-XL layout (ptbxl_database.csv, scp_statements.csv,
    records100/ or records500/): (raw N×12×T at `sampling_rate`, labels N×5, ecg_ids, problems).
    The records are chosen as `make data` chooses them (shared/database.py): only those of `sampling_rate` are read
    (a record of another rate, or missing at this one, would be scored on other input than the cache's) and records
    without a diagnostic class are dropped. The records that cannot be used are listed in problems as
    {ecg_id, kind, message}, as in the data manifest."""
    from shared.database import DatabaseError, select
    from shared.labels import multi_hot

    want_ids = set(int(i) for i in ecg_ids) if ecg_ids else None
    try:
        selection = select(folder, sampling_rate, keep=lambda ecg_id, fold: (
            (want_ids is None or ecg_id in want_ids) and (not folds or fold in folds)))
    except DatabaseError as e:
        raise InputError(str(e)) from None
    signals, classes, ids, problems = [], [], [], list(selection.problems)
    for e in selection.entries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                signals.append(load_signal(e.path, sampling_rate, min_seconds=TRAINED_SECONDS,
                                           expected_fs=sampling_rate))
        except InputError as err:
            problems.append({"ecg_id": e.ecg_id, "kind": err.kind, "message": str(err)})
            continue
        classes.append(e.classes)
        ids.append(e.ecg_id)
    if not signals:
        raise InputError(f"{folder}: no readable labelled records"
                         + (f" ({problems[0]['message']} …)" if problems else ""))
    return fit_length(signals, 10 * sampling_rate), multi_hot(classes), ids, problems


def skipped_summary(problems: list[dict], n_read: int) -> str:
    """'skipped 3 of 320 records: 2 unreadable, 1 too_short' ('' when none was): the console's share of the list
    the result file keeps."""
    from collections import Counter

    if not problems:
        return ""
    kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(p["kind"] for p in problems).most_common())
    return f"skipped {len(problems)} of {len(problems) + n_read} records: {kinds}"
