"""Run the local server as a child process on free ports (for the benchmark and the tests).

    with LocalServerProcess(models_root, log_path) as server:
        server.rest_url, server.grpc_target   # e.g. http://127.0.0.1:40123, 127.0.0.1:40124

Start-up waits until the REST API answers (the server only listens once the initial
versions are loaded), and fails with the server's own log when it exits or times out.
Stopping sends SIGTERM, as `make serve-stop` does, and returns the exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from common.net import free_port


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready; the message holds its log tail."""


class LocalServerProcess:
    def __init__(self, models_root: Path, log_path: Path, args: Sequence[str] = (),
                 state_dir: Path | None = None, python: str = sys.executable,
                 startup_timeout: float = 180.0, env: dict[str, str] | None = None):
        self.models_root = Path(models_root)
        self.log_path = Path(log_path)
        self.rest_port, self.grpc_port = free_port(), free_port()
        while self.grpc_port == self.rest_port:
            self.grpc_port = free_port()
        self.state_dir = Path(state_dir) if state_dir else self.log_path.parent / "server-state"
        self.args = list(args)
        self.python = python
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [self.python, "-m", "serving.server", "--models-root", str(self.models_root),
                "--rest-api-port", str(self.rest_port), "--port", str(self.grpc_port),
                "--state-dir", str(self.state_dir), *self.args]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> "LocalServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        repo = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=repo, env=self.env)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.rest_url + "/v1/models/_ready_probe", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer (404 here) means it is listening
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"the server was not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait for a clean exit (SIGKILL after `timeout`); the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def __enter__(self) -> "LocalServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
