"""Ask a running TF Serving (or the local server) about the MNIST model: `make query ARGS=...`.

    python -m serving.query status
    python -m serving.query metadata
    python -m serving.query predict digit.png photo.jpg batch.npy       # raw pixels
    python -m serving.query predict --bytes digit.png photo.jpg          # serving_bytes, b64
    python -m serving.query testset --data-dir /work/shared/datasets/mnist --limit 2000
    python -m serving.query --protocol grpc --label canary predict digit.png

`predict` turns each picture into MNIST form on the client (mobile/preprocess.py, the code
the Pi runs) and sends raw uint8 pixels through serving_default; with --bytes it sends the
file itself through serving_bytes, whose graph does the same preprocessing (the same
specification, export/picture_graph.py): both give the same digits. --save-mnist DIR writes
the 28x28 picture the model saw for each file (`<name>.mnist.png`). .npy files hold uint8
[28, 28] or [N, 28, 28] pixels. A picture that cannot be classified is reported (exit 3 when
it was refused here, 5 when the server refused it) and the others are still classified; with
--bytes, a request the server refuses is sent again one picture at a time to tell which.
`testset` sends the MNIST test set (IDX files) in --batch-size predictions (each sent in
requests of at most --max-batch-size images, 256: what TF Serving accepts with our batching
file) and prints accuracy and latency per prediction (p50/p99); --report saves them as JSON
with the resolved config.

REST needs only requests + numpy; --protocol grpc needs tensorflow-serving-api.

Exit status:
    0  success
    2  bad command line
    3  bad input file, shape or dtype, or a picture refused here (the other pictures are
       still classified)
    4  server unreachable (after retries)
    5  the server refused the request or a picture (HTTP 4xx / gRPC INVALID_ARGUMENT,
       NOT_FOUND, ...); its own message is printed
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

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field
from mobile.runtime import latency_stats
from serving.client import (
    DEFAULT_MAX_BATCH_SIZE, InputError, Prediction, RequestRejected, RestClient, RetryPolicy,
    ServingError, read_picture_bytes,
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
    timeout: float = field(10.0, "seconds to wait for each answer", above=0)
    retries: int = field(3, "retries after 503 / UNAVAILABLE / refused connections", at_least=0)
    bytes: bool = field(False, "predict: send the files themselves through serving_bytes (b64)")
    save_mnist: Path | None = field(None, "predict: write the 28x28 picture the model saw for each file into this folder")
    data_dir: Path = field(Path("tests/data"), "testset: folder with the MNIST IDX files")
    limit: int = field(0, "testset: use the first N test images (0 = all)", at_least=0)
    batch_size: int = field(1, "testset: images per prediction (sent in requests of at most --max-batch-size)",
                            at_least=1)
    max_batch_size: int = field(
        DEFAULT_MAX_BATCH_SIZE, "most images per request: the server's batching max_batch_size, "
        "above which TF Serving refuses a request", at_least=1,
    )
    report: Path | None = field(None, "testset: write the results and this config as JSON here")
    json: bool = field(False, "print machine-readable JSON")

    def validate(self) -> None:
        if self.version is not None and self.label is not None:
            raise ConfigError("give --version or --label, not both")
        check_bounds(self)


def _unknown_flags(parser: Any, argv: Sequence[str]) -> list[str]:
    """The arguments of `argv` that look like flags the parser does not have (up to "--";
    negative numbers are values)."""
    known = {option for action in parser._actions for option in action.option_strings}
    unknown = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("-") and arg != "-" and arg.split("=", 1)[0] not in known:
            try:
                float(arg)
            except ValueError:
                unknown.append(arg)
    return unknown


def parse_args(argv: Sequence[str]) -> tuple[str, list[str], QueryConfig]:
    """(command, files, config); bad flags exit with status 2 and the usage line."""
    parser = configlib.build_parser(QueryConfig, prog="python -m serving.query",
                                    description=__doc__.strip().splitlines()[0])
    parser.epilog = "exit status: 0 ok, 2 usage, 3 bad input, 4 unreachable, 5 refused (4xx), 6 server failure (5xx), 7 timeout"
    parser.add_argument("command", choices=COMMANDS, help="what to ask")
    parser.add_argument("files", nargs="*", help="predict: PNG/JPEG/BMP/WebP pictures or .npy pixel arrays")
    unknown = _unknown_flags(parser, argv)
    if unknown:
        # Before parsing: argparse would take the unknown flag's value for the command and
        # name that instead ("invalid choice: 'mnist'" for --modle mnist status).
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
    from mobile import preprocess

    try:
        return preprocess.picture_to_mnist(preprocess.read_picture(path))[np.newaxis]
    except preprocess.PictureError as err:
        text = str(err)
        raise InputError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def _rows(names: Sequence[tuple[str, int | None]], prediction: Prediction) -> list[dict[str, Any]]:
    rows = []
    for (name, index), digit, confidence in zip(names, prediction.digits, prediction.confidences):
        rows.append({"file": name, "index": index, "digit": int(digit), "label": contract.LABELS[int(digit)],
                     "confidence": round(float(confidence), 6), "model_version": prediction.model_version})
    return rows


def predict_files(client: Any, files: Sequence[str], send_bytes: bool) -> tuple[list[dict[str, Any]], list[np.ndarray | None]]:
    """(rows, images): one row per image, in the order given: {file, index, digit, label,
    confidence, model_version}, or {file, index, error, status} for a picture that could not be
    classified (status 3: refused here, 5: refused by the server); and for each row the uint8
    [28, 28] picture the model saw (None for errors).

    Raises ServingError for failures that are not about one picture (server unreachable, ...).
    """
    loaded: list[Any] = []  # per file: pixels uint8 [N, 28, 28], picture bytes, or an InputError
    for f in files:
        try:
            loaded.append(read_picture_bytes(f) if send_bytes else load_pixels(Path(f)))
        except InputError as err:
            loaded.append(err)
    good = [i for i, value in enumerate(loaded) if not isinstance(value, InputError)]
    answers: dict[int, Any] = {i: loaded[i] for i in range(len(files)) if i not in good}
    if good and send_bytes:
        try:
            batch = client.predict_encoded([loaded[i] for i in good])
            for k, i in enumerate(good):
                answers[i] = _take(batch, k)
        except RequestRejected as refused:
            if len(good) == 1:
                answers[good[0]] = refused
            else:  # which picture? one request each
                for i in good:
                    try:
                        answers[i] = client.predict_encoded([loaded[i]], validate=False)
                    except RequestRejected as err:
                        answers[i] = err
    elif good:
        pixels = np.concatenate([loaded[i] for i in good])
        batch = client.predict(pixels)
        start = 0
        for i in good:
            count = len(loaded[i])
            answers[i] = Prediction(batch.digits[start : start + count], batch.probabilities[start : start + count],
                                    batch.model_version, pixels[start : start + count])
            start += count
    rows: list[dict[str, Any]] = []
    images: list[np.ndarray | None] = []
    for i, name in enumerate(map(str, files)):
        answer = answers[i]
        if isinstance(answer, ServingError):
            message = getattr(answer, "server_message", "") or str(answer)
            message = message.removeprefix(f"{name}: ")  # the row names the file already
            rows.append({"file": name, "index": None, "error": message, "status": answer.exit_code})
            images.append(None)
            continue
        count = len(answer.digits)
        rows.extend(_rows([(name, k if count > 1 else None) for k in range(count)], answer))
        images.extend(answer.mnist_images if answer.mnist_images is not None else [None] * count)
    return rows, images


def _take(prediction: Prediction, i: int) -> Prediction:
    return Prediction(prediction.digits[i : i + 1], prediction.probabilities[i : i + 1], prediction.model_version,
                      None if prediction.mnist_images is None else prediction.mnist_images[i : i + 1])


def save_mnist_images(folder: Path, rows: Sequence[dict[str, Any]], images: Sequence[np.ndarray | None]) -> list[Path]:
    """Write each classified picture as `<folder>/<file name>[.<index>].mnist.png`."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for row, image in zip(rows, images):
        if image is None:
            continue
        stem = Path(row["file"]).name + (f".{row['index']}" if row["index"] is not None else "")
        target = folder / f"{stem}.mnist.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(target)
        written.append(target)
    return written


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
        "latency_ms": {**latency_stats(latencies, 1e3), "max": float(ms.max())},
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
            rows, images = predict_files(client, files, config.bytes)
            if config.save_mnist is not None:
                save_mnist_images(config.save_mnist, rows, images)
            if config.json:
                print(json.dumps(rows, indent=1), file=out)
            for row in rows:
                where = row["file"] + (f"[{row['index']}]" if row["index"] is not None else "")
                if "error" in row:
                    print(f"error: {where}: {row['error']}", file=sys.stderr)
                elif not config.json:
                    version = f"  (version {row['model_version']})" if row["model_version"] else ""
                    print(f"{where}: {row['label']}  p={row['confidence']:.3f}{version}", file=out)
            failed = [row["status"] for row in rows if "error" in row]
            if failed:
                return InputError.exit_code if InputError.exit_code in failed else max(failed)
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
