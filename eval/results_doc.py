"""`make results-doc`: the README's reference-results table, generated from an eval-all results.json.

The README never carries typed-in scores: this writes, between its `<!-- results:begin -->` and
`<!-- results:end -->` markers, one table per run (fp32 and its recommended deploy artifact: val and
test macro AUC, size, batch-32 and batch-1 speed-up against the run's fp32 PyTorch model on one thread)
with the host, the date of the evaluation and the command that reproduces it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.io import first_line, read_json, write_text_atomic
from shared.paths import eval_dir
from shared.results import DEPLOY_AUC_BUDGET, deploy_choice

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SPEED, LATENCY = "throughput_b32_t1", "latency_ms_b1_t1"


def run_rows(results: list[dict]) -> list[str]:
    rows = []
    for run in sorted({r["run"] for r in results}):
        c = deploy_choice([r for r in results if r["run"] == run and r["variant"] != "bf16"], SPEED)
        fp32, best = c["fp32"], c["recommended"]
        if fp32 is None:
            continue
        line = f"| {run} | {fp32['splits']['val']['macro_auc']:.4f} | {fp32['splits']['test']['macro_auc']:.4f} | "
        if best is None or not fp32.get("efficiency"):
            rows.append(line + "— | | | | | |")
            continue
        e, e0 = best["efficiency"], fp32["efficiency"]
        rows.append(line + f"{best['variant']} | {best['splits']['val']['macro_auc']:.4f} | "
                    f"{best['splits']['test']['macro_auc']:.4f} | {fp32['bytes'] / best['bytes']:.1f}× | "
                    f"{e[SPEED] / e0[SPEED]:.1f}× | {e0[LATENCY] / e[LATENCY]:.1f}× |")
    return rows


def block(evaluation: dict, source: Path) -> str:
    results = evaluation["results"]
    cpu = next((r["efficiency"]["cpu"] for r in results if r.get("efficiency", {}).get("cpu")), "unknown CPU")
    when = max((r.get("evaluated_at", "") for r in results), default="")[:10]
    head = ["| run | fp32 val AUC | fp32 test AUC | deploy artifact | its val AUC | its test AUC | × smaller | "
            "b32 × fp32 | b1 × fp32 |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    note = (f"Evaluated {when} on {cpu}, from `{source}` (`make results-doc RESULTS={source}`). Deploy artifact: "
            f"the fastest at batch 32 on one thread within {DEPLOY_AUC_BUDGET} validation macro AUC of the run's "
            "fp32 model (validation decides; test shown after). Speed-ups against that fp32 PyTorch model, one "
            "thread, same eval-all.")
    return "\n".join([BEGIN, note, "", *head, *run_rows(results), END])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.results_doc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=None, help="an eval-all results.json "
                                                                "(default $ARTIFACTS/eval/results.json)")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="file with the markers (default README)")
    ap.add_argument("--print", action="store_true", help="print the block instead of writing it")
    args = ap.parse_args(argv)
    source = (args.results or eval_dir() / "results.json").resolve()
    try:
        evaluation = read_json(source)
        if not evaluation.get("results"):
            raise ValueError(f"{source}: holds no results; run `make eval-all`")
        text = block(evaluation, source)
        if args.print:
            print(text)
            return 0
        readme = args.readme.read_text(encoding="utf-8")
        if BEGIN not in readme or END not in readme:
            raise ValueError(f"{args.readme}: no {BEGIN} … {END} markers to write between")
        start, end = readme.index(BEGIN), readme.index(END) + len(END)
        write_text_atomic(args.readme, readme[:start] + text + readme[end:])
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"{args.readme}: results table written from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
