"""`make demo`: the web page (serving/web/) and the TF Serving it queries, until Ctrl-C.

    python -m serving.demo [--backend auto|docker|local|none] [--page-port 8080]
                           [--rest-port 8501] [--grpc-port 8500] [--models-root artifacts/serving]

1. Starts the model server as `make serve` does, with CORS on (the page is served from another
   origin, so the browser lets it read TF Serving's answers only with CORS headers):
   `auto` runs TF Serving in Docker (`make serve-docker`, whose compose file sets
   --rest_api_enable_cors_support) where `docker info` works, else the local stand-in
   (`python -m serving.server --rest_api_enable_cors_support=true`); `none` starts nothing and
   points the page at a TF Serving that already runs (--server-url).
2. Serves the page's static files from this machine only (127.0.0.1), with the standard
   library's HTTP server: no framework, no build step.
3. Once the model server answers, prints the page's URL (query parameters `server` and `model`
   when they differ from the page's defaults).
4. Ctrl-C (SIGINT) or SIGTERM stops the page and the model server (SIGTERM to the local
   server, which finishes in-flight requests; Ctrl-C to `docker compose up`, which stops the
   container) and exits 0. When the model server exits by itself, the page stops too and the
   exit status is 1.

The page server is also a library (`PageServer`) that the browser tests use.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field

WEB_DIR = Path(__file__).resolve().parent / "web"
REPO = Path(__file__).resolve().parent.parent
# The page's own defaults (serving/web/tfserving.js): the printed URL carries a setting only
# when it differs from these.
PAGE_DEFAULT_SERVER = "http://localhost:8501"
BACKENDS = ("auto", "docker", "local", "none")
EXIT_FAILED = 1


class DemoError(RuntimeError):
    """The demo cannot start or its model server failed; the message says why (exit 1)."""


@dataclass(frozen=True)
class DemoConfig:
    """Serve the demo page and the TF Serving it queries (make demo); Ctrl-C stops both."""

    backend: str = field(
        "auto", "model server: auto (TF Serving in Docker if `docker info` works, else the local "
        "server), docker, local, or none (use the TF Serving at --server-url, which must have CORS on)")
    host: str = field("127.0.0.1", "address the page is served on (this machine only by default)")
    page_port: int = field(8080, "port of the page (0 = any free port)")
    rest_port: int = field(8501, "REST port of the model server it starts")
    grpc_port: int = field(8500, "gRPC port of the model server it starts")
    models_root: Path = field(Path("artifacts/serving"), "folder with one sub-folder per model (MODEL_BASE)")
    state_dir: Path = field(Path("artifacts/serving-local"), "the local server's pid file and config.json")
    server_url: str | None = field(
        None, "TF Serving REST URL the page queries (default http://localhost:<rest-port>)")
    model_name: str = field(contract.MODEL_NAME, "model the page asks for")
    startup_timeout_seconds: float = field(
        900.0, "give up when the model server has not answered after this long (Docker may pull "
        "the image first)", above=0)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("page_port", "rest_port", "grpc_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535 or (value == 0 and name != "page_port"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a port number, got {value}")
        if self.rest_port == self.grpc_port:
            raise ConfigError("--rest-port and --grpc-port must differ")
        if self.server_url is not None:
            parsed = urllib.parse.urlsplit(self.server_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ConfigError(f"--server-url must be an http(s) URL, got {self.server_url!r}")
        if not self.model_name or any(c in self.model_name for c in "/:"):
            raise ConfigError(f"--model-name must be a name without '/' or ':', got {self.model_name!r}")
        check_bounds(self)

    @property
    def resolved_server_url(self) -> str:
        return (self.server_url or f"http://localhost:{self.rest_port}").rstrip("/")


# --------------------------------------------------------------------------------------------
# The page server
# --------------------------------------------------------------------------------------------

class _PageHandler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of the files in the web folder; no directory listings, no caching."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",  # what module scripts must be served as
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
    }
    web_dir: Path = WEB_DIR

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(self.web_dir), **kwargs)

    def list_directory(self, path):  # noqa: ARG002 - the base class' signature
        self.send_error(404, "Not found")
        return None

    def end_headers(self) -> None:
        # Edits to the page show on reload; nothing is sniffed into another type.
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def log_request(self, code="-", size="-") -> None:
        # Quiet unless something is wrong (the terminal belongs to the model server's log).
        if isinstance(code, int) and code >= 400 or str(code)[:1] in ("4", "5"):
            super().log_request(code, size)


class PageServer:
    """The page's static files over HTTP from a background thread.

        with PageServer(port=0) as page:
            page.url   # e.g. http://127.0.0.1:40123/

    Binding happens in `start()`, so a port in use fails there with DemoError.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, web_dir: Path = WEB_DIR):
        self.host, self.port, self.web_dir = host, port, Path(web_dir)
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "PageServer":
        if not (self.web_dir / "index.html").is_file():
            raise DemoError(f"no page to serve: {self.web_dir / 'index.html'} is missing")
        handler = type("PageHandler", (_PageHandler,), {"web_dir": self.web_dir})
        try:
            self._httpd = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as err:
            raise DemoError(f"cannot serve the page on {self.host}:{self.port}: {err.strerror or err}; "
                            "choose another port (make demo DEMO_PORT=8090)") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="page-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> "PageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def page_url(page_base: str, server_url: str, model_name: str) -> str:
    """The page's URL with the settings that differ from its defaults as query parameters."""
    params = {}
    if server_url.rstrip("/") != PAGE_DEFAULT_SERVER:
        params["server"] = server_url.rstrip("/")
    if model_name != contract.MODEL_NAME:
        params["model"] = model_name
    return page_base + ("?" + urllib.parse.urlencode(params, safe=":/") if params else "")


# --------------------------------------------------------------------------------------------
# The model server
# --------------------------------------------------------------------------------------------

def docker_engine_answers() -> bool:
    """`docker info` succeeds (what `make serve` checks)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def has_version(models_root: Path, model_name: str) -> bool:
    folder = Path(models_root) / model_name
    return folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())


def model_server_command(config: DemoConfig, backend: str) -> list[str]:
    """The command that runs the model server in the foreground, CORS on."""
    if backend == "local":
        return [sys.executable, "-m", "serving.server", "--models-root", str(config.models_root),
                "--rest-api-port", str(config.rest_port), "--port", str(config.grpc_port),
                "--state-dir", str(config.state_dir), "--rest_api_enable_cors_support=true"]
    # serving/compose.yaml passes --rest_api_enable_cors_support to tensorflow_model_server.
    return [os.environ.get("MAKE", "make"), "--no-print-directory", "serve-docker",
            f"REST_PORT={config.rest_port}", f"GRPC_PORT={config.grpc_port}",
            f"MODEL_BASE={Path(config.models_root).resolve()}"]


def probe(server_url: str, model_name: str, timeout: float = 2.0) -> dict | None:
    """GET the model's status URL: None while nothing answers, else {"status": HTTP status,
    "cors": whether the answer carries Access-Control-Allow-Origin}."""
    url = f"{server_url}/v1/models/{urllib.parse.quote(model_name, safe='')}"
    request = urllib.request.Request(url, headers={"Origin": "http://127.0.0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {"status": response.status, "cors": "Access-Control-Allow-Origin" in response.headers}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "cors": "Access-Control-Allow-Origin" in err.headers}
    except (urllib.error.URLError, OSError):
        return None


class _Stop:
    """Set by SIGINT/SIGTERM; waits wake up at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def __call__(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def _stop_child(proc: subprocess.Popen, backend: str, log) -> None:
    """Stop the model server: SIGTERM (local: finishes in-flight requests), or SIGINT for
    `docker compose up` (its Ctrl-C: stops the container). SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    sig = signal.SIGINT if backend == "docker" else signal.SIGTERM
    log(f"demo: stopping the model server ({sig.name})")
    try:
        os.killpg(proc.pid, sig)  # its own process group: make, compose and their children
    except ProcessLookupError:
        return
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        log("demo: the model server did not stop within 60 s: SIGKILL")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def run_demo(config: DemoConfig, log=_say) -> int:
    """Run until SIGINT/SIGTERM (exit status 0) or until the model server exits (DemoError).

    `log` gets each progress line (default: stdout, flushed).
    """
    backend = config.backend
    if backend == "auto":
        if docker_engine_answers():
            backend = "docker"
            log("demo: a Docker engine answers: TF Serving in a container (make serve-docker), CORS on")
        else:
            backend = "local"
            log("demo: no Docker engine answers (docker info failed): the local server, CORS on")
    if backend != "none" and not has_version(config.models_root, config.model_name):
        raise DemoError(f"no model to serve: {Path(config.models_root) / config.model_name} has no "
                        "version folder; run make train first (or point MODEL_BASE at a models root)")

    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    page = PageServer(config.host, config.page_port)
    proc: subprocess.Popen | None = None
    try:
        page.start()  # fails fast on a busy port, before the model server loads anything
        if backend != "none":
            # Its own process group: the terminal's Ctrl-C reaches this launcher only, which
            # stops the server in order (and a docker compose gets exactly one SIGINT).
            proc = subprocess.Popen(model_server_command(config, backend), cwd=REPO, start_new_session=True)
        server_url = config.resolved_server_url
        log(f"demo: waiting for the model server at {server_url} ...")
        deadline = time.monotonic() + config.startup_timeout_seconds
        answer = None
        while not stop.event.is_set():
            if proc is not None and proc.poll() is not None:
                raise DemoError(f"the model server exited with status {proc.returncode} before it answered "
                                "(its messages are above); if another server holds the port, stop it "
                                "(make serve-stop) or choose others (make demo REST_PORT=9501 GRPC_PORT=9500)")
            answer = probe(server_url, config.model_name)
            if answer is not None or backend == "none":
                break
            if time.monotonic() > deadline:
                raise DemoError(f"the model server did not answer at {server_url} within "
                                f"{config.startup_timeout_seconds:.0f} s")
            stop.event.wait(0.25)
        if stop.event.is_set():
            log(f"demo: {stop.signal_name} received before the server was ready")
        else:
            if answer is None:
                log(f"demo: warning: nothing answers at {server_url} yet; the page will say so")
            elif not answer["cors"]:
                log(f"demo: warning: {server_url} answers without CORS headers, so browsers will not "
                    "let the page read its answers: start TF Serving with "
                    "--rest_api_enable_cors_support=true")
            url = page_url(page.url, server_url, config.model_name)
            log(f"demo: open {url}   (Ctrl-C stops the page and the model server)")
        while not stop.event.wait(0.25):
            if proc is not None and proc.poll() is not None:
                raise DemoError(f"the model server exited with status {proc.returncode} (its messages are above)")
        log(f"demo: {stop.signal_name} received: stopping")
        return 0
    finally:
        page.stop()
        if proc is not None:
            _stop_child(proc, backend, log)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log("demo: stopped")


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(DemoConfig, argv, prog="python -m serving.demo")
    try:
        return run_demo(config)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
