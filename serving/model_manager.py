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
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from common.versions import numeric_versions
from serving import protocol
from serving import tensor_proto
from serving.config_files import ModelSpecConfig, VersionPolicy

log = logging.getLogger("serving.models")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
# SignatureDef method names (tensorflow/cc/saved_model/signature_constants.h).
_METHODS = {"predict": "tensorflow/serving/predict", "classify": "tensorflow/serving/classify",
            "regress": "tensorflow/serving/regress"}
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
    enable_signature_method_name_check: bool = False


@dataclass
class VersionState:
    """ModelVersionStatus: one version's state and health (error code name + message)."""

    version: int
    state: str = START
    error_code: str = "OK"
    error_message: str = ""


def _debug_string(message: Any) -> str:
    """protobuf's Message::DebugString(): the text format, two-space indent, map entries in
    key order."""
    from google.protobuf import text_format

    return text_format.MessageToString(message)


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

    method_name_check = False  # --enable_signature_method_name_check (TF Serving's flag)
    unloading = False  # set once, by the manager, under its lock
    _checked: dict[tuple, str] | None = None  # check_inputs' answers (set per loaded instance)

    def __init__(self, name: str, version: int, path: Path, options: ManagerOptions):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, Path(path)
        self.method_name_check = options.enable_signature_method_name_check
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
        self._outputs: dict[str, Any] = {}  # tensor name -> TF_Output (runs with a timeout)
        # Answers of input_dtypes / prepare for requests already seen: reading the signature
        # protos costs more than the rest of a small request's validation.
        self._input_dtypes: dict[str, dict[str, int]] = {}
        self._prepared: dict[tuple, tuple[str, list[str], list[str]]] = {}
        self._checked: dict[tuple, str] = {}
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

    def close_when_idle(self, timeout: float | None = None) -> None:
        """Wait until no request uses this version (at most `timeout` seconds, None = as
        long as it takes), then free its session; closing it cancels runs still going."""
        with self._lock:
            self._idle.wait_for(lambda: self._inflight == 0, timeout)
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

    def check_inputs(self, signature_name: str, aliases: Iterable[str]) -> str:
        """RunPredict's signature lookup and PreProcessPrediction's input checks, before any
        input is decoded: the signature key ('' = serving_default).

        Raises ApiError: FAILED_PRECONDITION `Serving signature key "X" not found.`;
        INVALID_ARGUMENT from VerifyRequestInputsSize (predict_util.cc) or, for a name the
        signature lacks, TensorFlow 2.21's GetInputValues (tensorflow/cc/saved_model/util.cc).
        """
        names = tuple(sorted(aliases))
        checked = self._checked.get((signature_name, names)) if self._checked is not None else None
        if checked is not None:
            return checked
        key = signature_name or "serving_default"
        signature = self.signatures.get(key)
        if signature is None:
            raise protocol.ApiError("FAILED_PRECONDITION", f'Serving signature key "{key}" not found.')
        if self.method_name_check and signature.method_name not in _METHODS.values():
            raise protocol.ApiError(  # VerifySignature, with --enable_signature_method_name_check
                "INTERNAL", f"Expected prediction signature method_name to be one of "
                f"{{{', '.join(_METHODS.values())}}}. Was: {signature.method_name}")
        expected, sent = set(signature.inputs), set(aliases)
        defaults = set(getattr(signature, "defaults", {}))
        if len(sent) > len(expected) or (len(sent) < len(expected) and not defaults):
            raise protocol.invalid(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
            )
        for alias in sorted(expected - sent - defaults):  # TF walks the signature's inputs
            raise protocol.invalid(
                f"Signature input alias: {alias}(feed name: {signature.inputs[alias].name}) not "
                f"found in request and no default value provided. Inputs expected to be in the "
                f"request {{{','.join(sorted(sent))}}}, or default input alias set: "
                f"{','.join(sorted(defaults))}"
            )
        if sent - expected:
            raise protocol.invalid(
                f"Inputs contains invalid name. Used request inputs: "
                f"{','.join(sorted(sent & expected))}, request input: {','.join(sorted(sent))}"
            )
        if self._checked is not None and len(self._checked) < _MAX_CACHED:  # like one already accepted: at once
            self._checked[(signature_name, names)] = key
        return key

    def check_classify_regress(self, signature_name: str, method: str) -> None:
        """:classify / :regress (REST and gRPC) on this version's signature: the checks of
        GetClassificationSignatureDef + PreProcessClassification (classifier.cc) or their
        regression twins (regressor.cc), as TF Serving runs them without
        --enable_signature_method_name_check (its default) or with it.

        Raises ApiError (INVALID_ARGUMENT) with TF Serving's message; a signature that passes
        them all gets UNIMPLEMENTED: this server runs no tf.Example-based signatures.
        """
        key = signature_name or "serving_default"
        signature = self.signatures.get(key)
        if signature is None:
            raise protocol.invalid(f"No signature was found with the name: {key}")
        what = "classification" if method == "classify" else "regression"
        if self.method_name_check and signature.method_name != _METHODS[method]:
            raise protocol.invalid(f"Expected {what} signature method_name to be {_METHODS[method]}. "
                                   f"Was: {signature.method_name}")
        if len(signature.inputs) != 1:
            raise protocol.invalid("Expected one input Tensor.")
        outputs = len(signature.outputs)
        if method == "classify" and outputs not in (1, 2):
            raise protocol.invalid(f"Expected one or two output Tensors, found {outputs}")
        if method == "regress" and outputs != 1:
            raise protocol.invalid("Expected one output Tensor.")
        if "inputs" not in signature.inputs:
            raise protocol.invalid(f"No {what} inputs found in SignatureDef: {_debug_string(signature)}")
        if method == "classify" and not {"classes", "scores"} & set(signature.outputs):
            raise protocol.invalid(
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {_debug_string(signature)}')
        if method == "regress" and "outputs" not in signature.outputs:
            raise protocol.invalid(f"No regression outputs found in SignatureDef: {_debug_string(signature)}")
        raise protocol.ApiError("UNIMPLEMENTED", f"this server does not run {what} signatures "
                                "(tf.Example inputs): serve them with TF Serving")

    def prepare(self, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: Iterable[str] = ()) -> tuple[str, list[str], list[str]]:
        """PreProcessPrediction's checks, then the session's argument check; returns
        (signature, input aliases, output aliases).

        Raises ApiError with TF Serving's messages: check_inputs', then an unknown or
        duplicate output filter, then a dtype mismatch (`Expects arg[i] to be uint8 but
        float is provided`, from Session::Run, which comes last).
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
        key = self.check_inputs(signature_name, inputs)
        signature = self.signatures[key]
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
        aliases = sorted(inputs)
        for index, alias in enumerate(aliases):
            got = protocol.dtype_of_array(inputs[alias])
            want = int(signature.inputs[alias].dtype)
            if got != want:
                raise protocol.invalid(
                    f"Expects arg[{index}] to be {protocol.dtype_string(want)} but "
                    f"{protocol.dtype_string(got)} is provided"
                )
        return key, aliases, outputs

    def run(self, signature_name: str, inputs: dict[str, np.ndarray],
            output_aliases: list[str], timeout: float | None = None) -> dict[str, np.ndarray]:
        """Session::Run on the signature's tensors; {output alias: array}. Thread-safe.

        Call `prepare` first (this does no validation). `timeout` (seconds) goes into the
        run as RunOptions.timeout_in_ms: TensorFlow cancels a run still going then, and it
        fails with DEADLINE_EXCEEDED, instead of computing an answer nobody waits for. Such a
        run goes through the session's C API with its own RunOptions (a callable fixes them
        for good, and making one costs 150 ms); one without a timeout through a cached
        callable, in the calling thread. TensorFlow errors become ApiErrors with TF's own
        code and message (e.g. INVALID_ARGUMENT for an undecodable picture).
        """
        if timeout is not None and timeout <= 0:
            raise protocol.ApiError("DEADLINE_EXCEEDED", "Deadline Exceeded")
        signature = self.signatures[signature_name]
        aliases = sorted(inputs)
        feeds = tuple(signature.inputs[a].name for a in aliases)
        fetches = tuple(signature.outputs[a].name for a in output_aliases)
        args = [inputs[a] for a in aliases]
        try:
            if timeout is None:
                values = self._callable(feeds, fetches)(*args)
            else:
                values = self._run_until(feeds, fetches, args, timeout)
        except protocol.ApiError:
            raise
        except Exception as err:  # tf.errors.OpError and friends
            raise _tf_error(err) from None
        return dict(zip(output_aliases, values))

    def _run_until(self, feeds: tuple[str, ...], fetches: tuple[str, ...], args: list[np.ndarray],
                   timeout: float) -> list[np.ndarray]:
        """Session::Run with RunOptions.timeout_in_ms (DirectSession honours it on its
        inter-op thread pool, so the run does not happen in the calling thread)."""
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.client import pywrap_tf_session as tf_session

        outputs = self._outputs
        feed_dict = {outputs.get(name) or self._output(name): array for name, array in zip(feeds, args)}
        fetch_list = [outputs.get(name) or self._output(name) for name in fetches]
        options = config_pb2.RunOptions(timeout_in_ms=max(1, math.ceil(timeout * 1000)))
        buffer = tf_session.TF_NewBufferFromString(options.SerializeToString())
        try:
            return tf_session.TF_SessionRun_wrapper(self._session._session, buffer, feed_dict,  # noqa: SLF001
                                                    fetch_list, [], None)
        finally:
            tf_session.TF_DeleteBuffer(buffer)

    def _output(self, name: str) -> Any:
        """The C API's TF_Output for a tensor name, kept for next time."""
        output = self._graph.get_tensor_by_name(name)._as_tf_output()  # noqa: SLF001
        self._outputs[name] = output
        return output

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
        from common import contract

        path = self.path / contract.WARMUP_FILE
        if not path.is_file():
            return 0
        from export.warmup import read_warmup

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
            # Requests with a deadline run the other way (see run): make its executor now too,
            # so that the first of them does not pay for it (150-400 ms).
            self.run(signature, inputs, outputs, timeout=3600.0)
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
    aspired: set[int] = field(default_factory=set)  # as of the last poll
    # Versions being loaded (each in its own thread): set the Event to stop its retries.
    loading: dict[int, threading.Event] = field(default_factory=dict)


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
        self._workers: list[threading.Thread] = []  # loads and unloads in progress
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
        """Load what is on disk now (blocking until each aspired version is AVAILABLE or has
        failed, as TF Serving waits for its initial models), then keep polling in a
        background thread."""
        self.poll_once()
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling, stop load retries, and unload every version.

        `timeout`: how long to wait for requests still holding a version (None: as long as
        they take; 0: close its session at once, which cancels the runs still going).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for model in self._models.values():
                for cancel in model.loading.values():
                    cancel.set()
        self._join_workers()  # a load in progress ends (TF cannot be interrupted mid-load)
        with self._lock:
            victims = [(m, v) for m in self._models.values() for v in list(m.serving)]
        for model, version in victims:
            self._unload(model, version, timeout)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.options.file_system_poll_wait_seconds):
            try:
                self.poll_once(wait=False)
            except Exception:  # never let the poller die: log and try again next time
                log.exception("model poll failed")

    def poll_once(self, wait: bool = True) -> None:
        """One pass of the storage-path source + manager: start the loads and unloads the
        policy asks for, each in a thread of its own (a slow load, a retry interval or an
        unload waiting for requests never holds up the others, or the poller).
        `wait`: return only when they are done."""
        with self._lock:
            models = list(self._models.values())
        for model in models:
            self._reconcile(model)
        if wait:
            self._join_workers()

    def _join_workers(self) -> None:
        while True:
            with self._lock:
                self._workers = [t for t in self._workers if t.is_alive()]
                workers = list(self._workers)
            if not workers:
                return
            for thread in workers:
                thread.join()

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._workers.append(thread)
        thread.start()

    def _reconcile(self, model: _Model) -> None:
        spec = model.spec
        on_disk = numeric_versions(spec.base_path)
        if not on_disk and not Path(spec.base_path).is_dir() and not model.warned_missing:
            log.warning("model %s: base path %s does not exist (yet); still watching it",
                        spec.name, spec.base_path)
            model.warned_missing = True
        aspired = spec.policy.aspired(on_disk)
        with self._lock:
            model.aspired = set(aspired)
            model.failed &= set(on_disk)
            for version, cancel in model.loading.items():
                if version not in model.aspired:
                    # No longer wanted (a newer version came, the folder went): stop
                    # retrying it, as TF Serving cancels the load retries of an un-aspired
                    # version (LoaderHarness cancel_load_retry).
                    cancel.set()
            to_load = [v for v in aspired
                       if v not in model.serving and v not in model.failed and v not in model.loading]
            # Newest first: the version clients get by default becomes available soonest.
            for version in sorted(to_load, reverse=True):
                if self._stop.is_set():
                    break
                model.loading[version] = threading.Event()
                model.states[version] = VersionState(version, LOADING)
                self._spawn(self._load, model, version, spec.base_path / str(version),
                            model.loading[version], name=f"load-{spec.name}-{version}")
            self._retire(model)

    def _retire(self, model: _Model) -> None:
        """(Lock held.) AvailabilityPreservingPolicy: unload an un-aspired version only once
        an aspired one serves, or when nothing is aspired any more (folder deleted, model
        removed). A broken new version therefore leaves the old one serving. Runs after each
        poll and each successful load."""
        aspired_available = any(v in model.serving for v in model.aspired)
        for version in [v for v in model.serving if v not in model.aspired
                        and (aspired_available or not model.aspired)]:
            self._spawn(self._unload, model, version, name=f"unload-{model.spec.name}-{version}")

    def _load(self, model: _Model, version: int, path: Path, cancel: threading.Event) -> None:
        name = model.spec.name
        state = model.states[version]
        try:
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
                    if attempt < attempts and not self._stop.is_set() \
                            and not cancel.wait(self.options.load_retry_interval_seconds) \
                            and not self._stop.is_set():
                        continue
                    if cancel.is_set() and attempt < attempts:
                        log.info("model %s version %d is no longer wanted: no more load retries", name, version)
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
                    self._retire(model)  # the versions it replaces can go now
                seconds = time.monotonic() - started
                self._on_event("load", model=name, version=version, ok=True, seconds=seconds, warmup=warmed)
                log.info("model %s version %d AVAILABLE (loaded in %.2f s, %d warm-up requests) from %s",
                         name, version, seconds, warmed, path)
                return
        finally:
            with self._lock:
                model.loading.pop(version, None)

    def _unload(self, model: _Model, version: int, timeout: float | None = None) -> None:
        with self._lock:
            servable = model.serving.get(version)
            if servable is None or servable.unloading:
                return
            servable.unloading = True
            model.serving = {v: s for v, s in model.serving.items() if v != version}
            state = model.states.setdefault(version, VersionState(version))
            state.state = UNLOADING
        # New requests cannot reach it; old ones finish first (at most `timeout` s).
        servable.close_when_idle(timeout)
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

    def knows(self, name: str) -> bool:
        """Is `name` a model of the configuration (served now or not)?"""
        return name in self._models

