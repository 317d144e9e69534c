"""The request path both APIs share: validation, batching hand-off, and the answer protos.

    REST handler --+                                 +--> batch queue (serving/batching.py)
                   +--> ServingCore.predict ---------+
    gRPC handler --+    (TF Serving's validation:    +--> executor (batching off)
                         Servable.prepare)

ServingCore runs on the event loop; model runs happen in batch workers or the executor
(a small request arriving alone may run on the loop itself, see ServingCore.predict).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from common import contract
from serving import batching, config_files
from serving import protocol as pr
from serving.metrics import (BATCH_BUCKETS, PADDING_SIZE, PROCESSED_BATCH_SIZE, REQUEST_COUNT, REQUEST_LATENCY,
                             RUNTIME_LATENCY, Metrics)

MAX_BATCH_QUEUES_PER_VERSION = 8  # distinct (signature, row shape, outputs) combinations batched

# See ServingCore.predict: below ~1,000 requests/s, a lone request for at most this
# many bytes of numbers runs on the event loop (an MNIST batch of 32: tens of microseconds).
INLINE_MIN_GAP_S = 1e-3
# ...and only when no two requests were in flight together for this long (see _lone_request).
INLINE_QUIET_S = 0.05
INLINE_MAX_BYTES = 32 * contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH  # an MNIST batch of 32, uint8


def cheap(inputs: Mapping[str, np.ndarray]) -> bool:
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
        # Calls of either API being handled (on the loop): what shutdown waits for.
        self.calls = 0
        self._calls_done: asyncio.Event | None = None
        # Set on SIGTERM: calls that come in now are refused UNAVAILABLE, so clients retry
        # elsewhere, while the ones already accepted finish.
        self.draining = False
        self.last_call = time.monotonic()  # when the last call (accepted or refused) came in

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """`with core.call():` around the handling of one REST or gRPC call (on the loop).

        Raises ApiError UNAVAILABLE once the server is draining (SIGTERM)."""
        self.last_call = time.monotonic()
        if self.draining:
            raise pr.ApiError("UNAVAILABLE", "Server is shutting down: no new requests are accepted")
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1
            if self.calls == 0 and self._calls_done is not None:
                self._calls_done.set()

    def abandon_waiting(self) -> int:
        """Shutdown after the grace period: every request still waiting for a model run is
        answered UNAVAILABLE now (clients retry elsewhere); the runs are stopped apart."""
        error = pr.ApiError("UNAVAILABLE", "Server is shutting down: the request did not finish "
                                           "within the shutdown grace period")
        return sum(handoff.abandon(error) for handoff in self._handoffs.values())

    async def calls_finished(self, timeout: float, quiet: float = 0.0) -> bool:
        """Wait (at most `timeout` s) until no call is being handled and none has come in
        for `quiet` s; True if so."""
        deadline = time.monotonic() + timeout
        while True:
            if self.calls:
                self._calls_done = asyncio.Event()
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await self._calls_done.wait()
                except TimeoutError:
                    return self.calls == 0
            left = quiet - (time.monotonic() - self.last_call)
            if left <= 0:
                return True
            if time.monotonic() + left > deadline:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return self.calls == 0
            await asyncio.sleep(left)

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
                      gather: bool = False, deadline: float | None = None) -> tuple[str, dict[str, np.ndarray]]:
        """Validate like TF Serving's Predict, run the model (batched or not), and return
        (resolved signature name, {output alias: array}). On the event loop.

        Raises ApiError for an invalid request before anything is queued. Batched requests
        go through the loop's hand-off (_LoopHandoff): those of one loop iteration are
        queued together. `gather=True` (gRPC): while other requests are in flight, hold a
        request gather_wait seconds first, so that it shares a batch; grpc.aio hands its
        handlers one call per loop iteration, so without this gRPC batches stay at 1-2 rows
        under load (REST requests, read many per iteration, batch by themselves); gathering
        about doubles the rows per model run at many single-image clients. A small numeric request (cheap) arriving alone (_lone_request), with
        its queue idle, runs right here instead: for a small model, less time than the two
        thread hand-offs it saves. Anything else leaves the loop free to read requests (so
        that they batch) and to act on signals. Cancelling the call cancels a run that has
        not started; `deadline` (time.monotonic()) drops the request if it is still queued
        then, and goes into the run (RunOptions.timeout_in_ms), which TensorFlow stops there.
        """
        signature, run, queue, rows = self._route(servable, signature_name, inputs, output_filter)
        if arrival is not None:
            arrival.queued()
        started = time.perf_counter()
        outputs = await self._run(run, queue, inputs, rows, gather, deadline)
        # predict_util.cc's RunPredict times the Session::Run after validation (with batching,
        # that call waits in the batch queue too) and records successful runs only.
        self.metrics.observe(RUNTIME_LATENCY, (time.perf_counter() - started) * 1e6,
                             model_name=servable.name, API="Predict", runtime="TF1")
        return signature, outputs

    async def _run(self, run: Callable, queue: "batching.BatchQueue | None", inputs: dict[str, np.ndarray],
                   rows: int, gather: bool, deadline: float | None) -> dict[str, np.ndarray]:
        """The model run of `predict`: unbatched on the executor, inline for a lone cheap
        request, else through the batch queue."""
        handoff = self.loop_handoff(gather)
        if queue is None:
            left = None if deadline is None else deadline - time.monotonic()
            return await handoff.result(self.executor.submit(run, inputs, left))
        if self._lone_request() and cheap(inputs):
            # Handlers run one at a time: let those of requests read in this same loop
            # iteration start (and count as in flight) before judging this one alone.
            await asyncio.sleep(0)
            outputs = queue.run_inline_if_idle(inputs, rows, deadline) if self._lone_request() else None
            if outputs is not None:
                return outputs
        return await handoff.result(handoff.submit(queue, inputs, rows, deadline))

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
        reads the next request the moment it has answered the previous one, and running
        those inline starves the loop that reads the others. The gap alone is not
        enough either: under load, requests come in waves (a batch answers many clients,
        which all send again), and the first of a wave finds none in flight. When the
        machine slows down, the gaps grow, more requests run inline on the loop, and the
        loop, the server's bottleneck, slows further. A lone client never has two in flight,
        so the quiet period costs it nothing, while many clients on a busy machine keep their
        requests off the loop."""
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
        if rows > self.batching.max_batch_size:  # whichever way it runs (see BatchQueue)
            raise pr.invalid(f"Task size {rows} is larger than maximum input batch size {self.batching.max_batch_size}")
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
        """Count a request as TF Serving does (http_server.cc, prediction_service_impl.cc):
        request_count by model and status always, request_latency only when it succeeded.
        A model name the server does not know is counted as "" (TF Serving makes a series
        of any name: a client sending many would grow the page without bound)."""
        if model and not self.manager.knows(model):
            model = ""
        self.metrics.inc(REQUEST_COUNT, model_name=model, status=code)
        if code == "OK":
            self.metrics.observe(REQUEST_LATENCY, (time.perf_counter() - started) * 1e6,
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
        self._gathered: dict[Any, list[batching.TaskSpec]] = {}
        self._lock = threading.Lock()
        self._finished: list[tuple[Future, asyncio.Future]] = []
        self._waiting: set[asyncio.Future] = set()  # the loop's side of results not back yet

    def submit(self, queue: batching.BatchQueue, inputs: dict[str, np.ndarray], rows: int,
               deadline: float | None = None) -> Future:
        """On the loop: queue a task with the others of this iteration; its Future."""
        future: Future = Future()
        if not self._gathered:
            wait = self._gather_for()
            if wait > 0:
                self._loop.call_later(wait, self._flush)
            else:
                self._loop.call_soon(self._flush)
        self._gathered.setdefault(queue, []).append((inputs, rows, future, deadline))
        return future

    def _flush(self) -> None:
        gathered, self._gathered = self._gathered, {}
        for queue, tasks in gathered.items():
            queue.submit_all(tasks)

    async def result(self, future: Future) -> Any:
        """On the loop: the Future's result (or exception); cancelling the wait (a deadline)
        cancels the task if it has not started."""
        waiter = self._loop.create_future()
        self._waiting.add(waiter)
        future.add_done_callback(functools.partial(self._done, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            self._waiting.discard(waiter)

    def abandon(self, error: BaseException) -> int:
        """On the loop: end every wait for a result with `error` (the work itself may go
        on); how many there were."""
        waiting = [w for w in self._waiting if not w.done()]
        for waiter in waiting:
            waiter.set_exception(error)
        return len(waiting)

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


def _run_retained(servable: Any, signature: str, outputs: list[str], inputs: dict[str, np.ndarray],
                  timeout: float | None = None) -> dict[str, np.ndarray]:
    # Hold the version for the whole run, even if the request that queued it has given up.
    servable.retain()
    try:
        return servable.run(signature, inputs, outputs, timeout)
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
        entry.status.error_code = pr.CODES[s.error_code]
        entry.status.error_message = s.error_message
    return response


def metadata_proto(servable: Any, request_metadata_fields: Sequence[str]) -> Any:
    """GetModelMetadataResponse: model spec + every SignatureDef of the version, packed in Any."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    if not request_metadata_fields:
        raise pr.invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for name in request_metadata_fields:
        if name != "signature_def":
            raise pr.invalid(f"Metadata field {name} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signatures.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response

