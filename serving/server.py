"""A local stand-in for TensorFlow Serving: the same REST and gRPC APIs over the same SavedModels.

    python -m serving.server                       # = make serve-local
    python -m serving.server --rest-api-port 9501 --port 9500 --models-root /tmp/models

For machines without Docker, and for our tests. One process, one asyncio loop (uvloop's):

    aiohttp (REST, :8501) --+                     +--> batch queue per (version, signature, shapes)
                            +--> ServingCore -----+        |
    grpc.aio (gRPC, :8500) -+    (TF Serving's    |        v   thread pool: Session.run
                                  validation)     +--> ModelManager (poll base path, load,
                                                        warm up, swap, unload, labels)

Flags mirror tensorflow_model_server's (`--rest_api_port` is accepted as well as
`--rest-api-port`); the defaults are this kit's deployment, the same settings the compose
file gives the real server: serving/models.config (with base paths under /models read from
--models-root), batching from serving/batching_parameters.txt, Prometheus metrics at
/monitoring/prometheus/metrics. Which behaviours are mirrored, and the tests that pin them:
serving/COMPATIBILITY.md.

It binds 127.0.0.1 unless --host says otherwise, caps request bodies (--max-request-bytes,
REST and gRPC), and on SIGTERM or Ctrl-C stops accepting, lets in-flight requests finish,
unloads the models and exits 0. The resolved config is written to <state-dir>/config.json
and the process id to <state-dir>/server.pid (what `make serve-stop` signals).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote

import numpy as np

from model import configlib, contract
from model.configlib import ConfigError, field
from serving import batching, config_files
from serving import json_tensor as jt
from serving import tensor_proto
from serving.metrics import BATCH_BUCKETS, PADDING_SIZE, PROCESSED_BATCH_SIZE, Metrics

log = logging.getLogger("serving.server")

SERVING_DIR = Path(__file__).resolve().parent
EXIT_STARTUP_FAILED = 1
EVENT_LOOPS = ("uvloop", "asyncio")
MAX_BATCH_QUEUES_PER_VERSION = 8  # distinct (signature, row shape, outputs) combinations batched


@dataclass(frozen=True)
class ServeConfig:
    """Serve SavedModels over TF Serving's REST and gRPC APIs (a local tensorflow_model_server)."""

    # --- where the models are ---------------------------------------------------------------
    models_root: Path = field(
        Path("artifacts/serving"),
        "host folder with one sub-folder per model (what the container mounts at /models)",
    )
    model_config_file: Path | None = field(
        SERVING_DIR / "models.config",
        "ModelServerConfig text file (names, base paths, version policy, labels); 'none' = "
        "serve --model-name from --model-base-path with the latest version only",
    )
    container_models_root: str = field(
        "/models", "base_path prefix in models.config that stands for --models-root"
    )
    model_name: str = field(contract.MODEL_NAME, "model name without --model-config-file")
    model_base_path: Path | None = field(
        None, "versions folder without --model-config-file (default <models-root>/<model-name>)"
    )
    model_config_file_poll_wait_seconds: int = field(
        60, "re-read --model-config-file this often (0 = never), as TF Serving"
    )
    file_system_poll_wait_seconds: float = field(1.0, "look for new or removed versions this often")
    allow_version_labels_for_unavailable_models: bool = field(
        True, "let labels name versions that are not loaded yet (TF Serving's flag)"
    )
    # --- network ----------------------------------------------------------------------------
    host: str = field("127.0.0.1", "address to bind; 0.0.0.0 to accept other machines")
    port: int = field(8500, "gRPC port")
    rest_api_port: int = field(8501, "REST port (0 = no REST API)")
    rest_api_timeout_in_ms: int = field(30000, "REST request deadline in ms (0 = none)")
    rest_api_enable_cors_support: bool = field(False, "answer CORS preflights, add CORS headers")
    max_request_bytes: int = field(64 * 2**20, "largest REST body / gRPC message accepted")
    # --- execution --------------------------------------------------------------------------
    enable_batching: bool = field(True, "batch concurrent requests (server-side batching)")
    batching_parameters_file: Path | None = field(
        SERVING_DIR / "batching_parameters.txt", "BatchingParameters text file ('none' = defaults)"
    )
    batch_arrival_wait_ms: float = field(
        2.0, "with batching: wait up to this long for requests already being parsed (0 = off)"
    )
    grpc_batch_gather_ms: float = field(
        1.0, "with batching: while other requests are in flight, hold gRPC requests this long "
        "so that they share a batch (0 = off)"
    )
    batch_parallel_min_rows: int = field(
        32, "with batching: while a batch runs, start another beside it only for at least this "
        "many waiting rows (1 = as TF Serving; see serving/batching.py)"
    )
    model_threads: int = field(4, "threads that run model calls when batching is off")
    grpc_max_concurrent: int = field(
        0, "gRPC calls in progress at once, more wait in line (0 = no limit, as TF Serving; "
        "grpc.aio's limiter costs a task and a lock round per call)"
    )
    event_loop: str = field(
        "uvloop", "asyncio event loop: uvloop (libuv: here 7-23% more gRPC requests/s than "
        "asyncio's own) or asyncio"
    )
    gil_switch_interval_ms: float = field(0.5, "Python's thread switch interval (sys.setswitchinterval)")
    # One thread each: with batching, parallelism comes from num_batch_threads; TF's auto
    # setting adds spinning thread pools that cost a small machine more CPU than they save.
    tensorflow_intra_op_parallelism: int = field(1, "TF intra-op threads per session (0 = auto)")
    tensorflow_inter_op_parallelism: int = field(1, "TF inter-op threads per session (0 = auto)")
    enable_model_warmup: bool = field(True, "replay assets.extra/tf_serving_warmup_requests on load")
    num_request_iterations_for_warmup: int = field(1, "times each warm-up request is replayed")
    max_num_load_retries: int = field(5, "retries of a failed version load")
    load_retry_interval_seconds: float = field(60.0, "wait between load retries")
    # --- operations -------------------------------------------------------------------------
    monitoring_config_file: Path | None = field(
        SERVING_DIR / "monitoring.config", "MonitoringConfig text file ('none' = no metrics page)"
    )
    state_dir: Path = field(
        Path("artifacts/serving-local"), "where the pid file and the resolved config.json go"
    )
    shutdown_grace_seconds: float = field(30.0, "how long SIGTERM waits for in-flight requests")
    log_level: str = field("INFO", "DEBUG, INFO, WARNING or ERROR")

    def validate(self) -> None:
        for name in ("port", "rest_api_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535 or (name == "port" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a port number, got {value}")
        if self.rest_api_port == self.port:
            raise ConfigError("--port and --rest-api-port must differ")
        if self.file_system_poll_wait_seconds <= 0:
            raise ConfigError("--file-system-poll-wait-seconds must be > 0")
        if self.max_request_bytes < 1024:
            raise ConfigError("--max-request-bytes must be at least 1024")
        for name in ("model_threads", "batch_parallel_min_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.grpc_max_concurrent < 0:
            raise ConfigError(f"--grpc-max-concurrent must be >= 0 (0 = no limit), got {self.grpc_max_concurrent}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        for name in ("batch_arrival_wait_ms", "grpc_batch_gather_ms"):
            if not 0 <= getattr(self, name) <= 1000:
                raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1000 ms, got {getattr(self, name)}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @property
    def pid_file(self) -> Path:
        return Path(self.state_dir) / "server.pid"


class StartupError(RuntimeError):
    """The server cannot start; the message says why (exit status 1)."""


# --------------------------------------------------------------------------------------------
# The shared core: model access and prediction, for both protocols
# --------------------------------------------------------------------------------------------
# See ServingCore.predict: below ~1,000 requests/s, a lone request for at most this
# many bytes of numbers runs on the event loop (an MNIST batch of 32: tens of microseconds).
INLINE_MIN_GAP_S = 1e-3
# ...and only when no two requests were in flight together for this long (see _lone_request).
INLINE_QUIET_S = 0.05
INLINE_MAX_BYTES = 32 * 28 * 28


def _cheap(inputs: Mapping[str, np.ndarray]) -> bool:
    """Numbers only, and few: pictures to decode (strings) can take seconds."""
    return (all(a.dtype.kind in "biuf" for a in inputs.values())
            and sum(a.nbytes for a in inputs.values()) <= INLINE_MAX_BYTES)


class ServingCore:
    """Model access and prediction shared by the REST and gRPC handlers (coroutines on one loop)."""

    def __init__(self, manager: Any, batching_params: config_files.BatchingParameters | None,
                 metrics: Metrics, executor: ThreadPoolExecutor, arrival_wait: float = 0.0,
                 gather_wait: float = 0.0, parallel_min_rows: int = 1):
        self.manager = manager
        self.batching = batching_params
        self.metrics = metrics
        self.executor = executor
        self.arrival_wait = arrival_wait
        self.gather_wait = gather_wait
        self.parallel_min_rows = parallel_min_rows
        self._lock = threading.Lock()
        # Predict requests accepted but not yet queued for the model (being read and parsed).
        self.arriving = 0
        # Predict requests accepted and not yet answered (arriving, queued, running, or
        # having their response written): with more than one, batches are worth waiting for.
        self.in_flight = 0
        self._handoffs: dict[bool, _LoopHandoff] = {}
        # Moving average of the time between predict requests' arrivals (seconds; gaps
        # longer than 10 ms count as 10 ms, so that a burst after a pause is seen quickly).
        self.arrival_gap = 0.01
        self._last_arrival = 0.0
        self._last_crowded = -math.inf  # when two or more requests were last in flight together

    def arrival(self) -> "_Arrival":
        """`with core.arrival() as a:` around a predict request, from its acceptance until
        its answer is ready; `a.queued()` once it is queued for the model."""
        return _Arrival(self)

    def _count(self, arriving: int, in_flight: int) -> None:
        with self._lock:
            self.arriving += arriving
            self.in_flight += in_flight
            if in_flight > 0:
                now = time.perf_counter()
                self.arrival_gap += 0.2 * (min(now - self._last_arrival, 0.01) - self.arrival_gap)
                self._last_arrival = now
                if self.in_flight > 1:
                    self._last_crowded = now

    async def predict(self, servable: Any, signature_name: str, inputs: dict[str, np.ndarray],
                      output_filter: Sequence[str] = (), arrival: "_Arrival | None" = None,
                      gather: bool = False) -> tuple[str, dict[str, np.ndarray]]:
        """Validate like TF Serving's Predict, run the model (batched or not), and return
        (resolved signature name, {output alias: array}). On the event loop.

        Raises ApiError for an invalid request before anything is queued. Batched requests
        go through the loop's hand-off (_LoopHandoff): those of one loop iteration are
        queued together. `gather=True` (gRPC): while other requests are in flight, hold a
        request gather_wait seconds first, so that it shares a batch; grpc.aio hands its
        handlers one call per loop iteration, so without this gRPC batches stay at 1-2 rows
        under load (REST requests, read many per iteration, batch by themselves). Measured
        at 32 single-image clients: 2.2 -> 4.4 rows per model run and about 30% more gRPC
        predictions/s. A small numeric request (_cheap) arriving alone (_lone_request), with
        its queue idle, runs right here instead: for a small model, less time than the two
        thread hand-offs it saves. Anything else leaves the loop free to read requests (so
        that they batch) and to act on signals. Cancelling the call (a deadline) cancels a
        run that has not started.
        """
        signature, run, queue, rows = self._route(servable, signature_name, inputs, output_filter)
        if arrival is not None:
            arrival.queued()
        handoff = self.loop_handoff(gather)
        if queue is None:
            return signature, await handoff.result(self.executor.submit(run, inputs))
        if self._lone_request() and _cheap(inputs):
            # Handlers run one at a time: let those of requests read in this same loop
            # iteration start (and count as in flight) before judging this one alone.
            await asyncio.sleep(0)
            outputs = queue.run_inline_if_idle(inputs, rows) if self._lone_request() else None
            if outputs is not None:
                return signature, outputs
        return signature, await handoff.result(handoff.submit(queue, inputs, rows))

    def loop_handoff(self, gather: bool = False) -> "_LoopHandoff":
        """The running loop's hand-off to the batch workers, one per gather mode."""
        loop = asyncio.get_running_loop()
        handoff = self._handoffs.get(gather)
        if handoff is None or handoff.loop is not loop:
            handoff = self._handoffs[gather] = _LoopHandoff(loop, self._gather_for if gather else lambda: 0.0)
        return handoff

    def _gather_for(self) -> float:
        """How long to gather requests on the loop before queuing them (seconds): see
        predict."""
        if self.gather_wait > 0 and self.in_flight > 1:
            return self.gather_wait
        return 0.0

    def _lone_request(self) -> bool:
        """Is the request being handled alone: none other in flight, requests arriving
        slowly (on average more than INLINE_MIN_GAP_S apart), and none in flight together
        for INLINE_QUIET_S?

        One in flight at a time is not enough: a server under load (gRPC's in particular)
        reads the next request the moment it has answered the previous one; measured,
        running those inline cut 32-client gRPC throughput by a third. The gap alone is not
        enough either: under load, requests come in waves (a batch answers many clients,
        which all send again), and the first of a wave finds none in flight. When the
        machine slows down, the gaps grow, more requests run inline on the loop, and the
        loop, the server's bottleneck, slows further: at 32 gRPC clients, 4.5% of requests
        ran inline, 18% with a busy process beside the server. A lone client never has two
        in flight, so the quiet period costs it nothing; with it, 32 gRPC clients beside a
        busy process got 10% and 17% more predictions/s in two comparisons (each the median
        of 6 alternated rounds), and about the same without the busy process."""
        return (self.in_flight == 1 and self.arrival_gap > INLINE_MIN_GAP_S
                and time.perf_counter() - self._last_crowded > INLINE_QUIET_S)

    def _route(self, servable: Any, signature_name: str, inputs: dict[str, np.ndarray],
               output_filter: Sequence[str]) -> tuple[str, Any, Any, int]:
        """Validation, then where the request runs: (signature, run function, its batch
        queue or None to run it unbatched on the executor, rows)."""
        signature, _aliases, outputs = servable.prepare(signature_name, inputs, output_filter)
        run = functools.partial(_run_retained, servable, signature, outputs)
        if self.batching is None:
            return signature, run, None, 0
        rows = batching.batch_rows(inputs)
        key = batching.queue_key(signature, inputs, outputs)
        queue = servable.batch_queues.get(key)
        if queue is not None:
            return signature, run, queue, rows
        with self._lock:
            queue = servable.batch_queues.get(key)
            if queue is None and len(servable.batch_queues) >= MAX_BATCH_QUEUES_PER_VERSION:
                # Each queue has its own threads: unusual shapes beyond this run unbatched,
                # so a client sending many shapes cannot make the server start threads at will.
                return signature, run, None, rows
            if queue is None:
                model = servable.name
                queue = batching.BatchQueue(
                    run, self.batching,
                    on_batch=lambda n, padded: self._observe_batch(model, n, padded),
                    arriving=lambda: self.arriving, in_flight=lambda: self.in_flight,
                    arrival_wait=self.arrival_wait, parallel_min_rows=self.parallel_min_rows,
                    name=f"batch-{model}-{servable.version}",
                )
                servable.batch_queues[key] = queue
        return signature, run, queue, rows

    def _observe_batch(self, model: str, rows: int, padded: int) -> None:
        self.metrics.observe(PROCESSED_BATCH_SIZE, rows,
                             BATCH_BUCKETS, model_name=model)
        self.metrics.observe(PADDING_SIZE, padded - rows,
                             BATCH_BUCKETS, model_name=model)

    def record(self, model: str, api: str, entrypoint: str, started: float, code: str) -> None:
        self.metrics.inc(":tensorflow:serving:request_count", model_name=model, status=code)
        self.metrics.observe(":tensorflow:serving:request_latency", (time.perf_counter() - started) * 1e6,
                             model_name=model, API=api, entrypoint=entrypoint)


class _Arrival:
    """A predict request counted as arriving from the moment it is accepted until it is
    queued for the model (`queued()`) or fails before that, and as in flight until the
    `with` block ends (its answer is ready)."""

    def __init__(self, core: ServingCore):
        self.core = core
        self.counted = False

    def __enter__(self) -> "_Arrival":
        self.core._count(+1, +1)
        self.counted = True
        return self

    def queued(self) -> None:
        if self.counted:
            self.counted = False
            self.core._count(-1, 0)

    def __exit__(self, *exc: Any) -> None:
        self.core._count(-1 if self.counted else 0, -1)
        self.counted = False


class _LoopHandoff:
    """Between the event loop's coroutines and the batch workers, in both directions at the
    cost of one thread wake-up per batch instead of several per request.

    Out: the requests handled in one loop iteration are queued together when it ends
    (`submit`, then `_flush` via call_soon): one lock and at most one worker wake-up for all
    of them, and they share a batch. Back: results are collected from the worker threads and
    handed to the loop with one call_soon_threadsafe per burst (`_done`, `_deliver`), where
    asyncio.wrap_future would wake the loop once per request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, gather_for: Callable[[], float] = lambda: 0.0):
        self.loop = self._loop = loop
        self._gather_for = gather_for
        self._gathered: dict[Any, list[tuple[dict[str, np.ndarray], int, Future]]] = {}
        self._lock = threading.Lock()
        self._finished: list[tuple[Future, asyncio.Future]] = []

    def submit(self, queue: batching.BatchQueue, inputs: dict[str, np.ndarray], rows: int) -> Future:
        """On the loop: queue a task with the others of this iteration; its Future."""
        future: Future = Future()
        if not self._gathered:
            wait = self._gather_for()
            if wait > 0:
                self._loop.call_later(wait, self._flush)
            else:
                self._loop.call_soon(self._flush)
        self._gathered.setdefault(queue, []).append((inputs, rows, future))
        return future

    def _flush(self) -> None:
        gathered, self._gathered = self._gathered, {}
        for queue, tasks in gathered.items():
            queue.submit_all(tasks)

    async def result(self, future: Future) -> Any:
        """On the loop: the Future's result (or exception); cancelling the wait (a deadline)
        cancels the task if it has not started."""
        waiter = self._loop.create_future()
        future.add_done_callback(functools.partial(self._done, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _done(self, waiter: asyncio.Future, future: Future) -> None:
        # In the thread that completed the future (a batch worker, usually).
        with self._lock:
            self._finished.append((future, waiter))
            first = len(self._finished) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        for future, waiter in finished:
            if waiter.done():
                continue  # the request gave up (deadline)
            if future.cancelled():
                waiter.cancel()
            elif future.exception() is not None:
                waiter.set_exception(future.exception())
            else:
                waiter.set_result(future.result())


def _run_retained(servable: Any, signature: str, outputs: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Hold the version for the whole run, even if the request that queued it has given up.
    servable.retain()
    try:
        return servable.run(signature, inputs, outputs)
    finally:
        servable.release()


def status_proto(states: list[Any]) -> Any:
    """GetModelStatusResponse for a list of VersionState (status always filled, as upstream)."""
    from tensorflow_serving.apis import get_model_status_pb2

    response = get_model_status_pb2.GetModelStatusResponse()
    for s in states:
        entry = response.model_version_status.add(version=s.version)
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(s.state)
        entry.status.SetInParent()
        entry.status.error_code = jt.CODES[s.error_code]
        entry.status.error_message = s.error_message
    return response


def metadata_proto(servable: Any, request_metadata_fields: Sequence[str]) -> Any:
    """GetModelMetadataResponse: model spec + every SignatureDef of the version, packed in Any."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    if not request_metadata_fields:
        raise jt.invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for name in request_metadata_fields:
        if name != "signature_def":
            raise jt.invalid(f"Metadata field {name} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signatures.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response


# --------------------------------------------------------------------------------------------
# REST (http_rest_api_handler.cc + http_rest_api_util.cc + http_server.cc)
# --------------------------------------------------------------------------------------------
_V1 = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE)
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}


def _parse_version(text: str | None) -> int | None:
    if not text:
        return None
    value = int(text)
    if value > jt.INT64_MAX:
        raise jt.invalid(f"Failed to convert version: {text} to numeric.")
    return value


class RestApi:
    def __init__(self, core: ServingCore, config: ServeConfig, monitoring: config_files.MonitoringConfig):
        self.core = core
        self.config = config
        self.monitoring = monitoring
        # Exactly "application/json", as TF Serving sends it (no charset parameter).
        self._headers = {"Content-Type": "application/json",
                         **(_CORS if config.rest_api_enable_cors_support else {})}

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _json(self, status: int, body: str) -> Any:
        from aiohttp import web

        return web.Response(status=status, body=body.encode("utf-8"), headers=self._headers)

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        if self.monitoring.prometheus_enabled and request.path == self.monitoring.prometheus_path:
            return web.Response(text=self.core.metrics.render(), content_type="text/plain")
        # TF Serving matches its patterns against the raw path with the query string.
        path = request.raw_path
        if not _V1.fullmatch(path):
            return web.Response(status=404, text="Not Found", content_type="text/plain")
        if request.method == "OPTIONS" and self.config.rest_api_enable_cors_support:
            return web.Response(status=200, headers=_CORS)
        started = time.perf_counter()
        model_name, api = "", "unknown"
        try:
            predict = _PREDICT.fullmatch(path) if request.method == "POST" else None
            status = _STATUS.fullmatch(path) if request.method == "GET" else None
            if predict:
                model_name, api = unquote(predict.group(1)), predict.group(4).lower()
                version, label = _parse_version(predict.group(2)), predict.group(3)
                with self.core.arrival() as arrival:
                    body = await self._read_body(request)
                    if api != "predict":
                        raise jt.ApiError("UNIMPLEMENTED", f"this server implements :predict only, not :{api}")
                    timeout = self.config.rest_api_timeout_in_ms / 1000 or None
                    try:
                        async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                            text = await self._predict(
                                model_name, version, unquote(label) if label else None, body, arrival)
                    except TimeoutError:
                        raise jt.ApiError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
            elif status:
                model_name = unquote(status.group(1) or "")
                version, label = _parse_version(status.group(2)), status.group(3)
                if not model_name:
                    raise jt.invalid("Missing model name in request.")
                if status.group(4):
                    api = "GetModelMetadata"
                    text = self._metadata(model_name, version, unquote(label) if label else None)
                else:
                    api = "GetModelStatus"
                    # GetModelStatus looks at the version only; a label is ignored, as upstream.
                    text = _status_json(self.core.manager.status(model_name, version))
            else:
                raise jt.invalid(f"Malformed request: {request.method} {path}")
        except jt.ApiError as err:
            self.core.record(model_name, api, "REST", started, err.code)
            return self._json(err.http_status, jt.error_json(err.message))
        except Exception as err:  # a bug or a surprise: still TF Serving's error layout
            log.exception("REST %s %s failed", request.method, path)
            self.core.record(model_name, api, "REST", started, "INTERNAL")
            return self._json(500, jt.error_json(f"Internal error: {type(err).__name__}: {err}"))
        self.core.record(model_name, api, "REST", started, "OK")
        return self._json(200, text)

    async def _read_body(self, request: Any) -> bytes:
        from aiohttp import web

        limit = self.config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise jt.ApiError("RESOURCE_EXHAUSTED",
                              f"Request body of {request.content_length} bytes exceeds this server's "
                              f"limit of {limit} bytes (--max-request-bytes)", http_status=413)
        try:
            return await request.read()  # gzip'd bodies arrive decompressed, as in TF Serving
        except web.HTTPRequestEntityTooLarge:
            raise jt.ApiError("RESOURCE_EXHAUSTED",
                              f"Request body exceeds this server's limit of {limit} bytes "
                              f"(--max-request-bytes)", http_status=413) from None

    async def _predict(self, name: str, version: int | None, label: str | None, body: bytes,
                       arrival: _Arrival) -> str:
        doc = jt.parse_json(body)
        jt.signature_name_of(doc)
        with self.core.manager.acquire(name, version, label) as servable:
            parsed = jt.fill_predict_request(doc, servable.input_dtypes, jt.may_hold_bools(body))
            # The model runs on the loop only for a small request arriving alone (see
            # ServingCore.predict): under load the loop must stay free to read the requests
            # that will share a batch (running them all here gave batches of 1 at 32 clients).
            _signature, outputs = await self.core.predict(
                servable, parsed.signature_name, parsed.tensors, arrival=arrival)
        return jt.make_json_from_tensors(outputs, parsed.format)

    def _metadata(self, name: str, version: int | None, label: str | None) -> str:
        from google.protobuf import json_format

        with self.core.manager.acquire(name, version, label) as servable:
            response = metadata_proto(servable, ["signature_def"])
        from tensorflow_serving.apis import get_model_metadata_pb2

        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        opts = dict(indent=1, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        # The same concatenation as TF Serving's ToJsonString(GetModelMetadataResponse).
        return ('{\n"model_spec":' + json_format.MessageToJson(response.model_spec, **opts) + ",\n"
                '"metadata": {"signature_def": ' + json_format.MessageToJson(signature_map, **opts) + "}\n}\n")


def _status_json(states: list[Any]) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(status_proto(states), indent=1, always_print_fields_with_no_presence=True)


# --------------------------------------------------------------------------------------------
# gRPC (prediction_service_impl.cc, model_service_impl.cc, grpc_status_util.cc)
# --------------------------------------------------------------------------------------------
GRPC_MESSAGE_LIMIT = 1024  # ToGRPCStatus truncates longer messages


def _spec_choice(spec: Any) -> tuple[int | None, str | None]:
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return int(spec.version.value), None
    if which == "version_label":
        return None, spec.version_label
    return None, None


def _grpc_spec(request: Any) -> tuple[int | None, str | None]:
    if not request.HasField("model_spec"):
        raise jt.invalid("Missing ModelSpec")
    return _spec_choice(request.model_spec)


def _grpc_inputs(request: Any) -> dict[str, np.ndarray]:
    inputs = {}
    for alias, proto in request.inputs.items():
        try:
            inputs[alias] = tensor_proto.to_ndarray(proto)
        except (tensor_proto.TensorProtoError, ValueError):
            raise jt.invalid(f"tensor parsing error: {alias}") from None
    return inputs


def _grpc_response(response: Any, name: str, servable: Any, signature: str,
                   outputs: Mapping[str, np.ndarray]) -> Any:
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature
    for alias, value in outputs.items():
        tensor_proto.fill(response.outputs[alias], value, as_fields=True)
    return response


def _grpc_status(err: jt.ApiError) -> tuple[Any, str]:
    import grpc

    message = err.message
    if len(message) > GRPC_MESSAGE_LIMIT:
        message = message[:GRPC_MESSAGE_LIMIT] + "...TRUNCATED"
    return getattr(grpc.StatusCode, err.code), message


def build_grpc_server(core: ServingCore, config: ServeConfig) -> Any:
    """A grpc.aio server with PredictionService and ModelService (not started), on the
    event loop that also runs the REST API.

    Predict requests go through the same loop hand-off as REST ones: those that arrive in
    one loop iteration are queued together and share a batch, and results come back with
    one loop wake-up per burst. Measured on the 2-core reference machine, grpc's threaded
    server spent about twice the CPU per call at 32 clients (GIL hand-offs between handler
    threads). --grpc-max-concurrent, when set, bounds the calls in progress at once.
    """
    import grpc
    from tensorflow_serving.apis import (
        model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
    )

    async def abort(context: Any, err: jt.ApiError) -> None:
        await context.abort(*_grpc_status(err))  # raises

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):  # noqa: N802 - gRPC method name
            started = time.perf_counter()
            name = request.model_spec.name
            try:
                version, label = _grpc_spec(request)
                with core.arrival() as arrival, core.manager.acquire(name, version, label) as servable:
                    inputs = _grpc_inputs(request)
                    # No timer of our own: grpc.aio cancels this coroutine at the call's
                    # deadline (or when the client cancels), which cancels a model run that
                    # has not started. (A timer per call cost 6% of the loop's time at 32 clients.)
                    signature, outputs = await core.predict(
                        servable, request.model_spec.signature_name, inputs,
                        list(request.output_filter), arrival=arrival, gather=True)
                    response = _grpc_response(predict_pb2.PredictResponse(), name, servable, signature, outputs)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                core.record(name, "predict", "GRPC", started,
                            "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
                raise
            except jt.ApiError as err:
                core.record(name, "predict", "GRPC", started, err.code)
                await abort(context, err)
            except Exception as err:
                log.exception("gRPC Predict failed")
                core.record(name, "predict", "GRPC", started, "INTERNAL")
                await abort(context, jt.ApiError("INTERNAL", f"Internal error: {type(err).__name__}: {err}"))
            core.record(name, "predict", "GRPC", started, "OK")
            return response

        async def GetModelMetadata(self, request, context):  # noqa: N802
            started = time.perf_counter()
            name = request.model_spec.name
            try:
                version, label = _grpc_spec(request)
                if not list(request.metadata_field):
                    raise jt.invalid("GetModelMetadataRequest must specify at least one metadata_field")
                with core.manager.acquire(name, version, label) as servable:
                    response = metadata_proto(servable, list(request.metadata_field))
            except jt.ApiError as err:
                core.record(name, "GetModelMetadata", "GRPC", started, err.code)
                await abort(context, err)
            core.record(name, "GetModelMetadata", "GRPC", started, "OK")
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        async def GetModelStatus(self, request, context):  # noqa: N802
            try:
                version, _label = _grpc_spec(request)
                return status_proto(core.manager.status(request.model_spec.name, version))
            except jt.ApiError as err:
                await abort(context, err)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        maximum_concurrent_rpcs=config.grpc_max_concurrent or None,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    return server


# --------------------------------------------------------------------------------------------
# Start-up, running, shutdown
# --------------------------------------------------------------------------------------------
def _none_path(value: Path | None) -> Path | None:
    return None if value is None or str(value).lower() in ("", "none") else Path(value)


def load_model_specs(config: ServeConfig) -> list[config_files.ModelSpecConfig]:
    """The models to serve, from models.config or the single-model flags."""
    config_file = _none_path(config.model_config_file)
    if config_file is not None:
        return config_files.read_model_config(config_file, config.models_root, config.container_models_root)
    base = config.model_base_path or (Path(config.models_root) / config.model_name)
    return [config_files.ModelSpecConfig(config.model_name, Path(base))]


def _claim_pid_file(path: Path) -> None:
    if path.exists():
        try:
            other = int(path.read_text().strip())
        except ValueError:
            other = None
        if other and other != os.getpid() and configlib.pid_alive(other):
            raise StartupError(f"another local server (pid {other}) is running with state dir "
                               f"{path.parent}; stop it first (make serve-stop)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _release_pid_file(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except (FileNotFoundError, ValueError):
        pass


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise StartupError(f"cannot listen for {what} on {host}:{port}: {err.strerror or err}") from None


async def serve(config: ServeConfig, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Run the server until `stop` is set (or SIGTERM/SIGINT); returns the exit status.

    Raises StartupError for anything that prevents serving (bad files, busy ports, labels
    refused by the config, another server on the same state dir).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    try:
        specs = load_model_specs(config)
        batching_file = _none_path(config.batching_parameters_file)
        batching_params = None
        if config.enable_batching:
            batching_params = (config_files.read_batching_parameters(batching_file)
                               if batching_file else config_files.BatchingParameters())
        monitoring_file = _none_path(config.monitoring_config_file)
        monitoring = (config_files.read_monitoring_config(monitoring_file)
                      if monitoring_file else config_files.MonitoringConfig())
    except config_files.ConfigFileError as err:
        raise StartupError(str(err)) from None
    _check_port_free(config.host, config.port, "gRPC")
    if config.rest_api_port:
        _check_port_free(config.host, config.rest_api_port, "REST")
    _claim_pid_file(config.pid_file)
    configlib.save_config(config, Path(config.state_dir) / "config.json")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)

    from serving.model_manager import ManagerOptions, ModelManager

    metrics = Metrics()

    def on_event(kind: str, **fields: Any) -> None:
        if kind == "load":
            metrics.inc(":tensorflow:cc:saved_model:load_attempt_count",
                        model_path=f"{fields['model']}/{fields['version']}",
                        status="success" if fields["ok"] else "fail")
        elif kind == "unload" and fields.get("servable") is not None:
            _close_queues(fields["servable"])  # its requests are done; stop its batch workers

    options = ManagerOptions(
        file_system_poll_wait_seconds=config.file_system_poll_wait_seconds,
        enable_model_warmup=config.enable_model_warmup,
        num_request_iterations_for_warmup=config.num_request_iterations_for_warmup,
        max_num_load_retries=config.max_num_load_retries,
        load_retry_interval_seconds=config.load_retry_interval_seconds,
        allow_version_labels_for_unavailable_models=config.allow_version_labels_for_unavailable_models,
        intra_op_parallelism=config.tensorflow_intra_op_parallelism,
        inter_op_parallelism=config.tensorflow_inter_op_parallelism,
    )
    executor = ThreadPoolExecutor(max_workers=config.model_threads, thread_name_prefix="model")
    manager = None
    grpc_server = runner = None
    try:
        try:
            manager = ModelManager(specs, options, on_event=on_event)
        except jt.ApiError as err:
            raise StartupError(f"Failed to start server. Error: {err}") from None
        # Loading imports TensorFlow and reads every aspired version: keep the loop free.
        await loop.run_in_executor(None, manager.start)
        core = ServingCore(manager, batching_params, metrics, executor,
                           arrival_wait=config.batch_arrival_wait_ms / 1000,
                           gather_wait=config.grpc_batch_gather_ms / 1000,
                           parallel_min_rows=config.batch_parallel_min_rows)
        # Everything made so far (TensorFlow's modules, the loaded graphs) lives as long as
        # the server: keep it out of the garbage collector's walks, which otherwise cost
        # every request that triggers a collection.
        gc.collect()
        gc.freeze()

        grpc_server = build_grpc_server(core, config)
        grpc_address = f"{config.host}:{config.port}"
        try:
            grpc_server.add_insecure_port(grpc_address)
        except RuntimeError as err:
            raise StartupError(f"cannot listen for gRPC on {grpc_address}: {err}") from None
        await grpc_server.start()
        if config.rest_api_port:
            from aiohttp import web

            runner = web.AppRunner(RestApi(core, config, monitoring).app(), access_log=None,
                                   shutdown_timeout=config.shutdown_grace_seconds)
            await runner.setup()
            try:
                await web.TCPSite(runner, config.host, config.rest_api_port).start()
            except OSError as err:
                raise StartupError(f"cannot listen for REST on {config.host}:{config.rest_api_port}: {err}") from None
        for spec in specs:
            log.info("model %s: base path %s, policy %s, labels %s, serving versions %s",
                     spec.name, spec.base_path, spec.policy.describe(), spec.labels or "none",
                     manager.serving_versions(spec.name) or "none yet")
        rest = f"REST http://{config.host}:{config.rest_api_port}" if config.rest_api_port else "REST off"
        print(f"Local TF Serving stand-in (pid {os.getpid()}): {rest}  gRPC {grpc_address}  "
              f"batching {'on' if batching_params else 'off'}  event loop {config.event_loop}"
              f"{'  metrics ' + monitoring.prometheus_path if monitoring.prometheus_enabled else ''}",
              flush=True)
        if ready is not None:
            ready.set()
        reloader = None
        config_file = _none_path(config.model_config_file)
        if config_file is not None and config.model_config_file_poll_wait_seconds > 0:
            reloader = asyncio.ensure_future(_reload_config_loop(config, manager, config_file, stop))
        await stop.wait()
        log.info("stopping: no new requests; waiting for in-flight ones (up to %.0f s)",
                 config.shutdown_grace_seconds)
        if reloader is not None:
            reloader.cancel()
    finally:
        # Stop accepting on both APIs at once, then wait for the calls already running.
        grpc_stopped = (asyncio.ensure_future(grpc_server.stop(config.shutdown_grace_seconds))
                        if grpc_server is not None else None)
        if runner is not None:
            await runner.cleanup()  # closes the listener, then waits for running handlers
        if grpc_stopped is not None:
            await grpc_stopped
        if manager is not None:
            await loop.run_in_executor(None, manager.stop)
        executor.shutdown(wait=True)
        _release_pid_file(config.pid_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def _close_queues(servable: Any) -> None:
    for queue in servable.batch_queues.values():
        queue.close()
    servable.batch_queues.clear()


def _on_signal(stop: asyncio.Event, sig: int) -> None:
    if stop.is_set():
        log.warning("%s again while stopping: still waiting for in-flight requests", signal.Signals(sig).name)
        return
    log.info("%s received", signal.Signals(sig).name)
    stop.set()


async def _reload_config_loop(config: ServeConfig, manager: Any, path: Path, stop: asyncio.Event) -> None:
    """Re-read models.config every model_config_file_poll_wait_seconds (TF Serving's flag)."""
    loop = asyncio.get_running_loop()
    last = path.read_bytes() if path.exists() else b""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), config.model_config_file_poll_wait_seconds)
            return
        except asyncio.TimeoutError:
            pass
        try:
            current = path.read_bytes()
            if current == last:
                continue
            specs = config_files.read_model_config(path, config.models_root, config.container_models_root)
            await loop.run_in_executor(None, manager.reload_config, specs)
            last = current
            log.info("reloaded %s", path)
        except (OSError, config_files.ConfigFileError, jt.ApiError) as err:
            log.error("keeping the previous model config: %s", err)


def _normalise_flags(argv: Sequence[str]) -> list[str]:
    """Accept TF Serving's spelling as well as ours.

    --rest_api_port=8501 -> --rest-api-port=8501, and for switches
    --enable_batching=true / =false -> --enable-batching / --no-enable-batching.
    """
    switches = {f.name.replace("_", "-") for f in dataclasses.fields(ServeConfig) if f.type in ("bool", bool)}
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = name.replace("_", "-")
            if eq and name[2:] in switches and value.lower() in ("true", "false", "1", "0"):
                arg = name if value.lower() in ("true", "1") else "--no-" + name[2:]
            else:
                arg = name + eq + value
        out.append(arg)
    return out


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """--event-loop: uvloop's loop, or None for asyncio's own."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise StartupError("--event-loop uvloop: uvloop is not installed (make setup installs it; "
                               "or pass --event-loop asyncio)") from None
        return uvloop.new_event_loop
    return None


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(ServeConfig, _normalise_flags(sys.argv[1:] if argv is None else argv),
                                    prog="python -m serving.server")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # loader deprecation notices
    # The event loop, the batch workers and the gRPC threads hand the GIL to each other on
    # every request; the default 5 ms switch interval would add that much latency each time.
    sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
    try:
        loop_factory = _loop_factory(config.event_loop)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve(config))
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
