"""Where artifacts live. One root (ARTIFACTS=...), nothing under it tracked by git."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def artifacts_root() -> Path:
    return Path(os.environ.get("ARTIFACTS", REPO_ROOT / "artifacts")).resolve()


def data_cache_dir(sampling_rate: int, root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "data" / f"ptbxl-{sampling_rate}hz"


def download_dir(root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "downloads" / "ptb-xl"


def runs_dir(root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "runs"


def compressed_dir(root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "compressed"


def eval_dir(root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "eval"


def report_dir(root: Path | None = None) -> Path:
    return (root or artifacts_root()) / "report"


def tune_dir(model: str, root: Path | None = None) -> Path:
    """<artifacts>/tune/<model>: a model's Optuna study, its trial runs and best_config.toml."""
    return (root or artifacts_root()) / "tune" / model
