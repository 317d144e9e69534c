"""A picture of one handwritten digit into MNIST form, in core TensorFlow ops.

This is the second implementation of the one specification in mobile/preprocess.py's
docstring (the first is that module's numpy + Pillow code for the Raspberry Pi); each
function below names the step it implements and uses the constants defined there. It runs
inside the SavedModel's `serving_bytes` signature, so TensorFlow Serving itself turns the
pictures clients send into MNIST form: only core ops that TF Serving's standard build has
(image decoders, string ops, pooling, segment reductions, while loops); no py_function, no
tensorflow-addons or tensorflow-io.

Bad pictures fail the request with INVALID_ARGUMENT (REST 400) whose message says why, the same
words as the Pi's PictureError: tf.debugging.Assert ops guard each step, and the decoders' own
errors (truncated or corrupt data) are INVALID_ARGUMENT too.

    picture_to_mnist(image_bytes)   scalar string -> uint8 [28, 28]
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from mobile import preprocess as spec


class _Lazy:
    """A module imported on first use: importing this file must not load TensorFlow
    (tests/test_dependencies.py); building the graph does."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


tf = _Lazy("tensorflow")
# Bytes of the file the header and EXIF parsers look at (APP1 Exif is at most 64 KiB and
# comes first, after at most a few other segments).
EXIF_SEARCH_BYTES = spec.EXIF_SEARCH_BYTES
# Components followed by the keep rule of step 9 (the Pi's loop has the same bound).
MAX_COMPONENTS = spec.MAX_COMPONENTS
# Doublings a dynamic running max/min may need: background windows are at most
# max(7, round(BACKGROUND_WINDOW x WORK_SIDE) | 1) = 129 px, 65 px at half size.
MAX_DOUBLINGS = 7


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _guard(value, condition, message):
    """`value`, after asserting `condition`; otherwise INVALID_ARGUMENT with `message`."""
    check = tf.debugging.Assert(condition, [message], summarize=1, name="picture_check")
    with tf.control_dependencies([check]):
        return tf.identity(value)


def _decimals(x, places: int):
    """A float32 scalar as text with `places` decimals (as Python's f"{x:.Nf}")."""
    scaled = tf.cast(tf.round(tf.cast(x, tf.float64) * 10**places), tf.int64)
    whole = tf.strings.as_string(scaled // 10**places)
    if places == 0:
        return whole
    return tf.strings.join([whole, ".", tf.strings.as_string(scaled % 10**places, width=places, fill="0")])


# --------------------------------------------------------------------------------------------
# 1. Header
# --------------------------------------------------------------------------------------------
def _bytes(data, count: int):
    """The first `count` bytes of a string as int64 [count], zero-padded."""
    raw = tf.io.decode_raw(tf.strings.substr(data, 0, count), tf.uint8)
    raw = tf.pad(raw, [[0, count - tf.shape(raw)[0]]])
    return tf.cast(raw, tf.int64)


def _matches(raw, offset: int, signature: bytes):
    return tf.reduce_all(tf.equal(raw[offset : offset + len(signature)], tf.constant(list(signature), tf.int64)))


def read_header(data):
    """Step 1: (format code int32: index in spec.FORMATS, width int64, height int64).

    Asserts (INVALID_ARGUMENT) what mobile.preprocess.read_header raises for.
    """
    raw = _bytes(data, 34)
    length = tf.strings.length(data)
    is_png = _matches(raw, 0, b"\x89PNG\r\n\x1a\n")
    is_jpeg = _matches(raw, 0, b"\xff\xd8\xff")
    is_bmp = _matches(raw, 0, b"BM")
    is_webp = _matches(raw, 0, b"RIFF") & _matches(raw, 8, b"WEBP")
    is_gif = _matches(raw, 0, b"GIF87a") | _matches(raw, 0, b"GIF89a")
    animated = is_webp & _matches(raw, 12, b"VP8X") & (length > 20) & (tf.bitwise.bitwise_and(raw[20], 2) > 0)
    start = tf.cond(
        length > 0,
        lambda: tf.strings.reduce_join(tf.gather(tf.constant([f"{i:02x}" for i in range(256)]), raw[: tf.minimum(length, 8)]), separator=" "),
        lambda: tf.constant("nothing"),
    )
    ok = is_png | is_jpeg | is_bmp | is_webp
    message = tf.strings.join([
        "not an image (expected PNG, JPEG, BMP or WebP; the data starts with ", start, ")"])
    message = tf.where(is_gif, tf.constant(
        "GIF pictures are not accepted (TensorFlow's GIF decoder decodes every frame of an "
        "animation, which no header bounds): send PNG or JPEG"), message)
    message = tf.where(animated, tf.constant(
        "animated WebP pictures are not accepted: send one frame as PNG or JPEG"), message)
    code = tf.where(is_png, 0, tf.where(is_jpeg, 1, tf.where(is_bmp, 2, 3)))
    code = _guard(code, ok & ~animated, message)

    def u16le(i):
        return raw[i] + raw[i + 1] * 256

    def u32le(i):
        return u16le(i) + u16le(i + 2) * 65536

    def u32be(i):
        return raw[i] * 2**24 + raw[i + 1] * 2**16 + raw[i + 2] * 2**8 + raw[i + 3]

    def i32le(i):
        value = u32le(i)
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    def png():
        return tf.stack([u32be(16), u32be(20)]), tf.constant(24, tf.int32)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int32)
        return tf.cast(tf.stack([shape[1], shape[0]]), tf.int64), tf.constant(0, tf.int32)

    def bmp():
        core = tf.equal(u32le(14), 12)
        size = tf.where(core, tf.stack([u16le(18), u16le(20)]), tf.stack([i32le(18), i32le(22)]))
        return size, tf.constant(34, tf.int32)

    def webp():
        vp8x = _matches(raw, 12, b"VP8X")
        vp8l = _matches(raw, 12, b"VP8L")
        x = tf.stack([1 + raw[24] + raw[25] * 256 + raw[26] * 65536, 1 + raw[27] + raw[28] * 256 + raw[29] * 65536])
        bits = u32le(21)
        lossless = tf.stack([1 + tf.bitwise.bitwise_and(bits, 0x3FFF),
                             1 + tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 14), 0x3FFF)])
        lossy = tf.stack([tf.bitwise.bitwise_and(u16le(26), 0x3FFF), tf.bitwise.bitwise_and(u16le(28), 0x3FFF)])
        return tf.where(vp8x, x, tf.where(vp8l, lossless, lossy)), tf.constant(30, tf.int32)

    size, needed = tf.switch_case(code, [png, jpeg, bmp, webp])
    name = tf.gather(tf.constant(["PNG", "JPEG", "BMP", "WEBP"]), code)
    size = _guard(size, length >= needed, tf.strings.join([
        "corrupt or truncated image (its ", name, " header is cut short)"]))
    width, height = size[0], size[1]
    size = _guard(size, (width > 0) & (height > 0), tf.strings.format(
        "empty picture ({}x{} pixels)", [width, height]))
    limit = tf.where(tf.equal(code, 1), tf.constant(spec.MAX_JPEG_PIXELS, tf.int64), tf.constant(spec.MAX_PIXELS, tf.int64))
    limit_text = tf.where(tf.equal(code, 1), f"{spec.MAX_JPEG_PIXELS / 1e6:.1f}", f"{spec.MAX_PIXELS / 1e6:.1f}")
    size = _guard(size, size[0] * size[1] <= limit, tf.strings.join([
        tf.strings.format("picture too large: {}x{} pixels declared, over the ", [width, height]),
        limit_text, "-megapixel limit for ", name, " (refused before decoding; downscale it)"]))
    # A BMP that TensorFlow's BMP decoder reads right (= mobile.preprocess._check_bmp).
    header_size = u32le(14)
    core = header_size < 40
    bits = tf.where(core, u16le(24), u16le(28))
    compression = tf.where(core, tf.constant(0, tf.int64), u32le(30))
    readable = (~core & ((bits == 8) | (bits == 24) | (bits == 32))
                & ((compression == 0) | ((compression == 3) & (bits == 32))))
    size = _guard(size, ~tf.equal(code, 2) | readable, tf.strings.format(
        "BMP not accepted: {} bits per pixel, compression {}, a {}-byte header (accepted: 8, 24 or "
        "32 bits per pixel, uncompressed, a header of 40 bytes or more): send PNG or JPEG",
        [bits, compression, header_size]))
    return code, size[0], size[1]


# --------------------------------------------------------------------------------------------
# 2. Decode (+ EXIF orientation)
# --------------------------------------------------------------------------------------------
def jpeg_scale(width, height):
    """Step 2: the DCT scale denominator (8, 4, 2 or 1) for a JPEG of this size (int64)."""
    long_side = tf.maximum(width, height)
    scale = tf.constant(1, tf.int64)
    for r in (2, 4, 8):  # the largest r that keeps ceil(L / r) >= DECODE_SIDE
        scale = tf.where((long_side + r - 1) // r >= spec.DECODE_SIDE, tf.constant(r, tf.int64), scale)
    return scale


def jpeg_orientation(data):
    """Step 2: the EXIF orientation (int64 1-8) of JPEG bytes, 1 when there is none.

    Mirrors mobile.preprocess.jpeg_orientation: the APPn segments right after SOI (at most
    JPEG_MAX_SEGMENTS, in the first EXIF_SEARCH_BYTES), the first APP1 "Exif\\0\\0", tag 0x0112
    of IFD0.
    """
    size = EXIF_SEARCH_BYTES
    raw = tf.io.decode_raw(tf.strings.substr(data, 0, size), tf.uint8)
    raw = tf.pad(raw, [[0, size + 16 - tf.shape(raw)[0]]])  # reads past the end see zeros
    n = tf.minimum(tf.cast(tf.strings.length(data), tf.int64), size)
    exif = tf.constant(list(b"Exif\x00\x00"), tf.int64)

    def at(i):
        return tf.cast(tf.gather(raw, tf.clip_by_value(i, 0, size + 15)), tf.int64)

    def segment(i, pos, found, start, end, done):
        marker = at(pos + 1)
        stop = (pos + 4 > n) | tf.not_equal(at(pos), 0xFF) | (marker < 0xE0) | (marker > 0xEF)
        length = at(pos + 2) * 256 + at(pos + 3)
        head = at(pos + 4 + tf.range(6, dtype=tf.int64))
        is_exif = ~stop & tf.equal(marker, 0xE1) & tf.reduce_all(tf.equal(head, exif))
        return (i + 1, pos + 2 + length, is_exif, pos + 10, tf.minimum(pos + 2 + length, n), stop | is_exif)

    zero = tf.constant(0, tf.int64)
    _, _, found, start, end, _ = tf.while_loop(
        lambda i, pos, found, start, end, done: (i < spec.JPEG_MAX_SEGMENTS) & ~done,
        segment, [tf.constant(0, tf.int32), tf.constant(2, tf.int64), tf.constant(False), zero, zero, tf.constant(False)],
    )
    return tf.cond(found, lambda: _ifd_orientation(at, start, end), lambda: tf.constant(1, tf.int64))


def _ifd_orientation(at, start, end):
    """Tag 0x0112 of the TIFF IFD0 at bytes [start, end) (`at`: byte lookup), 1 if absent."""
    little = tf.equal(at(start), 0x49) & tf.equal(at(start + 1), 0x49)
    big = tf.equal(at(start), 0x4D) & tf.equal(at(start + 1), 0x4D)

    def u16(i):
        return tf.where(little, at(i) + at(i + 1) * 256, at(i) * 256 + at(i + 1))

    def u32(i):
        return tf.where(little, u16(i) + u16(i + 2) * 65536, u16(i) * 65536 + u16(i + 2))

    ifd = start + u32(start + 4)
    count = tf.minimum(u16(ifd), spec.EXIF_MAX_ENTRIES)
    entries = ifd + 2 + 12 * tf.range(spec.EXIF_MAX_ENTRIES, dtype=tf.int64)
    valid = (tf.range(spec.EXIF_MAX_ENTRIES, dtype=tf.int64) < count) & (entries + 12 <= end)
    tags = tf.where(little, at(entries) + at(entries + 1) * 256, at(entries) * 256 + at(entries + 1))
    hit = valid & tf.equal(tags, 0x0112)
    first = tf.argmax(tf.cast(hit, tf.int32), output_type=tf.int64)
    value_at = tf.gather(entries, first) + 8
    value = u16(value_at)
    usable = (little | big) & (end - start >= 8) & (ifd + 2 <= end) & tf.reduce_any(hit)
    return tf.where(usable & (value >= 1) & (value <= 8), value, tf.constant(1, tf.int64))


def _orient(v, orientation):
    """Apply an EXIF orientation to grey [H, W] as Pillow's transposes do (mobile/preprocess.py)."""
    def flip_lr():
        return v[:, ::-1]

    def rot180():
        return v[::-1, ::-1]

    def flip_tb():
        return v[::-1]

    def transpose():
        return tf.transpose(v)

    def rot270():  # Pillow's ROTATE_270: 90 degrees clockwise
        return tf.transpose(v)[:, ::-1]

    def transverse():
        return tf.transpose(v[::-1, ::-1])

    def rot90():  # Pillow's ROTATE_90: 90 degrees counter-clockwise
        return tf.transpose(v)[::-1]

    return tf.switch_case(tf.cast(orientation - 1, tf.int32),
                          [lambda: v, flip_lr, rot180, flip_tb, transpose, rot270, transverse, rot90])


def decode(data, code, width, height):
    """Steps 2-3: grey v float32 [H, W] in 0..1 (reduced by blocks when large)."""
    def jpeg():
        r = jpeg_scale(width, height)
        # libjpeg gives no grey of a CMYK (or YCCK) JPEG: its RGB, then Pillow's CMYK -> L.
        four = tf.equal(tf.io.extract_jpeg_shape(data)[2], 4)

        def at(ratio):
            def luma():
                return tf.cast(tf.io.decode_jpeg(data, channels=1, ratio=ratio, dct_method="INTEGER_ACCURATE")[:, :, 0], tf.int32)

            def cmyk():
                rgb = tf.cast(tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"), tf.int32)
                return tf.bitwise.right_shift(rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 32768, 16)

            return lambda: tf.cond(four, cmyk, luma)

        grey = tf.switch_case(tf.cast(tf.math.log(tf.cast(r, tf.float32)) / math.log(2.0) + 0.5, tf.int32),
                              [at(1), at(2), at(4), at(8)])
        v = tf.cast(grey, tf.float32) / 255.0
        return _orient(v, jpeg_orientation(data))

    # PNG and WebP decode with their own channels, then become RGBA here: decode_png(channels=4)
    # fills the alpha of 1-, 2- and 4-bit pictures with 1, 3 or 15 instead of 255, and the
    # WebP decoder refuses 4 channels for a picture without alpha.
    def png():
        return grey_from_rgba(as_rgba(tf.io.decode_png(data, channels=0)))

    def bmp():
        pixels = tf.io.decode_bmp(data, channels=0)  # 8-bit: the colour table's indices
        rgb = tf.cond(tf.equal(tf.shape(pixels)[2], 1), lambda: _bmp_colours(data, pixels[:, :, 0]),
                      lambda: pixels[:, :, :3])
        return grey_from_rgba(as_rgba(rgb))

    def webp():
        return grey_from_rgba(as_rgba(tf.io.decode_image(data, channels=0, expand_animations=False)))

    v = tf.switch_case(code, [png, jpeg, bmp, webp])
    v.set_shape([None, None])
    return reduce_grey(v)


def _ring(values):
    return tf.concat([values[0], values[-1], values[:, 0], values[:, -1]], 0)


def as_rgba(pixels):
    """uint8 [H, W, 1|2|3|4] as a decoder gives it (grey, grey + alpha, RGB, RGBA) -> uint8
    [H, W, 4]: grey repeated into R, G and B, alpha 255 where there is none (as Pillow's
    convert("RGBA"))."""
    channels = tf.shape(pixels)[2]
    opaque = tf.fill(tf.concat([tf.shape(pixels)[:2], [1]], 0), tf.constant(255, tf.uint8))
    grey = pixels[:, :, :1]
    rgba = tf.switch_case(channels - 1, [
        lambda: tf.concat([grey, grey, grey, opaque], -1),
        lambda: tf.concat([grey, grey, grey, pixels[:, :, 1:2]], -1),
        lambda: tf.concat([pixels[:, :, :3], opaque], -1),
        lambda: pixels[:, :, :4],
    ])
    rgba.set_shape([None, None, 4])
    return rgba


def _bmp_colours(data, indices):
    """An 8-bit BMP's pixels uint8 [H, W] (indices) -> RGB uint8 [H, W, 3] through its colour
    table: after the info header (its size at offset 14), biClrUsed entries (offset 46; 0 =
    256) of B, G, R, reserved."""
    head = _bytes(data, 50)
    header_size = head[14] + head[15] * 256 + head[16] * 65536 + head[17] * 2**24
    used = head[46] + head[47] * 256 + head[48] * 65536 + head[49] * 2**24
    count = tf.where((used == 0) | (used > 256), tf.constant(256, tf.int64), used)
    table = tf.io.decode_raw(tf.strings.substr(data, 14 + header_size, 4 * count), tf.uint8)
    table = tf.reshape(tf.pad(table, [[0, 1024 - tf.shape(table)[0]]]), [256, 4])
    return tf.gather(tf.stack([table[:, 2], table[:, 1], table[:, 0]], 1), tf.cast(indices, tf.int32))


def grey_from_rgba(pixels):
    """Step 3: uint8 [H, W, 4] -> grey v float32 [H, W] (before the block reduction)."""
    rgb = tf.cast(pixels[:, :, :3], tf.float32)
    v = (0.299 * rgb[:, :, 0] + 0.587 * rgb[:, :, 1] + 0.114 * rgb[:, :, 2]) / 255.0
    alpha = pixels[:, :, 3]
    a = tf.cast(alpha, tf.float32) / 255.0
    ring = _ring(alpha)
    transparent = 2 * tf.reduce_sum(tf.cast(ring < 128, tf.int32)) > tf.size(ring)
    return tf.where(transparent, 1.0 - a, a * v + (1.0 - a))


def reduce_grey(v):
    """End of step 3: block-average v [H, W] by k = floor(L / DECODE_SIDE) when k >= 2."""
    h, w = tf.shape(v)[0], tf.shape(v)[1]
    k = tf.maximum(h, w) // spec.DECODE_SIDE
    hk, wk = tf.maximum(1, h // tf.maximum(k, 1)), tf.maximum(1, w // tf.maximum(k, 1))

    def blocks():
        cut = v[: hk * k, : wk * k]
        return tf.reduce_mean(tf.reshape(cut, [hk, k, wk, k]), axis=[1, 3])

    def strip():
        return resize(v, hk, wk)

    reduced = tf.cond(k < 2, lambda: v, lambda: tf.cond((h < k) | (w < k), strip, blocks))
    reduced.set_shape([None, None])
    return reduced


# --------------------------------------------------------------------------------------------
# Primitives (twins of mobile/preprocess.py's)
# --------------------------------------------------------------------------------------------
def resize(values, out_h, out_w):
    """float32 [H, W] -> [out_h, out_w], triangle filter (= mobile.preprocess._resize)."""
    out = tf.image.resize(values[:, :, None], tf.stack([out_h, out_w]), method="bilinear", antialias=True)
    return out[:, :, 0]


def _shift_max3(values, axis: int, fill):
    """Max over the 3 pixels centred on each one along `axis` (past the border: `fill`)."""
    pad = [[1, 1], [0, 0]] if axis == 0 else [[0, 0], [1, 1]]
    p = tf.pad(values, pad, constant_values=fill)
    if axis == 0:
        return tf.maximum(tf.maximum(p[:-2], p[1:-1]), p[2:])
    return tf.maximum(tf.maximum(p[:, :-2], p[:, 1:-1]), p[:, 2:])


def max3(values, fill, shape: str = "square"):
    """3x3 maximum (shape "square") or over the 5-pixel cross ("cross"), borders clipped
    (`fill`: the value that never wins, -inf or 0)."""
    rows = _shift_max3(values, 0, fill)
    if shape == "square":
        return _shift_max3(rows, 1, fill)
    return tf.maximum(rows, _shift_max3(values, 1, fill))


def box3(values):
    """Mean over the 3x3 window, windows clipped at the borders: separable sums of shifted
    copies, divided by how many pixels each window holds."""
    def sums(x, axis):
        pad = [[1, 1], [0, 0]] if axis == 0 else [[0, 0], [1, 1]]
        p = tf.pad(x, pad)
        return (p[:-2] + p[1:-1] + p[2:]) if axis == 0 else (p[:, :-2] + p[:, 1:-1] + p[:, 2:])

    def counts(n):
        inside = tf.ones([n], tf.float32)
        return sums(inside[:, None], 0)[:, 0]

    h, w = tf.shape(values)[0], tf.shape(values)[1]
    return sums(sums(values, 0), 1) / (counts(h)[:, None] * counts(w)[None, :])


def blocks2(values, op: str):
    """2x2 block min / max / mean (the last odd row and column dropped): 2x2 pooling with
    stride 2 (the pooling kernels are several times faster than a reduction over a
    [h, 2, w, 2] reshape; the same values)."""
    x = values[None, :, :, None]
    if op == "min":
        return -tf.nn.max_pool2d(-x, 2, 2, "VALID")[0, :, :, 0]
    pool = {"max": tf.nn.max_pool2d, "mean": tf.nn.avg_pool2d}[op]
    return pool(x, 2, 2, "VALID")[0, :, :, 0]


def _edge_pad(values, pad):
    """Pad [H, W] by `pad` pixels of edge replication (int32 scalar, may be a tensor)."""
    h, w = tf.shape(values)[0], tf.shape(values)[1]
    rows = tf.clip_by_value(tf.range(-pad, h + pad), 0, h - 1)
    cols = tf.clip_by_value(tf.range(-pad, w + pad), 0, w - 1)
    return tf.gather(tf.gather(values, rows, axis=0), cols, axis=1)


def both_closings(values, size, dark_ink):
    """(edge-padded closing, clipped-window closing) of [H, W] with window `size` (int32
    tensor), dark ink: max then min; light ink: min then max (= mobile.preprocess._closing
    with pad_edges True and False), computed together on one stacked frame.

    The frame is padded by size // 2: channel 0 with edge replication, channel 1 with the
    value that never wins the coming pass (clipped windows), reset between the passes.
    """
    pad = size // 2
    h, w = tf.shape(values)[0], tf.shape(values)[1]
    edge = _edge_pad(values, pad)
    inside = tf.pad(tf.ones_like(values, tf.bool), tf.stack([[pad, pad], [pad, pad]]))
    sign = tf.where(dark_ink, 1.0, -1.0)  # light ink: the same passes on -values
    edge = sign * edge

    def neutral(x, op):
        return tf.stack([x[0], tf.where(inside, x[1], -math.inf if op == "max" else math.inf)])

    frame = neutral(tf.stack([edge, edge]), "max")
    frame = _running_dynamic3(frame, size, "max")
    frame = _running_dynamic3(neutral(frame, "min"), size, "min")
    out = sign * frame[:, pad : pad + h, pad : pad + w]
    return out[0], out[1]


def _running_dynamic3(values, size, op: str):
    """Running max/min of odd `size` (int32 tensor) along axes 1 and 2 of [C, H, W], windows
    clipped.

    Doubling (as mobile.preprocess._running): level_j[i] = extreme over [i, i + 2**j) by
    log2(size) rounds of a while loop, each level one shorter by its span; two windows of the
    largest span 2**j <= size then cover each window of `size`. Only the rounds this size
    needs run.
    """
    extreme = tf.maximum if op == "max" else tf.minimum
    fill = -math.inf if op == "max" else math.inf
    half = size // 2
    out = values
    for axis in (1, 2):
        n = tf.shape(out)[axis]
        paddings = tf.stack([[0, 0], [half, half], [0, 0]]) if axis == 1 else tf.stack([[0, 0], [0, 0], [half, half]])

        def double(span, level, axis=axis):
            if axis == 1:
                return span * 2, extreme(level[:, :-span], level[:, span:])
            return span * 2, extreme(level[:, :, :-span], level[:, :, span:])

        span, level = tf.while_loop(
            lambda span, level: span * 2 <= size, double,
            [tf.constant(1), tf.pad(out, paddings, constant_values=fill)],
            shape_invariants=[tf.TensorShape([]), tf.TensorShape([values.shape[0], None, None])],
            maximum_iterations=MAX_DOUBLINGS)
        if axis == 1:
            out = extreme(level[:, :n], level[:, size - span : size - span + n])
        else:
            out = extreme(level[:, :, :n], level[:, :, size - span : size - span + n])
    return out


def top_hats(log_dark, log_light):
    """Step 6's black top-hats of `log_dark` and white top-hats of `log_light` for every
    window in POLARITY_WINDOWS: float32 [windows, 2, H, W] (black, white).

    The passes are mobile.preprocess.top_hat_ladder's, on tensors; the stack's edge
    replication is a gather of clipped row and column indices (shapes are dynamic here).
    """
    pad = spec.TOP_HAT_PAD
    h, w = tf.shape(log_dark)[0], tf.shape(log_dark)[1]
    stack = tf.stack([log_dark, -log_light])  # [2, H, W]
    rows = tf.clip_by_value(tf.range(-pad, h + pad), 0, h - 1)
    cols = tf.clip_by_value(tf.range(-pad, w + pad), 0, w - 1)
    padded = tf.gather(tf.gather(stack, rows, axis=1), cols, axis=2)
    return tf.stack(spec.top_hat_ladder(stack, padded, h, w, tf.maximum, tf.minimum))


def quantile(values, q, lo: float, hi: float, weights=None):
    """The q quantile(s) of `values` from a QUANTILE_BINS-bin histogram over [lo, hi]
    (= mobile.preprocess._quantile). `q` a float gives a scalar, a tuple a list of scalars
    (one histogram for all)."""
    bins = spec.QUANTILE_BINS
    scale = tf.constant(bins / (hi - lo), tf.float32)
    flat = tf.reshape(values, [-1])
    if weights is None and math.log2(hi - lo).is_integer():
        # HistogramFixedWidth bins by (x - lo) / ((hi - lo) / bins), the same float32 index
        # as (x - lo) * scale when hi - lo is a power of two, in a third of the time.
        counts = tf.cast(tf.histogram_fixed_width(flat, [lo, hi], nbins=bins), tf.float32)
    else:
        index = tf.cast(tf.clip_by_value(tf.floor((flat - lo) * scale), 0, bins - 1), tf.int32)
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(flat) if weights is None else tf.reshape(tf.cast(weights, tf.float32), [-1]), index, bins)
    cumulative = tf.cumsum(counts)
    qs = (q,) if isinstance(q, float) else tuple(q)
    targets = tf.constant(qs, tf.float32)[:, None] * cumulative[-1]
    k = tf.argmax(tf.cast(cumulative[None, :] >= targets, tf.int32), axis=1, output_type=tf.int32)
    found = lo + (tf.cast(k, tf.float32) + 0.5) / scale
    return found[0] if isinstance(q, float) else tf.unstack(found, len(qs))


def median_mad(values, lo: float, hi: float):
    median = quantile(values, 0.5, lo, hi)
    return median, 1.4826 * quantile(tf.abs(values - median), 0.5, 0.0, hi - lo)


def dilate(values, steps):
    """Grey dilation by an octagon: `steps` passes of a 3x3 max, the square first, then the
    cross, alternately (borders clipped). `steps` a Python int unrolls; a tensor loops."""
    fill = tf.constant(-math.inf if values.dtype == tf.float32 else 0, values.dtype)
    if isinstance(steps, int):
        for i in range(steps):
            values = max3(values, fill, "square" if i % 2 == 0 else "cross")
        return values

    def step(i, x):
        return i + 1, tf.cond(tf.equal(i % 2, 0), lambda: max3(x, fill, "square"), lambda: max3(x, fill, "cross"))

    _, out = tf.while_loop(lambda i, x: i < steps, step, [tf.constant(0), values],
                           shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None])])
    return out


# --------------------------------------------------------------------------------------------
# 4-13. The steps
# --------------------------------------------------------------------------------------------
def looks_like_mnist(grey):
    """Step 4 on a uint8 [28, 28] picture (bool scalar)."""
    values = tf.cast(grey, tf.float32)
    inner = tf.pad(tf.ones([spec.MNIST_SIZE - 4, spec.MNIST_SIZE - 4], tf.bool), [[2, 2], [2, 2]])
    ring_mean = tf.reduce_mean(tf.boolean_mask(values, ~inner))
    ordered = tf.sort(tf.reshape(values, [-1]))
    middle = spec.MNIST_SIZE * spec.MNIST_SIZE // 2
    median = (ordered[middle - 1] + ordered[middle]) / 2
    mass = tf.reduce_sum(values)
    index = tf.range(spec.MNIST_SIZE, dtype=tf.float32)
    com_y = tf.reduce_sum(tf.reduce_sum(values, 1) * index) / tf.maximum(mass, 1e-6)
    com_x = tf.reduce_sum(tf.reduce_sum(values, 0) * index) / tf.maximum(mass, 1e-6)
    centre = spec.MNIST_SIZE / 2
    return ((ring_mean <= 32) & (median <= 32) & (tf.reduce_max(values) >= 128)
            & (tf.abs(com_y - centre) <= 2.0) & (tf.abs(com_x - centre) <= 2.0))


def working_copy(v):
    """Step 5."""
    h, w = tf.shape(v)[0], tf.shape(v)[1]
    long_side = tf.maximum(h, w)

    def shrink():
        scale = spec.WORK_SIDE / tf.cast(long_side, tf.float64)

        def side(n):
            return tf.maximum(1, tf.cast(tf.round(tf.cast(n, tf.float64) * scale), tf.int32))

        return resize(v, side(h), side(w))

    def enlarge():
        factor = (spec.MIN_WORK_SIDE + long_side - 1) // long_side
        return resize(v, h * factor, w * factor)

    out = tf.cond(long_side > spec.WORK_SIDE, shrink,
                  lambda: tf.cond(long_side < spec.MIN_WORK_SIDE, enlarge, lambda: v))
    out.set_shape([None, None])
    return out


def polarity_and_window(work):
    """Step 6: (dark_ink bool, background window int32, halved bool)."""
    h, w = tf.shape(work)[0], tf.shape(work)[1]
    long_side = tf.maximum(h, w)
    halved = long_side > spec.POLARITY_HALF_ABOVE

    def copies():
        return tf.cond(halved,
                       lambda: (blocks2(work, "min"), blocks2(work, "max"), blocks2(work, "mean")),
                       lambda: (work, work, work))

    dark_copy, light_copy, mean_copy = copies()
    log_dark, log_light, log_mean = (tf.math.log(c + spec.POLARITY_LOG_OFFSET) for c in (dark_copy, light_copy, mean_copy))
    _, noise = median_mad(log_mean - box3(log_mean), -1.0, 1.0)
    threshold = tf.maximum(4.0 * noise, spec.POLARITY_MIN_CONTRAST)
    energy = tf.reduce_sum(tf.maximum(top_hats(log_dark, log_light) - threshold, 0.0), axis=[2, 3])
    energies = {True: energy[:, 0], False: energy[:, 1]}  # [windows] each
    border, border_clear = _border(work)
    dark_ink = _decide_polarity(energies, border, border_clear)
    top = tf.maximum(7, tf.bitwise.bitwise_or(tf.cast(tf.round(spec.BACKGROUND_WINDOW * tf.cast(long_side, tf.float64)), tf.int32), 1))
    factor = tf.where(halved, 2.0, 1.0)

    def window(dark):
        ink_energy = tf.where(dark, energies[True], energies[False])
        first = tf.argmax(tf.cast(ink_energy >= 0.85 * ink_energy[-1], tf.int32), output_type=tf.int32)
        stroke = tf.gather(tf.constant(spec.POLARITY_WINDOWS, tf.int32), first)
        return tf.bitwise.bitwise_or(tf.cast(tf.round(spec.STROKE_WINDOW_MARGIN * tf.cast(stroke, tf.float64)
                                                      * tf.cast(factor, tf.float64)), tf.int32), 1)

    extreme = (border > 0.85) | (border < 0.15)
    dark_ink = tf.where((window(dark_ink) >= top) & extreme, border > 0.85, dark_ink)
    return dark_ink, tf.minimum(tf.maximum(window(dark_ink), 7), top), halved


def _border(work):
    """(border position, clear) of step 6 (= mobile.preprocess._border)."""
    ring = _ring(work)
    low, high = quantile(work, (0.01, 0.99), 0.0, 1.0)
    span = tf.maximum(high - low, 1e-6)
    ring_low, ring_median, ring_high = quantile(ring, (0.1, 0.5, 0.9), 0.0, 1.0)
    border = (ring_median - low) / span
    return border, ((ring_high - ring_low) / span < 0.25) & ((border > 0.7) | (border < 0.3))


def _decide_polarity(energies, border, border_clear):
    """The decision of step 6 (= mobile.preprocess._decide_polarity), bool scalar."""
    final = {p: energies[p][-1] for p in (True, False)}
    largest = tf.maximum(final[True], final[False])
    rise = {p: tf.argmax(tf.cast(energies[p] >= 0.5 * final[p], tf.int32), output_type=tf.int32) for p in (True, False)}
    competes = {p: final[p] >= 0.1 * largest for p in (True, False)}
    big = tf.constant(len(spec.POLARITY_WINDOWS), tf.int32)
    i = tf.minimum(tf.where(competes[True], rise[True], big), tf.where(competes[False], rise[False], big))
    floor = 0.05 * largest + 1e-3
    ratio = (tf.gather(energies[True], i) + floor) / (tf.gather(energies[False], i) + floor)
    only_one = tf.not_equal(competes[True], competes[False])
    apart = tf.abs(rise[True] - rise[False]) >= 2
    decisive = (tf.abs(tf.math.log(ratio)) > math.log(1.2))
    return tf.where(only_one, competes[True],
           tf.where(apart, rise[True] < rise[False],
           tf.where(border_clear & (ratio > 0.1) & (ratio < 10), border > 0.7,
           tf.where(decisive, ratio > 1, border >= 0.5))))


def background(work, dark_ink, size, halved):
    """Step 7."""
    base = box3(work)

    def estimate(base, size):
        padded, clipped = both_closings(base, size, dark_ink)
        cut = tf.where(dark_ink, padded < spec.BORDER_INK_RATIO * clipped,
                       1.0 - padded < spec.BORDER_INK_RATIO * (1.0 - clipped))
        return tf.where(cut, clipped, padded)

    def half():
        paper = estimate(blocks2(base, "mean"), tf.bitwise.bitwise_or(size // 2, 1))
        return resize(paper, tf.shape(work)[0], tf.shape(work)[1])

    out = tf.cond(halved, half, lambda: estimate(base, size))
    out.set_shape([None, None])
    return out


def ink_strength(work, dark_ink, size, halved):
    """Steps 7-8: (ink float32 [h, w] in 0..1, step 9's mask bool [h, w], computed once: step
    8's second try needs it), asserting a picture that is not blank."""
    paper = background(work, dark_ink, size, halved)
    strength = tf.where(dark_ink, (paper - work) / tf.maximum(paper, 0.05),
                        (work - paper) / tf.maximum(1.0 - paper, 0.05))
    smooth = box3(strength)
    ring = _ring(smooth)
    zero, noise = median_mad(smooth, -1.0, 1.0)
    ring_zero, ring_noise = median_mad(ring, -1.0, 1.0)
    use_ring = ring_zero < zero
    zero = tf.where(use_ring, ring_zero, zero)
    noise = tf.where(use_ring, ring_noise, noise)
    ink, noise_out, stands_out, peak = _stretch(strength, smooth, zero, noise)
    mask = ink_mask(ink, noise_out)
    masked = stands_out & tf.reduce_any(mask)

    def second_try():
        # A tight crop whose ink covers much of its border: the ring's paper side.
        side_zero, side_noise, usable = ring_paper_side(ring)
        ink2, noise2, stands_out2, _ = _stretch(strength, smooth, side_zero, side_noise)
        mask2 = ink_mask(ink2, noise2)
        use = usable & stands_out2 & tf.reduce_any(mask2)
        return tf.where(use, ink2, ink), tf.where(use, mask2, mask), use

    ink, mask, second = tf.cond(masked, lambda: (ink, mask, tf.constant(False)), second_try)
    ink.set_shape([None, None])
    mask.set_shape([None, None])
    blank = ~(stands_out | second)
    ink = _guard(ink, ~blank, tf.strings.join([
        "empty picture: no ink found (strongest contrast ", _decimals(tf.maximum(peak, 0.0), 3),
        f", need {spec.MIN_CONTRAST})"]))
    return ink, mask


def _stretch(strength, smooth, zero, noise):
    """Step 8 with a paper level `zero` and its noise: (ink float32 [h, w], noise', whether
    ink stands out, the peak of smooth - zero) (= mobile.preprocess._stretch)."""
    noise = tf.maximum(noise, 0.5 / 255)
    smooth = smooth - zero
    ink_pixels = smooth > tf.maximum(spec.NOISE_SIGMAS * noise, spec.MIN_CONTRAST / 2)
    peak = tf.reduce_max(smooth)
    stands_out = tf.reduce_any(ink_pixels) & (peak >= spec.MIN_CONTRAST)
    core = quantile(smooth, 0.9, 0.0, 2.0, weights=ink_pixels)
    low = tf.minimum(tf.maximum(2.0 * noise, 0.1 * core), 0.5 * core)
    ink = tf.clip_by_value((strength - zero - low) / (core - low), 0.0, 1.0)
    return ink, noise / (core - low), stands_out, peak


def ring_paper_side(ring):
    """Step 8's second try: (zero, noise, usable) of the paper side of the ring's values
    float32 [n] (= mobile.preprocess.ring_paper_side; usable False where that gives None)."""
    bottom = quantile(ring, spec.PAPER_SIDE_LOW, -1.0, 1.0)
    side = ring < bottom + spec.PAPER_SIDE * spec.MIN_CONTRAST
    ink = ring >= bottom + spec.PAPER_GAP * spec.MIN_CONTRAST
    count, ink_count = tf.reduce_sum(tf.cast(side, tf.int32)), tf.reduce_sum(tf.cast(ink, tf.int32))
    gap = tf.size(ring) - count - ink_count
    upper = tf.cast(ring >= bottom + (spec.PAPER_SIDE + spec.PAPER_GAP) / 2 * spec.MIN_CONTRAST, tf.int32)
    changes = tf.reduce_sum(tf.abs(upper[1:] - upper[:-1]))
    fewer = tf.cast(tf.minimum(count, ink_count), tf.float32)
    usable = ((fewer >= spec.PAPER_SIDE_MIN * tf.cast(tf.size(ring), tf.float32))
              & (tf.cast(gap, tf.float32) <= spec.PAPER_GAP_MAX * fewer) & (changes <= spec.PAPER_MAX_CHANGES))
    zero = quantile(ring, 0.5, -1.0, 1.0, weights=side)
    noise = 1.4826 * quantile(tf.abs(ring - zero), 0.5, 0.0, 2.0, weights=side)
    return zero, noise, usable


def ink_mask(ink, noise):
    """Step 9's mask bool [h, w] of ink float32 [h, w] and its noise'."""
    return box3(ink) > tf.maximum(0.35, 4.0 * noise)


def _run_ids(mask):
    """int32 [h, w]: 1.. for the horizontal runs of a bool mask in raster order, 0 outside."""
    before = tf.pad(mask[:, :-1], [[0, 0], [1, 0]])
    starts = mask & ~before
    ids = tf.reshape(tf.cumsum(tf.reshape(tf.cast(starts, tf.int32), [-1])), tf.shape(mask))
    return tf.where(mask, ids, 0)


def components(mask):
    """Step 9's components of bool [h, w]: labels int32 [h, w], 0 = none, else the largest
    raster index + 1 in the component.

    Label propagation (the result is the components themselves, as the Pi's union-find finds
    them): every pass spreads the largest label along whole horizontal and vertical runs of
    the mask (segment maxima), then over each pixel's 3x3 neighbourhood (diagonal links), then
    jumps twice to the label of the pixel a label names; until no pixel has a larger label
    around it (1-6 passes for digits).
    """
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    n = h * w
    rows = _run_ids(mask)
    cols = tf.transpose(_run_ids(tf.transpose(mask)))
    row_runs = tf.reduce_max(rows) + 1
    col_runs = tf.reduce_max(cols) + 1
    start = tf.where(mask, tf.reshape(tf.range(1, n + 1), [h, w]), 0)

    def along(labels, ids, count):
        return tf.gather(tf.math.unsorted_segment_max(labels, ids, count), ids)

    def jump(labels):
        flat = tf.concat([[0], tf.reshape(labels, [-1])], 0)
        return tf.maximum(labels, tf.gather(flat, labels))

    def step(labels, _settled):
        spread = along(along(labels, rows, row_runs), cols, col_runs)
        spread = tf.where(mask, max3(spread, tf.constant(0), "square"), 0)
        after = jump(jump(spread))
        # Settled when every pixel's label is the largest around it: the labels are then
        # constant on each component, its largest raster index + 1 (one 3x3 maximum instead
        # of a whole pass that finds nothing left to change).
        return after, tf.reduce_all(tf.equal(tf.where(mask, max3(after, tf.constant(0), "square"), 0), after))

    labels, _ = tf.while_loop(lambda labels, settled: ~settled, step, [start, tf.constant(False)],
                              maximum_iterations=n + 1)
    return labels


def digit_mask(full, work, dark_ink):
    """Step 9: step 9's mask bool [h, w] (from ink_strength) -> the digit's pixels bool [h, w],
    asserting digit-like ink."""
    halved = tf.maximum(tf.shape(full)[0], tf.shape(full)[1]) > spec.POLARITY_HALF_ABOVE
    mask = tf.cond(halved, lambda: blocks_any(full), lambda: full)
    mask.set_shape([None, None])
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    labels = components(mask)
    n = h * w
    flat = tf.reshape(labels, [-1])
    segments = n + 1
    areas = tf.math.unsorted_segment_sum(tf.ones_like(flat), flat, segments)
    areas = tf.tensor_scatter_nd_update(areas, [[0]], [0])
    raster = tf.range(n)
    first = tf.math.unsorted_segment_min(raster, flat, segments)
    rows, cols = raster // w, raster % w
    top = tf.math.unsorted_segment_min(rows, flat, segments)
    bottom = tf.math.unsorted_segment_max(rows, flat, segments)
    left = tf.math.unsorted_segment_min(cols, flat, segments)
    right = tf.math.unsorted_segment_max(cols, flat, segments)
    # Order: area descending, then the first pixel ascending.
    key = tf.cast(areas, tf.int64) * tf.cast(segments + 1, tf.int64) + tf.cast(n - first, tf.int64)
    key = tf.where(areas > 0, key, tf.constant(-1, tf.int64))
    count = tf.minimum(tf.reduce_sum(tf.cast(areas > 0, tf.int32)), MAX_COMPONENTS)
    order = tf.math.top_k(key, k=tf.minimum(segments, MAX_COMPONENTS)).indices
    order = tf.ensure_shape(order, [None])
    labels = _guard(labels, count > 0, tf.constant("empty picture: no ink found"))
    biggest = tf.cast(tf.gather(areas, order[0]), tf.float32)

    def box(label):
        return [tf.gather(top, label), tf.gather(bottom, label), tf.gather(left, label), tf.gather(right, label)]

    def body(i, keep, t, b, l, r):
        label = order[i]
        area = tf.cast(tf.gather(areas, label), tf.float32)
        lt, lb, ll, lr = box(label)
        reach = spec.NEAR * tf.cast(tf.maximum(b - t + 1, r - l + 1), tf.float32)
        near = ((tf.cast(lb, tf.float32) >= tf.cast(t, tf.float32) - reach) & (tf.cast(lt, tf.float32) <= tf.cast(b, tf.float32) + reach)
                & (tf.cast(lr, tf.float32) >= tf.cast(l, tf.float32) - reach) & (tf.cast(ll, tf.float32) <= tf.cast(r, tf.float32) + reach))
        kept = near | (area >= spec.FAR_FRACTION * biggest)
        keep = tf.tensor_scatter_nd_update(keep, [[label]], [kept])
        grow = kept & near
        t = tf.where(grow, tf.minimum(t, lt), t)
        b = tf.where(grow, tf.maximum(b, lb), b)
        l = tf.where(grow, tf.minimum(l, ll), l)
        r = tf.where(grow, tf.maximum(r, lr), r)
        return i + 1, keep, t, b, l, r

    def more(i, keep, t, b, l, r):
        area = tf.cast(tf.gather(areas, order[tf.minimum(i, tf.shape(order)[0] - 1)]), tf.float32)
        return (i < count) & (area >= spec.SPECK_FRACTION * biggest)

    keep = tf.tensor_scatter_nd_update(tf.zeros([segments], tf.bool), [[order[0]]], [True])
    t0, b0, l0, r0 = box(order[0])
    _, keep, *_ = tf.while_loop(more, body, [tf.constant(1), keep, t0, b0, l0, r0])
    kept = tf.gather(keep, labels)

    def enlarge():
        twice = tf.repeat(tf.repeat(kept, 2, axis=0), 2, axis=1)
        return twice[: tf.shape(full)[0], : tf.shape(full)[1]] & full

    kept = tf.cond(halved, enlarge, lambda: kept)
    kept.set_shape([None, None])
    return _check_digit_like(kept, work, dark_ink)


def blocks_any(mask):
    """bool [h, w] -> [ceil(h/2), ceil(w/2)]: any pixel set in each 2x2 block (padded)."""
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    padded = tf.pad(mask, tf.stack([[0, h % 2], [0, w % 2]]))
    return tf.reduce_any(tf.reshape(padded, tf.stack([(h + h % 2) // 2, 2, (w + w % 2) // 2, 2])), axis=[1, 3])


def _check_digit_like(kept, work, dark_ink):
    """The digit-like checks of step 9 (= mobile.preprocess._check_digit_like)."""
    rows = tf.where(tf.reduce_any(kept, axis=1))[:, 0]
    cols = tf.where(tf.reduce_any(kept, axis=0))[:, 0]
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    h, w = tf.shape(kept, out_type=tf.int64)[0], tf.shape(kept, out_type=tf.int64)[1]
    kept = _guard(kept, tf.maximum(height, width) >= spec.MIN_DIGIT_SIDE, tf.strings.format(
        "no digit-like ink: the largest mark is {}x{} px of the picture scaled to {}x{}, too small to be a "
        "digit (crop the picture closer to the digit)",
        [width, height, w, h]))
    ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    kept = _guard(kept, tf.cast(width, tf.float32) <= spec.MAX_WIDTH_RATIO * tf.cast(height, tf.float32), tf.strings.join([
        "no digit-like ink: the marks are ", _decimals(ratio, 1),
        " times wider than tall (a line or a word, not one digit)"]))
    box = work[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    paper = quantile(_ring(work), 0.5, 0.0, 1.0)
    dark_level, light_level = quantile(box, (0.05, 0.95), 0.0, 1.0)
    middle = (paper + tf.where(dark_ink, dark_level, light_level)) / 2
    inked = tf.cast(tf.where(dark_ink, box < middle, box > middle), tf.float32)
    fill = tf.reduce_mean(inked)
    inside = tf.cast(spec.inscribed_ellipse(height, width, tf.range), tf.float32)
    round_fill = tf.reduce_sum(inked * inside) / tf.reduce_sum(inside)
    blot = (ratio >= 0.5) & (ratio <= 2.0) & ((fill > spec.MAX_FILL) | (round_fill > spec.MAX_ROUND_FILL))
    return _guard(kept, ~blot, tf.strings.join([
        "no digit-like ink: a solid blot (", _decimals(fill * 100.0, 0), "% of its box and ",
        _decimals(round_fill * 100.0, 0), "% of the ellipse inside it are ink-coloured), not pen strokes"]))


def crop(ink, mask):
    """Step 10: (patch float32, patch mask bool) cut to the ink around the kept mask."""
    near = dilate(tf.cast(mask, tf.int32), 2) > 0
    digit = tf.where(near, ink, 0.0)
    inked = digit > 0.05
    use_mask = ~tf.reduce_any(inked)
    source = tf.where(use_mask, mask, inked)
    rows = tf.where(tf.reduce_any(source, axis=1))[:, 0]
    cols = tf.where(tf.reduce_any(source, axis=0))[:, 0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return digit[r0:r1, c0:c1], mask[r0:r1, c0:c1]


def stroke_width(mask):
    """Step 11: 2 x area / (pi/4 x 4-neighbour edges), float64."""
    m = tf.cast(tf.pad(mask, [[1, 1], [1, 1]]), tf.int32)
    edges = tf.reduce_sum(tf.abs(m[1:] - m[:-1])) + tf.reduce_sum(tf.abs(m[:, 1:] - m[:, :-1]))
    area = tf.cast(tf.reduce_sum(tf.cast(mask, tf.int32)), tf.float64)
    return tf.where(area > 0, 2.0 * area / (tf.cast(edges, tf.float64) * math.pi / 4), tf.constant(0.0, tf.float64))


def normalise_strokes(patch, mask):
    """Step 11: thin strokes dilated towards MNIST's stroke width."""
    long_side = tf.cast(tf.maximum(tf.shape(patch)[0], tf.shape(patch)[1]), tf.float64)
    width = stroke_width(mask)
    grow = tf.cast(tf.round((spec.MNIST_STROKE * long_side - width) / 2), tf.int32)
    thin = (long_side >= 8) & (width > 0) & (width < spec.THIN_STROKE * long_side) & (grow >= 1)

    def thicken():
        return dilate(tf.pad(patch, [[grow, grow], [grow, grow]]), grow)

    out = tf.cond(thin, thicken, lambda: patch)
    out.set_shape([None, None])
    return out


def fit_box(patch):
    """Step 12."""
    h, w = tf.shape(patch)[0], tf.shape(patch)[1]
    scale = spec.MNIST_BOX / tf.cast(tf.maximum(h, w), tf.float64)

    def side(n):
        return tf.maximum(1, tf.cast(tf.round(tf.cast(n, tf.float64) * scale), tf.int32))

    return tf.clip_by_value(resize(patch, side(h), side(w)), 0.0, 1.0)


def place_by_mass(patch):
    """Step 13: uint8 [28, 28]."""
    size = spec.MNIST_SIZE
    h, w = tf.shape(patch)[0], tf.shape(patch)[1]
    mass = tf.reduce_sum(patch)
    com_y = tf.where(mass > 0, tf.reduce_sum(tf.reduce_sum(patch, 1) * tf.range(tf.cast(h, tf.float32))) / mass, tf.cast(h - 1, tf.float32) / 2)
    com_x = tf.where(mass > 0, tf.reduce_sum(tf.reduce_sum(patch, 0) * tf.range(tf.cast(w, tf.float32))) / mass, tf.cast(w - 1, tf.float32) / 2)
    top = tf.clip_by_value(tf.cast(tf.round(size / 2 - tf.cast(com_y, tf.float64)), tf.int32), 0, size - h)
    left = tf.clip_by_value(tf.cast(tf.round(size / 2 - tf.cast(com_x, tf.float64)), tf.int32), 0, size - w)
    field = tf.pad(patch, [[top, size - top - h], [left, size - left - w]])
    field = tf.ensure_shape(field, [size, size])
    return tf.cast(tf.round(field * 255.0), tf.uint8)


def grey_to_mnist(v):
    """Steps 4-13: grey v float32 [H, W] -> uint8 [28, 28]."""
    size = spec.MNIST_SIZE
    shape = tf.shape(v)
    is_small = tf.reduce_all(tf.equal(shape, [size, size]))

    def pipeline():
        work = working_copy(v)
        dark_ink, size, halved = polarity_and_window(work)
        ink, mask = ink_strength(work, dark_ink, size, halved)
        mask = digit_mask(mask, work, dark_ink)
        patch, patch_mask = crop(ink, mask)
        return place_by_mass(fit_box(normalise_strokes(patch, patch_mask)))

    def maybe_mnist():
        grey = tf.cast(tf.round(tf.reshape(v, [size, size]) * 255.0), tf.uint8)
        return tf.cond(looks_like_mnist(grey), lambda: grey, pipeline)

    return tf.ensure_shape(tf.cond(is_small, maybe_mnist, pipeline), [size, size])


def picture_to_mnist(image_bytes):
    """One encoded picture (scalar string: PNG, JPEG, BMP or WebP, any size) -> uint8 [28, 28].

    The whole specification of mobile/preprocess.py, steps 1-13. Fails with INVALID_ARGUMENT
    whose message says why for pictures the specification refuses.
    """
    code, width, height = read_header(image_bytes)
    # The decoders read the bytes only once every header check has passed: without this
    # dependency a PNG/BMP/WebP decoder (which needs no width or height) could start on a
    # decompression bomb in parallel with the pixel-budget assertion.
    with tf.control_dependencies([code, width, height]):
        checked = tf.identity(image_bytes)
    return grey_to_mnist(decode(checked, code, width, height))
