"""Benchmark the local server: `make bench-serve` -> artifacts/bench/serve.json.

    python -m serving.bench                                  # over artifacts/serving
    python -m serving.bench --model-base /tmp/base --duration 10

Starts the local server (python -m serving.server, with the kit's batching file) on free
ports over --model-base, or, when that holds no version yet, over a fresh export of --run
under artifacts/bench/serve-models. Then, for REST and gRPC, batch 1 and 64, with 1, 8
and 32 concurrent clients, it sends requests for --duration seconds (after --warmup
seconds that are not counted) and records per-request latency (p50, p99), requests/s,
predictions/s, errors, and the CPU time each request cost the server and the load
generator. Every answer is checked against the first answer for the same images, so a
response that went to the wrong request counts as an error.

Every cell is measured in --rounds rounds (3) that interleave the whole grid, and each of its
measures is reported as the median over the rounds, every round kept (combine_rounds): this
machine's speed drifts by up to 2x within a minute.

The load generator is one process (asyncio coroutines: a minimal HTTP/1.1 client for REST,
grpc.aio for gRPC; bodies and protos built once). It shares the machine's cores with the server, and
on a shared machine with everyone else: the JSON records the load average before and
after, and the CPU per request, so numbers from a busy machine can be read for what they are.
The targets of the issue are evaluated in "targets" (reported, never asserted).

The picture section (`--pictures` per kind, 0 skips it; measure_pictures) sends synthetic
pictures of every kind (model/pictures.py) to serving_bytes over REST and gRPC and through the
client CLI's two predict paths (pixels preprocessed on the client, and --bytes), and records
per kind and path the accuracy, the refusals, and whether the model saw the same 28x28
picture as the Pi's preprocessing makes (mnist_image, within the parity tolerance of
export/verify.py); then the latency of a 1-megapixel JPEG
photo through serving_bytes with one client (target p50 <= 10 ms), with the server's own
account of it (its request_latency and runtime_latency histograms): how long it held each
request and how long the model run took, so the p50 splits into graph, server and client.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field
from mobile.runtime import latency_stats
from serving import json_tensor as jt
from serving.client import DEFAULT_MAX_BATCH_SIZE, request_slices

TARGETS = {"rest_p50_ms": 3.0, "grpc_p50_ms": 2.0, "predictions_per_s_32_clients": 1500.0}
PICTURE_TARGETS = {"accuracy": 0.98, "photo_1mp_p50_ms": 10.0, "mnist_png_gap_points": 0.1}


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark the local TF Serving stand-in over REST and gRPC."""

    model_base: Path = field(Path("artifacts/serving"), "models root to serve (holds mnist/<version>)")
    run: Path = field(Path("artifacts/runs/latest"), "run to export when --model-base has no version")
    data_dir: Path = field(Path("tests/data"), "MNIST IDX folder the request images come from")
    out: Path = field(Path("artifacts/bench/serve.json"), "where the results go")
    protocols: tuple[str, ...] = field(("rest", "grpc"), "protocols to measure")
    batch_sizes: tuple[int, ...] = field((1, 64), "images per prediction (more than --max-batch-size go as several requests)")
    concurrency: tuple[int, ...] = field((1, 8, 32), "concurrent clients")
    rounds: int = field(3, "times the whole grid is measured (interleaved); cells report medians over them",
                        at_least=1)
    duration: float = field(4.0, "measured seconds per scenario", above=0)
    warmup: float = field(1.0, "unmeasured seconds before each scenario", at_least=0)
    timeout: float = field(30.0, "per-prediction timeout in seconds")
    max_batch_size: int = field(DEFAULT_MAX_BATCH_SIZE, "most images per request (the server's batching max_batch_size)",
                                at_least=1)
    server_args: str = field("", "extra flags for python -m serving.server (one string)")
    pictures: int = field(1000, "picture section: synthetic pictures per kind through serving_bytes (0 skips it)",
                          at_least=0)
    picture_kinds: tuple[str, ...] = field(("photo", "canvas", "chalk", "tight", "thinpen", "mnist"),
                                           "picture section: kinds of picture (model/pictures.py)")
    picture_latency_runs: int = field(200, "picture section: requests timed for the 1-megapixel JPEG photo",
                                      at_least=1)

    def validate(self) -> None:
        if set(self.protocols) - {"rest", "grpc"}:
            raise ConfigError(f"--protocols takes rest and/or grpc, got {self.protocols}")
        if any(b < 1 for b in self.batch_sizes) or any(c < 1 for c in self.concurrency):
            raise ConfigError("batch sizes and concurrency must be >= 1")
        check_bounds(self)


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    latencies: list[float]
    errors: int = 0
    first_error: str = ""
    requests: int = 0

    def count(self, started: float, ok: bool, detail: str) -> None:
        self.latencies.append(time.perf_counter() - started)
        self.requests += 1
        if not ok:
            self.errors += 1
            self.first_error = self.first_error or detail


_MIXED_UP = "an answer with other digits than before (a mixed-up response?)"


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the REST load generator.

    The request is prebuilt bytes; the response is read by its Content-Length (what the
    server sends). Anything else (a malformed status line, no Content-Length, a chunked
    body, the connection closing) fails that request, and the connection is replaced.
    A client library (aiohttp, requests) spends 3-5x more CPU per request, which on a
    2-core machine is CPU taken from the server under test.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"the server closed the connection ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and not self._waiter.done():
            try:
                response = self._parse()
            except ValueError as err:
                self._fail(err)
                return
            if response is not None:
                self._waiter.set_result(response)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one request; (status, body) of its response."""
        if self.closed or self._transport is None:
            raise ConnectionError("the connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, err: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)

    def _parse(self) -> tuple[int, bytes] | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        status_line, *headers = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"malformed status line {status_line!r}")
        length = None
        for header in headers:
            name, _, value = header.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise ValueError(f"unexpected Transfer-Encoding: {value.strip()}")
        if length is None:
            raise ValueError("a response without Content-Length")
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return int(code), body


def _http_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """A complete POST request as bytes (sent as is, again and again)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _rest_worker(host: str, port: int, raws: list[bytes], expected: list[int] | None,
                       stop_at: float, tally: _Tally, timeout: float) -> list[int] | None:
    """One client: sends its prediction (`raws`: one request per max_batch_size piece) again
    and again until stop_at; each prediction is one latency sample."""
    loop = asyncio.get_running_loop()
    connection: _HttpConnection | None = None
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            digits, status, payload = [], 200, b""
            async with asyncio.timeout(timeout):
                for raw in raws:
                    if connection is None or connection.closed:
                        _transport, connection = await loop.create_connection(_HttpConnection, host, port)
                    status, payload = await connection.request(raw)
                    if status != 200:
                        break
                    digits += jt.parse_json(payload)["outputs"][contract.OUTPUT_DIGIT]
            ok = status == 200
            if ok:
                if expected is None:
                    expected = digits
                ok, detail = digits == expected, _MIXED_UP
            else:
                detail = f"HTTP {status}: {payload[:200]!r}"
        except Exception as err:  # count every failure, start again on a new connection
            ok, detail = False, f"{type(err).__name__}: {err}"
            if connection is not None:
                connection.close()
                connection = None
        tally.count(t0, ok, detail)
    if connection is not None:
        connection.close()
    return expected


async def _grpc_worker(stub: Any, requests: list[Any], expected: list[int] | None, stop_at: float,
                       tally: _Tally, timeout: float) -> list[int] | None:
    # grpc.aio: every client a coroutine on one thread. Blocking stubs in 32 threads spent
    # 1.5-4x more CPU per call here (GIL hand-offs between the threads).
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            digits = []
            for request in requests:  # one per max_batch_size piece of the prediction
                response = await stub.Predict(request, timeout=timeout)
                digits += response.outputs[contract.OUTPUT_DIGIT].int64_val
            if expected is None:
                expected = digits
            ok, detail = digits == expected, _MIXED_UP
        except Exception as err:
            ok, detail = False, f"{type(err).__name__}: {err}"
        tally.count(t0, ok, detail)
    return expected


async def run_scenario(protocol: str, endpoint: str, images: np.ndarray, batch: int,
                       concurrency: int, config: BenchConfig) -> dict[str, Any]:
    """One (protocol, batch, concurrency) cell: warm-up, then `duration` measured seconds."""
    # Each client sends its own images, so answers can be told apart; a prediction of more
    # than max_batch_size images goes as several requests, as our clients send it.
    batches = [np.resize(np.roll(images, -i * batch, axis=0), (batch, *images.shape[1:]))
               for i in range(concurrency)]
    pieces = [[b[piece] for piece in request_slices(batch, config.max_batch_size)] for b in batches]
    expected: list[list[int] | None] = [None] * concurrency

    async def phase(seconds: float, tallies: list[_Tally]) -> None:
        stop_at = time.perf_counter() + seconds
        if protocol == "rest":
            url = urlsplit(endpoint)
            path = f"/v1/models/{contract.MODEL_NAME}:predict"
            raws = [[_http_request(url.hostname, url.port, path, json.dumps(
                        {"signature_name": contract.SIGNATURE_PIXELS,
                         "inputs": {contract.INPUT_PIXELS: p.tolist()}}).encode()) for p in client]
                    for client in pieces]
            results = await asyncio.gather(*[
                _rest_worker(url.hostname, url.port, raws[i], expected[i], stop_at, tallies[i], config.timeout)
                for i in range(concurrency)])
        else:
            import grpc
            from tensorflow.core.framework import tensor_pb2
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

            from serving import tensor_proto

            requests = []
            for client in pieces:
                requests.append([])
                for p in client:
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name = contract.MODEL_NAME
                    request.model_spec.signature_name = contract.SIGNATURE_PIXELS
                    request.inputs[contract.INPUT_PIXELS].CopyFrom(tensor_proto.from_ndarray(p, tensor_pb2.TensorProto))
                    requests[-1].append(request)
            async with grpc.aio.insecure_channel(endpoint) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                results = await asyncio.gather(*[
                    _grpc_worker(stub, requests[i], expected[i], stop_at, tallies[i], config.timeout)
                    for i in range(concurrency)])
        for i, digits in enumerate(results):
            expected[i] = expected[i] or digits

    await phase(config.warmup, [_Tally([]) for _ in range(concurrency)])
    tallies = [_Tally([]) for _ in range(concurrency)]
    started = time.perf_counter()
    await phase(config.duration, tallies)
    elapsed = time.perf_counter() - started
    latency = latency_stats(np.concatenate([np.asarray(t.latencies) for t in tallies]), 1e3)
    requests = sum(t.requests for t in tallies)
    errors = sum(t.errors for t in tallies)
    return {
        "protocol": protocol, "batch": batch, "concurrency": concurrency,
        "requests": requests, "errors": errors,
        "first_error": next((t.first_error for t in tallies if t.first_error), ""),
        "seconds": round(elapsed, 3),
        "latency_ms": {key: round(value, 3) for key, value in latency.items()},
        "requests_per_s": round(requests / elapsed, 1),
        "predictions_per_s": round(requests * batch / elapsed, 1),
    }


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell measured in several rounds -> the cell: the median of each measure (an
    error in any round counts), every round kept under "rounds".

    The machine's speed drifts by up to 2x within a minute; rounds that interleave the whole
    grid put each cell in several phases, and the median is the typical one.
    """
    import statistics

    def median(get: Any) -> float | None:
        values = [v for v in map(get, rounds) if v is not None]
        return round(float(statistics.median(values)), 3) if values else None

    cell = {key: rounds[0][key] for key in ("protocol", "batch", "concurrency")}
    cell.update({
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "first_error": next((r["first_error"] for r in rounds if r["first_error"]), ""),
        "latency_ms": {k: median(lambda r, k=k: r["latency_ms"][k]) for k in ("p50", "p99", "mean")},
        "requests_per_s": median(lambda r: r["requests_per_s"]),
        "predictions_per_s": median(lambda r: r["predictions_per_s"]),
    })
    for key in ("server_cpu_ms_per_request", "client_cpu_ms_per_request", "mean_rows_per_model_run"):
        value = median(lambda r, key=key: r.get(key))
        if value is not None:
            cell[key] = value
    cell["predictions_per_s_range"] = [min(r["predictions_per_s"] for r in rounds),
                                       max(r["predictions_per_s"] for r in rounds)]
    cell["rounds"] = rounds
    return cell


def evaluate_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The kit's serving targets against the measured cells (None when a cell was not run)."""
    def cell(protocol: str, batch: int, concurrency: int) -> dict[str, Any] | None:
        return next((r for r in results if (r["protocol"], r["batch"], r["concurrency"]) == (protocol, batch, concurrency)), None)

    out: dict[str, Any] = {}
    for protocol in ("rest", "grpc"):
        single = cell(protocol, 1, 1)
        limit = TARGETS[f"{protocol}_p50_ms"]
        out[f"{protocol}_single_image_p50_ms"] = None if single is None else {
            "value": single["latency_ms"]["p50"], "target": f"< {limit}",
            "met": single["latency_ms"]["p50"] < limit and single["errors"] == 0}
        loaded = cell(protocol, 1, 32)
        need = TARGETS["predictions_per_s_32_clients"]
        out[f"{protocol}_32_clients_single_image_predictions_per_s"] = None if loaded is None else {
            "value": loaded["predictions_per_s"], "errors": loaded["errors"],
            "target": f">= {need:.0f} with no error",
            "met": loaded["predictions_per_s"] >= need and loaded["errors"] == 0}
    return out


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def ensure_model_base(config: BenchConfig, log: Any = print) -> Path:
    """--model-base when it holds a version, else a fresh export of --run (returns the root)."""
    from common.versions import numeric_versions

    if numeric_versions(Path(config.model_base) / contract.MODEL_NAME):
        return Path(config.model_base)
    run = Path(config.run)
    if not (run / contract.RUN_MODEL_FILE).is_file():
        raise SystemExit(f"error: {config.model_base} holds no {contract.MODEL_NAME} version and {run} "
                         f"holds no {contract.RUN_MODEL_FILE} to export; train first (make train) or "
                         f"pass --model-base")
    root = Path(config.out).parent / "serve-models"
    if numeric_versions(root / contract.MODEL_NAME):
        return root
    log(f"exporting {run} to {root} for the benchmark")
    import keras

    from export.saved_model import export_saved_model
    from model import idx

    test = idx.load_split(config.data_dir, "test")
    metrics = json.loads((run / contract.RUN_METRICS_FILE).read_text()) if (run / contract.RUN_METRICS_FILE).exists() else {}
    export_saved_model(keras.models.load_model(run / contract.RUN_MODEL_FILE), root / contract.MODEL_NAME,
                       test.images, test.labels, metrics, min_accuracy=0.0, max_regression=1.0,
                       cli_check=False, log=log)
    return root


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_histograms(rest_url: str, *names: str) -> list[tuple[float, float]] | None:
    """(sum, count) so far of each histogram in `names` (serving/metrics.py), from the
    server's own Prometheus page (at TF Serving's default path, which serving/monitoring.config
    keeps); None where that page is off or unreachable."""
    import urllib.request

    from serving.config_files import MONITORING_DEFAULT_PATH
    from serving.metrics import histogram_totals

    try:
        with urllib.request.urlopen(rest_url + MONITORING_DEFAULT_PATH, timeout=10) as response:
            page = response.read().decode("utf-8")
    except OSError:
        return None
    return [histogram_totals(page, name) for name in names]


def batches_run(rest_url: str) -> tuple[float, float] | None:
    """(rows, batches) the server has run so far; None where its metrics page is off."""
    from serving.metrics import PROCESSED_BATCH_SIZE

    totals = server_histograms(rest_url, PROCESSED_BATCH_SIZE)
    return totals[0] if totals else None


def _load_client_modules(protocols: Sequence[str]) -> None:
    """Import what the load generator uses before any cell is measured, then exempt it all
    from garbage collection: otherwise the first gRPC cell's client CPU would include
    importing TensorFlow (seconds, through the serving protos), and every cell would pay
    for collections walking TensorFlow's objects."""
    import gc

    if "grpc" in protocols:
        import grpc  # noqa: F401
        from tensorflow.core.framework import tensor_pb2  # noqa: F401
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: F401
    gc.collect()
    gc.freeze()


def _cell_line(cell: dict[str, Any]) -> str:
    return (f"{cell['protocol']:4s} batch {cell['batch']:3d} x {cell['concurrency']:2d} clients: "
            f"p50 {cell['latency_ms']['p50']:7.2f} ms  p99 {cell['latency_ms']['p99']:7.2f} ms  "
            f"{cell['predictions_per_s']:8.0f} predictions/s  errors {cell['errors']}")


def run_benchmark(config: BenchConfig, log: Any = print) -> dict[str, Any]:
    """Start the server, measure every cell, write config.out; the results dict."""
    import shlex

    from model import idx
    from serving.process import LocalServerProcess

    root = ensure_model_base(config, log)
    images = idx.load_split(config.data_dir, "test").images[:512]
    out = Path(config.out)
    server = LocalServerProcess(root, out.parent / "serve-server.log",
                                args=shlex.split(config.server_args), state_dir=out.parent / "serve-state")
    _load_client_modules(config.protocols)
    load_before = os.getloadavg()
    grid = [(p, b, c) for p in config.protocols for b in config.batch_sizes for c in config.concurrency]
    measured: dict[tuple, list[dict[str, Any]]] = {key: [] for key in grid}
    with server:
        log(f"server pid {server.proc.pid}: REST {server.rest_url}, gRPC {server.grpc_target}")
        for round_index in range(config.rounds):
            for protocol, batch, concurrency in grid:
                endpoint = server.rest_url if protocol == "rest" else server.grpc_target
                server_cpu, client_cpu = _process_cpu(server.proc.pid), _own_cpu()
                batches_before = batches_run(server.rest_url)
                cell = asyncio.run(run_scenario(protocol, endpoint, images, batch, concurrency, config))
                batches_after = batches_run(server.rest_url)
                if batches_before and batches_after and batches_after[1] > batches_before[1]:
                    # Rows per model run (warm-up included): how much batching happened.
                    cell["mean_rows_per_model_run"] = round(
                        (batches_after[0] - batches_before[0]) / (batches_after[1] - batches_before[1]), 2)
                # CPU seconds per request (warm-up included), for both sides: what the
                # throughput costs, whatever share of the machine others left us.
                total = cell["requests"] * (config.duration + config.warmup) / config.duration
                if server_cpu is not None:
                    cell["server_cpu_ms_per_request"] = round((_process_cpu(server.proc.pid) - server_cpu) / total * 1e3, 3)
                cell["client_cpu_ms_per_request"] = round((_own_cpu() - client_cpu) / total * 1e3, 3)
                measured[(protocol, batch, concurrency)].append(cell)
                log(f"[{round_index + 1}/{config.rounds}] {_cell_line(cell)}  "
                    f"CPU/request server {cell.get('server_cpu_ms_per_request', float('nan')):.2f} ms "
                    f"client {cell['client_cpu_ms_per_request']:.2f} ms  "
                    f"rows/run {cell.get('mean_rows_per_model_run', float('nan')):.1f}")
        pictures = measure_pictures(server, config, log) if config.pictures else None
        exit_status = server.stop()
    results = [combine_rounds(measured[key]) for key in grid]
    if config.rounds > 1:
        log(f"median of {config.rounds} rounds:")
        for cell in results:
            low, high = cell["predictions_per_s_range"]
            log(f"{_cell_line(cell)}  (predictions/s {low:.0f}-{high:.0f})")
    report = {
        "results": results,
        "targets": evaluate_targets(results),
        "pictures": pictures,
        "server": {"models_root": str(root), "args": server.command()[2:], "exit_status_after_sigterm": exit_status},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config,
    }
    configlib.write_json_atomic(out, report)
    log(f"wrote {out}")
    return report


# --------------------------------------------------------------------------------------------
# Pictures through serving_bytes
# --------------------------------------------------------------------------------------------
PICTURES_PER_REQUEST = 8


def measure_pictures(server: Any, config: BenchConfig, log: Any = print) -> dict[str, Any]:
    """The picture section of the report (see the module docstring): per kind and path,
    accuracy, refusals and agreement with the Pi's 28x28 pictures, then the 1-megapixel JPEG
    latency. `server` is a started LocalServerProcess."""
    from model.pictures import synthesize_kind
    from mobile import preprocess
    from model import idx
    from serving.client import RestClient
    from serving.grpc_client import GrpcClient

    test = idx.load_split(config.data_dir, "test")
    count = min(config.pictures, len(test.labels))
    digits, truth = test.images[:count], test.labels[:count]
    kinds: dict[str, Any] = {}
    with RestClient(server.rest_url, timeout=config.timeout) as rest, \
            GrpcClient(server.grpc_target, timeout=config.timeout) as grpc_client:
        raw = np.concatenate([rest.predict(digits[i : i + 256]).digits for i in range(0, count, 256)])
        raw_accuracy = float((raw == truth).mean())
        for kind in config.picture_kinds:
            pictures = [p.data for p in synthesize_kind(kind, digits, seed=0)]
            pi = []
            for data in pictures:
                try:
                    pi.append(preprocess.picture_to_mnist(data))
                except preprocess.PictureError:
                    pi.append(None)
            entry: dict[str, Any] = {"count": count, "refused_by_the_pi": sum(p is None for p in pi)}
            for path, client in (("rest", rest), ("grpc", grpc_client)):
                entry[path] = _bytes_path(client, pictures, pi, truth)
            entry["cli_predict"] = _pixels_path(rest, pi, truth)
            entry["cli_predict_bytes"] = _bytes_path(rest, pictures, pi, truth, cli=True)
            entry["cli_paths_agree"] = entry["cli_predict"]["digits"] == entry["cli_predict_bytes"]["digits"]
            for path in ("rest", "grpc", "cli_predict", "cli_predict_bytes"):
                entry[path].pop("digits")
            kinds[kind] = entry
            log(f"pictures {kind:8s}: REST {entry['rest']['accuracy']:.4f}  gRPC {entry['grpc']['accuracy']:.4f}  "
                f"CLI predict {entry['cli_predict']['accuracy']:.4f}  predict --bytes {entry['cli_predict_bytes']['accuracy']:.4f}  "
                f"(paths agree: {entry['cli_paths_agree']}; 28x28 as the Pi's: {entry['rest']['same_28x28_as_the_pi']})")
        latency = _photo_1mp_latency(rest, grpc_client, test.images[0], config, server.rest_url)
    log(f"1-MP JPEG photo through serving_bytes, one client: REST p50 {latency['rest']['p50_ms']:.1f} ms, "
        f"gRPC p50 {latency['grpc']['p50_ms']:.1f} ms (target {PICTURE_TARGETS['photo_1mp_p50_ms']} ms); "
        f"model run (mean) REST {latency['rest'].get('model_run_mean_ms', float('nan')):.1f} ms, "
        f"gRPC {latency['grpc'].get('model_run_mean_ms', float('nan')):.1f} ms")
    mnist = kinds.get("mnist")
    targets = {
        "every_kind_and_path_accuracy": {
            "min": min((e[p]["accuracy"] for e in kinds.values() for p in ("rest", "grpc", "cli_predict", "cli_predict_bytes")),
                       default=None),
            "target": f">= {PICTURE_TARGETS['accuracy']}"},
        "photo_1mp_p50_ms": {"value": latency["rest"]["p50_ms"], "target": f"<= {PICTURE_TARGETS['photo_1mp_p50_ms']}",
                             "met": latency["rest"]["p50_ms"] <= PICTURE_TARGETS["photo_1mp_p50_ms"]},
    }
    targets["every_kind_and_path_accuracy"]["met"] = (targets["every_kind_and_path_accuracy"]["min"] or 0) >= PICTURE_TARGETS["accuracy"]
    if mnist is not None:
        gap = max(100 * (raw_accuracy - mnist[p]["accuracy"]) for p in ("rest", "grpc", "cli_predict", "cli_predict_bytes"))
        targets["mnist_png_gap_points"] = {"value": round(gap, 3), "target": f"<= {PICTURE_TARGETS['mnist_png_gap_points']}",
                                           "met": gap <= PICTURE_TARGETS["mnist_png_gap_points"]}
    return {"count_per_kind": count, "raw_pixels_accuracy": raw_accuracy, "kinds": kinds,
            "photo_1mp": latency, "targets": targets}


def _bytes_path(client: Any, pictures: list[bytes], pi: list, truth: np.ndarray, cli: bool = False) -> dict[str, Any]:
    """serving_bytes on every picture, PICTURES_PER_REQUEST a request (a refused request is sent
    again picture by picture); `cli` goes through serving.query.predict_files as `predict
    --bytes` does."""
    from serving.client import RequestRejected
    from serving.query import predict_files

    digits: list[int] = []
    images: list[np.ndarray | None] = []
    if cli:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-pictures-") as folder:
            paths = []
            for i, data in enumerate(pictures):
                paths.append(Path(folder) / f"{i:05d}.picture")
                paths[-1].write_bytes(data)
            for start in range(0, len(paths), PICTURES_PER_REQUEST):
                rows, seen = predict_files(client, [str(p) for p in paths[start : start + PICTURES_PER_REQUEST]], True)
                digits += [row.get("digit", -1) for row in rows]
                images += seen
    else:
        for start in range(0, len(pictures), PICTURES_PER_REQUEST):
            chunk = pictures[start : start + PICTURES_PER_REQUEST]
            try:
                answer = client.predict_encoded(chunk, validate=False)
                digits += answer.digits.tolist()
                images += list(answer.mnist_images)
            except RequestRejected:
                for data in chunk:
                    try:
                        one = client.predict_encoded([data], validate=False)
                        digits.append(int(one.digits[0]))
                        images.append(one.mnist_images[0])
                    except RequestRejected:
                        digits.append(-1)
                        images.append(None)
    same, identical = _agreement(pi, images)
    return {"accuracy": float((np.array(digits) == truth).mean()), "refused": digits.count(-1),
            "same_28x28_as_the_pi": f"{same}/{len(pi)}", "identical_28x28": f"{identical}/{len(pi)}", "digits": digits}


def _agreement(pi: list, images: list) -> tuple[int, int]:
    """(pictures whose 28x28 agree within export.verify.PICTURE_PARITY_MAX_MEAN_DIFF
    grey levels, or both refused; pictures identical byte for byte) between the Pi's
    preprocessing (`pi`) and serving_bytes' mnist_image (`images`; None: refused)."""
    from export.verify import PICTURE_PARITY_MAX_MEAN_DIFF

    same = identical = 0
    for mine, theirs in zip(pi, images):
        if mine is None or theirs is None:
            same += mine is None and theirs is None
            continue
        difference = np.abs(mine.astype(np.int16) - np.asarray(theirs).astype(np.int16))
        same += float(difference.mean()) <= PICTURE_PARITY_MAX_MEAN_DIFF
        identical += not difference.any()
    return same, identical


def _pixels_path(client: Any, pi: list, truth: np.ndarray) -> dict[str, Any]:
    """`predict` without --bytes: the Pi's preprocessing on the client, raw pixels to
    serving_default (a picture refused on the client counts as wrong)."""
    ok = [i for i, p in enumerate(pi) if p is not None]
    digits = np.full(len(pi), -1)
    for start in range(0, len(ok), 256):
        chosen = ok[start : start + 256]
        digits[chosen] = client.predict(np.stack([pi[i] for i in chosen])).digits
    return {"accuracy": float((digits == truth).mean()), "refused": int((digits == -1).sum()), "digits": digits.tolist()}


def _photo_1mp_latency(rest: Any, grpc_client: Any, digit: np.ndarray, config: BenchConfig,
                       rest_url: str) -> dict[str, Any]:
    """p50/p99 of one 1-megapixel (1155 x 866) JPEG photo through serving_bytes, one client,
    after 10 untimed requests; and, from the server's own histograms over the timed requests
    (means, in ms), how long the server held each request (`server_request_mean_ms`) and how
    much of that was the model run (`model_run_mean_ms`: the SavedModel's graph, decoding the
    picture included): the rest of the p50 is the client and the connection."""
    from model.pictures import synthesize_photo
    from serving.metrics import REQUEST_LATENCY, RUNTIME_LATENCY

    photo = synthesize_photo(digit, np.random.default_rng(1), size=(866, 1155), jpeg=True)
    out: dict[str, Any] = {"size": [866, 1155], "bytes": len(photo.data), "load_average_before": list(os.getloadavg())}
    for name, client in (("rest", rest), ("grpc", grpc_client)):
        for _ in range(10):
            client.predict_encoded([photo.data], validate=False)
        before = server_histograms(rest_url, REQUEST_LATENCY, RUNTIME_LATENCY)
        seconds = []
        for _ in range(config.picture_latency_runs):
            t0 = time.perf_counter()
            client.predict_encoded([photo.data], validate=False)
            seconds.append(time.perf_counter() - t0)
        after = server_histograms(rest_url, REQUEST_LATENCY, RUNTIME_LATENCY)
        latency = latency_stats(seconds, 1e3)
        out[name] = {"runs": len(seconds), "p50_ms": round(latency["p50"], 2),
                     "p99_ms": round(latency["p99"], 2)}
        if before and after:
            for key, (sum_before, count_before), (sum_after, count_after) in zip(
                    ("server_request_mean_ms", "model_run_mean_ms"), before, after):
                if count_after > count_before:
                    out[name][key] = round((sum_after - sum_before) / (count_after - count_before) / 1e3, 2)
    out["load_average_after"] = list(os.getloadavg())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(BenchConfig, argv, prog="python -m serving.bench")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = run_benchmark(config)
    for name, target in report["targets"].items():
        if target is not None:
            print(f"  {name}: {target['value']} (target {target['target']}): {'met' if target['met'] else 'NOT met'}")
    for name, target in ((report.get("pictures") or {}).get("targets") or {}).items():
        value = target.get("value", target.get("min"))
        print(f"  pictures {name}: {value} (target {target['target']}): {'met' if target['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
