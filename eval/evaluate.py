"""Score every trained and compressed artifact the same way: `python -m eval.evaluate --all` (`make eval-all`).

For each artifact — a training run's fp32 weights, the same weights under bf16 autocast, and every
finished variant under artifacts/compressed/<run>/ (pruned, dynamic, static, QAT, ONNX) — it computes on
the cached validation and test folds: macro and per-class AUC, macro and per-class F1 at per-class
thresholds tuned on VALIDATION only, sample-wise exact-match accuracy, the benchmark's F-beta / G-beta
(beta = 2), with seeded 95 % bootstrap intervals on test; and on this CPU: file size, parameters and
non-zeros, batch-1 latency (median, p95), batch-32 throughput at 1 and 2 threads, and peak RSS.

Each artifact is scored in its own process (clean peak-RSS figures; one broken artifact cannot stop the
rest), `--jobs` of them at a time but timed one at a time (see the driver), and skipped when its result is
newer than the artifact. The bf16 twin of each run is scored only where the CPU computes bf16 natively
(`--bf16 auto`; `yes` scores it anyway): elsewhere autocast emulates bf16, ~10x slower than fp32, and it was 64 %
of eval-all's time on an AVX2-only host. Writes
  artifacts/eval/<run>/<variant>/result.json + predictions.npz
  artifacts/eval/results.json and results.csv (tidy: one row per artifact × split × metric × class)

`--data DIR --artifact PATH` scores an artifact on any folder in PTB-XL layout instead (records unseen by
training, another copy of PTB-XL, a single record), with the thresholds from its validation fold.
"""
from __future__ import annotations

import argparse
import re
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent

from shared.formats.compiled import COMPILED_METHODS
from shared.formats.sparse import load_sparse, nonzero_parameters
from shared.hardware import host_cpu, native_bf16
from shared.variants import artifact_bytes, load_variant
from shared import metrics as M
from shared import timing_gate
from shared.io import (first_line, library_versions, read_json, write_bytes_atomic, write_json_atomic,
                       write_text_atomic)
from shared.paths import compressed_dir, data_cache_dir, eval_dir, runs_dir
from shared.thresholds import read_thresholds, thresholds_path, write_thresholds
from shared.timing import time_forward
from shared.progress import meter
from shared.inputs import InputAdapter
from shared.prediction import autocast, predict_dataset

# Knobs
BOOTSTRAP = 1000            # resamples for the 95 % intervals
BOOTSTRAP_SEED = 0
CI_SPLITS = ("test",)       # splits that get intervals (validation only chooses thresholds)
LATENCY_RUNS = 50           # batch-1 forward passes timed per thread count, after WARMUP
THROUGHPUT_RUNS = 10        # batch-32 forward passes timed per thread count
WARMUP = 5
THREADS = (1, 2)
THROUGHPUT_BATCH = 32
MIN_RECORDS_FOR_CI = 20
COMPILED = COMPILED_METHODS

warnings.filterwarnings("ignore")


class Bf16Autocast(nn.Module):
    """The fp32 network run under CPU bf16 autocast — the 'bf16' artifact."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with autocast(torch.device("cpu"), True):
            return self.model(x).float()


# ------------------------------------------------------------------ what there is to score
def discover(root: Path | None = None, bf16: bool = True) -> list[dict]:
    """Every scoreable artifact: {id, run, variant, path, file}."""
    found = []
    for run in sorted((runs_dir(root)).glob("*/")):
        if (run / "best.safetensors").exists() and (run / "metrics.json").exists():
            for variant in ("fp32", "bf16") if bf16 else ("fp32",):
                found.append({"id": f"{run.name}/{variant}", "run": run.name, "variant": variant, "path": run,
                              "file": run / "best.safetensors"})
    for vjson in sorted(compressed_dir(root).glob("*/*/variant.json")):
        vdir = vjson.parent
        if not (vdir / "metrics.json").exists():
            continue  # unfinished variant
        info = read_json(vjson)
        found.append({"id": f"{vdir.parent.name}/{vdir.name}", "run": vdir.parent.name, "variant": vdir.name,
                      "path": vdir, "file": vdir / info["artifact"]})
    return found


def bf16_wanted(mode: str) -> tuple[bool, str | None]:
    """(score the bf16 twins?, why not — for the log and the report)."""
    if mode == "yes" or (mode == "auto" and native_bf16() is not False):
        return True, None
    if mode == "no":
        return False, "not scored (--bf16 no)"
    return False, ("not scored: this CPU has no native bf16 (AVX512_BF16 / AMX), so autocast would emulate it, "
                   "~10x slower than fp32 — a figure of the emulation, not of bf16; `make eval-all BF16=yes` "
                   "scores it anyway")


def result_dir(artifact_id: str, root: Path | None = None) -> Path:
    return eval_dir(root) / artifact_id


def is_fresh(item: dict) -> bool:
    """Scored after the model file last changed, and its thresholds written beside it."""
    result = result_dir(item["id"]) / "result.json"
    return (result.exists() and result.stat().st_mtime > item["file"].stat().st_mtime
            and thresholds_path(item["path"], item["variant"]).exists())


def load_artifact(path: Path, variant: str):
    model, cfg, info = load_variant(path, compiled=variant in COMPILED)
    if variant == "bf16":
        model = Bf16Autocast(model).eval()
        info = {**info, "method": "bf16"}
    return model, cfg, info


# ------------------------------------------------------------------ metrics
def split_metrics(y_true, y_prob, thresholds, classes, with_ci: bool, n_boot: int, seed: int) -> dict:
    point = M.point_metrics(y_true, y_prob, thresholds)
    out = {"records": int(len(y_true)), "positives": dict(zip(classes, y_true.sum(axis=0).astype(int).tolist()))}
    for k, v in point.items():
        out[k] = dict(zip(classes, _floats(v))) if k.endswith("_per_class") else _float(v)
    if with_ci and n_boot > 0 and len(y_true) >= MIN_RECORDS_FOR_CI:
        try:
            ci = M.bootstrap_ci(y_true, y_prob, thresholds, n_boot, seed)
        except ValueError as e:
            out["ci_note"] = str(e)
        else:
            out["ci"] = {k: ({c: [lo, hi] for c, lo, hi in zip(classes, _floats(v[0]), _floats(v[1]))}
                             if k.endswith("_per_class") else [_float(v[0]), _float(v[1])]) for k, v in ci.items()}
            out["ci_resamples"], out["ci_seed"] = n_boot, seed
    return out


def _float(v):
    v = float(v)
    return None if np.isnan(v) else v


def _floats(a):
    return [_float(v) for v in np.asarray(a, float)]


# ------------------------------------------------------------------ efficiency
def efficiency(model, example: torch.Tensor, latency_runs: int = LATENCY_RUNS) -> dict:
    out = {"latency_runs": latency_runs}
    for threads in THREADS:
        torch.set_num_threads(threads)
        lat = time_forward(model, example[:1], latency_runs, warmup=WARMUP)
        out[f"latency_ms_b1_t{threads}"] = float(np.median(lat) * 1e3)
        out[f"latency_p95_ms_b1_t{threads}"] = float(np.percentile(lat, 95) * 1e3)
        thr = time_forward(model, example[:THROUGHPUT_BATCH], THROUGHPUT_RUNS, warmup=2)
        out[f"throughput_b{THROUGHPUT_BATCH}_t{threads}"] = float(len(example[:THROUGHPUT_BATCH]) / np.median(thr))
    torch.set_num_threads(max(THREADS))
    return out


def parameter_counts(path: Path, variant: str, cfg: dict) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the network an artifact holds (int8 variants: of its fp32 parent)."""
    if variant == "prune":
        sd = load_sparse(path / read_json(path / "variant.json")["artifact"])
    elif variant.startswith("structured"):  # the narrower network (its int8 IR too)
        from shared.io import load_weights

        sd = load_weights(path.parent / "structured" / "structured.safetensors")
    else:
        run = Path(read_json(path / "variant.json")["run"]) if (path / "variant.json").exists() else path
        from shared.io import load_weights

        sd = load_weights(run / "best.safetensors")
    return nonzero_parameters(sd)


# ------------------------------------------------------------------ one artifact on the cache
def evaluate_artifact(item: dict, n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED, speed: bool = True,
                      data_dir: Path | None = None, latency_runs: int = LATENCY_RUNS,
                      gated: bool = False) -> dict:
    """Scores of one artifact on the cache's val and test folds (thresholds from val only), its size, and with
    `speed` its latency and throughput — `gated`: timed only once eval-all has paused the other workers."""
    from shared.cache import open_cache
    from shared.dataset import ECGDataset

    t0 = time.time()
    path, variant = Path(item["path"]), item["variant"]
    model, cfg, info = load_artifact(path, variant)
    cache = open_cache(data_dir or cfg.get("data") or data_cache_dir(cfg["sampling_rate"]))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    preds = {}
    for split in ("val", "test"):
        preds[split] = predict_dataset(model, ECGDataset(cache, split), adapter)
    thresholds = M.tune_thresholds(*reversed(preds["val"]))  # (labels, probs) of validation only
    classes = cache.classes
    result = {
        "artifact": item["id"], "run": item["run"], "variant": variant, "method": info.get("method", variant),
        "model": cfg["model"], "representation": cfg["representation"], "profile": cfg.get("profile"),
        "config": cfg.get("config", "default"), "path": str(path), "file": str(item["file"]),
        "bytes": artifact_bytes(item["file"]), "classes": classes,
        "thresholds": dict(zip(classes, map(float, thresholds))), "threshold_source": "validation fold, best F1 per class",
        "splits": {s: split_metrics(preds[s][1], preds[s][0], thresholds, classes, s in CI_SPLITS, n_boot, seed)
                   for s in preds},
    }
    result["params"], result["nonzero_params"] = parameter_counts(path, variant, cfg)
    if speed:
        x, _ = ECGDataset(cache, "val").__getitems__(range(THROUGHPUT_BATCH))
        example = adapter.eval_inputs(x)[0][:THROUGHPUT_BATCH]
        paused = timing_gate.wait_for_the_cpu() if gated else None
        result["efficiency"] = efficiency(model, example, latency_runs)
        if paused is not None:
            result["efficiency"]["other_evaluations_paused"] = paused
        result["efficiency"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["efficiency"]["cpu"] = host_cpu()
    result.update(seconds=round(time.time() - t0, 1), versions=library_versions(),
                  evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = result_dir(item["id"])
    out.mkdir(parents=True, exist_ok=True)
    _save_predictions(out / "predictions.npz", preds, cache, classes)
    write_thresholds(path, thresholds, f"validation fold {cache.manifest['folds']['val']} of {cache.root}", variant)
    write_json_atomic(out / "result.json", result)
    return result


def _save_predictions(path: Path, preds: dict, cache, classes) -> None:
    import io

    arrays = {"classes": np.asarray(classes)}
    for split, (probs, labels) in preds.items():
        arrays[f"{split}_probs"] = probs.astype(np.float32)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
        arrays[f"{split}_ecg_id"] = cache.meta["ecg_id"].to_numpy()[cache.split_indices(split)]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


# ------------------------------------------------------------------ one artifact on another folder
def evaluate_on_folder(item: dict, folder: Path, folds: list[int] | None, ids: list[int] | None,
                       n_boot: int, seed: int) -> dict:
    from shared.raw_input import ArrayDataset, load_ptbxl_folder, normalize, skipped_summary

    path, variant = Path(item["path"]), item["variant"]
    model, cfg, _ = load_artifact(path, variant)
    thresholds, threshold_source = _validation_thresholds(item, model, cfg)
    fs = cfg["sampling_rate"]
    x, y, ecg_ids, problems = load_ptbxl_folder(folder, fs, folds, ids)
    probs, labels = predict_dataset(model, ArrayDataset(normalize(x, cfg), y), InputAdapter(cfg, fs), chunk=64)
    from shared.labels import CLASSES

    result = {"artifact": item["id"], "data": str(folder.resolve()), "folds": folds, "ecg_ids": ecg_ids,
              "skipped": problems, "thresholds": dict(zip(CLASSES, map(float, thresholds))),
              "threshold_source": threshold_source,
              "metrics": split_metrics(labels, probs, thresholds, list(CLASSES), True, n_boot, seed),
              "probabilities": probs.round(5).tolist(), "versions": library_versions()}
    out = eval_dir() / "external" / folder.resolve().name / item["id"]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "result.json", result)
    if problems:  # else only the result file would tell that the metrics leave records out
        print(f"{skipped_summary(problems, len(ecg_ids))} (listed in {out / 'result.json'})")
    return result


def _validation_thresholds(item: dict, model, cfg) -> tuple[np.ndarray, str]:
    """The thresholds stored beside the artifact by eval-all; tuned on its validation fold now if it has none."""
    stored, why = read_thresholds(item["path"], item["variant"])
    if stored is not None:
        return stored, why
    from shared.cache import open_cache
    from shared.dataset import ECGDataset

    cache = open_cache(cfg.get("data") or data_cache_dir(cfg["sampling_rate"]))
    print(f"{why}; tuning them on the validation fold of {cache.root}", file=sys.stderr)
    probs, labels = predict_dataset(model, ECGDataset(cache, "val"), InputAdapter(cfg, cache.sampling_rate))
    return M.tune_thresholds(labels, probs), f"tuned now on the validation fold of {cache.root}"


# ------------------------------------------------------------------ tables
def tidy_rows(result: dict) -> list[dict]:
    base = {k: result[k] for k in ("artifact", "run", "variant", "model", "representation", "profile")}
    rows = []
    for split, m in result["splits"].items():
        ci = m.get("ci", {})
        for key, value in m.items():
            if key in ("ci", "ci_note", "ci_resamples", "ci_seed", "positives", "records"):
                continue
            if isinstance(value, dict):
                for cls, v in value.items():
                    lo, hi = ci.get(key, {}).get(cls, [None, None])
                    rows.append({**base, "split": split, "metric": key.replace("_per_class", ""), "class": cls,
                                 "value": v, "ci_low": lo, "ci_high": hi})
            else:
                lo, hi = ci.get(key, [None, None])
                rows.append({**base, "split": split, "metric": key, "class": "", "value": value, "ci_low": lo,
                             "ci_high": hi})
    cpu = {"bytes": result["bytes"], "params": result["params"], "nonzero_params": result["nonzero_params"],
           **{k: v for k, v in result.get("efficiency", {}).items() if k != "cpu"}}
    rows += [{**base, "split": "cpu", "metric": k, "class": "", "value": v, "ci_low": None, "ci_high": None}
             for k, v in cpu.items()]
    return rows


def write_tables(results: list[dict], bf16_skipped: str | None = None) -> tuple[Path, Path]:
    import csv
    import io

    root = eval_dir()
    write_json_atomic(root / "results.json", {"results": results, "versions": library_versions(),
                                              **({"bf16_skipped": bf16_skipped} if bf16_skipped else {})})
    buf = io.StringIO()
    fields = ["artifact", "run", "variant", "model", "representation", "profile", "split", "metric", "class",
              "value", "ci_low", "ci_high"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerows(tidy_rows(r))
    write_text_atomic(root / "results.csv", buf.getvalue())
    return root / "results.json", root / "results.csv"


def collect() -> list[dict]:
    out = []
    for item in discover():
        path = result_dir(item["id"]) / "result.json"
        if path.exists():
            out.append(read_json(path))
    return out


# ------------------------------------------------------------------ driver
def _worker_command(item: dict, n_boot: int, speed: bool, latency_runs: int) -> list[str]:
    args = [sys.executable, "-m", "eval.evaluate", "--artifact", str(item["path"]), "--bootstrap", str(n_boot),
            "--latency-runs", str(latency_runs), "--timing-gate"]
    args += [] if speed else ["--no-speed"]
    if item["variant"] in ("fp32", "bf16"):  # a training run folder scored two ways
        args += ["--variant", item["variant"]]
    return args


def evaluate_all(force: bool, n_boot: int, speed: bool, only: str | None = None,
                 latency_runs: int = LATENCY_RUNS, jobs: int = 1, bf16: str = "auto") -> int:
    """Score every artifact that has no up-to-date result, `jobs` processes at a time (shared/timing_gate.py
    times them one by one); the tables are rewritten after each artifact, so an interrupted run feeds the report."""
    import os

    with_bf16, bf16_skipped = bf16_wanted(bf16)
    if bf16_skipped:
        print(f"bf16 twins of the runs {bf16_skipped}")
    items = [i for i in discover(bf16=with_bf16) if not only or only in i["id"]]
    if not items:
        print("error: no artifacts to evaluate under artifacts/runs or artifacts/compressed; run `make train-all`",
              file=sys.stderr)
        return 2
    todo = [i for i in items if force or not is_fresh(i)]
    jobs = max(1, min(jobs, len(todo))) if timing_gate.can_pause() else 1
    print(f"{len(items)} artifacts, {len(items) - len(todo)} up to date, {len(todo)} to evaluate"
          + (f", {jobs} at a time" if jobs > 1 else ""))
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    failures = []
    bar = meter(len(todo), "eval-all", "artifact")

    def done(worker, rc):
        item = worker.item
        if rc != 0:
            log = result_dir(item["id"]) / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(log, worker.error_text())
            failures.append(f"{item['id']}: {exception_line(worker.error_text())} (full log: {log})")
            bar.write(f"error: {failures[-1]}", file=sys.stderr)
        else:
            bar.write(worker.lines[-1] if worker.lines else item["id"])
            write_tables(collect(), bf16_skipped)
        bar.update(1)

    timing_gate.run_gated(todo, lambda item: _worker_command(item, n_boot, speed, latency_runs), jobs, REPO, env,
                          done)
    bar.close()
    json_path, csv_path = write_tables(collect(), bf16_skipped)
    print(f"wrote {json_path} and {csv_path}")
    return 1 if failures else 0


def exception_line(stderr: str) -> str:
    """The line of a traceback that names the exception (the last line is often a hint, not the error)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(error: |[\w.]*(Error|Exception|Failed)\w*: )", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no message)"


def resolve_item(path: Path, variant: str | None) -> dict:
    path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such artifact folder")
    if (path / "variant.json").exists():
        info = read_json(path / "variant.json")
        return {"id": f"{path.parent.name}/{path.name}", "run": path.parent.name, "variant": path.name,
                "path": path, "file": path / info["artifact"]}
    if (path / "best.safetensors").exists():
        variant = variant or "fp32"
        if variant not in ("fp32", "bf16"):
            raise ValueError(f"{path}: a training run is scored as fp32 or bf16, not {variant!r}")
        return {"id": f"{path.name}/{variant}", "run": path.name, "variant": variant, "path": path,
                "file": path / "best.safetensors"}
    raise FileNotFoundError(f"{path}: neither a training run (best.safetensors) nor a variant (variant.json)")


def print_summary(result: dict) -> None:
    m = result["splits"]["test"] if "splits" in result else result["metrics"]
    ci = m.get("ci", {}).get("macro_auc")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    auc = m["macro_auc"]
    line = (f"{result['artifact']}: macro AUC {auc:.4f}{ci_text}" if auc is not None else
            f"{result['artifact']}: macro AUC undefined (a class lacks positives or negatives)")
    line += f", macro F1 {m['macro_f1']:.3f}, F2 {m['f_beta2']:.3f}, G2 {m['g_beta2']:.3f}, records {m['records']}"
    if "efficiency" in result:
        e = result["efficiency"]
        line += f", {result['bytes'] / 1e6:.2f} MB, b1 {e['latency_ms_b1_t1']:.1f} ms (1 thread)"
    print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every artifact, each in its own process (make eval-all)")
    ap.add_argument("--artifact", type=Path, help="a run folder (artifacts/runs/<run>) or a variant folder "
                                                  "(artifacts/compressed/<run>/<method>)")
    ap.add_argument("--variant", choices=("fp32", "bf16"), default=None, help="for a run folder: fp32 (default) or bf16")
    ap.add_argument("--data", type=Path, default=None, help="score on this PTB-XL-layout folder instead of the cache")
    ap.add_argument("--folds", default=None, help="with --data: strat_folds to use, e.g. 10 or 1-8")
    ap.add_argument("--ids", default=None, help="with --data: comma list of ecg_ids")
    ap.add_argument("--only", default=None, help="with --all: only artifacts whose id contains this text")
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="resamples for 95%% intervals (default %(default)s)")
    ap.add_argument("--seed", type=int, default=BOOTSTRAP_SEED)
    ap.add_argument("--no-speed", action="store_true", help="skip latency/throughput measurements")
    ap.add_argument("--latency-runs", type=int, default=LATENCY_RUNS, help="timed batch-1 passes (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="re-evaluate artifacts whose results are up to date")
    ap.add_argument("--jobs", type=int, default=1, help="with --all: artifacts scored at once, each on cores/JOBS "
                                                        "threads; timing still runs one at a time (default 1)")
    ap.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                    help="with --all: score each run's bf16-autocast twin — auto: only where the CPU computes bf16 "
                         "natively (default)")
    ap.add_argument("--timing-gate", action="store_true", help=argparse.SUPPRESS)  # eval-all's worker protocol
    args = ap.parse_args(argv)
    try:
        if args.all and args.data is None:
            return evaluate_all(args.force, args.bootstrap, not args.no_speed, args.only, args.latency_runs, args.jobs,
                                args.bf16)
        if args.artifact is None:
            ap.error("give --all or --artifact PATH")
        item = resolve_item(args.artifact, args.variant)
        if args.data is not None:
            from shared.config import parse_ranges

            result = evaluate_on_folder(item, args.data, parse_ranges(args.folds) if args.folds else None,
                                        parse_ranges(args.ids) if args.ids else None, args.bootstrap, args.seed)
            result["artifact"] = f"{item['id']} on {args.data}"
        else:
            result = evaluate_artifact(item, args.bootstrap, args.seed, not args.no_speed,
                                       latency_runs=args.latency_runs, gated=args.timing_gate)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
