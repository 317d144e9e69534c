"""The SavedModel for TF Serving and the TFLite files, on the fixture run's model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import contract
from export import saved_model as sm
from export import tflite
from export.pipeline import EXIT_GATE_REFUSED

from .conftest import REPO, python_env
from .process_guard import stopping

# Stated tolerances of the parity test (probabilities, max |difference| vs Keras).
PARITY_TOLERANCE = {"saved_model": 1e-5, "float32": 1e-4, "float16": 5e-3, "dynamic": 0.1, "int8": 0.1}
PARITY_MIN_AGREEMENT = {"saved_model": 1.0, "float32": 1.0, "float16": 1.0, "dynamic": 0.98, "int8": 0.98}


@pytest.fixture(scope="module")
def keras_model(exported):
    import keras

    return keras.models.load_model(exported.run_dir / contract.RUN_MODEL_FILE, compile=False)


@pytest.fixture(scope="module")
def signatures(exported):
    return sm.load_signatures(exported.version_dir)


def picture(image: np.ndarray, size: int, fmt: str, colour: bool = False, invert: bool = False) -> bytes:
    """An MNIST digit as a PNG/JPEG picture of another size, optionally coloured or inverted."""
    from PIL import Image

    pil = Image.fromarray(255 - image if invert else image).resize((size, size), Image.BICUBIC)
    if colour:  # ink in orange, background in dark blue (or the reverse when inverted)
        grey = np.asarray(pil, dtype=np.float32)[..., None] / 255.0
        ink, paper = np.array([255, 170, 40]), np.array([20, 30, 90])
        if invert:
            ink, paper = paper, np.array([250, 245, 225])
            grey = 1.0 - grey
        pil = Image.fromarray((paper + grey * (ink - paper)).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# --- the SavedModel ------------------------------------------------------------------------

def test_layout_tf_serving_expects(exported):
    version = exported.version_dir
    assert version.name == "1" and (version / "saved_model.pb").is_file()
    assert (version / "variables" / "variables.index").is_file()
    assert (version / contract.WARMUP_FILE).is_file()
    metrics = sm.read_version_metrics(version)
    assert metrics["test_accuracy"] == pytest.approx(exported.summary["saved_model"]["test_accuracy"])
    assert metrics["gate"]["passed"] and metrics["parity"]["digit_mismatches"] == 0
    assert (version / "assets.extra" / "export_config.json").is_file()
    assert not [p for p in exported.model_dir.iterdir() if p.name.startswith(sm.TMP_PREFIX)]


def test_signature_names_dtypes_and_shapes(signatures):
    import tensorflow as tf

    assert {contract.SIGNATURE_PIXELS, contract.SIGNATURE_BYTES} <= set(signatures)
    expected_inputs = {
        contract.SIGNATURE_PIXELS: (contract.INPUT_PIXELS, tf.uint8, [None, 28, 28]),
        contract.SIGNATURE_BYTES: (contract.INPUT_BYTES, tf.string, [None]),
    }
    for name, (key, dtype, shape) in expected_inputs.items():
        fn = signatures[name].owner.signatures[name]
        _, kwargs = fn.structured_input_signature
        assert list(kwargs) == [key]
        assert kwargs[key].dtype == dtype and kwargs[key].shape.as_list() == shape
        outputs = fn.structured_outputs
        extra = {contract.OUTPUT_MNIST_IMAGE} if name == contract.SIGNATURE_BYTES else set()
        assert set(outputs) == {contract.OUTPUT_PROBABILITIES, contract.OUTPUT_DIGIT} | extra
        if extra:
            assert outputs[contract.OUTPUT_MNIST_IMAGE].dtype == tf.uint8
            assert outputs[contract.OUTPUT_MNIST_IMAGE].shape.as_list() == [None, 28, 28]
        assert outputs[contract.OUTPUT_PROBABILITIES].dtype == tf.float32
        assert outputs[contract.OUTPUT_PROBABILITIES].shape.as_list() == [None, 10]
        assert outputs[contract.OUTPUT_DIGIT].dtype == tf.int64
        assert outputs[contract.OUTPUT_DIGIT].shape.as_list() == [None]


def test_saved_model_cli_sees_both_signatures(exported):
    assert sm.verify_with_cli(exported.version_dir) == {"show": "ok", "run": "ok"}


def test_warmup_file_holds_predict_requests_that_run(exported, signatures):
    import tensorflow as tf

    logs = sm.read_warmup(exported.version_dir / contract.WARMUP_FILE)
    seen = set()
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == contract.MODEL_NAME
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert out[contract.OUTPUT_PROBABILITIES].shape[0] == len(next(iter(inputs.values())))
        seen.add(request.model_spec.signature_name)
    assert seen == {contract.SIGNATURE_PIXELS, contract.SIGNATURE_BYTES}


@pytest.mark.parametrize(
    "fmt, size, colour, invert",
    [("PNG", 28, False, False), ("PNG", 280, False, False), ("JPEG", 64, False, False),
     ("PNG", 97, True, False), ("JPEG", 150, True, False), ("PNG", 200, False, True),
     ("JPEG", 120, True, True)],
)
def test_bytes_signature_matches_raw_pixels(signatures, fixture_mnist, fmt, size, colour, invert):
    import tensorflow as tf

    images = fixture_mnist.test.images[:40]
    raw = signatures[contract.SIGNATURE_PIXELS](**{contract.INPUT_PIXELS: tf.constant(images)})
    raw_digits = raw[contract.OUTPUT_DIGIT].numpy()
    confident = raw[contract.OUTPUT_PROBABILITIES].numpy().max(axis=1) > 0.9
    pictures = np.array([picture(im, size, fmt, colour, invert) for im in images], dtype=object)
    out = signatures[contract.SIGNATURE_BYTES](**{contract.INPUT_BYTES: tf.constant(pictures)})
    digits = out[contract.OUTPUT_DIGIT].numpy()
    assert confident.sum() >= 20
    # Confident raw predictions survive re-encoding, resizing, colour and polarity.
    np.testing.assert_array_equal(digits[confident], raw_digits[confident])


def test_broken_picture_gives_a_clear_error(signatures, fixture_mnist):
    import tensorflow as tf

    good = picture(fixture_mnist.test.images[0], 28, "PNG")
    cases = {b"this is not an image": "not an image (expected PNG, JPEG, BMP or WebP",
             good[: len(good) // 2]: "PNG"}
    for broken, reason in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            signatures[contract.SIGNATURE_BYTES](**{contract.INPUT_BYTES: tf.constant([good, broken])})
        assert reason in info.value.message, info.value.message


# --- atomic publish and versions -----------------------------------------------------------

def _dummy_writer(marker: str):
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "saved_model.pb").write_text(marker)

    return write


def test_failure_between_write_and_rename_leaves_no_version(tmp_path):
    model_dir = tmp_path / "mnist"

    def fail(tmp: Path) -> None:
        assert (tmp / "saved_model.pb").exists()  # written, not yet renamed
        raise RuntimeError("injected failure before the rename")

    with pytest.raises(RuntimeError, match="injected"):
        sm.publish(model_dir, _dummy_writer("a"), before_rename=fail)
    assert sm.numeric_versions(model_dir) == []
    assert [p.name for p in model_dir.iterdir() if not p.name.startswith(".")] == []
    assert not [p for p in model_dir.iterdir() if p.name.startswith(sm.TMP_PREFIX)]


def test_versions_only_grow_and_are_never_overwritten(tmp_path):
    model_dir = tmp_path / "mnist"
    assert sm.publish(model_dir, _dummy_writer("one"))[0] == 1
    assert sm.publish(model_dir, _dummy_writer("two"))[0] == 2
    first = (model_dir / "1" / "saved_model.pb").read_text()
    with pytest.raises(sm.ExportError, match="never overwritten"):
        sm.publish(model_dir, _dummy_writer("again"), version=1)
    assert (model_dir / "1" / "saved_model.pb").read_text() == first == "one"
    # A deleted version's number is not reused: versions only grow.
    import shutil

    shutil.rmtree(model_dir / "2")
    assert sm.publish(model_dir, _dummy_writer("three"))[0] == 3
    with pytest.raises(sm.ExportError, match="versions only grow"):
        sm.publish(model_dir, _dummy_writer("two again"), version=2)
    assert sm.numeric_versions(model_dir) == [1, 3]


def test_kill_during_export_leaves_no_numeric_folder(tmp_path, exported):
    """SIGKILL the real exporter while it writes; TF Serving must never see a version."""
    serving = tmp_path / "serving"
    model_dir = serving / "mnist"
    with stopping(subprocess.Popen(
        [sys.executable, "-m", "export", "--run", str(exported.run_dir), "--serving-base", str(serving),
         "--no-tflite", "--min-accuracy", "0"],
        cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )) as proc:  # stopped even when an assertion below fails first
        deadline = time.time() + 240
        while time.time() < deadline:
            tmps = [p for p in model_dir.glob(f"{sm.TMP_PREFIX}*")] if model_dir.exists() else []
            if tmps and any(any(t.rglob("*")) for t in tmps):
                break
            assert proc.poll() is None, "the exporter finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sm.numeric_versions(model_dir) == []
    assert [p for p in model_dir.glob(f"{sm.TMP_PREFIX}*")], "the kill should leave the temporary folder"
    # The next publish cleans up after the dead writer.
    sm.publish(model_dir, _dummy_writer("x"))
    assert not list(model_dir.glob(f"{sm.TMP_PREFIX}*"))


# --- the quality gate ----------------------------------------------------------------------

def test_gate_rules():
    passed = sm.quality_gate(0.99, 0.991, 3, min_accuracy=0.97, max_regression=0.002, force=False)
    assert passed.passed and not passed.reasons
    low = sm.quality_gate(0.95, None, None, 0.97, 0.002, False)
    assert not low.passed and "below the threshold 0.9700" in low.reasons[0]
    regressed = sm.quality_gate(0.985, 0.990, 3, 0.97, 0.002, False)
    assert not regressed.passed and "0.50 points below published version 3" in regressed.reasons[0]
    forced = sm.quality_gate(0.95, None, None, 0.97, 0.002, True)
    assert forced.forced and not forced.passed


def test_gate_refuses_a_bad_model_and_force_overrides(exported, copy_serving_base):
    serving = copy_serving_base()
    base = [sys.executable, "-m", "export", "--run", str(exported.run_dir), "--serving-base", str(serving),
            "--no-tflite", "--no-cli-check"]
    refused = subprocess.run([*base, "--min-accuracy", "0.999"], cwd=REPO, env=python_env(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == EXIT_GATE_REFUSED
    assert "quality gate refused to publish" in refused.stderr and "below the threshold 0.9990" in refused.stderr
    assert "--force" in refused.stderr
    assert sm.numeric_versions(serving / "mnist") == [1]

    forced = subprocess.run([*base, "--min-accuracy", "0.999", "--force"], cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "despite the quality gate" in forced.stdout
    assert sm.numeric_versions(serving / "mnist") == [1, 2]
    gate = sm.read_version_metrics(serving / "mnist" / "2")["gate"]
    assert gate["forced"] and not gate["passed"]


def test_gate_compares_with_the_published_version_on_the_same_images(exported, fixture_mnist, keras_model, tmp_path):
    """A clearly worse model (weights shuffled) is refused against the published baseline."""
    import keras

    worse = keras.models.clone_model(keras_model)
    rng = np.random.default_rng(0)
    weights = [w if w.ndim < 2 else rng.permutation(w) for w in keras_model.get_weights()]
    worse.set_weights(weights)
    serving = tmp_path / "serving"
    import shutil

    shutil.copytree(exported.model_dir, serving / "mnist")
    with pytest.raises(sm.GateRefused, match="points below published version 1"):
        sm.export_saved_model(worse, serving / "mnist", fixture_mnist.test.images,
                              fixture_mnist.test.labels.astype(np.int64), {}, min_accuracy=0.0,
                              cli_check=False, log=lambda *_: None)
    assert sm.numeric_versions(serving / "mnist") == [1]


# --- TFLite --------------------------------------------------------------------------------

def test_report_files_hold_every_field(exported):
    mobile = exported.mobile_dir
    for name in ("report.json", "report.md", "size_accuracy.png", "mnist.tflite", contract.LABELS_FILE,
                 "export_config.json"):
        assert (mobile / name).is_file(), name
    report = json.loads((mobile / "report.json").read_text())
    assert 0 < report["keras_accuracy"] <= 1
    assert [v["name"] for v in report["variants"]] == list(tflite.VARIANTS)
    for v in report["variants"]:
        for key in ("name", "path", "size_bytes", "accuracy", "agreement", "latency_us_p50",
                    "latency_us_p99", "runtimes"):
            assert key in v, (v["name"], key)
        assert (mobile / v["path"]).stat().st_size == v["size_bytes"]
        assert v["latency_us_p50"] <= v["latency_us_p99"]
        assert v["name"] in (mobile / "report.md").read_text()
    assert report["recommended"] in tflite.VARIANTS
    recommended = next(v for v in report["variants"] if v["name"] == report["recommended"])
    assert (mobile / "mnist.tflite").read_bytes() == (mobile / recommended["path"]).read_bytes()
    assert (mobile / contract.LABELS_FILE).read_text().split() == list(contract.LABELS)


def test_every_variant_runs_in_both_runtimes(exported):
    report = json.loads((exported.mobile_dir / "report.json").read_text())
    for v in report["variants"]:
        assert v["runtimes"] == ["ai-edge-litert", "tflite-runtime"], (v["name"], v["runtime_errors"])
        assert v["tflite_runtime_agreement"] >= 0.99
        assert 0 < v["tflite_runtime_latency_us_p50"] <= v["tflite_runtime_latency_us_p99"], v["name"]
    # The dynamic-range trap (FULLY_CONNECTED v12) is avoided, so int8 is the recommendation
    # whenever its accuracy holds up.
    by_name = {v["name"]: v for v in report["variants"]}
    if by_name["float32"]["accuracy"] - by_name["int8"]["accuracy"] <= tflite.INT8_MAX_ACCURACY_DROP:
        assert report["recommended"] == "int8"


def test_flatten_has_a_constant_shape_in_every_variant(exported):
    # Keras' Flatten computes its shape at run time (SHAPE, STRIDED_SLICE, PACK); the
    # conversion replaces it with a constant reshape, which tflite-runtime runs about twice
    # as fast (dynamic shapes re-prepare every op on each invoke).
    from ai_edge_litert.interpreter import Interpreter

    for name in tflite.VARIANTS:
        interpreter = Interpreter(model_path=str(exported.mobile_dir / f"{name}.tflite"))
        ops = {op["op_name"] for op in interpreter._get_ops_details()}  # noqa: SLF001
        assert "FULLY_CONNECTED" in ops and "RESHAPE" in ops, (name, ops)
        assert not ops & {"SHAPE", "STRIDED_SLICE", "PACK"}, (name, ops)


def test_int8_takes_raw_uint8_and_is_small(exported):
    report = json.loads((exported.mobile_dir / "report.json").read_text())
    int8 = next(v for v in report["variants"] if v["name"] == "int8")
    assert int8["tensors"]["input"]["dtype"] == "uint8"
    assert int8["tensors"]["input"]["shape"] == [-1, 28, 28]
    assert int8["tensors"]["output"]["scale"] > 0  # quantized output: readers must dequantize
    assert int8["size_bytes"] < 1_000_000


def test_parity_across_every_form_of_the_model(exported, keras_model, signatures, fixture_mnist):
    """Keras, the SavedModel and each TFLite variant on a fixed batch, within stated tolerances."""
    batch = fixture_mnist.test.images[:256]
    reference = keras_model.predict(batch, verbose=0)
    forms = {"saved_model": sm.predict_saved_model(signatures, batch)[contract.OUTPUT_PROBABILITIES]}
    for variant in tflite.VARIANTS:
        forms[variant] = tflite.LiteModel(exported.mobile_dir / f"{variant}.tflite").predict(batch)
    for name, probs in forms.items():
        diff = float(np.max(np.abs(probs - reference)))
        agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
        assert diff <= PARITY_TOLERANCE[name], (name, diff)
        assert agreement >= PARITY_MIN_AGREEMENT[name], (name, agreement)


def test_calibration_never_uses_test_images(exported, fixture_mnist):
    from export.pipeline import ExportConfig, load_run_data

    run_data = load_run_data(ExportConfig(run=exported.run_dir, calibration_images=300))
    test_rows = {im.tobytes() for im in fixture_mnist.test.images}
    validation_rows = {im.tobytes() for im in fixture_mnist.train.images[-500:]}
    for image in run_data.calibration_images:
        assert image.tobytes() not in test_rows and image.tobytes() not in validation_rows


def test_export_refuses_a_run_without_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export", "--run", str(tmp_path)], cwd=REPO,
                          env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no model.keras there" in proc.stderr
