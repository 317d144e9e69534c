"""Checks of a SavedModel before it is published: parity with Keras, the warm-up replay, the
picture parity with the Pi, and saved_model_cli (TensorFlow's own tool) on the folder.

Each raises ExportError naming what disagrees; the export publishes nothing then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import configlib, contract
from export.publish import ExportError
from export.warmup import encode_png, read_warmup, warmup_images, warmup_pictures

# Parity tolerance between the Keras model and the exported graph (same kernels, same
# float32 maths: they should agree to rounding error).
PARITY_MAX_ABS_DIFF = 1e-5


def load_signatures(saved_model_dir: Path) -> dict[str, Callable]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    # Keep the loaded object alive as long as its signature functions.
    return {name: _bind(fn, loaded) for name, fn in loaded.signatures.items()}


def _bind(fn, owner):
    def call(**kwargs):
        return fn(**kwargs)

    call.owner = owner  # type: ignore[attr-defined]
    return call


def predict_saved_model(signatures: dict[str, Callable], images: np.ndarray, batch: int = 1024) -> dict[str, np.ndarray]:
    """Run serving_default over uint8 [N, 28, 28] in batches; numpy outputs."""
    import tensorflow as tf

    fn = signatures[contract.SIGNATURE_PIXELS]
    probs, digits = [], []
    for start in range(0, len(images), batch):
        out = fn(**{contract.INPUT_PIXELS: tf.constant(images[start : start + batch])})
        probs.append(out[contract.OUTPUT_PROBABILITIES].numpy())
        digits.append(out[contract.OUTPUT_DIGIT].numpy())
    return {
        contract.OUTPUT_PROBABILITIES: np.concatenate(probs),
        contract.OUTPUT_DIGIT: np.concatenate(digits),
    }


def verify_parity(saved_model_dir: Path, keras_probs: np.ndarray, images: np.ndarray) -> dict[str, Any]:
    """Reload the SavedModel and compare it with the Keras model's probabilities.

    Requires identical argmax and max |difference| <= PARITY_MAX_ABS_DIFF; that the bytes
    signature gives the same digits on the same images sent as 28x28 PNG (lossless) and hands
    them back unchanged as mnist_image; and that its in-graph preprocessing makes the same
    28x28 pictures as the Pi's (mobile/preprocess.py) from synthetic pictures of every kind
    (model/pictures.py), within PICTURE_PARITY_MAX_MEAN_DIFF grey levels each.
    Raises ExportError otherwise. Returns the measured numbers.
    """
    import tensorflow as tf

    signatures = load_signatures(saved_model_dir)
    missing = {contract.SIGNATURE_PIXELS, contract.SIGNATURE_BYTES} - set(signatures)
    if missing:
        raise ExportError(f"exported SavedModel lacks signatures {sorted(missing)}")
    out = predict_saved_model(signatures, images)
    diff = float(np.max(np.abs(out[contract.OUTPUT_PROBABILITIES] - keras_probs)))
    keras_digits = keras_probs.argmax(axis=1)
    mismatched = int((out[contract.OUTPUT_DIGIT] != keras_digits).sum())
    if mismatched or diff > PARITY_MAX_ABS_DIFF:
        raise ExportError(
            f"SavedModel disagrees with the Keras model on {len(images)} test images: "
            f"{mismatched} different digits, max probability difference {diff:.2e} "
            f"(allowed {PARITY_MAX_ABS_DIFF:.0e})"
        )
    sample = images[:64]
    pngs = np.array([encode_png(im) for im in sample], dtype=object)
    bytes_out = signatures[contract.SIGNATURE_BYTES](**{contract.INPUT_BYTES: tf.constant(pngs)})
    bytes_digits = bytes_out[contract.OUTPUT_DIGIT].numpy()
    if not np.array_equal(bytes_digits, out[contract.OUTPUT_DIGIT][: len(sample)]):
        raise ExportError("the serving_bytes signature disagrees with serving_default on PNG-encoded test images")
    if not np.array_equal(bytes_out[contract.OUTPUT_MNIST_IMAGE].numpy(), sample):
        raise ExportError(f"serving_bytes' {contract.OUTPUT_MNIST_IMAGE} is not the MNIST test image it was sent as PNG")
    pictures = picture_parity(signatures[contract.SIGNATURE_BYTES], images[:PICTURE_PARITY_DIGITS])
    warmup = replay_warmup(saved_model_dir / contract.WARMUP_FILE, signatures)
    return {"images": int(len(images)), "max_abs_diff": diff, "digit_mismatches": mismatched,
            "bytes_signature_images": int(len(sample)), "pictures": pictures, "warmup_requests": warmup}


def replay_warmup(path: Path, signatures: dict[str, Callable]) -> int:
    """Run every warm-up request through its signature, as TF Serving does at load (where a
    failing one stops the version from loading). Raises ExportError naming the failure;
    returns the number of requests."""
    import tensorflow as tf

    logs = read_warmup(path)
    for i, log in enumerate(logs):
        request = log.predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        try:
            signatures[request.model_spec.signature_name](**inputs)
        except (tf.errors.OpError, KeyError, TypeError) as err:
            raise ExportError(f"warm-up request {i + 1} of {len(logs)} ({request.model_spec.signature_name}) "
                              f"fails: {getattr(err, 'message', err)}") from err
    return len(logs)


# The in-graph preprocessing and the Pi's follow one specification with the same float32
# arithmetic and agree exactly on the benchmark's pictures (make bench-mobile); this bound
# leaves room for a last-bit difference in a decoder or a sum's order.
PICTURE_PARITY_MAX_MEAN_DIFF = 1.0  # mean |difference| of one 28x28 picture, grey levels
PICTURE_PARITY_DIGITS = 2  # synthetic pictures per kind checked at export


def picture_parity(serve_bytes: Callable, digits: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Compare serving_bytes' mnist_image with mobile.preprocess on synthetic pictures of every
    kind made from `digits` (uint8 [N, 28, 28]). Raises ExportError when they differ by more
    than PICTURE_PARITY_MAX_MEAN_DIFF, or when only one of the two refuses a picture."""
    import tensorflow as tf

    from model.pictures import KINDS, synthesize_kind
    from mobile import preprocess

    worst, count = 0.0, 0
    for kind in KINDS:
        for photo in synthesize_kind(kind, digits, seed=seed):
            try:
                pi = preprocess.picture_to_mnist(photo.data)
            except preprocess.PictureError as err:
                pi = err
            try:
                graph = serve_bytes(**{contract.INPUT_BYTES: tf.constant([photo.data])})[contract.OUTPUT_MNIST_IMAGE].numpy()[0]
            except tf.errors.InvalidArgumentError as err:
                graph = err
            if isinstance(pi, Exception) or isinstance(graph, Exception):
                if not (isinstance(pi, Exception) and isinstance(graph, Exception)):
                    raise ExportError(f"on a synthetic {kind} picture the Pi's preprocessing gives {_outcome(pi)} "
                                      f"but serving_bytes gives {_outcome(graph)}")
                continue
            difference = float(np.abs(pi.astype(np.int16) - graph.astype(np.int16)).mean())
            if difference > PICTURE_PARITY_MAX_MEAN_DIFF:
                raise ExportError(f"on a synthetic {kind} picture serving_bytes' {contract.OUTPUT_MNIST_IMAGE} differs "
                                  f"from the Pi's preprocessing by {difference:.2f} grey levels on average "
                                  f"(allowed {PICTURE_PARITY_MAX_MEAN_DIFF})")
            worst, count = max(worst, difference), count + 1
    return {"pictures": count, "max_mean_abs_diff": worst, "kinds": list(KINDS)}


def _outcome(result: Any) -> str:
    if isinstance(result, Exception):
        return f"an error ({getattr(result, 'message', str(result))[:200]})"
    return "a picture"


def saved_model_cli(*args: str, timeout: float = 300) -> str:
    """Run TensorFlow's saved_model_cli with this interpreter; returns stdout."""
    cmd = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise ExportError(f"saved_model_cli {args[0]} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def verify_with_cli(saved_model_dir: Path) -> dict[str, Any]:
    """`saved_model_cli show --all` lists both signatures with the right dtypes and shapes;
    `saved_model_cli run` executes each on the warm-up inputs and prints every output."""
    shown = saved_model_cli("show", "--dir", str(saved_model_dir), "--all")
    expectations = [
        f"signature_def['{contract.SIGNATURE_PIXELS}']",
        f"signature_def['{contract.SIGNATURE_BYTES}']",
        f"inputs['{contract.INPUT_PIXELS}'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, {contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH})",
        f"inputs['{contract.INPUT_BYTES}'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)",
        f"outputs['{contract.OUTPUT_PROBABILITIES}'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)",
        f"outputs['{contract.OUTPUT_DIGIT}'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)",
        f"outputs['{contract.OUTPUT_MNIST_IMAGE}'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, {contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH})",
    ]
    missing = [e for e in expectations if e not in shown]
    if missing:
        raise ExportError("saved_model_cli show does not list: " + "; ".join(m.replace("\n", " ") for m in missing))
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        # --input_exprs only takes Python literals now; a .npy file carries the uint8 batch,
        # and the pictures as fixed-length bytes (numpy "S": no pickle; PNG and JPEG files do
        # not end in the NUL bytes it would drop).
        npy = Path(scratch) / "image.npy"
        with configlib.naming_file(npy):
            np.save(npy, warmup_images(2))
        pictures = Path(scratch) / "pictures.npy"
        with configlib.naming_file(pictures):
            np.save(pictures, np.array(warmup_pictures(), dtype=bytes))
        runs = {
            contract.SIGNATURE_PIXELS: (f"{contract.INPUT_PIXELS}={npy}", (contract.OUTPUT_PROBABILITIES, contract.OUTPUT_DIGIT)),
            contract.SIGNATURE_BYTES: (f"{contract.INPUT_BYTES}={pictures}",
                                       (contract.OUTPUT_PROBABILITIES, contract.OUTPUT_DIGIT, contract.OUTPUT_MNIST_IMAGE)),
        }
        for signature, (inputs, keys) in runs.items():
            ran = saved_model_cli("run", "--dir", str(saved_model_dir), "--tag_set", "serve",
                                  "--signature_def", signature, "--inputs", inputs)
            for key in keys:
                if f"Result for output key {key}" not in ran:
                    raise ExportError(f"saved_model_cli run of {signature} printed no result for output {key!r}:\n{ran[-1000:]}")
    return {"show": "ok", "run": "ok"}
