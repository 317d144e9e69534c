"""`make demo`'s launcher and page server (serving/demo.py), without a browser.

The page itself, in Chromium against `make demo`, is tests/test_web_page.py. Here: the page's
names agree with common/contract.py, the static server serves exactly the page's files with
the right types, the launcher's settings, messages and exit codes, and that Ctrl-C / SIGTERM
stop it (with the `none` backend, which starts no model server: fast), and that compose's
TF Serving gets the CORS flag.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common import contract
from serving import demo
from serving.process import free_port
from tests.serving_fixtures import REPO, compose_command

WEB = REPO / "serving" / "web"


def js_constants(path: Path) -> dict[str, str]:
    """`export const NAME = "value";` lines of a JavaScript module."""
    return dict(re.findall(r'^export const (\w+) = "([^"]*)";', path.read_text(), re.M))


def test_page_names_agree_with_the_contract():
    names = js_constants(WEB / "tfserving.js")
    assert names["MODEL_NAME"] == contract.MODEL_NAME
    assert names["SIGNATURE_BYTES"] == contract.SIGNATURE_BYTES
    assert names["OUTPUT_DIGIT"] == contract.OUTPUT_DIGIT
    assert names["OUTPUT_PROBABILITIES"] == contract.OUTPUT_PROBABILITIES
    assert names["OUTPUT_MNIST_IMAGE"] == contract.OUTPUT_MNIST_IMAGE
    assert names["DEFAULT_SERVER"] == demo.PAGE_DEFAULT_SERVER


def get(url: str) -> tuple[int, object, bytes]:
    """(status, headers: case-insensitive, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_page_server_serves_the_page_and_nothing_else():
    with demo.PageServer(port=0) as page:
        assert page.url.startswith("http://127.0.0.1:")
        status, headers, body = get(page.url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert headers["Cache-Control"] == "no-cache" and headers["X-Content-Type-Options"] == "nosniff"
        html = body.decode()
        assert "Content-Security-Policy" in html
        # Every file the page loads, from the HTML and through module imports, is served with
        # the type a browser requires (module scripts must be JavaScript), and none is remote.
        wanted = set(re.findall(r'(?:src|href)="([^"#?]+)"', html))
        for module in WEB.glob("*.js"):
            wanted |= {m.lstrip("./") for m in re.findall(r'from "(\./[^"]+)"', module.read_text())}
        assert not [w for w in wanted if "://" in w or w.startswith("//")], wanted
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        assert {Path(w).suffix for w in wanted} == set(types), wanted
        for name in wanted:
            status, headers, _ = get(page.url + name)
            assert status == 200, name
            assert headers["Content-Type"].startswith(types[Path(name).suffix]), (name, headers)
        # No listings, nothing outside the folder, no writes.
        assert get(page.url + "nope.js")[0] == 404
        assert get(page.url + "%2e%2e/demo.py")[0] == 404
        assert get(page.url + "../../pyproject.toml")[0] == 404
        request = urllib.request.Request(page.url, data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 501


def test_page_server_on_a_busy_port_names_the_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(demo.DemoError, match=rf"cannot serve the page on 127.0.0.1:{port}: .*DEMO_PORT"):
            demo.PageServer(port=port).start()


def test_page_url_carries_only_settings_that_differ_from_the_pages_defaults():
    base = "http://127.0.0.1:8080/"
    assert demo.page_url(base, "http://localhost:8501", "mnist") == base
    assert demo.page_url(base, "http://localhost:9501/", "mnist") == base + "?server=http://localhost:9501"
    assert demo.page_url(base, "http://localhost:8501", "other") == base + "?model=other"


@pytest.mark.parametrize("args, message", [
    (["--backend", "kubernetes"], "--backend must be one of auto, docker, local, none"),
    (["--rest-port", "9000", "--grpc-port", "9000"], "must differ"),
    (["--page-port", "70000"], "--page-port must be a port number"),
    (["--server-url", "localhost:8501"], "--server-url must be an http(s) URL"),
    (["--model-name", "a/b"], "--model-name must be a name without"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_settings_exit_2_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_no_model_to_serve_says_make_train(tmp_path, capsys):
    assert demo.main(["--backend", "local", "--models-root", str(tmp_path), "--page-port", "0"]) == 1
    err = capsys.readouterr().err
    assert f"no model to serve: {tmp_path / 'mnist'} has no version folder; run make train first" in err


def test_make_demo_refuses_an_empty_models_root(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "demo", f"MODEL_BASE={tmp_path}", "DEMO_BACKEND=local"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")})
    assert done.returncode != 0
    assert f"error: no model version in {tmp_path}/mnist" in done.stderr


def start_launcher(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.demo", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, pattern: str) -> tuple[re.Match | None, list[str]]:
    """Lines of the launcher's output up to the first that matches (None at the end)."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        match = re.search(pattern, line)
        if match:
            return match, lines
    return None, lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_stops_the_page_and_exits_0(sig):
    server = f"http://127.0.0.1:{free_port()}"  # nothing runs there: the page will say so
    proc = start_launcher("--backend", "none", "--page-port", "0", "--server-url", server)
    try:
        match, lines = read_until(proc, r"demo: open (http://127\.0\.0\.1:(\d+)/\S*)")
        assert match, lines
        assert f"warning: nothing answers at {server} yet" in "\n".join(lines)
        assert match.group(1).endswith(f"?server={server}")
        assert get(match.group(1))[0] == 200
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, rest
    assert f"demo: {sig.name} received: stopping" in rest and "demo: stopped" in rest
    with pytest.raises(OSError):
        urllib.request.urlopen(match.group(1), timeout=5)


def test_a_model_server_that_fails_stops_the_page_and_exits_1(tmp_path):
    (tmp_path / "mnist" / "1").mkdir(parents=True)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rest_port = busy.getsockname()[1]
        proc = start_launcher("--backend", "local", "--page-port", "0", "--models-root", str(tmp_path),
                              "--rest-port", str(rest_port), "--grpc-port", str(free_port()),
                              "--state-dir", str(tmp_path / "state"))
        try:
            output, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, output
    assert "error: the model server exited with status 1 before it answered" in output, output
    assert "demo: stopped" in output


def test_compose_runs_tf_serving_with_cors():
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose here (make setup-compose fetches it)")
    done = subprocess.run([*command, "-f", str(REPO / "serving" / "compose.yaml"), "--profile", "gpu",
                           "config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    for name in ("tfserving", "tfserving-gpu"):
        assert "--rest_api_enable_cors_support=true" in services[name]["command"], name
