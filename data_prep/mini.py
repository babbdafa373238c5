"""`python -m data_prep.mini`: cut the small real PTB-XL subset that ships in tests/data/ptbxl-mini.

The test suite and `make demo` run on it, so a fresh clone needs nothing beside it. The cut is
deterministic (same source, same options → byte-identical folder) and keeps PhysioNet's layout:
records copied byte for byte, the source's own csv rows, a SHA256SUMS.txt, the licence and a README
with the attribution. Choice of records, per strat_fold: first the pinned ids (records the tests check
by hand), then one record of every superclass, one multi-label record and one without a diagnostic
class, then the rest in the order of a hash of the ecg_id — a fixed pseudo-random draw that keeps
PTB-XL's class mix and does not favour early recordings.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from shared.config import parse_ranges
from shared.labels import CLASSES, LabelError, diagnostic_classes, parse_scp_codes, read_statements

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "ptbxl-mini"
# Records per strat_fold: validation and test folds get more, so that AUCs measured on them mean something.
PER_TRAIN_FOLD = 26
PER_VAL_FOLD = 56
PER_TEST_FOLD = 56
HIGH_RATE_RECORDS = 20
# Hand-checked by the tests (labels, wfdb equality, the download tests' first ten records).
PINNED = "1-10,17,26,39,45,50,101,250,499"
PINNED_500HZ = "1,2,39,45,101,250,499"

README = """# PTB-XL mini (real data)

{n} real PTB-XL records at 100 Hz ({n_hr} of them also at 500 Hz), in PhysioNet's own layout, so the
project's tests and `make demo` run on a fresh clone with nothing beside it. Not for measuring models:
use the full PTB-XL (`make data PTBXL_DIR=…`) for that.

- Records per strat_fold: {folds}.
- Superclasses (records with each): {classes}; multi-label: {multi}; no diagnostic class: {none}.
- The record files are byte-identical to PhysioNet's; `ptbxl_database.csv` holds the source's own rows
  of exactly these records; `SHA256SUMS.txt` lists every file here.
- Regenerate (deterministic): `python -m data_prep.mini --source /path/to/ptbxl --out tests/data/ptbxl-mini`.

## Licence and attribution
PTB-XL is released under the Creative Commons Attribution 4.0 International licence (`LICENSE.txt`).

Wagner, P., Strodthoff, N., Bousseljot, R., Samek, W., Schaeffter, T. (2022). PTB-XL, a large publicly
available electrocardiography dataset (version 1.0.3). PhysioNet. https://doi.org/10.13026/kfzx-aw45

Wagner, P., Strodthoff, N., Bousseljot, R.-D., Kreiseler, D., Lunze, F. I., Samek, W., Schaeffter, T.
(2020). PTB-XL, a large publicly available electrocardiography dataset. Scientific Data 7, 154.
https://doi.org/10.1038/s41597-020-0495-6

Goldberger, A. L. et al. (2000). PhysioBank, PhysioToolkit, and PhysioNet. Circulation 101(23), e215–e220.
"""


class MiniError(RuntimeError):
    pass


def read_rows(path: Path) -> tuple[str, list[str], dict[int, tuple[dict, str]]]:
    """The header line and {ecg_id: (row as a dict, the row's exact text)} of ptbxl_database.csv."""
    text = path.read_text(encoding="utf-8")
    lines = io.StringIO(text, newline="")
    header = lines.readline()
    columns = next(csv.reader([header]))
    rows = {}
    while True:
        raw = lines.readline()
        if not raw:
            break
        while raw.count('"') % 2:  # a quoted field that spans lines
            more = lines.readline()
            if not more:
                raise MiniError(f"{path}: unterminated quoted field")
            raw += more
        values = next(csv.reader([raw]))
        if len(values) != len(columns):
            raise MiniError(f"{path}: row {values[:1]} has {len(values)} fields, expected {len(columns)}")
        row = dict(zip(columns, values))
        rows[int(float(row["ecg_id"]))] = (row, raw)
    return header, columns, rows


def label_key(row: dict, known: set, diag: dict) -> str:
    try:
        return "|".join(diagnostic_classes(parse_scp_codes(row["scp_codes"]), known, diag))
    except LabelError:
        return "?"


def _hash_order(ecg_id: int) -> str:
    return hashlib.sha256(str(ecg_id).encode()).hexdigest()


def pick(candidates: dict[int, str], quota: int, pinned: list[int]) -> list[int]:
    """Pinned ids; then one record of each superclass, one multi-label and one without a class (so each
    fold has them all); then hash order, which keeps PTB-XL's own class mix."""
    chosen = [e for e in pinned if e in candidates][:quota]
    rest = sorted(set(candidates) - set(chosen), key=_hash_order)
    wanted = [lambda k, c=c: c in k.split("|") for c in CLASSES] + [lambda k: "|" in k, lambda k: k == ""]
    for want in wanted:
        if len(chosen) < quota and not any(want(candidates[e]) for e in chosen):
            e = next((e for e in rest if want(candidates[e])), None)
            if e is not None:
                chosen.append(e)
                rest.remove(e)
    return sorted(chosen + rest[:quota - len(chosen)])


def select(rows: dict, known: set, diag: dict, source: Path, pinned: list[int]) -> list[int]:
    by_fold = defaultdict(dict)
    for e, (row, _) in rows.items():
        if (source / f"{row['filename_lr']}.hea").exists():
            by_fold[int(float(row["strat_fold"]))][e] = label_key(row, known, diag)
    quota = {9: PER_VAL_FOLD, 10: PER_TEST_FOLD}
    return sorted(e for fold in sorted(by_fold) for e in pick(by_fold[fold], quota.get(fold, PER_TRAIN_FOLD), pinned))


def select_high_rate(chosen: list[int], rows: dict, source: Path, pinned: list[int]) -> list[int]:
    has = [e for e in chosen if rows[e][0].get("filename_hr") and (source / f"{rows[e][0]['filename_hr']}.hea").exists()]
    first = [e for e in pinned if e in has]
    rest = sorted(set(has) - set(first), key=_hash_order)
    return sorted((first + rest)[:HIGH_RATE_RECORDS])


def copy_record(source: Path, dest: Path, stem: str) -> list[str]:
    names = []
    for ext in ("hea", "dat"):
        rel = f"{stem}.{ext}"
        if not (source / rel).exists():
            raise MiniError(f"{source / rel}: record file missing")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest / rel)
        names.append(rel)
    return names


def summary(chosen: list[int], high: list[int], rows: dict, known: set, diag: dict) -> dict:
    keys = [label_key(rows[e][0], known, diag) for e in chosen]
    folds = defaultdict(int)
    for e in chosen:
        folds[int(float(rows[e][0]["strat_fold"]))] += 1
    return dict(n=len(chosen), n_hr=len(high), folds=", ".join(f"{f}: {folds[f]}" for f in sorted(folds)),
                classes=", ".join(f"{c} {sum(c in k.split('|') for k in keys)}" for c in CLASSES),
                multi=sum("|" in k for k in keys), none=sum(k == "" for k in keys))


def write_mini(source: Path, dest: Path, pinned: list[int], pinned_hr: list[int]) -> dict:
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        if not (source / name).exists():
            raise MiniError(f"{source / name}: missing (is {source} a PTB-XL folder?)")
    known, diag = read_statements(source / "scp_statements.csv")
    header, _, rows = read_rows(source / "ptbxl_database.csv")
    chosen = select(rows, known, diag, source, pinned)
    high = select_high_rate(chosen, rows, source, pinned_hr)
    files = ["ptbxl_database.csv", "scp_statements.csv", "README.md"]
    dest.mkdir(parents=True)
    with open(dest / "ptbxl_database.csv", "w", encoding="utf-8", newline="") as f:
        f.write(header + "".join(rows[e][1] for e in chosen))
    shutil.copyfile(source / "scp_statements.csv", dest / "scp_statements.csv")
    if (source / "LICENSE.txt").exists():
        shutil.copyfile(source / "LICENSE.txt", dest / "LICENSE.txt")
        files.append("LICENSE.txt")
    for e in chosen:
        files += copy_record(source, dest, rows[e][0]["filename_lr"])
    for e in high:
        files += copy_record(source, dest, rows[e][0]["filename_hr"])
    facts = summary(chosen, high, rows, known, diag)
    (dest / "README.md").write_text(README.format(**facts), encoding="utf-8")
    sums = "".join(f"{hashlib.sha256((dest / rel).read_bytes()).hexdigest()} {rel}\n" for rel in sorted(files))
    (dest / "SHA256SUMS.txt").write_text(sums, encoding="utf-8")
    return facts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.mini", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"per fold: {PER_TRAIN_FOLD} records in folds 1-8, {PER_VAL_FOLD} in 9, "
                                        f"{PER_TEST_FOLD} in 10; {HIGH_RATE_RECORDS} also at 500 Hz")
    ap.add_argument("--source", required=True, help="a PTB-XL folder in PhysioNet's layout (the full dataset or a copy)")
    ap.add_argument("--out", default=str(OUT), help=f"folder to (re)write (default {OUT.relative_to(REPO)})")
    ap.add_argument("--pinned", default=PINNED, help=f"ecg_ids always taken when present (default {PINNED})")
    ap.add_argument("--pinned-500hz", default=PINNED_500HZ, help=f"ecg_ids taken first at 500 Hz (default {PINNED_500HZ})")
    args = ap.parse_args(argv)
    source, out = Path(args.source).expanduser().resolve(), Path(args.out).expanduser().resolve()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        facts = write_mini(source, tmp, parse_ranges(args.pinned), parse_ranges(args.pinned_500hz))
    except (MiniError, ValueError, FileNotFoundError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}: {facts['n']} records at 100 Hz, {facts['n_hr']} at 500 Hz; folds {facts['folds']}; "
          f"{facts['classes']}; multi-label {facts['multi']}; no class {facts['none']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
