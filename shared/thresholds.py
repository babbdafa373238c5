"""Per-class decision thresholds, stored beside the model they were tuned for.

`make eval-all` tunes them on the validation fold and writes `thresholds.json` into the artifact's own
folder with the sha256 of the model file, so `predict` and `evaluate --data` use the thresholds of exactly
the model they load — not those of a same-named run under another artifacts root, nor those of an earlier
checkpoint of the same run.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shared.io import read_json, sha256_file, write_json_atomic
from shared.labels import CLASSES

DEFAULT_THRESHOLD = 0.5


def model_file(artifact_dir: Path) -> Path:
    """The file whose bytes are the model: a run's best.safetensors, or the variant's artifact."""
    artifact_dir = Path(artifact_dir)
    if (artifact_dir / "variant.json").exists():
        return artifact_dir / read_json(artifact_dir / "variant.json")["artifact"]
    return artifact_dir / "best.safetensors"


def thresholds_path(artifact_dir: Path, variant: str = "fp32") -> Path:
    """bf16 autocast twins share their run's folder (and weights) but get thresholds of their own."""
    return Path(artifact_dir) / ("thresholds-bf16.json" if variant == "bf16" else "thresholds.json")


def write_thresholds(artifact_dir: Path, thresholds, tuned_on: str, variant: str = "fp32") -> Path:
    path = thresholds_path(artifact_dir, variant)
    write_json_atomic(path, {
        "thresholds": dict(zip(CLASSES, map(float, thresholds))), "model_file": model_file(artifact_dir).name,
        "model_sha256": sha256_file(model_file(artifact_dir)), "tuned_on": tuned_on,
        "rule": "best F1 per class on the validation fold", "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def read_thresholds(artifact_dir: Path, variant: str = "fp32") -> tuple[np.ndarray | None, str]:
    """(thresholds, where they came from), or (None, why there are none) when the model has none of its own."""
    path = thresholds_path(artifact_dir, variant)
    if not path.exists():
        return None, f"{path}: none tuned for this model yet (`make eval-all` tunes them on validation)"
    try:
        stored = read_json(path)
        values = np.asarray([float(stored["thresholds"][c]) for c in CLASSES])
        recorded = stored["model_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {e})"
    if recorded != sha256_file(model_file(artifact_dir)):
        return None, f"{path}: tuned for another version of {model_file(artifact_dir).name} (retrained since)"
    return values, f"{path} ({stored.get('tuned_on', 'validation')})"
