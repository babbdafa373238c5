"""Every metric the project reports, in one place, on scikit-learn where it has the metric.

Conventions follow the PTB-XL benchmark (Strodthoff et al. 2021, code/utils/utils.py):
- macro AUC over classes; a class with a single label value in the data is left out (its AUC is
  undefined) and reported as NaN;
- binary predictions use per-class thresholds, and a record with no class above its threshold gets its
  highest-scoring class (every PTB-XL record kept has at least one class);
- F-beta / G-beta (beta = 2) are the PhysioNet/CinC 2020 challenge metrics, each record weighted by
  1 / its number of true labels;
- 95 % confidence intervals are percentiles of bootstrap resamples, each resample drawn again until
  it contains every class (positive and negative) that the full set contains.
- two models on the same records are compared by a paired bootstrap of their macro-AUC difference.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, roc_auc_score


def per_class_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    out = np.full(y_true.shape[1], np.nan)
    for k in range(y_true.shape[1]):
        if 0 < y_true[:, k].sum() < len(y_true):
            out[k] = roc_auc_score(y_true[:, k], y_score[:, k])
    return out


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    aucs = per_class_auc(y_true, y_score)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


# ------------------------------------------------------------------ thresholds (fitted on validation only)
def tune_thresholds(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per class, the score cut-off with the best F1 on the given (validation) data; 0.5 for a class
    without positives. Callers pass validation predictions only — test labels never reach this."""
    thresholds = np.full(y_true.shape[1], 0.5)
    for k in range(y_true.shape[1]):
        if y_true[:, k].sum() == 0:
            continue
        precision, recall, cut = precision_recall_curve(y_true[:, k], y_score[:, k])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds[k] = float(cut[int(np.argmax(f1))])
    return thresholds


def apply_thresholds(y_score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Binary N×C predictions: score ≥ threshold, and the top class for records where none passes."""
    pred = (y_score >= np.asarray(thresholds)[None, :]).astype(np.uint8)
    empty = pred.sum(axis=1) == 0
    pred[np.flatnonzero(empty), np.argmax(y_score[empty], axis=1)] = 1
    return pred


# ------------------------------------------------------------------ threshold metrics
def challenge_scores(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0) -> tuple[float, float]:
    """(F-beta macro, G-beta macro) of the PhysioNet/CinC challenge, as the PTB-XL benchmark computes them."""
    y_true = y_true.astype(bool)
    y_pred = y_pred.astype(bool)
    weight = 1.0 / np.maximum(y_true.sum(axis=1), 1)[:, None]
    tp = ((y_true & y_pred) * weight).sum(axis=0)
    fp = ((~y_true & y_pred) * weight).sum(axis=0)
    fn = ((y_true & ~y_pred) * weight).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_beta = (1 + beta ** 2) * tp / ((1 + beta ** 2) * tp + fp + beta ** 2 * fn)
        g_beta = tp / (tp + fp + beta * fn)
    return float(np.nanmean(f_beta)), float(np.nanmean(g_beta))


def point_metrics(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray | float]:
    """Every reported metric of one set of predictions: scalars, and per-class arrays (keys ending _per_class)."""
    y_pred = apply_thresholds(y_score, thresholds)
    f_beta, g_beta = challenge_scores(y_true, y_pred)
    return {
        "macro_auc": macro_auc(y_true, y_score),
        "auc_per_class": per_class_auc(y_true, y_score),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_per_class": f1_score(y_true, y_pred, average=None, zero_division=0).astype(float),
        "exact_match_accuracy": float(accuracy_score(y_true, y_pred)),
        "f_beta2": f_beta,
        "g_beta2": g_beta,
    }


# ------------------------------------------------------------------ bootstrap confidence intervals
def bootstrap_indices(y_true: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                      max_draws_factor: int = 20) -> np.ndarray:
    """n_resamples × N index arrays drawn with replacement; each contains every class the full set has
    (as positive and as negative), so per-class AUC is defined in every resample."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    has_pos = y_true.sum(axis=0) > 0
    has_neg = (1 - y_true).sum(axis=0) > 0
    out = []
    for _ in range(n_resamples * max_draws_factor):
        idx = rng.integers(0, n, n)
        sample = y_true[idx]
        if ((sample.sum(axis=0) > 0) >= has_pos).all() and (((1 - sample).sum(axis=0) > 0) >= has_neg).all():
            out.append(idx)
            if len(out) == n_resamples:
                return np.stack(out)
    raise ValueError(f"could not draw {n_resamples} bootstrap resamples containing every class from {n} records")


def rank_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per-class AUC by the rank-sum formula (average ranks for ties), NaN for a one-valued class: equal to
    per_class_auc without scikit-learn's per-call checks, which dominate a bootstrap loop. Arrays are
    (..., records, classes): leading axes (e.g. bootstrap resamples) are scored in one vectorised pass."""
    from scipy.stats import rankdata

    y = y_true.astype(bool)
    n_pos = y.sum(axis=-2)
    n_neg = y.shape[-2] - n_pos
    ranks = rankdata(y_score, axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=-2) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def fast_point_metrics(y_true: np.ndarray, y_score: np.ndarray, y_pred: np.ndarray) -> dict:
    """point_metrics in plain numpy for the bootstrap loop (scikit-learn's input checks cost ~45 ms per
    resample); tests check it equals point_metrics. AUC by the rank-sum formula with average ranks for ties."""
    y = y_true.astype(bool)
    auc = rank_auc(y_true, y_score)
    p = y_pred.astype(bool)
    tp, fp, fn = (y & p).sum(axis=0), (~y & p).sum(axis=0), (y & ~p).sum(axis=0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    f_beta, g_beta = challenge_scores(y_true, y_pred)
    return {"macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
            "auc_per_class": auc, "macro_f1": float(f1.mean()), "f1_per_class": f1.astype(float),
            "exact_match_accuracy": float((p == y).all(axis=1).mean()), "f_beta2": f_beta, "g_beta2": g_beta}


def bootstrap_ci(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, tuple]:
    """{metric: (low, high)} percentile intervals of point_metrics over resamples (thresholds held fixed);
    per-class metrics give arrays of lows and highs."""
    if n_resamples <= 0 or len(y_true) < 2:
        return {}
    draws: dict[str, list] = {}
    y_pred = apply_thresholds(y_score, thresholds)
    for idx in bootstrap_indices(y_true, n_resamples, seed):
        for k, v in fast_point_metrics(y_true[idx], y_score[idx], y_pred[idx]).items():
            draws.setdefault(k, []).append(v)
    alpha = (1 - level) / 2
    return {k: (np.nanquantile(np.asarray(v, float), alpha, axis=0),
                np.nanquantile(np.asarray(v, float), 1 - alpha, axis=0)) for k, v in draws.items()}


def resampled_auc(y_true: np.ndarray, y_score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-class AUC of every bootstrap resample at once, each resample given as how often it draws each record
    (counts: resamples × records): the rank-sum AUC with those multiplicities, from one sort of the full set per
    class. Equal to rank_auc(y_true[idx], y_score[idx]) (tests check it); for 1,000 resamples of 192 records,
    0.08 s here against 0.26 s for rank_auc on the stacked resamples and 0.94 s for one rank_auc per resample."""
    y = y_true.astype(bool)
    out = np.full((len(counts), y.shape[1]), np.nan)
    for k in range(y.shape[1]):
        order = np.argsort(y_score[:, k], kind="stable")
        s, pos = y_score[order, k], y[order, k]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
        w = np.ascontiguousarray(counts[:, order].T, dtype=float)  # records × resamples: sums run down rows
        g_pos, g_neg = w * pos[:, None], w * ~pos[:, None]
        if len(starts) < len(s):
            g_pos, g_neg = np.add.reduceat(g_pos, starts, axis=0), np.add.reduceat(g_neg, starts, axis=0)
        below = np.cumsum(g_neg, axis=0) - g_neg  # negatives scored strictly lower than each group
        n_pos, n_neg = g_pos.sum(axis=0), g_neg.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (g_pos * (below + 0.5 * g_neg)).sum(axis=0) / (n_pos * n_neg)
        out[:, k] = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return out


_RESAMPLES: dict[tuple, np.ndarray] = {}  # comparisons on one test fold share their resamples: draw them once


def paired_auc_difference(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_resamples: int = 1000,
                          seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Macro AUC of a minus b on the same records, with a paired bootstrap interval: both models are scored on
    each resample, so the record-to-record luck they share cancels out. That interval is much narrower than
    the two separate intervals suggest, and it is the one that says whether a beats b on this data.
    p_a_better: the share of resamples where a's macro AUC is higher."""
    key = (y_true.tobytes(), y_true.shape, n_resamples, seed)
    if key not in _RESAMPLES:
        idx = bootstrap_indices(y_true, n_resamples, seed)
        n = len(y_true)
        _RESAMPLES.clear()
        _RESAMPLES[key] = np.bincount((idx + n * np.arange(len(idx))[:, None]).ravel(),
                                      minlength=len(idx) * n).reshape(len(idx), n)
    counts = _RESAMPLES[key]
    a, b = (float(np.nanmean(rank_auc(y_true, score))) for score in (score_a, score_b))
    deltas = (np.nanmean(resampled_auc(y_true, score_a, counts), axis=1)
              - np.nanmean(resampled_auc(y_true, score_b, counts), axis=1))
    alpha = (1 - level) / 2
    return {"a": a, "b": b, "delta": a - b, "low": float(np.quantile(deltas, alpha)),
            "high": float(np.quantile(deltas, 1 - alpha)), "p_a_better": float((deltas > 0).mean())}
