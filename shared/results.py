"""Reading what a finished stage left on disk, for the stages that compare results (models.summarize on
training runs, eval.report on evaluated artifacts, compression checking a variant against its parent): a run's
seed and teacher, a predictions.npz's test split, the paired comparison of two models scored on the same test
records, and which compressed variants are flagged or recommended."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_seed(run_dir: Path, metrics: dict | None = None) -> int:
    """From metrics.json, else from the run's config.json."""
    if metrics and "seed" in metrics:
        return int(metrics["seed"])
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text()).get("seed", 0))
    except (OSError, ValueError):
        return 0


def run_teacher(run_dir: Path, metrics: dict | None = None) -> str | None:
    """The teacher a run distilled from (None: trained on labels alone), from metrics.json, else config.json."""
    if metrics and "teacher" in metrics:
        return metrics["teacher"] or None
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("teacher") or None
    except (OSError, ValueError):
        return None


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


# A compressed variant that loses more validation macro AUC than COLLAPSE_AUC against its own fp32 model is
# flagged (compress warns, the report marks it) and never recommended; the recommended deploy artifact of a run
# is the fastest one within DEPLOY_AUC_BUDGET of its fp32 model — both judged on validation, never on test.
COLLAPSE_AUC = 0.01
DEPLOY_AUC_BUDGET = 0.005


def collapse_warning(name: str, variant_val_auc: float, parent_val_auc: float) -> str | None:
    """One warning line when a variant loses more than COLLAPSE_AUC validation macro AUC, else None."""
    loss = parent_val_auc - variant_val_auc
    if not np.isfinite(loss) or loss <= COLLAPSE_AUC:
        return None
    return (f"warning: {name} loses {loss:.4f} validation macro AUC against its fp32 model "
            f"({parent_val_auc:.4f} → {variant_val_auc:.4f}, more than {COLLAPSE_AUC}): flagged in the report, "
            "never recommended for deployment")


def deploy_choice(variants: list[dict], speed_key: str = "throughput_b32_t1") -> dict:
    """For one run's scored artifacts (eval-all results, its fp32 among them): the fp32 result, the flagged
    variants, and the recommended one — the fastest by `speed_key` within DEPLOY_AUC_BUDGET of the fp32 model's
    validation macro AUC (the fp32 model itself qualifies)."""
    fp32 = next((r for r in variants if r["variant"] == "fp32"), None)
    if fp32 is None:
        return {"fp32": None, "flagged": [], "recommended": None}
    base = fp32["splits"]["val"]["macro_auc"]
    loss = {r["artifact"]: base - r["splits"]["val"]["macro_auc"] for r in variants}
    flagged = [r for r in variants if loss[r["artifact"]] > COLLAPSE_AUC]
    ok = [r for r in variants if loss[r["artifact"]] <= DEPLOY_AUC_BUDGET and r.get("efficiency", {}).get(speed_key)]
    best = max(ok, key=lambda r: r["efficiency"][speed_key], default=None)
    return {"fp32": fp32, "flagged": flagged, "recommended": best, "val_loss": loss}


def record_variant(out: Path, metrics: dict, run_dir: Path, name: str, details: str = "") -> dict:
    """The last step of making any variant: its change against the run's fp32 model (a collapse warns and is
    flagged), metrics.json written (it marks the variant finished), and one line saying so."""
    from shared.io import write_json_atomic

    check_against_parent(metrics, run_dir, name)
    write_json_atomic(Path(out) / "metrics.json", metrics)
    change = metrics.get("val_auc_change_vs_fp32")
    print(f"{name}: val macro AUC {metrics['val']['macro_auc']:.4f}"
          f"{'' if change is None else f' ({change:+.4f} vs fp32)'}, {metrics['artifact_bytes'] / 1e6:.2f} MB "
          f"(fp32 {metrics['fp32_bytes'] / 1e6:.2f} MB){details}", flush=True)
    return metrics


def check_against_parent(metrics: dict, run_dir: Path, name: str) -> dict:
    """Record a variant's validation change against its run's fp32 model in its metrics and warn on stderr
    when it collapses (collapse_warning)."""
    import sys

    try:
        parent = json.loads((Path(run_dir) / "metrics.json").read_text())["val"]["macro_auc"]
    except (OSError, ValueError, KeyError, TypeError):
        return metrics
    metrics["val_auc_change_vs_fp32"] = metrics["val"]["macro_auc"] - parent
    metrics["flagged"] = bool(warning := collapse_warning(name, metrics["val"]["macro_auc"], parent))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return metrics
