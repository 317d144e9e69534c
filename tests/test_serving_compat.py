"""The local server answers as TF Serving 2.21 does, difference by difference (no server, no
model: the pieces that decide). Each test names the source file it follows, read at the
current master of each project while this was written: tensorflow/serving 9d981c5 (2026-07),
Tencent/rapidjson 24b5e7a, abseil/abseil-cpp 926f1d0, TensorFlow 2.21. Expected texts are
those sources' own; the rapidjson offsets were also checked against rapidjson itself."""

from __future__ import annotations

import base64
import json
import math
import tracemalloc

import numpy as np
import pytest

from serving import json_tensor as jt
from serving import protocol as pr
from serving import rapidjson_compat as rj

IMAGE = {"image": pr.DT_UINT8}


def parse_error(body: bytes) -> str:
    with pytest.raises(pr.ApiError) as err:
        jt.parse_json(body)
    assert (err.value.code, err.value.http_status) == ("INVALID_ARGUMENT", 400)
    return err.value.message


def fill_error(doc, infos=IMAGE) -> pr.ApiError:
    with pytest.raises(pr.ApiError) as err:
        jt.fill_predict_request(doc, lambda _signature: infos)
    return err.value


def image_rows(n: int) -> list:
    return [[[0] * 28] * 28] * n


# --------------------------------------------------------------------------------------------
# Reading the body: rapidjson (include/rapidjson/reader.h IterativeParse, HandleError,
# ParseNumber, ParseStringToStream; error/en.h), as json_tensor.cc ParseJson calls it
# --------------------------------------------------------------------------------------------
PIXELS = json.dumps({"instances": image_rows(1)})


@pytest.mark.parametrize("body, message", [
    # The kinds of the shared cases (../shared/cases/tfserving R1a, R2), and the rest of
    # rapidjson's errors users meet, at rapidjson's byte offsets.
    ("'" + PIXELS + "'", "Invalid value. at offset: 0"),  # a shell-quoted body
    ("{'instances': [1]}", "Missing a name for object member. at offset: 1"),  # Python's repr
    ('{"instances": [[[0., 0, 0]]]}', "Miss fraction part in number. at offset: 19"),
    ('{"instances": [1,]}', "Invalid value. at offset: 17"),  # a trailing comma
    ('{"a": 1,}', "Missing a name for object member. at offset: 8"),
    ('{"a" 1}', "Missing a colon after a name of object member. at offset: 5"),
    ('{"a": 1 "b": 2}', "Missing a comma or '}' after an object member. at offset: 8"),
    ('{"a": [1 2]}', "Missing a comma or ']' after an array element. at offset: 9"),
    ('{"a": tru}', "Invalid value. at offset: 9"),
    ('{"a": -}', "Invalid value. at offset: 7"),
    ('{"a": 1.5e}', "Miss exponent in number. at offset: 10"),
    ('{"a": "\\x"}', "Invalid escape character in string. at offset: 7"),
    ('{"a": "\\u12G4"}', "Incorrect hex digit after \\u escape in string. at offset: 7"),
    ('{"a": "\\ud800"}', "The surrogate pair in string is invalid. at offset: 7"),
    ('{"a": "\x01"}', "Invalid encoding in string. at offset: 7"),
    ('{"a": "abc', "Missing a closing quotation mark in string. at offset: 10"),
    ('{"a": 1e309}', "Number too big to be stored in double. at offset: 6"),
    ('{"a": 0e999}', "Number too big to be stored in double. at offset: 6"),
    ('{"a": ' + "9" * 4301 + "}", "Number too big to be stored in double. at offset: 6"),  # not a 500
    ("   ", "The document is empty. at offset: 3"),
    ('{"a": [Infin]}', "Invalid value. at offset: 12"),
])
def test_parse_errors_are_rapidjsons_at_its_offsets(body, message):
    assert parse_error(body.encode()) == f"JSON Parse error: {message}"


def test_an_empty_body_is_tf_servings_own_words():
    assert parse_error(b"") == "JSON Parse error: The document is empty"  # json_tensor.cc ParseJson


@pytest.mark.parametrize("use_orjson", [True, False])
def test_what_rapidjson_accepts_is_accepted(use_orjson):
    def parse(body: bytes):
        return rj.parse(body, allow_orjson=use_orjson)

    # kParseStopWhenDoneFlag: whatever follows the first document is never read.
    assert parse(b'{"instances": [1]} trailing bytes, even {"a JSON": "object"}') == {"instances": [1]}
    # kParseNanAndInfFlag: NaN, Inf, Infinity, with or without a sign.
    values = parse(b"[NaN, -NaN, Inf, -Inf, Infinity, -Infinity]")
    assert math.isnan(values[0]) and math.isnan(values[1]) and values[2:] == [math.inf, -math.inf] * 2
    # EncodedInputStream<UTF8<>> skips a byte order mark; strings are not checked for UTF-8.
    assert parse(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    text = parse(b'["caf\xe9"]')[0]
    assert text.encode("utf-8", "surrogateescape") == b"caf\xe9"
    # Integers stay integers within int64 / uint64; beyond, they are doubles (not IsInt()).
    big = parse(b"[18446744073709551615, -9223372036854775808, 18446744073709551616, -0]")
    assert big[:2] == [2**64 - 1, -(2**63)] and type(big[2]) is float and big[3] == 0 and type(big[3]) is int


def test_trailing_bytes_do_not_stop_a_request():
    body = json.dumps({"instances": image_rows(2)}).encode() + b"\n\x00garbage"
    parsed = jt.fill_predict_request(jt.parse_json(body), lambda _s: IMAGE)
    assert parsed.tensors["image"].shape == (2, 28, 28)


def test_numbers_are_rapidjsons_doubles_when_the_reader_reads():
    """reader.h ParseNumber + internal/strtod.h StrtodNormalPrecision (no full precision):
    values rapidjson itself gives, which differ from the correctly rounded ones."""
    values = rj.parse(b"[0.134567890123456789, 999999999999999999999999999999, 0.1, 1e22, 5e-324]",
                      allow_orjson=False)
    assert values[0] == 0.13456789012345677 != float("0.134567890123456789")
    assert values[1] == 9.9999999999999988e29 != float("999999999999999999999999999999")
    assert values[2:] == [0.1, 1e22, 5e-324]


def test_nesting_needs_no_python_recursion_and_has_a_limit():
    deep = b'{"signature_name": ' + b"[" * 9000 + b"]" * 9000 + b"}"
    doc = rj.parse(deep)  # orjson stops at 1024 levels; the iterative reader goes on
    # json_tensor.cc FormatSignatureError: the document quoted, cut after 256 bytes (not a 500).
    with pytest.raises(pr.ApiError) as err:
        jt.signature_name_of(doc)
    assert err.value.message == ('JSON Value: {\n    "signature_name": ' + "[" * 232 +
                                 " not formatted correctly. 'signature_name' key must be a string value.")
    message = parse_error(b"[" * 20_000)
    assert message == ("JSON Parse error: The document nests arrays and objects more than 10000 levels deep. "
                       "at offset: 10000")


# --------------------------------------------------------------------------------------------
# Quoting request values in errors: json_tensor.cc JsonValueToDebugString (PrettyWriter with
# kFormatSingleLineArray behind JsonWriterWithLimit, kMaxJsonDebugStringBytes = 256;
# include/rapidjson/prettywriter.h, writer.h, internal/dtoa.h)
# --------------------------------------------------------------------------------------------
def test_an_empty_object_row_is_quoted_with_keys_must_be_equal_to():
    # The kind of ../shared/cases/tfserving/K1: a row that is an empty object.
    err = fill_error({"instances": [{"image": image_rows(1)[0]}, {}]})
    assert err.message == ("Failed to process element: 1 of 'instances' list. JSON object: {} "
                           "keys must be equal to: image")


def test_quotes_are_single_line_arrays_in_pretty_objects():
    value = {"a": [1, 2.5, {"b": "x\n\u0001\u00e9"}], "c": {}, "d": [], "e": None, "f": 1e30, "g": 1e-7}
    assert rj.debug_string(value) == (
        '{\n    "a": [1, 2.5, {\n            "b": "x\\n\\u0001\u00e9"\n        }],\n    "c": {},\n'
        '    "d": [],\n    "e": null,\n    "f": 1e30,\n    "g": 1e-7\n}')
    assert [rj.format_double(v) for v in (1.0, 0.001234, 12.34, 1e21, 1e22, -0.0)] == \
        ["1.0", "0.001234", "12.34", "1e21", "1e22", "-0.0"]


def test_quotes_stop_after_256_bytes_and_cost_only_what_they_write():
    # No value starts once 256 bytes are written: 37 numbers of "12345" (258 bytes).
    assert rj.debug_string([12345] * 1000) == "[" + ", ".join(["12345"] * 37)
    assert len(rj.debug_string(["x" * 1000])) == 1003  # the value crossing the limit is whole
    assert rj.debug_string([1.0, float("nan"), 2.0]) == "[1.0, "  # the writer refuses NaN

    class Counting(list):
        taken = 0

        def __iter__(self):
            for item in super().__iter__():
                Counting.taken += 1
                yield item

    rj.debug_string(Counting([0] * 1_000_000))
    assert Counting.taken < 100  # a 6 MB value is not rendered to be cut afterwards


def test_a_huge_body_that_is_not_an_object_gets_a_short_error():
    body = b"[" + b"0," * 3_000_000 + b"0]"  # 6 MB of valid JSON
    message = parse_error(body)
    assert message.startswith("JSON Value: [0, 0, 0") and message.endswith(" Is not object")
    assert len(message) < 300


# --------------------------------------------------------------------------------------------
# base64: json_tensor.cc JsonDecodeBase64Object -> absl/strings/escaping.cc Base64Unescape
# --------------------------------------------------------------------------------------------
PAYLOAD = bytes(range(256)) * 3


@pytest.mark.parametrize("text", [
    base64.encodebytes(PAYLOAD).decode(),  # MIME: a line break every 76 characters (R4a's kind)
    base64.b64encode(PAYLOAD).decode().rstrip("="),  # no padding
    " \t" + base64.b64encode(PAYLOAD).decode().replace("A", "A\r\n") + "\f\v",  # any ASCII space
])
def test_base64_skips_whitespace_as_abseil_does(text):
    parsed = jt.fill_predict_request({"instances": [{"b64": text}]}, lambda _s: {"image_bytes": pr.DT_STRING})
    assert parsed.tensors["image_bytes"][0] == PAYLOAD


@pytest.mark.parametrize("text, decoded", [
    ("QQ==", b"A"), ("QQ", b"A"), ("QQ..", b"A"), ("QUI=", b"AB"), ("", b""), ("QUJD", b"ABC"),
    ("QQ=", None), ("QUI==", None), ("Q", None), ("QQ==QQ==", None), ("Q!==", None), ("QUJD=", None),
])
def test_base64_padding_rules_are_abseils(text, decoded):
    assert jt.base64_unescape(text) == decoded


def test_undecodable_base64_is_tf_servings_error():
    err = fill_error({"instances": [{"b64": "QQ="}]}, {"image_bytes": pr.DT_STRING})
    assert err.message == "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: Unable to base64 decode"


# --------------------------------------------------------------------------------------------
# Values: json_tensor.cc AddValueToTensor at master (57dac6cd dropped the "without loss of
# precision" check in 2021) and AddSingleValueAndAdvance
# --------------------------------------------------------------------------------------------
def test_float_inputs_take_any_number():
    parsed = jt.fill_predict_request({"inputs": [16777217, 1e39, -1e39, 0.5, 2**63]}, lambda _s: {"x": pr.DT_FLOAT})
    x = parsed.tensors["x"]
    assert x.dtype == np.float32
    assert x.tolist() == [16777216.0, math.inf, -math.inf, 0.5, 9.223372036854776e18]
    slow = jt.fill_predict_request({"inputs": [[16777217], [True and 1e39]]}, lambda _s: {"x": pr.DT_FLOAT})
    assert slow.tensors["x"].ravel().tolist() == [16777216.0, math.inf]


@pytest.mark.parametrize("dt, name", [(pr.DT_HALF, "half"), (pr.DT_UINT16, "uint16")])
def test_inputs_of_dtypes_tf_serving_cannot_convert_are_unimplemented(dt, name):
    err = fill_error({"inputs": [1]}, {"x": dt})
    assert (err.code, err.http_status, err.message) == ("UNIMPLEMENTED", 501, f"Conversion of JSON Value: 1 to type: {name}")


@pytest.mark.parametrize("array, name", [(np.zeros(2, np.float16), "half"), (np.zeros(2, np.uint16), "uint16")])
def test_outputs_tf_serving_cannot_write_fail(array, name):
    with pytest.raises(pr.ApiError, match=f"Failed to write JSON value for tensor type: {name}"):
        jt.make_json_from_tensors({"y": array}, jt.ROW)


def test_strings_and_errors_are_written_as_rapidjsons_writer_writes_them():
    # writer.h WriteString: \b \f \n \r \t \" \\ short, other controls \u00XX upper case,
    # the rest (UTF-8, '/', even bytes that are not UTF-8) as they are.
    assert jt.error_json("a\u001f/\u00e9\"") == '{\n    "error": "a\\u001F/\u00e9\\""\n}'
    body = jt.make_json_from_tensors({"label": np.array([b"caf\xe9\n"], dtype=object)}, jt.ROW)
    assert body.encode("utf-8", "surrogateescape") == b'{\n    "predictions": ["caf\xe9\\n"]\n}'


# --------------------------------------------------------------------------------------------
# :classify and :regress: json_tensor.cc FillClassifyRegressRequestFromJson,
# classifier.cc / regressor.cc (signature checks), on our predict-only signatures
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc, message", [
    ({}, "JSON Value: {} When method is classify, key 'examples' is expected and was not found"),
    ({"examples": 5}, 'JSON Value: {\n    "examples": 5\n} Expecting \'examples\' value to be an list/array'),
    ({"examples": []}, 'JSON Value: {\n    "examples": []\n} \'examples\' value is an empty array'),
    ({"examples": [3]}, "Example must be JSON object but got JSON Number"),
    ({"examples": [{"f": None}]}, "Feature: f has element with unexpected JSON type: Null"),
    ({"examples": [{"f": [[1]]}]}, "Feature: f has element with unexpected JSON type: Array"),
    ({"examples": [{"f": [1, 2.5]}]}, "Unexpected element type in feature: f expecting type: int64"),
    ({"examples": [{"f": 2**63}]}, "Feature: f has uint64_t element. Only int64_t is supported."),
    ({"examples": [{"f": {"b64": "Q"}}]}, "Unable to base64 decode"),
    ({"context": [1], "examples": [{}]}, "Example must be JSON object but got JSON Array"),
])
def test_classify_and_regress_bodies_are_checked_as_tf_serving_checks_them(doc, message):
    with pytest.raises(pr.ApiError) as err:
        jt.check_classify_regress_request(doc)
    assert (err.value.code, err.value.message) == ("INVALID_ARGUMENT", message)


def _servable(signatures: dict, method_name_check: bool = False):
    from serving.model_manager import Servable

    servable = Servable.__new__(Servable)  # no session: only the signatures are looked at
    servable.signatures = signatures
    servable.method_name_check = method_name_check
    return servable


def _signature(inputs: dict, outputs: dict, method: str = "tensorflow/serving/predict"):
    from tensorflow.core.protobuf import meta_graph_pb2

    signature = meta_graph_pb2.SignatureDef(method_name=method)
    for alias, (name, dtype) in inputs.items():
        signature.inputs[alias].name, signature.inputs[alias].dtype = name, dtype
    for alias, (name, dtype) in outputs.items():
        signature.outputs[alias].name, signature.outputs[alias].dtype = name, dtype
    return signature


OURS = _signature({"image": ("serving_default_image:0", pr.DT_UINT8)},
                  {"digit": ("StatefulPartitionedCall:0", pr.DT_INT64),
                   "probabilities": ("StatefulPartitionedCall:1", pr.DT_FLOAT)})


def test_classify_and_regress_on_a_predict_signature_fail_as_in_tf_serving():
    from google.protobuf import text_format

    servable = _servable({"serving_default": OURS})
    cases = [
        ("", "classify", f"No classification inputs found in SignatureDef: {text_format.MessageToString(OURS)}"),
        ("", "regress", "Expected one output Tensor."),
        ("nope", "classify", "No signature was found with the name: nope"),
    ]
    for signature, method, message in cases:
        with pytest.raises(pr.ApiError) as err:
            servable.check_classify_regress(signature, method)
        assert (err.value.code, err.value.http_status, err.value.message) == ("INVALID_ARGUMENT", 400, message)
    checking = _servable({"serving_default": OURS}, method_name_check=True)  # --enable_signature_method_name_check
    with pytest.raises(pr.ApiError) as err:
        checking.check_classify_regress("", "regress")
    assert err.value.message == ("Expected regression signature method_name to be tensorflow/serving/regress. "
                                 "Was: tensorflow/serving/predict")
    classifier = _servable({"serving_default": _signature(
        {"inputs": ("tf_example:0", pr.DT_STRING)}, {"scores": ("scores:0", pr.DT_FLOAT)},
        "tensorflow/serving/classify")})
    with pytest.raises(pr.ApiError) as err:  # a real classify signature: not run here
        classifier.check_classify_regress("", "classify")
    assert err.value.code == "UNIMPLEMENTED"


# --------------------------------------------------------------------------------------------
# Predict's checks: predict_util.cc PreProcessPrediction, then TensorFlow 2.21's
# GetInputValues (tensorflow/cc/saved_model/util.cc), then Session::Run's argument check
# --------------------------------------------------------------------------------------------
def test_a_wrong_input_name_gets_tensorflow_2_21s_get_input_values_message():
    servable = _servable({"serving_default": OURS})
    with pytest.raises(pr.ApiError) as err:
        servable.check_inputs("", ["pixels"])
    assert err.value.message == (
        "Signature input alias: image(feed name: serving_default_image:0) not found in request and no "
        "default value provided. Inputs expected to be in the request {pixels}, or default input alias set: ")
    with pytest.raises(pr.ApiError) as err:
        servable.check_inputs("", [])
    assert err.value.message == ("input size does not match signature: 0!=1 len({}) != len({image}). "
                                 "Sent extra: {}. Missing but required: {image}.")


def test_an_output_filter_error_comes_before_a_dtype_error():
    servable = _servable({"serving_default": OURS})
    servable._prepared = {}
    wrong_dtype = {"image": np.zeros((1, 28, 28), np.float32)}
    with pytest.raises(pr.ApiError, match="output tensor alias not found in signature: nope"):
        servable.prepare("", wrong_dtype, ["nope"])
    with pytest.raises(pr.ApiError, match=r"Expects arg\[0\] to be uint8 but float is provided"):
        servable.prepare("", wrong_dtype, ["digit"])


# --------------------------------------------------------------------------------------------
# gRPC tensors: what a tiny message declares is checked before anything is allocated
# --------------------------------------------------------------------------------------------
def test_a_tensor_larger_than_the_budget_is_refused_before_allocation():
    from tensorflow.core.framework import tensor_pb2

    from serving import tensor_proto

    proto = tensor_pb2.TensorProto(dtype=pr.DT_UINT8, int_val=[7])  # about 20 bytes on the wire
    for size in (1, 20000, 20000):
        proto.tensor_shape.dim.add(size=size)
    strings = tensor_pb2.TensorProto(dtype=pr.DT_STRING, string_val=[b"x"])
    strings.tensor_shape.dim.add(size=10**8)
    assert tensor_proto.decoded_bytes(proto) == 400_000_000
    assert tensor_proto.decoded_bytes(strings) == 8 * 10**8 + 1
    tracemalloc.start()
    try:
        for p in (proto, strings):
            with pytest.raises(tensor_proto.TensorTooLarge):
                tensor_proto.to_ndarray(p, max_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing of the declared size was allocated
    small = tensor_pb2.TensorProto(dtype=pr.DT_UINT8, int_val=[7])
    small.tensor_shape.dim.add(size=4)
    assert tensor_proto.to_ndarray(small, max_bytes=4).tolist() == [7, 7, 7, 7]  # TF pads with the last value
