"""Unit tests of the serving pieces that need no running server and no trained model:
TF Serving's JSON rules, TensorProto packing, the config files, the batcher, the model
manager's version/label/lease logic (with a stand-in loader), client-side checks, the CLI's
flags and the Docker image check's parsing."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving import batching, config_files
from serving import json_tensor as jt
from serving import protocol as pr
from serving import tensor_proto
from serving.client import (
    InputError, RetryPolicy, ServerFailure, TensorSpec, check_tensor, with_retries,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE_INFO = {"image": pr.DT_UINT8}


def fill(doc, infos=IMAGE_INFO, may_have_bools=True):
    return jt.fill_predict_request(doc, lambda signature: infos, may_have_bools)


# --------------------------------------------------------------------------------------------
# JSON requests (json_tensor.cc)
# --------------------------------------------------------------------------------------------
def test_row_and_columnar_give_the_same_batched_tensor():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    row = fill({"instances": images.tolist()})
    columnar = fill({"inputs": {"image": images.tolist()}})
    unnamed = fill({"inputs": images.tolist()})
    named_rows = fill({"instances": [{"image": im.tolist()} for im in images]})
    for parsed in (row, columnar, unnamed, named_rows):
        assert parsed.tensors["image"].dtype == np.uint8
        np.testing.assert_array_equal(parsed.tensors["image"], images)
    assert (row.format, columnar.format) == (jt.ROW, jt.COLUMNAR)


def test_fast_numeric_path_agrees_with_tf_serving_walk():
    rng = np.random.default_rng(1)
    for dt, values in ((pr.DT_UINT8, rng.integers(-5, 300, (4, 3, 2))),
                       (pr.DT_FLOAT, rng.normal(size=(5, 2))), (pr.DT_INT64, rng.integers(-9, 9, (6,)))):
        infos = {"x": dt}
        fast = fill({"inputs": values.tolist()}, infos, may_have_bools=False).tensors["x"]
        # Forcing the slow walk: a bool-free body that we claim may hold bools still must
        # not change the result, and the element-by-element walk must agree.
        walked = jt._to_array(*_walk(values.tolist(), dt))
        np.testing.assert_array_equal(fast, walked)
        assert fast.dtype == walked.dtype == pr.DTYPES[dt][1]


def _walk(value, dt):
    shape = jt._dense_shape(value)
    out = []
    jt._fill(value, 0, shape, dt, out)
    return out, shape, dt


def test_uint8_values_are_narrowed_like_tf_serving():
    # TF Serving accepts any int32 for DT_UINT8 and casts (300 -> 44, -1 -> 255); we mirror
    # it (clients check the range before sending, see test_check_tensor_*).
    parsed = fill({"instances": [300, -1, 7]})
    np.testing.assert_array_equal(parsed.tensors["image"], np.array([44, 255, 7], np.uint8))


@pytest.mark.parametrize("doc, infos, message", [
    ({"instances": [[1, 2], [3]]}, {"x": pr.DT_INT32},
     "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 2 but got: 1"),
    ({"instances": [[1, 2], [[3], [4]]]}, {"x": pr.DT_INT32}, "Expecting shape [2] but got: [2,1]"),
    ({"instances": [[0.5]]}, IMAGE_INFO, "JSON Value: 0.5 Type: Number is not of expected type: uint8"),
    ({"instances": [[True]]}, IMAGE_INFO, "JSON Value: true Type: True is not of expected type: uint8"),
    ({"inputs": [[1, True]]}, IMAGE_INFO, "Type: True is not of expected type: uint8"),
    ({"instances": [["7"]]}, IMAGE_INFO, 'JSON Value: "7" Type: String is not of expected type: uint8'),
    ({"instances": [[2**31]]}, {"x": pr.DT_INT32}, "is not of expected type: int32"),
    ({"inputs": {"wrong": [1]}}, IMAGE_INFO, "Missing named input: image in 'inputs' object."),
    ({"instances": [{"wrong": [1]}]}, IMAGE_INFO,
     "Failed to process element: 0 key: wrong of 'instances' list. Error: INVALID_ARGUMENT: "
     "JSON object: does not have named input: wrong"),
    ({"instances": []}, IMAGE_INFO, "No values in 'instances' array"),
    ({"instances": 5}, IMAGE_INFO, "Excepting 'instances' to be an list/array"),
    ({"instances": [1], "inputs": [1]}, IMAGE_INFO,
     "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    ({"signature_name": "serving_default"}, IMAGE_INFO, "Missing 'inputs' or 'instances' key"),
    ({"signature_name": 5, "instances": [1]}, IMAGE_INFO, "'signature_name' key must be a string value."),
    ({"instances": [{"b64": "!!!"}]}, {"image_bytes": pr.DT_STRING}, "Unable to base64 decode"),
    ({"instances": [{"b64": "aGk="}]}, IMAGE_INFO, "Type: Object is not of expected type: uint8"),
    ({"inputs": [[1, [2]]]}, {"x": pr.DT_INT32}, "Encountered list at unexpected level: 2 expected < 2"),
    ({"inputs": [[[1], 2]]}, {"x": pr.DT_INT32}, "found at incorrect level: 3 in the JSON DOM. Expected at level: 3"),
    ({"instances": [1, 2]}, {"a": pr.DT_INT32, "b": pr.DT_INT32},
     "instances is a plain list, but expecting list of objects as multiple input tensors"),
])
def test_bad_requests_fail_with_tf_serving_messages(doc, infos, message):
    with pytest.raises(pr.ApiError) as err:
        fill(doc, infos)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.http_status == 400
    assert message in err.value.message, err.value.message


@pytest.mark.parametrize("body, message", [
    (b"", "JSON Parse error: The document is empty"),
    (b'{"instances": [1,', "JSON Parse error: "),
    (b"[1, 2]", "Is not object"),
])
def test_unparsable_bodies(body, message):
    with pytest.raises(pr.ApiError) as err:
        jt.parse_json(body)
    assert message in err.value.message and err.value.http_status == 400


@pytest.mark.parametrize("use_orjson", [True, False])
def test_json_parsing_with_and_without_orjson(monkeypatch, use_orjson):
    from serving import rapidjson_compat

    if not use_orjson:
        monkeypatch.setattr(rapidjson_compat, "_orjson", None)
    elif rapidjson_compat._orjson is None:
        pytest.skip("orjson is not installed (the json module does the parsing)")
    body = '{"instances": [[1, 2.5, -3, 18446744073709551616]], "signature_name": "s", "x": "\u00e9"}'.encode()
    assert jt.parse_json(body) == json.loads(body)
    assert np.isnan(jt.parse_json(b'{"inputs": [NaN]}')["inputs"][0])
    with pytest.raises(pr.ApiError, match="JSON Parse error"):
        jt.parse_json(b'{"a": ')
    with pytest.raises(pr.ApiError, match="Is not object"):
        jt.parse_json(b"[1]")


def test_absurdly_nested_values_are_refused_not_crashed_on():
    deep = json.loads("[" * 40 + "1" + "]" * 40)
    for doc in ({"inputs": deep}, {"instances": deep}):
        with pytest.raises(pr.ApiError, match="nests more than 32 levels"):
            fill(doc, {"x": pr.DT_INT32})
    with pytest.raises(pr.ApiError, match="more than 10000 levels deep"):
        jt.parse_json(b'{"inputs": ' + b"[" * 20000 + b"1" + b"]" * 20000 + b"}")


def test_b64_strings_decode_with_or_without_padding():
    payload = b"\x89PNG\r\n\x1a\nnot really"
    padded = base64.b64encode(payload).decode()
    parsed = fill({"instances": [{"b64": padded}, {"b64": padded.rstrip("=")}]}, {"image_bytes": pr.DT_STRING})
    assert list(parsed.tensors["image_bytes"]) == [payload, payload]
    plain = fill({"inputs": ["abc"]}, {"s": pr.DT_STRING}).tensors["s"]
    assert list(plain) == [b"abc"]


def test_nan_and_infinity_tokens_are_floats():
    doc = jt.parse_json(b'{"inputs": [NaN, Infinity, -Infinity, 1]}')
    x = fill(doc, {"x": pr.DT_FLOAT}).tensors["x"]
    assert np.isnan(x[0]) and np.isposinf(x[1]) and np.isneginf(x[2]) and x[3] == 1.0


# --------------------------------------------------------------------------------------------
# JSON responses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, text", [
    (0.1, "0.1"), (1.0, "1.0"), (3e-5, "3e-05"), (9e6, "9e+06"), (-2.5, "-2.5"),
    (0.123456789, "0.123456791"),  # float32 value needs 9 digits to round-trip
    (float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity"),
])
def test_floats_are_written_as_tf_serving_writes_them(value, text):
    assert jt.format_decimal(np.float32(value)) == text
    assert jt.format_floats(np.array([value], np.float32)) == [text]


def test_response_layouts_row_and_columnar():
    outputs = {"digit": np.array([7, 2], np.int64), "probabilities": np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)}
    row = json.loads(jt.make_json_from_tensors(outputs, jt.ROW))
    assert row == {"predictions": [{"digit": 7, "probabilities": [0.25, 0.75]},
                                   {"digit": 2, "probabilities": [1.0, 0.0]}]}
    columnar = json.loads(jt.make_json_from_tensors(outputs, jt.COLUMNAR))
    assert columnar == {"outputs": {"digit": [7, 2], "probabilities": [[0.25, 0.75], [1.0, 0.0]]}}
    single = {"y": np.array([[1.5], [2.0]], np.float32)}
    assert json.loads(jt.make_json_from_tensors(single, jt.ROW)) == {"predictions": [[1.5], [2.0]]}
    assert json.loads(jt.make_json_from_tensors(single, jt.COLUMNAR)) == {"outputs": [[1.5], [2.0]]}
    raw = {"thumb_bytes": np.array([b"\x00\xff"], dtype=object)}
    assert json.loads(jt.make_json_from_tensors(raw, jt.ROW)) == {"predictions": [{"b64": "AP8="}]}


def test_row_responses_need_consistent_batches():
    with pytest.raises(pr.ApiError, match="inconsistent batch size"):
        jt.make_json_from_tensors({"a": np.zeros(2), "b": np.zeros(3)}, jt.ROW)
    with pytest.raises(pr.ApiError, match="has no shape information"):
        jt.make_json_from_tensors({"a": np.float32(1)}, jt.ROW)


# --------------------------------------------------------------------------------------------
# TensorProto
# --------------------------------------------------------------------------------------------
def test_tensor_protos_match_tensorflow_packing():
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (2, 28, 28)).astype(np.uint8), rng.normal(size=(3, 10)).astype(np.float32),
              np.array([3, -1], np.int64), np.array([b"png", b"\x00"], dtype=object)]
    for array in arrays:
        for as_fields in (False, True):
            ours = tensor_proto.from_ndarray(array, tensor_pb2.TensorProto, as_fields=as_fields)
            back = tf.make_ndarray(ours)  # TensorFlow reads what we wrote
            np.testing.assert_array_equal(back, array)
        theirs = tf.make_tensor_proto(array)  # and we read what TensorFlow wrote
        np.testing.assert_array_equal(tensor_proto.to_ndarray(theirs), array)


def test_short_typed_fields_fill_like_tensorflow():
    from tensorflow.core.framework import tensor_pb2

    proto = tensor_pb2.TensorProto(dtype=pr.DT_FLOAT, float_val=[1.0, 2.0])
    proto.tensor_shape.dim.add(size=4)
    np.testing.assert_array_equal(tensor_proto.to_ndarray(proto), [1, 2, 2, 2])
    empty = tensor_pb2.TensorProto(dtype=pr.DT_INT32)
    empty.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(tensor_proto.to_ndarray(empty), [0, 0, 0])
    bad = tensor_pb2.TensorProto(dtype=pr.DT_UINT8, tensor_content=b"\x00" * 5)
    bad.tensor_shape.dim.add(size=4)
    with pytest.raises(tensor_proto.TensorProtoError, match="5 bytes"):
        tensor_proto.to_ndarray(bad)


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------
def test_shipped_config_files_parse(tmp_path):
    models = config_files.read_model_config(REPO / "serving" / "models.config", tmp_path / "root")
    assert [m.name for m in models] == ["mnist"]
    assert models[0].base_path == tmp_path / "root" / "mnist"
    assert models[0].policy == config_files.VersionPolicy("latest", num_versions=2)
    assert models[0].labels == {"canary": 2, "stable": 1}
    params = config_files.read_batching_parameters(REPO / "serving" / "batching_parameters.txt")
    assert params.max_batch_size >= 64 and params.batch_timeout_micros == 0
    monitoring = config_files.read_monitoring_config(REPO / "serving" / "monitoring.config")
    assert monitoring == config_files.MonitoringConfig(True, "/monitoring/prometheus/metrics")


@pytest.mark.parametrize("text, message", [
    ("max_batch_size { value: 8 }\nmax_batch_sise { value: 2 }", "max_batch_sise"),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 6", "must equal max_batch_size"),
    ("num_batch_threads { value: 0 }", "num_batch_threads must be >= 1"),
])
def test_bad_batching_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "batching.txt"
    path.write_text(text)
    with pytest.raises(config_files.ConfigFileError) as err:
        config_files.read_batching_parameters(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_models_config(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "a" base_path: "/models/a" } config { name: "a" base_path: "/x" } }')
    with pytest.raises(config_files.ConfigFileError, match="appears twice"):
        config_files.read_model_config(path, tmp_path)
    path.write_text("model_config_list { config { nme: 1 } }")
    with pytest.raises(config_files.ConfigFileError, match="Invalid protobuf file"):
        config_files.read_model_config(path, tmp_path)
    with pytest.raises(config_files.ConfigFileError, match="no such file"):
        config_files.read_model_config(tmp_path / "absent.config", tmp_path)


def test_version_policies():
    on_disk = [1, 3, 7, 12]
    assert config_files.VersionPolicy("latest", 1).aspired(on_disk) == [12]
    assert config_files.VersionPolicy("latest", 2).aspired(on_disk) == [7, 12]
    assert config_files.VersionPolicy("all").aspired(on_disk) == on_disk
    assert config_files.VersionPolicy("specific", versions=(3, 99)).aspired(on_disk) == [3]
    assert config_files.VersionPolicy("latest", 2).aspired([]) == []


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def _params(**kw):
    base = dict(max_batch_size=16, batch_timeout_micros=0, max_enqueued_batches=4, num_batch_threads=1)
    base.update(kw)
    return config_files.BatchingParameters(**base)


def test_concurrent_tasks_run_as_one_batch_and_each_gets_its_own_rows():
    sizes = []
    gate, started = threading.Event(), threading.Event()

    def run(inputs, timeout=None):
        sizes.append(len(inputs["x"]))
        started.set()
        gate.wait(30)  # the first batch blocks until everything else is queued
        return {"y": inputs["x"] * 2}

    queue = batching.BatchQueue(run, _params())
    try:
        first = queue.submit({"x": np.array([[100]])}, 1)
        assert started.wait(30)  # the worker is now busy with the first task
        futures = [queue.submit({"x": np.array([[i], [i + 1000]])}, 2) for i in range(6)]
        gate.set()
        assert first.result(5)["y"].tolist() == [[200]]
        for i, future in enumerate(futures):
            assert future.result(5)["y"].tolist() == [[2 * i], [2 * (i + 1000)]]
        assert sizes[0] == 1 and sizes[1] == 12, sizes  # the six waiting tasks ran together
    finally:
        queue.close()


def test_a_failing_task_fails_alone():
    gate, started = threading.Event(), threading.Event()
    sizes = []

    def run(inputs, timeout=None):
        sizes.append(len(inputs["x"]))
        started.set()
        gate.wait(30)
        if (inputs["x"] < 0).any():
            raise jt.invalid("negative pixel")
        return {"y": inputs["x"] + 1}

    queue = batching.BatchQueue(run, _params())
    try:
        first = queue.submit({"x": np.array([0])}, 1)
        assert started.wait(30)  # the worker holds the first task; the next three queue up together
        futures = [queue.submit({"x": np.array([v])}, 1) for v in (1, -1, 2)]
        gate.set()
        assert first.result(5)["y"].tolist() == [1]
        assert futures[0].result(5)["y"].tolist() == [2]
        assert futures[2].result(5)["y"].tolist() == [3]
        with pytest.raises(pr.ApiError, match="negative pixel"):
            futures[1].result(5)
        assert sizes == [1, 3, 1, 1, 1]  # the batch of three failed, then each ran alone
    finally:
        gate.set()
        queue.close()


def test_a_lone_task_runs_inline_only_when_the_queue_is_idle():
    gate, started = threading.Event(), threading.Event()
    threads = []

    def run(inputs, timeout=None):
        threads.append(threading.current_thread().name)
        if inputs["x"][0] == 1:
            started.set()
            gate.wait(30)
        return {"y": inputs["x"]}

    arriving = [0]
    queue = batching.BatchQueue(run, _params(), arriving=lambda: arriving[0], name="q")
    try:
        assert queue.run_inline_if_idle({"x": np.array([0])}, 1)["y"].tolist() == [0]
        assert threads == [threading.current_thread().name]  # ran here, not on a worker
        arriving[0] = 1  # someone else is on the way: queue instead, so they can batch
        assert queue.run_inline_if_idle({"x": np.array([0])}, 1) is None
        arriving[0] = 0
        busy = queue.submit({"x": np.array([1])}, 1)
        assert started.wait(30)  # a worker is now running a batch
        assert queue.run_inline_if_idle({"x": np.array([0])}, 1) is None
        gate.set()
        assert busy.result(5)["y"].tolist() == [1] and threads[-1] == "q-0"
    finally:
        gate.set()
        queue.close()


@pytest.mark.parametrize("parallel_min_rows", [1, 4])
def test_a_second_worker_joins_a_running_batch_only_for_enough_rows(parallel_min_rows):
    gate, started = threading.Event(), threading.Event()
    sizes = []

    def run(inputs, timeout=None):
        sizes.append(len(inputs["x"]))
        if inputs["x"][0] < 0:
            started.set()
            gate.wait(30)  # the first batch holds one worker
        return {"y": inputs["x"]}

    queue = batching.BatchQueue(run, _params(num_batch_threads=2), parallel_min_rows=parallel_min_rows)
    try:
        first = queue.submit({"x": np.array([-1])}, 1)
        assert started.wait(30)
        small = [queue.submit({"x": np.array([i])}, 1) for i in (1, 2)]
        if parallel_min_rows == 1:  # TF Serving's way: the idle worker runs them at once
            assert [f.result(5)["y"].tolist() for f in small] == [[1], [2]]
        else:  # too few rows to run beside the busy worker: they wait for it
            # The idle worker runs only when a submit wakes it, and none did (no clock
            # involved: the decision is taken inside submit, under the queue's lock).
            assert queue._waking == 0 and queue._pending_rows == 2
            assert sizes == [1] and not any(f.done() for f in small)
            # Enough rows now (2 + 4 >= 4): the second worker takes them all, beside the first.
            big = queue.submit({"x": np.arange(10, 14)}, 4)
            assert big.result(5)["y"].tolist() == [10, 11, 12, 13]
            assert [f.result(5)["y"].tolist() for f in small] == [[1], [2]]
            assert sizes == [1, 6]
        assert not first.done()  # all that happened while the first batch was still running
        gate.set()
        assert first.result(5)["y"].tolist() == [-1]
    finally:
        gate.set()
        queue.close()


@pytest.mark.parametrize("splitting", [False, True])
def test_tasks_over_max_batch_size_are_refused_even_with_splitting(splitting):
    """shared_batch_scheduler.h (TensorFlow), ValidateBatchTaskQueueCapacity: the task size
    is checked against max_batch_size (input_batch_size_limit) whether or not large-batch
    splitting is on; bundle_factory_util.h GetQueueOptions: splitting's execution size
    defaults to max_batch_size, so with our batching file nothing is ever split."""
    queue = batching.BatchQueue(lambda i, timeout=None: {"y": i["x"] * 3},
                                _params(max_batch_size=4, enable_large_batch_splitting=splitting))
    try:
        with pytest.raises(pr.ApiError) as err:
            queue.submit({"x": np.arange(9)}, 9)
        assert (err.value.code, err.value.message) == ("INVALID_ARGUMENT", "Task size 9 is larger than maximum input batch size 4")
        assert err.value.http_status == 400
        assert queue.submit({"x": np.arange(4)}, 4).result(30)["y"].tolist() == [0, 3, 6, 9]
    finally:
        queue.close()


def test_splitting_cuts_tasks_over_max_execution_batch_size():
    sizes = []

    def run(inputs, timeout=None):
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] * 3}

    params = _params(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=3)
    queue = batching.BatchQueue(run, params)
    try:
        assert queue.submit({"x": np.arange(7)}, 7).result(30)["y"].tolist() == list(range(0, 21, 3))
        assert sorted(sizes, reverse=True)[0] <= 3 and sum(sizes) == 7
    finally:
        queue.close()


@pytest.mark.parametrize("splitting, message", [
    (True, "The batch scheduling queue to which this task was submitted is full; task size is 1 but "
           "scheduling capacity is only 0 (num_enqueued_batches=1, max_enqueued_batches=1, open_batch_size=2, "
           "max_execution_batch_size=2)"),
    (False, "The batch scheduling queue to which this task was submitted is full; currently 1 batches "
            "enqueued and max_enqueued_batches is 1"),
])
def test_a_full_queue_answers_unavailable(splitting, message):
    """shared_batch_scheduler.h, ValidateBatchTaskQueueCapacity's two wordings."""
    gate, started = threading.Event(), threading.Event()

    def run(inputs, timeout=None):
        started.set()
        gate.wait(30)
        return {"y": inputs["x"]}

    queue = batching.BatchQueue(run, _params(max_batch_size=2, max_enqueued_batches=1,
                                             enable_large_batch_splitting=splitting))
    try:
        queue.submit({"x": np.zeros(2)}, 2)  # taken by the worker, which then blocks
        assert started.wait(30)
        queue.submit({"x": np.zeros(2)}, 2)  # one batch waiting: the limit
        with pytest.raises(pr.ApiError) as err:
            queue.submit({"x": np.zeros(1)}, 1)
        assert err.value.code == "UNAVAILABLE" and err.value.http_status == 503
        assert err.value.message == message
    finally:
        gate.set()
        queue.close()


def test_batch_rows_checks_the_0th_dimension():
    """batching_util.h ComputeTensorBatchSize's messages."""
    assert batching.batch_rows({"a": np.zeros((3, 2)), "b": np.zeros(3)}) == 3
    with pytest.raises(pr.ApiError) as err:
        batching.batch_rows({"a": np.zeros((3, 2)), "b": np.zeros(2)})
    assert err.value.message == "Batching Run() input tensors must have equal 0th-dimension size"
    with pytest.raises(pr.ApiError) as err:
        batching.batch_rows({"a": np.float32(1)})
    assert err.value.message == "Batching Run() input tensors must have at least one dimension"


@pytest.mark.parametrize("num_batch_threads", [1, 2])
def test_a_task_of_zero_rows_is_run_not_left_waiting(num_batch_threads):
    """A request of 0 rows (gRPC DT_STRING [0], REST {"inputs": []}) is valid: the model
    answers 0 rows, as TF's own call of the signature does. It holds no rows, and the
    queue once woke workers only for rows: the task waited for the next request, or until
    the client's deadline (a 504 after 30 s; forever over gRPC without a deadline)."""
    queue = batching.BatchQueue(lambda i, timeout=None: {"y": i["x"] * 2}, _params(num_batch_threads=num_batch_threads))
    try:
        assert queue.submit({"x": np.zeros((0, 3))}, 0).result(30)["y"].shape == (0, 3)
        assert queue.submit({"x": np.ones((2, 3))}, 2).result(30)["y"].tolist() == [[2, 2, 2]] * 2
        assert queue.submit({"x": np.zeros((0, 3))}, 0).result(30)["y"].shape == (0, 3)
    finally:
        queue.close()


# --------------------------------------------------------------------------------------------
# Model manager (a stand-in loader: the version logic without TensorFlow)
# --------------------------------------------------------------------------------------------
from serving import model_manager as mm  # noqa: E402


class FakeServable(mm.Servable):
    """Loads nothing; fails when the version folder holds a file named BROKEN."""

    closed: list[int] = []

    def __init__(self, name, version, path, options):
        if (Path(path) / "BROKEN").exists():
            raise pr.ApiError("DATA_LOSS", f"cannot read {path}/saved_model.pb")
        self.name, self.version, self.path = name, version, Path(path)
        self.signatures = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._closed = False
        self._callables = {}
        self.batch_queues = {}
        self._session = self

    def close(self):  # the "session"
        FakeServable.closed.append(self.version)

    def warm_up(self, iterations):
        return 0


def _manager(root: Path, labels=None, allow=True, policy=config_files.VersionPolicy("latest", 2)):
    spec = config_files.ModelSpecConfig("m", root, policy, labels or {})
    options = mm.ManagerOptions(max_num_load_retries=0, allow_version_labels_for_unavailable_models=allow)
    return mm.ModelManager([spec], options, loader=FakeServable)


def test_versions_come_and_go_with_the_policy(tmp_path):
    for name in ("1", "2", ".tmp-export-123-456", "not-a-version", "3"):
        (tmp_path / name).mkdir()
    (tmp_path / ".last_version").write_text("3\n")
    manager = _manager(tmp_path)
    manager.poll_once()
    assert manager.serving_versions("m") == [2, 3]
    with manager.acquire("m") as servable:
        assert servable.version == 3  # latest by default
    (tmp_path / "4").mkdir()
    manager.poll_once()
    assert manager.serving_versions("m") == [3, 4]
    states = {s.version: s.state for s in manager.status("m")}
    assert states == {4: "AVAILABLE", 3: "AVAILABLE", 2: "END"}  # 1 was never aspired
    assert [s.version for s in manager.status("m")] == [4, 3, 2]  # newest first


def test_a_version_in_use_is_unloaded_only_when_released(tmp_path):
    (tmp_path / "1").mkdir()
    manager = _manager(tmp_path, policy=config_files.VersionPolicy("latest", 1))
    manager.poll_once()
    lease = manager.acquire("m", version=1)
    (tmp_path / "2").mkdir()
    FakeServable.closed.clear()
    poll = threading.Thread(target=manager.poll_once)
    poll.start()
    deadline = time.monotonic() + 60
    while manager.status("m", 1)[0].state != "UNLOADING":  # the unload has begun...
        assert time.monotonic() < deadline, "version 1 never started unloading"
        time.sleep(0.01)
    assert poll.is_alive() and FakeServable.closed == []  # ...and waits for the lease
    assert manager.serving_versions("m") == [2]  # but new requests already get version 2
    lease.release()
    poll.join(5)
    assert FakeServable.closed == [1] and manager.status("m", 1)[0].state == "END"


def test_a_broken_version_is_reported_and_the_old_one_keeps_serving(tmp_path):
    (tmp_path / "1").mkdir()
    manager = _manager(tmp_path, policy=config_files.VersionPolicy("latest", 1))
    manager.poll_once()
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "BROKEN").write_text("")
    manager.poll_once()
    broken = manager.status("m", 2)[0]
    assert (broken.state, broken.error_code) == ("END", "DATA_LOSS")
    assert "saved_model.pb" in broken.error_message
    assert manager.serving_versions("m") == [1]  # availability preserved


def test_requests_for_unknown_things(tmp_path):
    (tmp_path / "1").mkdir()
    manager = _manager(tmp_path, labels={"stable": 1, "canary": 5})
    manager.poll_once()
    with manager.acquire("m", label="stable") as servable:
        assert servable.version == 1
    cases = [
        (dict(name="m", label="nope"), "INVALID_ARGUMENT", "Unrecognized servable version label: nope"),
        (dict(name="m", label="canary"), "NOT_FOUND", "Servable not found for request: Specific(m, 5)"),
        (dict(name="m", version=9), "NOT_FOUND", "Servable not found for request: Specific(m, 9)"),
        (dict(name="other"), "NOT_FOUND", "Servable not found for request: Latest(other)"),
    ]
    for kwargs, code, message in cases:
        with pytest.raises(pr.ApiError) as err:
            manager.acquire(**kwargs)
        assert (err.value.code, err.value.message) == (code, message)
    with pytest.raises(pr.ApiError, match="Could not find version 9 of model m"):
        manager.status("m", 9)
    with pytest.raises(pr.ApiError, match="Could not find any versions of model other"):
        manager.status("other")


def test_labels_need_the_flag_before_versions_load(tmp_path):
    with pytest.raises(pr.ApiError) as err:
        _manager(tmp_path, labels={"stable": 1}, allow=False)
    assert err.value.code == "FAILED_PRECONDITION"
    assert "Request to assign label to version 1 of model m, which is not currently available" in err.value.message


# --------------------------------------------------------------------------------------------
# Client-side checks, retries, CLI flags, Docker image check
# --------------------------------------------------------------------------------------------
PIXELS = TensorSpec("image", "DT_UINT8", (-1, 28, 28))


def test_check_tensor_accepts_pixels_and_adds_the_batch_axis():
    one = check_tensor(np.full((28, 28), 3, np.int64), PIXELS)
    assert one.shape == (1, 28, 28) and one.dtype == np.uint8


@pytest.mark.parametrize("value, message", [
    (np.zeros((2, 28, 28), np.float32), "send raw pixels 0-255"),
    (np.zeros((2, 28, 27), np.uint8), "must have shape [N, 28, 28], got [2, 28, 27]"),
    (np.full((1, 28, 28), 300), "takes values 0..255 (DT_UINT8), got 300..300"),
    (np.zeros((0, 28, 28), np.uint8), "is empty"),
])
def test_check_tensor_refuses_what_tf_serving_would_mangle(value, message):
    with pytest.raises(InputError) as err:
        check_tensor(value, PIXELS, "images")
    assert message in str(err.value)


def test_retries_only_what_is_retryable():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ServerFailure("503", 503)
        return "ok"

    policy = RetryPolicy(attempts=4, initial_backoff=0.001, max_backoff=0.002)
    assert with_retries(flaky, lambda e: 0.0 if isinstance(e, ServerFailure) else None, policy) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("400")), lambda e: None, policy)
    assert len(calls) == 1
    delays = list(RetryPolicy(attempts=5, initial_backoff=0.1, max_backoff=0.3).delays())
    assert len(delays) == 4 and all(0 <= d <= 0.3 for d in delays)


@pytest.mark.parametrize("argv", [["predict"], ["status", "x.png"], ["--version", "1", "--label", "a", "status"],
                                  ["--nonsense", "status"], ["frobnicate"]])
def test_query_flags_errors_exit_2(argv):
    from serving import query

    with pytest.raises(SystemExit) as err:
        query.parse_args(argv)
    assert err.value.code == 2


@pytest.mark.parametrize("argv, named", [
    (["--modle", "mnist", "status"], "--modle"),  # its value was taken for the command
    (["status", "--bogus=1"], "--bogus=1"),
    (["-x", "predict", "a.png"], "-x"),
])
def test_query_names_the_unknown_flag(argv, named, capsys):
    from serving import query

    with pytest.raises(SystemExit) as err:
        query.parse_args(argv)
    assert err.value.code == 2
    assert f"error: unrecognized arguments: {named}" in capsys.readouterr().err


def test_query_takes_negative_numbers_and_dashes_as_values():
    from serving import query

    command, files, config = query.parse_args(["--version", "-1", "predict", "-", "--", "-odd.png"])
    assert (command, files, config.version) == ("predict", ["-", "-odd.png"], -1)


def test_docker_check_parses_versions():
    from serving import docker_check

    out = "TensorFlow ModelServer: 2.21.0-rc0+dev.sha.abc\nTensorFlow Library: 2.21.0\n"
    assert docker_check.parse_server_versions(out) == ("2.21.0-rc0+dev.sha.abc", "2.21.0")
    assert docker_check.version_tuple("2.20.1") < docker_check.version_tuple("2.21.0")
    with pytest.raises(ValueError):
        docker_check.parse_server_versions("command not found")


def test_server_flags_accept_tf_serving_spelling():
    from common import configlib
    from serving.settings import ServeConfig, normalise_flags

    argv = normalise_flags(["--rest_api_port=9000", "--enable_batching=false", "--model-config-file", "none"])
    config = configlib.parse_config(ServeConfig, argv)
    assert (config.rest_api_port, config.enable_batching, config.model_config_file) == (9000, False, None)


# --- when a request may run on the event loop ------------------------------------------------
def test_only_small_numeric_requests_arriving_alone_run_on_the_event_loop():
    from serving import core as server

    one = {"image": np.zeros((1, 28, 28), np.uint8)}
    assert server.cheap(one)
    assert not server.cheap({"image_bytes": np.array([b"png..."], dtype=object)})  # decoding: slow
    assert not server.cheap({"image": np.zeros((64, 28, 28), np.uint8)})  # too many rows

    core = server.ServingCore(manager=None, batching_params=None, metrics=None, executor=None)
    with core.arrival():
        assert core._lone_request()  # the first request in a while, alone
        with core.arrival():
            assert not core._lone_request()  # two in flight
    for _ in range(20):  # a stream of requests back to back (a server under load)
        with core.arrival():
            pass
    with core.arrival():
        assert not core._lone_request()


def test_requests_run_on_the_event_loop_only_after_a_quiet_period_without_company(monkeypatch):
    # Under load the first request of each wave finds none in flight and, on a slow
    # machine, a long gap behind it: it must not run on the loop just after a crowd.
    import types

    from serving import core as server

    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(server, "time", types.SimpleNamespace(perf_counter=lambda: clock.now, monotonic=lambda: clock.now))
    core = server.ServingCore(manager=None, batching_params=None, metrics=None, executor=None)
    with core.arrival():
        assert core._lone_request()
    clock.now += 0.005
    with core.arrival():
        clock.now += 0.0001
        with core.arrival():  # two in flight together
            pass
    clock.now += 0.005  # a slow gap, as between waves
    with core.arrival():
        assert not core._lone_request()
        clock.now += server.INLINE_QUIET_S
    clock.now += 0.005
    with core.arrival():
        assert core._lone_request()  # quiet for long enough: alone again


def test_grpc_requests_are_gathered_only_while_others_are_in_flight():
    import asyncio

    from serving import core as server

    core = server.ServingCore(manager=None, batching_params=None, metrics=None, executor=None, gather_wait=0.001)

    async def check() -> None:
        assert core.loop_handoff() is core.loop_handoff()
        assert core.loop_handoff(gather=True) is not core.loop_handoff()
        with core.arrival():
            assert core._gather_for() == 0.0  # alone: never held
            with core.arrival():
                assert core._gather_for() == 0.001
                assert core.loop_handoff()._gather_for() == 0.0  # REST's hand-off does not hold
                assert core.loop_handoff(gather=True)._gather_for() == 0.001

    asyncio.run(check())


def test_server_flags_out_of_range_are_refused():
    from serving import settings as server

    for flag in ("batch_arrival_wait_ms", "grpc_batch_gather_ms"):
        config = server.ServeConfig(**{flag: -1.0})
        with pytest.raises(server.ConfigError, match=flag.replace("_", "-")):
            config.validate()
    with pytest.raises(server.ConfigError, match=r"--grpc-max-concurrent must be >= 0 \(0 = no limit\), got -1"):
        server.ServeConfig(grpc_max_concurrent=-1).validate()
    with pytest.raises(server.ConfigError, match="--batch-parallel-min-rows must be >= 1"):
        server.ServeConfig(batch_parallel_min_rows=0).validate()
    with pytest.raises(server.ConfigError, match="--event-loop must be one of uvloop, asyncio, got 'tornado'"):
        server.ServeConfig(event_loop="tornado").validate()
    # Each was accepted: a negative REST timeout answered every request 504, a zero switch
    # interval ended start-up in a traceback, a negative TF thread count in a C++ abort.
    for flag, value in [("rest_api_timeout_in_ms", -5), ("gil_switch_interval_ms", 0.0),
                        ("tensorflow_intra_op_parallelism", -3), ("tensorflow_inter_op_parallelism", -1),
                        ("max_num_load_retries", -2), ("load_retry_interval_seconds", -1.0),
                        ("num_request_iterations_for_warmup", -1), ("model_config_file_poll_wait_seconds", -1)]:
        with pytest.raises(server.ConfigError, match=f"--{flag.replace('_', '-')} must be "):
            server.ServeConfig(**{flag: value}).validate()


def test_the_event_loop_flag_picks_the_loop():
    import asyncio

    import uvloop

    from serving import server

    assert server._loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=server._loop_factory("uvloop")) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_a_missing_uvloop_is_a_clear_startup_error(monkeypatch, capsys):
    import sys

    from serving import server

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    monkeypatch.setattr(sys, "setswitchinterval", lambda _: None)  # keep pytest's own
    assert server.main(["--state-dir", "unused"]) == server.EXIT_STARTUP_FAILED
    assert "uvloop is not installed" in capsys.readouterr().err


def test_bench_cells_report_the_median_of_their_rounds():
    from common.configlib import ConfigError
    from serving.bench import BenchConfig, combine_rounds

    def measured(rate, p50, errors=0, rows=None):
        cell = {"protocol": "grpc", "batch": 1, "concurrency": 32, "requests": int(rate * 4),
                "errors": errors, "first_error": "boom" if errors else "", "seconds": 4.0,
                "latency_ms": {"p50": p50, "p99": 2 * p50, "mean": p50}, "requests_per_s": rate,
                "predictions_per_s": rate, "client_cpu_ms_per_request": 0.3}
        if rows is not None:
            cell["mean_rows_per_model_run"] = rows
        return cell

    rounds = [measured(1000, 30.0, rows=3.0), measured(1800, 17.0, errors=1), measured(1500, 20.0, rows=5.0)]
    cell = combine_rounds(rounds)
    assert (cell["predictions_per_s"], cell["latency_ms"]["p50"], cell["latency_ms"]["p99"]) == (1500, 20.0, 40.0)
    assert cell["predictions_per_s_range"] == [1000, 1800]
    assert cell["errors"] == 1 and cell["first_error"] == "boom"  # an error in any round counts
    assert cell["requests"] == 17200 and cell["mean_rows_per_model_run"] == 4.0  # of the rounds that have it
    assert cell["rounds"] == rounds
    with pytest.raises(ConfigError, match="--rounds must be >= 1"):
        BenchConfig(rounds=0).validate()


def test_histogram_totals_add_up_every_series_of_a_rendered_page():
    from serving.metrics import BATCH_BUCKETS, PADDING_SIZE, PROCESSED_BATCH_SIZE, Metrics, histogram_totals

    metrics = Metrics()
    assert histogram_totals(metrics.render(), PROCESSED_BATCH_SIZE) == (0.0, 0.0)
    for rows, model in ((3, "mnist"), (5, "mnist"), (32, "other")):
        metrics.observe(PROCESSED_BATCH_SIZE, rows, BATCH_BUCKETS, model_name=model)
    metrics.observe(PADDING_SIZE, 7, BATCH_BUCKETS, model_name="mnist")
    assert histogram_totals(metrics.render(), PROCESSED_BATCH_SIZE) == (40.0, 3.0)
    assert histogram_totals(metrics.render(), PADDING_SIZE) == (7.0, 1.0)


def test_clients_import_no_server_code():
    """The clients share serving/protocol.py with the server, and nothing else of it: the
    gRPC client does not drag in the REST parser, and neither client the server."""
    import subprocess
    import sys

    code = ("import sys\nimport serving.client, serving.grpc_client, serving.query\n"
            "server_side = sorted(m for m in sys.modules if m in ('serving.json_tensor', 'serving.server', "
            "'serving.core', 'serving.rest', 'serving.grpc_api', 'serving.batching', 'serving.model_manager'))\n"
            "print(server_side)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_version_that_keeps_failing_does_not_keep_a_newer_one_out(tmp_path):
    """TF Serving cancels the load retries of a version no longer aspired (LoaderHarness's
    cancel_load_retry), and its manager never waits for a load: here, a broken version 2
    retrying every 60 s gives way to version 3 at once."""
    (tmp_path / "1").mkdir()
    spec = config_files.ModelSpecConfig("m", tmp_path, config_files.VersionPolicy("latest", 1))
    options = mm.ManagerOptions(max_num_load_retries=5, load_retry_interval_seconds=60.0,
                                file_system_poll_wait_seconds=0.02)
    manager = mm.ModelManager([spec], options, loader=FakeServable)
    manager.start()
    try:
        (tmp_path / "2").mkdir()
        (tmp_path / "2" / "BROKEN").write_text("")
        deadline = time.monotonic() + 60
        while not any(s.version == 2 and s.state == "LOADING" for s in manager.status("m")):
            assert time.monotonic() < deadline, "version 2 never started loading"
            time.sleep(0.01)
        (tmp_path / "3").mkdir()
        while manager.serving_versions("m") != [3]:  # well before the 60 s retry interval
            assert time.monotonic() < deadline, f"version 3 not served: {manager.status('m')}"
            time.sleep(0.01)
        while manager.status("m", 2)[0].state != "END":  # its retries stop, well before 60 s too
            assert time.monotonic() < deadline, f"version 2 still retrying: {manager.status('m')}"
            time.sleep(0.01)
        assert manager.status("m", 2)[0].error_code == "DATA_LOSS"
    finally:
        manager.stop()


def test_queued_work_past_its_deadline_is_dropped():
    gate, started = threading.Event(), threading.Event()
    ran = []

    def run(inputs, timeout=None):
        ran.append(int(inputs["x"][0]))
        if inputs["x"][0] < 0:
            started.set()
            gate.wait(30)
        return {"y": inputs["x"]}

    queue = batching.BatchQueue(run, _params())
    try:
        busy = queue.submit({"x": np.array([-1])}, 1)
        assert started.wait(30)
        expired = queue.submit({"x": np.array([1])}, 1, deadline=time.monotonic() - 1)
        later = queue.submit({"x": np.array([2])}, 1, deadline=time.monotonic() + 60)
        gate.set()
        assert busy.result(30)["y"].tolist() == [-1]
        with pytest.raises(pr.ApiError) as err:
            expired.result(30)
        assert err.value.code == "DEADLINE_EXCEEDED"
        assert later.result(30)["y"].tolist() == [2]
        assert ran == [-1, 2]  # the expired one never ran
    finally:
        gate.set()
        queue.close()


@pytest.mark.parametrize("slow", [False, True])
def test_a_run_gets_its_deadline_when_its_queue_runs_long(monkeypatch, slow):
    """The deadline goes into a queue's first run, and later into its runs only if they
    take batching.RUN_TIMEOUT_MIN_S or more (short runs run in the calling thread)."""
    timeouts = []
    monkeypatch.setattr(batching, "RUN_TIMEOUT_MIN_S", 0.0 if slow else 3600.0)

    def run(inputs, timeout=None):
        timeouts.append(timeout)
        return {"y": inputs["x"]}

    queue = batching.BatchQueue(run, _params())
    try:
        for _ in range(2):
            queue.submit({"x": np.array([1])}, 1, deadline=time.monotonic() + 60).result(30)
        assert 0 < timeouts[0] <= 60
        assert (timeouts[1] is not None) == slow
    finally:
        queue.close()


def test_a_batch_stopped_at_its_deadline_fails_all_its_tasks_without_rerunning_them():
    runs = []

    def run(inputs, timeout=None):
        runs.append(len(inputs["x"]))
        raise pr.ApiError("DEADLINE_EXCEEDED", "Timed out waiting for notification")

    queue = batching.BatchQueue(run, _params())
    try:
        futures = [batching.Future() for _ in range(3)]
        queue.submit_all([({"x": np.array([i])}, 1, f, time.monotonic() + 60) for i, f in enumerate(futures)])
        for future in futures:
            with pytest.raises(pr.ApiError, match="Timed out"):
                future.result(30)
        assert runs == [3]  # one run for all, no re-run one by one
    finally:
        queue.close()


def test_the_clients_default_request_size_is_the_batching_files_limit():
    from serving.client import DEFAULT_MAX_BATCH_SIZE, InputError, Prediction, join_predictions, request_slices

    params = config_files.read_batching_parameters(REPO / "serving" / "batching_parameters.txt")
    assert DEFAULT_MAX_BATCH_SIZE == params.max_batch_size == 256
    assert request_slices(600, 256) == [slice(0, 256), slice(256, 512), slice(512, 768)]
    assert request_slices(0, 256) == [slice(0, 256)]
    with pytest.raises(InputError, match="max_batch_size must be >= 1"):
        request_slices(3, 0)
    parts = [Prediction(np.array([1, 2]), np.eye(10, dtype=np.float32)[[1, 2]], 4),
             Prediction(np.array([3]), np.eye(10, dtype=np.float32)[[3]], 5)]
    joined = join_predictions(parts)
    assert joined.digits.tolist() == [1, 2, 3] and joined.probabilities.shape == (3, 10)
    assert joined.model_version is None  # a swap came in between
    assert join_predictions(parts[:1]).model_version == 4
    assert joined.mnist_images is None
    # serving_bytes answers carry the 28x28 pictures the model saw: they are joined too.
    seen = [np.full((2, 28, 28), 1, np.uint8), np.full((1, 28, 28), 2, np.uint8)]
    with_images = [Prediction(p.digits, p.probabilities, 4, image) for p, image in zip(parts, seen)]
    assert join_predictions(with_images).mnist_images[:, 0, 0].tolist() == [1, 1, 2]


def test_metric_label_values_are_escaped():
    from serving.metrics import Metrics

    metrics = Metrics()
    metrics.inc(":tensorflow:serving:request_count", model_name='a"b\\c\nd', status="OK")
    assert metrics.render().splitlines()[1] == ':tensorflow:serving:request_count{model_name="a\\"b\\\\c\\nd",status="OK"} 1'


def test_large_inputs_are_converted_in_pieces_with_the_same_result():
    images = np.random.default_rng(3).integers(0, 256, (600, 28, 28))
    rows = images.tolist()
    parsed = fill({"instances": rows}, may_have_bools=False)
    np.testing.assert_array_equal(parsed.tensors["image"], images.astype(np.uint8))
    ragged = rows[:300] + [[[0] * 27] * 28] + rows[300:]  # in the second piece
    with pytest.raises(pr.ApiError, match="Failed to process element: 300 of 'instances' list. "
                                          "Error: INVALID_ARGUMENT: Expecting tensor size: 784 but got: 756"):
        fill({"instances": ragged}, may_have_bools=False)
    floats = fill({"inputs": rows[:300] + [[[0.5] * 28] * 28]}, {"x": pr.DT_FLOAT}, may_have_bools=False)
    assert floats.tensors["x"].dtype == np.float32 and floats.tensors["x"][300, 0, 0] == 0.5
