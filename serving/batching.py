"""Server-side batching: concurrent small requests run as one model call.

The local server's counterpart of TF Serving's BatchingSession, driven by the same
BatchingParameters file (serving/batching_parameters.txt):

    request tasks --> queue per (version, signature, input dtypes and row shapes, outputs)
    (the REST and gRPC  |  a worker thread takes the oldest task, then every task queued
     handlers submit;   |  behind it, up to max_batch_size rows (waiting at most
     each gets a        |  batch_timeout_micros for more when the batch is not full)
     Future)            v
                      concatenate along axis 0 [B, ...] -> pad to an allowed_batch_size
                      -> one Session run in the worker thread -> split outputs by rows

- num_batch_threads workers per queue run batches concurrently, with one difference from
  TF Serving: while a worker is running a batch, another starts on the waiting tasks only
  when they hold at least `parallel_min_rows` rows (ServeConfig --batch-parallel-min-rows;
  1 = as TF Serving). Otherwise they wait for the running batch to end and go together.
  Our workers share one GIL with the event loop: two small batches run side by side cost
  more than one twice their size (a run of 1 row takes 140 us here, 8 rows 270 us, 32 rows
  740 us), so single-image traffic runs in fewer, larger batches, while large requests
  still use every worker.
- A task with more rows than max_batch_size is refused, with or without
  enable_large_batch_splitting, as TF Serving refuses it (shared_batch_scheduler.h,
  ValidateBatchTaskQueueCapacity: "Task size N is larger than maximum input batch size M").
  Splitting only cuts tasks larger than max_execution_batch_size (which defaults to
  max_batch_size) into pieces of that size; batches never hold more rows than that.
- When max_enqueued_batches batches' worth of rows are already waiting, new tasks get
  UNAVAILABLE with the scheduler's "queue ... is full" message (clients retry with backoff).
- Unlike TF Serving, tasks whose rows differ in shape go to different queues instead of
  failing together, and when a batch fails each of its tasks is re-run alone, so one bad
  picture in a batch fails only its own request.
- With batch_timeout_micros 0 (our default), a lone request runs at once; batches form
  while the model is busy, which is what keeps single-client latency low.
- Our addition: `arrival_wait` (ServeConfig --batch-arrival-wait-ms). When requests that the
  server has already accepted are still being parsed on their way to a queue, a worker
  waits for them (at most that long) before running a batch that is not full. A lone
  client never waits (nothing else is arriving); 32 clients get batches of ~10-30 instead
  of a stream of batches of one, each costing as much model time as a whole batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from serving import protocol
from serving.config_files import BatchingParameters

# A run that takes less (on average, for its queue) is not given its deadline: see _timed_run.
RUN_TIMEOUT_MIN_S = 0.002
# run(inputs, timeout in seconds or None) -> outputs: one model run.
RunFn = Callable[[dict[str, np.ndarray], "float | None"], dict[str, np.ndarray]]
# A request as queued: (inputs, rows, Future of its outputs, deadline (time.monotonic) or None).
TaskSpec = tuple[dict[str, np.ndarray], int, Future, "float | None"]


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    future: Future
    deadline: float | None = None  # time.monotonic(); past it, nobody waits for the answer
    enqueued: float = field(default_factory=time.monotonic)


class BatchQueue:
    """Tasks that can share a model call, and the worker threads that run them.

    Wake-ups are kept to what the work needs, because on a small machine each one (a thread
    switch and a GIL hand-off) costs about as much CPU as a small model run: a submit wakes
    one idle worker only when no awake worker will take the new rows, and a worker waiting
    for its batch to fill is woken only when the batch is full or nothing else is arriving.
    """

    def __init__(self, run: RunFn, params: BatchingParameters,
                 on_batch: Callable[[int, int], None] | None = None,
                 arriving: Callable[[], int] = lambda: 0, arrival_wait: float = 0.0,
                 name: str = "batch", in_flight: Callable[[], int] | None = None,
                 parallel_min_rows: int = 1):
        self._run = run
        self._params = params
        self._on_batch = on_batch or (lambda rows, padded: None)
        self._arriving = arriving
        self._in_flight = in_flight
        self._arrival_wait = arrival_wait
        self._parallel_min_rows = max(1, parallel_min_rows)
        # The most rows one model run takes (GetQueueOptions: max_execution_batch_size with
        # large-batch splitting, else max_batch_size).
        self._execution_limit = params.execution_batch_size
        self._run_estimate: float | None = None  # seconds a run of this queue takes (moving average)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # idle workers wait here for tasks
        self._fill = threading.Condition(self._lock)  # a worker waits here for its batch to fill
        self._idle = 0  # workers waiting on _work
        self._waking = 0  # of those, notified and not yet back
        self._filling = 0  # workers waiting on _fill
        self._filling_for_arrivals = False  # ...for arrivals (else for batch_timeout_micros)
        self._pending: deque[_Task] = deque()
        self._pending_rows = 0
        self._running = 0  # batches being run right now (by workers or inline)
        self._working = 0  # of those, by workers (which come back for what is queued)
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the workers; tasks still queued fail with UNAVAILABLE."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._pending_rows = 0
            self._work.notify_all()
            self._fill.notify_all()
        for task in pending:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(protocol.ApiError("UNAVAILABLE", "the model version was unloaded"))

    def submit(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None = None) -> Future:
        """Queue one request's inputs (all with `rows` rows); a Future of its outputs.
        `deadline` (time.monotonic()): drop it if it is still queued then, and pass what is
        left of it into the model run.

        Raises ApiError at once for a task that is too large or a full queue.
        """
        future: Future = Future()
        error = self._enqueue([(inputs, rows, future, deadline)])[0]
        if error is not None:
            raise error
        return future

    def submit_all(self, tasks: list[TaskSpec]) -> None:
        """Queue several requests at once (one lock, at most one wake-up): (inputs, rows,
        Future, deadline) each. A task that cannot be queued gets its error through its Future."""
        for (_inputs, _rows, future, _deadline), error in zip(tasks, self._enqueue(tasks)):
            if error is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _enqueue(self, tasks: list[TaskSpec]) -> list[protocol.ApiError | None]:
        p = self._params
        limit = self._execution_limit
        errors: list[protocol.ApiError | None] = []
        queued: list[tuple[_Task, ...]] = []
        for inputs, rows, future, deadline in tasks:
            if rows > p.max_batch_size:
                errors.append(protocol.invalid(f"Task size {rows} is larger than maximum input batch size {p.max_batch_size}"))
                queued.append(())
                continue
            errors.append(None)
            if rows > limit:
                # Run in pieces of max_execution_batch_size rows; `future` gets them joined.
                parts = tuple(_Task({k: v[i : i + limit] for k, v in inputs.items()}, min(limit, rows - i),
                                    Future(), deadline)
                              for i in range(0, rows, limit))
                _gather([t.future for t in parts], future)
                queued.append(parts)
            else:
                queued.append((_Task(inputs, rows, future, deadline),))
        with self._lock:
            for i, parts in enumerate(queued):
                if not parts:
                    continue
                rows = sum(t.rows for t in parts)
                if self._closed:
                    errors[i] = protocol.ApiError("UNAVAILABLE", "the model version was unloaded")
                elif -(-(self._pending_rows + rows) // limit) > p.max_enqueued_batches:
                    errors[i] = protocol.ApiError("UNAVAILABLE", self._full_message(rows))
                else:
                    self._pending.extend(parts)
                    self._pending_rows += rows
            if self._pending:
                self._wake_workers()
        return errors

    def _full_message(self, rows: int) -> str:
        """(Lock held.) The scheduler's words for a full queue (shared_batch_scheduler.h,
        ValidateBatchTaskQueueCapacity), with our queue's rows seen as TF's batches: full
        ones of max_execution_batch_size rows and an open one."""
        p, limit = self._params, self._execution_limit
        batches = max(1, -(-self._pending_rows // limit))
        open_rows = self._pending_rows - (batches - 1) * limit
        text = "The batch scheduling queue to which this task was submitted is full"
        if not p.enable_large_batch_splitting:
            return f"{text}; currently {batches} batches enqueued and max_enqueued_batches is {p.max_enqueued_batches}"
        capacity = max(0, (p.max_enqueued_batches - batches) * limit + limit - open_rows)
        return (f"{text}; task size is {rows} but scheduling capacity is only {capacity} "
                f"(num_enqueued_batches={batches}, max_enqueued_batches={p.max_enqueued_batches}, "
                f"open_batch_size={open_rows}, max_execution_batch_size={limit})")

    def _wake_workers(self) -> None:
        # With the lock held, after tasks were queued.
        if self._filling and (self._pending_rows >= self._execution_limit
                              or (self._filling_for_arrivals and not self._more_coming())):
            self._fill.notify_all()
        # Each awake worker will take up to max_batch_size rows: wake an idle one for the rest,
        # unless a worker busy with a batch will take them when done (see the module notes).
        claimed = (self._waking + self._filling) * self._execution_limit
        if self._working and self._pending_rows - claimed < self._parallel_min_rows:
            return
        if self._idle > self._waking and self._pending_rows > claimed:
            self._waking += 1
            self._work.notify()

    def run_inline_if_idle(self, inputs: dict[str, np.ndarray], rows: int,
                           deadline: float | None = None) -> dict[str, np.ndarray] | None:
        """Run a task in the calling thread when nothing else is queued, running or arriving
        (whether the request is alone in the server is the caller's call).

        A lone request skips the two thread hand-offs through a worker. Returns None (queue
        it instead) when anything else is going on, so batching under load is unchanged.
        """
        p = self._params
        with self._lock:
            if (self._pending or self._running or self._closed or rows > self._execution_limit
                    or p.allowed_batch_sizes or self._arriving() > 0):
                return None
            self._running += 1
        try:
            try:
                outputs = self._timed_run(inputs, [deadline])
            except protocol.ApiError:
                raise
            except Exception as err:  # as the workers report it
                raise protocol.ApiError("INTERNAL", f"{type(err).__name__}: {err}") from err
            self._on_batch(rows, rows)
            return outputs
        finally:
            with self._lock:
                self._running -= 1

    def _timed_run(self, inputs: dict[str, np.ndarray], deadlines: list[float | None]) -> dict[str, np.ndarray]:
        """One model run, given until the last of its tasks stops waiting (none of them must
        wait: no limit). That limit goes into the run only when this queue's runs take at
        least RUN_TIMEOUT_MIN_S (or none has run yet): TensorFlow honours a timeout on its
        thread pool only, and the two thread switches cost a run of a few hundred
        microseconds (MNIST pixels) more than a deadline could ever save it."""
        timeout = None if None in deadlines else _left(max(deadlines))
        if timeout is not None and self._run_estimate is not None and self._run_estimate < RUN_TIMEOUT_MIN_S:
            timeout = None
        started = time.monotonic()
        outputs = self._run(inputs, timeout)
        took = time.monotonic() - started
        estimate = self._run_estimate
        self._run_estimate = took if estimate is None else estimate + 0.2 * (took - estimate)
        return outputs

    def _more_coming(self) -> bool:
        """(Lock held.) Could more requests join the waiting batch soon? Yes while some are
        arriving, or while the server holds requests that are not queued here (being read,
        run in another batch, answered: their clients will be back)."""
        if self._arriving() > 0:
            return True
        return self._in_flight is not None and self._in_flight() > len(self._pending)

    # -- workers -----------------------------------------------------------------------------
    def _take_batch(self) -> list[_Task]:
        batch, size = [], 0
        now = time.monotonic()
        while self._pending and size + self._pending[0].rows <= self._execution_limit:
            task = self._pending.popleft()
            self._pending_rows -= task.rows
            if not task.future.set_running_or_notify_cancel():
                continue  # the client gave up (timeout) while queued
            if task.deadline is not None and task.deadline <= now:
                task.future.set_exception(protocol.ApiError("DEADLINE_EXCEEDED", "Deadline Exceeded"))
                continue  # nobody waits for this answer any more: do not compute it
            batch.append(task)
            size += task.rows
        return batch

    def _wait_until(self, deadline: float, for_arrivals: bool) -> None:
        # With the lock held: until the batch is full, the deadline passes or (for_arrivals)
        # nothing else is on its way. Submits wake us only when one of those holds.
        while (self._pending and self._pending_rows < self._execution_limit
               and not self._closed and (not for_arrivals or self._more_coming())):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._filling += 1
            self._filling_for_arrivals = for_arrivals
            try:
                self._fill.wait(left)
            finally:
                self._filling -= 1

    def _worker(self) -> None:
        p = self._params
        timeout = p.batch_timeout_micros / 1e6
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._idle += 1
                    try:
                        self._work.wait()
                    finally:
                        self._idle -= 1
                        self._waking = max(0, self._waking - 1)
                if self._closed:
                    return
                if timeout > 0:
                    # Give the batch until its oldest task is `timeout` old to fill up.
                    self._wait_until(self._pending[0].enqueued + timeout, for_arrivals=False)
                if self._arrival_wait > 0 and self._pending:
                    # Wait, briefly, for requests already accepted and on their way here.
                    self._wait_until(self._pending[0].enqueued + self._arrival_wait, for_arrivals=True)
                batch = self._take_batch()
                self._running += bool(batch)
                self._working += bool(batch)
                if self._pending:
                    self._wake_workers()  # more than one batch was waiting: another worker's turn
            if batch:
                try:
                    self._process(batch)
                finally:
                    with self._lock:
                        self._running -= 1
                        self._working -= 1

    def _process(self, batch: list[_Task]) -> None:
        rows = sum(t.rows for t in batch)
        padded = _padded_size(rows, self._params.allowed_batch_sizes)
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
            if padded > rows:
                # Pad by repeating the first row, as BatchingSession does.
                merged = {k: np.concatenate([v, np.repeat(v[:1], padded - rows, axis=0)]) for k, v in merged.items()}
            outputs = self._timed_run(merged, [t.deadline for t in batch])
            self._on_batch(rows, padded)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != padded:
                    raise protocol.invalid(
                        f"Batched output tensor '{name}' has 0th dimension "
                        f"{value.shape[0] if value.ndim else 'none'}, expected the batch size {padded}"
                    )
        except Exception as err:
            if len(batch) > 1 and not (isinstance(err, protocol.ApiError) and err.code == "DEADLINE_EXCEEDED"):
                # Isolate the culprit: each task alone gets its own result or its own error.
                for task in batch:
                    self._process([task])
                return
            error = err if isinstance(err, protocol.ApiError) else protocol.ApiError("INTERNAL", f"{type(err).__name__}: {err}")
            for task in batch:  # one task, or a batch stopped at its last task's deadline
                task.future.set_exception(error)
            return
        start = 0
        for task in batch:
            task.future.set_result({k: v[start : start + task.rows] for k, v in outputs.items()})
            start += task.rows


def _gather(parts: list[Future], whole: Future) -> None:
    """Complete `whole` when the pieces of a split task are done: their outputs concatenated
    in order, or the first error. A cancelled `whole` (the client gave up) is left alone."""
    lock = threading.Lock()
    remaining = [len(parts)]

    def done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        if not whole.set_running_or_notify_cancel():
            return
        for part in parts:
            if part.exception() is not None:
                whole.set_exception(part.exception())
                return
        results = [part.result() for part in parts]
        whole.set_result({k: np.concatenate([r[k] for r in results]) for k in results[0]})

    for part in parts:
        part.add_done_callback(done)


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (time.monotonic()), None for none."""
    return None if deadline is None else deadline - time.monotonic()


def _padded_size(rows: int, allowed: tuple[int, ...]) -> int:
    for size in allowed:
        if size >= rows:
            return size
    return rows


def batch_rows(inputs: dict[str, Any]) -> int:
    """The task size: every input's 0th dimension, which must agree (batching_util.h,
    ComputeTensorBatchSize)."""
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise protocol.invalid("Batching Run() input tensors must have at least one dimension")
        sizes.add(array.shape[0])
    if len(sizes) != 1:
        raise protocol.invalid("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


def queue_key(signature: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> tuple:
    """Tasks batch together only when they run the same signature with the same row shapes,
    dtypes and outputs."""
    return (signature, tuple(outputs),
            tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(inputs.items())))
