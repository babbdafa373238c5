"""`make report`: one self-contained HTML page (figures embedded) and its Markdown twin from the files the
earlier stages wrote — artifacts/eval/results.json + predictions, the training runs' metrics, the data
cache and any tuning studies. Reads files only; trains and measures nothing.

Writes artifacts/report/report.html, report.md and figures/*.png.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from shared.config import with_defaults
from shared.io import first_line, library_versions, read_json, write_bytes_atomic, write_text_atomic
from shared.paths import artifacts_root, data_cache_dir, eval_dir, report_dir, runs_dir
from shared.results import (COLLAPSE_AUC, DEPLOY_AUC_BUDGET, deploy_choice, paired_test_difference,
                            run_seed, run_teacher, test_predictions)

# Quoted, not measured here: test-fold (fold 10) macro AUC on the FULL PTB-XL, diagnostic superclasses,
# from the PTB-XL benchmark leaderboard (Strodthoff et al., IEEE JBHI 2021, doi:10.1109/JBHI.2020.3022989;
# github.com/helme/ecg_ptbxl_benchmarking). "(05)" there = ±0.005 bootstrap uncertainty.
PUBLISHED = [("resnet1d_wang", 0.930, 0.005), ("xresnet1d101", 0.928, 0.005), ("lstm", 0.927, 0.005),
             ("fcn_wang", 0.925, 0.006), ("inception1d", 0.921, 0.006), ("lstm_bidir", 0.921, 0.006),
             ("Wavelet+NN", 0.874, 0.007)]
PUBLISHED_SOURCE = ("Strodthoff et al., Deep Learning for ECG Analysis: Benchmarks and Insights from PTB-XL, "
                    "IEEE JBHI 25(5), 2021 — leaderboard 'PTB-XL: Diagnostic superclasses'")
LATENCY_KEY = "latency_ms_b1_t1"
REFERENCE_MODEL = "resnet1d_wang"   # every fp32 model is compared with it on the same test records
FIG_DPI = 110


# ------------------------------------------------------------------ inputs
def load_results() -> dict:
    """results.json: its `results` (one per artifact), `versions`, and `bf16_skipped` when eval-all left the
    bf16 twins out."""
    path = eval_dir() / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no evaluation results; run `make eval-all` first")
    evaluation = read_json(path)
    if not evaluation.get("results"):
        raise ValueError(f"{path}: holds no results; run `make eval-all`")
    return evaluation


def test_auc(r: dict) -> float:
    v = r["splits"]["test"]["macro_auc"]
    return -1.0 if v is None else v


def data_counts() -> list[dict] | None:
    """Records per split and class, from the first cache found."""
    for fs in (100, 500):
        root = data_cache_dir(fs)
        if (root / "manifest.json").exists():
            import pandas as pd

            meta = pd.read_csv(root / "meta.csv")
            labels = np.load(root / "labels.npy")
            classes = read_json(root / "manifest.json")["classes"]
            rows = []
            for split in ("train", "val", "test"):
                sel = meta["split"].to_numpy() == split
                rows.append({"split": split, "records": int(sel.sum()), "sampling_rate": fs,
                             **{c: int(labels[sel, i].sum()) for i, c in enumerate(classes)}})
            return rows
    return None


def run_table() -> list[dict]:
    rows = []
    for m in sorted(runs_dir().glob("*/metrics.json")):
        d = read_json(m)
        cfg = with_defaults(read_json(m.parent / "config.json"))
        rows.append({"run": m.parent.name, "model": cfg["model"], "representation": cfg["representation"],
                     "profile": cfg.get("profile"), "config": cfg["config"], "seed": cfg["seed"],
                     "val": d["val"]["macro_auc"], "test": d["test"]["macro_auc"],
                     "train_s": d.get("train_seconds"), "teacher": cfg.get("teacher") or None})
    return rows


def seed_vs_default(runs: list[dict]) -> list[dict]:
    from shared.config import resolve

    out = []
    # what train-all trains; extra seeds and distilled runs are summarize's business
    runs = [r for r in runs if r.get("seed", 0) == 0 and not r.get("teacher")]
    for r in runs:
        if r["representation"] != "seed" or r["config"] != "default":
            continue
        default_rep = resolve(r["model"], r["profile"])["representation"]
        mate = next((d for d in runs if d["model"] == r["model"] and d["profile"] == r["profile"]
                     and d["representation"] == default_rep and d["config"] == "default"), None)
        if mate:
            out.append({"model": r["model"], "default": default_rep, "seed_val": r["val"], "seed_test": r["test"],
                        "default_val": mate["val"], "default_test": mate["test"]})
    return out


def tuned_vs_default(runs: list[dict]) -> list[dict]:
    out = []
    runs = [r for r in runs if r.get("seed", 0) == 0 and not r.get("teacher")]
    for r in runs:
        if r["config"] != "tuned":
            continue
        mate = next((d for d in runs if d["model"] == r["model"] and d["profile"] == r["profile"]
                     and d["config"] == "default" and d["representation"] == r["representation"]), None)
        study = artifacts_root() / "tune" / r["model"] / "study.json"
        s = read_json(study) if study.exists() else {}
        out.append({"model": r["model"], "representation": r["representation"], "tuned_val": r["val"],
                    "tuned_test": r["test"], "default_val": mate["val"] if mate else None,
                    "default_test": mate["test"] if mate else None,
                    "trials": s.get("finished_trials", len(s.get("trials", [])) or None),
                    "study_seconds": s.get("trial_seconds_total"),
                    "fixed": ", ".join(f"{k}={v}" for k, v in (s.get("fixed") or {}).items()) or "–"})
    return out


def paired_against(results: list[dict], reference_model: str, n_resamples: int) -> tuple[list[dict], list[dict]]:
    """Test macro AUC differences on the same records, with paired bootstrap intervals: every compressed or bf16
    variant against its own run's fp32 model, and every fp32 model against the reference model's fp32 run of the
    same seed (training runs' config.json). Pairs whose prediction files hold different records are skipped."""

    def compare(a, b):
        d = paired_test_difference(*(test_predictions(eval_dir() / r["artifact"] / "predictions.npz") for r in (a, b)),
                                   n_resamples)
        return d and {"artifact": a["artifact"], "against": b["artifact"], **d}

    fp32 = {r["run"]: r for r in results if r["variant"] == "fp32" and r["splits"]["test"]["macro_auc"] is not None}
    compressed = [compare(r, fp32[r["run"]]) for r in results
                  if r["variant"] != "fp32" and r["run"] in fp32 and r["splits"]["test"]["macro_auc"] is not None]
    seeds = {run: run_seed(runs_dir() / run) for run in fp32}
    refs = {seeds[run]: r for run, r in fp32.items() if r["model"] == reference_model and r["config"] == "default"
            and not run_teacher(runs_dir() / run)}  # a distilled reference is not the reference
    vs_ref = [compare(r, refs[seeds[run]]) for run, r in fp32.items()
              if r["model"] != reference_model and seeds[run] in refs]
    return [c for c in compressed if c], sorted((c for c in vs_ref if c), key=lambda c: -c["delta"])


def distilled_vs_plain(results: list[dict], n_resamples: int) -> list[dict]:
    """Each distilled run's fp32 model against its plain twin's (same model, layout, config and seed), paired on the
    same test records."""
    def compare(a, b):
        d = paired_test_difference(*(test_predictions(eval_dir() / r["artifact"] / "predictions.npz") for r in (a, b)),
                                   n_resamples)
        return d and {"artifact": a["artifact"], "against": b["artifact"], **d}

    def key(r):
        return r["model"], r["representation"], r["config"], run_seed(runs_dir() / r["run"])

    fp32 = [r for r in results if r["variant"] == "fp32" and r["splits"]["test"]["macro_auc"] is not None]
    taught = {r["run"]: bool(run_teacher(runs_dir() / r["run"])) for r in fp32}
    plain = {key(r): r for r in fp32 if not taught[r["run"]]}
    pairs = [compare(r, plain[key(r)]) for r in fp32 if taught[r["run"]] and key(r) in plain]
    return [c for c in pairs if c]


def paired_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["artifact", "against", "artifact test AUC", "against test AUC", "Δ", "95 % paired interval",
            "share of resamples artifact > against"]
    return head, [[c["artifact"], c["against"], fmt(c["a"], ".4f"), fmt(c["b"], ".4f"), f"{c['delta']:+.4f}",
                   f"[{c['low']:+.4f}, {c['high']:+.4f}]", f"{c['p_a_better']:.2f}"] for c in rows]


# ------------------------------------------------------------------ figures
def best_model(results: list[dict]) -> dict | None:
    """The trained model with the best VALIDATION macro AUC, scored as fp32: its bf16 or compressed twins are the
    same model run another way, and would otherwise win ties by rounding noise."""
    scored = [r for r in results if r["splits"]["val"]["macro_auc"] is not None]
    pool = [r for r in scored if r["variant"] == "fp32"] or scored
    return max(pool, key=lambda r: r["splits"]["val"]["macro_auc"], default=None)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_figure(result: dict) -> bytes:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    preds = np.load(eval_dir() / result["artifact"] / "predictions.npz")
    classes = [str(c) for c in preds["classes"]]
    y, p = preds["test_labels"], preds["test_probs"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, c in enumerate(classes):
        if 0 < y[:, k].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
            auc = result["splits"]["test"]["auc_per_class"][c]
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC on the test fold — {result['artifact']}")
    ax.legend(loc="lower right")
    return _png(fig)


def scatter_figure(results: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    runs = sorted({r["run"] for r in results})
    colors = {run: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    by_id = {r["artifact"]: r for r in results}
    for r in results:
        e = r.get("efficiency")
        if not e or r["splits"]["test"]["macro_auc"] is None:
            continue
        ax.scatter(e[LATENCY_KEY], r["splits"]["test"]["macro_auc"], s=max(12, r["bytes"] / 1e6 * 8),
                   color=colors[r["run"]], alpha=0.6, edgecolor="k", linewidth=0.5)
        ax.annotate(r["variant"], (e[LATENCY_KEY], r["splits"]["test"]["macro_auc"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
        parent = by_id.get(f"{r['run']}/fp32")
        if parent and r["variant"] != "fp32" and parent.get("efficiency"):
            ax.annotate("", xy=(e[LATENCY_KEY], r["splits"]["test"]["macro_auc"]),
                        xytext=(parent["efficiency"][LATENCY_KEY], parent["splits"]["test"]["macro_auc"]),
                        arrowprops={"arrowstyle": "->", "color": colors[r["run"]], "alpha": 0.5, "lw": 0.8})
    for run in runs:
        ax.scatter([], [], color=colors[run], label=run)
    ax.set_xscale("log")
    ax.set(xlabel="batch-1 latency on this CPU, 1 thread (ms, log scale)", ylabel="test macro AUC",
           title="Accuracy vs CPU latency (marker area ∝ file size; arrows: fp32 → compressed)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


DEPLOY_SPEED = "throughput_b32_t1"


def deploy_rows(results: list[dict]) -> list[list[str]]:
    """Per run: the recommended deploy artifact (validation decides), its speed and size against the fp32
    model of the same run, measured in the same eval-all, and the variants flagged for losing accuracy."""
    rows = []
    for run in sorted({r["run"] for r in results}):
        c = deploy_choice([r for r in results if r["run"] == run and r["variant"] != "bf16"], DEPLOY_SPEED)
        fp32, best = c["fp32"], c["recommended"]
        if fp32 is None or best is None or not fp32.get("efficiency"):
            continue
        e, e0 = best["efficiency"], fp32["efficiency"]
        flagged = ", ".join(f"{r['variant']} (−{c['val_loss'][r['artifact']]:.3f})" for r in c["flagged"]) or "none"
        rows.append([run, best["variant"], f"{-c['val_loss'][best['artifact']]:+.4f}",
                     f"{e[DEPLOY_SPEED] / e0[DEPLOY_SPEED]:.2f}×", f"{e0[LATENCY_KEY] / e[LATENCY_KEY]:.2f}×",
                     f"{fp32['bytes'] / best['bytes']:.2f}×", fmt(best["splits"]["test"]["macro_auc"], ".4f"),
                     fmt(fp32["splits"]["test"]["macro_auc"], ".4f"), flagged])
    return rows


def pareto_figure(results: list[dict]) -> bytes:
    """Per family: validation macro AUC against batch-32 throughput (1 thread), marker area ∝ file size."""
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results if r.get("efficiency")})
    cols = min(3, max(1, len(models)))
    rows_n = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for r in (r for r in results if r["model"] == model and r.get("efficiency", {}).get(DEPLOY_SPEED)):
            x, y = r["efficiency"][DEPLOY_SPEED], r["splits"]["val"]["macro_auc"]
            ax.scatter(x, y, s=max(12, r["bytes"] / 1e6 * 8), alpha=0.6, edgecolor="k", linewidth=0.5,
                       color="tab:red" if r["variant"] == "fp32" else "tab:blue")
            ax.annotate(r["variant"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title=model, xlabel="batch-32 windows/s, 1 thread (log)", ylabel="val macro AUC")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("Validation AUC vs CPU throughput per family (red: fp32; marker area ∝ file size)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def bars_figure(rows: list[dict], a: str, b: str, labels: tuple[str, str], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[a] or 0 for r in rows], 0.4, label=labels[0])
    ax.bar(x + 0.2, [r[b] or 0 for r in rows], 0.4, label=labels[1])
    ax.set_xticks(x, [r["model"] for r in rows])
    lo = min([r[k] for r in rows for k in (a, b) if r[k]] + [0.5])
    ax.set(ylim=(max(0.0, lo - 0.05), 1.0), ylabel="test macro AUC", title=title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------ page
def fmt(v, spec=".3f", empty="–"):
    return empty if v is None else format(v, spec)


def _flagged(r: dict, results: list[dict]) -> bool:
    """Loses more than COLLAPSE_AUC validation macro AUC against its run's fp32 model."""
    fp32 = next((p for p in results if p["artifact"] == f"{r['run']}/fp32"), None)
    return fp32 is not None and fp32["splits"]["val"]["macro_auc"] - r["splits"]["val"]["macro_auc"] > COLLAPSE_AUC


def leaderboard(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["#", "artifact", "model", "input", "variant", "test macro AUC [95 % CI]", "val AUC", "test macro F1",
            "F2", "G2", "size MB", "non-zeros", "b1 latency ms (median / p95, 1 thread)", "b32 samples/s (2 threads)",
            "peak RSS MB"]
    rows = []
    for i, r in enumerate(sorted(results, key=test_auc, reverse=True), 1):
        t, v = r["splits"]["test"], r["splits"]["val"]
        ci = t.get("ci", {}).get("macro_auc")
        e = r.get("efficiency", {})
        variant = r["variant"] + (" ⚠ FLAGGED" if _flagged(r, results) else "")
        rows.append([str(i), r["artifact"], r["model"], r["representation"], variant,
                     fmt(t["macro_auc"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), fmt(v["macro_auc"]),
                     fmt(t["macro_f1"]), fmt(t["f_beta2"]), fmt(t["g_beta2"]), f"{r['bytes'] / 1e6:.2f}",
                     f"{r['nonzero_params']:,}",
                     f"{fmt(e.get(LATENCY_KEY), '.1f')} / {fmt(e.get('latency_p95_ms_b1_t1'), '.1f')}",
                     fmt(e.get("throughput_b32_t2"), ".0f"), fmt(e.get("peak_rss_mb"), ".0f")])
    return head, rows


def md_table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_sections() -> list:
    """Records per split and superclass, from the cache's manifest."""
    sections = []
    counts = data_counts()
    if counts:
        classes = [k for k in counts[0] if k not in ("split", "records", "sampling_rate")]
        sections.append(("Data", f"PTB-XL records in the cache ({counts[0]['sampling_rate']} Hz), per split and "
                         "diagnostic superclass (a record can have several classes).",
                         [("table", ["split", "records"] + classes,
                           [[c["split"], str(c["records"])] + [str(c[k]) for k in classes] for c in counts])]))

    return sections


def leaderboard_sections(evaluation: dict) -> list:
    """Every artifact ranked, with how its intervals and timings were made."""
    sections = []
    results = evaluation["results"]
    head, rows = leaderboard(results)
    bf16_skipped = evaluation.get("bf16_skipped")
    bf16_note = (f" bf16 twins of the runs: {bf16_skipped}." if bf16_skipped and
                 not any(r["variant"] == "bf16" for r in results) else "")
    ci_info = next((r["splits"]["test"] for r in results if "ci" in r["splits"]["test"]), {})
    sections.append(("Leaderboard", f"Every artifact, sorted by test macro AUC; ⚠ FLAGGED: loses more than "
                     f"{COLLAPSE_AUC} validation macro AUC against its own fp32 model. Thresholds for F1 / F2 / G2 are tuned "
                     f"per class on the validation fold only. Intervals: {ci_info.get('ci_resamples', 'no')} bootstrap "
                     f"resamples of the test fold (seed {ci_info.get('ci_seed', '–')}), percentile 95 %. Latency and "
                     f"throughput measured on: {results[0].get('efficiency', {}).get('cpu', 'this CPU')}." + bf16_note,
                     [("table", head, rows)]))

    return sections


def figure_sections(results: list[dict]) -> list:
    """ROC of the best fp32 model (chosen on validation) and accuracy vs latency."""
    sections = []
    best = best_model(results)
    if best:
        sections.append(("ROC curves of the best model", f"{best['artifact']} — the trained model (fp32) chosen by "
                         f"VALIDATION macro AUC ({best['splits']['val']['macro_auc']:.4f}); curves on the test fold.",
                         [("figure", "roc.png", roc_figure(best))]))
    if any(r.get("efficiency") for r in results):
        sections.append(("Accuracy vs CPU latency", "Each point is an artifact; arrows go from a run's fp32 model to "
                         "its compressed variants.", [("figure", "auc_vs_latency.png", scatter_figure(results))]))

    return sections


def deploy_sections(results: list[dict]) -> list:
    """The recommended deploy artifact per run, and the Pareto view."""
    sections = []
    deploy = deploy_rows(results)
    if deploy:
        sections.append(("Deploy candidates", f"Per run, the recommended deploy artifact: the fastest at batch 32 on "
                         f"one thread among those within {DEPLOY_AUC_BUDGET} validation macro AUC of the run's own fp32 "
                         f"model (chosen on validation; test shown after, not used). Speed-ups and size are against "
                         f"that fp32 PyTorch model, measured in the same eval-all on this CPU. Flagged: variants that "
                         f"lose more than {COLLAPSE_AUC} validation macro AUC — never recommended.",
                         [("table", ["run", "recommended", "Δ val AUC", "b32 throughput ×", "b1 latency ×",
                                     "× smaller", "its test AUC", "fp32 test AUC", "flagged (Δ val)"], deploy),
                          ("figure", "pareto.png", pareto_figure(results))]))

    return sections


def paired_sections(results: list[dict], ci_resamples: int) -> list:
    """Paired test differences on the same records: compressed vs fp32, each model vs the reference, distilled vs plain."""
    sections = []
    compressed, vs_ref = paired_against(results, REFERENCE_MODEL, ci_resamples)
    if compressed:
        sections.append(("Compressed vs fp32 on the same records", "Each compressed or bf16 variant's test macro AUC "
                         f"minus its own fp32 model's, with a paired bootstrap interval ({ci_resamples} resamples of "
                         "the test records, both models scored on each): an interval that holds 0 means the "
                         "compression's change is within what the test fold can resolve. The leaderboard's separate "
                         "intervals are far wider because they also carry the luck both models share.",
                         [("table", *paired_table(compressed))]))
    if vs_ref:
        sections.append((f"Each model against {REFERENCE_MODEL}", f"fp32 test macro AUC minus {REFERENCE_MODEL}'s "
                         "(the PTB-XL benchmark's best 1-D model, trained here on the same data; same seed), on the "
                         "same records, paired bootstrap as above.", [("table", *paired_table(vs_ref))]))
    kd = distilled_vs_plain(results, ci_resamples)
    if kd:
        sections.append(("Distilled vs plain", "Each model trained with a teacher (`-kd`, README \"Distillation\") "
                         "against the same model, layout, config and seed trained on the labels alone: fp32 test "
                         "macro AUC difference on the same records, paired bootstrap as above.",
                         [("table", *paired_table(kd))]))

    return sections


def run_comparison_sections(runs: list[dict]) -> list:
    """Training-run comparisons: seed preset vs default input, tuned vs default."""
    sections = []
    svd = seed_vs_default(runs)
    if svd:
        items = [("table", ["model", "default input", "seed val", "default val", "Δ val", "seed test", "default test",
                            "Δ test"],
                  [[s["model"], s["default"], fmt(s["seed_val"], ".4f"), fmt(s["default_val"], ".4f"),
                    f"{s['default_val'] - s['seed_val']:+.4f}", fmt(s["seed_test"], ".4f"),
                    fmt(s["default_test"], ".4f"), f"{s['default_test'] - s['seed_test']:+.4f}"] for s in svd]),
                 ("figure", "seed_vs_default.png", bars_figure(svd, "seed_test", "default_test",
                                                               ("seed preset 182×256", "default input"),
                                                               "Seed preset vs default representation"))]
        sections.append(("Seed preset vs default representation", "The original design's input (182×256 resize, 3 "
                         "channels) against each family's default, same profile.", items))
    tvd = tuned_vs_default(runs)
    if tvd:
        sections.append(("Tuned vs default", "Optuna-tuned configs (validation only) against the defaults.",
                         [("table", ["model", "input", "default val", "tuned val", "default test", "tuned test",
                                     "trials", "trial s (sum)", "fixed in every trial"],
                           [[t["model"], t["representation"], fmt(t["default_val"], ".4f"), fmt(t["tuned_val"], ".4f"),
                             fmt(t["default_test"], ".4f"), fmt(t["tuned_test"], ".4f"), fmt(t["trials"], "d"),
                             fmt(t["study_seconds"], ".0f"), t["fixed"]] for t in tvd])]))
    return sections


def published_sections(results: list[dict]) -> list:
    """The published PTB-XL benchmark, quoted beside ours."""
    sections = []
    ours = {r["model"]: r for r in results if r["variant"] == "fp32"}
    pub_rows = [[name, f"{auc:.3f} ± {unc:.3f}", fmt(ours[name]["splits"]["test"]["macro_auc"], ".4f")
                 if name in ours else "–"] for name, auc, unc in PUBLISHED]
    sections.append(("Published PTB-XL benchmark (quoted)", f"QUOTED, not measured here: {PUBLISHED_SOURCE}. Those "
                     "models were trained and tested on the FULL PTB-XL (folds 1–8 / 10); ours may come from a sample "
                     "and a CPU budget, so the columns are not directly comparable.",
                     [("table", ["model", "published test macro AUC (full PTB-XL)", "ours, fp32 test"], pub_rows)]))
    return sections


def provenance_sections(evaluation: dict) -> list:
    """Commit, date, commands and library versions."""
    sections = []
    versions = evaluation.get("versions") or library_versions()
    commands = ["make data PTBXL_DIR=…", "make train-all PROFILE=…", "make compress-all PROFILE=…", "make eval-all",
                "make report"]
    sections.append(("How this was made", f"Commit {git_commit()}, generated {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                     f"artifacts root {artifacts_root()}.",
                     [("table", ["step", "command"], [[str(i + 1), c] for i, c in enumerate(commands)]),
                      ("table", ["library", "version"], [[k, v] for k, v in versions.items()])]))
    return sections


def build(out: Path) -> tuple[Path, Path]:
    """report.html + report.md from eval-all's results.json and the training runs, one section after another."""
    evaluation = load_results()
    results = evaluation["results"]
    ci_info = next((r["splits"]["test"] for r in results if "ci" in r["splits"]["test"]), {})
    sections = (data_sections() + leaderboard_sections(evaluation) + figure_sections(results)
                + deploy_sections(results) + paired_sections(results, ci_info.get("ci_resamples") or 1000)
                + run_comparison_sections(run_table()) + published_sections(results) + provenance_sections(evaluation))
    return write_pages(out, sections, len(results))


def write_pages(out: Path, sections, n_artifacts: int) -> tuple[Path, Path]:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    title = "PTB-XL ECG diagnosis: models, compression and evaluation"
    md = [f"# {title}", "", f"{n_artifacts} artifacts evaluated.", ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{n_artifacts} artifacts evaluated.</p>"]
    for name, intro, items in sections:
        md += [f"## {name}", "", intro, ""]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(intro)}</p>"]
        for item in items:
            if item[0] == "table":
                md.append(md_table(item[1], item[2]))
                body.append(html_table(item[1], item[2]))
            else:
                _, fname, png = item
                write_bytes_atomic(figures / fname, png)
                md += [f"![{name}](figures/{fname})", ""]
                body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                            f'{base64.b64encode(png).decode()}"></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}th{background:#f3f3f3}td:nth-child(2){text-align:left}img{max-width:100%}"
             "h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    write_text_atomic(out / "report.html", page)
    write_text_atomic(out / "report.md", "\n".join(md))
    return out / "report.html", out / "report.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default artifacts/report)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        html_path, md_path = build(args.out or report_dir())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {html_path} and {md_path} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
