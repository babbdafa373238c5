"""The one place that reads a WFDB record.

PTB-XL stores each record as a text header (.hea) plus 16-bit little-endian interleaved samples
(.dat, format 16). Parsing the header ourselves and reading the samples with numpy is ~200x faster
than `wfdb.rdsamp` and gives bit-identical physical values (tests compare them); any other layout
falls back to wfdb.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEADS: tuple[str, ...] = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
WFDB_DEFAULT_GAIN = 200.0  # wfdb's convention when a header says gain 0


class RecordError(ValueError):
    """A record that cannot be used; the message names the record and the problem.

    `kind` groups problems for the counts in the data manifest."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Header:
    name: str
    n_sig: int
    fs: float
    sig_len: int
    files: list[str]
    fmts: list[str]
    gains: np.ndarray
    baselines: np.ndarray
    leads: list[str]
    simple: bool  # one format-16 file, no byte offsets: the fast numpy path applies


def parse_header(hea_path: Path) -> Header:
    try:
        lines = [ln.strip() for ln in hea_path.read_text(encoding="latin-1").splitlines()]
    except FileNotFoundError:
        raise RecordError(f"{hea_path}: header file missing", "missing_file") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise RecordError(f"{hea_path}: empty header", "bad_header")
    head = lines[0].split()
    try:
        name, n_sig = head[0], int(head[1])
        fs = float(head[2].split("/")[0].split("(")[0]) if len(head) > 2 else 250.0
        sig_len = int(head[3]) if len(head) > 3 else -1
    except (IndexError, ValueError):
        raise RecordError(f"{hea_path}: malformed record line {lines[0]!r}", "bad_header") from None
    sig_lines = lines[1:1 + n_sig]
    if len(sig_lines) != n_sig:
        raise RecordError(f"{hea_path}: header promises {n_sig} signals but lists {len(sig_lines)}", "bad_header")
    files, fmts, gains, baselines, leads = [], [], [], [], []
    for ln in sig_lines:
        parts = ln.split()
        try:
            files.append(parts[0])
            fmts.append(parts[1])
            gain_field = parts[2] if len(parts) > 2 else "0"
            adc_zero = int(parts[4]) if len(parts) > 4 else 0
            gain_str = gain_field.split("/")[0]
            if "(" in gain_str:
                gain_str, base_str = gain_str.rstrip(")").split("(")
                baseline = int(base_str)
            else:
                baseline = adc_zero
            gain = float(gain_str) or WFDB_DEFAULT_GAIN
            leads.append(parts[8] if len(parts) > 8 else "")
        except (IndexError, ValueError):
            raise RecordError(f"{hea_path}: malformed signal line {ln!r}", "bad_header") from None
        gains.append(gain)
        baselines.append(baseline)
    simple = len(set(files)) == 1 and all(f == "16" for f in fmts)
    return Header(name, n_sig, fs, sig_len, files, fmts, np.array(gains), np.array(baselines, dtype=np.float64),
                  leads, simple)


def read_record(path_without_ext: str | Path, expected_fs: float | None = None,
                expected_seconds: float | None = 10.0) -> tuple[np.ndarray, float]:
    """Return (12×T float32 physical signal in lead order LEADS, sampling rate).

    Values equal float32(wfdb.rdsamp(...)[0].T). Raises RecordError naming the record on any problem:
    missing or truncated files, unexpected sampling rate/lead count/length, NaN or flat leads.
    """
    base = Path(path_without_ext)
    hea = base.with_name(base.name + ".hea")
    h = parse_header(hea)
    if expected_fs is not None and abs(h.fs - expected_fs) > 1e-6:
        raise RecordError(f"{hea}: sampling rate {h.fs:g} Hz, expected {expected_fs:g} Hz", "wrong_sampling_rate")
    if h.n_sig != len(LEADS):
        raise RecordError(f"{hea}: {h.n_sig} leads, expected {len(LEADS)}", "bad_header")
    if expected_seconds is not None and h.sig_len != round(expected_seconds * h.fs):
        raise RecordError(f"{hea}: {h.sig_len} samples, expected {round(expected_seconds * h.fs)} "
                          f"({expected_seconds:g} s at {h.fs:g} Hz)", "bad_header")
    order = _lead_order(hea, h.leads)
    if h.simple:
        dat = hea.with_name(h.files[0])
        try:
            raw = np.fromfile(dat, dtype="<i2")
        except FileNotFoundError:
            raise RecordError(f"{dat}: signal file missing", "missing_file") from None
        expected = h.sig_len * h.n_sig if h.sig_len >= 0 else raw.size - raw.size % h.n_sig
        if raw.size < expected:
            raise RecordError(f"{dat}: truncated ({raw.size * 2} bytes, expected {expected * 2})", "truncated")
        digital = raw[:expected].reshape(-1, h.n_sig)
        physical = (digital - h.baselines) / h.gains  # float64, as wfdb computes it
        invalid = digital == -32768  # wfdb's invalid-sample marker for format 16
        if invalid.any():
            physical[invalid] = np.nan
    else:
        physical = _read_with_wfdb(base)
    signal = physical.T.astype(np.float32) if order == list(range(len(LEADS))) else \
        physical.T[order].astype(np.float32)
    _check_values(hea, signal)
    return np.ascontiguousarray(signal), h.fs


def _read_with_wfdb(base: Path) -> np.ndarray:
    import wfdb

    try:
        sig, _ = wfdb.rdsamp(str(base))
    except FileNotFoundError as e:
        raise RecordError(f"{base}: {e}", "missing_file") from None
    except Exception as e:  # wfdb raises bare ValueErrors etc. on broken files
        raise RecordError(f"{base}: wfdb cannot read it ({e})") from None
    return sig


def _lead_order(hea: Path, names: list[str]) -> list[int]:
    upper = [n.upper() for n in names]
    if upper == list(LEADS):
        return list(range(len(LEADS)))
    if sorted(upper) != sorted(LEADS):
        raise RecordError(f"{hea}: leads {names}, expected the 12 standard leads {list(LEADS)}", "bad_header")
    return [upper.index(lead) for lead in LEADS]


def _check_values(hea: Path, signal: np.ndarray) -> None:
    if np.isnan(signal).any():
        bad = [LEADS[i] for i in np.where(np.isnan(signal).any(axis=1))[0]]
        raise RecordError(f"{hea}: NaN/invalid samples in lead(s) {', '.join(bad)}", "nan")
    flat = np.ptp(signal, axis=1) == 0
    if flat.all():
        raise RecordError(f"{hea}: every lead is flat (constant signal)", "flat")
