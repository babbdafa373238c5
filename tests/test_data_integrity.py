"""The data stage against hostile cells, dead builds' leftovers, repeated zip sources and caches edited in place."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import run_module
from shared import cache as cache_fmt
from shared.cache import CacheCorrupt, verify_cache
from shared.labels import LabelError, parse_scp_codes

NO_SOURCE = {"PTBXL_DIR": ""}


@pytest.fixture(scope="module")
def built_cache(synth_template, tmp_path_factory):
    """One build of the synthetic folder; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("integrity") / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", synth_template, "--out", out, check=True)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)  # the build writes format 1.0
        return f.tell()


# ------------------------------------------------------------------ hostile scp_codes cells
HOSTILE = {
    "unary chain (RecursionError)": "{'NORM': " + "-" * 5000 + "1}",
    "nested dicts": "{'A': " * 5000 + "}" * 5000,
    "nested lists": "[" * 5000 + "]" * 5000,
    "over-long": "{'NORM': 100.0, " + "'SR': 0.0, " * 20000 + "}",
    "unhashable key": "{[1]: 2}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_scp_codes_is_a_label_error_with_a_short_message(name):
    with pytest.raises(LabelError) as e:
        parse_scp_codes(HOSTILE[name])
    assert len(str(e.value)) < 300


def test_hostile_scp_codes_cells_are_counted_and_the_build_goes_on(synth_dir, tmp_path):
    db = pd.read_csv(synth_dir / "ptbxl_database.csv")
    db.loc[0, "scp_codes"] = HOSTILE["unary chain (RecursionError)"]
    db.loc[1, "scp_codes"] = HOSTILE["nested dicts"]
    db.to_csv(synth_dir / "ptbxl_database.csv", index=False)
    out = tmp_path / "cache"
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = verify_cache(out)
    assert m["counts"]["skipped"] == {"bad_scp_codes": 2}
    assert {p["ecg_id"] for p in m["problems"]} == {int(db.ecg_id[0]), int(db.ecg_id[1])}
    assert all(len(p["message"]) < 500 for p in m["problems"])
    assert m["counts"]["kept"] > 40


# ------------------------------------------------------------------ dead builds' temporary folders
def test_noop_runs_remove_dead_builds_temporaries_only(synth_dir, tmp_path):
    out = tmp_path / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    dead, live = tmp_path / f".cache.tmp-{_dead_pid()}", tmp_path / f".cache.tmp-{os.getpid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "signals.npy").write_bytes(b"\0" * 1000)
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    assert "up to date" in r.stdout
    assert not dead.exists() and live.exists()
    dead.mkdir()  # and when no source is named
    r = run_module("data_prep.build_cache", "--out", out, env=NO_SOURCE, check=True)
    assert "using the existing cache" in r.stdout
    assert not dead.exists() and live.exists()


# ------------------------------------------------------------------ zip source extracted once
def _zip(folder, path, extra: bytes = b""):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"ptbxl/{p.relative_to(folder).as_posix()}")
        if extra:
            zf.writestr("ptbxl/EXTRA.txt", extra)
    return path


def test_zip_source_is_extracted_once_until_the_zip_changes(synth_dir, tmp_path, monkeypatch):
    from data_prep.build_cache import resolve_source

    monkeypatch.setenv("ARTIFACTS", str(tmp_path / "artifacts"))
    zpath = _zip(synth_dir, tmp_path / "ptbxl.zip")
    first = resolve_source(str(zpath), 100, None)
    assert (first / "ptbxl_database.csv").is_file()
    (first / "MARKER").write_text("kept while the zip is unchanged")
    assert resolve_source(str(zpath), 100, None) == first and (first / "MARKER").exists()
    st = zpath.stat()
    os.utime(zpath, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: extracted again
    assert resolve_source(str(zpath), 100, None) == first and not (first / "MARKER").exists()
    (first / "MARKER").write_text("x")
    _zip(synth_dir, zpath, extra=b"new release")  # replaced
    again = resolve_source(str(zpath), 100, None)
    assert not (again / "MARKER").exists() and (again / "EXTRA.txt").read_bytes() == b"new release"


def test_make_data_on_an_unchanged_zip_is_a_noop(synth_dir, tmp_path):
    zpath = _zip(synth_dir, tmp_path / "ptbxl.zip")
    env = {"ARTIFACTS": str(tmp_path / "artifacts")}
    out = tmp_path / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", zpath, "--out", out, env=env, check=True)
    (csv,) = (tmp_path / "artifacts").rglob("ptbxl_database.csv")
    before = csv.stat()
    r = run_module("data_prep.build_cache", "--ptbxl-dir", zpath, "--out", out, env=env, check=True)
    assert "up to date" in r.stdout
    after = csv.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# ------------------------------------------------------------------ caches edited in place
def test_signals_edited_in_place_fail_without_a_source_and_rebuild_with_one(synth_dir, tmp_path):
    out = tmp_path / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    sig = out / "signals.npy"
    size = sig.stat().st_size
    _overwrite(sig, _data_offset(sig) + 4000, np.full(4, np.nan, np.float32).tobytes())
    assert sig.stat().st_size == size
    r = run_module("data_prep.build_cache", "--out", out, env=NO_SOURCE)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {sig}: contents differ from manifest.json's data_sha256")
    assert "--force" in line and f"PTBXL_DIR={synth_dir.resolve()}" in line
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    assert "up to date" not in r.stdout
    assert "signals.npy: contents differ" in r.stderr and "rebuilding" in r.stderr
    assert not np.isnan(np.load(sig, mmap_mode="r")).any()
    verify_cache(out)


@pytest.mark.parametrize("name", ["labels.npy", "meta.csv", "signals.npy"])
def test_edit_with_size_and_mtime_restored_is_caught(built_cache, tmp_path, name):
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    verify_cache(out)
    path = out / name
    st = path.stat()
    _overwrite(path, st.st_size - 2, b"7")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(CacheCorrupt, match=f"{name}: contents differ from manifest.json's"):
        verify_cache(out)


def test_signals_header_shape_is_checked(built_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    sig = out / "signals.npy"
    header = sig.read_bytes()[:_data_offset(sig)]
    _overwrite(sig, 0, header.replace(b", 12, ", b",  6, ", 1))  # same length: the data hash alone would pass
    with pytest.raises(CacheCorrupt, match="header"):
        verify_cache(out)


def test_unchanged_files_are_not_hashed_again(built_cache, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("hashed a file whose identity matched")

    with monkeypatch.context() as m:  # the build recorded what it hashed
        m.setattr(cache_fmt, "_npy_data_sha256", refuse)
        m.setattr(cache_fmt, "sha256_file", refuse)
        verify_cache(built_cache)
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)  # new inodes and ctimes: hashed once, then recorded
    verify_cache(out)
    monkeypatch.setattr(cache_fmt, "_npy_data_sha256", refuse)
    monkeypatch.setattr(cache_fmt, "sha256_file", refuse)
    verify_cache(out)
