"""`python -m export.bench_mobile` on the session's exported fixture model (small settings).

Checks the benchmark measures what it says; its numbers are never asserted as targets, except
that the mobile runtime reproduces the export report's accuracy exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import bench_mobile as bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_writes_accuracy_photos_and_latency(exported, fixture_data_dir, tmp_path):
    out = tmp_path / "bench" / "mobile.json"
    status = bench.main([
        "--models-dir", str(exported.mobile_dir), "--data-dir", str(fixture_data_dir),
        "--photos", "40", "--latency-runs", "50",
        "--tflite-runtime-python", str(REPO / ".venv-tflite-runtime" / "bin" / "python"),
        "--out", str(out),
    ])
    assert status == 0
    result = json.loads(out.read_text())
    assert (tmp_path / "bench" / "mobile.config.json").is_file()
    names = {v["name"] for v in result["variants"]}
    assert {"float32", "float16", "dynamic", "int8", "mnist"} <= names
    for variant in result["variants"]:
        assert variant["matches_export_report"], variant
    recommended = next(v for v in result["variants"] if v["name"] == "mnist")
    for runtime, run in result["cli_test_set"].items():
        assert run["failed"] == 0 and run["accuracy"] == pytest.approx(recommended["accuracy"]), runtime
    photos = result["photos"]
    assert photos["count"] == 40 and set(photos["variants"]["mnist"]) >= {
        "clean_accuracy", "preprocessed_accuracy", "no_preprocess_accuracy", "gap_points"
    }
    for runtime, latency in result["cli_latency"].items():
        assert latency["runs"] == 50 and 0 < latency["latency_us_p50"] <= latency["latency_us_p99"], runtime
