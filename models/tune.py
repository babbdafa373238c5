"""Tune a model's hyper-parameters with Optuna: `python -m models.tune --model vit --profile cpu --trials 20`.

Each trial trains one config (models.train.train) on the train folds and is scored by validation (fold 9)
macro AUC, reported every epoch so the pruner can stop a poor trial early. The test fold is never opened
(train(..., evaluate_test=False)): tuning on it would leak into every number reported later. The search
space is the [search] table of models/configs/<model>.toml; `--set KEY=VALUE` fixes a key for every trial
(and takes it out of the search). `--set teacher=resnet1d_wang` tunes a distilled student (models/train.py):
every trial learns from that finished teacher run, and the config's [search_distill] keys (kd_alpha,
kd_temperature) join the search.

The study lives in a database, so it survives kills and can be shared:
  default    sqlite:///artifacts/tune/<model>/study.db — rerun the same command to resume; a trial that was
             RUNNING when the process died is failed after its heartbeat goes stale and re-queued once with
             the same parameters.
  shared     OPTUNA_STORAGE=postgresql://user:pass@host:5432/db (or --storage): N workers on N machines, each
             running the same command, draw trials from one study (driver: psycopg 3, in requirements.txt).
             The password is masked (user:***@host) wherever the URL is printed or saved.
--trials is the study's total of finished (complete + pruned) trials, not this run's: a resumed run or a
second worker does not overshoot. --timeout stops starting new trials after that many seconds.

Writes artifacts/tune/<model>/:
  study.db                the study (default storage); study.db.lock lets local workers start trials in turn
  trials/<n>/             trial n's training run (config.json, log.jsonl, best.safetensors, metrics.json)
  best_config.toml        the best trial's tuned keys + representation: `make train-<model> CONFIG=tuned`
  study.json              every trial (state, value, params, per-epoch AUC, seconds), the best, the storage
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from shared import config as config_mod
from shared.io import library_versions, write_json_atomic, write_text_atomic
from shared.nets import MODELS
from shared.paths import data_cache_dir, tune_dir
from shared.progress import log

# --- knobs ------------------------------------------------------------------------------------------------
SAMPLER_SEED = 0          # trial n samples with a seed made of (SAMPLER_SEED, n): reproducible, and a resumed
                          # run or a second worker never repeats another's draws (one seed per process would)
TPE_STARTUP_TRIALS = 8    # random trials before TPE starts modelling the space
PRUNE_STARTUP_TRIALS = 4  # MedianPruner: no pruning until this many trials have finished ...
PRUNE_WARMUP_EPOCHS = 2   # ... nor in a trial's first epochs (val AUC during lr warm-up says little)
HEARTBEAT_S = 60          # a RUNNING trial silent for 2 × this is stale (its process died): failed, re-queued
MAX_RETRY = 1             # re-queue a stale trial once; a config that kills its process twice is dropped
SQLITE_TIMEOUT_S = 60     # wait this long for SQLite's write lock (several local workers on one study.db)
LOCK_WAIT_S = 300         # a worker waits this long for the study lock, then starts its trial without it
# ----------------------------------------------------------------------------------------------------------


class TuneError(Exception):
    """Bad input or environment: main() prints it as one line and exits 2."""


def default_storage(model: str) -> str:
    return f"sqlite:///{tune_dir(model) / 'study.db'}"


PASSWORD_QUERY = re.compile(r"((?:^|[?&])password=)[^&]*", re.IGNORECASE)  # libpq also takes ?password=...


def redact(url: str) -> str:
    """The storage URL without its password: it goes into logs, error messages and study.json."""
    from sqlalchemy.engine import make_url

    try:
        return PASSWORD_QUERY.sub(r"\1***", make_url(url).render_as_string(hide_password=True))
    except Exception:  # not parseable: mask what looks like user:password@ and ?password=
        return PASSWORD_QUERY.sub(r"\1***", re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url))


def scrub(text: str, url: str) -> str:
    """`text` (a driver's error message) with the URL's password replaced by ***, in whatever form it appears."""
    from urllib.parse import quote, unquote

    from sqlalchemy.engine import make_url

    secrets = set()
    try:
        parsed = make_url(url)
        secrets.add(parsed.password)
        secrets.update(v for k, v in parsed.query.items() if k.lower() == "password" and isinstance(v, str))
    except Exception:
        secrets.update(m[1] for m in re.finditer(r"//[^:/@]*:([^@/]*)@", url))
        secrets.update(m[2] for m in PASSWORD_QUERY.finditer(url))
    text = text.replace(url, redact(url))
    for secret in sorted({s for s in secrets if s} | {quote(s, safe="") for s in secrets if s}
                         | {unquote(s) for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def open_storage(url: str, heartbeat: int):
    """RDBStorage with heartbeats (stale RUNNING trials are failed and re-queued) and a SQLite lock timeout."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TuneError(f"storage {redact(url)!r} is not a database URL "
                        "(e.g. sqlite:////abs/path/study.db or postgresql://user:pass@host/db)") from None
    kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    retry_stale = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                  heartbeat_stale_trial_callback=retry_stale)
            except (IntegrityError, OperationalError, ProgrammingError) as e:
                # workers started together race to create the tables of a new database; the loser retries
                # (PostgreSQL: a unique violation in pg_type, or "relation ... already exists")
                race = isinstance(e, IntegrityError) or "already exists" in str(e) or "locked" in str(e)
                if not race or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ModuleNotFoundError as e:
        raise TuneError(f"storage {redact(url)}: the database driver is not installed ({e}); for PostgreSQL: "
                        ".venv/bin/python -m pip install -r requirements.txt (psycopg[binary])") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TuneError(f"cannot open storage {redact(url)}: {type(e).__name__}: {scrub(first, url)}") from None


def check_space(model: str, space: dict, base: dict) -> None:
    """Every [search] entry is `[choices]` or `{low, high[, log]}` over a key the config has (typos fail here)."""
    where = f"{config_mod.config_path(model)} [search]"
    for key, spec in space.items():
        if key not in base:
            raise TuneError(f"{where}: {key!r} is not a key of the {model} config")
        if isinstance(spec, list):
            if not spec or not all(isinstance(v, (str, int, float, bool)) for v in spec):
                raise TuneError(f"{where}: {key} must list at least one string/number/bool choice")
        elif isinstance(spec, dict):
            low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
            extra = set(spec) - {"low", "high", "log"}
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if extra or not numbers or not low < high or not isinstance(log, bool) or (log and low <= 0):
                raise TuneError(f"{where}: {key} must be {{ low = a, high = b[, log = true] }} with a < b "
                                f"(a > 0 for log)")
        else:
            raise TuneError(f"{where}: {key} must be a list of choices or {{ low = a, high = b }}")


def suggest(trial, space: dict, rep_keys: dict) -> dict:
    """Draw one config. `representation` first; keys its [representations.<r>] table sets are not drawn
    (seed fixes crop_seconds = 10: a drawn crop would change what the representation is)."""
    params = {}
    if "representation" in space:
        params["representation"] = trial.suggest_categorical("representation", space["representation"])
    fixed_by_rep = set(rep_keys.get(params.get("representation"), {}))
    for key, spec in space.items():
        if key == "representation" or key in fixed_by_rep:
            continue
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif all(isinstance(v, int) for v in (spec["low"], spec["high"])):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def make_sampler(seed: int):
    """TPE, reseeded per trial from (seed, trial number), so draws depend on the trial, not on the process."""
    import numpy as np
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number, self._tpe = None, None

        def _for(self, trial):
            if trial.number != self._number:
                self._number = trial.number
                # SeedSequence mixes (seed, n): RandomState(0) and RandomState(3) start almost alike
                mixed = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
                self._tpe = optuna.samplers.TPESampler(
                    seed=mixed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True, group=True,
                    constant_liar=True)
            return self._tpe

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._for(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):
            pass  # seeds are per trial already

    return TrialSeededTPE()


def make_pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} cannot be written to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    raise ValueError(f"{v!r}: only strings, numbers and booleans go into best_config.toml")


def write_toml(path: Path, values: dict, header: list[str]) -> None:
    """Flat key = value TOML, written atomically and read back to check it says exactly `values`."""
    lines = [f"# {h}" for h in header]
    for k, v in values.items():
        key = k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)
        lines.append(f"{key} = {toml_value(v)}")
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != values:
        raise RuntimeError(f"{path}: TOML round trip changed the values")
    write_text_atomic(path, text)


def trial_record(t) -> dict:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "val_macro_auc_per_epoch": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "seconds": round(seconds, 1) if seconds is not None else None,
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "run": t.user_attrs.get("run"), "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t)}


def fail_trials_without_heartbeat(study, storage, grace: float, silent_since: dict[int, float]) -> None:
    """Fail (and re-queue, like a stale trial) each RUNNING trial that never recorded a heartbeat.

    Optuna only fails RUNNING trials whose heartbeat went stale; a worker killed between creating a trial
    and its first heartbeat (a few ms, right after the previous trial finished) leaves a trial with no
    heartbeat, RUNNING forever, and a study that counts it as running elsewhere never finishes. A live
    worker records the first heartbeat within ms of creating the trial, so one this process has seen without
    a heartbeat for `grace` seconds is dead. Timed on this process's clock (`silent_since`, kept by the
    caller): datetime_start is the creating worker's local time, off by the clock skew or time zone of
    another machine sharing the study.
    """
    import optuna
    import sqlalchemy
    from optuna.trial import TrialState

    running = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    beating = set()
    if running:
        with storage.engine.connect() as db:  # optuna's schema: trial_heartbeats(trial_id, heartbeat)
            ids = ", ".join(str(int(i)) for i in running)
            beating = {r[0] for r in db.execute(sqlalchemy.text(
                f"SELECT trial_id FROM trial_heartbeats WHERE trial_id IN ({ids})"))}
    silent = running - beating
    now = time.monotonic()
    for trial_id in set(silent_since) - silent:
        del silent_since[trial_id]
    for trial_id in silent:
        silent_since.setdefault(trial_id, now)
    dead = {i for i in silent if now - silent_since[i] >= grace}
    if not dead:
        return
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in sorted(dead):
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        if retry is not None:
            retry(study, storage.get_trial(trial_id))


class StudyLock:
    """Makes "count the study's trials, then start one" atomic across the workers of one study.

    Without it two workers that finish trials at the same moment both count fewer than --trials and both start
    one, and the study ends a trial over. PostgreSQL: an advisory lock held by one connection (dropped when a
    worker dies); SQLite: flock on <study.db>.lock (one machine). Other databases: no lock. Held from the count
    until the next trial exists (the objective's first line), so the next count sees it as running."""

    def __init__(self, storage, url: str, study_name: str):
        import hashlib

        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        self.backend = parsed.get_backend_name()
        self.held = False
        self._conn = self._file = None
        key = int.from_bytes(hashlib.sha256(f"models.tune:{study_name}".encode()).digest()[:8], "big", signed=True)
        self._key = key
        if self.backend == "postgresql":
            self._conn = storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        elif self.backend == "sqlite" and parsed.database and parsed.database != ":memory:":
            self._file = open(f"{parsed.database}.lock", "a")

    def _try(self) -> bool:
        if self._conn is not None:
            import sqlalchemy

            return bool(self._conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key})
                        .scalar())
        if self._file is not None:
            import fcntl

            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        return True

    def acquire(self) -> None:
        if self.held:
            return
        deadline = time.time() + LOCK_WAIT_S
        while not self._try():
            if time.time() > deadline:  # a holder on a machine that vanished: go on, at worst a trial over
                log(f"the study lock was not free for {LOCK_WAIT_S} s; going on without it")
                return
            time.sleep(0.05)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conn is not None:
            import sqlalchemy

            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        elif self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
        if self._file is not None:
            self._file.close()


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def write_outputs(study, model: str, profile: str, args, space: dict, fixed: dict, storage: str,
                  wall: float, rep_default: str) -> dict | None:
    """study.json always; best_config.toml once a trial has completed. Returns the best trial's record."""
    from optuna.trial import TrialState

    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    best_rec = None
    d = tune_dir(model)
    if best is not None:
        values = {"representation": best.params.get("representation", fixed.get("representation", rep_default)),
                  **{k: v for k, v in best.params.items() if k != "representation"}}
        busy = running(study)
        provisional = [f"PROVISIONAL: {busy} trial(s) were still running in other workers; the last worker to stop "
                       "rewrites this file with the study's final best"] if busy else []
        write_toml(config_mod.tuned_path(model), values, [
            f"best of Optuna study {study.study_name!r} (profile {profile}): trial {best.number}, "
            f"validation macro AUC {best.value:.4f}", *provisional,
            f"written by models/tune.py {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
            f"use it: make train-{model} CONFIG=tuned"])
        best_rec = {**trial_record(best), "config": values}
    starts = [t["start"] for t in trials if t["start"]]
    ends = [t["complete"] for t in trials if t["complete"]]
    write_json_atomic(d / "study.json", {
        "model": model, "profile": profile, "study": study.study_name, "storage": redact(storage),
        "metric": "validation macro AUC (maximize); the test fold is never read",
        "requested_trials": args.trials, "finished_trials": finished(study),
        "states": {s.name: sum(t["state"] == s.name for t in trials) for s in TrialState
                   if any(t["state"] == s.name for t in trials)},
        "search_space": space, "fixed": fixed,
        "sampler": {"name": "TPE", "seed": SAMPLER_SEED, "startup_trials": TPE_STARTUP_TRIALS},
        "pruner": {"name": "MedianPruner", "startup_trials": PRUNE_STARTUP_TRIALS,
                   "warmup_epochs": PRUNE_WARMUP_EPOCHS},
        "best": best_rec, "best_config": str(config_mod.tuned_path(model)) if best else None,
        "wall_seconds_this_run": round(wall, 1),
        "trial_seconds_total": round(sum(t["seconds"] or 0 for t in trials), 1),
        "study_span": [min(starts), max(ends)] if starts and ends else None,
        "trials": trials, "versions": library_versions(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return best_rec


def teacher_runs(base: dict, data_dir: Path) -> list[dict]:
    """The checked teacher runs of `--set teacher=…` ([] without one); every trial learns from the same ones."""
    if not base.get("teacher"):
        return []
    from models.train import resolve_teachers

    try:
        return resolve_teachers(base, data_dir)
    except ValueError as e:
        raise TuneError(str(e)) from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m models.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"),
                    help="training budget of each trial: quick | cpu | full (default: env PROFILE or cpu)")
    ap.add_argument("--trials", type=int, default=20,
                    help="finished (complete + pruned) trials the study should have in total (default 20)")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="start no new trial after this many seconds of this run; 0 = no limit (default 3600)")
    ap.add_argument("--storage", default=os.environ.get("OPTUNA_STORAGE") or None,
                    help="database URL (env OPTUNA_STORAGE; default sqlite:///artifacts/tune/<model>/study.db)")
    ap.add_argument("--study", default=None, help="study name (default: the model name)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a config key for every trial (removes it from the search)")
    ap.add_argument("--data", type=Path, default=None, help="cache folder (default artifacts/data/ptbxl-<fs>hz)")
    ap.add_argument("--heartbeat", type=int, default=HEARTBEAT_S,
                    help=f"seconds between a trial's heartbeats; silent for 2x this = stale (default {HEARTBEAT_S})")
    return ap.parse_args(argv)


@dataclass
class Search:
    """What every trial of the study shares: the keys --set fixes, the config they resolve to, the space to
    draw from, the keys each representation fixes, the cache and the teacher runs."""
    fixed: dict
    base: dict
    space: dict
    rep_keys: dict
    data_dir: Path
    teachers: list[dict]


def run(args) -> int:
    """Check the arguments, open (or rejoin) the study, run trials until it has --trials, write its outputs."""
    check_args(args)
    search = prepare_search(args)
    study, storage, storage_url = open_study(args, search.fixed)
    lock = StudyLock(storage, storage_url, study_name(args))
    callbacks = TrialCallbacks(args.trials, args.heartbeat, storage, lock)
    objective = make_objective(args, search, lock)
    t0 = time.time()
    wait_for_stale_trials(study, args, storage_url, callbacks.fail_stale)
    interrupted = optimize(study, args, objective, lock, callbacks)
    callbacks.fail_stale(study, None)
    return summarize(study, args, search, storage_url, time.time() - t0, interrupted)


def study_name(args) -> str:
    return args.study or args.model


def check_args(args) -> None:
    """Refuse a bad model, profile or count before anything is opened."""
    if args.model not in MODELS:
        raise TuneError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    if args.profile not in config_mod.PROFILES:
        raise TuneError(f"unknown profile {args.profile!r}; choose from {', '.join(config_mod.PROFILES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TuneError("run the tuner as a plain process, not under torchrun: for parallel trials start several "
                        "workers on one --storage")
    if args.trials < 1 or args.timeout < 0 or args.heartbeat < 1:
        raise TuneError("--trials and --heartbeat must be >= 1 and --timeout >= 0")


def prepare_search(args) -> Search:
    """The config every trial starts from and the space left to search, checked against each other; the cache
    and the teacher runs, checked once here rather than failing in every trial."""
    try:
        fixed = config_mod.parse_overrides(args.set)
        base = config_mod.resolve(args.model, args.profile, fixed.get("representation"), "default", fixed)
        space = config_mod.search_space(args.model, distill=bool(base.get("teacher")))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TuneError(str(e)) from None
    if base.get("teacher"):  # the kd keys have code defaults, not config entries
        from shared.distill import KD_ALPHA, KD_TEMPERATURE

        base.setdefault("kd_alpha", KD_ALPHA)
        base.setdefault("kd_temperature", KD_TEMPERATURE)
    check_space(args.model, space, base)
    space = {k: v for k, v in space.items() if k not in fixed}
    if not space:
        raise TuneError("every [search] key is fixed by --set: nothing to tune")
    rep_keys = tomllib.loads(config_mod.config_path(args.model).read_text()).get("representations", {})
    data_dir = args.data or data_cache_dir(base["sampling_rate"])

    from shared.cache import CacheError, open_cache

    try:
        open_cache(data_dir)
    except CacheError as e:
        raise TuneError(str(e)) from None
    return Search(fixed, base, space, rep_keys, data_dir, teacher_runs(base, data_dir))


def open_study(args, fixed: dict):
    """(study, storage, storage URL): the named study, created or loaded. Rejoining a study started with another
    profile or other --set keys is refused: its trials would not be comparable."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from TrialCallbacks.report
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage_url = args.storage or default_storage(args.model)
    storage = open_storage(storage_url, args.heartbeat)
    name = study_name(args)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                    sampler=make_sampler(SAMPLER_SEED), pruner=make_pruner())
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TuneError(f"cannot create study {name!r} in {redact(storage_url)}: {type(e).__name__}: "
                        f"{scrub(first, storage_url)}") from None
    attrs = {"model": args.model, "profile": args.profile, "fixed": fixed}
    seen = {k: study.user_attrs.get(k) for k in attrs}
    if seen["profile"] is None:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    elif seen != attrs:
        raise TuneError(f"study {name!r} in {redact(storage_url)} was started with {seen}, not {attrs}; "
                        "use the same --profile/--set, or --study NAME for a new study")
    return study, storage, storage_url


def make_objective(args, search: Search, lock: StudyLock):
    """Optuna's objective: draw a config, train it into trials/<n> on the train folds (the test fold is never
    opened) and return its best val macro AUC; each epoch's val AUC goes to the pruner."""
    import optuna

    from models.train import train

    name = study_name(args)
    trials_root = tune_dir(args.model) / "trials"

    def objective(trial):
        lock.release()  # this trial now exists (RUNNING): the next count, by any worker, includes it
        params = suggest(trial, search.space, search.rep_keys)
        rep = params.get("representation") or search.fixed.get("representation")
        cfg = config_mod.resolve(args.model, args.profile, rep, "default", {**search.fixed, **params})
        if search.teachers:
            cfg["teacher_runs"] = search.teachers
        out = trials_root / (str(trial.number) if name == args.model else f"{name}-{trial.number}")
        out.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run", str(out))
        write_json_atomic(out / "config.json", {**cfg, "data": str(search.data_dir), "study": name,
                                                "trial": trial.number, "params": params,
                                                "versions": library_versions()})

        def on_epoch(epoch: int, record: dict) -> None:
            trial.report(record["val_macro_auc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val macro AUC {record['val_macro_auc']:.4f}")

        result = train(cfg, out, search.data_dir, resume=False, progress=False, on_epoch=on_epoch,
                       evaluate_test=False)
        trial.set_user_attr("epochs_run", result["epochs_run"])
        return result["val"]["macro_auc"]

    return objective


class TrialCallbacks:
    """What runs after each trial: its one-line report, failing dead workers' trials, and the decision to stop."""

    def __init__(self, trials: int, heartbeat: int, storage, lock: StudyLock):
        self.trials, self.heartbeat, self.storage, self.lock = trials, heartbeat, storage, lock
        self.silent_since: dict[int, float] = {}  # fail_trials_without_heartbeat's clock

    def all(self) -> list:
        return [self.report, self.fail_stale, self.next_or_stop]

    def report(self, study, t) -> None:
        from optuna.trial import TrialState

        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0
        if t.state == TrialState.COMPLETE:
            what = f"val macro AUC {t.value:.4f}"
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            last = max(t.intermediate_values)
            what = f"pruned at epoch {last} (val macro AUC {t.intermediate_values[last]:.4f})"
        else:
            what = t.state.name.lower()
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        try:
            best = f"best {study.best_trial.number} ({study.best_value:.4f})"
        except ValueError:
            best = "no complete trial yet"
        log(f"trial {t.number}: {what}, {secs:.0f} s, {params} | {finished(study)}/{self.trials} finished, {best}")

    def fail_stale(self, study, t) -> None:
        import optuna

        optuna.storages.fail_stale_trials(study)  # a killed worker's trial must not count as running below
        fail_trials_without_heartbeat(study, self.storage, 2 * self.heartbeat, self.silent_since)

    def next_or_stop(self, study, t) -> None:
        """Stop when finished + running trials (this worker's and the others') reach --trials: workers sharing
        the study stop together instead of each running its own --trials. Otherwise keep the lock until the
        next trial exists (objective releases it)."""
        self.lock.acquire()
        if finished(study) + running(study) >= self.trials:
            study.stop()
            self.lock.release()


def wait_for_stale_trials(study, args, storage_url: str, fail_stale) -> None:
    """Say where the study stands. When the trials still missing are all RUNNING (another worker's, or a killed
    run's), wait up to two heartbeats: a dead one goes stale, is failed and re-queued, and this worker runs it."""
    fail_stale(study, None)
    done, busy = finished(study), running(study)
    log(f"tuning {args.model} (profile {args.profile}): study {study_name(args)!r} in {redact(storage_url)}, "
        f"{done}/{args.trials} trials finished, {busy} running elsewhere")
    grace_end = time.time() + 2 * args.heartbeat + 1
    if done < args.trials <= done + busy:
        log(f"waiting up to {2 * args.heartbeat + 1} s for {busy} running trial(s): another worker's, or a "
            "killed run's (failed and re-queued once its heartbeat is stale)")
    while done < args.trials <= done + busy and time.time() < grace_end:
        time.sleep(1)
        fail_stale(study, None)
        done, busy = finished(study), running(study)


def optimize(study, args, objective, lock: StudyLock, callbacks: TrialCallbacks) -> bool:
    """Run trials until the study has --trials (counting other workers' running ones) or --timeout passes;
    a trial that runs out of GPU memory fails alone. True when interrupted (Ctrl-C)."""
    import torch

    try:
        lock.acquire()
        done, busy = finished(study), running(study)
        if done >= args.trials:
            log(f"the study already has {done} finished trials (--trials {args.trials}): nothing to run")
        elif done + busy >= args.trials:
            log(f"nothing to start: {done} finished + {busy} running elsewhere >= {args.trials}")
        else:
            study.optimize(objective, timeout=args.timeout or None, catch=(torch.OutOfMemoryError,),
                           callbacks=callbacks.all())
    except KeyboardInterrupt:
        return True
    finally:
        lock.close()
    return False


def summarize(study, args, search: Search, storage_url: str, wall: float, interrupted: bool) -> int:
    """Write study.json and best_config.toml, say where they are; the exit code: 0, 1 with no complete trial,
    130 when interrupted."""
    best = write_outputs(study, args.model, args.profile, args, search.space, search.fixed, storage_url, wall,
                         search.base["representation"])
    d = tune_dir(args.model)
    if best is None:
        log(f"no complete trial yet; wrote {d / 'study.json'}")
        return 130 if interrupted else 1
    log(f"best: trial {best['number']}, val macro AUC {best['value']:.4f}; wrote {config_mod.tuned_path(args.model)} "
        f"and {d / 'study.json'} ({finished(study)}/{args.trials} finished, {wall:.0f} s)")
    busy = running(study)
    if busy:
        log(f"{busy} trial(s) still running in other workers: best_config.toml is provisional until "
            "the last worker stops")
    if interrupted:
        log("interrupted: rerun the same command to continue the study")
        return 130
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
