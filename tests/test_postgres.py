"""Optuna tuning against a real PostgreSQL server (Debian's `postgresql` package, started in a temporary folder):
two `make tune-<model>` workers share one study, a killed worker's study is finished by the next one, the
tuned config is the one `CONFIG=tuned` reads, and the password never reaches a log line, an error or
study.json. Tiny trials (1 s crops, 2 batches, 1 epoch, 1 thread) keep the file near a minute."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO
from models import tune
from shared import config as config_mod

MODEL = "resnet1d_wang"
BUDGET = ["threads=1", "max_train_batches=2", "max_train_records=64", "crop_seconds=1.0", "eval_stride_seconds=10",
          "epochs=1"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PASSWORD = "Tun3r:s3cret/pw"  # ':' and '/' must be %-encoded in the URL: the masking must catch both spellings
SECRETS = (PASSWORD, quote(PASSWORD, safe=""))
PACKAGE = "postgresql"
ADMIN = "postgres"


def server_binaries() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if (p.parent / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


class Server:
    def __init__(self, port: int, socket_dir: Path):
        self.port, self.socket_dir = port, socket_dir

    def admin(self):
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=ADMIN, dbname="postgres",
                               autocommit=True)

    def database(self, name: str, password: str = PASSWORD) -> str:
        """A fresh database owned by the `tuner` role; its URL over TCP, with the (%-encoded) password."""
        with self.admin() as db:
            db.execute(f'CREATE DATABASE "{name}" OWNER tuner')
        return f"postgresql://tuner:{quote(password, safe='')}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (free port) with a password-protected role `tuner`, stopped at the end.
    Run as the `postgres` system user when the tests run as root: the server refuses to run as root."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip(f"Debian package '{PACKAGE}' is not installed (no initdb/pg_ctl); .ci/run installs it")
    as_owner: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pg-"))  # short: a unix socket path must fit in ~100 bytes
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(ADMIN)
        except KeyError:
            pytest.skip(f"Debian package '{PACKAGE}' is incomplete: no '{ADMIN}' system user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", ADMIN, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = root / "data", root / "server.log"

    def run(*cmd, check=True):
        return subprocess.run([*as_owner, *map(str, cmd)], capture_output=True, text=True, timeout=120, check=check)

    run(binaries / "initdb", "-D", data, "-U", ADMIN, "--auth-local=trust", "--auth-host=scram-sha-256",
        "-E", "UTF8", "--no-sync")
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off")
    started = run(binaries / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start", check=False)
    try:
        assert started.returncode == 0, started.stdout + started.stderr + (log.read_text() if log.exists() else "")
        server = Server(port, root)
        with server.admin() as db:
            db.execute(f"CREATE ROLE tuner LOGIN PASSWORD '{PASSWORD}'")
        yield server
    finally:
        run(binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def masked(url: str) -> str:
    return url.replace(quote(PASSWORD, safe=""), "***")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"the password leaked: {text[-2000:]}"


def load(url: str):
    return optuna.load_study(study_name=MODEL, storage=optuna.storages.RDBStorage(url))


def artifacts(tmp_path: Path, name: str, cache: Path) -> Path:
    """One machine's ARTIFACTS: its own folder, the data cache in its default place."""
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "ptbxl-100hz").symlink_to(cache, target_is_directory=True)
    return root


def make_tune(tmp_path: Path, art: Path, url: str, trials: int) -> list[str]:
    """`OPTUNA_STORAGE=<url> make tune-<model>`, as on each machine, with this test's python and no venv check."""
    stamp = tmp_path / "venv-stamp"
    stamp.touch()  # newer than requirements.txt: make does not try to install anything
    return ["make", "--no-print-directory", f"tune-{MODEL}", "NO_DATA=1", f"PYTHON={sys.executable}",
            f"VENV_STAMP={stamp}", f"ARTIFACTS={art}", "PROFILE=quick", f"TRIALS={trials}", "TIMEOUT=0",
            f"SET={' '.join(BUDGET)}"]


def storage_env(url: str) -> dict:
    return {**os.environ, "OPTUNA_STORAGE": url}


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_two_make_workers_share_one_study_and_write_the_config_train_reads(postgres, sample_cache, tmp_path,
                                                                         monkeypatch):
    url = postgres.database("two_workers")
    machines = [artifacts(tmp_path, f"machine{i}", sample_cache) for i in range(2)]
    procs = [subprocess.Popen(make_tune(tmp_path, art, url, 4), cwd=REPO, env=storage_env(url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for art in machines]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert_no_secret(out, err)
        assert f"in {masked(url)}," in out  # the start line names the server, password masked
    ran = [{int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("trial ")}
           for out, _ in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both workers ran trials, never the same one

    study = load(url)
    trials = study.trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3] == sorted(ran[0] | ran[1])  # exactly --trials, no duplicate numbers
    assert all(t.state in FINISHED for t in trials)

    # the last word on the study: the same command again runs nothing and rewrites the outputs from it
    r = subprocess.run(make_tune(tmp_path, machines[0], url, 4), cwd=REPO, env=storage_env(url),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing to run" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert_no_secret(r.stdout, r.stderr)
    d = machines[0] / "tune" / MODEL
    report_text = (d / "study.json").read_text()
    assert_no_secret(report_text, (d / "best_config.toml").read_text())
    report = json.loads(report_text)
    assert report["storage"] == masked(url) and report["finished_trials"] == 4
    assert sorted(t["number"] for t in report["trials"]) == [0, 1, 2, 3]

    best = study.best_trial
    monkeypatch.setenv("ARTIFACTS", str(machines[0]))
    tuned_file = config_mod.tuned_path(MODEL)
    assert tuned_file == d / "best_config.toml"
    assert "PROVISIONAL" not in tuned_file.read_text()
    tuned = tomllib.loads(tuned_file.read_text())
    assert tuned == {"representation": "signal", **best.params} and report["best"]["number"] == best.number
    cfg = config_mod.resolve(MODEL, "quick", config="tuned")  # what `make train-<model> CONFIG=tuned` trains
    assert cfg["config"] == "tuned" and all(cfg[k] == v for k, v in tuned.items())


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_worker_killed_mid_trial_leaves_a_study_the_next_worker_completes(postgres, sample_cache, tmp_path):
    url = postgres.database("killed")
    art = artifacts(tmp_path, "machine", sample_cache)
    cmd = [sys.executable, "-m", "models.tune", "--model", MODEL, "--profile", "quick", "--trials", "2",
           "--heartbeat", "1", *[a for kv in BUDGET for a in ("--set", kv)], "--set", "epochs=3"]
    env = {**storage_env(url), "ARTIFACTS": str(art)}
    storage = optuna.storages.RDBStorage(url)  # creates the tables now: polling must not race the worker for it
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            trials = optuna.load_study(study_name=MODEL, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the study is not created yet
            trials = []
        # kill once a trial is finished and the next has trained 1 of its 3 epochs: mid-trial, heartbeat running
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if any(t.state in FINISHED for t in trials) and running:
            proc.send_signal(signal.SIGKILL)
            killed_at = running[0].number
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the worker finished (or failed) before it could be killed mid-trial"

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1/2 trials finished" in r.stdout  # it resumed the study ...
    assert_no_secret(r.stdout, r.stderr)
    trials = load(url).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state in FINISHED]) == 2  # ... and completed exactly --trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed_at]
    retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retry = [t for t in trials if retried_from(t) == killed_at]
    assert len(retry) == 1 and retry[0].state in FINISHED and retry[0].params == failed[0].params


def test_a_wrong_password_is_one_masked_line(postgres, sample_cache, capsys):
    url = postgres.database("wrong_password").replace(quote(PASSWORD, safe=""), quote("Wr0ng:pw/x", safe=""))
    args = ["--model", MODEL, "--trials", "1", "--data", str(sample_cache), "--storage", url, "--profile", "quick"]
    assert tune.main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: cannot open storage postgresql://tuner:***@127.0.0.1:") and "\n" not in err, err
    assert "password authentication failed" in err
    for secret in ("Wr0ng:pw/x", quote("Wr0ng:pw/x", safe="")):
        assert secret not in captured.out + captured.err
