"""The Makefile's orchestration (stage order, JOBS parallelism, failure propagation), run with a stand-in PYTHON
that records each call instead of training anything."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
echo "OMP=${OMP_NUM_THREADS:-unset} $*" >> "$CALL_LOG"
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && { sleep 0.5; exit 3; } ;; esac
exit 0
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def run_make(tmp_path: Path, *args: str, fail_on: str = "") -> tuple[int, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    stamp = tmp_path / "venv-stamp"
    stamp.touch()  # newer than requirements.txt: make does not try to install anything
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {"PATH": "/usr/bin:/bin", "CALL_LOG": str(log), "FAIL_ON": fail_on, "HOME": str(tmp_path)}
    proc = subprocess.run(["make", "--no-print-directory", *args, f"PYTHON={fake}", f"VENV_STAMP={stamp}",
                           f"ARTIFACTS={tmp_path / 'artifacts'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, log.read_text().splitlines()


def test_make_all_runs_the_stages_in_order_with_models_two_at_a_time_on_one_thread_each(tmp_path):
    rc, calls = run_make(tmp_path, "all", "JOBS=2", "NPROC=2", "PTBXL_DIR=/data")
    assert rc == 0
    compression = ("compression.compress", "compression.export_onnx", "compression.openvino_export",
                   "compression.prune_structured")
    stages = [next(s for m, s in [("build_cache",) * 2, ("models.train",) * 2, ("models.summarize",) * 2,
                                  *((m, "compress-all") for m in compression), ("eval.evaluate",) * 2,
                                  ("eval.report",) * 2] if m in c) for c in calls]
    assert stages[0] == "build_cache" and stages.count("build_cache") == 1  # later stages skip the cache check
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["build_cache", "models.train", "models.summarize", "compress-all", "eval.evaluate",
                     "eval.report"]
    trains = [c for c in calls if "models.train" in c]
    assert len(trains) == 6 and all(c.startswith("OMP=1 ") for c in trains)
    assert sum("compression.compress" in c for c in calls) == 12  # prune + quantize of six models
    assert sum("compression.export_onnx" in c for c in calls) == 6  # ONNX Runtime fp32 + int8
    assert sum("compression.openvino_export" in c for c in calls) == 6  # OpenVINO fp32 + NNCF int8
    assert sum("compression.prune_structured" in c for c in calls) == 6  # structured pruning + its int8
    assert all(c.startswith("OMP=1 ") for c in calls if "compression." in c)  # two jobs, one thread each
    assert all(c.startswith("OMP=unset ") for c in calls if "eval." in c)  # timing runs on every core, alone


def test_jobs_1_leaves_the_thread_count_to_torch(tmp_path):
    rc, calls = run_make(tmp_path, "train-all", "JOBS=1", "NPROC=2", "PTBXL_DIR=/data")
    assert rc == 0
    assert [c.split()[0] for c in calls if "models.train" in c] == ["OMP=unset"] * 6


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_demo_stops_when_a_training_fails(tmp_path, jobs):
    rc, calls = run_make(tmp_path, "demo", f"JOBS={jobs}", "NPROC=2", f"DEMO_DATA={tmp_path}",
                         f"DEMO_ARTIFACTS={tmp_path / 'demo'}", fail_on="models.train --model vit")
    assert rc != 0
    assert any("models.train --model vit" in c for c in calls)
    assert not any("compression.compress" in c or "eval." in c for c in calls)


def test_demo_runs_every_step_when_nothing_fails(tmp_path):
    rc, calls = run_make(tmp_path, "demo", "JOBS=2", "NPROC=2", f"DEMO_DATA={tmp_path}",
                         f"DEMO_ARTIFACTS={tmp_path / 'demo'}")
    assert rc == 0
    assert sum("models.train" in c for c in calls) == 2 and sum("compression.compress" in c for c in calls) == 2
    assert "eval.report" in calls[-1]
