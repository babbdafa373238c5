"""The real PTB-XL subset shipped in tests/data/ptbxl-mini: complete, covering, small, and reproducible."""
from __future__ import annotations

import hashlib

from conftest import MINI, run_module
from data_prep.mini import label_key, read_rows
from shared.labels import CLASSES, read_statements


def test_every_file_matches_its_sha256_and_the_folder_stays_small():
    lines = (MINI / "SHA256SUMS.txt").read_text().splitlines()
    listed = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in lines}
    present = {str(p.relative_to(MINI)) for p in MINI.rglob("*") if p.is_file()} - {"SHA256SUMS.txt"}
    assert set(listed) == present
    for rel, digest in listed.items():
        assert hashlib.sha256((MINI / rel).read_bytes()).hexdigest() == digest, rel
    assert sum((MINI / rel).stat().st_size for rel in present) < 12e6
    assert "Creative Commons Attribution 4.0" in (MINI / "README.md").read_text()


def test_covers_every_fold_superclass_multilabel_and_no_class():
    known, diag = read_statements(MINI / "scp_statements.csv")
    _, _, rows = read_rows(MINI / "ptbxl_database.csv")
    keys = {e: label_key(r, known, diag) for e, (r, _) in rows.items()}
    assert {int(float(r["strat_fold"])) for r, _ in rows.values()} == set(range(1, 11))
    assert all(any(c in k.split("|") for k in keys.values()) for c in CLASSES)
    assert any("|" in k for k in keys.values()) and any(k == "" for k in keys.values())
    for e, (r, _) in rows.items():
        assert (MINI / f"{r['filename_lr']}.dat").exists(), e
    assert 15 <= len(list((MINI / "records500").rglob("*.hea"))) <= 25


def test_regenerating_from_itself_is_byte_identical(tmp_path):
    """Quotas equal the shipped counts, so cutting the subset from itself must give every file back unchanged:
    the cut is deterministic and copies bytes, never rewrites them."""
    out = tmp_path / "again"
    run_module("data_prep.mini", "--source", MINI, "--out", out, check=True)
    again = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shipped = {str(p.relative_to(MINI)): p.read_bytes() for p in MINI.rglob("*") if p.is_file()}
    assert again.keys() == shipped.keys()
    assert all(again[k] == shipped[k] for k in shipped)


def test_a_folder_without_the_database_is_one_line(tmp_path):
    r = run_module("data_prep.mini", "--source", tmp_path, "--out", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "ptbxl_database.csv" in r.stderr
    assert not (tmp_path / "out").exists()
