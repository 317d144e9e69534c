"""Training end to end on the real fixture: the run folder, resume after a kill, TFDS, mirrored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import contract
from model import evaluate

from .conftest import FIXTURE_MIN_ACCURACY, REPO, fixture_train_config, python_env

RUN_FILES = [
    contract.RUN_MODEL_FILE, contract.RUN_CONFIG_FILE, contract.RUN_GPU_REPORT_FILE, "history.csv",
    contract.RUN_METRICS_FILE, "training_curves.png", "confusion_matrix.png", "reliability.png",
]
METRIC_KEYS = ["test_accuracy", "test_loss", "per_class_accuracy", "epochs_run", "train_seconds",
               "train_samples_per_second", "test_ece", "test_ece_uncalibrated", "calibration", "threads"]


def test_run_folder_holds_every_file(trained_run):
    for name in RUN_FILES:
        assert (trained_run / name).is_file(), name
    assert any((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (trained_run.parent / "latest").resolve() == trained_run.resolve()
    assert not (trained_run / "backup").exists() and not (trained_run / ".unfinished").exists()
    for png in ("training_curves.png", "confusion_matrix.png", "reliability.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_complete_and_beat_the_floor(trained_run):
    metrics = json.loads((trained_run / contract.RUN_METRICS_FILE).read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert metrics["test_accuracy"] >= FIXTURE_MIN_ACCURACY
    assert metrics["test_images"] == 1000 and metrics["train_images"] == 2500
    assert sorted(metrics["per_class_accuracy"]) == list(contract.LABELS)
    assert metrics["epochs_run"] == len(evaluate.read_history(trained_run / "history.csv"))
    assert metrics["train_seconds"] > 0 and metrics["train_samples_per_second"] > 0
    # The confusion matrix and the accuracy agree.
    matrix = metrics["confusion_matrix"]
    assert sum(matrix[i][i] for i in range(10)) / 1000 == pytest.approx(metrics["test_accuracy"])


def test_config_json_is_the_resolved_config(trained_run):
    saved = json.loads((trained_run / contract.RUN_CONFIG_FILE).read_text())
    assert saved["epochs"] == 6 and saved["validation_size"] == 500 and saved["augment"] is False
    assert saved["data_dir"].endswith("tests/data")


def test_saved_model_reloads_and_predicts_like_the_metrics(trained_run, fixture_mnist):
    import keras

    model = keras.models.load_model(trained_run / contract.RUN_MODEL_FILE)
    probs = model.predict(fixture_mnist.test.images, verbose=0)
    accuracy = float((probs.argmax(1) == fixture_mnist.test.labels).mean())
    metrics = json.loads((trained_run / contract.RUN_METRICS_FILE).read_text())
    assert accuracy == pytest.approx(metrics["test_accuracy"])


def _train_cmd(out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "model.train", "--data-dir", str(REPO / "tests" / "data"),
            "--validation-size", "500", "--epochs", str(epochs), "--patience", str(epochs),
            "--no-augment", "--out", str(out), "--verbose", "epoch", *extra]


def _backed_up_epochs(run_dir: Path) -> int:
    """Epochs the run's backup has committed (its state.json, replaced atomically)."""
    try:
        return json.loads((run_dir / "backup" / "state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


# The resume test trains as `make train` does (XLA, elastic and affine distortions, dropout),
# on a smaller model and batch so that 4 epochs of the fixture take seconds.
RESUME_ARGS = ("--augment", "--hidden-units", "128,64", "--batch-size", "125", "--seed", "3")


def test_killed_training_resumes_and_ends_with_the_uninterrupted_model(tmp_path):
    """kill -9 after epoch 2, run again: the run resumes from its last finished epoch and ends
    with exactly the model of the same run never interrupted (issue 12): same data order and
    distortions (a function of seed and epoch), same dropout masks, optimizer state and early
    stopping, so every weight and every history value except the timings is equal."""
    import keras
    import numpy as np

    out, reference_out = tmp_path / "runs", tmp_path / "reference"
    epochs = 4
    reference = subprocess.Popen(_train_cmd(reference_out, epochs, *RESUME_ARGS), cwd=REPO, env=python_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(_train_cmd(out, epochs, *RESUME_ARGS), cwd=REPO, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        history = None
        while time.time() < deadline and proc.poll() is None:
            runs = [p for p in out.glob("*-seed3") if p.is_dir()] if out.exists() else []
            if runs and _backed_up_epochs(runs[0]) >= 2:  # epoch 2's backup is committed
                history = runs[0] / "history.csv"
                break
            time.sleep(0.05)
        assert history is not None, f"training never reached epoch 2:\n{proc.communicate()[0][-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: like a power cut
        proc.wait()
        run_dir = history.parent
        killed_after = _backed_up_epochs(run_dir)
        assert 2 <= killed_after < epochs and (run_dir / ".unfinished").exists()
        assert not (run_dir / contract.RUN_METRICS_FILE).exists()

        again = subprocess.run(_train_cmd(out, epochs, *RESUME_ARGS), cwd=REPO, env=python_env(),
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        reference_log = reference.communicate(timeout=600)[0]
        assert reference.returncode == 0, reference_log[-3000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert f"Resuming {run_dir}" in again.stdout
    resumed_epoch = int(again.stdout.split("after epoch ")[1].split(" ")[0].rstrip("."))
    assert resumed_epoch == killed_after  # from the last backed-up epoch, not from zero
    assert f"Epoch {resumed_epoch + 1}/{epochs}" in again.stdout
    assert "Epoch 1/" not in again.stdout
    rows = evaluate.read_history(history)
    assert [r["epoch"] for r in rows] == list(range(epochs))  # no duplicated, no missing epoch
    metrics = json.loads((run_dir / contract.RUN_METRICS_FILE).read_text())
    assert metrics["resumed"] is True and metrics["epochs_run"] == epochs and metrics["xla"] is True
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([run_dir.name, "latest"])

    # The same model as the uninterrupted run, bit for bit.
    reference_dir = (reference_out / "latest").resolve()
    reference_rows = evaluate.read_history(reference_dir / "history.csv")
    for row, ref in zip(rows, reference_rows, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert row[key] == ref[key], (row["epoch"], key)
    resumed_model = keras.models.load_model(run_dir / contract.RUN_MODEL_FILE)
    reference_model = keras.models.load_model(reference_dir / contract.RUN_MODEL_FILE)
    for a, b in zip(resumed_model.get_weights(), reference_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    reference_metrics = json.loads((reference_dir / contract.RUN_METRICS_FILE).read_text())
    assert metrics["test_accuracy"] == reference_metrics["test_accuracy"]


def test_finished_run_is_not_resumed_and_no_resume_starts_over(trained_run, tmp_path):
    from model.train import find_resumable_run

    config = fixture_train_config(trained_run.parent)
    assert find_resumable_run(config) is None  # finished runs stay finished


def test_tfds_source_trains_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from model import data
    from model.train import train_and_evaluate

    monkeypatch.setattr(data, "check_download_reachable", lambda *a, **k: None)

    config = fixture_train_config(tmp_path / "runs", data_dir=None, validation_size=64, epochs=1,
                                  batch_size=64, hidden_units=(32,))
    with tfds.testing.mock_data(num_examples=256):
        result = train_and_evaluate(config, log=lambda *_: None)
    assert result.metrics["data_source"]["kind"] == "tfds"
    assert result.metrics["test_images"] == 256 and result.metrics["train_images"] == 192
    assert (result.run_dir / contract.RUN_MODEL_FILE).is_file()


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [*_train_cmd(out, 1), "--strategy", "mirrored", "--cpu-devices", "2", "--hidden-units", "64"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "latest" / contract.RUN_METRICS_FILE).read_text())
    assert metrics["replicas"] == 2
    assert metrics["test_accuracy"] > 0.5  # it learned, through tf.distribute


def test_bad_data_dir_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "model.train", "--data-dir", str(empty), "--out", str(tmp_path / "runs")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "train-images-idx3-ubyte[.gz]: missing" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written
