"""Evaluation, report and prediction: metrics against hand-computed values, a quick run scored end to end,
thresholds that never see test labels, predict on real and broken records, the report in a real browser."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from shared import metrics as M


# ------------------------------------------------------------------ metrics by hand
def test_challenge_scores_match_hand_computation():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    p = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    # weights 1/|labels|: row0 1, row1 1/2, row2 1, row3 (no label) 1
    # class 0: TP row0 = 1; FN row1 = 0.5; FP row2 = 1  → F2 = 5·1/(5·1 + 1 + 4·0.5) = 5/8; G2 = 1/(1+1+2·0.5) = 1/3
    # class 1: TP row1 0.5 + row2 1 = 1.5; FP 0; FN 0 → F2 = 1, G2 = 1
    f2, g2 = M.challenge_scores(y, p)
    assert f2 == pytest.approx((5 / 8 + 1) / 2)
    assert g2 == pytest.approx((1 / 3 + 1) / 2)


def test_point_metrics_and_thresholds_by_hand():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    s = np.array([[0.9, 0.2], [0.4, 0.1], [0.3, 0.8], [0.5, 0.7]])
    thr = M.tune_thresholds(y, s)
    # class 0: cutting at 0.9 gives F1 2/3, at 0.4 gives TP 2, FP 1 → 0.8 (best); class 1 separable at 0.7
    assert thr == pytest.approx([0.4, 0.7])
    m = M.point_metrics(y, s, np.array([0.6, 0.6]))
    # preds: [1,0] [0→top class 0: 1,0] [0,1] [0,1] → all rows exactly right
    assert m["exact_match_accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["macro_auc"] == pytest.approx((0.75 + 1.0) / 2)  # class 0: 0.4 < 0.5 misorders one pair of four


def test_fast_bootstrap_metrics_equal_scikit_learn():
    rng = np.random.default_rng(5)
    y = (rng.random((80, 5)) < 0.3).astype(int)
    s = np.round(np.clip(y * 0.25 + rng.random((80, 5)) * 0.75, 0, 1), 2)  # rounded: ties exercised
    thr = M.tune_thresholds(y, s)
    slow = M.point_metrics(y, s, thr)
    fast = M.fast_point_metrics(y, s, M.apply_thresholds(s, thr))
    for k, v in slow.items():
        np.testing.assert_allclose(fast[k], v, atol=1e-12, err_msg=k)


def test_paired_auc_difference_is_exact_and_its_interval_is_narrower_than_unpaired():
    rng = np.random.default_rng(7)
    y = (rng.random((150, 5)) < 0.3).astype(int)
    noise = rng.random((150, 5))
    strong, weak = y * 0.3 + noise * 0.7, y * 0.2 + noise * 0.8  # same records, same noise: a shared "luck"
    d = M.paired_auc_difference(y, strong, weak, n_resamples=300)
    assert d["delta"] == pytest.approx(M.macro_auc(y, strong) - M.macro_auc(y, weak), abs=1e-12)
    assert 0 < d["low"] < d["delta"] < d["high"] and d["p_a_better"] == 1.0
    # unpaired: the two separate intervals overlap far more than the paired one is wide
    lo_s, hi_s = M.bootstrap_ci(y, strong, np.full(5, 0.5), 300)["macro_auc"]
    lo_w, hi_w = M.bootstrap_ci(y, weak, np.full(5, 0.5), 300)["macro_auc"]
    assert (d["high"] - d["low"]) < ((hi_s - lo_s) + (hi_w - lo_w)) / 2
    same = M.paired_auc_difference(y, weak, weak, n_resamples=50)
    assert same["delta"] == same["low"] == same["high"] == 0 and same["p_a_better"] == 0


def test_paired_test_difference_pairs_only_the_same_records(tmp_path):
    from shared.results import paired_test_difference, run_seed, test_predictions

    rng = np.random.default_rng(5)
    y = (rng.random((60, 5)) < 0.3).astype(np.float32)
    ids = np.arange(1, 61)
    a, b = y * 0.4 + rng.random((60, 5)) * 0.6, rng.random((60, 5))
    np.savez(tmp_path / "a.npz", test_ecg_id=ids, test_labels=y, test_probs=a)
    np.savez(tmp_path / "b.npz", test_ecg_id=ids, test_labels=y, test_probs=b)
    np.savez(tmp_path / "other.npz", test_ecg_id=ids[::-1], test_labels=y, test_probs=b)  # same labels, other records
    np.savez(tmp_path / "train.npz", test_labels=y, test_probs=b)  # training's file: no ecg_id
    d = paired_test_difference(test_predictions(tmp_path / "a.npz"), test_predictions(tmp_path / "b.npz"), 50)
    assert d["delta"] == pytest.approx(M.macro_auc(y, a) - M.macro_auc(y, b), abs=1e-12)
    assert paired_test_difference(test_predictions(tmp_path / "a.npz"), test_predictions(tmp_path / "other.npz"),
                                  50) is None
    assert paired_test_difference(test_predictions(tmp_path / "a.npz"), test_predictions(tmp_path / "train.npz"),
                                  50)["delta"] == pytest.approx(d["delta"])  # no ids on one side: labels decide
    assert test_predictions(tmp_path / "missing.npz") is None
    assert paired_test_difference(None, test_predictions(tmp_path / "b.npz"), 50) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"seed": 3}')
    assert run_seed(tmp_path / "run") == 3 and run_seed(tmp_path / "run", {"seed": 4}) == 4
    assert run_seed(tmp_path / "no-such-run") == 0


def test_resampled_auc_equals_rank_auc_and_scikit_learn_on_each_resample():
    rng = np.random.default_rng(3)
    y = (rng.random((90, 4)) < 0.25).astype(int)
    y[:, 3] = 0
    y[:4, 3] = 1  # a rare class: some resamples lose its positives → NaN, as per_class_auc gives
    s = np.round(rng.random((90, 4)) * 0.7 + y * 0.3, 1)  # one decimal: many ties
    idx = rng.integers(0, 90, (40, 90))
    counts = np.stack([np.bincount(i, minlength=90) for i in idx])
    fast = M.resampled_auc(y, s, counts)
    np.testing.assert_allclose(fast, M.rank_auc(y[idx], s[idx]), atol=1e-12)
    for r in (0, 7, 39):
        np.testing.assert_allclose(fast[r], M.per_class_auc(y[idx[r]], s[idx[r]]), atol=1e-12)


def test_macro_auc_skips_single_valued_class():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])
    assert np.isnan(M.per_class_auc(y, s)[1])
    assert M.macro_auc(y, s) == 1.0


def test_bootstrap_is_seeded_and_every_resample_has_every_class():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < 0.2).astype(int)
    y[0] = 1
    s = np.clip(y * 0.3 + rng.random((60, 3)) * 0.7, 0, 1)
    a = M.bootstrap_ci(y, s, np.full(3, 0.5), n_resamples=60, seed=3)
    b = M.bootstrap_ci(y, s, np.full(3, 0.5), n_resamples=60, seed=3)
    c = M.bootstrap_ci(y, s, np.full(3, 0.5), n_resamples=60, seed=4)
    assert a["macro_auc"] == b["macro_auc"] and a["macro_auc"] != c["macro_auc"]
    lo, hi = a["macro_auc"]
    assert lo < M.macro_auc(y, s) < hi
    idx = M.bootstrap_indices(y, 200, seed=1)
    assert (y[idx].sum(axis=1) > 0).all()  # every resample × class has a positive


# ------------------------------------------------------------------ end to end on a quick run
@pytest.fixture(scope="module")
def scored(quick_resnet_run, sample_cache, tmp_path_factory):
    """The quick resnet1d_wang run copied into its own artifacts root, scored by `eval.evaluate --all`."""
    root = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(quick_resnet_run, root / "runs" / "resnet1d_wang-signal-quick")
    env = {"ARTIFACTS": str(root)}
    run_module("compression.compress", "--run", root / "runs" / "resnet1d_wang-signal-quick", "--methods", "dynamic",
               "--data", sample_cache, env=env, check=True)
    r = run_module("eval.evaluate", "--all", "--bootstrap", "200", "--latency-runs", "10", "--jobs", "2",
                   "--bf16", "yes", env=env)  # the bf16 path on every CPU (auto skips it where bf16 is emulated)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, env


def test_eval_all_writes_results_with_intervals_and_efficiency(scored):
    root, env = scored
    results = json.loads((root / "eval" / "results.json").read_text())["results"]
    assert {r["variant"] for r in results} == {"fp32", "bf16", "dynamic"}
    fp32 = next(r for r in results if r["variant"] == "fp32")
    run_metrics = json.loads((root / "runs" / "resnet1d_wang-signal-quick" / "metrics.json").read_text())
    assert fp32["splits"]["test"]["macro_auc"] == pytest.approx(run_metrics["test"]["macro_auc"], abs=1e-6)
    lo, hi = fp32["splits"]["test"]["ci"]["macro_auc"]
    assert lo <= fp32["splits"]["test"]["macro_auc"] <= hi
    for key in ("macro_f1", "f_beta2", "g_beta2", "exact_match_accuracy"):
        assert 0 <= fp32["splits"]["test"][key] <= 1
    e = fp32["efficiency"]
    assert e["latency_ms_b1_t1"] > 0 and e["latency_p95_ms_b1_t1"] >= e["latency_ms_b1_t1"]
    assert e["throughput_b32_t2"] > 0 and e["peak_rss_mb"] > 50
    # scored two at a time, timed one at a time: the first to time finds its peer still scoring (a worker cannot
    # finish before it has been timed) and pauses it; the last is timed alone
    paused = [r["efficiency"]["other_evaluations_paused"] for r in results]
    assert sorted(paused)[-1] == 1 and sorted(paused)[0] == 0 and set(paused) <= {0, 1}
    csv = (root / "eval" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("artifact,run,variant") and len(csv) > 50
    again = run_module("eval.evaluate", "--all", "--bf16", "yes", env=env)
    assert "3 up to date, 0 to evaluate" in again.stdout


def test_thresholds_never_see_test_labels(scored, tmp_path):
    """Flip every test label in a copy of the cache: thresholds stay, test metrics move."""
    root, env = scored
    cfg = json.loads((root / "runs" / "resnet1d_wang-signal-quick" / "config.json").read_text())
    cache = tmp_path / "cache"
    shutil.copytree(cfg["data"], cache)
    import pandas as pd
    labels = np.load(cache / "labels.npy")
    test_rows = pd.read_csv(cache / "meta.csv")["split"].to_numpy() == "test"
    labels[test_rows] = 1 - labels[test_rows]
    np.save(cache / "labels.npy", labels)
    from eval import evaluate as E
    item = E.resolve_item(root / "runs" / "resnet1d_wang-signal-quick", "fp32")
    old = json.loads((root / "eval" / "resnet1d_wang-signal-quick" / "fp32" / "result.json").read_text())
    os.environ["ARTIFACTS"] = str(tmp_path / "other")
    try:
        new = E.evaluate_artifact(item, n_boot=0, speed=False, data_dir=cache)
    finally:
        os.environ["ARTIFACTS"] = env["ARTIFACTS"]
    assert new["thresholds"] == old["thresholds"]
    assert new["splits"]["test"]["macro_auc"] == pytest.approx(1 - old["splits"]["test"]["macro_auc"], abs=1e-6)


def test_evaluate_on_a_ptbxl_folder(scored, sample_dir):
    root, env = scored
    r = run_module("eval.evaluate", "--artifact", root / "runs" / "resnet1d_wang-signal-quick", "--data", sample_dir,
                   "--folds", "10", "--bootstrap", "50", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((root / "eval" / "external" / sample_dir.name / "resnet1d_wang-signal-quick" / "fp32"
                      / "result.json").read_text())
    cached = json.loads((root / "eval" / "resnet1d_wang-signal-quick" / "fp32" / "result.json").read_text())
    # the raw folder's fold 10 is the cache's test split, read and normalized the same way
    assert out["metrics"]["records"] == cached["splits"]["test"]["records"]
    assert out["metrics"]["macro_auc"] == pytest.approx(cached["splits"]["test"]["macro_auc"], abs=1e-4)
    one = run_module("eval.evaluate", "--artifact", root / "runs" / "resnet1d_wang-signal-quick", "--data", sample_dir,
                     "--ids", "1", env=env)
    assert one.returncode == 0 and "records 1" in one.stdout, one.stderr[-1000:]


# ------------------------------------------------------------------ predict
def test_predict_real_records_table_and_json(scored, sample_dir):
    root, env = scored
    run = root / "runs" / "resnet1d_wang-signal-quick"
    assert len(json.loads((run / "config.json").read_text())["normalization"]["mean"]) == 12  # self-contained run
    recs = [sample_dir / "records100" / "00000" / "00001_lr", sample_dir / "records500" / "00000" / "00002_hr"]
    r = run_module("eval.predict", *recs, "--model", run, "--json", env=env)
    assert r.returncode == 0, r.stderr[-1000:]
    out = json.loads(r.stdout)
    assert len(out["predictions"]) == 2 and out["threshold_source"].startswith("tuned on validation")
    for p in out["predictions"]:
        assert set(p["probabilities"]) == {"NORM", "MI", "STTC", "CD", "HYP"} and p["labels"]
    assert "resampling 500 Hz → 100 Hz" in r.stderr
    table = run_module("eval.predict", recs[0], "--model", run, env=env)
    assert table.returncode == 0 and "00001_lr" in table.stdout and "NORM" in table.stdout


def _write_record(folder: Path, name: str, signal: np.ndarray, fs: int = 100, leads=None) -> Path:
    import wfdb
    leads = leads or ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"][:signal.shape[1]]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * signal.shape[1], sig_name=leads, p_signal=signal, fmt=["16"] * signal.shape[1],
                adc_gain=[1000.0] * signal.shape[1], baseline=[0] * signal.shape[1], write_dir=str(folder))
    return folder / name


def test_predict_bad_inputs_one_line_and_nonzero_exit(scored, tmp_path, monkeypatch, capsys):
    root, env = scored
    run = root / "runs" / "resnet1d_wang-signal-quick"
    rng = np.random.default_rng(0)
    six = _write_record(tmp_path, "six", rng.normal(0, 0.1, (1000, 6)))
    short = _write_record(tmp_path, "short", rng.normal(0, 0.1, (100, 12)))
    nan = _write_record(tmp_path, "nan", rng.normal(0, 0.1, (1000, 12)))
    raw = np.fromfile(tmp_path / "nan.dat", dtype="<i2")
    raw[5 * 12 + 3] = -32768  # the WFDB format-16 marker for an invalid sample
    raw.tofile(tmp_path / "nan.dat")
    cases = {tmp_path / "missing": "header file missing", six: "6 leads, expected 12", short: "needs at least",
             nan: "NaN"}
    from eval import predict
    monkeypatch.setenv("ARTIFACTS", env["ARTIFACTS"])
    for record, text in cases.items():
        code = predict.main([str(record), "--model", str(run)])  # in-process: the CLI's own exit path
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
        assert code == 2 and len(lines) == 1 and text in lines[0] and str(record.name) in lines[0], err


# ------------------------------------------------------------------ report in a browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(scored, tmp_path):
    root, env = scored
    r = run_module("eval.report", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    page = root / "report" / "report.html"
    md = (root / "report" / "report.md").read_text()
    assert "resnet1d_wang-signal-quick/fp32" in md and "QUOTED" in md
    # the dynamic int8 variant against its own fp32 model, paired on the same test records
    pair = next(line for line in md.splitlines() if line.startswith("| resnet1d_wang-signal-quick/dynamic | "))
    assert "resnet1d_wang-signal-quick/fp32" in pair and "[" in pair
    for fig in ("roc.png", "auc_vs_latency.png"):
        assert (root / "report" / "figures" / fig).stat().st_size > 5000
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: .ci/run installs Debian's chromium with apt; it could not be installed here")
    # a copy with a probe that writes, after load, whether every image decoded; the report itself has no script
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>window.addEventListener('load',()=>{const im="
                     "[...document.images];document.title='IMAGES '+im.length+' OK '+im.filter(i=>i.complete&&"
                     "i.naturalWidth>0).length;});</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
             "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = dom.stdout.split("<title>")[1].split("</title>")[0]
    n_images = md.count("![")
    assert title == f"IMAGES {n_images} OK {n_images}", title
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    shot = root / "report" / "screenshot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10000


def test_report_says_why_the_bf16_twins_are_missing(scored, tmp_path):
    root, _ = scored
    copy = tmp_path / "artifacts"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("report"))
    doc = json.loads((copy / "eval" / "results.json").read_text())
    doc["results"] = [r for r in doc["results"] if r["variant"] != "bf16"]
    doc["bf16_skipped"] = "not scored: this CPU has no native bf16"
    (copy / "eval" / "results.json").write_text(json.dumps(doc))
    r = run_module("eval.report", env={"ARTIFACTS": str(copy)})
    assert r.returncode == 0, r.stderr[-2000:]
    md = (copy / "report" / "report.md").read_text()
    assert "bf16 twins of the runs: not scored: this CPU has no native bf16." in md and "/bf16 |" not in md


def test_bf16_twins_are_scored_only_where_the_cpu_computes_bf16(tmp_path, monkeypatch):
    from eval import evaluate as E

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "best.safetensors").write_bytes(b"")
    (run / "metrics.json").write_text("{}")
    assert [i["variant"] for i in E.discover(tmp_path)] == ["fp32", "bf16"]
    assert [i["variant"] for i in E.discover(tmp_path, bf16=False)] == ["fp32"]
    for native, mode, want in ((False, "auto", False), (True, "auto", True), (None, "auto", True),
                               (False, "yes", True), (True, "no", False)):
        monkeypatch.setattr(E, "native_bf16", lambda native=native: native)
        wanted, why = E.bf16_wanted(mode)
        assert wanted == want and (why is None) == want, (native, mode)
        if native is False and mode == "auto":
            assert "no native bf16" in why and "BF16=yes" in why


def test_eval_all_names_the_exception_not_the_last_hint():
    from eval.evaluate import exception_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
          "torch._inductor.exc.InductorError: RuntimeError: shapes differ\n\n"
          "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n"
          "See https://pytorch.org/docs/stable/library.html#torch.library.opcheck\n")
    assert exception_line(tb) == "torch._inductor.exc.InductorError: RuntimeError: shapes differ"
    assert exception_line("error: x.hea: no such record\n") == "error: x.hea: no such record"
    assert exception_line("") == "(no message)"


def test_report_tuned_vs_default_reads_the_study(tmp_path, monkeypatch):
    from eval.report import tuned_vs_default

    monkeypatch.setenv("ARTIFACTS", str(tmp_path))
    study = tmp_path / "tune" / "vit" / "study.json"
    study.parent.mkdir(parents=True)
    study.write_text(json.dumps({"finished_trials": 4, "trial_seconds_total": 661.0, "fixed": {"epochs": 8}}))
    base = {"model": "vit", "profile": "cpu", "representation": "leads"}
    runs = [{**base, "config": "default", "seed": 1, "val": 0.5, "test": 0.5},  # an extra seed sorts first
            {**base, "config": "default", "val": 0.91, "test": 0.84},
            {**base, "config": "tuned", "val": 0.92, "test": 0.87},
            {**base, "config": "default", "representation": "seed", "val": 0.76, "test": 0.77}]
    (row,) = tuned_vs_default(runs)
    assert (row["default_val"], row["tuned_test"], row["trials"]) == (0.91, 0.87, 4)
    assert row["study_seconds"] == 661.0 and row["fixed"] == "epochs=8"


def test_report_best_model_is_an_fp32_run_chosen_on_validation():
    from eval.report import best_model

    def result(artifact, variant, val, test):
        return {"artifact": artifact, "variant": variant,
                "splits": {"val": {"macro_auc": val}, "test": {"macro_auc": test}}}

    results = [result("a/fp32", "fp32", 0.90, 0.80), result("a/bf16", "bf16", 0.9002, 0.80),
               result("b/fp32", "fp32", 0.89, 0.95), result("a/prune", "prune", 0.91, 0.81)]
    assert best_model(results)["artifact"] == "a/fp32"  # not the bf16 twin, not b's better TEST score
    assert best_model([result("c/qat", "qat", 0.7, 0.7)])["artifact"] == "c/qat"  # no fp32 run: any artifact
    assert best_model([result("d/fp32", "fp32", None, None)]) is None
