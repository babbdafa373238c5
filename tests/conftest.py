"""Shared fixtures: real PTB-XL records (the subset shipped in tests/data/ptbxl-mini, or PTBXL_SAMPLE), their
cache, and small synthetic folders."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The real PTB-XL subset that ships with the repository; PTBXL_SAMPLE=/path points the tests at a larger copy.
MINI = REPO / "tests" / "data" / "ptbxl-mini"
SAMPLE = Path(os.environ.get("PTBXL_SAMPLE") or MINI).resolve()


def run_module(module: str, *args: str, env: dict | None = None, check: bool = False, timeout: float = 600):
    """Run `python -m module args` from the repo root, as make does; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "ptbxl_database.csv").exists():
        pytest.fail(f"no PTB-XL records at {SAMPLE} (PTBXL_SAMPLE must name a PTB-XL folder)")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_cache(sample_dir, tmp_path_factory) -> Path:
    """The real records at 100 Hz, built once per test run."""
    out = tmp_path_factory.mktemp("cache") / "ptbxl-100hz"
    run_module("data_prep.build_cache", "--ptbxl-dir", sample_dir, "--out", out, check=True)
    return out


@pytest.fixture(scope="session")
def synth_template(tmp_path_factory) -> Path:
    from data_prep.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "ptbxl", records=60, sampling_rates=(100,), seed=1,
                        workers=1, progress=False)


@pytest.fixture
def synth_dir(synth_template, tmp_path) -> Path:
    """A fresh, writable copy of a small synthetic PTB-XL folder that a test may break."""
    dst = tmp_path / "ptbxl"
    shutil.copytree(synth_template, dst)
    return dst


def _quick_run(model: str, representation: str, root: Path, sample_cache: Path) -> Path:
    """A 1-epoch quick-profile run on the real records; windows every 7.5 s (2 per record, not 7) to cut every
    later evaluation to under a third while still averaging windows. Shared by several test files: tests must
    not modify it."""
    out = root / f"{model}-{representation}-quick"
    run_module("models.train", "--model", model, "--profile", "quick", "--data", sample_cache, "--out", out,
               "--no-progress", "--set", "max_train_batches=3", "--set", "epochs=1",
               "--set", "eval_stride_seconds=7.5", check=True)
    return out


@pytest.fixture(scope="session")
def quick_vit_run(sample_cache, tmp_path_factory) -> Path:
    return _quick_run("vit", "leads", tmp_path_factory.mktemp("runs"), sample_cache)


@pytest.fixture(scope="session")
def quick_resnet_run(sample_cache, tmp_path_factory) -> Path:
    return _quick_run("resnet1d_wang", "signal", tmp_path_factory.mktemp("runs"), sample_cache)


HEAVIEST_FILES_FIRST = ["test_compress.py", "test_train.py", "test_eval.py", "test_prune_structured.py",
                        "test_distill.py", "test_pretrained.py", "test_export.py", "test_openvino.py", "test_tune.py",
                        "test_trust.py", "test_postgres.py", "test_bad_input.py"]


def pytest_collection_modifyitems(items):
    """Heaviest files first: `make test` hands whole files to its workers in collection order (pytest-xdist
    --dist loadfile), so the light files run last and fill the gaps instead of one heavy file running alone."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept
