"""End to end: the local server as a subprocess over a real exported model (versions 1 and 2,
labels stable/canary), queried over REST and gRPC by raw HTTP, raw stubs, the client
library and the CLI. Every answer is compared with what the SavedModel itself computes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from common import contract
from tests.conftest import python_env
from tests.serving_fixtures import (
    BLOCK_TENSORFLOW, PROBABILITY_ATOL, REPO, error_of, png_bytes, publish_copy,
    saved_model_bytes_outputs, saved_model_outputs, start_server, write_models_config,
)

pytestmark = pytest.mark.slow
N_IMAGES = 32
MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def base(exported, tmp_path_factory):
    """A models root with mnist versions 1 and 2 (2 published as a copy of 1)."""
    root = tmp_path_factory.mktemp("serving-e2e") / "models"
    shutil.copytree(exported.serving_base, root, symlinks=True)
    assert publish_copy(root / contract.MODEL_NAME, root / contract.MODEL_NAME / "1") == 2
    return root


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving-e2e-server")
    config = write_models_config(work / "models.config", {"stable": 1, "canary": 2})
    server = start_server(base, work, [
        "--model-config-file", str(config), "--file-system-poll-wait-seconds", "0.25",
        "--max-request-bytes", str(MAX_REQUEST_BYTES), "--model-config-file-poll-wait-seconds", "0",
    ])
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def images(fixture_mnist):
    return fixture_mnist.test.images[:N_IMAGES]


@pytest.fixture(scope="module")
def expected(base, images):
    return saved_model_outputs(base / contract.MODEL_NAME / "2", images)


@pytest.fixture(scope="module")
def pictures(images):
    # PNGs of the test digits, half of them inverted (dark ink on white, as on paper).
    return [png_bytes(im if i % 2 == 0 else 255 - im) for i, im in enumerate(images[:16])]


@pytest.fixture(scope="module")
def expected_bytes(base, pictures):
    return saved_model_bytes_outputs(base / contract.MODEL_NAME / "2", pictures)


def assert_same(digits, probabilities, reference):
    np.testing.assert_array_equal(np.asarray(digits), reference[contract.OUTPUT_DIGIT])
    np.testing.assert_allclose(np.asarray(probabilities, np.float32), reference[contract.OUTPUT_PROBABILITIES],
                               atol=PROBABILITY_ATOL, rtol=0)


def predict_url(server, suffix=""):
    return f"{server.rest_url}/v1/models/{contract.MODEL_NAME}{suffix}:predict"


def good_rest_request(server, images) -> None:
    response = requests.post(predict_url(server), json={"instances": images[:1].tolist()}, timeout=30)
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------------------------
# Predictions equal the SavedModel's own
# --------------------------------------------------------------------------------------------
def test_rest_raw_pixels_row_and_columnar(server, images, expected):
    row = requests.post(predict_url(server), json={"instances": images.tolist()}, timeout=30)
    assert row.status_code == 200 and row.headers["Content-Type"] == "application/json"
    predictions = row.json()["predictions"]
    assert len(predictions) == N_IMAGES and set(predictions[0]) == {"digit", "probabilities"}
    assert_same([p["digit"] for p in predictions], [p["probabilities"] for p in predictions], expected)

    body = {"signature_name": "serving_default", "inputs": {"image": images.tolist()}}
    columnar = requests.post(predict_url(server, "/versions/1"), json=body, timeout=30).json()["outputs"]
    assert_same(columnar["digit"], columnar["probabilities"], expected)


def test_rest_gzip_request_body(server, images, expected):
    import gzip

    body = gzip.compress(json.dumps({"inputs": images.tolist()}).encode())
    response = requests.post(predict_url(server), data=body, timeout=30,
                             headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert_same(outputs["digit"], outputs["probabilities"], expected)


def test_rest_b64_pictures(server, pictures, expected_bytes):
    body = {"signature_name": "serving_bytes",
            "instances": [{"b64": base64.b64encode(p).decode()} for p in pictures]}
    response = requests.post(predict_url(server, "/labels/canary"), json=body, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert_same([p["digit"] for p in predictions], [p["probabilities"] for p in predictions], expected_bytes)


def test_grpc_raw_pixels_and_pictures(server, images, expected, pictures, expected_bytes):
    from serving.grpc_client import GrpcClient

    with GrpcClient(server.grpc_target) as client:
        pixels = client.predict(images)
        assert pixels.model_version == 2  # the latest
        assert_same(pixels.digits, pixels.probabilities, expected)
        encoded = client.predict_encoded(pictures)
        assert_same(encoded.digits, encoded.probabilities, expected_bytes)
    with GrpcClient(server.grpc_target, label="stable") as client:
        assert client.predict(images[:4]).model_version == 1


def test_rest_client_library(server, images, expected, pictures, expected_bytes):
    from serving.client import RestClient

    with RestClient(server.rest_url) as client:
        pixels = client.predict(images)
        assert_same(pixels.digits, pixels.probabilities, expected)
        encoded = client.predict_encoded(pictures)
        assert_same(encoded.digits, encoded.probabilities, expected_bytes)


# --------------------------------------------------------------------------------------------
# Status and metadata, as TF Serving lays them out
# --------------------------------------------------------------------------------------------
def test_status_layout(server):
    ok = {"error_code": "OK", "error_message": ""}
    everything = requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).json()
    assert everything == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": ok},
        {"version": "1", "state": "AVAILABLE", "status": ok}]}
    one = requests.get(f"{server.rest_url}/v1/models/mnist/versions/1", timeout=10).json()
    assert one == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}
    # TF Serving's GetModelStatus looks at the version only: a label lists every version.
    labelled = requests.get(f"{server.rest_url}/v1/models/mnist/labels/stable", timeout=10).json()
    assert labelled == everything
    from serving.grpc_client import GrpcClient

    with GrpcClient(server.grpc_target) as client:
        assert client.status() == everything


def test_metadata_layout(server):
    meta = requests.get(f"{server.rest_url}/v1/models/mnist/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "mnist", "signature_name": "", "version": "2"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    # TF Serving lists every SignatureDef of the MetaGraph, the TF2 init op included.
    assert set(defs) == {"serving_default", "serving_bytes", "__saved_model_init_op"}
    image = defs["serving_default"]["inputs"]["image"]
    assert image["dtype"] == "DT_UINT8"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "28", "28"]
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert set(defs["serving_bytes"]["outputs"]) == {"digit", "probabilities", "mnist_image"}
    stable = requests.get(f"{server.rest_url}/v1/models/mnist/labels/stable/metadata", timeout=10).json()
    assert stable["model_spec"]["version"] == "1"
    from serving.grpc_client import GrpcClient

    with GrpcClient(server.grpc_target) as client:
        assert client.metadata() == meta


def test_warmup_requests_are_replayed_on_load(server, base):
    import re

    from export.warmup import read_warmup

    records = len(read_warmup(base / contract.MODEL_NAME / "1" / contract.WARMUP_FILE))
    log = server.log_path.read_text()
    replayed = {int(v): int(n) for v, n in re.findall(r"version (\d+) AVAILABLE \(loaded in [\d.]+ s, (\d+) warm-up", log)}
    assert replayed == {1: records, 2: records} and records > 0


# --------------------------------------------------------------------------------------------
# Errors: TF Serving's status codes and messages, and the server answers afterwards
# --------------------------------------------------------------------------------------------
UNDECODABLE = base64.b64encode(b"this is not a picture").decode()


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/models/mnist/versions/9", None, 404, "Could not find version 9 of model mnist"),
    ("GET", "/v1/models/mnist/versions/9/metadata", None, 404, "Servable not found for request: Specific(mnist, 9)"),
    ("POST", "/v1/models/nope:predict", '{"instances": [1]}', 404, "Servable not found for request: Latest(nope)"),
    ("POST", "/v1/models/mnist/versions/9:predict", '{"instances": [1]}', 404, "Servable not found for request: Specific(mnist, 9)"),
    ("POST", "/v1/models/mnist/labels/nope:predict", '{"instances": [1]}', 400, "Unrecognized servable version label: nope"),
    ("POST", "/v1/models/mnist:predict", '{"instances": [1,', 400, "JSON Parse error"),
    ("POST", "/v1/models/mnist:predict", "", 400, "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/mnist:predict", '{"instances": [[1]], "inputs": [[1]]}', 400,
     "expecting only one of 'inputs' or 'instances' keys to exist"),
    ("POST", "/v1/models/mnist:predict", '{"signature_name": "serving_default"}', 400, "Missing 'inputs' or 'instances' key"),
    ("POST", "/v1/models/mnist:predict", json.dumps({"instances": [[[0] * 28] * 28, [[0] * 28] * 27]}), 400,
     "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 784 but got: 756"),
    ("POST", "/v1/models/mnist:predict", json.dumps({"instances": [[[0.5] * 28] * 28]}), 400,
     "JSON Value: 0.5 Type: Number is not of expected type: uint8"),
    ("POST", "/v1/models/mnist:predict", json.dumps({"inputs": {"pixels": [[[0] * 28] * 28]}}), 400,
     "Missing named input: image in 'inputs' object."),
    ("POST", "/v1/models/mnist:predict", json.dumps({"instances": [{"pixels": [[0] * 28] * 28}]}), 400,
     "JSON object: does not have named input: pixels"),
    ("POST", "/v1/models/mnist:predict", '{"signature_name": "nope", "instances": [1]}', 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", "/v1/models/mnist:predict", '{"signature_name": 7, "instances": [1]}', 400,
     "'signature_name' key must be a string value."),
    ("POST", "/v1/models/mnist:predict", '{"signature_name": "serving_bytes", "instances": [{"b64": "%%%"}]}', 400,
     "Unable to base64 decode"),
    ("POST", "/v1/models/mnist:predict", json.dumps({"signature_name": "serving_bytes", "instances": [{"b64": UNDECODABLE}]}),
     400, "not an image (expected PNG, JPEG, BMP or WebP"),
    ("POST", "/v1/models/mnist:predict", json.dumps({"instances": [[[0] * 27] * 28]}), 400,
     "Input to reshape is a tensor with 756 values"),  # TF Serving checks no shapes: the graph does
    ("GET", "/v1/models/mnist:predict", None, 400, "Malformed request: GET /v1/models/mnist:predict"),
    ("PUT", "/v1/models/mnist", None, 400, "Malformed request: PUT /v1/models/mnist"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    # json_tensor.cc FillClassifyRegressRequestFromJson, then classifier.cc / regressor.cc on
    # our predict signatures (TF Serving answers 400 with these, not 501).
    ("POST", "/v1/models/mnist:classify", '{"examples": []}', 400,
     'JSON Value: {\n    "examples": []\n} \'examples\' value is an empty array'),
    ("POST", "/v1/models/mnist:regress", "{}", 400,
     "JSON Value: {} When method is classify, key 'examples' is expected and was not found"),
    ("POST", "/v1/models/mnist:classify", '{"examples": [{"x": [1.5]}]}', 400,
     "No classification inputs found in SignatureDef: inputs {\n  key: \"image\""),
    ("POST", "/v1/models/mnist:regress", '{"signature_name": "serving_bytes", "examples": [{}]}', 400,
     "Expected one output Tensor."),
    ("POST", "/v1/models/nope:classify", '{"examples": [{}]}', 404, "Servable not found for request: Latest(nope)"),
])
def test_rest_errors(server, images, method, path, body, status, message):
    response = requests.request(method, server.rest_url + path, data=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in error_of(response)
    good_rest_request(server, images)


def test_rest_body_limit_and_unknown_paths(server, images):
    big = b'{"instances": [' + b"0," * (MAX_REQUEST_BYTES // 2) + b"0]}"
    response = requests.post(predict_url(server), data=big, timeout=30)
    assert response.status_code == 413
    assert "exceeds this server's limit" in error_of(response)
    assert requests.get(server.rest_url + "/elsewhere", timeout=10).status_code == 404
    good_rest_request(server, images)


def test_grpc_errors(server, images):
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    def request(array=images[:1], name="mnist", signature="", key="image", version=None, label=None,
                output_filter=(), extra=False):
        r = predict_pb2.PredictRequest(output_filter=list(output_filter))
        if extra:
            r.inputs["extra"].CopyFrom(tensor_proto.from_ndarray(np.zeros(1, np.uint8), tensor_pb2.TensorProto))
        r.model_spec.name = name
        r.model_spec.signature_name = signature
        if version is not None:
            r.model_spec.version.value = version
        if label is not None:
            r.model_spec.version_label = label
        r.inputs[key].CopyFrom(tensor_proto.from_ndarray(np.asarray(array), tensor_pb2.TensorProto))
        return r

    cases = [
        (request(name="nope"), "NOT_FOUND", "Servable not found for request: Latest(nope)"),
        (request(version=9), "NOT_FOUND", "Servable not found for request: Specific(mnist, 9)"),
        (request(label="nope"), "INVALID_ARGUMENT", "Unrecognized servable version label: nope"),
        (request(array=images[:1].astype(np.float32)), "INVALID_ARGUMENT", "Expects arg[0] to be uint8 but float is provided"),
        # TensorFlow 2.21's GetInputValues (tensorflow/cc/saved_model/util.cc).
        (request(key="pixels"), "INVALID_ARGUMENT", "Signature input alias: image(feed name: "),
        (request(key="pixels"), "INVALID_ARGUMENT", ") not found in request and no default value provided. "
                                                    "Inputs expected to be in the request {pixels}, or default input alias set: "),
        (request(extra=True), "INVALID_ARGUMENT",
         "input size does not match signature: 2!=1 len({extra,image}) != len({image}). Sent extra: {extra}"),
        (request(output_filter=["nope"]), "INVALID_ARGUMENT", "output tensor alias not found in signature: nope"),
        (request(signature="nope"), "FAILED_PRECONDITION", 'Serving signature key "nope" not found.'),
        (request(array=np.array([b"not a picture"], dtype=object), signature="serving_bytes", key="image_bytes"),
         "INVALID_ARGUMENT", "not an image (expected PNG, JPEG, BMP or WebP"),
    ]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for req, code, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(req, timeout=30)
            assert err.value.code().name == code, err.value.details()
            assert message in err.value.details()
            assert stub.Predict(request(), timeout=30).model_spec.version.value == 2  # still answering


def test_requests_of_zero_rows_are_answered_with_zero_rows(server):
    """A batch of no pictures is a valid request: TensorFlow's own call of the signature
    answers digit [0] and probabilities [0, 10]. The server left such a request queued until
    its deadline (REST: 504 after 30 s; gRPC without a deadline: never answered)."""
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    body = {"signature_name": contract.SIGNATURE_BYTES, "inputs": {contract.INPUT_BYTES: []}}
    response = requests.post(predict_url(server), json=body, timeout=20)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert {contract.OUTPUT_DIGIT, contract.OUTPUT_PROBABILITIES} <= set(outputs)
    assert all(value == [] for value in outputs.values()), outputs
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "mnist", contract.SIGNATURE_BYTES
    request.inputs[contract.INPUT_BYTES].CopyFrom(
        tensor_proto.from_ndarray(np.array([], dtype=object), tensor_pb2.TensorProto))
    with grpc.insecure_channel(server.grpc_target) as channel:
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=20)
    assert [d.size for d in answer.outputs[contract.OUTPUT_PROBABILITIES].tensor_shape.dim] == [0, 10]
    assert [d.size for d in answer.outputs[contract.OUTPUT_DIGIT].tensor_shape.dim] == [0]


def test_grpc_deadline_ends_the_call_and_the_server_goes_on(server, images):
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    # Pictures that take the model seconds to decode, and a deadline of a tenth of that.
    big = png_bytes(np.kron(images[0], np.ones((107, 107), np.uint8)))  # 2996 x 2996
    slow = predict_pb2.PredictRequest()
    slow.model_spec.name, slow.model_spec.signature_name = "mnist", contract.SIGNATURE_BYTES
    slow.inputs[contract.INPUT_BYTES].CopyFrom(tensor_proto.from_ndarray(
        np.array([big] * 8, dtype=object), tensor_pb2.TensorProto))
    fast = predict_pb2.PredictRequest()
    fast.model_spec.name = "mnist"
    fast.inputs[contract.INPUT_PIXELS].CopyFrom(tensor_proto.from_ndarray(images[:1], tensor_pb2.TensorProto))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(slow, timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        assert stub.Predict(fast, timeout=30).model_spec.version.value == 2  # still answering
    metrics = requests.get(server.rest_url + "/monitoring/prometheus/metrics", timeout=10).text
    assert ':tensorflow:serving:request_count{model_name="mnist",status="DEADLINE_EXCEEDED"}' in metrics


def test_metrics_page(server, images):
    good_rest_request(server, images)
    response = requests.get(server.rest_url + "/monitoring/prometheus/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    assert '# TYPE :tensorflow:serving:request_count counter' in response.text
    assert ':tensorflow:serving:request_count{model_name="mnist",status="OK"}' in response.text
    assert ":tensorflow:serving:request_latency_bucket" in response.text


def test_runtime_latency_counts_each_successful_predict_model_run(server, images):
    """servables/tensorflow/util.cc's runtime_latency{model_name, API, runtime}, recorded by
    predict_util.cc around Session::Run: one sample per successful Predict, none for a request
    refused before or during the run, and no longer than the request it is part of."""
    from serving.bench import server_histograms
    from serving.metrics import REQUEST_LATENCY, RUNTIME_LATENCY

    def totals() -> list[tuple[float, float]]:
        return server_histograms(server.rest_url, RUNTIME_LATENCY, REQUEST_LATENCY)

    (run_sum, runs), (request_sum, requests_before) = totals()
    good_rest_request(server, images)
    bad = requests.post(server.rest_url + "/v1/models/mnist:predict", timeout=30,
                        json={"signature_name": contract.SIGNATURE_BYTES,
                              "instances": [{contract.INPUT_BYTES: {"b64": base64.b64encode(b"not a picture").decode()}}]})
    assert bad.status_code == 400
    (run_sum_after, runs_after), (request_sum_after, requests_after) = totals()
    assert runs_after == runs + 1 and requests_after == requests_before + 1
    assert 0 < run_sum_after - run_sum <= request_sum_after - request_sum
    page = requests.get(server.rest_url + "/monitoring/prometheus/metrics", timeout=10).text
    assert f'{RUNTIME_LATENCY}_count{{API="Predict",model_name="mnist",runtime="TF1"}}' in page


# --------------------------------------------------------------------------------------------
# TF Serving 2.21's answers, end to end (details in test_serving_compat.py)
# --------------------------------------------------------------------------------------------
def test_requests_over_max_batch_size_are_refused_rest_and_grpc(server, images):
    """shared_batch_scheduler.h: with our batching file, more than 256 rows is INVALID_ARGUMENT,
    large-batch splitting or not."""
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    big = np.resize(images, (257, 28, 28))
    message = "Task size 257 is larger than maximum input batch size 256"
    refused = requests.post(predict_url(server), json={"instances": big.tolist()}, timeout=120)
    assert refused.status_code == 400 and error_of(refused) == message
    assert requests.post(predict_url(server), json={"instances": big[:256].tolist()}, timeout=120).status_code == 200
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = contract.MODEL_NAME
        request.inputs[contract.INPUT_PIXELS].CopyFrom(tensor_proto.from_ndarray(big, tensor_pb2.TensorProto))
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, timeout=120)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_clients_send_large_inputs_in_requests_the_server_accepts(server, base, fixture_mnist):
    from serving.client import RestClient
    from serving.grpc_client import GrpcClient

    many = fixture_mnist.test.images[:600]  # three requests of at most 256
    reference = saved_model_outputs(base / contract.MODEL_NAME / "2", many)
    with RestClient(server.rest_url, timeout=120) as client:
        rest = client.predict(many)
    with GrpcClient(server.grpc_target, timeout=120) as client:
        grpc_answer = client.predict(many)
    for prediction in (rest, grpc_answer):
        assert_same(prediction.digits, prediction.probabilities, reference)
    assert grpc_answer.model_version == 2


def test_rest_reads_bodies_as_tf_serving_does(server, images, expected, pictures, expected_bytes):
    # rapidjson's kParseStopWhenDoneFlag: bytes after the document are not read.
    body = json.dumps({"instances": images[:2].tolist()}) + "\n(and whatever follows is ignored"
    answer = requests.post(predict_url(server), data=body, timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert_same([p["digit"] for p in predictions], [p["probabilities"] for p in predictions],
                {k: v[:2] for k, v in expected.items()})
    # abseil's base64 skips whitespace: MIME-wrapped base64 decodes (../shared/cases R4a's kind).
    body = {"signature_name": "serving_bytes", "instances": [{"b64": base64.encodebytes(p).decode()} for p in pictures[:2]]}
    answer = requests.post(predict_url(server), json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert_same([p["digit"] for p in predictions], [p["probabilities"] for p in predictions],
                {k: v[:2] for k, v in expected_bytes.items()})
    # rapidjson's errors at its offsets (R1a, R2), and an empty object row (K1).
    pixels = json.dumps({"instances": images[:1].tolist()})
    for data, message in [
        ("'" + pixels + "'", "JSON Parse error: Invalid value. at offset: 0"),
        (pixels.replace("0,", "0.,", 1), f"JSON Parse error: Miss fraction part in number. at offset: {pixels.index('0,') + 2}"),
        ('{"instances": [{"image": %s}, {}]}' % json.dumps(images[0].tolist()),
         "Failed to process element: 1 of 'instances' list. JSON object: {} keys must be equal to: image"),
    ]:
        answer = requests.post(predict_url(server), data=data, timeout=30)
        assert (answer.status_code, error_of(answer)) == (400, message)


def test_cors_preflights_are_answered_as_tf_serving_does(server):
    """http_server.cc: OPTIONS on any /v1/ path is OK with an Origin header, else
    FAILED_PRECONDITION (400); no body either way (this server has CORS headers off)."""
    url = f"{server.rest_url}/v1/models/mnist:predict"
    with_origin = requests.options(url, headers={"Origin": "https://example.org"}, timeout=10)
    without = requests.options(url, timeout=10)
    assert (with_origin.status_code, with_origin.content) == (200, b"")
    assert (without.status_code, without.content) == (400, b"")
    assert "Access-Control-Allow-Origin" not in with_origin.headers


def test_expect_100_continue_is_answered(server, images):
    import socket

    body = json.dumps({"instances": images[:1].tolist()}).encode()
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as sock:
        sock.sendall(f"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # as curl waits for it
        sock.sendall(body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200 OK")


def test_grpc_classify_and_regress_on_predict_signatures(server):
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc, regression_pb2

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for call, request, message in [
            (stub.Classify, classification_pb2.ClassificationRequest(model_spec={"name": "mnist"}),
             "No classification inputs found in SignatureDef: inputs {"),
            (stub.Regress, regression_pb2.RegressionRequest(model_spec={"name": "mnist"}), "Expected one output Tensor."),
            (stub.Classify, classification_pb2.ClassificationRequest(), "Missing ModelSpec"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(message)


# --------------------------------------------------------------------------------------------
# Load: 32 concurrent clients x 200 requests, REST and gRPC mixed
# --------------------------------------------------------------------------------------------
def _batches(server) -> tuple[float, float]:
    from serving.bench import batches_run

    totals = batches_run(server.rest_url)
    assert totals is not None, "the metrics page did not answer"
    return totals


def test_load_32_clients_each_get_their_own_answers(server, images, expected):
    import grpc
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensor_proto

    clients, per_client = 32, 200
    failures: list[str] = []
    answered = [0] * clients
    rows_before, batches_before = _batches(server)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def check(i: int, digit: int, probabilities) -> None:
        k = i % N_IMAGES
        if digit != expected["digit"][k] or not np.allclose(probabilities, expected["probabilities"][k], atol=PROBABILITY_ATOL):
            failures.append(f"client {i}: answer for another image (digit {digit}, expected {expected['digit'][k]})")

    def rest_client(i: int) -> None:
        session = requests.Session()
        body = json.dumps({"instances": images[i % N_IMAGES : i % N_IMAGES + 1].tolist()})
        for _ in range(per_client):
            try:
                r = session.post(predict_url(server), data=body, timeout=60)
                if r.status_code != 200:
                    failures.append(f"client {i}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                p = r.json()["predictions"][0]
                check(i, p["digit"], p["probabilities"])
                answered[i] += 1
            except Exception as err:
                failures.append(f"client {i}: {err!r}")

    def grpc_client(i: int) -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = contract.MODEL_NAME
        request.inputs["image"].CopyFrom(tensor_proto.from_ndarray(images[i % N_IMAGES][None], tensor_pb2.TensorProto))
        for _ in range(per_client):
            try:
                out = stub.Predict(request, timeout=60).outputs
                check(i, out["digit"].int64_val[0], np.asarray(out["probabilities"].float_val))
                answered[i] += 1
            except Exception as err:
                failures.append(f"client {i}: {err!r}")

    threads = [threading.Thread(target=grpc_client if i % 4 == 3 else rest_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    assert not failures, f"{len(failures)} failed requests, first: {failures[:3]}"
    assert answered == [per_client] * clients
    rows, batches = _batches(server)
    # Concurrent requests (REST and gRPC alike) were served in shared batches.
    assert (rows - rows_before) / (batches - batches_before) > 1.0


# --------------------------------------------------------------------------------------------
# The CLI: exit codes and messages
# --------------------------------------------------------------------------------------------
def run_query(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.query", *args], capture_output=True, text=True,
                          cwd=REPO, env=env or python_env(), timeout=180)


def test_cli_predicts_files(server, images, expected, tmp_path):
    np.save(tmp_path / "three.npy", images[:3])
    (tmp_path / "digit.png").write_bytes(png_bytes(images[3]))
    port = str(server.rest_port)
    result = run_query("--rest-port", port, "--json", "predict", str(tmp_path / "three.npy"), str(tmp_path / "digit.png"))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["digit"] for r in rows[:3]] == expected["digit"][:3].tolist()
    encoded = run_query("--rest-port", port, "--json", "predict", "--bytes", str(tmp_path / "digit.png"))
    assert encoded.returncode == 0, encoded.stderr
    assert json.loads(encoded.stdout)[0]["digit"] == int(expected["digit"][3])


def test_cli_testset_report(server, fixture_data_dir, base, fixture_mnist, tmp_path):
    report = tmp_path / "testset.json"
    result = run_query("--rest-port", str(server.rest_port), "testset", "--data-dir", str(fixture_data_dir),
                       "--limit", "100", "--batch-size", "10", "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "p99" in result.stdout
    saved = json.loads(report.read_text())
    reference = saved_model_outputs(base / contract.MODEL_NAME / "2", fixture_mnist.test.images[:100])
    accuracy = float((reference["digit"] == fixture_mnist.test.labels[:100]).mean())
    assert saved["result"]["accuracy"] == pytest.approx(accuracy)
    assert saved["result"]["requests"] == 10 and saved["config"]["batch_size"] == 10
    # Predictions of more images than the server takes in one request go as several.
    large = run_query("--rest-port", str(server.rest_port), "testset", "--data-dir", str(fixture_data_dir),
                      "--limit", "300", "--batch-size", "300")
    assert large.returncode == 0, large.stderr


def test_cli_failures_have_clear_messages_and_exit_codes(server, images, tmp_path):
    from serving.process import free_port

    np.save(tmp_path / "one.npy", images[:1])
    np.save(tmp_path / "bad.npy", np.zeros((2, 28, 27), np.uint8))
    port = str(server.rest_port)
    cases = [
        (["--rest-port", str(free_port()), "--retries", "1", "status"], 4, "cannot reach"),
        (["--rest-port", port, "--model", "nope", "status"], 5, "Could not find any versions of model nope"),
        (["--rest-port", port, "--label", "nope", "predict", str(tmp_path / "one.npy")], 5,
         "Unrecognized servable version label: nope"),
        (["--rest-port", port, "predict", str(tmp_path / "missing.png")], 3, "no such file"),
        (["--rest-port", port, "predict", str(tmp_path / "bad.npy")], 3, "expected [28, 28] or [N, 28, 28]"),
        (["--protocol", "grpc", "--grpc-port", str(free_port()), "--retries", "1", "status"], 4, "cannot reach"),
        (["--protocol", "grpc", "--grpc-port", str(server.grpc_port), "--version", "9", "status"], 5,
         "Could not find version 9 of model mnist"),
    ]
    for args, code, message in cases:
        result = run_query(*args)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_rest_client_runs_without_tensorflow(server, images, tmp_path):
    np.save(tmp_path / "one.npy", images[:1])
    script = BLOCK_TENSORFLOW + f"""
from serving import query
status = query.main(["--rest-port", "{server.rest_port}", "predict", "{tmp_path / 'one.npy'}"])
assert "tensorflow" not in sys.modules
try:
    import tensorflow
    raise SystemExit("tensorflow was importable: the block failed")
except ImportError:
    pass
sys.exit(status)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=python_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "one.npy: " in result.stdout


def test_benchmark_cells_run_and_check_answers(server, images):
    import asyncio

    from serving.bench import BenchConfig, evaluate_targets, run_scenario

    config = BenchConfig(duration=0.5, warmup=0.2)
    cells = [asyncio.run(run_scenario(protocol, server.rest_url if protocol == "rest" else server.grpc_target,
                                      images, 1, concurrency, config))
             for protocol in ("rest", "grpc") for concurrency in (1, 32)]
    for cell in cells:
        assert cell["requests"] > 0 and cell["errors"] == 0, cell
        assert 0 < cell["latency_ms"]["p50"] <= cell["latency_ms"]["p99"]
    targets = evaluate_targets(cells)
    assert set(targets) == {"rest_single_image_p50_ms", "grpc_single_image_p50_ms",
                            "rest_32_clients_single_image_predictions_per_s",
                            "grpc_32_clients_single_image_predictions_per_s"}
    assert all(isinstance(t["met"], bool) for t in targets.values())
