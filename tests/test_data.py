"""The data stage on the real PTB-XL sample and on broken synthetic copies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from conftest import REPO, run_module
from shared.cache import CacheError, open_cache, validate_cache
from shared.labels import CLASSES, LabelError, diagnostic_classes, parse_scp_codes, read_statements
from shared.records import RecordError, read_record


# ------------------------------------------------------------------ labels and split (real records)
HAND_CHECKED = {  # ecg_id: classes, checked by hand against scp_codes and scp_statements.csv
    1: {"NORM"},  # NORM 100, LVOLT (not diagnostic), SR (rhythm)
    8: {"MI"},  # IMI 35 (likelihood ignored, as the benchmark), ABQRS is form-only
    26: {"STTC"},  # NST_ + DIG, both STTC
    39: {"MI", "STTC"},  # IMI 15, LNGQT/NST_/DIG
    45: {"CD", "HYP"},  # IRBBB; RAO/RAE and RVH both HYP
    50: {"MI", "CD"},  # LMI, IVCD
}


def test_labels_match_hand_checked_records(sample_cache):
    cache = open_cache(sample_cache)
    meta = cache.meta.set_index("ecg_id")
    for ecg_id, expected in HAND_CHECKED.items():
        row = np.flatnonzero(cache.meta["ecg_id"].to_numpy() == ecg_id)[0]
        got = {c for c, v in zip(CLASSES, cache.labels[row]) if v}
        assert got == expected, ecg_id
        assert set(meta.loc[ecg_id, "labels"].split("|")) == expected


def test_records_without_class_are_dropped_and_counted(sample_dir, sample_cache):
    cache = open_cache(sample_cache)
    known, diag = read_statements(sample_dir / "scp_statements.csv")
    db = pd.read_csv(sample_dir / "ptbxl_database.csv")
    no_class = [e for e, c in zip(db.ecg_id, db.scp_codes) if not diagnostic_classes(parse_scp_codes(c), known, diag)]
    assert 17 in no_class  # AFLT/ABQRS…: rhythm and form codes only
    assert not set(no_class) & set(cache.meta.ecg_id)
    assert cache.manifest["counts"]["dropped_no_diagnostic_class"] == len(no_class) > 0
    assert len(cache.meta) == len(db) - len(no_class)
    assert cache.labels.sum(axis=1).min() >= 1


def test_split_follows_strat_fold(sample_cache):
    meta = open_cache(sample_cache).meta
    expected = np.where(meta.strat_fold <= 8, "train", np.where(meta.strat_fold == 9, "val", "test"))
    assert (meta.split.to_numpy() == expected).all()
    assert set(meta.split) == {"train", "val", "test"}


def test_unknown_code_is_an_error():
    with pytest.raises(LabelError, match="NOT_A_CODE"):
        diagnostic_classes({"NOT_A_CODE": 100.0}, {"NORM"}, {"NORM": "NORM"})


# ------------------------------------------------------------------ signals equal wfdb's
@pytest.mark.parametrize("fs,folder,suffix", [(100, "records100", "lr"), (500, "records500", "hr")])
def test_signals_equal_wfdb_rdsamp(sample_dir, fs, folder, suffix):
    ids = [1, 2, 39, 45, 101, 250, 499]
    for ecg_id in ids:
        base = sample_dir / folder / "00000" / f"{ecg_id:05d}_{suffix}"
        ours, got_fs = read_record(base, expected_fs=fs)
        ref, fields = wfdb.rdsamp(str(base))
        assert got_fs == fields["fs"] == fs
        assert ours.shape == (12, 10 * fs)
        np.testing.assert_array_equal(ours, ref.T.astype(np.float32))


def test_cache_signals_equal_wfdb(sample_dir, sample_cache):
    cache = open_cache(sample_cache)
    for row in [0, len(cache.meta) // 2, len(cache.meta) - 1]:
        ecg_id = int(cache.meta.ecg_id[row])
        ref, _ = wfdb.rdsamp(str(sample_dir / "records100" / f"{ecg_id // 1000 * 1000:05d}" / f"{ecg_id:05d}_lr"))
        np.testing.assert_array_equal(cache.signals[row], ref.T.astype(np.float32))


def test_manifest_contents(sample_cache):
    m = open_cache(sample_cache).manifest
    assert m["classes"] == list(CLASSES) and m["sampling_rate"] == 100
    assert m["normalization"]["fitted_on"] == "train" and len(m["normalization"]["std"]) == 12
    assert all(s > 0 for s in m["normalization"]["std"])
    assert sum(v["records"] for v in m["counts"]["per_split"].values()) == m["counts"]["kept"]
    assert {"torch", "numpy", "wfdb"} <= set(m["versions"])
    import hashlib

    sig = np.load(sample_cache / "signals.npy", mmap_mode="r")
    assert m["files"]["signals.npy"]["data_sha256"] == hashlib.sha256(np.ascontiguousarray(sig).tobytes()).hexdigest()


def test_train_only_normalization(sample_cache):
    cache = open_cache(sample_cache)
    train = np.asarray(cache.signals[cache.split_indices("train")], np.float64)
    mean, std = cache.norm_stats()
    np.testing.assert_allclose(mean, train.mean(axis=(0, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std, train.std(axis=(0, 2)), rtol=1e-4)


# ------------------------------------------------------------------ no-op and rebuild
def test_rerun_is_noop_and_changes_rebuild(synth_dir, tmp_path):
    out = tmp_path / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    t0 = time.time()
    again = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    assert "up to date" in again.stdout
    assert time.time() - t0 < 5  # includes interpreter start; the check itself is < 1 s (see benchmark)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    # an option change rebuilds
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, "--val-folds", "8",
                   "--train-folds", "1-7", check=True)
    assert "up to date" not in r.stdout
    assert set(open_cache(out).meta.strat_fold[open_cache(out).meta.split == "val"]) == {8}
    # a changed record file rebuilds
    dat = next((synth_dir / "records100").rglob("*.dat"))
    raw = np.fromfile(dat, "<i2"); raw[:12] += 7; raw.tofile(dat)
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, "--val-folds", "8",
                   "--train-folds", "1-7", check=True)
    assert "up to date" not in r.stdout


# ------------------------------------------------------------------ bad input
def _first_records(d, n):
    db = pd.read_csv(d / "ptbxl_database.csv")
    return db, [d / f for f in db.filename_lr[:n]]


def _break(kind, d):
    """Break the record of the first database row in way `kind`; return its ecg_id."""
    db, (base,) = _first_records(d, 1)
    dat, hea = base.with_suffix(".dat"), base.with_suffix(".hea")
    raw = np.fromfile(dat, "<i2")
    text = hea.read_text()
    if kind == "truncated":
        dat.write_bytes(dat.read_bytes()[:1000])
    elif kind == "missing_dat":
        dat.unlink()
    elif kind == "missing_hea":
        hea.unlink()
    elif kind == "wrong_fs":
        hea.write_text(text.replace(" 12 100 1000", " 12 250 1000", 1))
    elif kind == "wrong_leads":
        lines = text.splitlines()
        hea.write_text("\n".join([lines[0].replace(" 12 ", " 11 ", 1)] + lines[1:12]) + "\n")
    elif kind == "wrong_length":
        hea.write_text(text.replace(" 12 100 1000", " 12 100 900", 1))
    elif kind == "nan":
        raw[100 * 12 + 3] = -32768
        raw.tofile(dat)
    elif kind == "flat":
        np.zeros_like(raw).tofile(dat)
    elif kind == "unknown_code":
        db.loc[0, "scp_codes"] = "{'NORM': 100.0, 'BOGUS': 50.0}"
        db.to_csv(d / "ptbxl_database.csv", index=False)
    return int(db.ecg_id[0])


BAD = {"truncated": "truncated", "missing_dat": "missing", "missing_hea": "header file missing",
       "wrong_fs": "sampling rate 250", "wrong_leads": "11 leads", "wrong_length": "900 samples",
       "nan": "NaN", "flat": "flat", "unknown_code": "BOGUS"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_is_skipped_counted_and_named(kind, synth_dir, tmp_path):
    db = pd.read_csv(synth_dir / "ptbxl_database.csv")
    classes = [diagnostic_classes(parse_scp_codes(c), *read_statements(synth_dir / "scp_statements.csv"))
               for c in db.scp_codes]
    if not classes[0]:  # make sure the record we break would otherwise be kept
        db.loc[0, "scp_codes"] = "{'NORM': 100.0}"
        db.to_csv(synth_dir / "ptbxl_database.csv", index=False)
    ecg_id = _break(kind, synth_dir)
    out = tmp_path / "cache"
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    cache = open_cache(out)
    assert ecg_id not in set(cache.meta.ecg_id)
    m = cache.manifest
    assert m["counts"]["skipped_total"] == 1
    (p,) = m["problems"]
    assert p["ecg_id"] == ecg_id and BAD[kind] in p["message"]
    assert f"{ecg_id:05d}" in p["message"] or "BOGUS" in p["message"]
    # --strict fails instead, with one line naming the record, and writes nothing
    strict_out = tmp_path / "strict"
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", strict_out, "--strict")
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and BAD[kind] in err[0] and f"ecg_id {ecg_id}" in err[0]
    assert not strict_out.exists()
    assert not list(tmp_path.glob(".strict*"))


def test_csv_missing_column_is_one_clear_line(synth_dir, tmp_path):
    db = pd.read_csv(synth_dir / "ptbxl_database.csv")
    db.drop(columns=["strat_fold"]).to_csv(synth_dir / "ptbxl_database.csv", index=False)
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", tmp_path / "c")
    assert r.returncode == 2
    assert "ptbxl_database.csv: missing column(s) strat_fold" in r.stderr
    assert "Traceback" not in r.stderr
    st = pd.read_csv(synth_dir / "scp_statements.csv", index_col=0)
    st.drop(columns=["diagnostic_class"]).to_csv(synth_dir / "scp_statements.csv")
    db.to_csv(synth_dir / "ptbxl_database.csv", index=False)
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", tmp_path / "c")
    assert r.returncode == 2 and "scp_statements.csv: missing column(s) diagnostic_class" in r.stderr


def test_not_a_ptbxl_folder(tmp_path):
    r = run_module("data_prep.build_cache", "--ptbxl-dir", tmp_path, "--out", tmp_path / "c")
    assert r.returncode == 2 and "ptbxl_database.csv missing" in r.stderr and "Traceback" not in r.stderr


def test_record_error_names_record(synth_dir):
    _, (base,) = _first_records(synth_dir, 1)
    base.with_suffix(".dat").write_bytes(b"\x00\x01")
    with pytest.raises(RecordError, match=base.name):
        read_record(base, expected_fs=100)


# ------------------------------------------------------------------ killed-run safety
def test_killed_build_leaves_no_accepted_cache_and_rerun_succeeds(synth_dir, tmp_path):
    out = tmp_path / "cache"
    env = {**os.environ, "DATA_PREP_TEST_DELAY_S": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.build_cache", "--ptbxl-dir", str(synth_dir),
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    partial = None
    while time.time() < deadline:
        tmps = list(tmp_path.glob(".cache.tmp-*/signals.npy"))
        if tmps and tmps[0].stat().st_size > 12 * 1000 * 4 * 5:  # a few records written
            partial = tmps[0]
            break
        time.sleep(0.02)
    assert partial is not None, "build never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(CacheError):
        validate_cache(out)
    r = run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    assert "up to date" not in r.stdout
    validate_cache(out)
    assert not list(tmp_path.glob(".cache.tmp-*")), "stale temporary folder left behind"


def test_tampered_cache_is_refused(synth_dir, tmp_path):
    out = tmp_path / "cache"
    run_module("data_prep.build_cache", "--ptbxl-dir", synth_dir, "--out", out, check=True)
    with open(out / "signals.npy", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CacheError, match="signals.npy"):
        open_cache(out)
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="incomplete"):
        validate_cache(out)


# ------------------------------------------------------------------ dataset, loaders, the seed preset
def test_loader_batches_and_seed_preset(sample_cache):
    from shared import representations as rep
    from shared.dataset import ECGDataset, make_loader

    cache = open_cache(sample_cache)
    ds = ECGDataset(cache, "train")
    x, y = next(iter(make_loader(ds, batch_size=32, shuffle=True, seed=0)))
    assert x.shape == (32, 12, 1000) and y.shape == (32, 5) and x.dtype == torch.float32
    # per-lead standardization with train statistics: the whole train split has ~zero mean, unit std
    xa, _ = ds.__getitems__(range(len(ds)))
    assert abs(float(xa.mean())) < 1e-3 and abs(float(xa.std()) - 1) < 1e-2
    img = rep.apply("seed", x)
    assert img.shape == (32, 3, 182, 256) and rep.input_shape("seed", 12, 1000) == tuple(img.shape[1:])
    assert torch.equal(img[:, 0], img[:, 2])
    assert rep.apply("rows", x).shape == (32, 1, 96, 1000)
    # the same seed gives the same batches
    a = next(iter(make_loader(ds, batch_size=8, shuffle=True, seed=3)))[1]
    b = next(iter(make_loader(ds, batch_size=8, shuffle=True, seed=3)))[1]
    assert torch.equal(a, b)
    # test split: labels agree with the cache rows
    test = ECGDataset(cache, "test")
    _, yt = test.__getitems__([0, 1, 2])
    np.testing.assert_array_equal(yt.numpy(), cache.labels[cache.split_indices("test")[:3]])


def test_multi_hot_equals_multilabelbinarizer(sample_cache):
    from sklearn.preprocessing import MultiLabelBinarizer

    from shared.labels import multi_hot

    meta = open_cache(sample_cache).meta
    lists = [s.split("|") for s in meta.labels]
    train = [lst for lst, sp in zip(lists, meta.split) if sp == "train"]
    mlb = MultiLabelBinarizer().fit(train)  # the benchmark's way: fitted on train, alphabetical columns
    ref = mlb.transform(lists)
    ours = multi_hot(lists)
    order = [list(mlb.classes_).index(c) for c in CLASSES]
    np.testing.assert_array_equal(ours, ref[:, order])
    np.testing.assert_array_equal(ours, open_cache(sample_cache).labels)


def test_synth_fast_writer_is_byte_identical_to_wfdb(tmp_path):
    from data_prep.synth import synth_signal, write_format16, write_with_wfdb

    for fs in (100, 500):
        sig = synth_signal(np.random.default_rng(fs), ["MI", "CD"], fs)
        write_with_wfdb(tmp_path / "a" / "00007_x", sig, fs)
        write_format16(tmp_path / "b" / "00007_x", sig, fs)
        for ext in (".hea", ".dat"):
            assert (tmp_path / "a" / f"00007_x{ext}").read_bytes() == (tmp_path / "b" / f"00007_x{ext}").read_bytes()
        ref, _ = wfdb.rdsamp(str(tmp_path / "b" / "00007_x"))
        np.testing.assert_allclose(ref, sig, atol=1e-9)
