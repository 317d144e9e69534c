"""The local server's settings: one config dataclass, its flags, TF Serving's flag spelling.

`ServeConfig` is what `python -m serving.server` takes (common/configlib.py turns its fields
into flags); `normalise_flags` accepts tensorflow_model_server's spelling as well
(`--rest_api_port=8501`, `--enable_batching=false`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common import contract
from common.configlib import ConfigError, check_bounds, field

SERVING_DIR = Path(__file__).resolve().parent
EVENT_LOOPS = ("uvloop", "asyncio")


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
        60, "re-read --model-config-file this often (0 = never), as TF Serving", at_least=0
    )
    file_system_poll_wait_seconds: float = field(1.0, "look for new or removed versions this often", above=0)
    allow_version_labels_for_unavailable_models: bool = field(
        True, "let labels name versions that are not loaded yet (TF Serving's flag)"
    )
    # --- network ----------------------------------------------------------------------------
    host: str = field("127.0.0.1", "address to bind; 0.0.0.0 to accept other machines")
    port: int = field(8500, "gRPC port")
    rest_api_port: int = field(8501, "REST port (0 = no REST API)")
    # A negative deadline would answer every REST request 504 at once.
    rest_api_timeout_in_ms: int = field(30000, "REST request deadline in ms (0 = none)", at_least=0,
                                        bounds_note="0 = none")
    rest_api_enable_cors_support: bool = field(False, "answer CORS preflights, add CORS headers")
    max_request_bytes: int = field(
        64 * 2**20, "largest REST body (after gzip) / gRPC message accepted (TF Serving: 2 GiB)",
        at_least=1024,
    )
    max_tensor_bytes: int = field(
        256 * 2**20, "gRPC: most memory one request's input tensors may take once decoded (a "
        "60-byte TensorProto can declare gigabytes)", at_least=1024,
    )
    rest_idle_timeout_seconds: float = field(
        30.0, "close a REST connection that sends no complete request headers for this long "
        "(idle keep-alive, or headers trickling in)", above=0,
    )
    rest_body_timeout_seconds: float = field(
        60.0, "a REST request's whole body must arrive within this long after its headers (408)",
        above=0,
    )
    rest_send_timeout_seconds: float = field(
        60.0, "a REST answer must be taken by the client within this long, else the connection "
        "is closed (a client that sends requests but never reads would hold it forever)", above=0,
    )
    rest_max_connections: int = field(
        512, "REST connections open at once; beyond, new ones get 503 and are closed", at_least=1
    )
    # --- execution --------------------------------------------------------------------------
    enable_batching: bool = field(True, "batch concurrent requests (server-side batching)")
    batching_parameters_file: Path | None = field(
        SERVING_DIR / "batching_parameters.txt", "BatchingParameters text file ('none' = defaults)"
    )
    batch_arrival_wait_ms: float = field(
        2.0, "with batching: wait up to this long for requests already being parsed (0 = off)",
        at_least=0, at_most=1000,
    )
    grpc_batch_gather_ms: float = field(
        1.0, "with batching: while other requests are in flight, hold gRPC requests this long "
        "so that they share a batch (0 = off)", at_least=0, at_most=1000,
    )
    batch_parallel_min_rows: int = field(
        32, "with batching: while a batch runs, start another beside it only for at least this "
        "many waiting rows (1 = as TF Serving; see serving/batching.py)", at_least=1,
    )
    model_threads: int = field(4, "threads that run model calls when batching is off", at_least=1)
    grpc_max_concurrent: int = field(
        0, "gRPC calls in progress at once, more wait in line (0 = no limit, as TF Serving; "
        "grpc.aio's limiter costs a task and a lock round per call)", at_least=0, bounds_note="0 = no limit",
    )
    event_loop: str = field(
        "uvloop", "asyncio event loop: uvloop (libuv: here 7-23% more gRPC requests/s than "
        "asyncio's own) or asyncio"
    )
    gil_switch_interval_ms: float = field(0.5, "Python's thread switch interval (sys.setswitchinterval)",
                                          above=0)
    # One thread each: with batching, parallelism comes from num_batch_threads; TF's auto
    # setting adds spinning thread pools that cost a small machine more CPU than they save.
    # Negative: TensorFlow aborts the process (a C++ check, no Python error).
    tensorflow_intra_op_parallelism: int = field(1, "TF intra-op threads per session (0 = auto)",
                                                 at_least=0, bounds_note="0 = auto")
    tensorflow_inter_op_parallelism: int = field(1, "TF inter-op threads per session (0 = auto)",
                                                 at_least=0, bounds_note="0 = auto")
    enable_model_warmup: bool = field(True, "replay assets.extra/tf_serving_warmup_requests on load")
    enable_signature_method_name_check: bool = field(
        False, "require predict/classify/regress signatures' method_name (TF Serving's flag)"
    )
    num_request_iterations_for_warmup: int = field(1, "times each warm-up request is replayed", at_least=0)
    max_num_load_retries: int = field(5, "retries of a failed version load", at_least=0)
    load_retry_interval_seconds: float = field(60.0, "wait between load retries", at_least=0)
    # --- operations -------------------------------------------------------------------------
    monitoring_config_file: Path | None = field(
        SERVING_DIR / "monitoring.config", "MonitoringConfig text file ('none' = no metrics page)"
    )
    state_dir: Path = field(
        Path("artifacts/serving-local"), "where the pid file and the resolved config.json go"
    )
    shutdown_grace_seconds: float = field(
        30.0, "on SIGTERM, how long requests in progress may take to finish; then they are cut off",
        at_least=0,
    )
    log_level: str = field("INFO", "DEBUG, INFO, WARNING or ERROR")

    def validate(self) -> None:
        """Raise ConfigError naming the first flag whose value cannot be used."""
        for name in ("port", "rest_api_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535 or (name == "port" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a port number, got {value}")
        if self.rest_api_port == self.port:
            raise ConfigError("--port and --rest-api-port must differ")
        check_bounds(self)  # the bounds declared on the fields above
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @property
    def pid_file(self) -> Path:
        return Path(self.state_dir) / "server.pid"



def normalise_flags(argv: Sequence[str]) -> list[str]:
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

