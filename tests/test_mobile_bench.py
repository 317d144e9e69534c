"""`python -m pi.bench_mobile` on the session's exported fixture model (small settings).

Checks the benchmark measures what it says; its numbers are never asserted as targets, except
that the mobile runtime reproduces the export report's accuracy exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi import bench_mobile as bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_writes_accuracy_pictures_parity_and_latency(exported, fixture_data_dir, tmp_path):
    out = tmp_path / "bench" / "mobile.json"
    status = bench.main([
        "--models-dir", str(exported.mobile_dir), "--data-dir", str(fixture_data_dir),
        "--pictures", "12", "--latency-runs", "50",
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
    pictures = result["pictures"]
    assert pictures["count_per_kind"] == 12
    assert set(pictures["kinds"]) == {"photo", "canvas", "chalk", "tight", "thinpen", "mnist"}
    for kind, entry in pictures["kinds"].items():
        assert entry["count"] == 12 and entry["refused"] == 0 and not entry["cli_refused"], kind
        assert set(entry["variants"]["mnist"]) >= {"clean_accuracy", "preprocessed_accuracy",
                                                   "no_preprocess_accuracy", "gap_points"}
        # The CLI is the in-process preprocessing plus the same model: the same accuracy.
        assert entry["cli_accuracy"] == pytest.approx(entry["variants"]["mnist"]["preprocessed_accuracy"]), kind
        parity = entry["parity"]  # the graph of serving_bytes against the Pi's code
        assert parity["compared"] == 12 and parity["refused_by_one_only"] == 0, kind
        assert parity["digits_agree"] == 1.0 and parity["mean_abs_diff"] <= 1.0, kind
    mnist = pictures["kinds"]["mnist"]["variants"]["mnist"]
    assert mnist["preprocessed_accuracy"] == mnist["clean_accuracy"]  # passed through unchanged
    assert result["photo_1mp"]["preprocess_ms_p50"] > 0
    assert result["cases"]["count"] == 20 and set(result["cases"]["files"]) == {p.name for p in (REPO / "tests" / "data" / "pictures").iterdir()}
    for runtime, latency in result["cli_latency"].items():
        assert latency["runs"] == 50 and 0 < latency["latency_us_p50"] <= latency["latency_us_p99"], runtime
