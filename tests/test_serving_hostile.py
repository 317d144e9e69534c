"""One client must never hurt the others: the local server under hostile input.

Each hostile request is sent while a normal client keeps asking; the checks are relative,
never on absolute speed: normal requests must keep being answered while the hostile one is
being dealt with (one of them finishes in the second half of its processing, which a
stalled event loop makes impossible), and the server's peak memory (VmHWM, reset before
each case) must stay far below what the hostile request asks for.

The server here: mnist and the gate model (serving_fixtures), limits lowered where a test
must reach them quickly
(--rest-idle-timeout-seconds 2, --rest-body-timeout-seconds 2, --rest-send-timeout-seconds 2,
--rest-max-connections 24);
--max-request-bytes (64 MiB) and --max-tensor-bytes (256 MiB) are the defaults.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import zlib

import numpy as np
import pytest
import requests

from common import contract
from tests.serving_fixtures import peak_memory, reset_peak_memory, running_server

pytestmark = pytest.mark.slow
MiB = 2**20
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    from tests.serving_fixtures import gate_models_root

    root = gate_models_root(tmp_path_factory.mktemp("hostile-models"), exported.model_dir)
    args = ["--model-config-file", str(root / "models.config"), "--rest-idle-timeout-seconds", "2",
            "--rest-body-timeout-seconds", "2", "--rest-send-timeout-seconds", "2",
            "--rest-max-connections", str(MAX_CONNECTIONS)]
    with running_server(root, tmp_path_factory.mktemp("hostile"), args) as server:
        normal_request(server, json.dumps({"instances": [[[0] * 28] * 28]}).encode())  # warm
        yield server


@pytest.fixture(scope="module")
def normal_body(fixture_mnist) -> bytes:
    return json.dumps({"instances": fixture_mnist.test.images[:1].tolist()}).encode()


def normal_request(server, body: bytes) -> float:
    """One ordinary prediction; its latency in seconds (AssertionError unless answered)."""
    started = time.perf_counter()
    response = requests.post(f"{server.rest_url}/v1/models/mnist:predict", data=body, timeout=120,
                             headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def resident(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def while_hostile(server, normal: bytes, hostile) -> tuple[object, list[tuple[float, float]], float, float]:
    """Run `hostile()` (which returns its outcome) in a thread while normal requests go
    one after another; returns (outcome, [(start, end)] of normal requests, hostile start,
    hostile end), times from time.perf_counter()."""
    outcome, times = {}, {}

    def run() -> None:
        times["start"] = time.perf_counter()
        try:
            outcome["value"] = hostile()
        except Exception as err:  # reported below, with the test's own assertion
            outcome["error"] = err
        times["end"] = time.perf_counter()

    thread = threading.Thread(target=run)
    normals = []
    thread.start()
    try:
        while thread.is_alive():
            started = time.perf_counter()
            normal_request(server, normal)
            normals.append((started, time.perf_counter()))
    finally:
        thread.join(300)
    assert "error" not in outcome, outcome["error"]
    return outcome["value"], normals, times["start"], times["end"]


def assert_others_kept_being_served(normals, start: float, end: float) -> None:
    """Some normal request ended in the second half of the hostile request's time: the
    server was answering others while dealing with it (a stalled loop answers nothing
    until the hostile request is done)."""
    middle = start + (end - start) / 2
    assert any(middle < done < end for _started, done in normals), (
        f"no normal request finished during the second half of the hostile one "
        f"({end - start:.2f} s; normal requests ended at {[round(d - start, 3) for _s, d in normals]})")


def raw_post(server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """POST over a plain socket (all of it sent before anything is read): status, headers,
    body; the connection is read to its end when the server closes it."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.rest_port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=300) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------
def test_a_gzip_bomb_is_refused_without_being_inflated(server, normal_body):
    inflated = 256 * MiB  # four times the limit
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    zeros = b"0" * MiB
    bomb = b"".join(packer.compress(zeros) for _ in range(inflated // MiB)) + packer.flush()
    assert len(bomb) < MiB
    reset_peak_memory(server.proc.pid)
    before = resident(server.proc.pid)
    (status, headers, body), normals, start, end = while_hostile(
        server, normal_body, lambda: raw_post(server, "/v1/models/mnist:predict", bomb, {"Content-Encoding": "gzip"}))
    assert status == 413 and headers.get("connection") == "close"
    assert json.loads(body)["error"] == ("Request body inflates to more than this server's limit of "
                                         f"{64 * MiB} bytes (--max-request-bytes)")
    assert_others_kept_being_served(normals, start, end)
    assert peak_memory(server.proc.pid) - before < inflated / 2  # inflating stopped at the limit


def test_a_large_body_is_parsed_off_the_event_loop(server, normal_body):
    images = np.random.default_rng(0).integers(0, 256, (4000, 28, 28)).tolist()
    body = json.dumps({"instances": images}, separators=(",", ":")).encode()  # 11 MB, valid
    (status, _headers, answer), normals, start, end = while_hostile(
        server, normal_body, lambda: raw_post(server, "/v1/models/mnist:predict", body))
    # TF Serving parses it all too, then its batching refuses it.
    assert status == 400, answer
    assert json.loads(answer)["error"] == "Task size 4000 is larger than maximum input batch size 256"
    assert_others_kept_being_served(normals, start, end)


def test_a_huge_body_that_is_no_object_costs_little(server, normal_body):
    body = b"[" + b"0," * (3 * MiB) + b"0]"  # 6 MB of valid JSON, not an object
    (status, _headers, answer), normals, start, end = while_hostile(
        server, normal_body, lambda: raw_post(server, "/v1/models/mnist:predict", body))
    assert status == 400
    error = json.loads(answer)["error"]
    assert error.startswith("JSON Value: [0, 0, 0,") and error.endswith(" Is not object") and len(error) < 300
    assert_others_kept_being_served(normals, start, end)


@pytest.mark.parametrize("body, error", [
    (b'{"signature_name": ' + b"[" * 900 + b"]" * 900 + b', "instances": [1]}',
     'JSON Value: {\n    "signature_name": ' + "[" * 232 +
     " not formatted correctly. 'signature_name' key must be a string value."),
    (b'{"instances": [' + b"7" * 4301 + b"]}", "JSON Parse error: Number too big to be stored in double. at offset: 15"),
])
def test_absurd_values_are_bad_requests_not_server_errors(server, body, error):
    status, _headers, answer = raw_post(server, "/v1/models/mnist:predict", body)
    assert (status, json.loads(answer)["error"]) == (400, error)


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------
def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout
    only bounds a failure)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_open_connections_time_out_and_are_capped(server, normal_body):
    partial = f"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: 127.0.0.1:{server.rest_port}\r\nContent-Le".encode()
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS + 6):  # headers that never end
            sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=120)
            sock.sendall(partial)
            sockets.append(sock)
        # Over the cap, a connection is answered 503 at once and closed; within it, one
        # without complete headers is closed after --rest-idle-timeout-seconds. (Which ones
        # are over the cap depends on what other connections the server still counts.)
        answers = [read_until_closed(sock) for sock in sockets]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ") and b"--rest-max-connections" in a]
        timed_out = [a for a in answers if a == b""]
        assert len(refused) + len(timed_out) == len(sockets), answers
        assert len(refused) >= len(sockets) - MAX_CONNECTIONS and 1 <= len(timed_out) <= MAX_CONNECTIONS
    finally:
        for sock in sockets:
            sock.close()
    normal_request(server, normal_body)  # room again


def test_a_body_that_trickles_in_times_out(server, normal_body):
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=120) as sock:
        sock.sendall(f"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(normal_body)}\r\n\r\n"
                     .encode() + normal_body[:10])
        status, headers, body = read_response(sock)
        assert status == 408 and headers.get("connection") == "close"
        assert json.loads(body)["error"] == "Request body not received within 2 s (--rest-body-timeout-seconds)"
        assert read_until_closed(sock) == b""
    normal_request(server, normal_body)


def test_clients_that_never_read_their_answers_are_dropped(server, normal_body):
    """Requests pipelined on every connection the cap allows, answers never read: aiohttp
    waited without a limit for each client to take its answers, so these connections, and
    the cap, were held for good (every other client got 503). Now a connection whose
    answer is not taken within --rest-send-timeout-seconds is dropped; the test waits for
    that to happen (the server hangs up) rather than for a time."""
    import select

    request = f"GET /v1/models/mnist/metadata HTTP/1.1\r\nHost: 127.0.0.1:{server.rest_port}\r\n\r\n".encode()
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few answers
            sock.connect(("127.0.0.1", server.rest_port))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):  # until the server stops reading (its answers pile up)
                    sock.send(request)
            sockets.append(sock)
        poller = select.poll()
        for sock in sockets:
            poller.register(sock, select.POLLHUP | select.POLLERR)  # not POLLIN: nothing is read
        hung_up: set[int] = set()
        deadline = time.monotonic() + 120  # bounds a failure only
        while len(hung_up) < len(sockets) and time.monotonic() < deadline:
            hung_up.update(fd for fd, _event in poller.poll(1000))
        assert len(hung_up) == len(sockets), f"{len(sockets) - len(hung_up)} connections still held"
    finally:
        for sock in sockets:
            sock.close()
    normal_request(server, normal_body)  # room again


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------
def test_grpc_tensors_declaring_gigabytes_are_refused_before_allocation(server):
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import protocol

    pixels = tensor_pb2.TensorProto(dtype=protocol.DT_UINT8, int_val=[7])
    for size in (1, 20000, 20000):  # 400 MB from a message of about 60 bytes
        pixels.tensor_shape.dim.add(size=size)
    strings = tensor_pb2.TensorProto(dtype=protocol.DT_STRING, string_val=[b"x"])
    strings.tensor_shape.dim.add(size=10**8)
    reset_peak_memory(server.proc.pid)
    before = resident(server.proc.pid)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for signature, key, tensor, size in (("serving_default", contract.INPUT_PIXELS, pixels, 400_000_000),
                                             ("serving_bytes", contract.INPUT_BYTES, strings, 800_000_001)):
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = contract.MODEL_NAME, signature
            request.inputs[key].CopyFrom(tensor)
            assert request.ByteSize() < 100
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request, timeout=120)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == (f"Request input tensors would take {size} bytes once decoded, more "
                                           f"than this server's limit of {256 * MiB} bytes (--max-tensor-bytes)")
    assert peak_memory(server.proc.pid) - before < 100 * MiB


def test_a_grpc_deadline_stops_the_model_run(server, tmp_path):
    """Past its deadline, a run stops (the deadline goes into it): the gate model's run
    would otherwise wait forever (its gate never opens), and the next request, queued
    behind it (same queue, too few rows for a second worker), would never run."""
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto
    from tests.serving_fixtures import GATE_MODEL, RunGate

    def request(gate: RunGate) -> predict_pb2.PredictRequest:
        r = predict_pb2.PredictRequest()
        r.model_spec.name = GATE_MODEL
        r.inputs["path"].CopyFrom(tensor_proto.from_ndarray(np.array([p.encode() for p in gate.paths], dtype=object),
                                                           tensor_pb2.TensorProto))
        return r

    (tmp_path / "stuck").mkdir()
    (tmp_path / "free").mkdir()
    stuck, free = RunGate(tmp_path / "stuck"), RunGate(tmp_path / "free")
    free.release()  # this one ends as soon as it runs
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request(stuck), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stuck.started.exists()  # it did run, and was waiting at its gate
        answer = stub.Predict(request(free), timeout=120)
    assert list(answer.outputs["polls"].int64_val) == [0, 0]


def test_metric_labels_cannot_be_injected_or_multiplied(server):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    page = lambda: requests.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=30).text  # noqa: E731
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        evil = predict_pb2.PredictRequest()
        evil.model_spec.name = 'x"}\n# TYPE injected counter\ninjected 1\n'
        with pytest.raises(grpc.RpcError):
            stub.Predict(evil, timeout=30)
        size = len(page())
        for i in range(300):  # names the server does not serve: no series of their own
            evil.model_spec.name = f"unknown-{i}"
            with pytest.raises(grpc.RpcError):
                stub.Predict(evil, timeout=30)
    text = page()
    assert "injected" not in text and "unknown-" not in text
    assert ':tensorflow:serving:request_count{model_name="",status="NOT_FOUND"}' in text
    assert len(text) - size < 2000  # one counter moved, nothing was added
