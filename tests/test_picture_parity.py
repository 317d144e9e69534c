"""One picture-to-MNIST specification, two implementations: mobile/preprocess.py (numpy +
Pillow, the Pi) and export/picture_graph.py (TensorFlow ops, serving_bytes).

Every kind of picture people send (model/pictures.py: photos, canvas drawings, chalk, tight
crops, thin pens, MNIST itself), the shared cases of tests/data/pictures, EXIF orientation,
transparency, sizes from 28x28 to a 12-megapixel photo, and every kind of bad picture: both
implementations give the same 28x28 picture or the same refusal.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from export.verify import PICTURE_PARITY_MAX_MEAN_DIFF
from mobile import preprocess as pre
from model import pictures as photos

from .conftest import REPO

CASES = REPO / "tests" / "data" / "pictures"
PER_KIND = 10  # synthetic pictures per kind (the benchmark: 1,000)


@pytest.fixture(scope="module")
def graph():
    """picture_graph.picture_to_mnist as one concrete function: bytes -> (uint8 [28, 28] or
    the InvalidArgumentError it raises)."""
    import tensorflow as tf

    from export import picture_graph

    fn = tf.function(picture_graph.picture_to_mnist, input_signature=[tf.TensorSpec([], tf.string)])

    def run(data: bytes):
        try:
            return fn(tf.constant(data)).numpy()
        except tf.errors.InvalidArgumentError as err:
            return err

    return run


@pytest.fixture(scope="module")
def classifier(exported):
    from mobile.runtime import Classifier

    return Classifier.load(exported.mobile_dir / "mnist.tflite")


def pi(data: bytes):
    try:
        return pre.picture_to_mnist(data)
    except pre.PictureError as err:
        return err


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_same(data: bytes, graph, what: str) -> np.ndarray:
    """Both implementations accept the picture and agree within the stated tolerance."""
    mine, theirs = pi(data), graph(data)
    assert not isinstance(mine, Exception), f"{what}: the Pi refused it: {mine}"
    assert not isinstance(theirs, Exception), f"{what}: serving_bytes refused it: {theirs.message}"
    assert mine.dtype == theirs.dtype == np.uint8 and mine.shape == theirs.shape == (28, 28)
    assert mean_difference(mine, theirs) <= PICTURE_PARITY_MAX_MEAN_DIFF, what
    return mine


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


# --- every kind, both paths -------------------------------------------------------------------
@pytest.mark.parametrize("kind", photos.KINDS)
def test_each_kind_gives_the_same_28x28_on_both_paths(kind, graph, classifier, fixture_mnist):
    digits = fixture_mnist.test.images[:PER_KIND]
    pictures = photos.synthesize_kind(kind, digits, seed=11)
    ours = np.stack([assert_same(p.data, graph, f"{kind} {i}") for i, p in enumerate(pictures)])
    theirs = np.stack([graph(p.data) for p in pictures])
    assert np.array_equal(classifier.predict(ours).argmax(1), classifier.predict(theirs).argmax(1))
    if kind == "mnist":
        assert np.array_equal(ours, digits)  # passed through byte for byte


@pytest.mark.parametrize("kind", [k for k in photos.KINDS if k != "mnist"])
def test_each_kind_keeps_the_digit(kind, classifier, fixture_mnist):
    """The preprocessed pictures are read as well as the clean digits they were made from
    (the fixture model is ~90% accurate; the benchmark measures the full model: >= 98%)."""
    count = 60
    digits, labels = fixture_mnist.test.images[:count], fixture_mnist.test.labels[:count]
    pictures = photos.synthesize_kind(kind, digits, seed=5)
    prepared = np.stack([pre.picture_to_mnist(p.data) for p in pictures])  # none refused
    clean = (classifier.predict(digits).argmax(1) == labels).mean()
    right = (classifier.predict(prepared).argmax(1) == labels).mean()
    assert right >= clean - 0.07, f"{kind}: {right:.3f} against {clean:.3f} on the clean digits"


# Shared cases the session's fixture model may misread: it is trained on 3,000 digits and
# reads ~90% of clean test digits, so about 2 of 20 misreadings are its own. The full-data
# model reads all 20 (p >= 0.99), measured by `make bench-mobile` ("cases" in mobile.json).
FIXTURE_MODEL_CASE_MISSES = 1


def test_the_shared_cases_come_out_as_their_digit_on_both_paths(graph, classifier):
    """The pictures that failed when the kit was first tried (`<kind>-<n>-<digit>.<ext>`):
    both paths give the same 28x28 picture, and the fixture model reads it as its digit
    (its top two for every case, its first choice for all but FIXTURE_MODEL_CASE_MISSES)."""
    files = sorted(CASES.iterdir())
    assert len(files) == 20
    kinds = {f.name.split("-")[0] for f in files}
    assert kinds == {"canvas", "chalk", "photo", "thinpen", "tight"}
    missed = []
    for path in files:
        picture = assert_same(path.read_bytes(), graph, path.name)
        digit = int(path.stem.split("-")[2])
        probabilities = classifier.predict(picture).reshape(-1)
        assert digit in np.argsort(probabilities)[-2:], f"{path.name}: {np.round(probabilities, 2)}"
        if probabilities.argmax() != digit:
            missed.append(f"{path.name} read as {probabilities.argmax()}")
    assert len(missed) <= FIXTURE_MODEL_CASE_MISSES, missed


def test_mnist_pngs_pass_through_unchanged_on_both_paths(graph, fixture_mnist):
    for digit in fixture_mnist.test.images[:40]:
        data = png(digit)
        assert np.array_equal(pi(data), digit)
        assert np.array_equal(graph(data), digit)


# --- tight crops of bold digits whose ink covers much of the border ----------------------------
def tight_bold(digit: np.ndarray, rng: np.random.Generator, aspect: float,
               light_ink: bool) -> tuple[bytes, bytes] | None:
    """MNIST digit uint8 [28, 28] -> (PNG of bold strokes cut to the ink's box, each side 0-2 px
    into the ink; PNG of the same strokes, paper and noise with a margin of a third of the
    long side), or None when ink covers over MAX_INK of the crop (a bar: no digit to see).
    40-150 px tall, width = aspect x height; dark on light or light on dark."""
    height = int(rng.integers(40, 151))
    width = max(12, int(round(height * aspect)))
    bold = max(3, int(0.1 * height) | 1)  # strokes about a fifth of the height
    grey = Image.fromarray(digit).resize((width, height), Image.BICUBIC).filter(ImageFilter.MaxFilter(bold))
    coverage = np.clip((np.asarray(grey, np.float32) / 255 - 0.3) / 0.4, 0, 1)
    rows, cols = np.flatnonzero(coverage.max(1) > 0.5), np.flatnonzero(coverage.max(0) > 0.5)
    top, bottom, left, right = (int(rng.integers(0, 3)) for _ in range(4))
    coverage = coverage[rows[0] + top : rows[-1] + 1 - bottom, cols[0] + left : cols[-1] + 1 - right]
    paper, ink = (rng.uniform(10, 60), rng.uniform(190, 250)) if light_ink else (rng.uniform(200, 250), rng.uniform(10, 70))
    margin = max(coverage.shape) // 3
    noise = rng.normal(0, rng.uniform(0.5, 4), (coverage.shape[0] + 2 * margin, coverage.shape[1] + 2 * margin))
    if (coverage > 0.5).mean() > MAX_INK:
        return None

    def picture(pad: int) -> bytes:
        c = np.pad(coverage, pad)
        return png(np.clip(np.rint(paper * (1 - c) + ink * c + noise[: c.shape[0], : c.shape[1]]), 0, 255).astype(np.uint8))

    return picture(0), picture(margin)


MAX_INK = 0.85  # of a tight crop: more, and it is a bar or a blot, whatever digit it was cut from


def tight_bold_set(fixture_mnist, per_digit: int, seed: int) -> list[tuple[int, bytes, bytes]]:
    """(digit, tight crop, the same on a page) for the first `per_digit` 1s and 7s of the
    fixture's test set, each at three aspect ratios (1s 0.3-0.6, 7s 0.6-1.2) and both
    polarities, bars left out."""
    rng = np.random.default_rng(seed)
    images, labels = fixture_mnist.test.images, fixture_mnist.test.labels
    out = []
    for digit in (1, 7):
        for index in np.flatnonzero(labels == digit)[:per_digit]:
            for aspect in (0.3, 0.45, 0.6):
                for light_ink in (False, True):
                    made = tight_bold(images[index], rng, aspect * (1 if digit == 1 else 2), light_ink)
                    if made is not None:
                        out.append((digit, *made))
    return out


def test_tight_crops_of_bold_1s_and_7s_are_read_on_both_paths(graph, classifier, fixture_mnist):
    """Bold 1s and 7s cut with no margin, ink over much of the frame and its border (the
    ring's median or MAD noise is the ink's; step 8's second try takes the ring's paper side):
    both paths read every one, alike, and the fixture model reads them about as well as the
    same strokes on a page (the full model: 98-99%, about 5% refused before the second try)."""
    pictures = tight_bold_set(fixture_mnist, per_digit=6, seed=1)
    assert len(pictures) >= 50
    tight = np.stack([assert_same(t, graph, f"tight {i} ({d})") for i, (d, t, _) in enumerate(pictures)])
    page = np.stack([pi(p) for _, _, p in pictures])
    truth = np.array([d for d, _, _ in pictures])
    right_tight = (classifier.predict(tight).argmax(1) == truth).mean()
    right_page = (classifier.predict(page).argmax(1) == truth).mean()
    assert right_tight >= right_page - 0.05, f"{right_tight:.3f} against {right_page:.3f} on a page"


@pytest.mark.parametrize("shape", [(105, 21), (60, 25), (200, 150)])
@pytest.mark.parametrize("noise", ["gauss-10", "gauss-30", "gauss-60", "uniform-90"])
def test_pure_noise_is_refused_on_both_paths(noise, shape, graph):
    """Noise, however strong, and clipped into a bimodal picture, on narrow frames like a
    tight crop's: no digit on either path (step 8's second try needs paper and ink apart)."""
    kind, sd = noise.split("-")
    rng = np.random.default_rng(int(sd))
    for mean in (40, 128, 220):
        values = (rng.normal(mean, int(sd), shape) if kind == "gauss"
                  else rng.uniform(mean - 1.7 * int(sd), mean + 1.7 * int(sd), shape))
        data = png(np.clip(values, 0, 255).astype(np.uint8))
        with pytest.raises(pre.PictureError, match="empty picture|no digit-like ink"):
            pre.picture_to_mnist(data)
        refused = graph(data)
        assert isinstance(refused, Exception), f"serving_bytes made a digit of {noise} noise around {mean}"
        assert "empty picture" in refused.message or "no digit-like ink" in refused.message, refused.message


# --- EXIF, transparency, sizes ------------------------------------------------------------------
def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# What a camera stores for each orientation: the upright picture transformed by the inverse.
_STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.T, 6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_both_paths(orientation, graph, fixture_mnist):
    upright = 255 - np.kron(fixture_mnist.test.images[7], np.ones((6, 4), np.uint8))  # 168 x 112, not square
    stored = np.ascontiguousarray(_STORED[orientation](upright))
    data = jpeg(stored, exif=_exif(orientation))
    assert pre.jpeg_orientation(data) == orientation
    with Image.open(io.BytesIO(data)) as img:  # Pillow agrees on what upright is
        from PIL import ImageOps

        assert np.abs(np.asarray(ImageOps.exif_transpose(img).convert("L"), np.int16) - upright).mean() < 3
    turned = assert_same(data, graph, f"orientation {orientation}")
    reference = pre.picture_to_mnist(jpeg(upright))
    assert mean_difference(turned, reference) < 3


def test_exif_orientation_is_found_with_or_without_jfif_and_ignored_when_broken(graph, fixture_mnist):
    upright = 255 - np.kron(fixture_mnist.test.images[7], np.ones((6, 4), np.uint8))
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    data = jpeg(stored, exif=_exif(6))
    assert data[2:4] == b"\xff\xe0"  # Pillow writes JFIF's APP0, then APP1; a camera APP1 first
    exif_first = data[:2] + data[4 + struct.unpack(">H", data[4:6])[0]:]
    assert exif_first[2:4] == b"\xff\xe1" and pre.jpeg_orientation(exif_first) == 6
    assert np.array_equal(assert_same(exif_first, graph, "APP1 first"), assert_same(data, graph, "APP0, APP1"))
    # An orientation out of range means "as stored".
    bad_value = jpeg(stored, exif=_exif(9))
    assert pre.jpeg_orientation(bad_value) == 1
    assert_same(bad_value, graph, "orientation 9")


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (250, 220, 0), (220, 30, 30), (128, 128, 128)])
def test_a_transparent_canvas_is_ink_on_paper_whatever_the_stroke_colour(colour, graph, classifier, fixture_mnist):
    digit = fixture_mnist.test.images[1]
    alpha = np.asarray(Image.fromarray(digit).resize((224, 224), Image.BILINEAR))
    rgba = np.zeros((224, 224, 4), np.uint8)
    rgba[..., :3] = np.where(alpha[..., None] > 0, np.array(colour, np.uint8), 0)
    rgba[..., 3] = alpha
    picture = assert_same(png(rgba, "RGBA"), graph, f"strokes {colour}")
    assert np.corrcoef(picture.ravel().astype(float), digit.ravel().astype(float))[0, 1] > 0.8
    assert classifier.predict(picture).argmax() == classifier.predict(digit).argmax()


def test_a_transparent_border_on_an_opaque_photo_is_composited_on_white(graph, fixture_mnist):
    paper = 255 - np.kron(fixture_mnist.test.images[2], np.ones((5, 5), np.uint8))  # 140 x 140
    rgba = np.stack([paper] * 3 + [np.full_like(paper, 255)], -1)
    rgba[:6, :6, 3] = 0  # a rounded corner
    with_corner = assert_same(png(rgba, "RGBA"), graph, "transparent corner")
    assert mean_difference(with_corner, pre.picture_to_mnist(png(paper))) < 1


def test_a_12_megapixel_phone_photo_and_a_tiny_crop(graph, fixture_mnist):
    rng = np.random.default_rng(1)
    big = photos.synthesize_photo(fixture_mnist.test.images[3], rng, size=(3024, 4032), jpeg=True)
    assert pre.read_header(big.data) == pre.Header("jpeg", 4032, 3024)
    assert pre.jpeg_scale(4032, 3024) == 8  # decoded at 504 x 378
    assert_same(big.data, graph, "12 MP photo")
    tiny = np.asarray(Image.fromarray(255 - fixture_mnist.test.images[3][4:24, 6:22]).resize((10, 12)))
    assert_same(png(tiny), graph, "a 10x12 crop")


def test_narrow_pictures_whose_frame_is_shorter_than_a_doubling(graph, fixture_mnist):
    # A working copy under 64 px on one side with a wide background window: the graph's
    # running max/min must not shift by more than the frame's length.
    rng = np.random.default_rng(2)
    for size in ((130, 64), (1000, 70), (64, 130)):
        photo = photos.synthesize_photo(fixture_mnist.test.images[4], rng, size=size, jpeg=False)
        assert_same(photo.data, graph, f"{size[1]}x{size[0]} photo")


# --- the primitives behind steps 6 and 7: equal, not just close --------------------------------
# The graph computes step 6's top-hats and step 7's closings its own way (running extremes by
# doubling on shrinking "valid" frames, all windows sharing one padded stack): a wrong offset
# or a window reaching a pixel too far shows here as a changed value, even where the 28x28
# picture would still come out within the parity tolerance. Max, min and subtraction are
# exact in float32, so the two implementations must agree to the bit (the 2x2 block mean too:
# both add in the same order).
FRAMES = ((1, 9), (5, 7), (17, 33), (60, 61), (96, 128), (128, 96))


@pytest.fixture(scope="module")
def primitives():
    import tensorflow as tf

    from export import picture_graph

    closings = tf.function(picture_graph.both_closings)
    top_hats = tf.function(picture_graph.top_hats)
    return closings, top_hats


@pytest.mark.parametrize("shape", FRAMES)
def test_the_graphs_closings_equal_the_pis_for_every_window(shape, primitives):
    closings, _ = primitives
    values = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    for size in (1, 3, 7, 9, 15, 33, 65, 129):
        for dark in (True, False):
            padded, clipped = (t.numpy() for t in closings(values, np.int32(size), dark))
            np.testing.assert_array_equal(padded, pre._closing(values, size, dark, pad_edges=True), f"{shape} {size} {dark}")
            np.testing.assert_array_equal(clipped, pre._closing(values, size, dark, pad_edges=False), f"{shape} {size} {dark}")


@pytest.mark.parametrize("shape", FRAMES)
def test_the_graphs_top_hats_equal_the_pis_for_every_polarity_window(shape, primitives):
    _, top_hats = primitives
    rng = np.random.default_rng(sum(shape) + 1)
    log_dark, log_light = (np.log(rng.random(shape) + 0.1).astype(np.float32) for _ in range(2))
    hats = top_hats(log_dark, log_light).numpy()
    pi_hats = pre.top_hats(log_dark, log_light)
    assert hats.shape == pi_hats.shape == (len(pre.POLARITY_WINDOWS), 2, *shape)
    # The one ladder (mobile.preprocess.top_hat_ladder) on tensors and on numpy arrays equals
    # the definition: each window's closing, one at a time.
    for i, k in enumerate(pre.POLARITY_WINDOWS):
        black = pre._closing(log_dark, k, dark_ink=True) - log_dark
        white = log_light - pre._closing(log_light, k, dark_ink=False)
        for name, found in (("graph", hats), ("Pi", pi_hats)):
            np.testing.assert_array_equal(found[i, 0], black, f"{name} black {k}")
            np.testing.assert_array_equal(found[i, 1], white, f"{name} white {k}")


@pytest.mark.parametrize("shape", [shape for shape in FRAMES if min(shape) >= 2])
def test_the_graphs_2x2_blocks_equal_the_pis(shape):
    """The 2x2 block min, max and mean of steps 6 and 7: the mean adds in the order of
    TensorFlow's 2x2 average pooling, so the same float32 bits (a sum in another order differs
    in the last bit, and step 6 thresholds what it gives)."""
    import tensorflow as tf

    from export import picture_graph

    values = np.random.default_rng(sum(shape) + 2).random(shape).astype(np.float32)
    for op in ("min", "max", "mean"):
        graph = tf.function(lambda x, op=op: picture_graph.blocks2(x, op))(values).numpy()
        np.testing.assert_array_equal(graph, pre._blocks(values, op), op)


# --- bad pictures: the same refusal on both paths ----------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (8-bit RGB) declaring this size: all a bomb needs to start."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose pixels (all zero) inflate to width x height x 3 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes(3 * width)
    body = b"".join(compressor.compress(row) for _ in range(min(height, 64)))  # the rest: never read
    body += compressor.flush()
    idat = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    return _png_header(width, height) + idat


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(jpeg(np.full((16, 16), 200, np.uint8)))
    at = data.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), height, width
    data[at : at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 255, 255)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", width, -height)
    return bytes(data)


def webp_declaring(width: int, height: int, animated: bool = False) -> bytes:
    payload = b"VP8X" + struct.pack("<I", 10) + bytes([0x02 if animated else 0, 0, 0, 0])
    payload += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (40, 40), 255).save(buffer, "GIF")
    return buffer.getvalue()


def _line() -> np.ndarray:
    picture = np.full((120, 300), 245, np.uint8)
    picture[58:63, 20:280] = 20  # a horizontal rule, not a digit
    return picture


def _small_mark() -> np.ndarray:
    picture = np.full((600, 800), 235, np.uint8)
    picture[300:315, 400:411] = 25  # 15 px of ink in a 600x800 page: ~5 px in the working copy
    return picture


def _blot() -> np.ndarray:
    picture = np.full((160, 160), 240, np.uint8)
    picture[40:120, 45:125] = 15  # a filled square
    return picture


def _disk() -> np.ndarray:
    ys, xs = np.mgrid[0:200, 0:240]
    picture = np.full((200, 240), 238, np.uint8)
    picture[(ys - 100) ** 2 + (xs - 120) ** 2 <= 60**2] = 20  # a filled disk: 79% of its box
    return picture


BAD = {
    "text": (b"this is not a picture", "not an image"),
    "nothing": (b"", "not an image"),
    "gif": (_gif(), "GIF pictures are not accepted"),
    "animated-webp": (webp_declaring(64, 64, animated=True), "animated WebP"),
    "png-bomb-30000": (png_bomb(30000, 30000), "picture too large: 30000x30000 pixels"),
    "png-bomb-12000": (png_bomb(12000, 12000), "picture too large: 12000x12000 pixels"),
    "jpeg-bomb": (jpeg_declaring(60000, 60000), "picture too large: 60000x60000 pixels"),
    "bmp-bomb": (bmp_declaring(20000, 20000), "picture too large: 20000x20000 pixels"),
    "webp-bomb": (webp_declaring(16000, 16000), "picture too large: 16000x16000 pixels"),
    "png-header-only": (_png_header(100, 100)[:20], "corrupt or truncated image"),
    "blank-white": (png(np.full((120, 90), 255, np.uint8)), "empty picture"),
    "blank-colour": (jpeg(np.full((300, 400, 3), (200, 180, 40), np.uint8)), "empty picture"),
    "paper-noise": (png(np.clip(np.random.default_rng(0).normal(220, 3, (200, 150)), 0, 255).astype(np.uint8)),
                    "empty picture"),
    "black-28x28": (png(np.zeros((28, 28), np.uint8)), "empty picture"),
    "transparent": (png(np.zeros((64, 64, 4), np.uint8), "RGBA"), "empty picture"),
    "a-line": (png(_line()), "no digit-like ink"),
    "a-blot": (png(_blot()), "no digit-like ink: a solid blot"),
    "a-round-blot": (jpeg(_disk()), "no digit-like ink: a solid blot"),
    "a-small-mark": (jpeg(_small_mark()), "too small to be a digit (crop the picture closer to the digit)"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_pictures_are_refused_with_the_same_reason_on_both_paths(name, graph):
    data, message = BAD[name]
    with pytest.raises(pre.PictureError, match=re.escape(message)):
        pre.picture_to_mnist(data)
    refused = graph(data)
    assert isinstance(refused, Exception), f"serving_bytes made a picture of {name}"
    assert message in refused.message, refused.message


@pytest.mark.parametrize("kind", ["png", "jpeg", "png-without-iend", "png-bad-crc"])
def test_truncated_pictures_are_refused_on_both_paths(kind, graph, fixture_mnist):
    paper = 255 - np.kron(fixture_mnist.test.images[0], np.ones((8, 8), np.uint8))
    if kind == "png-without-iend":
        # Every pixel is there, only the end chunk is missing: Pillow reads it, libpng (in
        # TensorFlow) does not, so the Pi walks the chunks to refuse it too.
        data = png(paper)[:-12]
    elif kind == "png-bad-crc":
        damaged = bytearray(png(paper))
        damaged[29] ^= 0xFF  # the IHDR chunk's CRC: Pillow "cannot identify" the file
        data = bytes(damaged)
    else:
        data = _truncated(png(paper) if kind == "png" else jpeg(paper))
    with pytest.raises(pre.PictureError, match=r"^corrupt or truncated image \([^<>]*\)$"):  # no Python repr
        pre.picture_to_mnist(data)
    refused = graph(data)
    assert isinstance(refused, Exception) and kind[:3].upper() in refused.message.upper(), refused


# --- one picture in every encoding a user may send: the same 28x28 on both paths --------------
def _grey_png(grey: np.ndarray, bits: int) -> bytes:
    """A grey PNG with `bits` (1, 2 or 4) bits per pixel, written by hand: Pillow writes no 2- or
    4-bit grey, but PNG optimisers and scanners do."""
    levels = np.rint(grey.astype(np.float32) / 255 * (2**bits - 1)).astype(np.uint8)
    per_byte = 8 // bits
    padded = np.pad(levels, ((0, 0), (0, -levels.shape[1] % per_byte)))
    shifts = (8 - bits * (1 + np.arange(per_byte))).astype(np.uint8)
    packed = (padded.reshape(len(padded), -1, per_byte) << shifts).sum(axis=2).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in packed)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", grey.shape[1], grey.shape[0], bits, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def encodings(paper: np.ndarray) -> dict[str, bytes]:
    """A dark digit on paper (uint8 [H, W]) in the encodings whose decoding once differed
    between the paths: decode_png(channels=4) gave 1- to 4-bit pictures an alpha of 1-15, the
    WebP decoder refused 4 channels without alpha, libjpeg has no grey of CMYK, decode_bmp
    returns an 8-bit BMP's colour indices."""
    grey = Image.fromarray(paper, "L")
    ink = (paper.astype(np.float32) / 255)[..., None]
    blue = Image.fromarray(np.rint(ink * 255 + (1 - ink) * np.array([30, 50, 150])).astype(np.uint8), "RGB")
    return {
        "png-1-bit": _saved(grey.convert("1"), "PNG"),
        "png-2-bit-grey": _grey_png(paper, 2),
        "png-4-bit-grey": _grey_png(paper, 4),
        "png-16-colour-palette": _saved(blue.quantize(16), "PNG", bits=4),
        "webp-lossy": _saved(blue, "WEBP", quality=90),
        "webp-lossless": _saved(blue, "WEBP", lossless=True),
        "webp-grey": _saved(grey, "WEBP", quality=90),
        "jpeg-cmyk": _saved(blue.convert("CMYK"), "JPEG", quality=95),
        "bmp-8-bit-colour-table": _saved(blue.quantize(64), "BMP"),
    }


@pytest.mark.parametrize("name", sorted(encodings(np.zeros((8, 8), np.uint8))))
def test_every_encoding_gives_the_same_28x28_on_both_paths(name, graph, classifier, fixture_mnist):
    paper = 255 - np.kron(fixture_mnist.test.images[0], np.ones((8, 8), np.uint8))
    mine = assert_same(encodings(paper)[name], graph, name)
    # And the digit the plain 8-bit PNG gives: a decoder that misread the pixels the same way
    # on both paths would still show here.
    plain = pre.picture_to_mnist(png(paper))
    assert classifier.predict(mine[None]).argmax() == classifier.predict(plain[None]).argmax(), name


def test_bmps_the_graph_cannot_read_are_refused_with_the_same_reason(graph):
    data = _saved(Image.fromarray(255 - _blot(), "L").convert("1"), "BMP")  # 1 bit per pixel
    message = "BMP not accepted: 1 bits per pixel, compression 0, a 40-byte header"
    with pytest.raises(pre.PictureError, match=message):
        pre.picture_to_mnist(data)
    refused = graph(data)
    assert isinstance(refused, Exception) and message in refused.message, refused


def test_the_pixel_budget_admits_what_it_says(graph):
    # At the limit: accepted as far as the header goes (a blank picture is still refused, for
    # being blank, after decoding); one row more: refused before decoding.
    side = int(pre.MAX_PIXELS**0.5)
    assert pre.read_header(_png_header(side, side)).width == side
    with pytest.raises(pre.PictureError, match="picture too large"):
        pre.read_header(_png_header(side, side + 1))
    assert pre.read_header(jpeg_declaring(8000, 6000)).format == "jpeg"  # 48 MP JPEG: 1/8 scale
