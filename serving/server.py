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

The pieces: serving/settings.py (ServeConfig, the flags), serving/core.py (the request path
both APIs share), serving/rest.py and serving/grpc_api.py (the two APIs), this module
(start-up, signals, shutdown).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from common import configlib
from serving import config_files
from serving import protocol as pr
from serving.core import ServingCore
from serving.grpc_api import build_grpc_server
from serving.metrics import Metrics
from serving.rest import RestApi
from serving.settings import ServeConfig, normalise_flags

log = logging.getLogger("serving.server")

EXIT_STARTUP_FAILED = 1


class StartupError(RuntimeError):
    """The server cannot start; the message says why (exit status 1)."""


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
        enable_signature_method_name_check=config.enable_signature_method_name_check,
    )
    executor = ThreadPoolExecutor(max_workers=config.model_threads, thread_name_prefix="model")
    manager = core = rest = None
    grpc_server = runner = site = None
    finished = True  # did every call accepted before SIGTERM end within the grace period?
    try:
        try:
            manager = ModelManager(specs, options, on_event=on_event)
        except pr.ApiError as err:
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

            rest = RestApi(core, config, monitoring)
            # By the time the runner is cleaned up, the calls have ended (or the grace did).
            runner = web.ServerRunner(rest.web_server(), shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, config.host, config.rest_api_port)
            try:
                await site.start()
            except OSError as err:
                raise StartupError(f"cannot listen for REST on {config.host}:{config.rest_api_port}: {err}") from None
        for spec in specs:
            log.info("model %s: base path %s, policy %s, labels %s, serving versions %s",
                     spec.name, spec.base_path, spec.policy.describe(), spec.labels or "none",
                     manager.serving_versions(spec.name) or "none yet")
        rest_text = f"REST http://{config.host}:{config.rest_api_port}" if config.rest_api_port else "REST off"
        print(f"Local TF Serving stand-in (pid {os.getpid()}): {rest_text}  gRPC {grpc_address}  "
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
        if reloader is not None:
            reloader.cancel()
        finished = await _drain(core, site, config.shutdown_grace_seconds)
    finally:
        # Nothing is accepted any more: close both APIs (what is left after the grace is
        # cancelled), then the models.
        grpc_stopped = asyncio.ensure_future(grpc_server.stop(0)) if grpc_server is not None else None
        if runner is not None:
            await runner.cleanup()  # closes idle connections; handlers still going are cancelled
        if grpc_stopped is not None:
            await grpc_stopped
        if manager is not None:
            # After a full drain, unloading waits for runs still holding a version (a gRPC
            # call that gave up at its deadline): TensorFlow stops them at that deadline.
            # After the grace, the sessions close at once, which cancels their runs.
            await loop.run_in_executor(None, manager.stop, None if finished else 0.0)
        executor.shutdown(wait=finished, cancel_futures=True)
        if rest is not None:
            rest.parser.shutdown(wait=finished, cancel_futures=True)
        _release_pid_file(config.pid_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


# After SIGTERM, connections close only once no call has come in for this long: a client
# between two requests on a kept-alive connection sends its next one, gets 503 (or
# UNAVAILABLE) and goes elsewhere, instead of finding its connection closed under it.
DRAIN_QUIET_S = 0.25


async def _drain(core: ServingCore, site: Any, grace: float) -> bool:
    """SIGTERM: no new connections; calls arriving on open ones are refused UNAVAILABLE
    (REST 503, with Connection: close), so their clients retry elsewhere; the calls already
    accepted get up to `grace` seconds to finish. True when they all did."""
    core.draining = True
    if site is not None:
        await site.stop()  # the REST listener closes; its open connections stay, for now
    log.info("stopping: no new requests; %d in progress get up to %g s to finish", core.calls, grace)
    if await core.calls_finished(grace, quiet=min(DRAIN_QUIET_S, grace)):
        return True
    log.warning("the %g s grace period is over: answering UNAVAILABLE to the %d requests still in "
                "progress (--shutdown-grace-seconds)", grace, core.calls)
    core.abandon_waiting()
    await core.calls_finished(1.0)  # their answers go out; what still hangs is cut off
    return False


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
        except (OSError, config_files.ConfigFileError, pr.ApiError) as err:
            log.error("keeping the previous model config: %s", err)


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


def _busy_threads() -> list[threading.Thread]:
    """Threads (not daemons) still running: their work outlived the grace period."""
    return [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()]


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(ServeConfig, normalise_flags(sys.argv[1:] if argv is None else argv),
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
            status = runner.run(serve(config))
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    busy = _busy_threads()
    if busy:
        # A run TensorFlow could not cancel (a native call that never returns) must not keep
        # the process alive past the grace period: exit without waiting for it.
        log.warning("exiting without waiting for %d threads still busy: %s", len(busy),
                    ", ".join(t.name for t in busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
