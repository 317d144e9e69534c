"""What crosses the wire between TF Serving and its clients: status codes, errors, dtypes.

Pure Python + numpy, so that the local server, the REST client and the gRPC client share
one definition of each (the clients need no server code, and the REST client no TensorFlow):

- `CODES`: TensorFlow's status codes (tensorflow/core/protobuf/error_codes.proto), by name.
- `HTTP_STATUS`: the HTTP status TF Serving answers for each code
  (tensorflow_serving/model_servers/http_server.cc, ToHTTPStatusCode).
- `ApiError`: a failed request, a code name and TF Serving's message text.
- The DataType enum (tensorflow/core/framework/types.proto) with DataTypeString's names and
  the numpy dtype of each type this kit serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# Status codes and their HTTP mapping
# --------------------------------------------------------------------------------------------
CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
CODE_NAMES = {v: k for k, v in CODES.items()}
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ApiError(Exception):
    """A failed request: a TF status code name ("INVALID_ARGUMENT", ...) and its message.

    `http_status` is TF Serving's mapping of the code unless the constructor was given a more
    precise one (413 for a body over this server's size limit). Raises ValueError for a code
    name that error_codes.proto does not have.
    """

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(message)
        if code not in CODES:
            raise ValueError(f"unknown status code {code!r}")
        self.code = code
        self.message = message
        self._http_status = http_status

    @property
    def http_status(self) -> int:
        return self._http_status or HTTP_STATUS[self.code]

    def __str__(self) -> str:  # absl::Status::ToString()
        return f"{self.code}: {self.message}"


def invalid(*parts: Any) -> ApiError:
    """errors::InvalidArgument(parts...): the parts concatenated as StrCat does."""
    return ApiError("INVALID_ARGUMENT", "".join(str(p) for p in parts))


# --------------------------------------------------------------------------------------------
# DataType: enum value -> (DataTypeString, numpy dtype)
# --------------------------------------------------------------------------------------------
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23

# One row per family: floating point, signed and unsigned integers, the rest. The names are
# DataTypeString's (tensorflow/core/framework/types.cc), not numpy's ("float", not "float32").
DTYPES: dict[int, tuple[str, Any]] = {
    DT_HALF: ("half", np.float16), DT_FLOAT: ("float", np.float32), DT_DOUBLE: ("double", np.float64),
    DT_INT8: ("int8", np.int8), DT_INT16: ("int16", np.int16), DT_INT32: ("int32", np.int32), DT_INT64: ("int64", np.int64),
    DT_UINT8: ("uint8", np.uint8), DT_UINT16: ("uint16", np.uint16), DT_UINT32: ("uint32", np.uint32), DT_UINT64: ("uint64", np.uint64),
    DT_BOOL: ("bool", np.bool_), DT_STRING: ("string", object),
}
_NUMPY_TO_DT = {np.dtype(np_dtype): dt for dt, (_name, np_dtype) in DTYPES.items() if dt != DT_STRING}


def dtype_string(dt: int) -> str:
    """DataTypeString(dt): 'uint8', 'float', ... ('unknown dtype enum N' when unsupported)."""
    return DTYPES[dt][0] if dt in DTYPES else f"unknown dtype enum {dt}"


def dtype_of_array(array: np.ndarray) -> int:
    """The DataType enum value of a numpy array (object / bytes / str arrays -> DT_STRING).

    Raises ApiError (INVALID_ARGUMENT) for a numpy dtype TensorFlow has no DataType for.
    """
    if array.dtype == object or array.dtype.kind in "SU":
        return DT_STRING
    try:
        return _NUMPY_TO_DT[array.dtype]
    except KeyError:
        raise invalid(f"numpy dtype {array.dtype} has no TensorFlow Serving equivalent") from None


INT64_MAX = 2**63 - 1
