"""Mistakes and damaged files end in one line that names the culprit and the way out, before any work is done:
a mistyped model or representation, a damaged resume checkpoint or best weights, broken records given to
evaluation, a record shorter than the training records."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_module
from shared import config as config_mod
from shared.nets import MODELS

MODEL_LIST = "vit deit effnetv2 convnext resnet1d_wang xresnet1d101"
# the arguments conftest's quick runs were trained with: the same command finds the same run folder
QUICK_ARGS = ("--profile", "quick", "--no-progress", "--set", "max_train_batches=3", "--set", "epochs=1",
              "--set", "eval_stride_seconds=7.5")


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return lines[0]


# ------------------------------------------------------------------ model and representation names
@pytest.mark.parametrize("goal", ["train-vitt", "tune-vitt", "seeds-vitt", "prune-vitt", "quantize-vitt",
                                  "export-vitt", "export-openvino-vitt", "bench-compress-vitt"])
def test_make_refuses_an_unknown_model_before_any_work(goal, tmp_path):
    artifacts = tmp_path / "artifacts"
    r = subprocess.run(["make", "--no-print-directory", goal], cwd=REPO, env={**os.environ, "ARTIFACTS": str(artifacts)},
                       capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0
    assert len(out) == 1 and "'vitt'" in out[0] and MODEL_LIST in out[0], out
    assert not artifacts.exists()  # no data built, no download started


def test_make_accepts_every_model_and_the_all_goals(tmp_path):
    goals = [f"{g}-{m}" for g in ("train", "bench-compress", "export-openvino", "export") for m in MODEL_LIST.split()] \
        + ["tune-all", "prune-vit"]
    r = subprocess.run(["make", "-n", *goals], cwd=REPO, env={**os.environ, "ARTIFACTS": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "unknown model" not in r.stderr, r.stderr[-2000:]


def test_make_refuses_an_unknown_representation_before_any_work(tmp_path):
    artifacts = tmp_path / "artifacts"
    r = subprocess.run(["make", "--no-print-directory", "train-vit", "REPR=strp"], cwd=REPO, env={**os.environ, "ARTIFACTS": str(artifacts)},
                       capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0 and len(out) == 1 and "strp" in out[0] and "seed rows leads strip signal" in out[0], out
    assert not artifacts.exists()


def test_unknown_representation_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = run_module("models.train", "--model", "vit", "--representation", "strp", "--profile", "quick",
                   "--out", out, "--data", tmp_path / "no-cache", env={"ARTIFACTS": str(tmp_path / "artifacts")})
    line = one_error_line(r)
    assert "'strp'" in line and "vit" in line and "seed, rows, leads" in line
    assert not out.exists() and not (tmp_path / "artifacts").exists()
    # a representation of another family is refused the same way, with the ones that fit
    with pytest.raises(ValueError, match="'strip' does not fit deit; choose from seed, rows, leads"):
        config_mod.resolve("deit", "quick", "strip")
    with pytest.raises(ValueError, match="choose from signal"):
        config_mod.resolve("resnet1d_wang", "quick", "rows")


def test_every_model_has_its_representations_and_its_default_among_them():
    assert set(config_mod.MODEL_REPRESENTATIONS) == set(MODELS)
    configured = sorted(p.stem for p in config_mod.CONFIG_DIR.glob("*.toml"))
    assert configured == sorted(MODEL_LIST.split())  # the Makefile's names
    for model in configured:
        assert config_mod.resolve(model, "quick")["representation"] in config_mod.MODEL_REPRESENTATIONS[model]


def test_benchmark_of_a_missing_run_is_one_line(tmp_path):
    r = run_module("compression.benchmark", "--run", "vit-leads-cpu", env={"ARTIFACTS": str(tmp_path)})
    line = one_error_line(r)
    assert str(tmp_path / "runs" / "vit-leads-cpu") in line and "train" in line


# ------------------------------------------------------------------ damaged run files
class _Code:
    def __reduce__(self):
        return (print, ("ran",))


def _copied_run(quick_resnet_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(quick_resnet_run, run)
    return run


def _train_again(run: Path, sample_cache: Path):
    return run_module("models.train", "--model", "resnet1d_wang", "--data", sample_cache, "--out", run, *QUICK_ARGS)


@pytest.mark.parametrize("module", ["compression.compress", "compression.prune_structured",
                                    "compression.export_onnx", "compression.openvino_export"])
def test_a_missing_data_cache_is_one_line_naming_it(module, quick_resnet_run, tmp_path):
    proc = run_module(module, "--run", quick_resnet_run, "--out", tmp_path / "compressed",
                      env={"ARTIFACTS": str(tmp_path)})
    line = one_error_line(proc)
    assert str(tmp_path / "data" / "ptbxl-100hz") in line and "make data" in line
    assert not any((tmp_path / "compressed").rglob("metrics.json"))


@pytest.mark.parametrize("damage", ["garbage", "code"])
def test_damaged_resume_checkpoint_is_one_line_naming_it_and_force(damage, quick_resnet_run, sample_cache, tmp_path):
    import torch

    run = _copied_run(quick_resnet_run, tmp_path)
    (run / "metrics.json").unlink()  # unfinished: the same command resumes from last.pt
    if damage == "garbage":
        (run / "last.pt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    else:
        torch.save({"state": _Code()}, run / "last.pt")
    line = one_error_line(_train_again(run, sample_cache))
    assert str(run / "last.pt") in line and "--force" in line
    assert ("refused" in line) == (damage == "code")
    assert "Weights only load failed" not in line and line.rstrip().endswith("start the run over")
    assert not (run / "metrics.json").exists()


def test_truncated_best_weights_are_not_already_trained(quick_resnet_run, sample_cache, tmp_path):
    run = _copied_run(quick_resnet_run, tmp_path)
    best = run / "best.safetensors"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    r = _train_again(run, sample_cache)
    line = one_error_line(r)
    assert str(best) in line and "--force" in line and "already trained" not in r.stdout
    (run / "metrics.json").unlink()  # an interrupted run with them is refused before its remaining epochs
    line = one_error_line(_train_again(run, sample_cache))
    assert str(best) in line and "--force" in line


# ------------------------------------------------------------------ broken records given to evaluation
@pytest.fixture
def broken_folder(sample_dir, tmp_path) -> Path:
    """Records 1-6 of the shipped subset in PTB-XL layout; 1 lacks its 100 Hz header (its 500 Hz one is there),
    2 has a header that says 500 Hz in records100, 3 has a cut-off signal file."""
    dst = tmp_path / "ptbxl"
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / name, dst / name)
    for rate, suffix, ids in ((100, "lr", range(1, 7)), (500, "hr", (1, 2))):
        folder = dst / f"records{rate}" / "00000"
        folder.mkdir(parents=True)
        for i in ids:
            for ext in ("hea", "dat"):
                shutil.copy(sample_dir / f"records{rate}" / "00000" / f"{i:05d}_{suffix}.{ext}", folder)
    lr = dst / "records100" / "00000"
    (lr / "00001_lr.hea").unlink()
    head, *rest = (lr / "00002_lr.hea").read_text().splitlines()
    (lr / "00002_lr.hea").write_text("\n".join([head.replace(" 100 ", " 500 "), *rest]) + "\n")
    dat = lr / "00003_lr.dat"
    dat.write_bytes(dat.read_bytes()[:5000])
    return dst


def test_folder_reads_only_the_requested_rate_and_names_each_problem(broken_folder):
    from shared.raw_input import load_ptbxl_folder

    x, y, ids, problems = load_ptbxl_folder(broken_folder, 100, ecg_ids=list(range(1, 7)))
    kinds = {p["ecg_id"]: p["kind"] for p in problems}
    assert kinds == {1: "missing_file", 2: "wrong_sampling_rate", 3: "truncated"} and 1 not in ids
    message = {p["ecg_id"]: p["message"] for p in problems}
    assert "records100" in message[1] and "00001_lr.hea" in message[1]
    assert "sampling rate 500 Hz, expected 100 Hz" in message[2] and "s long" not in message[2]
    from shared.raw_input import skipped_summary

    assert skipped_summary(problems, len(ids)) == \
        f"skipped 3 of {3 + len(ids)} records: 1 missing_file, 1 wrong_sampling_rate, 1 truncated"


def test_evaluate_on_a_folder_says_on_the_console_what_it_skipped(broken_folder, quick_resnet_run, tmp_path):
    root = tmp_path / "artifacts"
    run = root / "runs" / quick_resnet_run.name
    shutil.copytree(quick_resnet_run, run)
    r = run_module("eval.evaluate", "--artifact", run, "--data", broken_folder, "--ids", "1-6", "--bootstrap", "0",
                   env={"ARTIFACTS": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    result = root / "eval" / "external" / broken_folder.name / run.name / "fp32" / "result.json"
    n = len(json.loads(result.read_text())["ecg_ids"])
    assert (f"skipped 3 of {n + 3} records: 1 missing_file, 1 wrong_sampling_rate, 1 truncated "
            f"(listed in {result})") in r.stdout, r.stdout


# ------------------------------------------------------------------ a record shorter than the training records
def _write_record(folder: Path, name: str, seconds: float, fs: int = 100) -> Path:
    import wfdb

    from shared.records import LEADS

    t = np.arange(int(seconds * fs)) / fs
    signal = np.stack([np.sin(2 * np.pi * (1 + i / 10) * t) for i in range(len(LEADS))], axis=1)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(LEADS), sig_name=list(LEADS), p_signal=signal, fmt=["16"] * len(LEADS),
                write_dir=str(folder))
    return folder / name


def test_short_record_warns_that_the_models_saw_10_s(tmp_path):
    from shared.raw_input import load_signal

    short, full = _write_record(tmp_path, "short", 6.0), _write_record(tmp_path, "full", 10.0)
    with pytest.warns(UserWarning, match=r"short: 6\.0 s long; the models were trained on 10 s records"):
        assert load_signal(short, 100, min_seconds=2.5).shape == (12, 600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_signal(full, 100, min_seconds=2.5).shape == (12, 1000)
    assert not [w for w in caught if "trained on" in str(w.message)]
