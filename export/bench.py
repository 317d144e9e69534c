"""Benchmark the export: `python -m export.bench` (make bench-export) -> JSON.

Exports the run (default: the latest) into a scratch base under artifacts/bench/export/ (the
published artifacts/serving and artifacts/mobile are not touched), times each stage, and
checks the kit's targets against what the TFLite report measured:

- int8 file <= 1 MB; int8 accuracy within 0.1 points of the Keras model; int8 single-image
  latency (one thread) well under 50 us;
- export, all TFLite variants and their full evaluation together under 2 minutes.

Targets are reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common import configlib
from common.configlib import field

TARGETS = {"int8_max_bytes": 1_000_000, "int8_max_accuracy_drop": 0.001, "int8_max_p50_us": 50.0,
           "export_max_seconds": 120.0}


@dataclass(frozen=True)
class BenchExportConfig:
    """Time a full export of a run and check the size, accuracy and latency targets."""

    run: Path = field(Path("artifacts/runs/latest"), "run folder to export")
    work_dir: Path = field(Path("artifacts/bench/export"), "scratch base (emptied first)")
    out: Path = field(Path("artifacts/bench/export.json"), "JSON report")


def run_benchmark(config: BenchExportConfig) -> dict:
    from export.pipeline import ExportConfig, export_run

    shutil.rmtree(config.work_dir, ignore_errors=True)
    export_config = ExportConfig(
        run=config.run, serving_base=config.work_dir / "serving", tflite_builds=config.work_dir / "tflite",
        mobile_dir=config.work_dir / "mobile", min_accuracy=0.0,
    )
    summary = export_run(export_config)
    report = summary["tflite"]["report"]
    int8 = next(v for v in report["variants"] if v["name"] == "int8")
    drop = report["keras_accuracy"] - int8["accuracy"]
    result = {
        "run": summary["run"],
        "seconds": summary["seconds"],
        "keras_accuracy": report["keras_accuracy"],
        "variants": report["variants"],
        "recommended": report["recommended"],
        "saved_model": {k: summary["saved_model"][k] for k in ("test_accuracy", "parity")},
        "targets": {
            "int8 size <= 1 MB": int8["size_bytes"] <= TARGETS["int8_max_bytes"],
            "int8 accuracy within 0.1 points of Keras": drop <= TARGETS["int8_max_accuracy_drop"],
            "int8 latency p50 < 50 us": int8["latency_us_p50"] < TARGETS["int8_max_p50_us"],
            "export + TFLite + evaluation < 120 s": summary["seconds"]["total"] < TARGETS["export_max_seconds"],
        },
        "export_config": configlib.to_jsonable(dataclasses.asdict(export_config)),
    }
    configlib.write_json_atomic(config.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    config = configlib.parse_config(BenchExportConfig, argv, prog="python -m export.bench")
    result = run_benchmark(config)
    print(f"Targets: {result['targets']}\nReport: {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
