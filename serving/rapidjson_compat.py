"""rapidjson as TF Serving uses it: its reader's verdicts, errors and numbers, and the writer
that quotes request values in error messages. Pure Python (re, json, optional orjson).

TF Serving parses REST bodies with rapidjson's iterative reader and the flags
kParseIterativeFlag | kParseNanAndInfFlag | kParseStopWhenDoneFlag
(tensorflow_serving/util/json_tensor.cc, ParseJson), reading UTF-8 from a memory stream:

- the first complete JSON value is the document; whatever follows it is never read;
- NaN, Inf, Infinity (with a leading '-' too) are numbers; strings are not checked for
  valid UTF-8 (only for control characters, escapes and surrogate pairs); a UTF-8 byte
  order mark is skipped (each of its bytes, in order, where present); a NUL byte reads as the end of the input;
- an error is one of rapidjson's messages (include/rapidjson/error/en.h) at the byte offset
  rapidjson reports (include/rapidjson/reader.h: IterativeParse, HandleError, ParseNumber,
  ParseStringToStream), e.g. "Missing a name for object member." at offset 1;
- integer tokens stay integers within int64/uint64 range, anything else is a double computed
  as rapidjson computes it without kParseFullPrecisionFlag (StrtodNormalPrecision), and a
  number whose exponent or value exceeds a double is "Number too big to be stored in double.".

`parse` returns the first JSON value of a body as Python values (dict, list, str, int, float,
bool, None), or raises JsonParseError with rapidjson's message and offset. orjson (when
installed) reads the bodies it accepts, which rapidjson accepts too, with the same values
but for the rounding of some doubles (below); anything else goes through `_Reader`, which
walks the document as rapidjson's state machine does, iteratively, with regular expressions
taking whole runs of plain numbers at once, and gives exactly rapidjson's verdict, error,
offset and values (checked against rapidjson itself on 30,000 generated documents while this
was written). Nesting deeper than MAX_DEPTH levels is refused, where rapidjson has no limit:
a 64 MiB body of '[' would otherwise build 64 million lists.

`debug_string` is JsonValueToDebugString: a PrettyWriter with kFormatSingleLineArray behind
json_tensor.cc's JsonWriterWithLimit, which stops at the first value that starts once 256
bytes are written. It is iterative and stops there too, so quoting a huge value costs
nothing.

Where Python does not follow exactly (documented in serving/COMPATIBILITY.md): a member name
that appears twice keeps its last value (rapidjson's FindMember finds the first); orjson's
doubles are correctly rounded where rapidjson's StrtodNormalPrecision, for numbers of more
than 15 significant digits or exponents beyond 22, is 1 ULP off in about one case in nine
(after the cast to float32, none of 150,000 random values differed); and doubles quoted in
errors are written with Python's shortest repr where rapidjson's Grisu2 may pick one more
digit (1e23 is written 9.999999999999999e22).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

try:  # optional accelerator (the `serve` extra pins it)
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    _orjson = None

# include/rapidjson/error/en.h, GetParseError_En.
DOCUMENT_EMPTY = "The document is empty."
VALUE_INVALID = "Invalid value."
OBJECT_MISS_NAME = "Missing a name for object member."
OBJECT_MISS_COLON = "Missing a colon after a name of object member."
OBJECT_MISS_COMMA_OR_CURLY = "Missing a comma or '}' after an object member."
ARRAY_MISS_COMMA_OR_BRACKET = "Missing a comma or ']' after an array element."
STRING_ESCAPE_INVALID_HEX = "Incorrect hex digit after \\u escape in string."
STRING_SURROGATE_INVALID = "The surrogate pair in string is invalid."
STRING_ESCAPE_INVALID = "Invalid escape character in string."
STRING_MISS_QUOTATION_MARK = "Missing a closing quotation mark in string."
STRING_INVALID_ENCODING = "Invalid encoding in string."
NUMBER_TOO_BIG = "Number too big to be stored in double."
NUMBER_MISS_FRACTION = "Miss fraction part in number."
NUMBER_MISS_EXPONENT = "Miss exponent in number."

DEBUG_STRING_BYTES = 256  # json_tensor.cc kMaxJsonDebugStringBytes


class JsonParseError(ValueError):
    """rapidjson's parse error: `message` (en.h's text) at byte `offset` of the body."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at offset: {offset}")
        self.message = message
        self.offset = offset


# --------------------------------------------------------------------------------------------
# Numbers, as ParseNumber computes them
# --------------------------------------------------------------------------------------------
_POW10 = [float(f"1e{k}") for k in range(309)]  # internal/pow10.h: the exact literals 1e0..1e308
_DBL_MAX = 1.7976931348623157e308
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def _fast_path(significand: float, exp: int) -> float:
    """internal/strtod.h FastPath."""
    if exp < -308:
        return 0.0
    if exp >= 0:
        return significand * _POW10[exp]
    return significand / _POW10[-exp]


def _number(text: bytes) -> tuple[Any, bool]:
    """The value ParseNumber gives a well-formed number token (NaN/Inf excluded), and whether
    it is too big for a double (then rapidjson fails with NUMBER_TOO_BIG at the token's start).

    Follows ParseNumber step by step: integer digits in 32 then 64 bits, beyond that in a
    double (d = d * 10 + digit); fraction digits exact up to 2^53 - 1, then in the double,
    at most 17 significant digits; a positive exponent larger than 308 plus the fraction
    digits taken is too big; then StrtodNormalPrecision scales the significand (exact within
    15 digits and 1e+-22, otherwise not always correctly rounded, exactly like TF Serving).
    Integers stay Python ints within int64/uint64, as rapidjson keeps them integers.
    """
    n = len(text)
    pos = 1 if text[0] == 0x2D else 0
    minus = pos == 1

    def digit(at: int) -> int:
        return text[at] - 48 if at < n and 48 <= text[at] <= 57 else -1

    i = i64 = 0
    use64bit = use_double = False
    significant = 0
    d = 0.0
    if text[pos] != 0x30:  # 1-9 then more digits: 32 bits, then 64, then a double
        i = text[pos] - 48
        pos += 1
        limit, last = (214748364, 8) if minus else (429496729, 5)
        while digit(pos) >= 0:
            if i >= limit and (i != limit or digit(pos) > last):
                i64, use64bit = i, True
                break
            i = i * 10 + digit(pos)
            significant += 1
            pos += 1
        if use64bit:
            limit, last = (0x0CCCCCCCCCCCCCCC, 8) if minus else (0x1999999999999999, 5)
            while digit(pos) >= 0:
                if i64 >= limit and (i64 != limit or digit(pos) > last):
                    d, use_double = float(i64), True
                    break
                i64 = i64 * 10 + digit(pos)
                significant += 1
                pos += 1
        while use_double and digit(pos) >= 0:
            d = d * 10 + digit(pos)
            pos += 1
    else:
        pos += 1
    exp_frac = 0
    if pos < n and text[pos] == 0x2E:
        pos += 1
        if not use_double:
            if not use64bit:
                i64 = i
            while digit(pos) >= 0 and i64 <= 2**53 - 1:
                i64 = i64 * 10 + digit(pos)
                exp_frac -= 1
                significant += i64 != 0
                pos += 1
            d, use_double = float(i64), True
        while digit(pos) >= 0:
            if significant < 17:
                d = d * 10.0 + digit(pos)
                exp_frac -= 1
                significant += d > 0.0
            pos += 1
    exp = 0
    if pos < n and text[pos] in (0x65, 0x45):
        if not use_double:
            d, use_double = float(i64 if use64bit else i), True
        pos += 1
        exp_minus = text[pos] == 0x2D
        pos += text[pos] in (0x2B, 0x2D)
        exp = int(text[pos:])
        if not exp_minus and exp > 308 - exp_frac:
            return None, True
        if exp_minus:
            exp = -min(exp, 10**9)  # rapidjson stops counting there; the value is 0 anyway
    if not use_double:
        value = i64 if use64bit else i
        return (-value if minus else value), False
    p = exp + exp_frac
    d = _fast_path(_fast_path(d, -308), p + 308) if p < -308 else _fast_path(d, p)
    return (-d if minus else d), d > _DBL_MAX


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------
_WS = re.compile(rb"[ \t\n\r]*")
_DIGITS = re.compile(rb"[0-9]*")
_PLAIN_STRING = re.compile(rb'"([^"\\\x00-\x1f]*)"')
_STRING_SPECIAL = re.compile(rb'[\\"\x00-\x1f]')
# Numbers rapidjson reads exactly as Python does (<= 15 significant digits, |exponent| <= 9:
# an exact significand scaled by an exact power of ten within 1e+-22), and the NaN/Infinity
# tokens Python's json also reads.
_EXACT = rb"(?:-?(?:0|[1-9][0-9]{0,6})(?:\.[0-9]{1,8})?(?:[eE][+-]?[0-9])?|NaN|-?Infinity)"
# A run of plain numbers, each followed by a comma, e.g. "0, 0, 12, " (1 to 1,000, so that
# no single step holds the GIL for long).
_NUMBER_RUN = re.compile(rb"(?:" + _EXACT + rb"[ \t\n\r]*,[ \t\n\r]*){1,1000}")
# A run of complete arrays of plain numbers, each followed by a comma: "[0, 1], [2, 3], ".
_ROW = rb"\[[ \t\n\r]*" + _EXACT + rb"(?:[ \t\n\r]*,[ \t\n\r]*" + _EXACT + rb"){0,1023}[ \t\n\r]*\]"
_ROW_RUN = re.compile(rb"(?:" + _ROW + rb"[ \t\n\r]*,[ \t\n\r]*){1,64}")
_ESCAPES = {ord('"'): '"', ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f",
            ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX = re.compile(rb"[0-9a-fA-F]{4}")
# orjson accepts exactly what rapidjson accepts (see `parse`) but for a zero with an exponent
# above 308 ("0e999"), which rapidjson finds too big: bodies with 3-digit exponents (or
# anything like one inside a string, which only costs them the slower way) go to _Reader.
_NOT_FOR_ORJSON = re.compile(rb"[eE][+-]?[0-9]{3}")
MAX_DEPTH = 10_000  # arrays/objects nested deeper are refused (rapidjson has no limit)
TOO_DEEP = f"The document nests arrays and objects more than {MAX_DEPTH} levels deep."

_START, _FINISH, _OBJECT_INITIAL, _MEMBER_KEY, _MEMBER_VALUE = range(5)
_ARRAY_INITIAL, _ELEMENT, _ELEMENT_DELIMITER, _MEMBER_DELIMITER, _KEY_VALUE_DELIMITER = range(5, 10)
# IterativeParse's HandleError: the error for an unexpected token (or the end) in each state.
_ERROR_IN_STATE = {
    _START: DOCUMENT_EMPTY,
    _OBJECT_INITIAL: OBJECT_MISS_NAME, _MEMBER_DELIMITER: OBJECT_MISS_NAME,
    _MEMBER_KEY: OBJECT_MISS_COLON,
    _MEMBER_VALUE: OBJECT_MISS_COMMA_OR_CURLY,
    _KEY_VALUE_DELIMITER: VALUE_INVALID, _ARRAY_INITIAL: VALUE_INVALID,
    _ELEMENT_DELIMITER: VALUE_INVALID,
    _ELEMENT: ARRAY_MISS_COMMA_OR_BRACKET,
}
# After an object's member value or an array's element: the state a ',' leads to, and the byte
# that closes the container ('}' or ']').
_AFTER_VALUE = {_MEMBER_VALUE: (_MEMBER_DELIMITER, 0x7D), _ELEMENT: (_ELEMENT_DELIMITER, 0x5D)}


def parse(data: bytes | bytearray | memoryview | str, allow_orjson: bool = True) -> Any:
    """The first JSON value of `data`, read as TF Serving reads a REST body.

    Raises JsonParseError (rapidjson's message and byte offset). An empty body is
    DOCUMENT_EMPTY at offset 0 (TF Serving itself words that case without an offset).
    `allow_orjson=False` always uses the reader here: slower, but made of short C steps, so
    that a thread parsing a large body lets other threads run (one orjson call holds the GIL
    for its whole input).
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data)
    if allow_orjson and _orjson is not None and not _NOT_FOR_ORJSON.search(data):
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass  # rapidjson may still read it (NaN, trailing bytes, ...), or words the error
    return _Reader(data).read()


class _Reader:
    """rapidjson's IterativeParse over a byte string, building the value as it goes."""

    def __init__(self, data: bytes):
        self.data = data
        self.end = len(data)

    def peek(self, pos: int) -> int:
        """MemoryStream::Peek: the byte, or 0 at the end (a NUL byte reads the same)."""
        return self.data[pos] if pos < self.end else 0

    def read(self) -> Any:
        data = self.data
        pos = 0
        for byte in (0xEF, 0xBB, 0xBF):  # EncodedInputStream<UTF8<>> skips a BOM, byte by byte
            pos += self.peek(pos) == byte
        pos = _WS.match(data, pos).end()
        state = _START
        # One frame per open array/object: [state to return to, container, pending key].
        stack: list[list] = []
        root: Any = None
        while True:
            c = self.peek(pos)
            if c == 0:
                break
            if state in (_START, _ARRAY_INITIAL, _ELEMENT_DELIMITER, _KEY_VALUE_DELIMITER):
                # A value is expected.
                if state in (_ARRAY_INITIAL, _ELEMENT_DELIMITER):
                    after = self._runs(pos, stack[-1][1])
                    if after != pos:  # values and their commas taken: another value is due
                        pos, state = after, _ELEMENT_DELIMITER
                        c = self.peek(pos)
                        if c == 0:
                            break
                if c == 0x5B or c == 0x7B:  # [ or {
                    back = (_ELEMENT if state in (_ARRAY_INITIAL, _ELEMENT_DELIMITER)
                            else _MEMBER_VALUE if state == _KEY_VALUE_DELIMITER else _START)
                    if len(stack) >= MAX_DEPTH:
                        raise JsonParseError(TOO_DEEP, pos)
                    container: Any = [] if c == 0x5B else {}
                    self._attach(stack, container)
                    if not stack:
                        root = container
                    stack.append([back, container, None])
                    state = _ARRAY_INITIAL if c == 0x5B else _OBJECT_INITIAL
                    pos += 1
                elif c == 0x5D and state in (_ARRAY_INITIAL, _ELEMENT_DELIMITER):  # ]
                    if state == _ELEMENT_DELIMITER:  # no trailing commas
                        raise JsonParseError(VALUE_INVALID, pos)
                    state = stack.pop()[0]
                    pos += 1
                elif c in (0x5D, 0x7D, 0x2C, 0x3A):  # ] } , : where a value belongs
                    raise JsonParseError(_ERROR_IN_STATE[state], pos)
                else:
                    value, pos = self._scalar(pos)
                    if state == _START:
                        root = value
                        state = _FINISH
                    else:
                        self._attach(stack, value)
                        state = _MEMBER_VALUE if state == _KEY_VALUE_DELIMITER else _ELEMENT
            elif state in (_OBJECT_INITIAL, _MEMBER_DELIMITER):
                if c == 0x22:  # "
                    stack[-1][2], pos = self._string(pos)
                    state = _MEMBER_KEY
                elif c == 0x7D and state == _OBJECT_INITIAL:  # }
                    state = stack.pop()[0]
                    pos += 1
                else:  # includes '}' after a comma: no trailing commas
                    raise JsonParseError(OBJECT_MISS_NAME, pos)
            elif state == _MEMBER_KEY:
                if c != 0x3A:  # :
                    raise JsonParseError(OBJECT_MISS_COLON, pos)
                state = _KEY_VALUE_DELIMITER
                pos += 1
            else:  # _MEMBER_VALUE or _ELEMENT: a ',' or the container's closing byte is due
                delimiter, closer = _AFTER_VALUE[state]
                if c == 0x2C:
                    state = delimiter
                elif c == closer:
                    state = stack.pop()[0]
                else:
                    raise JsonParseError(_ERROR_IN_STATE[state], pos)
                pos += 1
            if state == _START:
                state = _FINISH  # the root array/object just closed
            if state == _FINISH:
                return root  # kParseStopWhenDoneFlag: the rest is never read
            pos = _WS.match(data, pos).end()
        raise JsonParseError(_ERROR_IN_STATE[state], pos)

    @staticmethod
    def _attach(stack: list[list], value: Any) -> None:
        if not stack:
            return
        frame = stack[-1]
        if type(frame[1]) is list:
            frame[1].append(value)
        else:
            frame[1][frame[2]] = value

    def _runs(self, pos: int, array: list) -> int:
        """Inside an array where a value is expected: take whole runs of plain numbers (or
        of arrays of plain numbers), each followed by a comma, in one go. Returns the new
        position (unchanged when no run starts here)."""
        data = self.data
        c = self.peek(pos)
        run = _ROW_RUN.match(data, pos) if c == 0x5B else _NUMBER_RUN.match(data, pos)
        if run is None:
            return pos
        text = data[pos : run.end()].rstrip(b" \t\n\r")
        # The run ends with a comma: what json.loads needs to read it as a list is brackets.
        array.extend(json.loads(b"[" + text[:-1] + b"]"))
        return run.end()

    def _scalar(self, pos: int) -> tuple[Any, int]:
        """ParseValue for a string, literal or number at `pos`: (value, end)."""
        c = self.data[pos]
        if c == 0x22:
            return self._string(pos)
        for literal, value in ((b"null", None), (b"true", True), (b"false", False)):
            if c == literal[0]:
                matched = 1
                while matched < len(literal) and self.peek(pos + matched) == literal[matched]:
                    matched += 1
                if matched < len(literal):
                    raise JsonParseError(VALUE_INVALID, pos + matched)
                return value, pos + matched
        return self._number(pos)

    def _number(self, start: int) -> tuple[Any, int]:
        """ParseNumber: grammar errors at rapidjson's offsets, then the value."""
        peek = self.peek
        pos = start + (peek(start) == 0x2D)  # -
        c = peek(pos)
        if c == 0x30:
            pos += 1
        elif 0x31 <= c <= 0x39:
            pos = _DIGITS.match(self.data, pos + 1).end()
        elif c in (0x4E, 0x49):  # N, I: kParseNanAndInfFlag
            return self._nan_or_inf(start, pos)
        else:
            raise JsonParseError(VALUE_INVALID, pos)
        if peek(pos) == 0x2E:  # .
            pos += 1
            if not 0x30 <= peek(pos) <= 0x39:
                raise JsonParseError(NUMBER_MISS_FRACTION, pos)
            pos = _DIGITS.match(self.data, pos).end()
        if peek(pos) in (0x65, 0x45):  # e E
            pos += 1
            if peek(pos) in (0x2B, 0x2D):
                pos += 1
            if not 0x30 <= peek(pos) <= 0x39:
                raise JsonParseError(NUMBER_MISS_EXPONENT, pos)
            pos = _DIGITS.match(self.data, pos).end()
        value, too_big = _number(self.data[start:pos])
        if too_big:
            raise JsonParseError(NUMBER_TOO_BIG, start)
        return value, pos

    def _nan_or_inf(self, start: int, pos: int) -> tuple[float, int]:
        peek = self.peek
        minus = pos > start
        if peek(pos) == 0x4E:  # NaN
            for i, ch in enumerate(b"NaN"):
                if peek(pos + i) != ch:
                    raise JsonParseError(VALUE_INVALID, pos + i)
            return math.nan, pos + 3
        for i, ch in enumerate(b"Inf"):
            if peek(pos + i) != ch:
                raise JsonParseError(VALUE_INVALID, pos + i)
        pos += 3
        if peek(pos) == 0x69:  # "Inf" may go on as "Infinity", and then all of it
            for i, ch in enumerate(b"inity"):
                if peek(pos + i) != ch:
                    raise JsonParseError(VALUE_INVALID, pos + i)
            pos += 5
        return (-math.inf if minus else math.inf), pos

    def _string(self, start: int) -> tuple[str, int]:
        """ParseStringToStream: (decoded text, end). Bytes that are not UTF-8 are kept as
        they are (surrogate escapes: encode with errors='surrogateescape' to get them back)."""
        data = self.data
        plain = _PLAIN_STRING.match(data, start)
        if plain is not None:
            return plain.group(1).decode("utf-8", "surrogateescape"), plain.end()
        parts: list[str] = []
        pos = start + 1
        while True:
            special = _STRING_SPECIAL.search(data, pos)
            stop = special.start() if special is not None else self.end
            if stop > pos:
                parts.append(data[pos:stop].decode("utf-8", "surrogateescape"))
            pos = stop
            c = self.peek(pos)
            if c == 0x22:
                return "".join(parts), pos + 1
            if c == 0:
                raise JsonParseError(STRING_MISS_QUOTATION_MARK, pos)
            if c < 0x20:
                raise JsonParseError(STRING_INVALID_ENCODING, pos)
            escape = pos  # errors in an escape point at its backslash
            e = self.peek(pos + 1)
            if e in _ESCAPES:
                parts.append(_ESCAPES[e])
                pos += 2
                continue
            if e != 0x75:  # u
                raise JsonParseError(STRING_ESCAPE_INVALID, escape)
            code, pos = self._hex4(pos + 2, escape)
            if 0xD800 <= code <= 0xDFFF:
                if code > 0xDBFF or data[pos : pos + 2] != b"\\u":
                    raise JsonParseError(STRING_SURROGATE_INVALID, escape)
                low, pos = self._hex4(pos + 2, escape)
                if not 0xDC00 <= low <= 0xDFFF:
                    raise JsonParseError(STRING_SURROGATE_INVALID, escape)
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            parts.append(chr(code))

    def _hex4(self, pos: int, escape: int) -> tuple[int, int]:
        if _HEX.match(self.data, pos) is None:
            raise JsonParseError(STRING_ESCAPE_INVALID_HEX, escape)
        return int(self.data[pos : pos + 4], 16), pos + 4


# --------------------------------------------------------------------------------------------
# The writer of error quotes
# --------------------------------------------------------------------------------------------
_STRING_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n",
                   0x0D: "\\r", 0x09: "\\t"}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def write_string(text: str) -> str:
    """Writer::WriteString: quotes, \\" \\\\ and control characters escaped (\\u00XX for
    those without a short form); everything else, '/' included, as it is."""
    def escape(match: re.Match) -> str:
        c = ord(match.group())
        return _STRING_ESCAPES.get(c) or f"\\u{c:04X}"

    return '"' + _NEEDS_ESCAPE.sub(escape, text) + '"'


_REPR = re.compile(r"(\d+)(?:\.(\d+))?(?:e([+-]\d+))?")


def format_double(value: float) -> str | None:
    """Writer::WriteDouble: the shortest digits laid out as internal/dtoa.h's Prettify does
    (1.0, 0.001234, 12.34, 1e30, 1.234e-7; Python's repr gives the digits, where Grisu2 may
    rarely give one more). None for NaN and infinities, which a writer without
    kWriteNanAndInfFlag refuses."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    int_part, frac, exp = _REPR.fullmatch(repr(abs(value))).groups()
    frac = frac or ""
    digits = (int_part + frac).lstrip("0")
    k = int(exp or 0) - len(frac) + len(digits) - len(digits.rstrip("0"))  # value = digits * 10^k
    digits = digits.rstrip("0")
    length = len(digits)
    kk = length + k  # 10^(kk-1) <= value < 10^kk
    if 0 <= k and kk <= 21:
        text = digits + "0" * k + ".0"
    elif 0 < kk <= 21:
        text = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        text = "0." + "0" * -kk + digits
    elif length == 1:
        text = f"{digits}e{kk - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return ("-" if value < 0 else "") + text


def debug_string(value: Any, limit: int = DEBUG_STRING_BYTES) -> str:
    """JsonValueToDebugString: `value` as PrettyWriter writes it with kFormatSingleLineArray
    (objects one member a line, 4-space indent per level; arrays on one line), behind
    JsonWriterWithLimit: no event (a value, a key, a closing bracket) starts once `limit`
    bytes are written, so the one that crosses the limit is written whole and the output
    may end anywhere. Iterative: any depth, and a cost bounded by what is written.
    """
    out: list[str] = []
    size = 0
    stack: list[list] = []  # open containers: [iterator over items, is_array, events written]

    def put(text: str) -> None:
        nonlocal size
        out.append(text)
        size += len(text.encode("utf-8", "surrogateescape"))

    def prefix() -> None:
        """PrettyPrefix: what goes before a value or key at the current level."""
        if not stack:
            return
        frame = stack[-1]
        if frame[1]:
            if frame[2]:
                put(", ")
        else:
            put(("\n" if not frame[2] else ",\n" if frame[2] % 2 == 0 else ": "))
            if frame[2] % 2 == 0:
                put(" " * (4 * len(stack)))
        frame[2] += 1

    def start(item: Any) -> bool:
        """One value event (a scalar, or the opening of a container); False to stop."""
        if size >= limit:
            return False
        prefix()
        if isinstance(item, dict):
            put("{")
            stack.append([iter(item.items()), False, 0])
        elif isinstance(item, list):
            put("[")
            stack.append([iter(item), True, 0])
        elif item is None or item is True or item is False:
            put({None: "null", True: "true", False: "false"}[item])
        elif isinstance(item, str):
            put(write_string(item))
        elif isinstance(item, int):
            put(str(item))
        else:
            text = format_double(float(item))
            if text is None:
                return False  # a writer without kWriteNanAndInfFlag refuses NaN/Inf
            put(text)
        return True

    if not start(value):
        return "".join(out)
    while stack:
        frame = stack[-1]
        item = next(frame[0], _END)
        if size >= limit:
            break
        if item is _END:
            stack.pop()
            if frame[1]:
                put("]")
            else:
                if frame[2]:
                    put("\n" + " " * (4 * len(stack)))
                put("}")
        elif frame[1]:
            if not start(item):
                break
        else:
            key, member = item
            prefix()
            put(write_string(key))
            if not start(member):
                break
    return "".join(out)


_END = object()
