"""Diagnose WFDB records with a trained or compressed model:
`python -m eval.predict RECORD [RECORD …] --model ARTIFACT [--json]` (`make predict RECORDS=… MODEL=…`).

RECORD is a WFDB record path without extension (e.g. ptbxl/records100/00000/00001_lr). Any sampling rate
works: records are resampled to the model's rate, with a warning. ARTIFACT is a training run folder
(artifacts/runs/<run>) or a variant folder (artifacts/compressed/<run>/<method>). Prints per-class
probabilities and the labels at the per-class thresholds that `make eval-all` tuned on validation for this
very model and stored beside it (thresholds.json; 0.5, with a warning, when it has none yet). A bad record →
one line naming it; the other records are still diagnosed, and the exit status is 2 at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


from shared.variants import load_variant
from shared.raw_input import InputError, load_signal, normalization, normalize
from shared.io import first_line
from shared.labels import CLASSES
from shared.thresholds import DEFAULT_THRESHOLD, read_thresholds
from shared.inputs import InputAdapter

def thresholds_for(path: Path) -> tuple[np.ndarray, str]:
    """The thresholds stored beside this very model (shared/thresholds.py); 0.5 with a warning when it has none."""
    stored, source = read_thresholds(path)
    if stored is not None:
        return stored, f"tuned on validation: {source}"
    warnings.warn(f"{source}; using {DEFAULT_THRESHOLD} for every class", stacklevel=2)
    return np.full(len(CLASSES), DEFAULT_THRESHOLD), f"default {DEFAULT_THRESHOLD}, none tuned for this model yet"


class Predictor:
    """A loaded model plus everything needed to turn a record file into class probabilities."""

    def __init__(self, artifact: Path, compiled: bool = False):
        artifact = artifact.resolve()
        if not artifact.exists():
            raise InputError(f"{artifact}: no such model artifact")
        try:
            self.model, self.cfg, self.info = load_variant(artifact, compiled=compiled)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{artifact}: not a loadable model artifact ({first_line(e)})") from None
        self.fs = int(self.cfg["sampling_rate"])
        self.adapter = InputAdapter(self.cfg, self.fs)
        self.min_seconds = self.cfg["crop_seconds"]
        self.thresholds, self.threshold_source = thresholds_for(artifact)
        # Resolve the training normalization once (older runs read it from the cache manifest): fails here, not
        # per record, when it is missing.
        mean, std = normalization(self.cfg)
        self.cfg = {**self.cfg, "normalization": {"mean": mean.tolist(), "std": std.tolist()}}

    @torch.no_grad()
    def probabilities(self, record: str | Path) -> np.ndarray:
        signal = load_signal(record, self.fs, self.min_seconds)
        x = torch.from_numpy(normalize(signal[None], self.cfg))
        inputs, n_win = self.adapter.eval_inputs(x)
        return torch.sigmoid(self.model(inputs).float()).reshape(n_win, -1).mean(0).numpy()


def diagnose(predictor: Predictor, record: str) -> dict:
    t0 = time.perf_counter()
    probs = predictor.probabilities(record)
    ms = (time.perf_counter() - t0) * 1e3
    labels = [c for c, p, t in zip(CLASSES, probs, predictor.thresholds) if p >= t]
    if not labels:  # as in evaluation: the top class when none passes its threshold
        labels = [CLASSES[int(np.argmax(probs))]]
    return {"record": str(record), "probabilities": {c: round(float(p), 4) for c, p in zip(CLASSES, probs)},
            "labels": labels, "ms": round(ms, 2)}


def print_results(args, predictor: Predictor, rows: list[dict], errors: list[dict]) -> None:
    if args.json:
        print(json.dumps({"model": str(args.model), "thresholds": dict(zip(CLASSES, predictor.thresholds.tolist())),
                          "threshold_source": predictor.threshold_source, "predictions": rows, "errors": errors},
                         indent=2))
        return
    if rows:
        width = max(len(r["record"]) for r in rows)
        print(f"{'record':<{width}}  " + "  ".join(f"{c:>5}" for c in CLASSES) + "  labels")
        for r in rows:
            print(f"{r['record']:<{width}}  " + "  ".join(f"{r['probabilities'][c]:5.3f}" for c in CLASSES)
                  + "  " + ",".join(r["labels"]))
    print(f"thresholds ({predictor.threshold_source}): "
          + ", ".join(f"{c} {t:.3f}" for c, t in zip(CLASSES, predictor.thresholds)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", help="WFDB record paths without extension")
    ap.add_argument("--model", type=Path, required=True, help="run folder or compressed variant folder")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true",
                    help="run static/QAT int8 graphs as compiled int8 kernels (the package beside the artifact; "
                         "built once, ~1 min, when missing)")
    ap.add_argument("--timing", action="store_true", help="print per-record milliseconds (read + preprocess + model)")
    args = ap.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_dynamic.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            predictor = Predictor(args.model, compiled=args.compile)
    except InputError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    rows, errors = [], []
    for record in args.records:  # a bad record is reported and skipped; the good ones are still diagnosed
        try:
            rows.append(diagnose(predictor, record))
        except InputError as e:
            errors.append({"record": str(record), "error": first_line(e)})
            print(f"error: {first_line(e)}", file=sys.stderr)
    print_results(args, predictor, rows, errors)
    if args.timing and rows:
        times = [r["ms"] for r in rows]
        print(f"per record (read + preprocess + model): median {np.median(times):.1f} ms, max {max(times):.1f} ms "
              f"over {len(times)} records, {torch.get_num_threads()} thread(s)", file=sys.stderr)
    if errors:
        if len(args.records) > 1:
            print(f"error: {len(errors)} of {len(args.records)} records could not be read (above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
