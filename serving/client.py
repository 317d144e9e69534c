"""Query TensorFlow Serving (or the local server) over REST: requests + numpy, no TensorFlow.

    from serving.client import RestClient
    client = RestClient("http://localhost:8501")            # model "mnist", latest version
    client.status()                                         # {"model_version_status": [...]}
    prediction = client.predict(images)                     # uint8 [N, 28, 28] raw pixels
    prediction.digits, prediction.probabilities             # int64 [N], float32 [N, 10]
    encoded = client.predict_encoded([open("seven.png", "rb").read()])  # via serving_bytes
    encoded.digits, encoded.mnist_images                    # + uint8 [N, 28, 28] the model saw

Before sending, inputs are checked against the signature the server itself reports
(GET .../metadata, fetched once): dtype and every fixed dimension, because TF Serving does
not check shapes and would answer with an op error deep in the graph, or not at all.

Failures raise a `ServingError` subclass whose `exit_code` the CLI (serving/query.py) uses:

    InputError        3  a bad file, shape or dtype, caught before sending
    UnreachableError  4  no connection (after retries)
    RequestRejected   5  the server refused the request (4xx); carries its own message
    ServerFailure     6  the server failed (5xx, or 503 after retries)
    DeadlineExceeded  7  no answer within the timeout (or 504)

Only connection failures and 503 are retried, with exponential backoff and full jitter
(honouring Retry-After); everything else surfaces at once.

`predict` and `predict_encoded` send at most `max_batch_size` images per request (256, our
batching file's max_batch_size) and join the answers: TF Serving refuses a larger request
("Task size N is larger than maximum input batch size 256"), and its metadata does not say
the limit, so it is a client setting that must not exceed the server's.

This module imports numpy, requests and common/contract.py (pure Python) only; a test
imports it with TensorFlow blocked.
"""

from __future__ import annotations

import base64
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import quote

import numpy as np

from common import contract

DEFAULT_REST_URL = "http://localhost:8501"
DEFAULT_GRPC_TARGET = "localhost:8500"
# The most rows one request may carry: serving/batching_parameters.txt's max_batch_size,
# which TF Serving enforces on every request (a test keeps the two equal).
DEFAULT_MAX_BATCH_SIZE = 256

# What each DataType name in metadata may be fed with, and the numpy dtype sent.
_INTEGER_RANGES = {
    "DT_UINT8": (0, 255, np.uint8), "DT_INT8": (-128, 127, np.int8),
    "DT_INT16": (-(2**15), 2**15 - 1, np.int16), "DT_UINT16": (0, 2**16 - 1, np.uint16),
    "DT_INT32": (-(2**31), 2**31 - 1, np.int32), "DT_INT64": (-(2**63), 2**63 - 1, np.int64),
}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ServingError(Exception):
    """Base of every client error; `exit_code` is what serving.query exits with."""

    exit_code = 1


class InputError(ServingError):
    exit_code = 3


class UnreachableError(ServingError):
    exit_code = 4


class RequestRejected(ServingError):
    """The server answered 4xx (or a gRPC client-side code); `server_message` is its text."""

    exit_code = 5

    def __init__(self, message: str, status: int | str, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class ServerFailure(ServingError):
    exit_code = 6

    def __init__(self, message: str, status: int | str = "", server_message: str = ""):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class DeadlineExceeded(ServingError):
    exit_code = 7


# --------------------------------------------------------------------------------------------
# Shared pieces (the gRPC client uses them too)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a 503 / UNAVAILABLE / refused connection."""

    attempts: int = 4  # total tries, the first included
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Sleep before each retry: full jitter over an exponentially growing cap."""
        rng = rng or random.Random()
        cap = self.initial_backoff
        for _ in range(max(0, self.attempts - 1)):
            yield rng.uniform(0, cap)
            cap = min(self.max_backoff, cap * self.multiplier)


def with_retries(call: Callable[[], Any], retryable: Callable[[Exception], float | None],
                 policy: RetryPolicy) -> Any:
    """Run `call`; when it raises and `retryable(err)` gives a number (a server-suggested
    delay, or 0 for "use the backoff"), sleep and try again, up to policy.attempts."""
    delays = policy.delays()
    while True:
        try:
            return call()
        except Exception as err:
            hint = retryable(err)
            if hint is None:
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            time.sleep(min(max(delay, hint), policy.max_backoff))


@dataclass(frozen=True)
class TensorSpec:
    """One signature input or output as metadata describes it: dtype name and dims (-1 = any)."""

    name: str
    dtype: str  # "DT_UINT8", ...
    shape: tuple[int, ...] | None  # None = unknown rank

    @classmethod
    def from_metadata(cls, name: str, info: dict[str, Any]) -> "TensorSpec":
        shape_info = info.get("tensor_shape", {})
        shape = None if shape_info.get("unknown_rank") else tuple(int(d["size"]) for d in shape_info.get("dim", []))
        return cls(name, info.get("dtype", "DT_INVALID"), shape)


def signatures_from_metadata(metadata: dict[str, Any]) -> dict[str, dict[str, dict[str, TensorSpec]]]:
    """{signature: {"inputs": {name: spec}, "outputs": {...}}} from a metadata response."""
    try:
        defs = metadata["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        raise ServerFailure(f"metadata response has no signature_def map: {str(metadata)[:200]}") from None
    return {
        name: {part: {k: TensorSpec.from_metadata(k, v) for k, v in sig.get(part, {}).items()}
               for part in ("inputs", "outputs")}
        for name, sig in defs.items()
    }


def check_tensor(value: Any, spec: TensorSpec, what: str = "input") -> np.ndarray:
    """`value` as an array of the spec's dtype and shape, or InputError saying what differs.

    A single example (rank one less than the spec) gets a batch axis. Integer arrays are
    accepted for integer dtypes when every value fits; floats are refused for integer inputs
    (pixels are raw 0-255 values; the model scales them itself).
    """
    if spec.dtype == "DT_STRING":
        array = np.empty(len(value), dtype=object)
        array[:] = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in value]
    else:
        array = np.asarray(value)
    if spec.shape is not None and array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis]
    if spec.shape is not None:
        if array.ndim != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(array.shape, spec.shape)
        ):
            want = "[" + ", ".join("N" if d == -1 else str(d) for d in spec.shape) + "]"
            raise InputError(f"{what} '{spec.name}' must have shape {want}, got {list(array.shape)}")
    if array.size == 0 and array.ndim and array.shape[0] == 0:
        raise InputError(f"{what} '{spec.name}' is empty: nothing to predict")
    if spec.dtype in _INTEGER_RANGES:
        low, high, np_dtype = _INTEGER_RANGES[spec.dtype]
        if array.dtype.kind == "f":
            raise InputError(
                f"{what} '{spec.name}' takes integers ({spec.dtype}), got {array.dtype} values; "
                f"send raw pixels 0-255, the model normalises them itself"
            )
        if array.dtype.kind not in "iu":
            raise InputError(f"{what} '{spec.name}' takes {spec.dtype}, got {array.dtype}")
        if array.size and (array.min() < low or array.max() > high):
            raise InputError(
                f"{what} '{spec.name}' takes values {low}..{high} ({spec.dtype}), got "
                f"{array.min()}..{array.max()}"
            )
        return array.astype(np_dtype, copy=False)
    if spec.dtype in ("DT_FLOAT", "DT_DOUBLE", "DT_HALF"):
        if array.dtype.kind not in "iuf":
            raise InputError(f"{what} '{spec.name}' takes {spec.dtype}, got {array.dtype}")
        return array.astype({"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16}[spec.dtype])
    if spec.dtype == "DT_BOOL" and array.dtype != np.bool_:
        raise InputError(f"{what} '{spec.name}' takes DT_BOOL, got {array.dtype}")
    return array


@dataclass
class Prediction:
    """The model's answer for N images."""

    digits: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, 10]
    model_version: int | None = None  # gRPC responses say which version answered
    # serving_bytes only: uint8 [N, 28, 28], each picture in the MNIST form the model saw.
    mnist_images: np.ndarray | None = None

    @property
    def labels(self) -> list[str]:
        return [contract.LABELS[int(d)] for d in self.digits]

    @property
    def confidences(self) -> np.ndarray:
        """float32 [N]: the probability of each predicted digit."""
        return self.probabilities[np.arange(len(self.digits)), self.digits]


def request_slices(count: int, max_batch_size: int) -> list[slice]:
    """Rows [0, count) in consecutive pieces of at most max_batch_size rows (at least one
    piece, so that an empty input still reaches the server's own checks). Raises
    InputError for a max_batch_size below 1."""
    if max_batch_size < 1:
        raise InputError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return [slice(start, start + max_batch_size) for start in range(0, max(count, 1), max_batch_size)]


def join_predictions(parts: Sequence[Prediction]) -> Prediction:
    """The answers to consecutive pieces of one input as one Prediction; model_version is
    the version that answered every piece, or None when a version swap came in between;
    mnist_images (serving_bytes) joined when every piece carries them, else None."""
    versions = {p.model_version for p in parts}
    images = [p.mnist_images for p in parts]
    return Prediction(np.concatenate([p.digits for p in parts]),
                      np.concatenate([p.probabilities for p in parts]),
                      versions.pop() if len(versions) == 1 else None,
                      None if any(i is None for i in images) else np.concatenate(images))


def prediction_from_outputs(outputs: dict[str, Any], version: int | None = None) -> Prediction:
    try:
        digits = np.asarray(outputs[contract.OUTPUT_DIGIT], dtype=np.int64).reshape(-1)
        probabilities = np.asarray(outputs[contract.OUTPUT_PROBABILITIES], dtype=np.float32)
    except KeyError as err:
        raise ServerFailure(f"the response lacks output {err}; it has {sorted(outputs)}") from None
    if probabilities.ndim != 2 or len(probabilities) != len(digits):
        raise ServerFailure(f"unexpected output shapes: digits {digits.shape}, probabilities {probabilities.shape}")
    mnist_images = None
    if contract.OUTPUT_MNIST_IMAGE in outputs:
        mnist_images = np.asarray(outputs[contract.OUTPUT_MNIST_IMAGE])
        if mnist_images.shape != (len(digits), *contract.IMAGE_SHAPE) or (
                mnist_images.size and (mnist_images.min() < 0 or mnist_images.max() > 255)):
            raise ServerFailure(f"unexpected {contract.OUTPUT_MNIST_IMAGE} output of shape {list(mnist_images.shape)}")
        mnist_images = mnist_images.astype(np.uint8)
    return Prediction(digits, probabilities, version, mnist_images)


def read_picture_bytes(path: Any) -> bytes:
    """An image file's bytes for serving_bytes, after the checks the model's own preprocessing
    makes before decoding (mobile/preprocess.py's step 1: PNG, JPEG, BMP or WebP, within the
    pixel budget), so that a picture the server would refuse is refused here with the same
    message. Raises InputError naming the file."""
    from mobile import preprocess

    try:
        data = preprocess.read_picture(path)
        preprocess.read_header(data)
    except preprocess.PictureError as err:
        text = str(err)
        raise InputError(text if text.startswith(str(path)) else f"{path}: {text}") from None
    return data


# --------------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------------
def _server_message(response: Any) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return (response.text or response.reason or "").strip()[:500]


_Client = TypeVar("_Client", bound="ModelClient")


class ModelClient:
    """What the REST and gRPC clients share: `with Client(...) as client:` closes the
    connection, and predict()'s checks and request slicing. Each transport supplies close(),
    input_spec() and _predict_pixels() (one request of at most max_batch_size images)."""

    max_batch_size: int

    def close(self) -> None:
        raise NotImplementedError

    def input_spec(self, signature: str, name: str) -> TensorSpec:
        raise NotImplementedError

    def _predict_pixels(self, images: np.ndarray) -> Prediction:
        raise NotImplementedError

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def predict(self, images: Any, validate: bool = True) -> Prediction:
        """Digits for raw pixels: uint8 [N, 28, 28] (or one [28, 28]) through serving_default,
        in requests of at most max_batch_size images."""
        spec = (self.input_spec(contract.SIGNATURE_PIXELS, contract.INPUT_PIXELS) if validate
                else TensorSpec(contract.INPUT_PIXELS, "DT_UINT8", (-1, *contract.IMAGE_SHAPE)))
        array = check_tensor(images, spec, "images")
        return join_predictions([self._predict_pixels(array[piece])
                                 for piece in request_slices(len(array), self.max_batch_size)])


class RestClient(ModelClient):
    """TF Serving's REST API for one model (optionally one version or label)."""

    def __init__(self, url: str = DEFAULT_REST_URL, model: str = contract.MODEL_NAME,
                 version: int | None = None, label: str | None = None, timeout: float = 10.0,
                 retry: RetryPolicy = RetryPolicy(), session: Any = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        import requests

        if version is not None and label is not None:
            raise InputError("give a version or a label, not both")
        request_slices(0, max_batch_size)  # validates it
        self.url = url.rstrip("/")
        self.model, self.version, self.label = model, version, label
        self.timeout = timeout
        self.retry = retry
        self.max_batch_size = max_batch_size
        self._requests = requests
        self._session = session or requests.Session()
        self._signatures: dict[str, dict[str, dict[str, TensorSpec]]] | None = None

    def close(self) -> None:
        self._session.close()

    @property
    def model_url(self) -> str:
        """.../v1/models/<name>[/versions/<v> | /labels/<l>]"""
        url = f"{self.url}/v1/models/{quote(self.model, safe='')}"
        if self.version is not None:
            url += f"/versions/{int(self.version)}"
        elif self.label is not None:
            url += f"/labels/{quote(self.label, safe='')}"
        return url

    # -- transport ---------------------------------------------------------------------------
    def _request(self, method: str, url: str, body: bytes | None = None) -> dict[str, Any]:
        requests = self._requests

        def once() -> Any:
            try:
                response = self._session.request(
                    method, url, data=body, timeout=(min(self.timeout, 5.0), self.timeout),
                    headers={"Content-Type": "application/json"} if body is not None else None,
                )
            except requests.exceptions.ConnectTimeout:
                raise UnreachableError(f"cannot reach {self.url}: connection timed out") from None
            except requests.exceptions.Timeout:
                raise DeadlineExceeded(f"{method} {url}: no answer within {self.timeout:g} s") from None
            except requests.exceptions.ConnectionError as err:
                raise UnreachableError(f"cannot reach {self.url}: {_reason(err)}") from None
            if response.status_code == 503:
                failure = ServerFailure(f"{method} {url}: HTTP 503: {_server_message(response)}",
                                        503, _server_message(response))
                failure.retry_after = _retry_after(response)
                raise failure
            return response

        def retryable(err: Exception) -> float | None:
            if isinstance(err, UnreachableError):
                return 0.0
            if isinstance(err, ServerFailure) and err.status == 503:
                return getattr(err, "retry_after", 0.0)
            return None

        response = with_retries(once, retryable, self.retry)
        if response.status_code >= 400:
            message = _server_message(response)
            text = f"{method} {url}: HTTP {response.status_code}: {message}"
            if response.status_code == 504:
                raise DeadlineExceeded(text)
            if response.status_code < 500:
                raise RequestRejected(text, response.status_code, message)
            raise ServerFailure(text, response.status_code, message)
        try:
            return response.json()
        except ValueError:
            raise ServerFailure(f"{method} {url}: the answer is not JSON: {response.text[:200]!r}") from None

    # -- API ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """GET /v1/models/<name>[/versions/<v>]: {"model_version_status": [...]}."""
        return self._request("GET", self.model_url)

    def metadata(self) -> dict[str, Any]:
        """GET .../metadata: {"model_spec": ..., "metadata": {"signature_def": ...}}."""
        return self._request("GET", self.model_url + "/metadata")

    def signatures(self) -> dict[str, dict[str, dict[str, TensorSpec]]]:
        if self._signatures is None:
            self._signatures = signatures_from_metadata(self.metadata())
        return self._signatures

    def input_spec(self, signature: str, name: str) -> TensorSpec:
        sigs = self.signatures()
        if signature not in sigs:
            raise InputError(f"the model has no signature {signature!r} (it has {sorted(sigs)})")
        inputs = sigs[signature]["inputs"]
        if name not in inputs:
            raise InputError(f"signature {signature!r} has no input {name!r} (it has {sorted(inputs)})")
        return inputs[name]

    def predict_raw(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ...:predict with any JSON body; the decoded JSON answer."""
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        return self._request("POST", self.model_url + ":predict", body)

    def _predict_pixels(self, images: np.ndarray) -> Prediction:
        return prediction_from_outputs(_outputs_of(self.predict_raw({
            "signature_name": contract.SIGNATURE_PIXELS, "inputs": {contract.INPUT_PIXELS: images.tolist()}})))

    def predict_encoded(self, pictures: Sequence[bytes], validate: bool = True) -> Prediction:
        """Digits for encoded pictures (PNG/JPEG bytes, any size) through serving_bytes,
        sent as {"b64": ...} as TF Serving's REST API wants binary strings, in requests of
        at most max_batch_size pictures."""
        if validate:
            check_tensor(list(pictures), self.input_spec(contract.SIGNATURE_BYTES, contract.INPUT_BYTES), "pictures")
        if not pictures:
            raise InputError("no pictures to send")
        instances = [{"b64": base64.b64encode(p).decode("ascii")} for p in pictures]
        return join_predictions([
            prediction_from_outputs(_outputs_of(self.predict_raw({
                "signature_name": contract.SIGNATURE_BYTES, "instances": instances[piece]})))
            for piece in request_slices(len(instances), self.max_batch_size)])


def _outputs_of(answer: dict[str, Any]) -> dict[str, Any]:
    """Both response layouts ("outputs" columnar, "predictions" rows) as {name: values}."""
    if "outputs" in answer:
        outputs = answer["outputs"]
        return outputs if isinstance(outputs, dict) else {contract.OUTPUT_PROBABILITIES: outputs}
    if "predictions" in answer:
        rows = answer["predictions"]
        if rows and isinstance(rows[0], dict):
            return {k: [row[k] for row in rows] for k in rows[0]}
        return {contract.OUTPUT_PROBABILITIES: rows}
    raise ServerFailure(f"the answer has neither 'outputs' nor 'predictions': {str(answer)[:200]}")


def _retry_after(response: Any) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0


def _reason(err: Exception) -> str:
    """The innermost cause of a requests ConnectionError, e.g. 'Connection refused'."""
    text = str(err)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Temporary failure in name resolution", "Connection reset by peer",
                   "Remote end closed connection"):
        if marker in text:
            return marker
    return text[:300]
