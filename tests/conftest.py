"""Shared fixtures: one small real model, trained and exported once per test session.

Session fixtures (expensive, built once, read-only for tests):

- `fixture_data_dir`: tests/data, a real-MNIST subset (3,000 train / 1,000 test, gzip'd IDX).
- `fixture_mnist`: that subset loaded (model.data.MnistData).
- `trained_run`: a run folder trained on the fixture for a few epochs (default architecture).
- `exported`: an `Exported` record after `python -m export`'s library call on that run:
  SavedModel version 1 under `exported.serving_base / "mnist" / "1"`, and the TFLite build
  (`float32/float16/dynamic/int8.tflite`, `mnist.tflite`, `labels.txt`, `report.json`, ...)
  under `exported.mobile_dir`. Tests that publish more versions must copy the base first
  (`copy_serving_base`), never modify these.

Set MNIST_TEST_KEEP=1 to keep the session's folder for inspection.

Every process a test starts must be stopped when the test ends, pass or fail: the
process_guard plugin fails the session, naming them, if any survives (tests/process_guard.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.process_guard"]

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "data"
FULL_MNIST = REPO.parent / "shared" / "datasets" / "mnist"

# The fixture model: the default architecture, so the tests exercise what users ship, trained
# in seconds: no augmentation and smaller batches suit 2,500 images, and no XLA (compiling the
# step costs more than 6 short epochs gain; tests/test_train.py trains with it). Test
# accuracy ~90%.
FIXTURE_EPOCHS = 6
FIXTURE_BATCH = 64
FIXTURE_VALIDATION = 500
FIXTURE_MIN_ACCURACY = 0.85  # the floor test_train asserts; the gate for fixture exports

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Exported:
    run_dir: Path
    serving_base: Path
    model_dir: Path  # serving_base / "mnist"
    version_dir: Path  # model_dir / "1"
    mobile_dir: Path
    summary: dict[str, Any]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("session")
    yield path
    if os.environ.get("MNIST_TEST_KEEP"):
        print(f"\nkept session folder: {path}", file=sys.stderr)


@pytest.fixture(scope="session")
def fixture_data_dir() -> Path:
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def fixture_mnist():
    from model import data

    return data.load_mnist(FIXTURE_DATA)


def fixture_train_config(out: Path, **overrides):
    from model.train import TrainConfig

    values = dict(
        data_dir=FIXTURE_DATA, validation_size=FIXTURE_VALIDATION, epochs=FIXTURE_EPOCHS,
        batch_size=FIXTURE_BATCH, augment=False, out=out, verbose="quiet", patience=FIXTURE_EPOCHS,
        jit_compile="off",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(session_dir) -> Path:
    from model.train import train_and_evaluate

    result = train_and_evaluate(fixture_train_config(session_dir / "runs"), log=lambda *_: None)
    return result.run_dir


@pytest.fixture(scope="session")
def exported(session_dir, trained_run) -> Exported:
    from export.pipeline import ExportConfig, export_run

    config = ExportConfig(
        run=trained_run,
        serving_base=session_dir / "serving",
        tflite_builds=session_dir / "tflite",
        mobile_dir=session_dir / "mobile",
        min_accuracy=FIXTURE_MIN_ACCURACY,
        latency_runs=200,
        tflite_runtime_python=REPO / ".venv-tflite-runtime" / "bin" / "python",
    )
    summary = export_run(config, log=lambda *_: None)
    model_dir = config.serving_base / "mnist"
    return Exported(
        run_dir=trained_run,
        serving_base=config.serving_base,
        model_dir=model_dir,
        version_dir=model_dir / "1",
        mobile_dir=config.mobile_dir,
        summary=summary,
    )


@pytest.fixture
def copy_serving_base(exported, tmp_path):
    """A private copy of the exported serving base (tests that publish or delete versions)."""

    def make() -> Path:
        target = tmp_path / "serving"
        shutil.copytree(exported.serving_base, target, symlinks=True)
        return target

    return make


def python_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses running project modules from the repo root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    return env
