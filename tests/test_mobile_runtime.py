"""mobile/runtime.py: the interpreter wrapper, on the session's exported TFLite variants.

Also checks the dependency rule: the code shipped to the Pi imports only the standard
library, numpy, Pillow and a TFLite interpreter, and runs where TensorFlow cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common import contract
import mobile
from mobile import preprocess
from mobile.runtime import (
    MAX_BATCH,
    Classifier,
    ModelError,
    RuntimeNotAvailable,
    load_labels,
    load_runtime,
)
from model import idx
from model import pictures as synth

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("float32", "float16", "dynamic", "int8")
TFLITE_RUNTIME_PYTHON = REPO / ".venv-tflite-runtime" / "bin" / "python"

# Prepended to `python -c` programs: any import of TensorFlow (or of the training-side
# packages) raises, as on a Pi that has neither.
BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"tensorflow", "keras", "common", "model", "export", "serving", "tests"}:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.fixture(scope="module")
def test_split(fixture_data_dir):
    return idx.load_split(fixture_data_dir, "test")


@pytest.fixture(scope="module")
def variants(exported):
    return {name: Classifier.load(exported.mobile_dir / f"{name}.tflite") for name in VARIANTS}


# --- reading the model ---------------------------------------------------------------------
def test_each_variant_reads_its_own_tensor_facts(variants, exported):
    import json

    report = json.loads((exported.mobile_dir / "report.json").read_text())
    for record in report["variants"]:
        clf = variants[record["name"]]
        tensors = record["tensors"]
        assert clf.input_size == (28, 28)
        assert clf.input_dtype.name == tensors["input"]["dtype"]
        assert clf.output_dtype.name == tensors["output"]["dtype"]
        assert clf.input_quantization.scale == pytest.approx(tensors["input"]["scale"])
        assert clf.output_quantization.scale == pytest.approx(tensors["output"]["scale"])
        assert clf.output_quantization.zero_point == tensors["output"]["zero_point"]
    # The int8 variant's output is quantized: the wrapper must dequantize it.
    assert variants["int8"].output_quantization.quantized


def test_accuracy_through_the_wrapper_equals_the_export_report(variants, exported, test_split):
    import json

    report = json.loads((exported.mobile_dir / "report.json").read_text())
    # The export evaluated on the same fixture test set (the run's own data source).
    assert report["test_images"] == len(test_split.labels)
    for record in report["variants"]:
        predicted = variants[record["name"]].predict(test_split.images).argmax(1)
        assert (predicted == test_split.labels).mean() == pytest.approx(record["accuracy"], abs=1e-9)


def test_probabilities_are_dequantized_into_a_distribution(variants, test_split):
    for name, clf in variants.items():
        probabilities = clf.predict(test_split.images[:64])
        assert probabilities.dtype == np.float32 and probabilities.shape == (64, 10)
        assert np.all(probabilities >= 0) and np.allclose(probabilities.sum(1), 1.0, atol=0.05), name


def test_batches_equal_single_pictures_and_chunks(variants, test_split):
    clf = variants["float32"]
    images = test_split.images[: MAX_BATCH + 44]  # more than one chunk
    batch = clf.predict(images)
    singles = np.stack([clf.predict(image) for image in images[:20]])
    np.testing.assert_allclose(batch[:20], singles, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clf.predict(images[MAX_BATCH:]), batch[MAX_BATCH:], rtol=1e-5, atol=1e-6)
    assert clf.predict(images[:0]).shape == (0, 10)


def test_quantized_and_float_models_agree_on_the_sample_photos(variants, test_split):
    photos = synth.synthesize_photos(test_split.images[:40], seed=2)
    pictures = np.stack([preprocess.picture_to_mnist(p.data) for p in photos])
    float_digits = variants["float32"].predict(pictures).argmax(1)
    for name in ("float16", "dynamic", "int8"):
        digits = variants[name].predict(pictures).argmax(1)
        assert (digits == float_digits).mean() >= 0.975, name  # measured: 40/40 on the fixture


def test_labels_file_matches_the_model_and_the_contract(exported, variants):
    labels = load_labels(exported.mobile_dir / "labels.txt")
    assert tuple(labels) == contract.LABELS
    for clf in variants.values():
        assert clf.num_classes == len(labels) and clf.labels == labels


def test_classify_returns_top_k_best_first(variants, test_split):
    [prediction] = variants["int8"].classify(test_split.images[:1], top=5)
    assert len(prediction.top) == 5
    probabilities = [p for _, _, p in prediction.top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert prediction.digit == prediction.top[0][0] and prediction.label == str(prediction.digit)


# --- a model whose input is quantized (scale and zero point != 0) ---------------------------
@pytest.fixture(scope="module")
def quantized_input_models(tmp_path_factory, fixture_data_dir):
    """A float32-input model (raw pixels) and its full-integer build with an int8 input
    (scale ~1, zero point -128): the wrapper must quantize 0-255 pixels itself."""
    import keras
    import tensorflow as tf

    out = tmp_path_factory.mktemp("quantized-input")
    train = idx.load_split(fixture_data_dir, "train")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28), dtype="float32", name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Dense(64, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probabilities")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(train.images.astype("float32"), train.labels, epochs=3, batch_size=64, verbose=0)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", lambda image: {"probabilities": model(image)},
        input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="image")],
    )
    archive.write_out(str(out / "saved"), verbose=False)
    paths = {}
    for kind in ("float", "int8-input"):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(out / "saved"))
        if kind == "int8-input":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([train.images[i : i + 1].astype("float32")] for i in range(200))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        paths[kind] = out / f"{kind}.tflite"
        paths[kind].write_bytes(converter.convert())
    return paths


@pytest.mark.slow
def test_a_quantized_input_is_quantized_with_the_models_own_parameters(quantized_input_models, test_split):
    float_clf = Classifier(quantized_input_models["float"])
    int8_clf = Classifier(quantized_input_models["int8-input"])
    assert float_clf.input_dtype == np.float32 and not float_clf.input_quantization.quantized
    assert int8_clf.input_dtype == np.int8 and int8_clf.input_quantization.quantized
    assert int8_clf.input_quantization.zero_point != 0  # pixels 0-255 need the offset
    images = test_split.images[:500]
    agree = (float_clf.predict(images).argmax(1) == int8_clf.predict(images).argmax(1)).mean()
    assert agree >= 0.97


# --- bad models, labels, settings -----------------------------------------------------------
def test_bad_model_files_fail_clearly(tmp_path, exported):
    with pytest.raises(ModelError, match="not found"):
        Classifier(tmp_path / "missing.tflite")
    with pytest.raises(ModelError, match="directory"):
        Classifier(tmp_path)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelError, match="not a TFLite model"):
        Classifier(junk)
    good = (exported.mobile_dir / "float32.tflite").read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(good[: len(good) // 3])
    with pytest.raises(ModelError, match="cannot load this model"):
        Classifier(truncated)


def test_bad_labels_fail_clearly(tmp_path, exported):
    model = exported.mobile_dir / "float32.tflite"
    with pytest.raises(ModelError, match="labels file not found"):
        Classifier.load(model, tmp_path / "labels.txt")
    short = tmp_path / "short.txt"
    short.write_text("0\n1\n2\n")
    with pytest.raises(ModelError, match="10 outputs but 3 labels"):
        Classifier.load(model, short)
    blank = tmp_path / "blank.txt"
    blank.write_text("0\n\n2\n")
    with pytest.raises(ModelError, match="line 2 is blank"):
        load_labels(blank)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_threads_must_be_a_positive_integer(threads, exported):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        Classifier(exported.mobile_dir / "int8.tflite", threads=threads)


def test_more_threads_give_the_same_answers(variants, exported, test_split):
    four = Classifier.load(exported.mobile_dir / "float32.tflite", threads=4)
    np.testing.assert_allclose(four.predict(test_split.images[:100]), variants["float32"].predict(test_split.images[:100]), rtol=1e-5, atol=1e-6)


def test_runtime_selection_names_what_is_missing():
    interpreter, info = load_runtime("auto")
    assert info.name == "ai-edge-litert" and info.version != "unknown"
    with pytest.raises(RuntimeNotAvailable, match="tflite-runtime: not installed"):
        load_runtime("tflite-runtime")  # .venv holds numpy 2: tflite-runtime lives elsewhere
    with pytest.raises(RuntimeNotAvailable, match="unknown runtime"):
        load_runtime("onnx")


# --- dependency rule ------------------------------------------------------------------------
ALLOWED_TOP_LEVEL = {"numpy", "PIL", "mobile"}
# Imported only inside the function that needs them (importlib or a local import).
ALLOWED_LAZY = ALLOWED_TOP_LEVEL | {"ai_edge_litert", "tflite_runtime", "tensorflow", "picamera2"}


def test_shipped_modules_import_only_stdlib_numpy_pillow():
    package = Path(mobile.__file__).parent
    for name in mobile.SHIPPED_MODULES:
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]] if node.level == 0 else ["mobile"]
            else:
                continue
            top_level = node in tree.body
            for root in roots:
                if root in sys.stdlib_module_names or root == "__future__":
                    continue
                allowed = ALLOWED_TOP_LEVEL if top_level else ALLOWED_LAZY
                assert root in allowed, f"mobile/{name}.py imports {root}"
    # The runtime module names its interpreters only as strings, for importlib.
    source = (package / "runtime.py").read_text()
    assert "import tensorflow" not in source and "from tensorflow" not in source


def _run_blocked(code: str, python: Path = Path(sys.executable), cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-c", BLOCK_TENSORFLOW + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_mobile_imports_and_classifies_where_tensorflow_cannot_be_imported(exported, tmp_path, test_split):
    from PIL import Image

    picture = tmp_path / f"{test_split.labels[0]}-digit.png"
    Image.fromarray(test_split.images[0]).save(picture)
    done = _run_blocked(
        f"""
        try:
            import tensorflow
        except ImportError:
            pass
        else:
            raise SystemExit("the block did not work")
        import mobile.classify, mobile.preprocess, mobile.runtime, mobile.camera
        from mobile.classify import main
        status = main(["--model", {str(exported.mobile_dir / 'int8.tflite')!r}, "--json", {str(picture)!r}])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "model"))
        assert not loaded, loaded
        sys.exit(status)
        """
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)["results"][0]
    assert result["digit"] == int(test_split.labels[0])
    # And asking for TensorFlow explicitly says it is missing, with exit status 2.
    blocked = _run_blocked(
        f"""
        from mobile.classify import main
        sys.exit(main(["--model", {str(exported.mobile_dir / 'int8.tflite')!r}, "--runtime", "tensorflow", {str(picture)!r}]))
        """
    )
    assert blocked.returncode == 2 and "runtime tensorflow cannot be imported" in blocked.stderr


@pytest.mark.skipif(not TFLITE_RUNTIME_PYTHON.exists(), reason="no .venv-tflite-runtime (make setup-tflite-runtime)")
def test_tflite_runtime_under_numpy_1_gives_the_same_probabilities(exported, tmp_path, test_split, variants):
    np.save(tmp_path / "images.npy", test_split.images[:300])
    for name in VARIANTS:
        done = subprocess.run(
            [
                str(TFLITE_RUNTIME_PYTHON), "-c",
                BLOCK_TENSORFLOW + textwrap.dedent(
                    f"""
                    import numpy as np
                    from mobile.runtime import Classifier
                    clf = Classifier({str(exported.mobile_dir / (name + '.tflite'))!r}, runtime="auto")
                    assert clf.runtime.name == "tflite-runtime", clf.runtime
                    assert np.__version__.startswith("1."), np.__version__
                    np.save({str(tmp_path / (name + '.npy'))!r}, clf.predict(np.load({str(tmp_path / 'images.npy')!r})))
                    """
                ),
            ],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )
        assert done.returncode == 0, f"{name}: {done.stderr}"
        theirs = np.load(tmp_path / f"{name}.npy")
        ours = variants[name].predict(test_split.images[:300])
        assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.995, name
        # Different kernels: float outputs agree closely; a quantized output may differ by a
        # few steps of its scale (1/256).
        np.testing.assert_allclose(theirs, ours, atol=0.02 if variants[name].output_quantization.quantized else 0.002)
