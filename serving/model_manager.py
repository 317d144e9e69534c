"""Which SavedModel versions are loaded, and safe access to them while they come and go.

This is the local server's ServerCore + AspiredVersionsManager + ServableStateMonitor:

    poll thread (every file_system_poll_wait_seconds, 1 s as TF Serving):
      <base_path>/<N>/ for numeric N   -> versions on disk (anything else is ignored:
                                          .tmp-export-*, .last_version, .publish.lock, ...)
      version policy (latest N / all / specific)          -> aspired versions
      load each new aspired version: LOADING -> warm-up -> AVAILABLE, or END + error
      unload versions no longer aspired, but only once an aspired one is AVAILABLE
      (availability preserving): UNLOADING -> wait for in-flight requests -> END

Requests take a `Lease` on one loaded version (`acquire`): the version cannot be closed
until every lease on it is released, and a newly loaded version is published (an atomic
swap of the serving map) before any old one leaves it, so a swap never fails a request.

Each loaded version is a `Servable`: a TF1-style Session over the SavedModel graph, run
through the signature's tensor names exactly as TF Serving's Predict does (no shape check
of its own; the graph's ops report bad shapes), with TF Serving's request validation in
front (signature, input names, dtypes, output filter). TensorFlow is imported only inside
the functions that load and run models.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from serving import protocol
from serving import tensor_proto
from serving.config_files import ModelSpecConfig, VersionPolicy

log = logging.getLogger("serving.models")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses warm-up files with more records
_MAX_CACHED = 64  # validation answers kept per version (distinct signature/input/filter combinations)


@dataclass
class ManagerOptions:
    """The knobs of model loading (names follow tensorflow_model_server's flags)."""

    file_system_poll_wait_seconds: float = 1.0
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    max_num_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    allow_version_labels_for_unavailable_models: bool = False
    intra_op_parallelism: int = 0
    inter_op_parallelism: int = 0


@dataclass
class VersionState:
    """ModelVersionStatus: one version's state and health (error code name + message)."""

    version: int
    state: str = START
    error_code: str = "OK"
    error_message: str = ""


def _tf_error(err: BaseException) -> protocol.ApiError:
    """A TensorFlow exception as an ApiError with the same code and message."""
    code = getattr(err, "error_code", None)
    message = getattr(err, "message", None) or str(err)
    if isinstance(code, int) and code in protocol.CODE_NAMES:
        return protocol.ApiError(protocol.CODE_NAMES[code], message)
    return protocol.ApiError("UNKNOWN", f"{type(err).__name__}: {message}")


# --------------------------------------------------------------------------------------------
# One loaded version
# --------------------------------------------------------------------------------------------
class Servable:
    """A SavedModel version loaded in its own Graph and Session.

    `signatures` maps signature name -> SignatureDef proto (all of them, including
    `__saved_model_init_op`, as TF Serving's metadata lists them).
    """

    def __init__(self, name: str, version: int, path: Path, options: ManagerOptions):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, Path(path)
        self._graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=options.intra_op_parallelism,
            inter_op_parallelism_threads=options.inter_op_parallelism,
            allow_soft_placement=True,
        )
        # One inter-op thread runs the graph's ops one after another anyway: let the calling
        # thread do it (RunOptions.inter_op_thread_pool = -1 below) instead of handing every
        # run to a pool thread and waiting for it, two thread switches per run.
        self._run_in_caller = options.inter_op_parallelism == 1
        if self._run_in_caller:
            config.session_inter_op_thread_pool.add(num_threads=1)
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        try:
            with self._graph.as_default():
                self.meta_graph_def = tf.compat.v1.saved_model.loader.load(
                    self._session, [tf.saved_model.SERVING], str(self.path)
                )
        except BaseException:
            self._session.close()
            raise
        self.signatures = dict(self.meta_graph_def.signature_def)
        self._callables: dict[tuple, Callable] = {}
        # Answers of input_dtypes / prepare for requests already seen: reading the signature
        # protos costs more than the rest of a small request's validation.
        self._input_dtypes: dict[str, dict[str, int]] = {}
        self._prepared: dict[tuple, tuple[str, list[str], list[str]]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._closed = False
        self.batch_queues: dict[tuple, Any] = {}  # owned by the batcher

    # -- leases ------------------------------------------------------------------------------
    def retain(self) -> None:
        with self._lock:
            if self._closed:
                raise protocol.ApiError("UNAVAILABLE", f"version {self.version} of model {self.name} was unloaded")
            self._inflight += 1

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def close_when_idle(self) -> None:
        """Block until no request uses this version, then free its session."""
        with self._lock:
            while self._inflight:
                self._idle.wait()
            self._closed = True
            callables, self._callables = self._callables, {}
        del callables
        self._session.close()

    # -- running -----------------------------------------------------------------------------
    def input_dtypes(self, signature_name: str) -> dict[str, int]:
        """REST's GetInfoMap: {input alias: DataType} of a signature ('' = serving_default)."""
        dtypes = self._input_dtypes.get(signature_name)
        if dtypes is not None:
            return dtypes
        key = signature_name or "serving_default"
        if key not in self.signatures:
            raise protocol.invalid(f'Serving signature name: "{key}" not found in signature def')
        dtypes = {alias: int(info.dtype) for alias, info in self.signatures[key].inputs.items()}
        if len(self._input_dtypes) < _MAX_CACHED:
            self._input_dtypes[signature_name] = dtypes
        return dtypes

    def prepare(self, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: Iterable[str] = ()) -> tuple[str, list[str], list[str]]:
        """PreProcessPrediction's checks; returns (signature, input aliases, output aliases).

        Raises ApiError with TF Serving's messages: unknown signature (FAILED_PRECONDITION),
        input count/name mismatch, dtype mismatch, unknown or duplicate output filter.
        """
        # The checks depend only on these names and dtypes: a request like one already
        # accepted is accepted again without reading the signature protos.
        cache_key = (signature_name, tuple(output_filter),
                     *((alias, array.dtype) for alias, array in inputs.items()))
        prepared = self._prepared.get(cache_key)
        if prepared is not None:
            return prepared
        prepared = self._prepare(signature_name, inputs, cache_key[1])
        if len(self._prepared) < _MAX_CACHED:
            self._prepared[cache_key] = prepared
        return prepared

    def _prepare(self, signature_name: str, inputs: dict[str, np.ndarray],
                 output_filter: Iterable[str]) -> tuple[str, list[str], list[str]]:
        key = signature_name or "serving_default"
        signature = self.signatures.get(key)
        if signature is None:
            raise protocol.ApiError("FAILED_PRECONDITION", f'Serving signature key "{key}" not found.')
        expected, sent = set(signature.inputs), set(inputs)
        if len(sent) != len(expected):
            raise protocol.invalid(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
            )
        aliases = sorted(inputs)
        for index, alias in enumerate(aliases):
            info = signature.inputs.get(alias)
            if info is None:
                raise protocol.invalid(
                    f"input tensor alias not found in signature: {alias}. Inputs expected to be "
                    f"in the set {{{','.join(sorted(expected))}}}."
                )
            got = protocol.dtype_of_array(inputs[alias])
            if got != int(info.dtype):
                raise protocol.invalid(
                    f"Expects arg[{index}] to be {protocol.dtype_string(int(info.dtype))} but "
                    f"{protocol.dtype_string(got)} is provided"
                )
        outputs: list[str] = []
        for alias in output_filter:
            if alias not in signature.outputs:
                raise protocol.invalid(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be "
                    f"in the set {{{','.join(sorted(signature.outputs))}}}."
                )
            if alias in outputs:
                raise protocol.invalid(f"duplicate output tensor alias: {alias}")
            outputs.append(alias)
        if not outputs:
            outputs = sorted(signature.outputs)
        return key, aliases, outputs

    def run(self, signature_name: str, inputs: dict[str, np.ndarray],
            output_aliases: list[str]) -> dict[str, np.ndarray]:
        """Session::Run on the signature's tensors; {output alias: array}. Thread-safe.

        Call `prepare` first (this does no validation). TensorFlow errors become ApiErrors
        with TF's own code and message (e.g. INVALID_ARGUMENT for an undecodable picture).
        """
        signature = self.signatures[signature_name]
        aliases = sorted(inputs)
        feeds = tuple(signature.inputs[a].name for a in aliases)
        fetches = tuple(signature.outputs[a].name for a in output_aliases)
        fn = self._callable(feeds, fetches)
        args = [inputs[a] for a in aliases]
        try:
            values = fn(*args)
        except protocol.ApiError:
            raise
        except Exception as err:  # tf.errors.OpError and friends
            raise _tf_error(err) from None
        return dict(zip(output_aliases, values))

    def _callable(self, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Callable:
        key = (feeds, fetches)
        fn = self._callables.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._callables.get(key)
            if fn is None:
                from tensorflow.core.protobuf import config_pb2

                # A callable made from CallableOptions runs the C++ session directly: feeds are
                # not shape-checked or cast on the Python side, as in TF Serving's Session::Run.
                options = config_pb2.CallableOptions(feed=list(feeds), fetch=list(fetches))
                if self._run_in_caller:
                    options.run_options.inter_op_thread_pool = -1
                fn = self._session._make_callable_from_options(options)  # noqa: SLF001
                self._callables[key] = fn
        return fn

    def warm_up(self, iterations: int) -> int:
        """Replay assets.extra/tf_serving_warmup_requests (PredictLog records); returns count.

        A failing record fails the load, as in TF Serving. Other log kinds (classify,
        regress, multi-inference) are skipped: this server implements Predict only.
        """
        from model import contract

        path = self.path / contract.WARMUP_FILE
        if not path.is_file():
            return 0
        from export.saved_model import read_warmup

        records = read_warmup(path)
        if len(records) > MAX_WARMUP_RECORDS:
            raise protocol.invalid(
                f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
            )
        ran = 0
        for record in records:
            if record.WhichOneof("log_type") != "predict_log":
                log.warning("%s: skipping a %s warm-up record (only predict is replayed)",
                            path, record.WhichOneof("log_type"))
                continue
            request = record.predict_log.request
            inputs = {k: tensor_proto.to_ndarray(v) for k, v in request.inputs.items()}
            for _ in range(max(1, iterations)):
                signature, _aliases, outputs = self.prepare(
                    request.model_spec.signature_name, inputs, list(request.output_filter)
                )
                self.run(signature, inputs, outputs)
            ran += 1
        return ran


class Lease:
    """A request's hold on one loaded version; release exactly once (or use `with`)."""

    def __init__(self, servable: Servable):
        self.servable = servable
        self._released = False
        servable.retain()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.servable.release()

    def __enter__(self) -> Servable:
        return self.servable

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------
@dataclass
class _Model:
    spec: ModelSpecConfig
    states: dict[int, VersionState] = field(default_factory=dict)
    serving: dict[int, Servable] = field(default_factory=dict)  # AVAILABLE ones; swapped whole
    failed: set[int] = field(default_factory=set)  # not retried until they leave the disk
    labels: dict[str, int] | None = None
    warned_missing: bool = False


def numeric_versions(base_path: Path) -> list[int]:
    """Version folders under a model's base path: names that parse as non-negative int64."""
    try:
        entries = list(Path(base_path).iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    versions = []
    for entry in entries:
        if entry.name.isdigit() and entry.is_dir():
            number = int(entry.name)
            if number <= protocol.INT64_MAX:
                versions.append(number)
    return sorted(set(versions))


class ModelManager:
    """Loads, serves and unloads the versions of the configured models.

    `on_event(kind, **fields)` (optional) receives load/unload events for metrics and logs.
    """

    def __init__(self, models: list[ModelSpecConfig], options: ManagerOptions,
                 on_event: Callable[..., None] | None = None,
                 loader: Callable[[str, int, Path, ManagerOptions], Servable] = Servable):
        self.options = options
        self._loader = loader
        self._on_event = on_event or (lambda kind, **fields: None)
        self._lock = threading.RLock()
        self._models: dict[str, _Model] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apply_config(models, first=True)

    # -- configuration ----------------------------------------------------------------------
    def _apply_config(self, models: list[ModelSpecConfig], first: bool = False) -> None:
        with self._lock:
            wanted = {m.name: m for m in models}
            # Labels first: a config whose labels are refused changes nothing (ServerCore).
            labels = self._label_map(wanted)
            for name, model in self._models.items():
                if name not in wanted:
                    # A model dropped from the config: aspire to nothing, so all its versions unload.
                    model.spec = ModelSpecConfig(name, model.spec.base_path, VersionPolicy("specific", versions=(-1,)))
                    model.labels = {}
            for name, spec in wanted.items():
                model = self._models.setdefault(name, _Model(spec))
                model.spec = spec
                model.labels = labels.get(name, {})

    def _label_map(self, wanted: dict[str, ModelSpecConfig]) -> dict[str, dict[str, int]]:
        """UpdateModelVersionLabelMap: label -> version per model, all-or-nothing.

        A label may only name an AVAILABLE version, unless
        allow_version_labels_for_unavailable_models, which still refuses to move an existing
        label to a version that is not available.
        """
        new: dict[str, dict[str, int]] = {}
        for name, spec in wanted.items():
            model = self._models.get(name) or _Model(spec)
            for label, version in spec.labels.items():
                allowed = self.options.allow_version_labels_for_unavailable_models
                if allowed and model.labels and model.labels.get(label, version) != version:
                    allowed = False
                state = model.states.get(version)
                if not allowed and (state is None or state.state != AVAILABLE):
                    raise protocol.ApiError(
                        "FAILED_PRECONDITION",
                        f"Request to assign label to version {version} of model {name}, "
                        f"which is not currently available for inference",
                    )
                new.setdefault(name, {})[label] = version
        return new

    def reload_config(self, models: list[ModelSpecConfig]) -> None:
        """Apply a re-read models.config (labels, policies, added or removed models)."""
        self._apply_config(models)
        self.poll_once()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load what is on disk now (blocking), then keep polling in a background thread."""
        self.poll_once()
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and unload every version (waits for in-flight requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            victims = [(m, v) for m in self._models.values() for v in list(m.serving)]
        for model, version in victims:
            self._unload(model, version)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.options.file_system_poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # never let the poller die: log and try again next time
                log.exception("model poll failed")

    def poll_once(self) -> None:
        """One pass of the storage-path source + manager: load and unload as the policy says."""
        with self._lock:
            models = list(self._models.values())
        for model in models:
            self._reconcile(model)

    def _reconcile(self, model: _Model) -> None:
        spec = model.spec
        on_disk = numeric_versions(spec.base_path)
        if not on_disk and not Path(spec.base_path).is_dir() and not model.warned_missing:
            log.warning("model %s: base path %s does not exist (yet); still watching it",
                        spec.name, spec.base_path)
            model.warned_missing = True
        aspired = spec.policy.aspired(on_disk)
        with self._lock:
            model.failed &= set(on_disk)
            to_load = [v for v in aspired
                       if v not in model.serving and v not in model.failed
                       and model.states.get(v, VersionState(v)).state not in (LOADING,)]
        # Newest first: the version clients get by default becomes available soonest.
        for version in sorted(to_load, reverse=True):
            if self._stop.is_set():
                return
            self._load(model, version, spec.base_path / str(version))
        with self._lock:
            # AvailabilityPreservingPolicy: drop an un-aspired version only once an aspired
            # one serves, or when nothing is aspired any more (folder deleted, model
            # removed). A broken new version therefore leaves the old one serving.
            aspired_available = any(v in model.serving for v in aspired)
            to_unload = [v for v in model.serving if v not in aspired
                         and (aspired_available or not aspired)]
        for version in to_unload:
            self._unload(model, version)

    def _load(self, model: _Model, version: int, path: Path) -> None:
        name = model.spec.name
        state = VersionState(version, LOADING)
        with self._lock:
            model.states[version] = state
        attempts = self.options.max_num_load_retries + 1
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                servable = self._loader(name, version, path, self.options)
            except Exception as err:
                error = err if isinstance(err, protocol.ApiError) else _tf_error(err)
                self._on_event("load", model=name, version=version, ok=False,
                               seconds=time.monotonic() - started, error=str(error))
                log.error("model %s version %d: load attempt %d/%d failed: %s",
                          name, version, attempt, attempts, error)
                if attempt < attempts and not self._stop.wait(self.options.load_retry_interval_seconds):
                    continue
                with self._lock:
                    state.state, state.error_code, state.error_message = END, error.code, error.message
                    model.failed.add(version)
                return
            try:
                warmed = servable.warm_up(self.options.num_request_iterations_for_warmup) \
                    if self.options.enable_model_warmup else 0
            except Exception as err:
                error = err if isinstance(err, protocol.ApiError) else _tf_error(err)
                servable.close_when_idle()
                log.error("model %s version %d: warm-up failed: %s", name, version, error)
                with self._lock:
                    state.state, state.error_code, state.error_message = END, error.code, error.message
                    model.failed.add(version)
                self._on_event("load", model=name, version=version, ok=False,
                               seconds=time.monotonic() - started, error=str(error))
                return
            with self._lock:
                # Publish: a new dict, so readers holding the old one keep a consistent view.
                model.serving = {**model.serving, version: servable}
                state.state = AVAILABLE
            seconds = time.monotonic() - started
            self._on_event("load", model=name, version=version, ok=True, seconds=seconds, warmup=warmed)
            log.info("model %s version %d AVAILABLE (loaded in %.2f s, %d warm-up requests) from %s",
                     name, version, seconds, warmed, path)
            return

    def _unload(self, model: _Model, version: int) -> None:
        with self._lock:
            servable = model.serving.get(version)
            if servable is None:
                return
            model.serving = {v: s for v, s in model.serving.items() if v != version}
            state = model.states.setdefault(version, VersionState(version))
            state.state = UNLOADING
        servable.close_when_idle()  # new requests cannot reach it; old ones finish first
        with self._lock:
            state.state = END
        self._on_event("unload", model=model.spec.name, version=version, servable=servable)
        log.info("model %s version %d unloaded", model.spec.name, version)

    # -- requests ----------------------------------------------------------------------------
    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Lease:
        """A lease on the version a ModelSpec asks for (ServerCore::GetServableHandle).

        Latest when neither version nor label is given. Raises ApiError: NOT_FOUND
        ("Servable not found for request: Latest(name)" / "Specific(name, v)") or
        INVALID_ARGUMENT for an unknown label.
        """
        if not name:
            raise protocol.invalid("ModelSpec has no name specified.")
        with self._lock:
            model = self._models.get(name)
            if label is not None:
                labels = model.labels if model is not None else {}
                if labels is None:
                    raise protocol.ApiError("UNAVAILABLE", f"Model labels does not init yet.{label}")
                if label not in labels:
                    raise protocol.invalid(f"Unrecognized servable version label: {label}")
                version = labels[label]
            serving = model.serving if model is not None else {}
            if version is None:
                if not serving:
                    raise protocol.ApiError("NOT_FOUND", f"Servable not found for request: Latest({name})")
                servable = serving[max(serving)]
            else:
                servable = serving.get(version)
                if servable is None:
                    raise protocol.ApiError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
            return Lease(servable)

    def status(self, name: str, version: int | None = None) -> list[VersionState]:
        """GetModelStatus: one version, or every version ever seen (newest first)."""
        with self._lock:
            model = self._models.get(name)
            states = dict(model.states) if model is not None else {}
        if version is not None:
            if version not in states:
                raise protocol.ApiError("NOT_FOUND", f"Could not find version {version} of model {name}")
            return [VersionState(**vars(states[version]))]
        if not states:
            raise protocol.ApiError("NOT_FOUND", f"Could not find any versions of model {name}")
        return [VersionState(**vars(states[v])) for v in sorted(states, reverse=True)]

    def serving_versions(self, name: str) -> list[int]:
        with self._lock:
            model = self._models.get(name)
            return sorted(model.serving) if model is not None else []

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            model = self._models.get(name)
            return dict(model.labels or {}) if model is not None else {}

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)
