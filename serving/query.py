"""Ask a running TF Serving (or the local server) about the MNIST model: `make query ARGS=...`.

    python -m serving.query status
    python -m serving.query metadata
    python -m serving.query predict digit.png photo.jpg batch.npy       # raw pixels
    python -m serving.query predict --bytes digit.png photo.jpg          # serving_bytes, b64
    python -m serving.query testset --data-dir /work/shared/datasets/mnist --limit 2000
    python -m serving.query --protocol grpc --label canary predict digit.png

`predict` turns each picture into MNIST form on the client (mobile/preprocess.py, the same
code the Pi runs) and sends raw uint8 pixels; with --bytes it sends the file itself and
the model's serving_bytes signature decodes it. .npy files hold uint8 [28, 28] or
[N, 28, 28] pixels. `testset` sends the MNIST test set (IDX files) in --batch-size
predictions (each sent in requests of at most --max-batch-size images, 256: what TF Serving
accepts with our batching file) and prints accuracy and latency per prediction (p50/p99);
--report saves them as JSON with the resolved config.

REST needs only requests + numpy; --protocol grpc needs tensorflow-serving-api.

Exit status:
    0  success
    2  bad command line
    3  bad input file, shape or dtype (nothing was sent)
    4  server unreachable (after retries)
    5  the server refused the request (HTTP 4xx / gRPC INVALID_ARGUMENT, NOT_FOUND, ...);
       its own message is printed
    6  the server failed (HTTP 5xx / gRPC INTERNAL, UNAVAILABLE after retries, ...)
    7  timed out
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from model import configlib, contract
from model.configlib import ConfigError, field
from serving.client import (
    DEFAULT_MAX_BATCH_SIZE, InputError, Prediction, RestClient, RetryPolicy, ServingError,
    read_picture_bytes,
)

COMMANDS = ("status", "metadata", "predict", "testset")


@dataclass(frozen=True)
class QueryConfig:
    """Query a TF Serving model server (REST or gRPC)."""

    protocol: Literal["rest", "grpc"] = field("rest", "rest (requests) or grpc (tensorflow-serving-api)")
    host: str = field("localhost", "server host")
    rest_port: int = field(8501, "REST port")
    grpc_port: int = field(8500, "gRPC port")
    model: str = field(contract.MODEL_NAME, "model name")
    version: int | None = field(None, "ask for this version (default: the latest)")
    label: str | None = field(None, "ask for the version with this label (stable, canary, ...)")
    timeout: float = field(10.0, "seconds to wait for each answer")
    retries: int = field(3, "retries after 503 / UNAVAILABLE / refused connections")
    bytes: bool = field(False, "predict: send the files themselves through serving_bytes (b64)")
    data_dir: Path = field(Path("tests/data"), "testset: folder with the MNIST IDX files")
    limit: int = field(0, "testset: use the first N test images (0 = all)")
    batch_size: int = field(1, "testset: images per prediction (sent in requests of at most --max-batch-size)")
    max_batch_size: int = field(
        DEFAULT_MAX_BATCH_SIZE, "most images per request: the server's batching max_batch_size, "
        "above which TF Serving refuses a request"
    )
    report: Path | None = field(None, "testset: write the results and this config as JSON here")
    json: bool = field(False, "print machine-readable JSON")

    def validate(self) -> None:
        if self.version is not None and self.label is not None:
            raise ConfigError("give --version or --label, not both")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        if self.retries < 0:
            raise ConfigError("--retries must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be >= 1")
        if self.limit < 0:
            raise ConfigError("--limit must be >= 0")


def parse_args(argv: Sequence[str]) -> tuple[str, list[str], QueryConfig]:
    """(command, files, config); bad flags exit with status 2 and the usage line."""
    parser = configlib.build_parser(QueryConfig, prog="python -m serving.query",
                                    description=__doc__.strip().splitlines()[0])
    parser.epilog = "exit status: 0 ok, 2 usage, 3 bad input, 4 unreachable, 5 refused (4xx), 6 server failure (5xx), 7 timeout"
    parser.add_argument("command", choices=COMMANDS, help="what to ask")
    parser.add_argument("files", nargs="*", help="predict: PNG/JPEG/GIF/BMP pictures or .npy pixel arrays")
    ns = vars(parser.parse_intermixed_args(list(argv)))
    command, files = ns.pop("command"), ns.pop("files")
    if files and command != "predict":
        parser.error(f"{command} takes no files")
    if command == "predict" and not files:
        parser.error("predict needs at least one file")
    try:
        config = QueryConfig(**ns)
        config.validate()
    except ConfigError as err:
        parser.error(str(err))
    return command, files, config


def make_client(config: QueryConfig) -> Any:
    retry = RetryPolicy(attempts=config.retries + 1)
    if config.protocol == "grpc":
        from serving.grpc_client import GrpcClient

        return GrpcClient(f"{config.host}:{config.grpc_port}", config.model, config.version,
                          config.label, config.timeout, retry, max_batch_size=config.max_batch_size)
    return RestClient(f"http://{config.host}:{config.rest_port}", config.model, config.version,
                      config.label, config.timeout, retry, max_batch_size=config.max_batch_size)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def load_pixels(path: Path) -> np.ndarray:
    """uint8 [N, 28, 28] from a .npy file or a picture (made MNIST-like on the client)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: not a readable .npy array ({err})") from None
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.ndim != 3 or array.shape[1:] != contract.IMAGE_SHAPE:
            raise InputError(f"{path}: holds shape {list(array.shape)}; expected [28, 28] or [N, 28, 28] pixels")
        return array
    from mobile.preprocess import PictureError, load_grey, to_mnist

    try:
        return to_mnist(load_grey(path))[np.newaxis]
    except PictureError as err:
        raise InputError(str(err)) from None


def predict_files(client: Any, files: Sequence[str], send_bytes: bool) -> list[dict[str, Any]]:
    """One row per image: file, index, digit, confidence (and the version, over gRPC)."""
    rows = []
    if send_bytes:
        pictures = [read_picture_bytes(f) for f in files]
        names = [(str(f), None) for f in files]
        prediction = client.predict_encoded(pictures)
    else:
        batches = [(str(f), load_pixels(Path(f))) for f in files]
        names = [(f, i if len(arr) > 1 else None) for f, arr in batches for i in range(len(arr))]
        prediction = client.predict(np.concatenate([arr for _f, arr in batches]))
    for (name, index), digit, confidence in zip(names, prediction.digits, prediction.confidences):
        rows.append({"file": name, "index": index, "digit": int(digit), "label": contract.LABELS[int(digit)],
                     "confidence": round(float(confidence), 6), "model_version": prediction.model_version})
    return rows


def run_testset(client: Any, config: QueryConfig, log: Any = print) -> dict[str, Any]:
    """Accuracy and per-request latency over the test set (or its first --limit images)."""
    from model import idx

    try:
        split = idx.load_split(config.data_dir, "test")
    except idx.IdxError as err:
        raise InputError(str(err)) from None
    images, labels = split.images, split.labels
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    # Check the input once against the server's signature, then skip it per request.
    client.predict(images[:1])
    digits = np.empty(len(images), dtype=np.int64)
    latencies = []
    started = time.perf_counter()
    for start in range(0, len(images), config.batch_size):
        batch = images[start : start + config.batch_size]
        t0 = time.perf_counter()
        prediction: Prediction = client.predict(batch, validate=False)
        latencies.append(time.perf_counter() - t0)
        digits[start : start + len(batch)] = prediction.digits
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    return {
        "images": int(len(images)),
        "data": str(split.images_file.path),
        "accuracy": float((digits == labels).mean()),
        "requests": len(latencies),
        "batch_size": config.batch_size,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                       "mean": float(ms.mean()), "max": float(ms.max())},
        "images_per_second": float(len(images) / elapsed),
        "protocol": config.protocol,
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def query(command: str, files: Sequence[str], config: QueryConfig, out: Any = sys.stdout) -> int:
    """Run one command and print its answer; returns the exit status."""
    client = make_client(config)
    try:
        if command == "status":
            answer: Any = client.status()
            print(json.dumps(answer, indent=1), file=out)
        elif command == "metadata":
            answer = client.metadata()
            if config.json:
                print(json.dumps(answer, indent=1), file=out)
            else:
                print(_describe_metadata(answer), file=out)
        elif command == "predict":
            rows = predict_files(client, files, config.bytes)
            if config.json:
                print(json.dumps(rows, indent=1), file=out)
            else:
                for row in rows:
                    where = row["file"] + (f"[{row['index']}]" if row["index"] is not None else "")
                    version = f"  (version {row['model_version']})" if row["model_version"] else ""
                    print(f"{where}: {row['label']}  p={row['confidence']:.3f}{version}", file=out)
        else:
            result = run_testset(client, config)
            if config.report is not None:
                configlib.write_json_atomic(config.report, {"result": result, "config": config})
            if config.json:
                print(json.dumps(result, indent=1), file=out)
            else:
                lat = result["latency_ms"]
                print(f"{result['images']} test images over {config.protocol.upper()} in {result['requests']} "
                      f"requests of {config.batch_size}: accuracy {100 * result['accuracy']:.2f}%, "
                      f"latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                      f"{result['images_per_second']:.0f} images/s", file=out)
    finally:
        client.close()
    return 0


def _describe_metadata(answer: dict[str, Any]) -> str:
    from serving.client import signatures_from_metadata

    spec = answer.get("model_spec", {})
    lines = [f"model {spec.get('name')} version {spec.get('version')}"]
    for name, parts in sorted(signatures_from_metadata(answer).items()):
        if not parts["inputs"] and not parts["outputs"]:
            continue  # __saved_model_init_op
        lines.append(f"  signature {name}")
        for part in ("inputs", "outputs"):
            for key, t in sorted(parts[part].items()):
                shape = "?" if t.shape is None else "[" + ", ".join("N" if d == -1 else str(d) for d in t.shape) + "]"
                lines.append(f"    {part[:-1]:6s} {key}: {t.dtype} {shape}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    command, files, config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return query(command, files, config)
    except ServingError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
