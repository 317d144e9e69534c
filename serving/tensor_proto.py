"""numpy arrays <-> tensorflow.TensorProto, without calling TensorFlow.

`tf.make_tensor_proto` / `tf.make_ndarray` work but cost tens of microseconds per call and
need TensorFlow imported; these do the same with numpy on the proto's own fields. The proto
classes come from the caller (the server and the gRPC client already import them through
tensorflow-serving-api), so this module itself imports nothing heavy.

`to_ndarray` follows TensorFlow's Tensor::FromProto: `tensor_content` holds the raw
little-endian bytes; otherwise the typed field (float_val, int_val, ...) holds the values,
an empty field means zeros and a short one is padded with its last value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving import protocol

# Which repeated field carries each dtype's values when tensor_content is empty.
_FIELD = {
    protocol.DT_FLOAT: "float_val", protocol.DT_DOUBLE: "double_val", protocol.DT_INT32: "int_val",
    protocol.DT_UINT8: "int_val", protocol.DT_INT16: "int_val", protocol.DT_INT8: "int_val",
    protocol.DT_UINT16: "int_val", protocol.DT_STRING: "string_val", protocol.DT_INT64: "int64_val",
    protocol.DT_BOOL: "bool_val", protocol.DT_HALF: "half_val", protocol.DT_UINT32: "uint32_val",
    protocol.DT_UINT64: "uint64_val",
}


# tensor_content's byte order for each numeric dtype (computed once: this runs per request).
_LITTLE = {dt: np.dtype(np_dtype).newbyteorder("<") for dt, (_name, np_dtype) in protocol.DTYPES.items()
           if dt != protocol.DT_STRING}


class TensorProtoError(ValueError):
    """The proto does not describe a valid tensor (TF's FromProto would fail)."""


class TensorTooLarge(TensorProtoError):
    """The tensor would take more memory than the caller allows once decoded (`nbytes`)."""

    def __init__(self, nbytes: int, limit: int):
        super().__init__(f"decodes to {nbytes} bytes, more than the limit of {limit}")
        self.nbytes, self.limit = nbytes, limit


def decoded_bytes(proto: Any) -> int:
    """The memory a TensorProto's values take once decoded, from its shape alone: elements x
    itemsize, or for strings 8 bytes (a pointer) per element plus the bytes of the values
    given (the padding repeats the last one without copying it). A 60-byte proto can declare
    a tensor of gigabytes: TF fills every element with the last value given."""
    dt = int(proto.dtype)
    count = math.prod(shape_of(proto))
    if dt == protocol.DT_STRING:
        return 8 * count + sum(len(v) for v in proto.string_val)
    if dt not in _LITTLE:
        raise TensorProtoError(f"unsupported dtype {protocol.dtype_string(dt)}")
    return count * _LITTLE[dt].itemsize


def shape_of(proto: Any) -> tuple[int, ...]:
    shape = proto.tensor_shape
    if shape.unknown_rank:
        raise TensorProtoError("unknown rank")
    dims = tuple(int(d.size) for d in shape.dim)
    if any(d < 0 for d in dims):
        raise TensorProtoError(f"negative dimension in shape {list(dims)}")
    return dims


def to_ndarray(proto: Any, max_bytes: int | None = None) -> np.ndarray:
    """A TensorProto's values as a numpy array (bytes objects for DT_STRING).

    Raises TensorProtoError for a proto TF's Tensor::FromProto refuses, and TensorTooLarge,
    before allocating anything, when its decoded size exceeds `max_bytes`.
    """
    dt = int(proto.dtype)
    if dt not in protocol.DTYPES:
        raise TensorProtoError(f"unsupported dtype {protocol.dtype_string(dt)}")
    shape = shape_of(proto)
    if max_bytes is not None:
        size = decoded_bytes(proto)
        if size > max_bytes:
            raise TensorTooLarge(size, max_bytes)
    count = math.prod(shape)
    np_dtype = protocol.DTYPES[dt][1]
    if dt == protocol.DT_STRING:
        values = list(proto.string_val)
        array = np.empty(count, dtype=object)
        if values:
            n = min(count, len(values))
            array[:n] = values[:n]
            array[n:] = values[-1] if n < count else None
        else:
            array[:] = b""
        return array.reshape(shape)
    content = proto.tensor_content
    if content:
        little = _LITTLE[dt]
        if len(content) != count * little.itemsize:
            raise TensorProtoError(
                f"tensor_content holds {len(content)} bytes, shape {list(shape)} "
                f"of {protocol.dtype_string(dt)} needs {count * little.itemsize}"
            )
        # A writable copy in native byte order.
        return np.frombuffer(content, dtype=little).astype(np_dtype).reshape(shape)
    field = getattr(proto, _FIELD[dt])
    if dt == protocol.DT_HALF:
        raw = np.asarray(field, dtype=np.uint16).view(np.float16)
    elif dt in (protocol.DT_UINT8, protocol.DT_INT8, protocol.DT_INT16, protocol.DT_UINT16):
        raw = np.asarray(field, dtype=np.int64).astype(np_dtype)  # C-style narrowing
    else:
        raw = np.asarray(field, dtype=np_dtype)
    if raw.size == 0:
        return np.zeros(shape, dtype=np_dtype)
    if raw.size >= count:
        return raw[:count].reshape(shape)
    padded = np.empty(count, dtype=np_dtype)
    padded[: raw.size] = raw
    padded[raw.size :] = raw[-1]
    return padded.reshape(shape)


def from_ndarray(array: np.ndarray, proto_cls: Any, as_fields: bool = False) -> Any:
    """A numpy array as a new TensorProto of class `proto_cls` (see fill)."""
    return fill(proto_cls(), array, as_fields)


def fill(proto: Any, array: np.ndarray, as_fields: bool = False) -> Any:
    """Write a numpy array into an empty TensorProto in place (e.g. a response's
    `outputs[alias]`: no message built and copied in); returns the proto.

    Numbers go into `tensor_content` (compact; what tf.make_tensor_proto writes) unless
    `as_fields`, which fills the typed repeated field instead, as TF Serving's Predict does
    for responses (Tensor::AsProtoField). Strings always go to string_val.
    """
    array = np.asarray(array)
    dt = protocol.dtype_of_array(array)
    proto.dtype = dt
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = int(size)
    if dt == protocol.DT_STRING:
        flat = array.reshape(-1)
        proto.string_val.extend(x if isinstance(x, bytes) else str(x).encode("utf-8") for x in flat)
        return proto
    if not as_fields:
        proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return proto
    flat = array.reshape(-1)
    if dt == protocol.DT_HALF:
        proto.half_val.extend(flat.view(np.uint16).astype(np.int32).tolist())
    else:
        getattr(proto, _FIELD[dt]).extend(flat.tolist())
    return proto
