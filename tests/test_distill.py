"""Distillation from a teacher run (`TEACHER=`, shared/distill.py): DeiT's two heads and their two targets, what a
distilled run records, a missing teacher model trained first (one run folder trained by one process at a time),
one-line refusals of a missing, mismatched or self teacher, the test fold left alone, the profile's default teacher
and TEACHER=none, and the summary's distilled-vs-plain table."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_module
from shared.distill import kd_loss, teacher_term

QUICK = ["--profile", "quick", "--no-progress", "--set", "epochs=1", "--set", "max_train_batches=2",
         "--set", "eval_stride_seconds=7.5"]


def bce(p_logits, target):
    p = torch.sigmoid(p_logits)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def test_kd_loss_is_the_formula_and_bce_at_alpha_0():
    from shared.distill import WithTeacher

    s = torch.tensor([[2.0, -1.0, 0.5]])
    t = torch.tensor([[1.0, 0.0, -3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    alpha, temp = 0.3, 2.0

    expected = (1 - alpha) * bce(s, y) + alpha * bce(s / temp, torch.sigmoid(t / temp))
    assert kd_loss(s, y, t, alpha, temp).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(s, y, t, 0.0, temp).item() == pytest.approx(bce(s, y).item(), rel=1e-6)
    assert WithTeacher(alpha, temp)(s, (y, t)).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(t, y, t, 1.0, temp) < kd_loss(t + 0.5, y, t, 1.0, temp)  # pure KD: least where s copies t


def test_deit_two_head_loss_is_labels_on_the_class_head_and_teacher_on_the_distillation_head():
    cls = torch.tensor([[1.5, -0.3, 0.2, -2.0, 0.7]])
    dist = torch.tensor([[0.4, 0.9, -1.1, 0.0, 2.2]])
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])
    t = torch.tensor([[2.0, -1.0, 0.5, -0.2, 3.0]])
    alpha, temp = 0.3, 2.5
    soft = (1 - alpha) * bce(cls, y) + alpha * bce(dist / temp, torch.sigmoid(t / temp))
    hard = (1 - alpha) * bce(cls, y) + alpha * bce(dist, (t > 0).float())  # DeiT's hard-label variant: no T
    assert kd_loss((cls, dist), y, t, alpha, temp).item() == pytest.approx(soft.item(), rel=1e-6)
    assert kd_loss((cls, dist), y, t, alpha, temp, "hard").item() == pytest.approx(hard.item(), rel=1e-6)
    assert kd_loss((cls, dist), y, t, 0.0, temp).item() == pytest.approx(bce(cls, y).item(), rel=1e-6)


def test_deit_in_distilled_training_sends_label_gradients_to_its_class_head_and_teacher_ones_to_its_dist_head():
    from shared.nets import build_model
    from shared.representations import input_shape

    torch.manual_seed(0)
    model = build_model("deit", "leads", 200)
    model.set_distilled_training(True)
    model.train()
    x = torch.randn(4, *input_shape("leads", 12, 200))
    y, t = (torch.rand(4, 5) < 0.3).float(), torch.randn(4, 5) * 3
    cls, dist = model(x)  # a pair in distilled training
    heads = [model.head.weight, model.head_dist.weight]
    got = torch.autograd.grad(kd_loss((cls, dist), y, t, 0.4, 2.0), heads, retain_graph=True)
    labels_only = torch.autograd.grad(0.6 * F.binary_cross_entropy_with_logits(cls, y), model.head.weight,
                                      retain_graph=True)[0]
    teacher_only = torch.autograd.grad(0.4 * teacher_term(dist, t, 2.0), model.head_dist.weight, retain_graph=True)[0]
    torch.testing.assert_close(got[0], labels_only)
    torch.testing.assert_close(got[1], teacher_only)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    with torch.no_grad():  # eval mode: one output, the mean of the two heads (no dropout here)
        torch.testing.assert_close(model.eval()(x), (cls + dist) / 2, atol=1e-5, rtol=1e-5)


def test_a_distilled_student_records_its_teacher_and_is_named_kd(quick_resnet_run, sample_cache, tmp_path):
    art = tmp_path / "art"
    r = run_module("models.train", "--model", "vit", "--data", sample_cache, *QUICK, "--set",
                   f"teacher={quick_resnet_run}", env={"ARTIFACTS": str(art)}, check=True)
    run = art / "runs" / "vit-leads-quick-kd"
    cfg = json.loads((run / "config.json").read_text())
    sha = hashlib.sha256((quick_resnet_run / "best.safetensors").read_bytes()).hexdigest()
    assert cfg["teacher"] == str(quick_resnet_run)
    assert cfg["teacher_runs"] == [{"name": str(quick_resnet_run), "run": str(quick_resnet_run.resolve()),
                                    "sha256": sha}]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"] == str(quick_resnet_run) and metrics["teacher_cost"] > 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["teacher_seconds"] > 0 and log[0]["teacher_cost"] > 1 and "teacher cost" in r.stdout


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_missing_teacher_folder_or_a_teacher_that_fails_to_train_is_one_line(sample_cache, tmp_path, monkeypatch,
                                                                                 capsys):
    from models import train as train_mod

    calls = []

    def failing(cmd, env):
        calls.append((cmd, env))
        return train_mod.subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setenv("ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setattr(train_mod.subprocess, "run", failing)
    assert train_mod.main(["--model", "vit", "--data", str(sample_cache), *QUICK, "--set", "teacher=xresnet1d101",
                           "--set", "seed=3"]) == 2
    line = one_line_error(capsys)
    assert "teacher xresnet1d101: training its run" in line and "make train-xresnet1d101 PROFILE=quick SEED=3" in line
    (cmd, env), = calls  # the teacher's own run: the student's profile, config, seed and data, nothing else
    assert cmd[1:] == ["-m", "models.train", "--model", "xresnet1d101", "--profile", "quick", "--config", "default",
                       "--set", "seed=3", "--data", str(sample_cache), "--no-progress"]
    assert env[train_mod.STUDENTS_ENV] == "vit"
    assert train_mod.main(["--model", "vit", "--data", str(sample_cache), *QUICK,
                           "--set", f"teacher={tmp_path / 'nope'}"]) == 2
    assert "nope: no finished run" in one_line_error(capsys) and len(calls) == 1  # a folder is never trained
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would train it: asked for instead
    assert train_mod.main(["--model", "vit", "--data", str(sample_cache), *QUICK, "--set", "teacher=xresnet1d101"]) == 2
    assert "train it first: make train-xresnet1d101 PROFILE=quick" in one_line_error(capsys) and len(calls) == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(train_mod.STUDENTS_ENV, "xresnet1d101")  # vit trains here as xresnet1d101's teacher
    assert train_mod.main(["--model", "vit", "--data", str(sample_cache), *QUICK, "--set", "teacher=xresnet1d101"]) == 2
    assert "would learn from its own student (xresnet1d101 → vit → xresnet1d101)" in one_line_error(capsys)
    assert not (tmp_path / "art").exists()  # nothing written


def test_a_missing_teacher_model_is_trained_first_then_the_student_learns_from_it(sample_cache, tmp_path):
    art = tmp_path / "art"
    r = run_module("models.train", "--model", "convnext", "--data", sample_cache, *QUICK, "--set",
                   "teacher=resnet1d_wang", env={"ARTIFACTS": str(art)}, check=True)
    teacher = art / "runs" / "resnet1d_wang-signal-quick"
    tcfg = json.loads((teacher / "config.json").read_text())
    assert "training it first" in r.stdout and (teacher / "metrics.json").exists()
    assert tcfg["teacher"] is None and tcfg["seed"] == 0 and tcfg["data"] == str(sample_cache)
    assert tcfg["epochs"] == 2  # the teacher's own quick profile, not the student's --set epochs=1
    cfg = json.loads((art / "runs" / "convnext-strip-quick-kd" / "config.json").read_text())
    sha = hashlib.sha256((teacher / "best.safetensors").read_bytes()).hexdigest()
    assert cfg["teacher_runs"] == [{"name": "resnet1d_wang", "run": str(teacher.resolve()), "sha256": sha}]


def test_a_run_another_process_is_training_waits_for_it(quick_resnet_run, sample_cache, tmp_path):
    import fcntl
    import subprocess
    import sys

    from conftest import REPO

    run = tmp_path / quick_resnet_run.name
    shutil.copytree(quick_resnet_run, run)
    args = ["--model", "resnet1d_wang", "--profile", "quick", "--data", sample_cache, "--out", run, "--no-progress",
            "--set", "max_train_batches=3", "--set", "epochs=1", "--set", "eval_stride_seconds=7.5"]  # as trained
    with open(run / ".train.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "models.train", *map(str, args)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        first = proc.stdout.readline()
        assert "another process is training this run; waiting for it" in first and proc.poll() is None
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "already trained" in rest


def test_a_mismatched_or_self_teacher_is_one_line(quick_resnet_run, sample_cache, tmp_path, monkeypatch, capsys):
    from models.train import main

    monkeypatch.setenv("ARTIFACTS", str(tmp_path / "art"))
    student = ["--model", "convnext", "--data", str(sample_cache), *QUICK, "--set", f"teacher={quick_resnet_run}"]
    assert main([*student, "--set", "seed=1"]) == 2
    line = one_line_error(capsys)
    assert "does not match the student: seed 0 vs the student's 1" in line and "SEED=1" in line
    other = tmp_path / "other-data-teacher"
    shutil.copytree(quick_resnet_run, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "data": str(tmp_path / "another-cache")}))
    assert main([*student[:-1], f"teacher={quick_resnet_run},{other}"]) == 2  # an ensemble: each member checked
    assert "data cache" in one_line_error(capsys)
    for teacher in ("resnet1d_wang", str(quick_resnet_run)):  # by name and by folder
        assert main(["--model", "resnet1d_wang", "--data", str(sample_cache), *QUICK, "--set", f"teacher={teacher}"]) == 2
        assert "the student itself" in one_line_error(capsys)
    assert main([*student, "--set", "kd_mode=warm"]) == 2 and "kd_mode" in one_line_error(capsys)
    assert not (tmp_path / "art").exists()


def test_a_deit_student_feeds_both_heads_and_never_reads_the_test_fold(quick_resnet_run, sample_cache, tmp_path,
                                                                     monkeypatch):
    from models import train as train_mod
    from shared import config as config_mod
    from shared.cache import ECGCache

    opened, calls = [], []
    split_indices, student_loss = ECGCache.split_indices, train_mod.student_loss

    def guarded(self, split):
        opened.append(split)
        if split == "test":
            raise AssertionError("the test fold was opened while training with a teacher")
        return split_indices(self, split)

    def recording(cfg):
        loss_fn = student_loss(cfg)

        def wrapped(logits, targets):
            calls.append((logits, targets[1]))
            return loss_fn(logits, targets)
        return wrapped

    monkeypatch.setattr(ECGCache, "split_indices", guarded)
    monkeypatch.setattr(train_mod, "student_loss", recording)
    cfg = config_mod.resolve("deit", "quick", overrides={"teacher": str(quick_resnet_run), "epochs": 1,
                                                         "max_train_batches": 2, "eval_stride_seconds": 7.5})
    cfg["teacher_runs"] = train_mod.resolve_teachers(cfg, sample_cache)
    (tmp_path / "run").mkdir()
    result = train_mod.train(cfg, tmp_path / "run", sample_cache, resume=False, progress=False, evaluate_test=False)
    assert "test" not in opened and "test" not in result and 0 < result["val"]["macro_auc"] <= 1
    assert len(calls) == 2
    for logits, teacher in calls:  # (class head, distillation head) and the teacher's logits of the same crops
        assert isinstance(logits, tuple) and len(logits) == 2 and teacher is not None
        assert logits[0].shape == logits[1].shape == teacher.shape and not teacher.requires_grad


def test_make_hands_the_teacher_to_models_train_and_picks_the_matching_run_to_compress(tmp_path):
    from test_make import run_make

    rc, calls = run_make(tmp_path, "train-vit", "TEACHER=resnet1d_wang,xresnet1d101", "PROFILE=quick", "SEED=2",
                         "REPR=rows", "PTBXL_DIR=/data")
    trains = [c for c in calls if "models.train" in c]  # models.train trains a missing teacher itself
    assert rc == 0 and len(trains) == 1 and "--model vit" in trains[0]
    assert trains[0].endswith("--set seed=2 --set teacher=resnet1d_wang,xresnet1d101")
    rc, calls = run_make(tmp_path, "seeds-deit", "TEACHER=resnet1d_wang", "SEEDS=1 2", "NO_DATA=1")
    trains = [c for c in calls if "models.train" in c]  # the student's seed 0 too: train-all made the profile's
    assert rc == 0 and len(trains) == 3 and all("--model deit" in c and "teacher=resnet1d_wang" in c for c in trains)
    rc, calls = run_make(tmp_path, "seeds-all", "TEACHER=none", "SEEDS=1", "NO_DATA=1")
    trains = [c for c in calls if "models.train" in c]  # the four 2-D families' plain seeds 0 and 1
    assert rc == 0 and all(c.endswith("--set teacher=none --no-progress") for c in trains)
    assert sorted(c.split("--model ")[1].split()[0] for c in trains) == sorted(["vit", "deit", "effnetv2",
                                                                                   "convnext"] * 2)
    for teacher, flag in (("resnet1d_wang", "--kd"), ("none", "--no-kd")):
        rc, calls = run_make(tmp_path, "quantize-vit", f"TEACHER={teacher}")
        assert rc == 0 and calls[0].split()[-3] == flag
    rc, calls = run_make(tmp_path, "quantize-vit")  # no TEACHER: the run the profile names (compression decides)
    assert rc == 0 and "kd" not in calls[0]
    rc, calls = run_make(tmp_path, "all", "TEACHER=none", "PTBXL_DIR=/data")
    trains = [c for c in calls if "models.train" in c]
    assert rc == 0 and len(trains) == 6 and all("--set teacher=none" in c for c in trains)
    assert all("--no-kd" in c for c in calls if "compression." in c)


@pytest.mark.parametrize("goal, teacher, message", [
    ("train-vit", "resnet1d_wnag", "unknown model 'resnet1d_wnag'"),
    ("train-vit", "resnet1d_wang,vit", "cannot be its own teacher"),
    ("train-all", "resnet1d_wang", "TEACHER applies to train-<model>"),
])
def test_make_refuses_a_bad_teacher_before_any_work(tmp_path, goal, teacher, message):
    import subprocess

    from conftest import REPO

    r = subprocess.run(["make", "--no-print-directory", goal, f"TEACHER={teacher}", f"PYTHON={tmp_path}/none",
                        f"ARTIFACTS={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_tuning_with_a_teacher_adds_the_kd_keys_to_the_search(sample_cache, tmp_path, monkeypatch, capsys):
    from models import tune
    from shared import config as config_mod

    for model in ("vit", "deit", "effnetv2", "convnext"):
        assert {"kd_alpha", "kd_temperature"} <= set(config_mod.search_space(model, distill=True))
        assert "kd_alpha" not in config_mod.search_space(model)
    assert "search_distill" not in config_mod.resolve("vit", "quick")
    monkeypatch.setenv("ARTIFACTS", str(tmp_path / "art"))
    assert tune.main(["--model", "vit", "--profile", "quick", "--data", str(sample_cache), "--trials", "1",
                      "--set", "teacher=resnet1d_wang"]) == 0
    assert "teacher resnet1d_wang: no finished run" in capsys.readouterr().out  # so it was trained first
    trial = json.loads((tmp_path / "art" / "tune" / "vit" / "trials" / "0" / "config.json").read_text())
    assert {"kd_alpha", "kd_temperature"} <= set(trial) and trial["teacher_runs"][0]["name"] == "resnet1d_wang"


def test_summary_shows_each_distilled_run_against_its_plain_twin(tmp_path):
    from models import summarize
    from shared.metrics import macro_auc

    rng = np.random.default_rng(0)
    labels = (rng.random((120, 5)) < 0.3).astype(np.float32)
    noise = rng.random((120, 5)).astype(np.float32)

    def run(name, model, signal, teacher=None, seed=0):
        d = tmp_path / name
        d.mkdir()
        probs = signal * labels + (1 - signal) * noise
        np.savez(d / "predictions.npz", test_labels=labels, test_probs=probs)
        (d / "metrics.json").write_text(json.dumps({
            "model": model, "representation": "leads", "profile": "cpu", "config": "default", "seed": seed,
            "teacher": teacher, "val": {"macro_auc": 0.8 + signal / 10}, "test": {"macro_auc": macro_auc(labels, probs)},
            "params": 1, "train_seconds": 1, "epochs_run": 1, "best_epoch": 1}))

    run("vit-leads-cpu", "vit", 0.2)
    run("vit-leads-cpu-kd", "vit", 0.5, teacher="resnet1d_wang")
    run("vit-leads-cpu-kd-seed1", "vit", 0.5, teacher="resnet1d_wang", seed=1)  # no plain twin: not listed
    run("vit-leads-cpu-kdhard", "vit", 0.4, teacher="resnet1d_wang")  # another recipe: its own group and label
    (tmp_path / "vit-leads-cpu-kdhard" / "config.json").write_text(json.dumps({"kd_mode": "hard"}))
    rows = summarize.collect(tmp_path, "cpu")
    kd = summarize.distilled_vs_plain(rows, tmp_path, n_resamples=50)
    assert [(k["run"], k["plain"], k["teacher"]) for k in kd] == [
        ("vit-leads-cpu-kd", "vit-leads-cpu", "resnet1d_wang"),
        ("vit-leads-cpu-kdhard", "vit-leads-cpu", "resnet1d_wang, kd_mode=hard")]
    assert kd[0]["delta_val"] == pytest.approx(0.03) and kd[0]["paired"]["delta"] > 0
    assert [g["config"] for g in summarize.seed_spread(rows)] == ["default + kd(resnet1d_wang)"]
    md = summarize.markdown(rows, [], "cpu", kd=kd)
    assert "### Distilled (`-kd`) vs plain" in md and "| vit-leads-cpu-kd | resnet1d_wang | vit-leads-cpu |" in md


def test_report_pairs_each_distilled_fp32_model_with_its_plain_twin(tmp_path, monkeypatch):
    from eval.report import distilled_vs_plain

    monkeypatch.setenv("ARTIFACTS", str(tmp_path))
    rng = np.random.default_rng(1)
    labels = (rng.random((80, 5)) < 0.3).astype(np.float32)
    results = []
    for run, teacher, signal in (("vit-leads-cpu", None, 0.2), ("vit-leads-cpu-kd", "resnet1d_wang", 0.5),
                                 ("deit-leads-cpu-kd", "resnet1d_wang", 0.5)):  # deit: no plain twin
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "config.json").write_text(json.dumps({"seed": 0, "teacher": teacher}))
        (tmp_path / "eval" / f"{run}-fp32").mkdir(parents=True)
        np.savez(tmp_path / "eval" / f"{run}-fp32" / "predictions.npz", test_labels=labels,
                 test_probs=signal * labels + (1 - signal) * rng.random((80, 5)).astype(np.float32))
        results.append({"artifact": f"{run}-fp32", "run": run, "variant": "fp32", "model": run.split("-")[0],
                        "representation": "leads", "config": "default", "splits": {"test": {"macro_auc": 0.7}}})
    (pair,) = distilled_vs_plain(results, n_resamples=50)
    assert (pair["artifact"], pair["against"]) == ("vit-leads-cpu-kd-fp32", "vit-leads-cpu-fp32") and pair["delta"] > 0


def test_the_cpu_profile_distils_deit_and_convnext_and_teacher_none_turns_it_off(tmp_path, monkeypatch):
    from models.train import run_name
    from shared import config as config_mod
    from shared.runs import find_run

    trained = ("vit", "deit", "effnetv2", "convnext", "resnet1d_wang", "xresnet1d101")  # the models with a config
    defaults = {m: config_mod.resolve(m, "cpu")["teacher"] for m in trained}
    assert defaults == {m: "resnet1d_wang" if m in ("deit", "convnext") else None for m in trained}
    assert config_mod.resolve("deit", "cpu", overrides={"teacher": "none"})["teacher"] is None
    assert config_mod.resolve("deit", "quick")["teacher"] is None  # measured on cpu only
    assert run_name(config_mod.resolve("deit", "cpu")) == "deit-leads-cpu-kd"
    monkeypatch.setenv("ARTIFACTS", str(tmp_path))
    for name in ("deit-leads-cpu-kd", "deit-leads-cpu"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.safetensors").touch()
    assert find_run("deit", "cpu").name == "deit-leads-cpu-kd"
    assert find_run("deit", "cpu", distilled=False).name == "deit-leads-cpu"
    for kw, hint in (({}, "make train-convnext PROFILE=cpu` first"),
                     ({"distilled": False}, "make train-convnext PROFILE=cpu TEACHER=none` first"),
                     ({"distilled": True}, "convnext-strip-cpu-kd: no trained model")):
        with pytest.raises(FileNotFoundError, match=hint):
            find_run("convnext", "cpu", **kw)
    with pytest.raises(FileNotFoundError, match="make train-vit PROFILE=cpu TEACHER=<teacher>` first"):
        find_run("vit", "cpu", distilled=True)
