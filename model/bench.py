"""Benchmark training: `python -m model.bench [flags]` (make bench-train) -> JSON.

    make bench-train DATA_DIR=../shared/datasets/mnist ARGS="--seeds 1,2,3"

Measures, on this machine:
- the tf.data training pipeline alone (no model attached), with the default distortions and
  without: images/s per epoch, to compare with the training step's samples/s;
- XLA and steps_per_execution: samples/s and CPU time per step of the default model (no
  augmentation) for each combination, timed in interleaved rounds, so the `--jit-compile
  auto` choice rests on a measurement;
- Keras against PyTorch (opt-in: `make setup-torch`): the same MLP, AdamW, batch 128, no
  augmentation, in one run, epochs alternated (a PyTorch epoch, then a Keras epoch of
  `python -m model.train`'s own fit, callbacks and all), per-epoch samples/s and their ratio
  (model/torch_reference.py). Skipped, with the reason, without that environment;
- full default trainings, one per seed: per-epoch seconds, samples/s, train_seconds, test
  accuracy and expected calibration error, with the median over seeds checked against the
  targets (test accuracy >= 99.30%, train_seconds <= 300 for every seed).

Writes `artifacts/bench/train.json` (and the runs under artifacts/bench/runs/). Targets are
reported, never asserted: a slow machine gives an honest "false", not a failure.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common import configlib
from common.configlib import ConfigError, check_bounds, field

TARGET_ACCURACY = 0.993
TARGET_TRAIN_SECONDS = 300.0
TARGET_TORCH_RATIO = 1.3  # Keras' steady samples/s over PyTorch's, same model, same run
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchTrainConfig:
    """Benchmark the training pipeline, XLA settings and full default trainings."""

    data_dir: Path | None = field(None, "IDX folder (default: TFDS 'mnist'); use the full MNIST")
    seeds: tuple[int, ...] = field((1,), "seeds of the full trainings, comma-separated (e.g. 1,2,3)")
    epochs: int | None = field(None, "override the default epochs (default: the training default)")
    validation_size: int | None = field(None, "override the validation size (small data sets)")
    jit_compile: Literal["auto", "on", "off"] | None = field(None, "override the training's XLA setting")
    pipeline_epochs: int = field(3, "epochs over the tf.data pipeline alone", at_least=1)
    xla_steps: int = field(200, "timed steps per XLA/steps_per_execution setting (0 skips)", at_least=0)
    compare_epochs: int = field(6, "epochs of each framework in the PyTorch comparison (0 skips it)",
                                at_least=0)
    torch_python: Path = field(
        REPO / ".venv-torch" / "bin" / "python", "Python of the PyTorch environment (make setup-torch)"
    )
    torch_omp_wait_policy: Literal["ACTIVE", "PASSIVE"] | None = field(
        None, "OMP_WAIT_POLICY of the PyTorch worker; default: PyTorch's own (its threads spin "
        "while they wait: fastest on an idle machine, very slow on a busy one)"
    )
    out: Path = field(Path("artifacts/bench/train.json"), "JSON report")
    runs_dir: Path = field(Path("artifacts/bench/runs"), "where the benchmark's runs go")
    require_gpu: bool = field(False, "exit with status 3 when no GPU is usable")

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        check_bounds(self)
        if self.compare_epochs == 1:
            raise ConfigError("--compare-epochs must be 0 (skip) or >= 2: the first epoch of each is warm-up")


def pipeline_throughput(train_split, config, epochs: int, augmentation) -> list[float]:
    """Images/s of the training pipeline (order, gather, distortions, prefetch) alone."""
    from model import data

    plan = data.plan_epochs(len(train_split), config.batch_size, config.steps_per_execution)
    rates = []
    for epoch in range(epochs):
        ds = data.make_train_dataset(train_split, config.batch_size, config.seed, augmentation,
                                     first_epoch=epoch, steps_per_epoch=plan.steps_per_epoch)
        start, count = time.perf_counter(), 0
        for images, _labels in ds:
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - start))
    return rates


def xla_comparison(train_split, config, steps: int, rounds: int = 3) -> list[dict[str, Any]]:
    """Samples/s and CPU time per step of the default model (training step alone, no
    distortions) with XLA off/on and steps_per_execution 1/default. All four are compiled
    first, then timed in `rounds` interleaved rounds of `steps` steps (medians reported), so
    a machine whose speed drifts cannot favour one of them."""
    import keras

    from model import data
    from model.train import build_compiled_model

    variants = []
    for use_xla in (False, True):
        for spe in sorted({1, config.steps_per_execution}):
            keras.utils.set_random_seed(config.seed)
            ds = data.make_train_dataset(train_split, config.batch_size, config.seed,
                                         epochs=10**6, steps_per_epoch=-(-len(train_split) // config.batch_size))
            model = build_compiled_model(config, steps_per_epoch=steps, use_xla=use_xla, steps_per_execution=spe)
            model.fit(ds, steps_per_epoch=max(spe, 32), epochs=1, verbose=0, shuffle=False)  # compile
            variants.append((use_xla, spe, model, ds, {"wall": [], "cpu": []}))
    for _ in range(rounds):
        for use_xla, spe, model, ds, times in variants:
            timed = max(spe, (steps // spe) * spe)  # whole calls, at least one
            start, cpu = time.perf_counter(), time.process_time()
            model.fit(ds, steps_per_epoch=timed, epochs=1, verbose=0, shuffle=False)
            times["wall"].append((time.perf_counter() - start) / timed)
            times["cpu"].append((time.process_time() - cpu) / timed)
    return [{
        "xla": use_xla, "steps_per_execution": spe,
        "ms_per_step": round(1000 * statistics.median(times["wall"]), 3),
        "cpu_ms_per_step": round(1000 * statistics.median(times["cpu"]), 3),
        "samples_per_second": round(config.batch_size / statistics.median(times["wall"]), 1),
    } for use_xla, spe, _model, _ds, times in variants]


class TorchWorker:
    """model/torch_reference.py running in the PyTorch environment, one epoch per request."""

    def __init__(self, python: Path, arrays_path: Path, threads: int, seed: int, batch_size: int,
                 omp_wait_policy: str | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen(
            [str(python), "-m", "model.torch_reference", "--worker", "--data", str(arrays_path),
             "--threads", str(threads), "--seed", str(seed), "--batch-size", str(batch_size)],
            cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker exited (status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def epoch(self) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": "epoch"}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _rates(samples: list[float], seconds: list[float]) -> list[float]:
    return [round(n / s, 1) for n, s in zip(samples, seconds)]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def torch_comparison(config: "BenchTrainConfig", base, train_split, val_split, stamp: str, log=print) -> dict[str, Any]:
    """Keras (our training, no augmentation) and the PyTorch reference, epochs alternated.

    Before each Keras epoch (before its timer starts) one PyTorch epoch runs while Keras
    waits, so both see the machine at nearly the same moments. Epoch 1 of each is warm-up
    (tracing, XLA compilation) and left out of the steady figures. Both epochs include a
    pass over the validation set; "train" rates count the training steps alone.
    """
    import keras
    import numpy as np

    from model.train import train_and_evaluate

    python = Path(config.torch_python)
    if not python.exists():
        return {"skipped": f"no PyTorch environment ({python} not found): run make setup-torch"}
    probe = subprocess.run([str(python), "-c", "import torch, numpy"], capture_output=True, text=True)
    if probe.returncode:
        return {"skipped": f"{python} cannot import torch and numpy: {probe.stderr.strip().splitlines()[-1:]}"}

    keras_config = dataclasses.replace(
        base, augment=False, epochs=config.compare_epochs, patience=config.compare_epochs,
        calibrate="off", run_name=f"compare-{stamp}-keras",
    )
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as tmp:
        arrays = Path(tmp) / "mnist.npz"
        np.savez(arrays, train_images=train_split.images, train_labels=train_split.labels,
                 val_images=val_split.images, val_labels=val_split.labels)
        from model.train import physical_cores

        threads = base.threads or physical_cores()
        worker = TorchWorker(python, arrays, threads, base.seed, base.batch_size, config.torch_omp_wait_policy)
        torch_epochs: list[dict[str, Any]] = []

        class Alternate(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                torch_epochs.append(worker.epoch())

        try:
            log(f"Keras and PyTorch ({worker.info.get('torch')}), {config.compare_epochs} epochs each, alternated ...")
            result = train_and_evaluate(keras_config, log=log, extra_callbacks=[Alternate()])
        finally:
            worker.close()

    from model import evaluate

    history = evaluate.read_history(result.run_dir / "history.csv")
    keras_images = result.metrics["train_steps_per_epoch"] * base.batch_size
    k_epoch = _rates([keras_images] * len(history), [r["epoch_seconds"] for r in history])
    k_train = _rates([keras_images] * len(history), [r["epoch_train_seconds"] for r in history])
    t_epoch = _rates([t["samples"] for t in torch_epochs], [t["epoch_seconds"] for t in torch_epochs])
    t_train = _rates([t["samples"] for t in torch_epochs], [t["train_seconds"] for t in torch_epochs])
    # CPU time per 1,000 samples (all threads): what an epoch costs in core-seconds, which a
    # busy machine changes far less than wall time (spinning threads count, though).
    k_cpu = [round(1000 * r["epoch_cpu_seconds"] / keras_images, 4) for r in history]
    t_cpu = [round(1000 * t["cpu_seconds"] / t["samples"], 4) for t in torch_epochs]
    pair_ratios = [round(k / t, 3) for k, t in zip(k_epoch[1:], t_epoch[1:])]
    k_steady, t_steady = _summary(k_epoch[1:]), _summary(t_epoch[1:])
    ratio = k_steady["median"] / t_steady["median"]
    return {
        "model": "784-800-BN-ReLU-Dropout(0.2)-256-BN-ReLU-Dropout(0.2)-10, AdamW, batch "
                 f"{base.batch_size}, no augmentation",
        "torch": {**worker.info, "omp_wait_policy": config.torch_omp_wait_policy or "default (unset)"},
        "keras": {"run_dir": str(result.run_dir), "threads": result.metrics["threads"],
                  "xla": result.metrics["xla"], "steps_per_execution": result.metrics["steps_per_execution"],
                  "images_per_epoch": keras_images, "val_accuracy": result.metrics["val_accuracy"]},
        "keras_samples_per_second": {"epoch": k_epoch, "train_steps": k_train, "steady": k_steady},
        "torch_samples_per_second": {"epoch": t_epoch, "train_steps": t_train, "steady": t_steady,
                                     "val_accuracy": [t["val_accuracy"] for t in torch_epochs]},
        "ratio_per_epoch_pair": pair_ratios,
        "ratio_steady_median": round(ratio, 3),
        "ratio_train_steps_median": round(statistics.median(k_train[1:]) / statistics.median(t_train[1:]), 3),
        "cpu_seconds_per_1000_samples": {"keras": k_cpu, "torch": t_cpu},
        "ratio_cpu_efficiency_median": round(statistics.median(t_cpu[1:]) / statistics.median(k_cpu[1:]), 3),
        "note": "samples/s per epoch, validation pass included; epoch 1 (warm-up) excluded from steady",
    }


def run_benchmark(config: BenchTrainConfig, log=print) -> dict[str, Any]:
    from model import data, evaluate, gpu
    from model.train import TrainConfig, configure_threads, train_and_evaluate

    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    base = TrainConfig(data_dir=config.data_dir, out=config.runs_dir, verbose="epoch",
                       require_gpu=config.require_gpu, resume=False)
    if config.epochs is not None:
        base = dataclasses.replace(base, epochs=config.epochs)
    if config.validation_size is not None:
        base = dataclasses.replace(base, validation_size=config.validation_size)
    if config.jit_compile is not None:
        base = dataclasses.replace(base, jit_compile=config.jit_compile)

    configure_threads(base.threads)  # before TF runs its first op, as model.train does
    gpu_report = gpu.check_gpu(require_gpu=config.require_gpu)
    import tensorflow as tf

    dataset = data.load_mnist(config.data_dir)
    train_split, val_split = data.split_validation(dataset.train, base.validation_size)

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
    report["pipeline"] = {}
    for name, augmentation in (("default_distortions", base.augmentation()), ("no_augmentation", None)):
        rates = pipeline_throughput(train_split, base, config.pipeline_epochs, augmentation)
        report["pipeline"][name] = {
            "images_per_second_per_epoch": [round(r, 1) for r in rates],
            "images_per_second_median": round(statistics.median(rates), 1),
        }
    report["pipeline"]["augmentation"] = configlib.to_jsonable(base.augmentation())
    if config.xla_steps:
        log("Comparing XLA and steps_per_execution ...")
        report["xla_comparison"] = xla_comparison(train_split, base, config.xla_steps)
    if config.compare_epochs:
        report["torch_comparison"] = torch_comparison(config, base, train_split, val_split, stamp, log)
        if "skipped" in report["torch_comparison"]:
            log(f"PyTorch comparison skipped: {report['torch_comparison']['skipped']}")

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
            "epoch_cpu_seconds": [round(row.get("epoch_cpu_seconds", 0.0), 2) for row in history],
            "val_accuracy": [round(row.get("val_accuracy", 0.0), 4) for row in history],
            "test_ece": m["test_ece"],
            "test_ece_uncalibrated": m["test_ece_uncalibrated"],
            "test_ece_temperature_scaled": m["test_ece_temperature_scaled"],
            "temperature": m["calibration"]["temperature"],
            "xla": m["xla"],
            "threads": m["threads"],
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
        "median_test_ece": statistics.median(r["test_ece"] for r in runs),
        "median_test_ece_uncalibrated": statistics.median(r["test_ece_uncalibrated"] for r in runs),
        "targets": {
            f"median_test_accuracy >= {TARGET_ACCURACY}": statistics.median(accuracies) >= TARGET_ACCURACY,
            f"train_seconds <= {TARGET_TRAIN_SECONDS:.0f} (every seed)": max(seconds) <= TARGET_TRAIN_SECONDS,
        },
    }
    comparison = report.get("torch_comparison", {})
    if "ratio_steady_median" in comparison:
        report["summary"]["targets"][f"keras / pytorch steady samples/s >= {TARGET_TORCH_RATIO}"] = (
            comparison["ratio_steady_median"] >= TARGET_TORCH_RATIO
        )
    configlib.write_json_atomic(config.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    from model.train import run_reporting_errors

    config = configlib.parse_config(BenchTrainConfig, argv, prog="python -m model.bench")
    report, status = run_reporting_errors(lambda: run_benchmark(config))
    if status:
        return status
    s = report["summary"]
    comparison = report.get("torch_comparison", {})
    versus = (
        f"Keras / PyTorch steady samples/s: {comparison['ratio_steady_median']:.2f} "
        f"({comparison['keras_samples_per_second']['steady']['median']:,.0f} / "
        f"{comparison['torch_samples_per_second']['steady']['median']:,.0f})\n"
        if "ratio_steady_median" in comparison else
        f"PyTorch comparison skipped: {comparison['skipped']}\n" if "skipped" in comparison else ""
    )
    print(
        f"Median test accuracy {s['median_test_accuracy']:.4f} over seeds {s['seeds']} (ECE "
        f"{s['median_test_ece']:.4f}); train_seconds median {s['median_train_seconds']:.0f}, max "
        f"{s['max_train_seconds']:.0f}; pipeline with distortions "
        f"{report['pipeline']['default_distortions']['images_per_second_median']:,.0f} images/s\n"
        f"{versus}Targets: {s['targets']}\nReport: {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
