"""Versions coming and going under a running local server, and its shutdown on SIGTERM.

- Hot swap: a new version published while REST and gRPC clients loop becomes the served one
  and no request fails; a broken version is reported (END + its error) while the good one
  keeps serving; non-numeric folders are ignored.
- SIGTERM: the server stops accepting, lets the request in flight finish, exits 0 and
  removes its pid file.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests

from model import contract
from tests.serving_fixtures import publish_copy, start_server

pytestmark = pytest.mark.slow


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _versions(server) -> dict[str, tuple[str, str]]:
    status = requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).json()
    return {s["version"]: (s["state"], s["status"]["error_code"]) for s in status["model_version_status"]}


def test_hot_swap_fails_no_request(copy_serving_base, fixture_mnist, tmp_path):
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    base = copy_serving_base()
    model_dir = base / contract.MODEL_NAME
    server = start_server(base, tmp_path, [
        "--model-config-file", "none",  # one model, latest version only (TF Serving's default policy)
        "--file-system-poll-wait-seconds", "0.2", "--max-num-load-retries", "0",
    ])
    image = fixture_mnist.test.images[:1]
    stop = threading.Event()
    failures: list[str] = []
    seen_versions: list[int] = []
    counts = {"rest": 0, "grpc": 0}

    def rest_loop() -> None:
        session = requests.Session()
        body = json.dumps({"instances": image.tolist()})
        while not stop.is_set():
            try:
                r = session.post(f"{server.rest_url}/v1/models/mnist:predict", data=body, timeout=30)
                if r.status_code != 200:
                    failures.append(f"REST {r.status_code}: {r.text[:200]}")
                counts["rest"] += 1
            except Exception as err:
                failures.append(f"REST {err!r}")

    def grpc_loop() -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = contract.MODEL_NAME
        request.inputs["image"].CopyFrom(tensor_proto.from_ndarray(image, tensor_pb2.TensorProto))
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    seen_versions.append(stub.Predict(request, timeout=30).model_spec.version.value)
                    counts["grpc"] += 1
                except Exception as err:
                    failures.append(f"gRPC {err!r}")

    loops = [threading.Thread(target=f) for f in (rest_loop, rest_loop, grpc_loop, grpc_loop)]
    try:
        for t in loops:
            t.start()
        _wait_for(lambda: counts["grpc"] > 20 and counts["rest"] > 20, 60, "the client loops to run")
        assert set(seen_versions) == {1}

        (model_dir / "incoming-not-a-version").mkdir()  # ignored: not a number
        assert publish_copy(model_dir, model_dir / "1") == 2
        _wait_for(lambda: seen_versions[-1] == 2, 120, "version 2 to be served")
        _wait_for(lambda: _versions(server).get("1", ("",))[0] == "END", 60, "version 1 to be unloaded")

        # A broken version 3: reported with its error, version 2 keeps serving.
        from export.saved_model import publish

        def write_broken(tmp):
            tmp.mkdir()
            (tmp / "saved_model.pb").write_bytes(b"not a SavedModel")

        publish(model_dir, write_broken)
        _wait_for(lambda: _versions(server).get("3", ("",))[0] == "END", 60, "version 3 to fail loading")
        versions = _versions(server)
        assert versions["3"][1] != "OK"
        assert versions == {"3": ("END", versions["3"][1]), "2": ("AVAILABLE", "OK"), "1": ("END", "OK")}
        before = counts["grpc"]
        _wait_for(lambda: counts["grpc"] > before + 20, 60, "more answers after the broken version")
        assert seen_versions[-1] == 2
        detail = requests.get(f"{server.rest_url}/v1/models/mnist/versions/3", timeout=10).json()
        assert detail["model_version_status"][0]["status"]["error_message"]  # the loader's own words
    finally:
        stop.set()
        for t in loops:
            t.join(60)
        exit_status = server.stop()
    assert not failures, f"{len(failures)} failed requests during the swaps, first: {failures[:3]}"
    assert counts["rest"] > 40 and counts["grpc"] > 40
    assert sorted(set(seen_versions)) == [1, 2]
    assert exit_status == 0, server.log_tail()


def _big_png(image: np.ndarray, side: int = 2400) -> bytes:
    """A digit as a large PNG: small to send, slow (~0.2 s) for the graph to decode and shrink."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).resize((side, side), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sigterm_finishes_the_request_in_flight_then_exits_0(copy_serving_base, fixture_mnist, tmp_path):
    import base64

    base = copy_serving_base()
    # The standard library's event loop here (uvloop, the default, everywhere else).
    server = start_server(base, tmp_path, ["--model-config-file", "none", "--rest_api_enable_cors_support=true",
                                           "--event-loop", "asyncio"])
    assert "event loop asyncio" in server.log_tail()
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:  # gRPC on that loop too
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=10)
    assert [s.state for s in status.model_version_status] == [get_model_status_pb2.ModelVersionStatus.AVAILABLE]
    pid_file = tmp_path / "state" / "server.pid"
    assert pid_file.read_text().strip() == str(server.proc.pid)
    # (This server also has CORS on, spelled as TF Serving spells the flag.)
    preflight = requests.options(f"{server.rest_url}/v1/models/mnist:predict", timeout=10)
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).headers["Access-Control-Allow-Methods"] == "POST, GET"
    picture = base64.b64encode(_big_png(fixture_mnist.test.images[0])).decode()
    body = {"signature_name": contract.SIGNATURE_BYTES, "instances": [{"b64": picture}] * 12}
    result: dict = {}

    def slow_request() -> None:
        try:
            result["response"] = requests.post(f"{server.rest_url}/v1/models/mnist:predict", json=body, timeout=120)
        except Exception as err:
            result["error"] = err

    request = threading.Thread(target=slow_request)
    request.start()
    time.sleep(0.7)  # the request is in, its pictures are being decoded (seconds of work)...
    assert request.is_alive()
    server.proc.send_signal(15)  # ...when SIGTERM arrives
    time.sleep(0.3)
    with pytest.raises(requests.exceptions.ConnectionError):  # new connections are refused
        requests.get(f"{server.rest_url}/v1/models/mnist", timeout=5)
    request.join(120)
    assert "error" not in result, result
    assert result["response"].status_code == 200, result["response"].text
    assert len(result["response"].json()["predictions"]) == 12
    assert server.proc.wait(60) == 0, server.log_tail()
    assert not pid_file.exists()
    assert "SIGTERM received" in server.log_tail()
