"""compression.benchmark's closing summary picks the deploy artifact as the report does (on validation only), and
its speed-ups hold when the host slows down during the measurement."""
import json
import os
import time

import torch

from compression.benchmark import evaluated_test_auc, paired_speedup, summary


def _row(variant, val, b32, b1, size, params=1000):
    return {"variant": variant, "val_auc": val, "b32_t1": b32, "b1_t1": b1, "bytes": size, "params": params,
            "x_fp32": {"b32_t1": b32 / 100, "b1_t1": b1 / 50}}  # the fp32 row's figures: 100 and 50


def test_summary_recommends_the_fastest_within_budget_and_flags_collapse():
    rows = [_row("fp32", 0.900, 100, 50, 4000),
            _row("static", 0.885, 900, 300, 1000),            # fastest, but loses 0.015: flagged, never chosen
            _row("openvino_fp32", 0.900, 200, 80, 4000),
            _row("openvino_int8", 0.897, 600, 150, 1000),     # within 0.005: recommended
            _row("structured", 0.8990, 150, 60, 2400, params=600),
            _row("structured_openvino_int8", 0.8955, 500, 140, 700)]  # loses 0.0045: smallest within budget
    lines = summary(rows)
    assert lines[0].startswith("- recommended") and "openvino_int8: b32/1t 6.00× fp32, b1/1t 3.00×" in lines[0]
    assert "structured_openvino_int8" in lines[1] and "5.71× smaller" in lines[1]
    assert "- openvino_int8 over openvino_fp32: b32/1t 3.00×, b1/1t 1.88×" in lines
    assert any(line.startswith("- structured fp32 alone: 40.0% fewer parameters, b32/1t 1.50×") for line in lines)
    assert lines[-1] == "- flagged (lose > 0.01 val AUC): static (-0.0150)"


def test_speedup_is_paired_so_a_slowing_host_does_not_bias_it():
    """Both models sleep; the host gets slower with every call (2 % each, ~2x over the measurement). The variant
    takes half the fp32 model's time at any moment, so its paired speed-up is 2 — timing the fp32 model first and
    the variant after, as separate figures, gives ~1.5."""
    calls = [0]

    def sleeper(ms):
        def forward(x):
            calls[0] += 1
            time.sleep(ms / 1000 * (1 + 0.02 * calls[0]))
        return forward

    _, speedup = paired_speedup(sleeper(4), sleeper(8), torch.zeros(1, 1))
    assert 1.8 < speedup < 2.2


def test_test_auc_is_eval_alls_only_for_the_folder_it_scored_and_not_after_a_remake(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTIFACTS", str(tmp_path))
    variant = tmp_path / "compressed" / "r" / "structured"
    elsewhere = tmp_path / "other" / "r" / "structured"
    for folder in (variant, elsewhere):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
        os.utime(folder / "metrics.json", (1000, 1000))
    result = tmp_path / "eval" / "r" / "structured" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"path": str(variant), "splits": {"test": {"macro_auc": 0.87}}}))
    assert evaluated_test_auc("r", "structured", variant) == 0.87
    assert evaluated_test_auc("r", "structured", elsewhere) is None  # same name, another folder
    os.utime(variant / "metrics.json", (time.time() + 60, time.time() + 60))  # made again after eval-all
    assert evaluated_test_auc("r", "structured", variant) is None
