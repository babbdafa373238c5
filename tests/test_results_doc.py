"""make results-doc: the README's results table comes from a results.json, not from typing."""
from __future__ import annotations

import json

from conftest import run_module


def _r(run, variant, val, test, speed, latency, size):
    return {"run": run, "artifact": f"{run}/{variant}", "variant": variant, "bytes": size,
            "evaluated_at": "2026-11-30T12:00:00",
            "splits": {"val": {"macro_auc": val}, "test": {"macro_auc": test}},
            "efficiency": {"throughput_b32_t1": speed, "latency_ms_b1_t1": latency, "cpu": "Test CPU (2 cores)"}}


def test_the_table_is_written_between_the_markers_from_results_json(tmp_path):
    results = [_r("vit-leads-cpu", "fp32", 0.920, 0.870, 100.0, 10.0, 8e6),
               _r("vit-leads-cpu", "openvino_int8", 0.918, 0.868, 450.0, 3.0, 2e6),
               _r("vit-leads-cpu", "static", 0.880, 0.850, 900.0, 2.0, 2e6)]  # faster, but loses 0.04: not chosen
    (tmp_path / "results.json").write_text(json.dumps({"results": results}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold table\n<!-- results:end -->\nrest\n")
    run_module("eval.results_doc", "--results", tmp_path / "results.json", "--readme", readme, check=True)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    row = next(line for line in text.splitlines() if line.startswith("| vit-leads-cpu"))
    assert "openvino_int8" in row and "| 4.0× |" in row and "| 4.5× |" in row and "3.3×" in row
    assert "Test CPU" in text and "2026-11-30" in text


def test_a_readme_without_markers_is_one_line(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"results": [_r("a", "fp32", 0.9, 0.8, 1, 1, 1)]}))
    (tmp_path / "README.md").write_text("no markers\n")
    r = run_module("eval.results_doc", "--results", tmp_path / "results.json", "--readme", tmp_path / "README.md")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "markers" in r.stderr
    assert (tmp_path / "README.md").read_text() == "no markers\n"
