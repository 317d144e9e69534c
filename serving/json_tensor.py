"""TF Serving's REST JSON <-> numpy tensors, following tensorflow_serving/util/json_tensor.cc
at TF Serving's current master (2.18+, behind our 2.21 pin).

Pure Python + numpy (no TensorFlow): the local server uses it to read `:predict` bodies and
write responses exactly as TF Serving does, and the tests use it to build requests.

Request (`FillPredictRequestFromJson`):

    {"signature_name": "...",            optional, must be a string
     "instances": [...]}                 row format: one element per batch item; a single
                                         input as plain values, several as objects by name
     or "inputs": <value|list|object>    columnar: the whole tensor, or an object by name

Each input's dtype comes from the signature; the tensor's shape comes from the JSON nesting
(the first element at each level fixes that level's size; every other element must match).
A string tensor takes JSON strings or `{"b64": "..."}` objects (abseil's base64: whitespace
skipped). Values are checked as rapidjson checks them: integer dtypes take integer tokens
that fit int32 (int64/uint32/uint64 their own range), float and double any number, bools
true/false; half and uint16 inputs are UNIMPLEMENTED. The body is read as rapidjson reads it
(serving/rapidjson_compat.py), and request values quoted in errors are cut after 256 bytes.

Response (`MakeJsonFromTensors`): row requests get `{"predictions": ...}`, columnar ones
`{"outputs": ...}`; with one output tensor its name is omitted, with several each batch item
(row) or the whole output (columnar) is an object keyed by output name. Floats are written
as TF Serving writes them (6 significant digits if that round-trips, else 9 for float32 / 17
for float64, a trailing ".0" on whole numbers, NaN/Infinity tokens); DT_STRING outputs whose
name ends in "_bytes" are written as {"b64": ...}.

Errors are `ApiError`s (serving/protocol.py) carrying TF Serving's status code and message
text (see serving/COMPATIBILITY.md for the table of mirrored behaviours and the tests that pin
them).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from serving import rapidjson_compat as rj
from serving.protocol import (
    DT_BOOL, DT_DOUBLE, DT_FLOAT, DT_HALF, DT_INT8, DT_INT16, DT_INT32, DT_INT64, DT_STRING, DT_UINT8,
    DT_UINT16, DT_UINT32, DT_UINT64, DTYPES, INT64_MAX, ApiError, dtype_string, invalid,
)

# --------------------------------------------------------------------------------------------
# JSON values, as rapidjson types them
# --------------------------------------------------------------------------------------------
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN = -(2**63)
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
# The dtypes AddValueToTensor converts JSON into (others: UNIMPLEMENTED "Conversion of ...").
_INT_DTYPES = (DT_INT32, DT_INT16, DT_INT8, DT_UINT8)  # rapidjson IsInt(), then a C cast
_FLOAT_DTYPES = (DT_FLOAT, DT_DOUBLE)


def _is_int_token(v: Any) -> bool:
    # The reader keeps integer tokens within int64/uint64 as ints (rapidjson's Int/Uint/
    # Int64/Uint64 values); bool is an int subclass, but not a number.
    return type(v) is int


def json_type_string(v: Any) -> str:
    """rapidjson's type name of a parsed JSON value (JsonTypeString)."""
    if v is None:
        return "Null"
    if v is True:
        return "True"
    if v is False:
        return "False"
    if isinstance(v, dict):
        return "Object"
    if isinstance(v, list):
        return "Array"
    if isinstance(v, str):
        return "String"
    return "Number"


def format_decimal(value: float, double: bool = False) -> str:
    """One float as TF Serving's WriteDecimal writes it.

    "%g" with 6 significant digits when that parses back to the same value, else
    max_digits10 (9 for float32, 17 for float64); whole numbers not in exponent form get
    ".0"; non-finite values become NaN / Infinity / -Infinity.
    """
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "-Infinity" if v < 0 else "Infinity"
    text = "%.6g" % v
    if double:
        if float(text) != v:
            text = "%.17g" % v
    elif np.float32(text) != np.float32(v):
        text = "%.9g" % v
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def format_floats(values: np.ndarray) -> list[str]:
    """format_decimal over a whole float array (flat, C order), with numpy doing the
    round-trip checks: the same texts, at a fraction of the cost per value."""
    flat = np.asarray(values).reshape(-1)
    double = flat.dtype == np.float64
    as_float = flat.tolist()  # Python floats hold float16/32/64 values exactly
    texts = ["%.6g" % v for v in as_float]
    # Parsed back at the tensor's own precision (float for float32/half, as format_decimal).
    # No overflow is possible: "%.6g" rounds the largest finite values down, not up.
    differs = np.array(texts, dtype=np.float64 if double else np.float32) != flat
    if differs.any():  # NaN lands here too (NaN != NaN); the loop below words it
        long_form = "%.17g" if double else "%.9g"
        for i in np.flatnonzero(differs).tolist():
            texts[i] = long_form % as_float[i]
    for i, text in enumerate(texts):
        if "." not in text and "e" not in text:
            # A whole number gets ".0"; "nan", "inf", "-inf" (no digit at the end) get
            # TF Serving's NaN / Infinity / -Infinity.
            texts[i] = text + ".0" if text[-1].isdigit() else format_decimal(as_float[i], double)
    return texts


def json_value_to_string(v: Any) -> str:
    """JsonValueToDebugString: the value as rapidjson's PrettyWriter writes it with
    single-line arrays, cut after 256 bytes (rapidjson_compat.debug_string)."""
    return rj.debug_string(v)


def _type_error(v: Any, dt: int) -> ApiError:
    return invalid("JSON Value: ", json_value_to_string(v), " Type: ", json_type_string(v),
                   " is not of expected type: ", dtype_string(dt))


def _format_error(v: Any, *parts: Any) -> ApiError:
    return invalid("JSON Value: ", json_value_to_string(v), " ", *parts)


def _is_b64_object(v: Any) -> bool:
    """{"b64": "<string>"} with exactly that one key (IsValBase64Object)."""
    return isinstance(v, dict) and len(v) == 1 and isinstance(v.get("b64"), str)


_BASE64_SPACE = b" \t\n\v\f\r"  # absl::ascii_isspace


def base64_unescape(text: str) -> bytes | None:
    """absl::Base64Unescape (absl/strings/escaping.cc), or None where it fails.

    Whitespace (space, \\t, \\n, \\v, \\f, \\r) is skipped anywhere, so MIME-wrapped base64
    (`base64.encodebytes`, `base64` without -w0) decodes. The data may end with no padding
    or with exactly the padding its length needs, written with '=' or '.'; a final single
    character (6 bits) or any other character fails. Linear C-speed steps only (a picture's
    base64 is hundreds of kilobytes: a regex search for the padding took milliseconds).
    """
    try:
        data = text.encode("ascii").translate(None, _BASE64_SPACE)
    except UnicodeEncodeError:  # a character outside the alphabet
        return None
    body = data.rstrip(b"=.")
    pads = len(data) - len(body)
    expected = {0: 0, 2: 2, 3: 1}.get(len(body) % 4)
    if expected is None or pads not in (0, expected):
        return None
    try:
        return base64.b64decode(body + b"=" * expected, validate=True)
    except (binascii.Error, ValueError):  # a character outside the alphabet
        return None


def _b64_decode(v: Any) -> bytes:
    """JsonDecodeBase64Object."""
    if not _is_b64_object(v):
        raise invalid("JSON Value: ", json_value_to_string(v), " not formatted correctly for base64 data")
    decoded = base64_unescape(v["b64"])
    if decoded is None:
        raise invalid("Unable to base64 decode")
    return decoded


def _convert_scalar(v: Any, dt: int) -> Any:
    """AddValueToTensor: one JSON leaf -> a Python value for dtype `dt`, or ApiError.

    As at TF Serving's current master: float and double take any number (an integer, NaN,
    Infinity; out of float range gives infinity, as the C++ cast does), integer dtypes take
    integer tokens in their range, bool true/false, string strings. DT_HALF, DT_UINT16 and
    the rest are UNIMPLEMENTED.
    """
    if isinstance(v, dict):
        if dt == DT_STRING:
            return _b64_decode(v)
        raise _type_error(v, dt)
    if dt in _FLOAT_DTYPES:
        if not (_is_int_token(v) or type(v) is float):
            raise _type_error(v, dt)
        return float(v)
    if dt in _INT_DTYPES:
        # rapidjson IsInt(): an integer token within int32. The value is then narrowed by a
        # C++ cast (TF's Tensor::FromProto), so 300 sent to uint8 arrives as 44, as in TF Serving.
        if not (_is_int_token(v) and INT32_MIN <= v <= INT32_MAX):
            raise _type_error(v, dt)
        return v
    if dt == DT_INT64:
        if not (_is_int_token(v) and INT64_MIN <= v <= INT64_MAX):
            raise _type_error(v, dt)
        return v
    if dt == DT_UINT32:
        if not (_is_int_token(v) and 0 <= v <= UINT32_MAX):
            raise _type_error(v, dt)
        return v
    if dt == DT_UINT64:
        if not (_is_int_token(v) and 0 <= v <= UINT64_MAX):
            raise _type_error(v, dt)
        return v
    if dt == DT_BOOL:
        if type(v) is not bool:
            raise _type_error(v, dt)
        return v
    if dt == DT_STRING:
        if not isinstance(v, str):
            raise _type_error(v, dt)
        return v.encode("utf-8", "surrogateescape")  # the body's own bytes (see rapidjson_compat)
    raise ApiError("UNIMPLEMENTED", f"Conversion of JSON Value: {json_value_to_string(v)} to type: {dtype_string(dt)}")


MAX_RANK = 32  # numpy's limit is 64; a row tensor gets one more (batch) dimension


def _dense_shape(v: Any) -> list[int]:
    """GetDenseTensorShape: sizes along the first element of each nesting level."""
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        if len(shape) > MAX_RANK:
            raise invalid(f"JSON Value nests more than {MAX_RANK} levels deep: tensors of that rank are not served here")
        if not v:
            break
        v = v[0]
    return shape


def _fill(v: Any, level: int, shape: list[int], dt: int, out: list) -> None:
    """FillTensorProto: walk the DOM, check every level's size, collect leaves into `out`."""
    rank = len(shape)
    if not isinstance(v, list):
        if level != rank:
            raise invalid("JSON Value: ", json_value_to_string(v), " found at incorrect level: ",
                          level + 1, " in the JSON DOM. Expected at level: ", rank)
        out.append(_convert_scalar(v, dt))
        return
    if level >= rank:
        raise invalid("Encountered list at unexpected level: ", level, " expected < ", rank)
    if len(v) != shape[level]:
        raise invalid("Encountered list at unexpected size: ", len(v), " at level: ", level,
                      " expected size: ", shape[level])
    for item in v:
        _fill(item, level + 1, shape, dt, out)


def _to_array(values: list, shape: list[int], dt: int) -> np.ndarray:
    np_dtype = DTYPES[dt][1]
    if dt == DT_STRING:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if dt in _INT_DTYPES:
        # Values are int32 here; narrow with C-style wrap-around, as TF's cast does.
        return np.asarray(values, dtype=np.int64).astype(np_dtype).reshape(shape)
    if dt == DT_UINT64:
        return np.asarray(values, dtype=np.uint64).reshape(shape)
    if dt == DT_FLOAT:
        return _to_float32(np.asarray(values, dtype=np.float64)).reshape(shape)
    return np.asarray(values, dtype=np_dtype).reshape(shape)


def _to_float32(doubles: np.ndarray) -> np.ndarray:
    """rapidjson's GetFloat(): static_cast<float>(GetDouble()); beyond float's range that is
    an infinity (x86's conversion), not an error."""
    with np.errstate(over="ignore"):
        return doubles.astype(np.float32)


def _tensor_from_value(v: Any, dt: int, may_have_bools: bool = True) -> np.ndarray:
    """One whole tensor from its JSON value (columnar input, or one row item)."""
    fast = _fast_numeric(v, dt, may_have_bools)
    if fast is not None:
        return fast
    shape = _dense_shape(v)
    values: list = []
    _fill(v, 0, shape, dt, values)
    return _to_array(values, shape, dt)


def _fast_numeric(v: Any, dt: int, may_have_bools: bool = True) -> np.ndarray | None:
    """numpy's own parser for the common case (rectangular lists of plain numbers).

    Returns None whenever the slow path must decide (ragged lists, objects, strings, bools,
    out-of-range integers), so the fast path never accepts what TF Serving would refuse.
    `may_have_bools=False` (the body holds no `true`/`false` token) skips the bool scan:
    numpy would silently read true as 1.
    """
    if dt == DT_STRING or not isinstance(v, list) or not v:
        return None
    if may_have_bools and not _has_no_bools(v):
        return None
    array = _array_in_pieces(v)
    if array is None:
        return None
    kind = array.dtype.kind
    if array.size == 0 or kind not in "if" or array.ndim > MAX_RANK:
        return None  # bools come out as 'b' (all bools) or would need the slow path anyway
    if dt in _INT_DTYPES:
        if kind != "i" or array.min() < INT32_MIN or array.max() > INT32_MAX:
            return None
        return array.astype(DTYPES[dt][1])
    if dt in _FLOAT_DTYPES:
        doubles = array.astype(np.float64)  # integers become doubles first, as GetDouble()
        return _to_float32(doubles) if dt == DT_FLOAT else doubles
    if dt == DT_INT64 and kind == "i":
        return array.astype(np.int64)
    return None


# np.array over a nested list holds the GIL throughout: a large input (a request of 16,000
# images) is converted this many rows at a time, so that the event loop, in another thread,
# gets its turn between pieces.
_ROWS_PER_PIECE = 256


def _array_in_pieces(v: list) -> np.ndarray | None:
    """np.array(v) for a rectangular nested list, in pieces of _ROWS_PER_PIECE rows; None
    where numpy cannot make one numeric array of it (ragged, mixed, too deep)."""
    try:
        if len(v) <= _ROWS_PER_PIECE:
            return np.array(v)
        pieces = [np.array(v[i : i + _ROWS_PER_PIECE]) for i in range(0, len(v), _ROWS_PER_PIECE)]
    except (ValueError, TypeError, OverflowError):
        return None
    if len({p.shape[1:] for p in pieces}) != 1 or any(p.dtype.kind not in "biuf" for p in pieces):
        return None  # ragged, or not numbers: the walk decides
    return np.concatenate(pieces)  # ints and floats together give floats, as np.array(v) does


def _has_no_bools(v: Any) -> bool:
    """True when the nested list holds no JSON true/false (numpy would turn them into 1/0)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if type(x) is bool:
            return False
        if isinstance(x, list):
            if x and not isinstance(x[0], list):
                if bool in set(map(type, x)):
                    return False
            else:
                stack.extend(x)
    return True


def may_hold_bools(body: bytes | str) -> bool:
    """False when a request body cannot contain a JSON true/false token."""
    if isinstance(body, str):
        return "true" in body or "false" in body
    return b"true" in body or b"false" in body


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
ROW, COLUMNAR = "row", "columnar"


def parse_json(body: bytes | str, allow_orjson: bool = True) -> dict:
    """ParseJson: the request body as a JSON object, or INVALID_ARGUMENT as TF Serving says it.

    rapidjson's reading (serving/rapidjson_compat.py): bytes after the first complete value
    are ignored; errors are "JSON Parse error: <rapidjson's message> at offset: <byte>".
    `allow_orjson=False` reads with rapidjson_compat's own reader, slower but never holding
    the GIL for long (for large bodies parsed beside the event loop).
    """
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = rj.parse(body, allow_orjson)
    except rj.JsonParseError as err:
        raise invalid(f"JSON Parse error: {err.message} at offset: {err.offset}") from None
    if not isinstance(doc, dict):
        raise _format_error(doc, "Is not object")
    return doc


def signature_name_of(doc: dict) -> str:
    """FillSignature: the optional 'signature_name' ('' when absent)."""
    if "signature_name" not in doc:
        return ""
    name = doc["signature_name"]
    if not isinstance(name, str):
        raise invalid("JSON Value: ", json_value_to_string(doc),
                      " not formatted correctly. 'signature_name' key must be a string value.")
    return name


@dataclass
class PredictInputs:
    """A parsed :predict body: the tensors by input name and the request format."""

    signature_name: str
    tensors: dict[str, np.ndarray]
    format: str  # ROW or COLUMNAR


def fill_predict_request(
    doc: dict, input_dtypes: Callable[[str], Mapping[str, int]], may_have_bools: bool = True,
) -> PredictInputs:
    """FillPredictRequestFromJson.

    Args:
      doc: the parsed body (parse_json).
      input_dtypes: signature name ('' = default) -> {input name: DataType enum}; raises
        ApiError when the model, version or signature is unknown (the handler's GetInfoMap).
      may_have_bools: False when the body has no true/false token (may_hold_bools), which
        lets large numeric inputs skip a scan.
    Returns the input tensors (numpy) and the format the response must use.
    """
    try:
        return _fill_predict_request(doc, input_dtypes, may_have_bools)
    except RecursionError:
        raise invalid("JSON Value nests too deeply to be a tensor") from None


def _fill_predict_request(doc: dict, input_dtypes: Callable[[str], Mapping[str, int]],
                          may_have_bools: bool) -> PredictInputs:
    signature_name = signature_name_of(doc)
    infos = dict(input_dtypes(signature_name))
    if not infos:
        raise invalid("Failed to get input map for signature: ", signature_name or "DEFAULT")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise _format_error(doc, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ")
    if has_instances:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise _format_error(doc, "Excepting 'instances' to be an list/array")
        if not instances:
            raise _format_error(doc, "No values in 'instances' array")
        return PredictInputs(signature_name, _from_instances(instances, infos, may_have_bools), ROW)
    if has_inputs:
        return PredictInputs(signature_name, _from_inputs(doc["inputs"], infos, may_have_bools), COLUMNAR)
    raise invalid("Missing 'inputs' or 'instances' key")


def _is_element_object(v: Any) -> bool:
    return isinstance(v, dict) and not _is_b64_object(v)


def _from_instances(instances: list, infos: dict[str, int], may_have_bools: bool = True) -> dict[str, np.ndarray]:
    """FillTensorMapFromInstancesList: rows -> one batched tensor per input."""
    if not isinstance(instances[0], dict) and len(infos) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple "
                      "input tensors required as per tensorinfo_map")
    objects = _is_element_object(instances[0])
    if not objects:
        # One unnamed input: try numpy on the whole list at once, then TF Serving's walk.
        (name, dt), = infos.items()
        fast = _fast_numeric(instances, dt, may_have_bools)
        if fast is not None:
            return {name: fast}
    names = sorted(infos)
    rows: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise invalid("Expecting object but got list at item ", index, " of input list")
            for key, value in element.items():
                try:
                    _add_instance_item(value, key, infos, rows, shapes)
                except ApiError as err:
                    raise invalid("Failed to process element: ", index, " key: ", key,
                                  " of 'instances' list. Error: ", err) from None
            if set(element) != set(names):
                raise invalid("Failed to process element: ", index, " of 'instances' list. JSON object: ",
                              json_value_to_string(element), " keys must be equal to: ", ",".join(names))
        else:
            if _is_element_object(element):
                raise invalid("Expecting value/list but got object at item ", index, " of input list")
            name = next(iter(infos))
            try:
                _add_instance_item(element, name, infos, rows, shapes)
            except ApiError as err:
                raise invalid("Failed to process element: ", index,
                              " of 'instances' list. Error: ", err) from None
    return {name: np.stack(items) for name, items in rows.items()}


def _add_instance_item(value: Any, name: str, infos: dict[str, int],
                       rows: dict[str, list[np.ndarray]], shapes: dict[str, tuple[int, ...]]) -> None:
    """AddInstanceItem: one row of one named input; all rows must share size and shape."""
    if name not in infos:
        raise invalid("JSON object: does not have named input: ", name)
    shape = _dense_shape(value)
    values: list = []
    _fill(value, 0, shape, infos[name], values)
    item = _to_array(values, shape, infos[name])
    if name not in shapes:
        shapes[name] = item.shape
    elif int(np.prod(shapes[name])) != item.size:
        raise invalid("Expecting tensor size: ", int(np.prod(shapes[name])), " but got: ", item.size)
    elif shapes[name] != item.shape:
        raise invalid("Expecting shape [", ",".join(map(str, shapes[name])), "] but got: [",
                      ",".join(map(str, item.shape)), "]")
    rows.setdefault(name, []).append(item)


def _from_inputs(value: Any, infos: dict[str, int], may_have_bools: bool = True) -> dict[str, np.ndarray]:
    """FillTensorMapFromInputsMap: columnar 'inputs'."""
    if not isinstance(value, dict) or _is_b64_object(value):
        if len(infos) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple "
                          "input tensors required as per tensorinfo_map")
        (name, dt), = infos.items()
        return {name: _tensor_from_value(value, dt, may_have_bools)}
    tensors = {}
    for name in sorted(infos):
        if name not in value:
            raise invalid("Missing named input: ", name, " in 'inputs' object.")
        tensors[name] = _tensor_from_value(value[name], infos[name], may_have_bools)
    return tensors  # keys that no input has are ignored, as TF Serving ignores them


# --------------------------------------------------------------------------------------------
# :classify and :regress bodies (FillClassifyRegressRequestFromJson)
# --------------------------------------------------------------------------------------------
def check_classify_regress_request(doc: dict) -> str:
    """FillClassifyRegressRequestFromJson's checks of a :classify / :regress body: the
    optional 'signature_name' (returned, '' when absent), an optional 'context' example and a
    non-empty 'examples' list of examples, each a JSON object whose members hold one value or
    a list of values of one Feature kind (int64 for integers and booleans, float for other
    numbers, bytes for strings and {"b64": ...}). Raises ApiError with TF Serving's messages
    (note the 'When method is classify' in the message for :regress too, as upstream).
    """
    signature_name = signature_name_of(doc)
    if "context" in doc:
        _check_example(doc["context"])
    if "examples" not in doc:
        raise _format_error(doc, "When method is classify, key 'examples' is expected and was not found")
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise _format_error(doc, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(doc, "'examples' value is an empty array")
    for example in examples:
        _check_example(example)
    return signature_name


def _check_example(value: Any) -> None:
    """MakeExampleFromJsonObject."""
    if not isinstance(value, dict):
        raise invalid("Example must be JSON object but got JSON ", json_type_string(value))
    for name, content in value.items():
        kind: list[str] = []  # the Feature's kind once its first value fixed it
        for item in (content if isinstance(content, list) else [content]):
            _check_feature_value(item, name, kind)


def _check_feature_value(v: Any, name: str, kind: list[str]) -> None:
    """AddValueToFeature: one value of feature `name` (kind: [] or [its kind so far])."""
    if v is None or isinstance(v, list) or (isinstance(v, dict) and not _is_b64_object(v)):
        raise invalid("Feature: ", name, " has element with unexpected JSON type: ", json_type_string(v))
    if isinstance(v, bool) or _is_int_token(v):
        wanted = "int64"
    elif isinstance(v, float):
        wanted = "float"
    else:
        wanted = "bytes"
    if kind and kind[0] != wanted:
        raise invalid("Unexpected element type in feature: ", name, " expecting type: ", kind[0])
    if isinstance(v, dict):
        _b64_decode(v)
    elif wanted == "int64" and not isinstance(v, bool) and v > INT64_MAX:
        raise invalid("Feature: ", name, " has uint64_t element. Only int64_t is supported.")
    kind[:1] = [wanted]


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
def _leaf_texts(name: str, array: np.ndarray) -> list[str]:
    """Every value of a tensor as JSON text, flat in C order (AddSingleValueAndAdvance:
    half and uint16 tensors cannot be written)."""
    kind = array.dtype.kind
    if array.dtype in (np.float16, np.uint16):
        raise invalid("Failed to write JSON value for tensor type: ", dtype_string(DT_HALF if kind == "f" else DT_UINT16))
    if kind == "f":
        return format_floats(array)
    if kind == "b":
        return ["true" if x else "false" for x in array.reshape(-1).tolist()]
    if kind in "iu":
        return list(map(str, array.reshape(-1).tolist()))
    if array.dtype == object or kind in "SU":
        as_bytes = name.endswith("_bytes")
        texts = []
        for x in array.reshape(-1):
            raw = x if isinstance(x, bytes) else str(x).encode("utf-8")
            if as_bytes:
                texts.append('{"b64": "' + base64.b64encode(raw).decode("ascii") + '"}')
            else:
                texts.append(rj.write_string(raw.decode("utf-8", "surrogateescape")))
        return texts
    raise invalid("Failed to write JSON value for tensor type: ", array.dtype)


def _nest(texts: list[str], shape: tuple[int, ...]) -> str:
    """Flat texts of a tensor of `shape` as nested JSON arrays on one line ("[[1, 2], [3, 4]]",
    rapidjson's single-line array format); a scalar is its one text."""
    if not shape:
        return texts[0]
    items = texts
    for level in range(len(shape) - 1, -1, -1):
        # Join the innermost remaining dimension: prod(shape[:level]) groups of shape[level].
        size = shape[level]
        items = ["[" + ", ".join(items[g * size : (g + 1) * size]) + "]"
                 for g in range(math.prod(shape[:level]))]
    return items[0]


def _rows(texts: list[str], shape: tuple[int, ...]) -> list[str]:
    """The JSON text of each row (0th-dimension item) of a tensor of `shape`."""
    size = math.prod(shape[1:])
    return [_nest(texts[i * size : (i + 1) * size], shape[1:]) for i in range(shape[0])]


def make_json_from_tensors(outputs: Mapping[str, np.ndarray], fmt: str) -> str:
    """MakeJsonFromTensors: output tensors -> the response body (row or columnar)."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    arrays = {n: np.asarray(outputs[n]) for n in names}
    if fmt == COLUMNAR:
        texts = {n: _nest(_leaf_texts(n, arrays[n]), arrays[n].shape) for n in names}
        if len(names) == 1:
            return '{\n    "outputs": ' + texts[names[0]] + "\n}"
        parts = [f'        {rj.write_string(n)}: {texts[n]}' for n in names]
        return '{\n    "outputs": {\n' + ",\n".join(parts) + "\n    }\n}"
    if fmt != ROW:
        raise invalid("Invalid request format")
    batch = 0
    for name in names:
        tensor = arrays[name]
        if tensor.ndim == 0:
            raise invalid("Tensor name: ", name, " has no shape information ")
        size = tensor.shape[0]
        if size < 1:
            raise invalid("Tensor name: ", name, " has invalid batch size: ", size)
        if batch and size != batch:
            raise invalid("Tensor name: ", name, " has inconsistent batch size: ", size, " expecting: ", batch)
        batch = size
    rows = {n: _rows(_leaf_texts(n, arrays[n]), arrays[n].shape) for n in names}
    if len(names) == 1:
        return '{\n    "predictions": [' + ", ".join(rows[names[0]]) + "]\n}"
    keys = {n: f'            {rj.write_string(n)}: ' for n in names}
    items = ["        {\n" + ",\n".join(keys[n] + rows[n][i] for n in names) + "\n        }"
             for i in range(batch)]
    return '{\n    "predictions": [\n' + ",\n".join(items) + "\n    ]\n}"


def error_json(message: str) -> str:
    """MakeJsonFromStatus: {"error": "<message>"} (pretty, UTF-8 kept as is)."""
    return '{\n    "error": ' + rj.write_string(message) + "\n}"
