"""Run a TFLite MNIST classifier with whichever interpreter this machine has.

    clf = Classifier.load("mnist.tflite", threads=1)          # labels.txt beside the model
    probabilities = clf.predict(images)                      # uint8 [N, 28, 28] -> float32 [N, 10]
    [prediction] = clf.classify(images[:1], top=3)

Interpreters, tried in this order by `runtime="auto"`:

- `ai_edge_litert.interpreter` (pip `ai-edge-litert`): the maintained LiteRT runtime; 64-bit
  Pi OS, Python 3.10-3.13, numpy 2.
- `tflite_runtime.interpreter` (pip `tflite-runtime==2.14.0`, the last release): Python <= 3.11
  and numpy < 2 only, but the only wheel for 32-bit (armv7l) Pi OS. It cannot run models that
  use newer op versions (e.g. a dynamic-range-quantized FULLY_CONNECTED from TF >= 2.16).
- `tensorflow.lite` (a full TensorFlow), as a last resort. Never required.

Everything the wrapper needs to know comes from the model file itself: input size, dtypes,
quantization scale and zero point of the input and output, class count. Nothing is assumed
about which variant (float32, float16, dynamic-range, full-integer) it was given.

This module imports only the standard library and numpy at import time; the interpreter module
is imported when a model is loaded. It must keep working under numpy 1.26 (tflite-runtime) and
Python 3.10-3.13.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

RUNTIMES = ("ai-edge-litert", "tflite-runtime", "tensorflow")
RUNTIME_CHOICES = ("auto",) + RUNTIMES

# pip package -> (module holding Interpreter, distribution name for the version).
_RUNTIME_MODULES = {
    "ai-edge-litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "tensorflow": ("tensorflow", "tensorflow"),
}

_INSTALL_HINT = (
    "Install one (see README.md): 64-bit Pi OS / Python 3.10-3.13: "
    "pip install -r requirements.txt (ai-edge-litert); 32-bit Pi OS or numpy<2 on "
    "Python <= 3.11: pip install -r requirements-tflite-runtime.txt (tflite-runtime 2.14.0)."
)

# Every .tflite file is a FlatBuffer whose file identifier (bytes 4-8) is "TFL3".
_TFLITE_IDENTIFIER = b"TFL3"

# Invoke at most this many images at once: bounds the interpreter's tensor memory on a Pi.
MAX_BATCH = 256


class RuntimeNotAvailable(RuntimeError):
    """No usable TFLite interpreter (or not the one asked for). The message says how to fix it."""


class ModelError(ValueError):
    """A missing, unreadable, corrupt or unsuitable model or labels file. Names the file."""


@dataclass(frozen=True)
class RuntimeInfo:
    """Which interpreter runs the model: name is one of RUNTIMES."""

    name: str
    version: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of one tensor: real = scale * (q - zero_point). scale 0 = none."""

    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0


@dataclass(frozen=True)
class Classification:
    """One picture's result: the top class, its probability and the `top` best classes."""

    digit: int
    label: str
    probability: float
    top: tuple[tuple[int, str, float], ...]  # (class index, label, probability), best first

    def to_json(self) -> dict[str, Any]:
        return {
            "digit": self.digit,
            "label": self.label,
            "probability": self.probability,
            "top": [{"digit": d, "label": lab, "probability": p} for d, lab, p in self.top],
        }


# --------------------------------------------------------------------------------------------
# Interpreter selection
# --------------------------------------------------------------------------------------------
def _version_of(distribution: str, module: Any) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib import metadata

        return metadata.version(distribution)
    except Exception:  # noqa: BLE001 - a wheel unpacked without metadata still runs
        return "unknown"


def module_root(runtime: str) -> str:
    """The top-level module a runtime installs, e.g. "ai_edge_litert"."""
    return _RUNTIME_MODULES[runtime][0].split(".")[0]


def _import_runtime(name: str) -> tuple[Any, RuntimeInfo]:
    """Import one runtime; returns (Interpreter class, RuntimeInfo). Raises ImportError."""
    module_name, distribution = _RUNTIME_MODULES[name]
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        return tf.lite.Interpreter, RuntimeInfo(name, _version_of(distribution, tf))
    module = importlib.import_module(module_name)
    top = importlib.import_module(module_name.split(".")[0])
    return module.Interpreter, RuntimeInfo(name, _version_of(distribution, top))


def load_runtime(runtime: str = "auto") -> tuple[Any, RuntimeInfo]:
    """The Interpreter class of `runtime` ("auto" = the first of RUNTIMES that imports).

    Returns (Interpreter class, RuntimeInfo). Raises RuntimeNotAvailable naming every runtime
    tried and why it failed (e.g. tflite-runtime under numpy 2), with install instructions.
    """
    if runtime not in RUNTIME_CHOICES:
        raise RuntimeNotAvailable(
            f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_CHOICES)}"
        )
    candidates = RUNTIMES if runtime == "auto" else (runtime,)
    reasons = []
    for name in candidates:
        try:
            return _import_runtime(name)
        # tflite-runtime built for numpy 1 raises ImportError or AttributeError under numpy 2;
        # a broken install can raise almost anything. Any failure means "try the next one".
        except Exception as err:  # noqa: BLE001
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if isinstance(err, ModuleNotFoundError) and err.name and module_root(name) == err.name:
                first_line = "not installed"
            elif name == "tflite-runtime" and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
                first_line += f" (tflite-runtime needs numpy<2; this is numpy {np.__version__})"
            reasons.append(f"{name}: {first_line}")
    what = "no TFLite interpreter could be imported" if runtime == "auto" else f"runtime {runtime} cannot be imported"
    raise RuntimeNotAvailable(f"{what} ({'; '.join(reasons)}). {_INSTALL_HINT}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def read_model_bytes(path: Path) -> bytes:
    """The bytes of a .tflite file, after checking it exists and looks like a TFLite model."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected a .tflite file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read the model ({err.strerror or err})") from err
    if len(data) < 8:
        raise ModelError(f"{path}: {len(data)} bytes, too short to be a TFLite model")
    if data[4:8] != _TFLITE_IDENTIFIER:
        raise ModelError(
            f"{path}: not a TFLite model (no 'TFL3' FlatBuffer identifier at bytes 4-8; "
            f"found {data[4:8]!r}). Is it a SavedModel, a Keras file or a truncated download?"
        )
    return data


def load_labels(path: Path) -> list[str]:
    """Class names from a labels file: one per line, line i = class index i.

    Blank trailing lines are ignored; a blank line in the middle or a duplicate is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: labels file not found (expected one class name per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read the labels file ({err})") from err
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ModelError(f"{path}: the labels file is empty")
    if "" in labels:
        raise ModelError(f"{path}: line {labels.index('') + 1} is blank")
    if len(set(labels)) != len(labels):
        raise ModelError(f"{path}: duplicate labels {sorted({x for x in labels if labels.count(x) > 1})}")
    return labels


def default_labels_path(model_path: Path) -> Path:
    """labels.txt beside the model."""
    return Path(model_path).with_name("labels.txt")


def _quantization(details: dict[str, Any]) -> Quantization:
    scale, zero_point = details.get("quantization", (0.0, 0))
    return Quantization(float(scale), int(zero_point))


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------
class Classifier:
    """A TFLite image classifier: raw 0-255 pixels in, class probabilities out.

    The model must have one input [N, H, W] (or [N, H, W, 1]) and one output [N, classes].
    Normalisation (/255) is inside the model; this class only converts dtypes and applies
    the model's own quantization parameters.
    """

    def __init__(
        self,
        model_path: Path,
        labels: Sequence[str] | None = None,
        threads: int = 1,
        runtime: str = "auto",
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            # ai-edge-litert rejects 0 and -1 ("use all cores" elsewhere): ask for a count.
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.model_path = Path(model_path)
        self.threads = threads
        content = read_model_bytes(self.model_path)
        interpreter_cls, self.runtime = load_runtime(runtime)
        try:
            self._interpreter = interpreter_cls(model_content=content, num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as err:  # noqa: BLE001 - the runtimes raise ValueError/RuntimeError
            message = " ".join(str(err).split()).rstrip(".")
            hint = ""
            if "version" in message and self.runtime.name == "tflite-runtime":
                hint = (
                    " tflite-runtime 2.14 is older than the converter that wrote this model: "
                    "use ai-edge-litert (64-bit Pi OS) or a float32/int8 variant of the model."
                )
            raise ModelError(
                f"{self.model_path}: {self.runtime.name} {self.runtime.version} cannot load "
                f"this model: {message}.{hint}"
            ) from err
        self._check_signature()
        self.labels = list(labels) if labels is not None else [str(i) for i in range(self.num_classes)]
        if len(self.labels) != self.num_classes:
            raise ModelError(
                f"{self.model_path}: the model has {self.num_classes} outputs but "
                f"{len(self.labels)} labels were given"
            )
        self._batch = int(self._input["shape"][0])

    @classmethod
    def load(
        cls,
        model_path: Path,
        labels_path: Path | None = None,
        threads: int = 1,
        runtime: str = "auto",
    ) -> "Classifier":
        """Load a model and its labels file (default: labels.txt beside the model)."""
        read_model_bytes(Path(model_path))  # a missing model is the first thing to report
        labels_path = Path(labels_path) if labels_path else default_labels_path(model_path)
        labels = load_labels(labels_path)
        try:
            return cls(model_path, labels=labels, threads=threads, runtime=runtime)
        except ModelError as err:
            if "labels were given" in str(err):
                raise ModelError(f"{err} (from {labels_path})") from err
            raise

    def _check_signature(self) -> None:
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{self.model_path}: expected one input and one output, the model has "
                f"{len(inputs)} inputs and {len(outputs)} outputs"
            )
        self._input, self._output = inputs[0], outputs[0]
        shape = [int(d) for d in self._input["shape"]]
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise ModelError(
                f"{self.model_path}: input shape {shape}; expected [N, height, width] or "
                f"[N, height, width, 1] (a greyscale image classifier)"
            )
        out_shape = [int(d) for d in self._output["shape"]]
        if len(out_shape) != 2:
            raise ModelError(f"{self.model_path}: output shape {out_shape}, expected [N, classes]")
        self.input_size = (shape[1], shape[2])  # (height, width)
        self._channel_axis = len(shape) == 4
        self.num_classes = out_shape[1]
        self.input_dtype = np.dtype(self._input["dtype"])
        self.output_dtype = np.dtype(self._output["dtype"])
        self.input_quantization = _quantization(self._input)
        self.output_quantization = _quantization(self._output)
        if self.input_dtype not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32)):
            raise ModelError(f"{self.model_path}: unsupported input dtype {self.input_dtype}")
        if self.input_dtype == np.int8 and not self.input_quantization.quantized:
            raise ModelError(
                f"{self.model_path}: int8 input without quantization parameters cannot hold "
                f"pixels 0-255"
            )

    # -- inference ----------------------------------------------------------------------------
    def _to_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 pixels [N, H, W] -> the model's input tensor (dtype, quantization, channel)."""
        q = self.input_quantization
        if q.quantized:
            info = np.iinfo(self.input_dtype)
            values = np.rint(images.astype(np.float32) / q.scale + q.zero_point)
            tensor = np.clip(values, info.min, info.max).astype(self.input_dtype)
        else:
            tensor = images.astype(self.input_dtype)
        return tensor[..., None] if self._channel_axis else tensor

    def _from_output(self, tensor: np.ndarray) -> np.ndarray:
        """The model's output tensor -> float32 probabilities [N, classes]."""
        q = self.output_quantization
        if q.quantized:
            return (q.scale * (tensor.astype(np.float32) - q.zero_point)).astype(np.float32)
        return tensor.astype(np.float32)

    def _set_batch(self, n: int) -> None:
        if n == self._batch:
            return
        shape = [n, *self.input_size] + ([1] if self._channel_axis else [])
        self._interpreter.resize_tensor_input(self._input["index"], shape)
        self._interpreter.allocate_tensors()
        self._batch = n

    def _invoke(self, images: np.ndarray) -> np.ndarray:
        self._set_batch(len(images))
        self._interpreter.set_tensor(self._input["index"], self._to_input(images))
        self._interpreter.invoke()
        # get_tensor copies, so the result survives the next invoke.
        return self._from_output(self._interpreter.get_tensor(self._output["index"]))

    @property
    def input_details(self) -> dict[str, Any]:
        """The interpreter's details of the input tensor (`name`, `index`, `shape`,
        `shape_signature`, `dtype`, `quantization` (scale, zero_point)), as
        Interpreter.get_input_details() gives them."""
        return dict(self._input)

    @property
    def output_details(self) -> dict[str, Any]:
        """The interpreter's details of the output tensor (keys as input_details)."""
        return dict(self._output)

    def time_invocations(self, image: np.ndarray, runs: int, warmup: int = 100) -> list[float]:
        """Seconds of each of `runs` single-image inferences by the interpreter alone (set the
        input, invoke, read the output), after `warmup` untimed ones. `image`: uint8 [H, W].

        predict()'s argument checks and conversions (a few microseconds) are not counted, so
        this is the number to compare between model variants and runtimes.
        """
        self._set_batch(1)
        x = self._to_input(np.asarray(image)[None])
        index, out = self._input["index"], self._output["index"]
        for _ in range(warmup):
            self._interpreter.set_tensor(index, x)
            self._interpreter.invoke()
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            self._interpreter.set_tensor(index, x)
            self._interpreter.invoke()
            self._interpreter.get_tensor(out)
            seconds.append(time.perf_counter() - start)
        return seconds

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch.

        Takes uint8 [N, H, W] (or one image [H, W]) raw pixels 0-255, white digit on black,
        H x W = `input_size`; returns float32 [N, classes] (or [classes] for one image).
        """
        images = np.asarray(images)
        single = images.ndim == 2
        if single:
            images = images[None]
        if images.ndim != 3 or tuple(images.shape[1:]) != tuple(self.input_size):
            raise ValueError(
                f"expected images of shape [N, {self.input_size[0]}, {self.input_size[1]}], "
                f"got {list(images.shape)}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels 0-255, got {images.dtype}")
        if len(images) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        chunks = [self._invoke(images[i : i + MAX_BATCH]) for i in range(0, len(images), MAX_BATCH)]
        probabilities = np.concatenate(chunks)
        return probabilities[0] if single else probabilities

    def classify(self, images: np.ndarray, top: int = 3) -> list[Classification]:
        """Predictions for a batch uint8 [N, H, W]: top class and the `top` best, best first."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        probabilities = self.predict(np.asarray(images).reshape(-1, *self.input_size))
        return [self.prediction(p, top) for p in probabilities]

    def prediction(self, probabilities: np.ndarray, top: int = 3) -> Classification:
        """A Classification from one row of probabilities [classes]."""
        # Stable sort: ties keep class order, so results are reproducible across runtimes.
        order = np.argsort(-probabilities, kind="stable")[: min(top, self.num_classes)]
        best = [(int(i), self.labels[int(i)], float(probabilities[int(i)])) for i in order]
        digit, label, probability = best[0]
        return Classification(digit, label, probability, tuple(best))


def latency_stats(seconds: Sequence[float], per_second: float) -> dict[str, float]:
    """{"p50", "p99", "mean"} of durations given in seconds, in units of 1/`per_second` s
    (1e6: microseconds, 1e3: milliseconds). Percentiles as numpy's default (linear).

    The one latency summary of the kit: the Pi CLI, the TFLite export, the serving benchmark
    and the query CLI all report these. `seconds` must not be empty.
    """
    scaled = np.asarray(seconds, dtype=np.float64) * per_second
    return {
        "p50": float(np.percentile(scaled, 50)),
        "p99": float(np.percentile(scaled, 99)),
        "mean": float(scaled.mean()),
    }
