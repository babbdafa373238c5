"""Optuna tuning on the real sample: a study completes and feeds `CONFIG=tuned`, never opens the test fold,
prunes through train()'s per-epoch callback, resumes after SIGKILL to exactly --trials, and lets two
workers share one SQLite study. Budgets are tiny (1 s crops, 2 batches, 1 thread) to keep this file short."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import REPO
from models import tune
from shared import config as config_mod

MODEL = "resnet1d_wang"
BUDGET = ["--profile", "quick", "--set", "threads=1", "--set", "max_train_batches=2", "--set", "max_train_records=64",
          "--set", "crop_seconds=1.0", "--set", "eval_stride_seconds=10", "--set", "epochs=1"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Artifacts in tmp_path, no shared storage from the environment, torch threads restored afterwards."""
    monkeypatch.setenv("ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tune_args(cache, trials, *extra):
    return ["--model", MODEL, "--trials", str(trials), "--data", str(cache), *BUDGET, *extra]


def load(tmp_path):
    db = tmp_path / "art" / "tune" / MODEL / "study.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 30}})
    return optuna.load_study(study_name=MODEL, storage=storage)


def test_study_completes_writes_tuned_config_and_never_reads_test(sample_cache, tmp_path, monkeypatch, capsys):
    from shared.cache import ECGCache

    opened = []
    split_indices = ECGCache.split_indices

    def guarded(self, split):
        opened.append(split)
        if split == "test":
            raise AssertionError("the test fold was opened during tuning")
        return split_indices(self, split)

    with monkeypatch.context() as m:
        m.setattr(ECGCache, "split_indices", guarded)
        assert tune.main(tune_args(sample_cache, 3)) == 0
    assert {"train", "val"} <= set(opened) and "test" not in opened
    out = capsys.readouterr().out
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 3  # one line per finished trial
    assert "epoch" not in out.replace("pruned at epoch", "")  # quiet trials: no per-epoch lines, no tqdm

    d = tmp_path / "art" / "tune" / MODEL
    report = json.loads((d / "study.json").read_text())
    trials = report["trials"]
    assert report["finished_trials"] == 3 and [t["number"] for t in trials] == [0, 1, 2]
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    assert report["storage"] == f"sqlite:///{d / 'study.db'}"
    for t in trials:  # every trial ran in its own folder and saw validation only
        run = Path(t["run"])
        assert run == d / "trials" / str(t["number"]) and (run / "config.json").exists()
        assert t["val_macro_auc_per_epoch"] and set(t["params"]) == {"lr", "weight_decay", "batch_size"}
        if t["state"] == "COMPLETE":
            metrics = json.loads((run / "metrics.json").read_text())
            assert "test" not in metrics and 0 < metrics["val"]["macro_auc"] == pytest.approx(t["value"])
            assert set(np.load(run / "predictions.npz").files) == {"val_probs", "val_labels"}

    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert report["best"]["number"] == best["number"]
    tuned = tomllib.loads(config_mod.tuned_path(MODEL).read_text())
    assert tuned == {"representation": "signal", **best["params"]}  # tuned keys + representation, nothing else
    cfg = config_mod.resolve(MODEL, "quick", config="tuned")
    assert cfg["config"] == "tuned" and "search" not in cfg
    assert all(cfg[k] == v for k, v in tuned.items())

    from models import train as train_mod

    rc = train_mod.main(["--model", MODEL, "--profile", "quick", "--config", "tuned", "--data", str(sample_cache),
                         "--no-progress", "--set", "threads=1", "--set", "max_train_batches=2", "--set", "epochs=1",
                         "--set", "crop_seconds=1.0", "--set", "eval_stride_seconds=10", "--set", "epochs=1"])
    assert rc == 0
    run = tmp_path / "art" / "runs" / f"{MODEL}-signal-quick-tuned"
    used = json.loads((run / "config.json").read_text())
    assert used["lr"] == tuned["lr"] and used["batch_size"] == tuned["batch_size"]
    assert "test" in json.loads((run / "metrics.json").read_text())  # plain training still reports test


def test_pruner_stops_a_trial_through_the_epoch_callback(sample_cache, tmp_path, monkeypatch, capsys):
    # every val AUC is below 1.1, so the first per-epoch report must prune the trial and stop training
    monkeypatch.setattr(tune, "make_pruner", lambda: optuna.pruners.ThresholdPruner(lower=1.1))
    assert tune.main(tune_args(sample_cache, 1, "--set", "epochs=3")) == 1  # no complete trial
    assert "trial 0: pruned at epoch 1" in capsys.readouterr().out
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED]
    assert list(study.trials[0].intermediate_values) == [1]
    run = tmp_path / "art" / "tune" / MODEL / "trials" / "0"
    assert len((run / "log.jsonl").read_text().splitlines()) == 1 and not (run / "metrics.json").exists()
    assert not config_mod.tuned_path(MODEL).exists()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_killed_study_resumes_to_exactly_the_requested_trials(sample_cache, tmp_path):
    cmd = [sys.executable, "-m", "models.tune", *tune_args(sample_cache, 2, "--heartbeat", "1")]
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    first = tmp_path / "art" / "tune" / MODEL / "trials" / "0" / "metrics.json"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_before, deadline = 0, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if first.exists():  # trial 0 trained; wait until the study has recorded it as finished
            n_before = len(load(tmp_path).get_trials(states=FINISHED))
            if n_before:
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n_before == 1, "the study finished before it could be killed"

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1/2 trials finished" in r.stdout  # it resumed the study, not a new one
    trials = load(tmp_path).trials
    assert len([t for t in trials if t.state in FINISHED]) == 2
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) <= 1  # the trial running at the kill, if one was
    retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    for f in failed:  # ... was re-queued with the parameters it had drawn (killed mid-draw: the rest are new)
        retry = [t for t in trials if retried_from(t) == f.number]
        assert len(retry) == 1 and f.params.items() <= retry[0].params.items()
    assert json.loads((tmp_path / "art" / "tune" / MODEL / "study.json").read_text())["finished_trials"] == 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(sample_cache, tmp_path, capsys):
    # a worker killed between creating a trial and its first heartbeat leaves it RUNNING with no heartbeat,
    # which optuna's own stale check never fails (it made a CI run's resumed study stop at 1 of 2 trials)
    db = tmp_path / "art" / "tune" / MODEL / "study.db"
    db.parent.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.create_study(storage=storage, study_name=MODEL, direction="maximize")
    orphan = storage.create_new_trial(study._study_id)
    assert storage.get_trial(orphan).state == TrialState.RUNNING
    assert tune.main(tune_args(sample_cache, 1, "--heartbeat", "1")) == 0
    assert "1/1 finished" in capsys.readouterr().out
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0


def test_two_workers_share_one_sqlite_study(sample_cache, tmp_path):
    cmd = [sys.executable, "-m", "models.tune", *tune_args(sample_cache, 4)]
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "locked" not in err, out[-2000:] + err[-2000:]
    ran = [{int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("trial ")}
           for out, _ in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both workers ran trials, never the same one
    trials = load(tmp_path).trials
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert len([t for t in trials if t.state in FINISHED]) == 4 == len(trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] == sorted(ran[0] | ran[1])


def test_bad_input_is_one_line(sample_cache, tmp_path, monkeypatch, capsys):
    def error(*args):
        assert tune.main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "unknown model 'alexnet'" in error("--model", "alexnet", "--data", str(sample_cache))
    assert "not a database URL" in error(*tune_args(sample_cache, 1, "--storage", "not a url"))
    assert "cannot open storage" in error(*tune_args(sample_cache, 1, "--storage", "nosuchdb://host/db"))
    for url in ("postgresql://me:s3cret@127.0.0.1:1/db", "postgresql://me@127.0.0.1:1/db?password=s3cret",
                "postgresql//me:s3cret@127.0.0.1:1/db"):  # the last one does not parse: masked all the same
        err = error(*tune_args(sample_cache, 1, "--storage", url))
        assert "s3cret" not in err and "***" in err, err  # the password never reaches the log
    assert "cannot open storage postgresql://me:***@127.0.0.1:1/db: OperationalError" in error(
        *tune_args(sample_cache, 1, "--storage", "postgresql://me:s3cret@127.0.0.1:1/db"))
    assert "no complete data cache" in error(*tune_args(tmp_path / "nothing", 1))
    monkeypatch.setattr(config_mod, "search_space", lambda model, **kw: {"lrr": [1e-3]})
    assert "'lrr' is not a key" in error(*tune_args(sample_cache, 1))
    with pytest.raises(SystemExit) as e:
        tune.main(["--help"])
    assert e.value.code == 0 and "OPTUNA_STORAGE" in capsys.readouterr().out


def test_storage_passwords_are_masked_in_urls_and_driver_messages():
    assert tune.redact("postgresql://tuner:p%40ss%2Fw@db.example:5432/optuna") == \
        "postgresql://tuner:***@db.example:5432/optuna"
    assert tune.redact("postgresql://tuner@db/optuna?sslmode=require&password=pw1") == \
        "postgresql://tuner@db/optuna?password=***&sslmode=require"
    assert tune.redact(f"sqlite:///{REPO}/study.db") == f"sqlite:///{REPO}/study.db"
    url = "postgresql://tuner:p%40ss%2Fw@db/optuna"
    assert tune.scrub(f"failed for {url} (password p@ss/w, sent as p%40ss%2Fw)", url) == \
        "failed for postgresql://tuner:***@db/optuna (password ***, sent as ***)"


def test_best_config_written_while_other_workers_run_says_it_is_provisional(tmp_path):
    from types import SimpleNamespace

    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="maximize", study_name=MODEL)
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, value=0.8,
                                              distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}))
    other_worker = study._storage.create_new_trial(study._study_id)

    def written():
        tune.write_outputs(study, MODEL, "quick", SimpleNamespace(trials=2), {}, {}, "sqlite:///x.db", 1.0, "signal")
        text = config_mod.tuned_path(MODEL).read_text()
        assert tomllib.loads(text) == {"representation": "signal", "lr": 1e-3}
        return text

    assert "PROVISIONAL: 1 trial(s) were still running" in written()
    study._storage.set_trial_state_values(other_worker, TrialState.FAIL)
    assert "PROVISIONAL" not in written()
