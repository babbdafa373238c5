"""PTB-XL diagnostic superclasses, mapped exactly as the PTB-XL benchmark (Strodthoff et al. 2020).

Every key of a record's `scp_codes` (whatever its likelihood) that is a row of `scp_statements.csv`
with `diagnostic == 1` contributes that row's `diagnostic_class`. Records with no class are dropped.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

# Fixed, documented column order of every label array in the project.
CLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")

STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class")
DATABASE_COLUMNS = ("ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr",
                    "filename_hr")
# The longest scp_codes in PTB-XL is ~110 characters; a cell 100x that is no code list, and parsing it
# would only cost time and memory.
MAX_SCP_CODES_CHARS = 10_000


class LabelError(ValueError):
    """A record's codes cannot be mapped (bad syntax or a code missing from scp_statements.csv)."""


def read_statements(path: str | Path):
    """Read scp_statements.csv; return (all known codes, {diagnostic code: class})."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            missing = [c for c in STATEMENT_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
            i_diag, i_cls = header.index("diagnostic"), header.index("diagnostic_class")
            rows = [r for r in reader if r]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse csv ({e})") from None
    known, mapping = set(), {}
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"{path}: row {r[:1]} has {len(r)} fields, expected {len(header)}")
        known.add(r[0])
        try:
            diagnostic = float(r[i_diag]) == 1.0 if r[i_diag] else False
        except ValueError:
            raise ValueError(f"{path}: code {r[0]}: diagnostic {r[i_diag]!r} is not a number") from None
        if diagnostic and r[i_cls]:
            mapping[r[0]] = r[i_cls]
    unknown_classes = sorted(set(mapping.values()) - set(CLASSES))
    if unknown_classes:
        raise ValueError(f"{path}: unexpected diagnostic_class value(s) {unknown_classes}; expected {CLASSES}")
    return known, mapping


def parse_scp_codes(text: str) -> dict[str, float]:
    """`scp_codes` is a Python dict literal in ptbxl_database.csv; parse it without eval.

    Python's parser recurses on nesting (`-` * 5000 raises RecursionError, longer runs MemoryError), so one
    hostile cell could stop the whole build: those and over-long cells are a LabelError like any bad cell.
    """
    if not isinstance(text, str):
        raise LabelError(f"scp_codes is not text: {_excerpt(text)}")
    if len(text) > MAX_SCP_CODES_CHARS:
        raise LabelError(f"scp_codes is {len(text)} characters long (limit {MAX_SCP_CODES_CHARS}): {_excerpt(text)}")
    try:
        codes = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise LabelError(f"scp_codes is not a dict literal: {_excerpt(text)}") from None
    if not isinstance(codes, dict):
        raise LabelError(f"scp_codes is not a dict: {_excerpt(text)}")
    return codes


def _excerpt(text, limit: int = 120) -> str:
    """The start of a bad cell: the message goes on one line and into the manifest, whatever the cell's size."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(text)} characters)"


def diagnostic_classes(codes: dict, known_codes: set[str], diagnostic_map: dict[str, str]) -> list[str]:
    """Superclasses of one record, in CLASSES order; raises LabelError on a code not in the statements."""
    unknown = sorted(str(k) for k in codes if str(k) not in known_codes)
    if unknown:
        raise LabelError(f"unknown scp code(s) {unknown} (not in scp_statements.csv)")
    found = {diagnostic_map[k] for k in codes if k in diagnostic_map}
    return [c for c in CLASSES if c in found]


def multi_hot(class_lists: list[list[str]]) -> np.ndarray:
    """N×len(CLASSES) uint8 — the same result as the benchmark's MultiLabelBinarizer (tests check it) in
    CLASSES order, without importing scikit-learn (and scipy), which would double `make data`'s run time."""
    out = np.zeros((len(class_lists), len(CLASSES)), np.uint8)
    col = {c: i for i, c in enumerate(CLASSES)}
    for row, classes in enumerate(class_lists):
        for c in classes:
            out[row, col[c]] = 1
    return out
