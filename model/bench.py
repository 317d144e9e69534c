"""Benchmark training: `python -m model.bench [flags]` (make bench-train) -> JSON.

    make bench-train DATA_DIR=../shared/datasets/mnist ARGS="--seeds 1,2,3"

Measures, on this machine:
- the tf.data training pipeline alone (no model attached): images/s per epoch;
- XLA and steps_per_execution: steps/s of the default model for each combination, so the
  `--jit-compile auto` choice rests on a measurement;
- full default trainings, one per seed: per-epoch seconds, samples/s, train_seconds and test
  accuracy, with the median over seeds checked against the targets (test accuracy >= 98.7%,
  train_seconds <= 300).

Writes `artifacts/bench/train.json` (and the runs under artifacts/bench/runs/). Targets are
reported, never asserted: a slow machine gives an honest "false", not a failure.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import configlib
from model.configlib import ConfigError, field

TARGET_ACCURACY = 0.987
TARGET_TRAIN_SECONDS = 300.0


@dataclass(frozen=True)
class BenchTrainConfig:
    """Benchmark the training pipeline, XLA settings and full default trainings."""

    data_dir: Path | None = field(None, "IDX folder (default: TFDS 'mnist'); use the full MNIST")
    seeds: tuple[int, ...] = field((1,), "seeds of the full trainings, comma-separated (e.g. 1,2,3)")
    epochs: int | None = field(None, "override the default epochs (default: the training default)")
    validation_size: int | None = field(None, "override the validation size (small data sets)")
    pipeline_epochs: int = field(3, "epochs over the tf.data pipeline alone")
    xla_steps: int = field(200, "timed steps per XLA/steps_per_execution setting (0 skips)")
    out: Path = field(Path("artifacts/bench/train.json"), "JSON report")
    runs_dir: Path = field(Path("artifacts/bench/runs"), "where the benchmark's runs go")
    require_gpu: bool = field(False, "exit with status 3 when no GPU is usable")

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if self.pipeline_epochs < 1 or self.xla_steps < 0:
            raise ConfigError("--pipeline-epochs must be >= 1 and --xla-steps >= 0")


def pipeline_throughput(train_split, config, epochs: int) -> list[float]:
    """Images/s of the training pipeline (cache, shuffle, batch, augment, prefetch) alone."""
    from model import data

    ds = data.make_train_dataset(
        train_split, config.batch_size, config.seed, augment=config.augment,
        max_rotation_deg=config.max_rotation, max_shift_px=config.max_shift, scale_range=config.max_scale,
    )
    rates = []
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for images, _labels in ds:
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - start))
    return rates


def xla_comparison(train_split, config, steps: int) -> list[dict[str, Any]]:
    """Steps/s of the default model with XLA off/on and steps_per_execution 1/default."""
    import keras

    from model import data
    from model.train import build_compiled_model

    ds = data.make_train_dataset(train_split, config.batch_size, config.seed, augment=config.augment,
                                 max_rotation_deg=config.max_rotation, max_shift_px=config.max_shift,
                                 scale_range=config.max_scale).repeat()
    results = []
    for use_xla in (False, True):
        for spe in sorted({1, config.steps_per_execution}):
            keras.utils.set_random_seed(config.seed)
            model = build_compiled_model(config, steps_per_epoch=steps, use_xla=use_xla, steps_per_execution=spe)
            warm = max(spe, 32)
            model.fit(ds, steps_per_epoch=warm, epochs=1, verbose=0)  # compile outside the timing
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=(steps // spe) * spe, epochs=1, verbose=0)
            seconds = time.perf_counter() - start
            results.append({
                "xla": use_xla, "steps_per_execution": spe,
                "ms_per_step": round(1000 * seconds / steps, 3),
                "samples_per_second": round(steps * config.batch_size / seconds, 1),
            })
    return results


def run_benchmark(config: BenchTrainConfig, log=print) -> dict[str, Any]:
    from model import data, evaluate, gpu
    from model.train import TrainConfig, train_and_evaluate

    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    base = TrainConfig(data_dir=config.data_dir, out=config.runs_dir, verbose="epoch",
                       require_gpu=config.require_gpu, resume=False)
    if config.epochs is not None:
        base = dataclasses.replace(base, epochs=config.epochs)
    if config.validation_size is not None:
        base = dataclasses.replace(base, validation_size=config.validation_size)

    gpu_report = gpu.check_gpu(require_gpu=config.require_gpu)
    import tensorflow as tf

    dataset = data.load_mnist(config.data_dir)
    train_split, _ = data.split_validation(dataset.train, base.validation_size)

    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
            "device": "GPU" if gpu_report.gpu_usable else "CPU",
            "gpus": gpu_report.gpus,
        },
        "data_source": dataset.source,
        "train_config": configlib.to_jsonable(base),
        "started_at": stamp,
    }
    log("Timing the tf.data pipeline alone ...")
    rates = pipeline_throughput(train_split, base, config.pipeline_epochs)
    report["pipeline"] = {
        "images_per_second_per_epoch": [round(r, 1) for r in rates],
        "images_per_second_median": round(statistics.median(rates), 1),
        "note": "first epoch fills the cache; later epochs read it",
    }
    if config.xla_steps:
        log("Comparing XLA and steps_per_execution ...")
        report["xla_comparison"] = xla_comparison(train_split, base, config.xla_steps)

    runs = []
    for seed in config.seeds:
        log(f"Full training, seed {seed} ...")
        train_config = dataclasses.replace(base, seed=seed, run_name=f"bench-{stamp}-seed{seed}")
        result = train_and_evaluate(train_config, log=log)
        history = evaluate.read_history(result.run_dir / "history.csv")
        m = result.metrics
        runs.append({
            "seed": seed,
            "run_dir": str(result.run_dir),
            "test_accuracy": m["test_accuracy"],
            "test_loss": m["test_loss"],
            "epochs_run": m["epochs_run"],
            "best_epoch": m["best_epoch"],
            "train_seconds": m["train_seconds"],
            "train_samples_per_second": m["train_samples_per_second"],
            "epoch_seconds": [round(row.get("epoch_seconds", 0.0), 2) for row in history],
            "xla": m["xla"],
        })
    accuracies = [r["test_accuracy"] for r in runs]
    seconds = [r["train_seconds"] for r in runs]
    report["runs"] = runs
    report["summary"] = {
        "seeds": list(config.seeds),
        "median_test_accuracy": statistics.median(accuracies),
        "min_test_accuracy": min(accuracies),
        "median_train_seconds": statistics.median(seconds),
        "max_train_seconds": max(seconds),
        "median_epoch_seconds": statistics.median(s for r in runs for s in r["epoch_seconds"]),
        "targets": {
            f"median_test_accuracy >= {TARGET_ACCURACY}": statistics.median(accuracies) >= TARGET_ACCURACY,
            f"train_seconds <= {TARGET_TRAIN_SECONDS:.0f} (every seed)": max(seconds) <= TARGET_TRAIN_SECONDS,
        },
    }
    configlib.write_json_atomic(config.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    from model.train import run_reporting_errors

    config = configlib.parse_config(BenchTrainConfig, argv, prog="python -m model.bench")
    report, status = run_reporting_errors(lambda: run_benchmark(config))
    if status:
        return status
    s = report["summary"]
    print(
        f"Median test accuracy {s['median_test_accuracy']:.4f} over seeds {s['seeds']}; "
        f"train_seconds median {s['median_train_seconds']:.0f}, max {s['max_train_seconds']:.0f}; "
        f"pipeline {report['pipeline']['images_per_second_median']:,.0f} images/s\n"
        f"Targets: {s['targets']}\nReport: {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
