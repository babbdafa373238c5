"""Metrics, from scikit-learn. Classes with a single label value in the data are left out of macro
averages (their AUC is undefined) and reported as NaN."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def per_class_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    out = np.full(y_true.shape[1], np.nan)
    for k in range(y_true.shape[1]):
        if 0 < y_true[:, k].sum() < len(y_true):
            out[k] = roc_auc_score(y_true[:, k], y_score[:, k])
    return out


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    aucs = per_class_auc(y_true, y_score)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
