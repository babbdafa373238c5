"""Reading what a finished stage left on disk, for the stages that compare results (models.summarize on
training runs, eval.report on evaluated artifacts): a run's seed, a predictions.npz's test split, and the
paired comparison of two models scored on the same test records."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_seed(run_dir: Path, metrics: dict | None = None) -> int:
    """metrics.json has the seed since session 9; every run's config.json has it."""
    if metrics and "seed" in metrics:
        return int(metrics["seed"])
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text()).get("seed", 0))
    except (OSError, ValueError):
        return 0


def test_predictions(npz: Path) -> dict | None:
    """The test split of a predictions.npz — training's (labels, probs) or evaluation's (also ecg_id) — or None
    when the file is missing or unreadable (runs from before it was written)."""
    try:
        with np.load(npz) as z:
            return {"labels": z["test_labels"], "probs": z["test_probs"],
                    "ecg_id": z["test_ecg_id"] if "test_ecg_id" in z.files else None}
    except (OSError, KeyError, ValueError):
        return None


def paired_test_difference(a: dict | None, b: dict | None, n_resamples: int) -> dict | None:
    """a's test macro AUC minus b's with a paired bootstrap interval (shared.metrics.paired_auc_difference), or
    None when either is missing or they do not hold the same records (by ecg_id where both have it, else by
    labels)."""
    from shared.metrics import paired_auc_difference

    if a is None or b is None:
        return None
    both_have_ids = a["ecg_id"] is not None and b["ecg_id"] is not None
    if (both_have_ids and not np.array_equal(a["ecg_id"], b["ecg_id"])) or not np.array_equal(a["labels"], b["labels"]):
        return None
    return paired_auc_difference(a["labels"], a["probs"], b["probs"], n_resamples)
