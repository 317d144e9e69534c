"""`make bench-train` (model/bench.py) on the fixture, small settings, and the PyTorch
reference it compares with (model/torch_reference.py, in its own environment).

The benchmark's numbers are never asserted as targets here (they depend on the machine); these
tests check that it measures what it says. The PyTorch parts need `make setup-torch`; without
it the benchmark must say it skipped the comparison and why.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from .conftest import REPO, python_env

TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
needs_torch = pytest.mark.skipif(
    not TORCH_PYTHON.exists(), reason=f"no PyTorch environment at {TORCH_PYTHON} (make setup-torch)"
)


@needs_torch
def test_torch_reference_is_our_model_and_speaks_its_protocol(fixture_mnist, tmp_path):
    from model import data
    from model.train import TrainConfig, build_training_model

    train, val = data.split_validation(fixture_mnist.train, 500)
    arrays = tmp_path / "mnist.npz"
    np.savez(arrays, train_images=train.images, train_labels=train.labels,
             val_images=val.images, val_labels=val.labels)
    commands = "\n".join(json.dumps({"cmd": c}) for c in ("epoch", "epoch", "nonsense", "quit")) + "\n"
    done = subprocess.run(
        [str(TORCH_PYTHON), "-m", "model.torch_reference", "--worker", "--data", str(arrays), "--threads", "1"],
        input=commands, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ready, first, second, error = (json.loads(line) for line in done.stdout.splitlines())
    # The same network: as many trainable parameters as our default MLP.
    keras_model = build_training_model(TrainConfig())  # the default architecture
    trainable = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
    assert ready["ready"] and ready["parameters"] == trainable and ready["threads"] == 1
    assert ready["train_images"] == 2500 and ready["batch_size"] == 128
    for reply, epoch in ((first, 1), (second, 2)):
        assert reply["epoch"] == epoch and reply["samples"] == (2500 // 128) * 128
        assert 0 < reply["train_seconds"] <= reply["epoch_seconds"] and reply["cpu_seconds"] > 0
    assert second["val_accuracy"] > 0.6 and second["loss"] < first["loss"]  # it learns
    assert "unknown command" in error["error"]


def _run_bench(tmp_path, *extra):
    from model import bench

    out = tmp_path / "train.json"
    status = bench.main([
        "--data-dir", str(REPO / "tests" / "data"), "--validation-size", "500", "--seeds", "1",
        "--epochs", "1", "--pipeline-epochs", "2", "--xla-steps", "0", "--jit-compile", "off",
        "--out", str(out), "--runs-dir", str(tmp_path / "runs"), *extra,
    ])
    assert status == 0
    return json.loads(out.read_text())


def test_bench_reports_pipeline_accuracy_calibration_and_the_comparison(tmp_path):
    torch_python = TORCH_PYTHON if TORCH_PYTHON.exists() else tmp_path / "no-torch" / "python"
    report = _run_bench(tmp_path, "--compare-epochs", "2", "--torch-python", str(torch_python))
    pipeline = report["pipeline"]
    for name in ("default_distortions", "no_augmentation"):
        assert len(pipeline[name]["images_per_second_per_epoch"]) == 2
        assert pipeline[name]["images_per_second_median"] > 0
    assert pipeline["augmentation"]["elastic_alpha"] > 0  # the default distorts elastically
    (run,) = report["runs"]
    assert 0 <= run["test_ece"] <= 1 and 0 <= run["test_ece_uncalibrated"] <= 1
    assert run["temperature"] > 0 and len(run["epoch_cpu_seconds"]) == run["epochs_run"] == 1
    summary = report["summary"]
    assert "median_test_accuracy >= 0.993" in summary["targets"]
    comparison = report["torch_comparison"]
    if not TORCH_PYTHON.exists():
        assert "make setup-torch" in comparison["skipped"]
        return
    # Two epochs each, alternated; the ratio is Keras' steady samples/s over PyTorch's.
    keras_rates = comparison["keras_samples_per_second"]
    torch_rates = comparison["torch_samples_per_second"]
    assert len(keras_rates["epoch"]) == len(torch_rates["epoch"]) == 2
    assert comparison["ratio_steady_median"] == pytest.approx(
        keras_rates["steady"]["median"] / torch_rates["steady"]["median"], rel=1e-3
    )
    assert comparison["torch"]["threads"] == comparison["keras"]["threads"]["intra_op"]
    assert len(comparison["cpu_seconds_per_1000_samples"]["torch"]) == 2
    assert any(k.startswith("keras / pytorch") for k in summary["targets"])


def test_comparison_without_torch_says_why(tmp_path):
    from model import bench

    for python, reason in ((tmp_path / "nowhere" / "python", "make setup-torch"),
                           (REPO / ".venv" / "bin" / "python", "cannot import torch")):
        config = bench.BenchTrainConfig(torch_python=python, compare_epochs=2)
        result = bench.torch_comparison(config, None, None, None, "stamp", log=lambda *_: None)
        assert reason in result["skipped"]
