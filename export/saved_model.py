"""The SavedModel for TensorFlow Serving: signatures, warm-up, verification, atomic publish.

Layout TF Serving expects under its model base path:

    <base>/mnist/<version>/saved_model.pb
                          /variables/...
                          /assets.extra/tf_serving_warmup_requests   (replayed at load)
                          /assets.extra/metrics.json                 (what we measured)

Signatures (names from common/contract.py):

    serving_default  image        uint8  [-1, 28, 28]  raw pixels, /255 is inside the graph
                     -> probabilities float32 [-1, 10], digit int64 [-1]
    serving_bytes    image_bytes  string [-1]          PNG/JPEG/BMP/WebP of any size
                     -> probabilities, digit, and mnist_image uint8 [-1, 28, 28]: the picture
                        in MNIST form, made inside the graph by export/picture_graph.py (the
                        specification in mobile/preprocess.py, the same the Pi runs)

Publishing is atomic: TF Serving polls the base path every second and would try to load a
half-written folder, so the SavedModel is written and verified under a non-numeric temporary
name in the same folder, then renamed to its version number. Versions only grow (a high-water
mark survives deleted versions) and an existing version is never touched. A failed write (a
full disk, a quota, a read-only folder) removes the temporary folder and raises ExportError
naming the file and the cause; once renamed, a version is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from common import configlib, contract
from common.versions import numeric_versions

TMP_PREFIX = ".tmp-export-"  # non-numeric: TF Serving ignores such folders
HIGH_WATER_FILE = ".last_version"
LOCK_FILE = ".publish.lock"
WARMUP_BATCH_SIZES = (1, 8)

# Parity tolerance between the Keras model and the exported graph (same kernels, same
# float32 maths: they should agree to rounding error).
PARITY_MAX_ABS_DIFF = 1e-5


class ExportError(RuntimeError):
    """The export cannot go on; nothing was published."""


class GateRefused(ExportError):
    """The quality gate refused the model (override with --force)."""


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------

def next_version(model_dir: Path) -> int:
    """One more than every version ever published here (deleted ones included)."""
    high = max(numeric_versions(model_dir), default=0)
    mark = model_dir / HIGH_WATER_FILE
    if mark.exists():
        try:
            high = max(high, int(mark.read_text().strip() or 0))
        except ValueError:
            pass
    return high + 1


@contextlib.contextmanager
def publish_lock(model_dir: Path) -> Iterator[None]:
    """Serialise publishers of one model folder (two exports never pick the same number)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk; an OSError names `path`."""
    with configlib.naming_file(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk before the rename makes it visible."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def remove_stale_temporaries(model_dir: Path) -> list[Path]:
    """Delete temporary export folders whose writer process is gone (a crash or kill)."""
    return configlib.remove_leftovers(model_dir, re.escape(TMP_PREFIX) + r"(?P<pid>\d+)-.*")


def publish(
    model_dir: Path,
    write: Callable[[Path], None],
    version: int | None = None,
    before_rename: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int, Path]:
    """Write a SavedModel with `write(tmp_dir)`, then atomically rename it to its version.

    `before_rename(tmp_dir)` runs after writing (verification hooks; tests inject failures
    there). Any exception removes the temporary folder and publishes nothing; a failed file
    operation (a full disk, a quota, a read-only or unwritable folder) becomes an ExportError
    whose one line names the file and the cause. The high-water mark is written before the
    rename, so the rename is the last step that can fail: once the version folder is visible
    it is complete, and only the folder's final flush remains (a failure there is logged:
    the version is published). Returns (version, final path).
    """
    model_dir = Path(model_dir)
    tmp = model_dir / f"{TMP_PREFIX}{os.getpid()}-{int(time.time() * 1000)}"
    try:
        with configlib.naming_file(model_dir):
            model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(model_dir)
        write(tmp)
        if before_rename is not None:
            before_rename(tmp)
        _fsync_tree(tmp)
        with publish_lock(model_dir):
            number = next_version(model_dir) if version is None else int(version)
            if number < 1:
                raise ExportError(f"version must be a positive integer, got {number}")
            final = model_dir / str(number)
            if final.exists():
                raise ExportError(f"{final} already exists: published versions are never overwritten")
            if number < next_version(model_dir):
                raise ExportError(
                    f"version {number} is not above the highest version ever published here "
                    f"({next_version(model_dir) - 1}): versions only grow"
                )
            # The mark first: if the rename then fails, a number is skipped, which is harmless.
            _write_high_water_mark(model_dir, number)
            with configlib.naming_file(final):
                os.rename(tmp, final)  # atomic on one filesystem
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = configlib.write_failure(err)
        if failure is not None and not isinstance(err, ExportError):
            raise ExportError(
                f"writing the new version under {model_dir} failed: {failure}; nothing was published"
            ) from err
        raise
    try:
        fsync_path(model_dir)  # makes the rename itself durable
    except OSError as err:
        log(f"warning: version {number} is published at {final}, but flushing {model_dir} to disk failed "
            f"({configlib.write_failure(err)}): a power cut now could lose the rename")
    return number, final


def _write_high_water_mark(model_dir: Path, number: int) -> None:
    mark, mark_tmp = model_dir / HIGH_WATER_FILE, model_dir / f".{HIGH_WATER_FILE}.tmp"
    try:
        with configlib.naming_file(mark):
            mark_tmp.write_text(f"{number}\n")
            fsync_path(mark_tmp)
            os.replace(mark_tmp, mark)
    except BaseException:
        mark_tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------

def pixels_archive(model, serve_pixels):
    """A keras.export.ExportArchive tracking `model` with the pixels signature: `serve_pixels`
    called on uint8 [batch, 28, 28] under the name contract.INPUT_PIXELS.

    The SavedModel for TF Serving and the TFLite converter's SavedModel both start here, so
    their pixels signature is one definition.
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=contract.SIGNATURE_PIXELS,
        fn=serve_pixels,
        input_signature=[tf.TensorSpec([None, *contract.IMAGE_SHAPE], tf.uint8, name=contract.INPUT_PIXELS)],
    )
    return archive


def build_archive(model):
    """A keras.export.ExportArchive with both signatures around `model` (no I/O)."""
    import tensorflow as tf

    def outputs(probabilities):
        return {
            contract.OUTPUT_PROBABILITIES: probabilities,
            contract.OUTPUT_DIGIT: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    def serve_pixels(image):  # the argument's name becomes the signature's input key
        return outputs(model(image, training=False))

    def serve_bytes(image_bytes):
        from export.picture_graph import picture_to_mnist

        images = tf.map_fn(
            picture_to_mnist, image_bytes,
            fn_output_signature=tf.TensorSpec(contract.IMAGE_SHAPE, tf.uint8),
        )
        return {**outputs(model(images, training=False)), contract.OUTPUT_MNIST_IMAGE: images}

    assert serve_pixels.__code__.co_varnames[0] == contract.INPUT_PIXELS
    assert serve_bytes.__code__.co_varnames[0] == contract.INPUT_BYTES

    archive = pixels_archive(model, serve_pixels)
    archive.add_endpoint(
        name=contract.SIGNATURE_BYTES,
        fn=serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=contract.INPUT_BYTES)],
    )
    return archive


# --------------------------------------------------------------------------------------------
# Warm-up and metrics files
# --------------------------------------------------------------------------------------------

def warmup_images(batch: int) -> np.ndarray:
    """uint8 [batch, 28, 28]: a synthetic stroke, enough to run every kernel once."""
    images = np.zeros((batch, *contract.IMAGE_SHAPE), dtype=np.uint8)
    images[:, 4:24, 13:15] = 255
    return images


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3|4] pixels as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def warmup_pictures() -> list[bytes]:
    """Encoded pictures for serving_bytes' warm-up, one per path through its preprocessing:
    a 28x28 MNIST-form PNG (passed through), and the synthetic stroke drawn dark on white
    paper as PNG and as JPEG (the whole pipeline, both decoders)."""
    import io

    from PIL import Image

    stroke = warmup_images(1)[0]
    paper = 255 - np.kron(stroke, np.ones((3, 3), np.uint8))  # 84 x 84, a dark bar on white
    buffer = io.BytesIO()
    Image.fromarray(paper).save(buffer, format="JPEG", quality=90)
    return [encode_png(stroke), encode_png(paper), buffer.getvalue()]


def write_warmup(path: Path, model_name: str = contract.MODEL_NAME) -> int:
    """TF Serving's warm-up file: a TFRecord of PredictionLog protos, one per request.

    TF Serving replays them when it loads the version, before serving it, so the first real
    request does not pay for graph initialisation. Returns the number of records.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    def request(signature: str, key: str, value) -> prediction_log_pb2.PredictionLog:
        req = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
        )
        req.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req)
        )

    records = []
    for batch in WARMUP_BATCH_SIZES:
        records.append(request(contract.SIGNATURE_PIXELS, contract.INPUT_PIXELS, warmup_images(batch)))
    records.append(request(contract.SIGNATURE_BYTES, contract.INPUT_BYTES, np.array(warmup_pictures(), dtype=object)))
    with configlib.naming_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in records:
                writer.write(record.SerializeToString())
    return len(records)


def read_warmup(path: Path) -> list:
    """The PredictionLog records of a warm-up file (for checks and for our local server)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw)
        logs.append(log)
    return logs


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

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
    (export/photos.py), within PICTURE_PARITY_MAX_MEAN_DIFF grey levels each.
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

    from export import photos
    from mobile import preprocess

    worst, count = 0.0, 0
    for kind in photos.KINDS:
        for photo in photos.synthesize_kind(kind, digits, seed=seed):
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
    return {"pictures": count, "max_mean_abs_diff": worst, "kinds": list(photos.KINDS)}


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
        f"inputs['{contract.INPUT_PIXELS}'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 28, 28)",
        f"inputs['{contract.INPUT_BYTES}'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)",
        f"outputs['{contract.OUTPUT_PROBABILITIES}'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)",
        f"outputs['{contract.OUTPUT_DIGIT}'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)",
        f"outputs['{contract.OUTPUT_MNIST_IMAGE}'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 28, 28)",
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


# --------------------------------------------------------------------------------------------
# Quality gate
# --------------------------------------------------------------------------------------------

@dataclass
class GateDecision:
    candidate_accuracy: float
    min_accuracy: float
    baseline_version: int | None
    baseline_accuracy: float | None
    max_regression: float
    passed: bool
    forced: bool
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def quality_gate(
    candidate_accuracy: float,
    baseline_accuracy: float | None,
    baseline_version: int | None,
    min_accuracy: float,
    max_regression: float,
    force: bool,
) -> GateDecision:
    """Bless or refuse a model, as TFX's Evaluator does before pushing.

    Refuses when the candidate's test accuracy is below `min_accuracy`, or more than
    `max_regression` (absolute, 0.002 = 0.2 points) below the published baseline measured on
    the same test images. `force` publishes anyway (the refusal is recorded).
    """
    reasons = []
    if candidate_accuracy < min_accuracy:
        reasons.append(
            f"test accuracy {candidate_accuracy:.4f} is below the threshold {min_accuracy:.4f}"
        )
    if baseline_accuracy is not None and candidate_accuracy < baseline_accuracy - max_regression:
        reasons.append(
            f"test accuracy {candidate_accuracy:.4f} is {100 * (baseline_accuracy - candidate_accuracy):.2f} "
            f"points below published version {baseline_version} ({baseline_accuracy:.4f}) on the same "
            f"test images; at most {100 * max_regression:.2f} points are allowed"
        )
    return GateDecision(
        candidate_accuracy, min_accuracy, baseline_version, baseline_accuracy, max_regression,
        passed=not reasons, forced=bool(reasons) and force, reasons=reasons,
    )


def baseline_accuracy(model_dir: Path, images: np.ndarray, labels: np.ndarray) -> tuple[int | None, float | None]:
    """Accuracy of the newest published version on these images (None when nothing is published)."""
    versions = numeric_versions(model_dir)
    if not versions:
        return None, None
    version = versions[-1]
    try:
        out = predict_saved_model(load_signatures(model_dir / str(version)), images)
    except Exception as err:  # a broken baseline must not block a good candidate silently
        raise ExportError(f"cannot evaluate the published version {version} as the baseline: {err}") from err
    return version, float((out[contract.OUTPUT_DIGIT] == labels).mean())


# --------------------------------------------------------------------------------------------
# The whole SavedModel export
# --------------------------------------------------------------------------------------------

def export_saved_model(
    model,
    model_dir: Path,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    run_metrics: dict[str, Any],
    min_accuracy: float = 0.97,
    max_regression: float = 0.002,
    force: bool = False,
    version: int | None = None,
    parity_images: int = 1000,
    cli_check: bool = True,
    before_rename: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Gate, write, verify and publish `model` as the next version under `model_dir`.

    Args:
      model: the trained keras.Model (uint8 [B, 28, 28] -> float32 [B, 10]).
      model_dir: `<base>/<model name>`, the folder TF Serving watches for versions.
      test_images, test_labels: the test set (uint8 [N, 28, 28], int [N]): the gate measures
        candidate and published baseline on them; the parity check uses the first
        `parity_images`.
      run_metrics: the run's metrics.json content, recorded beside the version.
    Returns a summary dict (version, path, gate, parity). Raises GateRefused or ExportError;
    in both cases nothing new is visible under `model_dir`.
    """
    model_dir = Path(model_dir)
    probs = model.predict(test_images, batch_size=1024, verbose=0)
    candidate = float((probs.argmax(axis=1) == test_labels).mean())
    base_version, base_acc = baseline_accuracy(model_dir, test_images, test_labels)
    gate = quality_gate(candidate, base_acc, base_version, min_accuracy, max_regression, force)
    if not gate.passed and not force:
        raise GateRefused(
            "quality gate refused to publish: " + "; ".join(gate.reasons) + ". Pass --force to publish anyway."
        )
    if gate.forced:
        log("WARNING: publishing despite the quality gate (--force): " + "; ".join(gate.reasons))

    n = min(parity_images, len(test_images))
    checks: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        build_archive(model).write_out(str(tmp), verbose=False)
        write_warmup(tmp / contract.WARMUP_FILE)

    def verify(tmp: Path) -> None:
        checks["parity"] = verify_parity(tmp, probs[:n], test_images[:n])
        if cli_check:
            checks["saved_model_cli"] = verify_with_cli(tmp)
        record = {
            "test_accuracy": candidate,
            "test_images": int(len(test_images)),
            "gate": gate.as_dict(),
            "parity": checks["parity"],
            "run": run_metrics,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        configlib.write_json_atomic(tmp / contract.VERSION_METRICS_FILE, record)
        if before_rename is not None:
            before_rename(tmp)

    number, final = publish(model_dir, write, version=version, before_rename=verify, log=log)
    log(
        f"Published SavedModel version {number} at {final} (test accuracy {candidate:.4f}; "
        f"parity max diff {checks['parity']['max_abs_diff']:.1e} on {n} images)"
    )
    return {"version": number, "path": str(final), "test_accuracy": candidate,
            "gate": gate.as_dict(), **checks}


def read_version_metrics(version_dir: Path) -> dict[str, Any]:
    return json.loads((Path(version_dir) / contract.VERSION_METRICS_FILE).read_text(encoding="utf-8"))
