"""Table of every training run (artifacts/runs/*/metrics.json): the representation bake-off.

Prints Markdown and writes artifacts/runs/summary.md + summary.json. Selection uses validation AUC;
test AUC is shown for the record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.io import write_json_atomic, write_text_atomic  # noqa: E402
from shared.paths import runs_dir  # noqa: E402


def collect(root: Path, profile: str) -> list[dict]:
    rows = []
    for path in sorted(root.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if m.get("profile") != profile:
            continue
        rows.append({"run": path.parent.name, "model": m["model"], "representation": m["representation"],
                     "profile": profile, "config": m.get("config", "default"), "val_auc": m["val"]["macro_auc"],
                     "test_auc": m["test"]["macro_auc"], "params": m["params"], "train_seconds": m["train_seconds"],
                     "epochs": m["epochs_run"], "best_epoch": m["best_epoch"], "data_share": m.get("data_time_share"),
                     "samples_per_s": m.get("train_samples_per_s")})
    return rows


def bakeoff(rows: list[dict]) -> list[dict]:
    """seed vs each other layout, per 2-D family (default configs only); `default` marks the layout the model's
    config trains by default, the one the mean is taken over (one row per family)."""
    from shared import config as config_mod

    out = []
    by = {(r["model"], r["representation"]): r for r in rows if r["config"] == "default"}
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


def markdown(rows: list[dict], bake: list[dict], profile: str) -> str:
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.summarize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--runs", type=Path, default=None, help="runs folder (default artifacts/runs)")
    args = ap.parse_args(argv)
    root = args.runs or runs_dir()
    rows = collect(root, args.profile)
    if not rows:
        print(f"error: no runs with profile {args.profile!r} under {root}", file=sys.stderr)
        return 2
    bake = bakeoff(rows)
    md = markdown(rows, bake, args.profile)
    write_text_atomic(root / f"summary-{args.profile}.md", md)
    write_json_atomic(root / f"summary-{args.profile}.json", {"runs": rows, "bakeoff": bake})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
