"""Table of every training run (artifacts/runs/*/metrics.json): the representation bake-off, the spread
over seeds, and each run against a reference model on the same test records.

Prints Markdown and writes artifacts/runs/summary-<profile>.md + .json. Selection uses validation AUC;
test AUC is shown for the record. With 200-odd test records one run's test AUC moves by a few hundredths
with the seed alone: `make seeds-<model>` adds seeds (mean ± sd here), and the paired bootstrap against the
reference (resnet1d_wang by default, same seed) says whether a difference is more than the test fold's luck.
A distilled run (`-kd`, trained with a teacher) is shown against its plain twin (same model, layout, config and
seed), paired on the same test records.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


from shared.io import write_json_atomic, write_text_atomic
from shared.paths import runs_dir
from shared.results import paired_test_difference, run_seed, run_teacher, test_predictions


def collect(root: Path, profile: str) -> list[dict]:
    rows = []
    for path in sorted(root.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if m.get("profile") != profile:
            continue
        rows.append({"run": path.parent.name, "model": m["model"], "representation": m["representation"],
                     "profile": profile, "config": m.get("config", "default"), "seed": run_seed(path.parent, m),
                     "val_auc": m["val"]["macro_auc"],
                     "test_auc": m["test"]["macro_auc"], "params": m["params"], "train_seconds": m["train_seconds"],
                     "epochs": m["epochs_run"], "best_epoch": m["best_epoch"], "data_share": m.get("data_time_share"),
                     "samples_per_s": m.get("train_samples_per_s"), "teacher": distillation(path.parent, m)})
    return rows


def distillation(run_dir: Path, metrics: dict) -> str | None:
    """The teacher, with the distillation settings that differ from the defaults ("resnet1d_wang, kd_mode=hard"),
    so that runs distilled differently are not averaged together; None for a run trained on labels alone."""
    from shared.config import DEFAULTS
    from shared.runs import read_config

    teacher = run_teacher(run_dir, metrics)
    if not teacher:
        return None
    try:
        cfg = read_config(run_dir)
    except (OSError, ValueError):  # no readable config.json: the defaults
        cfg = DEFAULTS
    changed = [f"{k}={cfg[k]}" for k in ("kd_mode", "kd_alpha", "kd_temperature") if cfg[k] != DEFAULTS[k]]
    return ", ".join([teacher, *changed])


def bakeoff(rows: list[dict]) -> list[dict]:
    """seed vs each other layout, per 2-D family (default configs, seed 0 — what train-all trains); `default`
    marks the layout the model's config trains by default, the one the mean is taken over (one row per family)."""
    from shared import config as config_mod

    out = []
    by = {(r["model"], r["representation"]): r for r in rows
          if r["config"] == "default" and r["seed"] == 0 and not r["teacher"]}
    for model in sorted({r["model"] for r in rows}):
        seed = by.get((model, "seed"))
        other = [r for (m, rep), r in by.items() if m == model and rep not in ("seed",)]
        for r in other:
            if seed:
                default = config_mod.resolve(model, r["profile"])["representation"] == r["representation"]
                out.append({"model": model, "seed_val": seed["val_auc"], "seed_test": seed["test_auc"],
                            "default": default,
                            "representation": r["representation"], "val": r["val_auc"], "test": r["test_auc"],
                            "delta_val": r["val_auc"] - seed["val_auc"], "delta_test": r["test_auc"] - seed["test_auc"]})
    return out


def seed_spread(rows: list[dict]) -> list[dict]:
    """mean ± sd of val and test AUC over the seeds of each (model, layout, config, teacher) that has two or more."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["representation"], r["config"], r["teacher"] or ""), []).append(r)
    out = []
    for (model, rep, config, teacher), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        val, test = [r["val_auc"] for r in rs], [r["test_auc"] for r in rs]
        out.append({"model": model, "representation": rep, "config": config + (f" + kd({teacher})" if teacher else ""),
                    "seeds": sorted(r["seed"] for r in rs),
                    "val_mean": statistics.mean(val), "val_sd": statistics.stdev(val),
                    "test_mean": statistics.mean(test), "test_sd": statistics.stdev(test),
                    "test_min": min(test), "test_max": max(test)})
    return out


def against_reference(rows: list[dict], root: Path, reference: str, n_resamples: int = 1000) -> list[dict]:
    """Each run's test macro AUC minus the reference model's (its default layout and config, the same seed),
    on the same records, with a paired bootstrap interval (shared.metrics.paired_auc_difference)."""
    from shared import config as config_mod

    if not rows:
        return []
    ref_layout = config_mod.resolve(reference, rows[0]["profile"])["representation"]  # rows share one profile
    ref_by_seed = {r["seed"]: r for r in rows if r["model"] == reference and r["config"] == "default"
                   and r["representation"] == ref_layout and not r["teacher"]}
    ref_preds = {seed: test_predictions(root / r["run"] / "predictions.npz") for seed, r in ref_by_seed.items()}
    out = []
    for r in sorted(rows, key=lambda r: (r["model"], r["representation"], r["config"], r["seed"])):
        ref = ref_by_seed.get(r["seed"])
        if ref is None or r["model"] == reference:
            continue
        d = paired_test_difference(test_predictions(root / r["run"] / "predictions.npz"), ref_preds[r["seed"]],
                                   n_resamples)
        if d is None:
            continue  # no predictions.npz (older runs), or not the same test records
        out.append({"run": r["run"], "reference": ref["run"], "seed": r["seed"], **d})
    return out


def distilled_vs_plain(rows: list[dict], root: Path, n_resamples: int = 1000) -> list[dict]:
    """Each distilled run against its plain twin (same model, layout, config, seed): validation AUC difference, and
    the test macro AUC difference with a paired bootstrap interval when both predicted the same test records."""
    plain = {(r["model"], r["representation"], r["config"], r["seed"]): r for r in rows if not r["teacher"]}
    out = []
    for r in sorted((r for r in rows if r["teacher"]), key=lambda r: (r["model"], r["representation"], r["seed"])):
        twin = plain.get((r["model"], r["representation"], r["config"], r["seed"]))
        if twin is None:
            continue
        d = paired_test_difference(*(test_predictions(root / x["run"] / "predictions.npz") for x in (r, twin)),
                                   n_resamples)
        out.append({"run": r["run"], "plain": twin["run"], "teacher": r["teacher"], "seed": r["seed"],
                    "val_kd": r["val_auc"], "val_plain": twin["val_auc"], "delta_val": r["val_auc"] - twin["val_auc"],
                    "paired": d})
    return out


def distilled_lines(kd: list[dict]) -> list[str]:
    lines = ["", "### Distilled (`-kd`) vs plain: same model, layout, config and seed (test: paired bootstrap, 95 %)",
             "", "| run | teacher | plain run | val kd | val plain | Δ val | test kd | test plain | Δ test | "
             "95 % interval |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for k in kd:
        p = k["paired"]
        test = (f"{p['a']:.4f} | {p['b']:.4f} | {p['delta']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}]" if p
                else "– | – | – | not the same records")
        lines.append(f"| {k['run']} | {k['teacher']} | {k['plain']} | {k['val_kd']:.4f} | {k['val_plain']:.4f} | "
                     f"{k['delta_val']:+.4f} | {test} |")
    return lines


def markdown(rows: list[dict], bake: list[dict], profile: str, spread: list[dict] = (),
             paired: list[dict] = (), reference: str = "", kd: list[dict] = ()) -> str:
    lines = [f"### Training runs (profile `{profile}`)", "",
             "| run | params | epochs (best) | train s | samples/s | data share | val macro AUC | test macro AUC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["val_auc"]):
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f} M | {r['epochs']} ({r['best_epoch']}) | "
                     f"{r['train_seconds']:.0f} | {r['samples_per_s']} | {r['data_share']} | {r['val_auc']:.4f} | "
                     f"{r['test_auc']:.4f} |")
    if bake:
        lines += ["", "### Representation bake-off: `seed` (182×256 resize) vs signal-preserving layout", "",
                  "| model | seed val | seed test | layout | val | test | Δ val | Δ test |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for b in bake:
            layout = b["representation"] + ("" if b["default"] else " (not default)")
            lines.append(f"| {b['model']} | {b['seed_val']:.4f} | {b['seed_test']:.4f} | {layout} | "
                         f"{b['val']:.4f} | {b['test']:.4f} | {b['delta_val']:+.4f} | {b['delta_test']:+.4f} |")
        defaults = [b for b in bake if b["default"]]
        if defaults:
            mean_dv = sum(b["delta_val"] for b in defaults) / len(defaults)
            mean_dt = sum(b["delta_test"] for b in defaults) / len(defaults)
            lines.append(f"| **mean over the {len(defaults)} default layouts** | | | | | | **{mean_dv:+.4f}** | "
                         f"**{mean_dt:+.4f}** |")
    if spread:
        lines += ["", "### Spread over seeds (sample sd)", "",
                  "| model | layout | config | seeds | val macro AUC | test macro AUC | test min–max |",
                  "|---|---|---|---|---:|---:|---:|"]
        for g in spread:
            lines.append(f"| {g['model']} | {g['representation']} | {g['config']} | {', '.join(map(str, g['seeds']))} | "
                         f"{g['val_mean']:.4f} ± {g['val_sd']:.4f} | {g['test_mean']:.4f} ± {g['test_sd']:.4f} | "
                         f"{g['test_min']:.4f}–{g['test_max']:.4f} |")
    if paired:
        lines += ["", f"### Test macro AUC minus {reference}'s on the same records (paired bootstrap, 95 %)", "",
                  "| run | reference run | run AUC | reference AUC | Δ | 95 % interval | share of resamples run > ref |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for p in paired:
            lines.append(f"| {p['run']} | {p['reference']} | {p['a']:.4f} | {p['b']:.4f} | {p['delta']:+.4f} | "
                         f"[{p['low']:+.4f}, {p['high']:+.4f}] | {p['p_a_better']:.2f} |")
    if kd:
        lines += distilled_lines(kd)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.summarize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--runs", type=Path, default=None, help="runs folder (default artifacts/runs)")
    ap.add_argument("--reference", default="resnet1d_wang",
                    help="model every run is compared with on the test records ('none': no comparison)")
    ap.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    args = ap.parse_args(argv)
    root = args.runs or runs_dir()
    rows = collect(root, args.profile)
    if not rows:
        print(f"error: no runs with profile {args.profile!r} under {root}", file=sys.stderr)
        return 2
    bake, spread = bakeoff(rows), seed_spread(rows)
    paired = [] if args.reference == "none" else against_reference(rows, root, args.reference, args.resamples)
    kd = distilled_vs_plain(rows, root, args.resamples)
    md = markdown(rows, bake, args.profile, spread, paired, args.reference, kd)
    write_text_atomic(root / f"summary-{args.profile}.md", md)
    write_json_atomic(root / f"summary-{args.profile}.json", {"runs": rows, "bakeoff": bake, "seeds": spread,
                                                              "reference": args.reference, "paired": paired,
                                                              "distilled": kd})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
