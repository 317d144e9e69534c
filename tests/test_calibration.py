"""Expected calibration error and temperature scaling (model/evaluate.py), and the temperature's
place inside every saved form of the model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import contract
from model import evaluate


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ece_by_hand():
    # Always 100% confident, right 99 times in 100: |0.99 - 1.0| = 0.01.
    probs = np.zeros((100, 10))
    probs[:, 3] = 1.0
    labels = np.full(100, 3)
    labels[0] = 4
    assert evaluate.expected_calibration_error(labels, probs) == pytest.approx(0.01)
    # Two bins: 0.55 confident and right half the time (gap 0.05), 0.95 confident and always
    # right (gap 0.05): ECE 0.05 whatever the mix.
    low = np.tile([0.55, 0.45] + [0.0] * 8, (4, 1))
    high = np.tile([0.95, 0.05] + [0.0] * 8, (6, 1))
    labels = np.array([0, 1, 0, 1] + [0] * 6)
    assert evaluate.expected_calibration_error(labels, np.vstack([low, high])) == pytest.approx(0.05)
    # A perfectly calibrated one: confidence 0.8 in one bin, right 8 times in 10.
    probs = np.tile([0.8, 0.2] + [0.0] * 8, (10, 1))
    assert evaluate.expected_calibration_error(np.array([0] * 8 + [1] * 2), probs) == pytest.approx(0.0)


def test_ece_uses_15_equal_width_bins_closed_on_the_right():
    # Confidence 9/15 (right) closes bin (8/15, 9/15]; a hair above it (wrong) opens the next.
    # Two bins: (|1 - 0.6| + |0 - 0.6|) / 2 = 0.5. One bin would give |0.5 - 0.6| = 0.1.
    probs = np.zeros((2, 10))
    probs[0, :2] = [9 / 15, 6 / 15]
    probs[1, :2] = [9 / 15 + 1e-9, 6 / 15 - 1e-9]
    labels = np.array([0, 1])
    assert evaluate.ECE_BINS == 15
    assert evaluate.expected_calibration_error(labels, probs) == pytest.approx(0.5)
    assert evaluate.expected_calibration_error(labels, probs, bins=1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        evaluate.expected_calibration_error(labels[:1], probs)  # N mismatch


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_that_made_the_labels(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20_000, 10)) * 3
    p = _softmax(logits / true_temperature)
    labels = (p.cumsum(axis=1) > rng.uniform(size=(len(p), 1))).argmax(axis=1)  # drawn from p
    fitted = evaluate.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # ... and it is what calibrates them.
    assert evaluate.expected_calibration_error(labels, _softmax(logits / fitted)) < 0.01


def test_temperature_changes_no_prediction_and_lowers_an_overconfident_ece():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5000, 10)) * 3
    labels = (_softmax(logits / 3).cumsum(1) > rng.uniform(size=(5000, 1))).argmax(1)
    t = evaluate.fit_temperature(logits, labels)
    assert t > 2
    np.testing.assert_array_equal(_softmax(logits / t).argmax(1), logits.argmax(1))
    assert evaluate.expected_calibration_error(labels, _softmax(logits / t)) < (
        evaluate.expected_calibration_error(labels, _softmax(logits)) / 5
    )


def test_the_run_reports_calibration_and_the_saved_model_carries_its_temperature(trained_run, fixture_mnist):
    import keras

    from model.network import TEMPERATURE_LAYER
    from model.train import logits_model

    metrics = json.loads((trained_run / contract.RUN_METRICS_FILE).read_text())
    calibration = metrics["calibration"]
    for key in ("test_ece", "test_ece_uncalibrated", "test_ece_temperature_scaled", "val_ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert calibration["ece_bins"] == 15 and calibration["threshold"] == 0.02
    # auto: applied exactly when the validation ECE is above the threshold.
    assert calibration["applied"] == (calibration["val_ece_uncalibrated"] > 0.02)
    assert calibration["temperature"] == (calibration["fitted_temperature"] if calibration["applied"] else 1.0)
    assert calibration["val_ece_temperature_scaled"] <= calibration["val_ece_uncalibrated"]

    model = keras.models.load_model(trained_run / contract.RUN_MODEL_FILE)
    scale = model.get_layer(TEMPERATURE_LAYER).scale
    assert scale == pytest.approx(1.0 / calibration["temperature"], rel=1e-4)
    # The saved model's probabilities are softmax(logits / T), and its ECE is the reported one.
    images = fixture_mnist.test.images
    probs = model.predict(images, verbose=0)
    logits = logits_model(model).predict(images, verbose=0)
    np.testing.assert_allclose(probs, _softmax(logits / calibration["temperature"]), atol=1e-5)
    assert evaluate.expected_calibration_error(fixture_mnist.test.labels, probs) == pytest.approx(
        metrics["test_ece"], abs=1e-6
    )
    assert evaluate.expected_calibration_error(fixture_mnist.test.labels, _softmax(logits)) == pytest.approx(
        metrics["test_ece_uncalibrated"], abs=1e-6
    )
    assert (trained_run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_forms_carry_the_temperature(exported, fixture_mnist):
    """SavedModel and int8 TFLite give the calibrated probabilities, not the raw softmax."""
    import keras

    from model.train import logits_model

    metrics = json.loads((exported.run_dir / contract.RUN_METRICS_FILE).read_text())
    temperature = metrics["calibration"]["temperature"]
    if temperature == 1.0:
        pytest.skip("the fixture model needed no calibration (validation ECE <= 0.02)")
    images = fixture_mnist.test.images[:200]
    model = keras.models.load_model(exported.run_dir / contract.RUN_MODEL_FILE)
    calibrated = _softmax(logits_model(model).predict(images, verbose=0) / temperature)
    import tensorflow as tf

    served = tf.saved_model.load(str(exported.version_dir))
    out = served.signatures[contract.SIGNATURE_PIXELS](**{contract.INPUT_PIXELS: tf.constant(images)})
    np.testing.assert_allclose(out[contract.OUTPUT_PROBABILITIES].numpy(), calibrated, atol=1e-5)
