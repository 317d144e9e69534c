"""Export one training run: the SavedModel for TF Serving, then the TFLite files for devices.

    python -m export --run artifacts/runs/latest        (make export RUN=...)

`export_run(config)` loads the run's model and the test set it was evaluated on, applies the
quality gate, publishes the next SavedModel version under `<serving_base>/mnist/`, then builds
the TFLite variants into `<tflite_builds>/<run>/` and points `artifacts/mobile` at them. The
resolved ExportConfig is saved beside both outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field

# Exit statuses of `python -m export` (README, "Export"): 0 everything was published; 1 the
# export failed and nothing new was published (a bad run, bad data, a full disk: the one
# `error:` line says which file and why); 2 bad flags; 4 the quality gate refused the model.
EXIT_FAILED = 1
EXIT_GATE_REFUSED = 4  # distinct: a script can tell "model not good enough" from a failure
# The SavedModel version was published complete (TF Serving loads it), then the TFLite stage
# failed: the new version serves, but there is no new TFLite build for the devices.
EXIT_PARTIAL = 5


@dataclass(frozen=True)
class ExportConfig:
    """Export a training run as a SavedModel for TF Serving and as TFLite files."""

    run: Path = field(Path("artifacts/runs/latest"), "run folder to export (holds model.keras)")
    serving_base: Path = field(Path("artifacts/serving"), "TF Serving model base path")
    model_name: str = field(contract.MODEL_NAME, "model name (folder under the base path)")
    version: int | None = field(None, "version number to publish (default: the next one)", at_least=1)
    min_accuracy: float = field(0.97, "quality gate: lowest test accuracy allowed", at_least=0, at_most=1)
    max_regression: float = field(
        0.002, "quality gate: largest accuracy drop allowed vs the published version (0.002 = 0.2 points)",
        at_least=0, at_most=1,
    )
    force: bool = field(False, "publish even when the quality gate refuses")
    data_dir: Path | None = field(None, "IDX folder for the test set (default: the run's own data source)")
    parity_images: int = field(1000, "test images on which the SavedModel must match Keras", at_least=1)
    cli_check: bool = field(True, "check the SavedModel with saved_model_cli show/run")
    saved_model: bool = field(True, "publish the SavedModel")
    tflite: bool = field(True, "build the TFLite variants")
    tflite_builds: Path = field(Path("artifacts/tflite"), "folder of TFLite builds, one per export")
    mobile_dir: Path = field(Path("artifacts/mobile"), "symlink to the newest TFLite build")
    calibration_images: int = field(500, "training images that calibrate the int8 variant", at_least=1)
    latency_runs: int = field(2000, "single-image runs per variant for the latency figures", at_least=1)
    tflite_runtime_python: Path | None = field(
        Path(".venv-tflite-runtime/bin/python"),
        "Python of the tflite-runtime 2.14.0 venv, to check that runtime ('none' skips)",
    )

    def validate(self) -> None:
        check_bounds(self)
        if not (Path(self.run) / contract.RUN_MODEL_FILE).is_file():
            raise ConfigError(
                f"--run {self.run}: no {contract.RUN_MODEL_FILE} there. Train first (make train) "
                f"or point RUN= at a finished run folder under artifacts/runs/."
            )
        if not (Path(self.run) / contract.RUN_METRICS_FILE).is_file():
            raise ConfigError(f"--run {self.run}: no {contract.RUN_METRICS_FILE}; the run did not finish")
        if not self.saved_model and not self.tflite:
            raise ConfigError("nothing to do: both --no-saved-model and --no-tflite were given")


@dataclass
class RunData:
    """What the export needs from the run's data: the test set and calibration images."""

    test_images: np.ndarray
    test_labels: np.ndarray
    calibration_images: np.ndarray


def load_run_data(config: ExportConfig) -> RunData:
    """The test set the run was evaluated on and a seeded sample of its training images."""
    from model import data
    from model.train import TrainConfig

    from export.saved_model import ExportError

    config_file = Path(config.run) / contract.RUN_CONFIG_FILE
    try:
        train_config = configlib.load_config(TrainConfig, config_file)
    except (OSError, ValueError, TypeError) as err:  # a damaged file: bad JSON, keys or types
        raise ExportError(f"{config_file}: not a readable training config ({err}); it is damaged: "
                          "train again, or export another run") from err
    data_dir = config.data_dir if config.data_dir is not None else train_config.data_dir
    dataset = data.load_mnist(data_dir, train_config.tfds_dir)
    train_split, _validation = data.split_validation(dataset.train, train_config.validation_size)
    rng = np.random.default_rng(train_config.seed)
    pick = rng.choice(len(train_split), size=min(config.calibration_images, len(train_split)), replace=False)
    return RunData(
        test_images=dataset.test.images,
        test_labels=dataset.test.labels.astype(np.int64),
        calibration_images=train_split.images[np.sort(pick)],
    )


class PartialExport(RuntimeError):
    """The SavedModel version was published complete, then the TFLite stage failed."""


def export_run(config: ExportConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Gate, publish the SavedModel, build the TFLite files. Returns a summary dict.

    Raises saved_model.GateRefused (nothing published), saved_model.ExportError or
    tflite.TFLiteError (nothing new published), PartialExport (the SavedModel version was
    published, the TFLite build failed; its message says both).
    """
    import time

    from export import saved_model

    started = time.perf_counter()
    run_dir = Path(config.run).resolve()
    run_metrics, model = read_run(run_dir)
    run_data = load_run_data(config)
    summary: dict[str, Any] = {"run": str(run_dir)}

    seconds: dict[str, float] = {"load": round(time.perf_counter() - started, 2)}
    if config.saved_model:
        stage = time.perf_counter()
        model_dir = Path(config.serving_base) / config.model_name
        summary["saved_model"] = saved_model.export_saved_model(
            model, model_dir, run_data.test_images, run_data.test_labels,
            {**run_metrics, "run": str(run_dir)},
            min_accuracy=config.min_accuracy, max_regression=config.max_regression,
            force=config.force, version=config.version, parity_images=config.parity_images,
            cli_check=config.cli_check,
            before_rename=lambda tmp: configlib.save_config(config, tmp / "assets.extra" / "export_config.json"),
            log=log,
        )
        seconds["saved_model"] = round(time.perf_counter() - stage, 2)
    if config.tflite:
        stage = time.perf_counter()
        try:
            result = _export_tflite_stage(config, model, run_data, run_dir, log)
        except Exception as err:
            published = summary.get("saved_model")
            if published is None or not _is_export_failure(err):
                raise
            raise PartialExport(
                f"SavedModel version {published['version']} was published complete at {published['path']} "
                f"(TF Serving loads it), but the TFLite export failed: {_message(err)}"
            ) from err
        summary["tflite"] = {"directory": str(result.directory), "report": result.report}
        seconds["tflite"] = round(time.perf_counter() - stage, 2)
        _log_tflite(result.report, Path(config.mobile_dir), log)
    seconds["total"] = round(time.perf_counter() - started, 2)
    summary["seconds"] = seconds
    log(f"Export finished in {seconds['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})")
    return summary


def _export_tflite_stage(config: ExportConfig, model, run_data: RunData, run_dir: Path, log):
    from export import tflite

    builds = Path(config.tflite_builds)
    name = run_dir.name
    out_dir, n = builds / name, 1
    while out_dir.exists() or out_dir.is_symlink():
        n += 1
        out_dir = builds / f"{name}-{n}"
    python = config.tflite_runtime_python
    if python is not None and not Path(python).exists():
        log(f"Note: {python} not found; skipping the tflite-runtime check (make setup-tflite-runtime)")
    result = tflite.export_tflite(
        model, out_dir, run_data.test_images, run_data.test_labels,
        run_data.calibration_images, run_name=str(run_dir), tflite_runtime_python=python,
        latency_runs=config.latency_runs,
        before_rename=lambda tmp: configlib.save_config(config, tmp / "export_config.json"),
        log=log,
    )
    tflite.point_link_at(Path(config.mobile_dir), out_dir)
    return result


def _is_export_failure(err: BaseException) -> bool:
    """An error the export reports in one line (as opposed to a bug, which keeps its traceback)."""
    from export import saved_model, tflite
    from model import data, idx

    known = (saved_model.ExportError, tflite.TFLiteError, data.DataError, idx.IdxError, ConfigError)
    return isinstance(err, known) or configlib.write_failure(err) is not None


def _message(err: BaseException) -> str:
    """Our errors' own message; for an OSError or TensorFlow error, the file and the cause."""
    from export import saved_model, tflite

    if isinstance(err, (saved_model.ExportError, tflite.TFLiteError)):
        return str(err)
    return configlib.write_failure(err) or str(err)


def read_run(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """(metrics.json as a dict, the Keras model) of a finished run folder.

    Raises saved_model.ExportError naming the file when either cannot be read (truncated,
    damaged, not JSON): Keras itself says "File not found" for a truncated .keras file.
    """
    import json
    import zipfile

    import keras

    from export.saved_model import ExportError

    metrics_file = Path(run_dir) / contract.RUN_METRICS_FILE
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        if not isinstance(metrics, dict):
            raise ValueError(f"a JSON {type(metrics).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise ExportError(f"{metrics_file}: not a readable metrics file ({err}); it is damaged: "
                          "train again, or export another run") from err
    model_file = Path(run_dir) / contract.RUN_MODEL_FILE
    try:
        if not zipfile.is_zipfile(model_file):
            raise ValueError("not a .keras zip archive: truncated or damaged")
        model = keras.models.load_model(model_file, compile=False)
    except Exception as err:  # Keras raises many kinds for a damaged archive
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{model_file}: not a readable Keras model ({reason}); train again, "
                          "or export another run") from err
    return metrics, model


def _log_tflite(report: dict[str, Any], mobile_dir: Path, log: Callable[[str], None]) -> None:
    log(f"TFLite variants (Keras accuracy {report['keras_accuracy']:.4f}):")
    for v in report["variants"]:
        log(
            f"  {v['name']:8s} {v['size_bytes'] / 1024:8.0f} KiB  accuracy {v['accuracy']:.4f}  "
            f"agreement {v['agreement']:.4f}  p50 {v['latency_us_p50']:.1f} us  "
            f"runtimes: {', '.join(v['runtimes'])}"
        )
    log(f"Recommended: {report['recommended']} -> {mobile_dir / 'mnist.tflite'} (report: {mobile_dir / 'report.md'})")


def main(argv: list[str] | None = None) -> int:
    """`python -m export`: the exit statuses are EXIT_* above; failures print one `error:` line."""
    from export import saved_model

    config = configlib.parse_config(ExportConfig, argv, prog="python -m export")
    try:
        export_run(config)
    except saved_model.GateRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_GATE_REFUSED
    except PartialExport as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PARTIAL
    except Exception as err:
        if not _is_export_failure(err):
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return EXIT_FAILED
    return 0
