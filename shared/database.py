"""The one reader of a PTB-XL folder's ptbxl_database.csv: its rows turned into labelled records (ecg_id, fold,
diagnostic superclasses, the record file at one sampling rate). `make data` builds its cache from these entries and
`evaluate --data` scores external folders from the same ones, so both agree on which records count and why one
is skipped. The csv module, not pandas: importing pandas alone would cost a third of a sample build."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shared.labels import DATABASE_COLUMNS, LabelError, diagnostic_classes, parse_scp_codes, read_statements


class DatabaseError(ValueError):
    """A PTB-XL folder whose csv files cannot be used at all; the message names the file and the problem."""


@dataclass
class Entry:
    ecg_id: int
    fold: int
    classes: list[str]
    path: Path          # the record without extension, at the requested sampling rate
    row: dict           # the csv row as read (patient_id, age, sex, …)


@dataclass
class Selection:
    database: Path
    entries: list[Entry] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)   # {ecg_id, kind, message}, as in the data manifest
    rows: int = 0                                         # records in the database
    not_selected: int = 0                                 # outside the requested folds / ids
    no_class: int = 0                                     # no diagnostic superclass: not part of the task


def read_rows(path: Path) -> list[dict]:
    """Every row of ptbxl_database.csv; a missing file, column or unparsable csv is one DatabaseError line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in DATABASE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatabaseError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
    except FileNotFoundError:
        raise DatabaseError(f"{path}: file not found — expected a folder in PTB-XL layout") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DatabaseError(f"{path}: cannot parse csv ({e})") from None


def number(text: str):
    """'12' / '12.0' → 12, '' or junk → None (PTB-XL's csv writes some integers as floats)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return int(v) if v.is_integer() else v


def select(folder: str | Path, sampling_rate: int,
           keep: Callable[[int | None, int | None], bool] = lambda ecg_id, fold: True) -> Selection:
    """The labelled records of `folder` that `keep(ecg_id, fold)` wants, at `sampling_rate` (100 → filename_lr,
    else filename_hr). Records without a diagnostic class are counted, not listed: they are not part of the task.
    Unparsable scp_codes and a missing file name are problems (the record is skipped, the rest go on)."""
    folder = Path(folder)
    db = folder / "ptbxl_database.csv"
    rows = read_rows(db)
    try:
        known, mapping = read_statements(folder / "scp_statements.csv")
    except (FileNotFoundError, ValueError) as e:
        raise DatabaseError(str(e)) from None
    column = "filename_lr" if sampling_rate == 100 else "filename_hr"
    out = Selection(database=db, rows=len(rows))
    for row in rows:
        ecg_id, fold = number(row["ecg_id"]), number(row["strat_fold"])
        if ecg_id is None or fold is None or not keep(ecg_id, fold):
            out.not_selected += 1
            continue
        try:
            classes = diagnostic_classes(parse_scp_codes(row["scp_codes"]), known, mapping)
        except LabelError as e:
            out.problems.append({"ecg_id": ecg_id, "kind": "bad_scp_codes", "message": f"{db} ecg_id {ecg_id}: {e}"})
            continue
        if not classes:
            out.no_class += 1
        elif not row[column]:
            out.problems.append({"ecg_id": ecg_id, "kind": "missing_file",
                                 "message": f"{db} ecg_id {ecg_id}: no {column}"})
        else:
            out.entries.append(Entry(ecg_id, fold, classes, folder / row[column], row))
    return out
