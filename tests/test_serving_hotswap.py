"""Versions coming and going under a running local server, and its shutdown on SIGTERM.

- Hot swap: a new version published while REST and gRPC clients loop becomes the served one
  and no request fails; a broken version is reported (END + its error) while the good one
  keeps serving, and a good version published after it is served at once, its retries
  notwithstanding; non-numeric folders are ignored.
- SIGTERM: the server stops accepting, lets the request in flight finish, exits 0 and
  removes its pid file; past --shutdown-grace-seconds it answers what is left UNAVAILABLE
  and exits anyway; under load every call is answered or refused, none dropped.

No test waits for time to pass: model runs that must outlast a signal use the gate model
(serving_fixtures.RunGate), and every wait is for something the server shows.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from common import contract
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
        "--file-system-poll-wait-seconds", "0.2",  # load retries as TF Serving's: 5, 60 s apart
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
        from export.publish import publish

        def write_broken(tmp):
            tmp.mkdir()
            (tmp / "saved_model.pb").write_bytes(b"not a SavedModel")

        publish(model_dir, write_broken)
        _wait_for(lambda: "version 3: load attempt 1/6 failed" in server.log_tail(20000), 60,
                  "version 3 to fail its first load")
        assert _versions(server)["3"][0] == "LOADING"  # waiting 60 s to retry...
        before = counts["grpc"]
        _wait_for(lambda: counts["grpc"] > before + 20, 60, "more answers after the broken version")
        assert seen_versions[-1] == 2
        # ...which must not keep a good newer version out (TF Serving cancels the retries of
        # a version no longer aspired; its poller never waits for a load).
        assert publish_copy(model_dir, model_dir / "1") == 4
        _wait_for(lambda: seen_versions[-1] == 4, 60, "version 4 to be served")
        _wait_for(lambda: _versions(server).get("3", ("",))[0] == "END", 60, "version 3 to give up")
        # Version 2 unloads once version 4 serves (UNLOADING, then END): wait for that event.
        _wait_for(lambda: _versions(server).get("2", ("",))[0] == "END", 60, "version 2 to be unloaded")
        versions = _versions(server)
        assert versions["3"][1] != "OK"
        assert versions == {"4": ("AVAILABLE", "OK"), "3": ("END", versions["3"][1]), "2": ("END", "OK"),
                            "1": ("END", "OK")}
        assert "version 3 is no longer wanted: no more load retries" in server.log_tail(20000)
        detail = requests.get(f"{server.rest_url}/v1/models/mnist/versions/3", timeout=10).json()
        assert detail["model_version_status"][0]["status"]["error_message"]  # the loader's own words
    finally:
        stop.set()
        for t in loops:
            t.join(60)
        exit_status = server.stop()
    assert not failures, f"{len(failures)} failed requests during the swaps, first: {failures[:3]}"
    assert counts["rest"] > 40 and counts["grpc"] > 40
    assert sorted(set(seen_versions)) == [1, 2, 4]
    assert exit_status == 0, server.log_tail()


@pytest.fixture(scope="module")
def gate_models(tmp_path_factory, exported):
    """A models root with the gate model (runs that last as long as a test wants) beside mnist."""
    from tests.serving_fixtures import gate_models_root

    return gate_models_root(tmp_path_factory.mktemp("gate-models"), exported.model_dir)


def _post_gate(server, gate, result: dict) -> None:
    from tests.serving_fixtures import GATE_MODEL

    try:
        result["response"] = requests.post(f"{server.rest_url}/v1/models/{GATE_MODEL}:predict",
                                           json={"instances": gate.paths}, timeout=300)
    except Exception as err:
        result["error"] = err


def test_sigterm_finishes_the_request_in_flight_then_exits_0(gate_models, tmp_path):
    from tests.serving_fixtures import RunGate, running_server, wait_for

    args = ["--model-config-file", str(gate_models / "models.config"),
            "--rest_api_enable_cors_support=true", "--event-loop", "asyncio"]
    # The standard library's event loop here (uvloop, the default, everywhere else).
    with running_server(gate_models, tmp_path, args) as server:
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
        preflight = requests.options(f"{server.rest_url}/v1/models/mnist:predict",
                                     headers={"Origin": "http://example.org"}, timeout=10)
        assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).headers["Access-Control-Allow-Methods"] == "POST, GET"

        gate, result = RunGate(tmp_path), {}
        request = threading.Thread(target=_post_gate, args=(server, gate, result))
        request.start()
        try:
            gate.wait_until_running()  # the request is in, its model run is going...
            server.proc.send_signal(signal.SIGTERM)  # ...when SIGTERM arrives
            wait_for(lambda: "stopping: no new requests" in server.log_tail(), 120, "the server to start stopping")
            with pytest.raises(requests.exceptions.ConnectionError):  # new connections are refused
                requests.get(f"{server.rest_url}/v1/models/mnist", timeout=5)
            assert request.is_alive()  # the run cannot end before the gate opens
        finally:
            gate.release()
            request.join(300)
        assert "error" not in result, result
        assert result["response"].status_code == 200, result["response"].text
        assert len(result["response"].json()["predictions"]) == 2
        assert server.proc.wait(120) == 0, server.log_tail()
        assert not pid_file.exists()
        assert "SIGTERM received" in server.log_tail()


def test_sigterm_honours_the_grace_period(gate_models, tmp_path):
    """A run still going when --shutdown-grace-seconds is over is cut off: its request is
    answered UNAVAILABLE (clients retry elsewhere) and the server exits, never waiting for
    it (this gate never opens)."""
    from tests.serving_fixtures import RunGate, running_server

    args = ["--model-config-file", str(gate_models / "models.config"), "--shutdown-grace-seconds", "1"]
    with running_server(gate_models, tmp_path, args) as server:
        gate, result = RunGate(tmp_path), {}
        request = threading.Thread(target=_post_gate, args=(server, gate, result))
        request.start()
        gate.wait_until_running()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0, server.log_tail()
        request.join(120)
        assert not gate.open.exists()  # the run never had a reason to end by itself
        assert result["response"].status_code == 503, result
        assert "did not finish within the shutdown grace period" in result["response"].json()["error"]
        assert "grace period is over" in server.log_tail()


def test_sigterm_under_load_answers_or_refuses_every_call(copy_serving_base, fixture_mnist, tmp_path):
    """Clients that keep sending over kept-alive REST connections and a gRPC channel while
    SIGTERM comes: every call gets an answer, OK or UNAVAILABLE (503), or its connection is
    refused; none is dropped without an answer, none CANCELLED. A client stops at its first
    refusal, as one that goes to another replica."""
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto
    from tests.serving_fixtures import running_server, wait_for

    base = copy_serving_base()
    image = fixture_mnist.test.images[:1]
    outcomes: list[str] = []
    answered = [0]
    with running_server(base, tmp_path, ["--model-config-file", "none"]) as server:
        def rest_client() -> None:
            session = requests.Session()
            body = json.dumps({"instances": image.tolist()})
            while True:
                try:
                    r = session.post(f"{server.rest_url}/v1/models/mnist:predict", data=body, timeout=60)
                except requests.exceptions.ConnectionError as err:
                    refused = "Connection refused" in str(err) or "Errno 111" in str(err)
                    outcomes.append("refused" if refused else f"REST dropped: {err!r}")
                    return
                if r.status_code == 200:
                    answered[0] += 1
                    continue
                outcomes.append("UNAVAILABLE" if r.status_code == 503 else f"REST {r.status_code}: {r.text[:200]}")
                return

        def grpc_client() -> None:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = contract.MODEL_NAME
            request.inputs["image"].CopyFrom(tensor_proto.from_ndarray(image, tensor_pb2.TensorProto))
            with grpc.insecure_channel(server.grpc_target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while True:
                    try:
                        stub.Predict(request, timeout=60)
                        answered[0] += 1
                    except grpc.RpcError as err:
                        outcomes.append(err.code().name)
                        return

        clients = [threading.Thread(target=f) for f in (rest_client,) * 3 + (grpc_client,) * 3]
        for client in clients:
            client.start()
        try:
            wait_for(lambda: answered[0] >= 60, 120, "the clients to be under way")
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(120) == 0, server.log_tail()
        finally:
            for client in clients:
                client.join(120)
    assert len(outcomes) == len(clients)
    assert set(outcomes) <= {"UNAVAILABLE", "refused"}, outcomes
