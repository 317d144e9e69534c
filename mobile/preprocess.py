"""A picture of one handwritten digit into MNIST form: the specification, and its numpy + Pillow
implementation for the Raspberry Pi.

MNIST digits (LeCun et al.) were made like this: bilevel NIST scans, size-normalised to fit a
20x20 box keeping the aspect ratio (the anti-aliasing gives grey edges), then placed in a 28x28
field so that the centre of mass of the pixels sits at the centre; white digit, black
background. Real pictures (phone photos, canvas drawings, scans, chalk on a board) are brought
to that form by the steps below. This docstring is the one specification: this module
implements it with numpy + Pillow, `export/picture_graph.py` with core TensorFlow ops inside
the SavedModel's `serving_bytes` signature (so TF Serving itself runs it), step by step, with
the constants defined here. `tests/test_picture_parity.py` checks that both give the same
28x28 pictures.

Terms. `v` is grey in 0..1 (float32). A *ring* is the picture's border pixels (first and last
row and column). *Quantiles* are read off a histogram (`QUANTILE_BINS` bins over a stated
range; the centre of the first bin whose cumulative count reaches q of the total), the *MAD
noise* of values is 1.4826 x the median absolute deviation from their median. *resize* is the
separable triangle filter, antialiased when shrinking, with half-pixel centres (=
tf.image.resize(method="bilinear", antialias=True)). *box3* is the mean over the 3x3 window
around each pixel, windows clipped at the borders. A *running max/min* of odd size k takes
the extreme over the k pixels centred on each one, windows clipped at the borders. A
*closing* of size k (dark ink: running max then running min, both axes; light ink: min then
max) runs on a copy padded by k // 2 pixels of edge replication, then cropped back, or with
its windows clipped at the borders where step 7 says so.

 1. Header: the format from the file's signature: PNG, JPEG, BMP or WebP; GIF is refused
    (TensorFlow's GIF decoder decodes every frame of an animation, which no header bounds),
    so is animated WebP; anything else is "not an image". The declared width and height
    (PNG IHDR, JPEG SOF, BMP info header, WebP VP8/VP8L/VP8X) must be > 0 and their product
    at most MAX_PIXELS (MAX_JPEG_PIXELS for JPEG, decoded at reduced scale): a decompression
    bomb is refused before anything is decoded. A BMP must be what TensorFlow's BMP decoder
    reads right: an info header of 40 bytes or more, 24 or 32 bits per pixel or 8 with a
    colour table, uncompressed (BI_RGB, or BI_BITFIELDS with 32 bits).
 2. Decode. JPEG: libjpeg's grey (luma) channel with the accurate integer IDCT, at DCT scale
    1/r, r the largest of 8, 4, 2, 1 keeping the long side >= DECODE_SIDE (a CMYK or YCCK
    JPEG, 4 components, has no luma: libjpeg's RGB of it, then Pillow's CMYK -> L, grey =
    (19595 R + 38470 G + 7471 B + 32768) >> 16); then the EXIF
    orientation (tag 0x0112 of IFD0 in the first APP1 "Exif" segment among the APPn segments
    right after SOI, at most JPEG_MAX_SEGMENTS of them within the first EXIF_SEARCH_BYTES; 1
    if absent or out of range 1-8) is applied as Pillow's transposes do. PNG, WebP: RGBA,
    8 bits per channel (16-bit: the high byte; 1-, 2- and 4-bit grey scaled to 0..255; grey
    repeated into R, G and B; no alpha: opaque). BMP: RGB (8-bit: through its colour table).
    A truncated or corrupt file fails in the decoder; a PNG whose chunks, followed by their
    lengths from the signature, end before IEND is truncated (libpng refuses it).
 3. Grey. v = (0.299 R + 0.587 G + 0.114 B) / 255 (JPEG: its luma / 255). With alpha a =
    A / 255: when more than half of the ring is transparent (A < 128) the alpha is the ink (a
    canvas with strokes of any colour): v = 1 - a; otherwise v = a v + (1 - a) (composited on
    white). Then, when the long side L >= 2 DECODE_SIDE, v is averaged over k x k blocks, k =
    floor(L / DECODE_SIDE), the last < k rows and columns dropped.
 4. A 28x28 picture that already looks like MNIST (its 2-px border averages <= 32, median <=
    32, max >= 128 in 0-255, centre of mass within 2 px of the centre) is the answer as it is:
    uint8 rint(255 v). Every MNIST digit passes through byte for byte.
 5. Working copy: resize to long side WORK_SIDE when L > WORK_SIDE (sides rounded half to
    even, >= 1); when L < MIN_WORK_SIDE, enlarge by the integer factor ceil(MIN_WORK_SIDE / L).
 6. Polarity and stroke width. With L > POLARITY_HALF_ABOVE, three half-size copies (2x2
    blocks, the last odd row and column dropped): the block minimum (dark strokes keep their
    contrast however thin), maximum (light strokes) and mean; otherwise the working copy for
    all three. On log(copy + POLARITY_LOG_OFFSET): noise = MAD noise of (mean copy - box3 of
    it) (quantiles over [-1, 1]); threshold t = max(4 noise, POLARITY_MIN_CONTRAST). For each
    window k in POLARITY_WINDOWS the energy of the black top-hat (closing of the min copy -
    it) and of the white top-hat (max copy - its opening), sum(max(hat - t, 0)). The ink is
    the polarity whose energy reaches half its final (largest-window) value at a smaller
    window ("rises first"): strokes fill a top-hat as soon as the window is wider than they
    are, the paper between them only later. In order: a polarity whose final energy is under
    a tenth of the other's takes no part; rises 2 or more windows apart decide; else a clear
    border decides (border = where the ring's median lies between the picture's 0.01 and 0.99
    quantiles, 0..1; clear: the ring's 0.1-0.9 quantile spread under 0.25 of that span and
    the border outside 0.3-0.7; paper is bright when above); else the energies at the earlier
    rise (each + a floor of 5% of the largest final + 1e-3) when their ratio is beyond 1.2;
    else border >= 0.5 means dark ink. The ink's stroke window is the first window with 85% of
    its final energy; the background window is w = round(STROKE_WINDOW_MARGIN x stroke
    window x (2 if halved else 1)) | 1. When w reaches the cap c = max(7, round(
    BACKGROUND_WINDOW x L) | 1) (strokes filling the picture: a tight crop, whose paper gaps
    can be narrower than a bold digit's strokes) and the border is beyond 0.85 or under 0.15,
    the border decides the polarity (w is then the new ink's). The window is min(max(w, 7), c).
 7. Paper and illumination: the closing (dark ink; opening for light ink) of box3(v) with that
    window, twice: on a copy padded by edge replication (a shadow across the border keeps its
    sharp edge: unlike a blur, a closing keeps it) and with windows clipped at the borders;
    where the padded one is under BORDER_INK_RATIO x the clipped one (light ink: 1 - it, under
    BORDER_INK_RATIO x (1 - the clipped one)), the clipped one: there the padding extended ink
    cut by the border (a tight crop) outwards, and nothing else is that much darker than
    paper. With L > POLARITY_HALF_ABOVE this runs on the 2x2 block mean with window
    (size // 2) | 1 and is resized back to the working copy's size.
 8. Ink strength s: dark ink (background - v) / max(background, 0.05), light ink (v -
    background) / max(1 - background, 0.05): light and shadow cancel. Paper is the zero: of the
    median of box3(s) over the whole picture and over its ring (a tight crop's ink may cover
    most of it, seldom most of its border), the lower, with the MAD noise of the same set
    (quantiles over [-1, 1], noise >= 0.5/255). Ink pixels: box3(s) - zero > max(NOISE_SIGMAS
    noise, MIN_CONTRAST / 2); none, or a peak of box3(s) - zero under MIN_CONTRAST: no ink
    stands out. Stretch: core = the 0.9 quantile of the ink pixels' box3(s) - zero (over
    [0, 2]), low = min(max(2 noise, 0.1 core), 0.5 core), ink = clip((s - zero - low) / (core
    - low), 0, 1) (anti-aliased edges stay grey), noise' = noise / (core - low). When no ink
    stands out or step 9's mask (box3(ink) > max(0.35, 4 noise')) is empty, a second try: a
    tight crop whose ink covers much of its border makes the ring's median, or its MAD noise,
    the ink's. The ring's paper side: its values under b + PAPER_SIDE MIN_CONTRAST, b = the
    ring's PAPER_SIDE_LOW quantile (over [-1, 1]); its ink side: values >= b + PAPER_GAP
    MIN_CONTRAST. Usable when each holds at least PAPER_SIDE_MIN of the ring, the values
    between them (the gap) number at most PAPER_GAP_MAX times the smaller side, and along the
    ring, in _ring's order (first row, last row, first column, last column), "value >= b +
    (PAPER_SIDE + PAPER_GAP) / 2 MIN_CONTRAST" changes at most PAPER_MAX_CHANGES times
    (strokes cross a border a few times; noise crosses it often). Zero and noise are then the
    paper side's median and MAD noise (weighted quantiles over [-1, 1] and [0, 2]), and the
    stretch above is redone; when that finds ink standing out and a non-empty mask, it is
    the result. Otherwise the first try stands: with no ink standing out, "empty picture"
    (its peak in the message). A picture the first try reads is never touched.
 9. The digit: mask = box3(ink) > max(0.35, 4 noise'). Its 8-connected components (with L >
    POLARITY_HALF_ABOVE those of its 2x2 block-any copy, padded with unset pixels to even
    sides: faster, and nothing a digit needs is closer than 2 px), ordered by area (ties: the
    first pixel in raster order). The largest is kept; then, in order (at most
    MAX_COMPONENTS in all), each one of at least SPECK_FRACTION of the largest's area is kept
    if it lies within NEAR x (the kept box's long side) of the kept box (which then grows to
    include it), or is at least FAR_FRACTION of the largest; smaller ones are specks. The
    kept mask is the mask's pixels in kept components. Not digit-like (refused, "no
    digit-like ink"): a kept box whose long side is under MIN_DIGIT_SIDE px, wider than
    MAX_WIDTH_RATIO x its height (a line, a word), or squarish (0.5-2) and ink-coloured in
    more than MAX_FILL of its pixels or more than MAX_ROUND_FILL of those of the ellipse
    inscribed in it (a blot, square or round; ink-coloured: v past the middle between the
    paper, the ring's median, and the ink, the box's 0.05 quantile for dark ink, 0.95 for
    light ink; quantiles over [0, 1]; the ellipse: the pixels whose centres satisfy
    (2y + 1 - h)^2 w^2 + (2x + 1 - w)^2 h^2 <= h^2 w^2 in the h x w box).
10. Crop: ink within an octagon of radius 2 around the kept mask (dilation: 3x3 square, then
    cross), cut to the rows and columns where it exceeds 0.05.
11. Strokes: width = 2 x area / (pi/4 x 4-neighbour edge count) of the kept mask in the crop.
    When the crop's long side is >= 8 and the width under THIN_STROKE x long side, the crop is
    padded by grow = round((MNIST_STROKE x long side - width) / 2) and dilated grow times
    (alternately 3x3 square and cross, starting with the square), towards MNIST's stroke width.
12. Fit: resize so the long side is 20 (sides rounded half to even, >= 1), clip to 0..1.
13. Place: in a 28x28 field at (round(14 - centre of mass row), round(14 - centre of mass
    column)), both clipped to keep it whole; uint8 rint(255 x value).

Errors are `PictureError`s, named by what is wrong: "not an image", "GIF pictures are not
accepted", "picture too large", "corrupt or truncated image", "empty picture", "no digit-like
ink". Everything here takes bytes or arrays and returns arrays; `read_picture` and
`load_grey` are the only functions that read files.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow >= 9.1 has Image.Resampling; older Pillows (Debian's python3-pil) have the constants.
_Resampling = getattr(Image, "Resampling", Image)
_Transpose = getattr(Image, "Transpose", Image)

MNIST_SIZE = 28  # the field
MNIST_BOX = 20  # the digit's long side inside it

# --- 1. header -----------------------------------------------------------------------------
# Pixel budget of a decoded picture: 4096 x 4096. A 12-MP phone photo (4032 x 3024) is JPEG,
# decoded at 1/4 scale; the budget bounds PNG, BMP and WebP, which decode at full size.
MAX_PIXELS = 4096 * 4096
# JPEG decodes at 1/2-1/8 scale (step 2): up to 8192 x 8192 declared (64 MP, 1 MP decoded).
MAX_JPEG_PIXELS = 8192 * 8192
# Bytes read at most from a file (a 64-MP JPEG is rarely over 40 MB).
MAX_FILE_BYTES = 64 * 2**20
# APPn segments of a JPEG searched for the EXIF orientation, in its first bytes (APP1 "Exif"
# is at most 64 KiB and comes right after SOI, or after JFIF's APP0).
JPEG_MAX_SEGMENTS = 8
EXIF_SEARCH_BYTES = 131072
# IFD0 entries read at most when looking for the orientation tag.
EXIF_MAX_ENTRIES = 64

# --- 2-5. decode and working copy ----------------------------------------------------------
# Long side kept when decoding: JPEGs decode at the largest DCT scale keeping it (a DCT-scaled
# decode averages, so thin strokes keep their ink), other formats are block-averaged down
# towards it; the working copy is then resized from at most twice this.
DECODE_SIDE = 256
# Working resolution: long side of the copy the analysis runs on. A digit covering a tenth of
# the photo's height is still ~25 px there, more than the 20 px it ends at.
WORK_SIDE = 256
# Small pictures (e.g. 28x28 dark-on-light) are enlarged to at least this long side, so the
# analysis' window sizes stay meaningful.
MIN_WORK_SIDE = 112

# --- 6. polarity -----------------------------------------------------------------------------
# Working copies with a longer side are analysed for polarity (and their background) at half size.
POLARITY_HALF_ABOVE = 128
# Window sizes (pixels of the polarity copy) tried when looking for the ink's polarity and width.
POLARITY_WINDOWS = (3, 5, 9, 17, 33)
# Top-hat values below this (log units) are paper texture and JPEG noise, not ink.
POLARITY_MIN_CONTRAST = 0.2
# log(v + offset): the offset keeps sensor noise on a dark background from being amplified
# into "contrast".
POLARITY_LOG_OFFSET = 0.1
# The paper estimate's window is this many times the window that just holds the strokes...
STROKE_WINDOW_MARGIN = 3.0
# ...at most this fraction of the working copy's long side (a bold digit filling a tight crop
# needs about half of it).
BACKGROUND_WINDOW = 0.5
# A background estimate (edge-padded closing) darker than this fraction of the one with
# clipped windows is ink cut by the border (a tight crop), darker than any shadow (photos'
# shadows take 20-50% of the light).
BORDER_INK_RATIO = 0.45

# --- 8. ink ----------------------------------------------------------------------------------
MIN_CONTRAST = 0.10  # weaker than this everywhere = a blank picture
NOISE_SIGMAS = 4.0  # ink must stand this many noise sigmas above the paper
QUANTILE_BINS = 2048  # histogram bins of every quantile
# Step 8's second try, the ring's paper side: values under its PAPER_SIDE_LOW quantile +
# PAPER_SIDE x MIN_CONTRAST; the ink side: from that quantile + PAPER_GAP x MIN_CONTRAST. Each
# at least PAPER_SIDE_MIN of the ring, the gap between them at most PAPER_GAP_MAX x the
# smaller, and at most PAPER_MAX_CHANGES changes from one to the other along the ring: a
# digit's strokes cross a tight crop's border a few times per side (bold 1s and 7s: 4-16
# changes, gap 0-0.26), noise crosses it at random (20-80 changes, gap 0.3-0.7).
PAPER_SIDE_LOW = 0.1
PAPER_SIDE_MIN = 0.2
PAPER_SIDE = 2.0
PAPER_GAP = 3.0
PAPER_GAP_MAX = 0.3
PAPER_MAX_CHANGES = 18

# --- 9. the digit ----------------------------------------------------------------------------
# Components smaller than this fraction of the largest are specks; up to FAR_FRACTION they
# must also lie near the digit's box (within NEAR of its long side) to be kept.
SPECK_FRACTION = 0.04
FAR_FRACTION = 0.30
NEAR = 0.25
# Digit-like: MNIST's 60,000 training digits (pixels > 0.35) have width/height <= 2.5 and,
# when squarish, fill <= 0.87 of their box.
MIN_DIGIT_SIDE = 6
MAX_WIDTH_RATIO = 3.0
MAX_FILL = 0.92
# ...and fill <= 0.949 of the ellipse inscribed in their box (3 of 54,967 squarish ones over
# 0.92); a filled disk fills all of it (and only 79% of its box).
MAX_ROUND_FILL = 0.95
# Components the keep rule looks at, largest first (the rest are specks in any real picture).
MAX_COMPONENTS = 64

# --- 11. strokes -----------------------------------------------------------------------------
# MNIST's median stroke width is 12.5% of the digit's long side (10th percentile 9%, measured
# on 3000 training digits upscaled x4 with the estimator of step 11); strokes thinner than
# THIN_STROKE are thickened towards MNIST_STROKE.
MNIST_STROKE = 0.125
THIN_STROKE = 0.11

# Format codes, in the order picture_graph.py numbers them.
FORMATS = ("png", "jpeg", "bmp", "webp")


class PictureError(ValueError):
    """A picture that cannot be classified: not an image, too large, truncated, blank, no
    digit. The message says which."""


@dataclass(frozen=True)
class Header:
    """What a picture's header declares: format (one of FORMATS), width and height in pixels."""

    format: str
    width: int
    height: int


# --------------------------------------------------------------------------------------------
# 1. Header
# --------------------------------------------------------------------------------------------
def picture_format(data: bytes) -> str:
    """The format of encoded picture bytes, from their signature: one of FORMATS.

    Raises PictureError for GIF, animated WebP and anything that is not a picture.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02:
            raise PictureError("animated WebP pictures are not accepted: send one frame as PNG or JPEG")
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        raise PictureError(
            "GIF pictures are not accepted (TensorFlow's GIF decoder decodes every frame of an "
            "animation, which no header bounds): send PNG or JPEG"
        )
    start = data[:8].hex(" ") if data else "nothing"
    raise PictureError(f"not an image (expected PNG, JPEG, BMP or WebP; the data starts with {start})")


def _u16le(b: bytes, i: int) -> int:
    return b[i] | b[i + 1] << 8


def read_header(data: bytes) -> Header:
    """Format and declared size of encoded picture bytes, without decoding (step 1).

    PNG: IHDR; BMP: the info header (12-byte OS/2 header: 16-bit sizes); WebP: the VP8, VP8L
    or VP8X chunk; JPEG: the SOF segment (_jpeg_frame_size). Raises PictureError when
    the format is not accepted, the header is cut short, a side is 0, or the pixel budget
    (MAX_PIXELS, MAX_JPEG_PIXELS) is exceeded.
    """
    fmt = picture_format(data)
    short = PictureError(f"corrupt or truncated image (its {fmt.upper()} header is cut short)")
    if fmt == "png":
        if len(data) < 24:
            raise short
        width, height = struct.unpack(">II", data[16:24])
    elif fmt == "bmp":
        if len(data) < 34:
            raise short
        if struct.unpack("<I", data[14:18])[0] == 12:
            width, height = _u16le(data, 18), _u16le(data, 20)
        else:
            width, height = struct.unpack("<ii", data[18:26])
            width, height = abs(width), abs(height)  # negative height: stored top-down
    elif fmt == "webp":
        if len(data) < 30:
            raise short
        chunk = data[12:16]
        if chunk == b"VP8X":
            width = 1 + (data[24] | data[25] << 8 | data[26] << 16)
            height = 1 + (data[27] | data[28] << 8 | data[29] << 16)
        elif chunk == b"VP8L":
            bits = struct.unpack("<I", data[21:25])[0]
            width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        else:  # "VP8 ": the key frame's 14-bit sizes
            width, height = _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF
    else:
        width, height = _jpeg_frame_size(data)
    check_budget(Header(fmt, int(width), int(height)))
    if fmt == "bmp":
        _check_bmp(data)
    return Header(fmt, int(width), int(height))


def _check_bmp(data: bytes) -> None:
    """Raise PictureError for a BMP that TensorFlow's BMP decoder would misread or refuse
    (step 1): it reads 24- and 32-bit pixels and 8-bit indices (the graph applies their colour
    table), uncompressed, after an info header of 40 bytes or more (decode_bmp_op.cc)."""
    header_size = struct.unpack("<I", data[14:18])[0]
    core = header_size < 40  # OS/2's 12-byte header: the bit count at offset 24, no compression
    bits = _u16le(data, 24 if core else 28)
    compression = 0 if core else struct.unpack("<I", data[30:34])[0]
    if core or bits not in (8, 24, 32) or compression not in (0, 3) or (compression == 3 and bits != 32):
        raise PictureError(
            f"BMP not accepted: {bits} bits per pixel, compression {compression}, a {header_size}-byte "
            f"header (accepted: 8, 24 or 32 bits per pixel, uncompressed, a header of 40 bytes or "
            f"more): send PNG or JPEG"
        )


def _check_png_chunks(data: bytes) -> None:
    """Raise PictureError when a PNG's chunks, followed by their lengths from the signature,
    end before IEND (step 2: libpng, TensorFlow's decoder, refuses such a file; Pillow would
    read what is there)."""
    pos = 8
    while pos + 8 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if end > len(data):
            break
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end
    raise PictureError("corrupt or truncated image (its PNG chunks end before IEND)")


# JPEG start-of-frame markers (ITU T.81 table B.1): SOF0-3, 5-7, 9-11, 13-15; C4 (DHT), C8
# (JPG) and CC (DAC) share the range but are no frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF segment, walking the marker segments from SOI (as
    TensorFlow's extract_jpeg_shape does in the graph). Raises PictureError when the file
    ends, or its scan starts, before a frame header."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS before any frame header
            break
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise PictureError("corrupt or truncated image (its JPEG frame header is missing or cut short)")


def check_budget(header: Header) -> None:
    """Raise PictureError when a declared size is empty or over the pixel budget (step 1)."""
    if header.width <= 0 or header.height <= 0:
        raise PictureError(f"empty picture ({header.width}x{header.height} pixels)")
    limit = MAX_JPEG_PIXELS if header.format == "jpeg" else MAX_PIXELS
    if header.width * header.height > limit:
        raise PictureError(
            f"picture too large: {header.width}x{header.height} pixels declared, over the "
            f"{limit / 1e6:.1f}-megapixel limit for {header.format.upper()} (refused before "
            f"decoding; downscale it)"
        )


def jpeg_scale(width: int, height: int) -> int:
    """The DCT scale denominator r (8, 4, 2 or 1) of step 2 for a JPEG of this size."""
    long_side = max(width, height)
    for r in (8, 4, 2):
        if -(-long_side // r) >= DECODE_SIDE:
            return r
    return 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of JPEG bytes, 1 when there is none (step 2).

    Walks the APPn segments right after SOI (at most JPEG_MAX_SEGMENTS, within the first
    EXIF_SEARCH_BYTES) for the first APP1 segment starting "Exif\\0\\0", then reads tag 0x0112
    among the first EXIF_MAX_ENTRIES entries of its TIFF IFD0 (either byte order).
    """
    data = data[:EXIF_SEARCH_BYTES]
    pos = 2
    for _ in range(JPEG_MAX_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF or not 0xE0 <= data[pos + 1] <= 0xEF:
            return 1  # EXIF comes first, among the APPn segments right after SOI
        length = data[pos + 2] << 8 | data[pos + 3]
        if data[pos + 1] == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 1
    if len(tiff) < 8:
        return 1
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = min(struct.unpack(order + "H", tiff[ifd : ifd + 2])[0], EXIF_MAX_ENTRIES)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if struct.unpack(order + "H", tiff[entry : entry + 2])[0] == 0x0112:
            value = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


# What each EXIF orientation asks for (Pillow's names; picture_graph.py mirrors them).
_ORIENTATION_TRANSPOSE = {
    2: _Transpose.FLIP_LEFT_RIGHT, 3: _Transpose.ROTATE_180, 4: _Transpose.FLIP_TOP_BOTTOM,
    5: _Transpose.TRANSPOSE, 6: _Transpose.ROTATE_270, 7: _Transpose.TRANSVERSE,
    8: _Transpose.ROTATE_90,
}


# --------------------------------------------------------------------------------------------
# 2-3. Decode and grey
# --------------------------------------------------------------------------------------------
def decode(data: bytes) -> np.ndarray:
    """Encoded picture bytes -> grey v float32 [H, W] in 0..1 (steps 1-3).

    Raises PictureError (see the module docstring) for pictures that cannot be decoded.
    """
    header = read_header(data)
    if header.format == "png":
        _check_png_chunks(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if header.format == "jpeg":
                r = jpeg_scale(header.width, header.height)
                # draft() picks the DCT scale giving at least the requested size: asking for
                # (W // r, H // r) gives exactly 1/r; "L" = libjpeg's own luma channel.
                img.draft("L", (header.width // r, header.height // r))
                img.load()
                if img.mode != "L":  # CMYK (Adobe's inverted form read as such): via RGB
                    img = img.convert("L")
                transpose = _ORIENTATION_TRANSPOSE.get(jpeg_orientation(data))
                if transpose is not None:
                    img = img.transpose(transpose)
                return reduce_grey(np.asarray(img, dtype=np.float32) / np.float32(255.0))
            img.load()
            return grey_from_pixels(_rgba(img, header.format))
    except PictureError:
        raise
    except Image.DecompressionBombError as err:
        raise PictureError(f"picture too large ({err})") from err
    except Image.UnidentifiedImageError as err:  # an OSError, whose text holds the BytesIO's repr
        # Its signature and header were read above: the rest is damaged.
        raise PictureError(f"corrupt or truncated image (Pillow cannot read this {header.format.upper()})") from err
    except (SyntaxError, OSError, ValueError, EOFError, struct.error) as err:
        raise PictureError(f"corrupt or truncated image ({err})") from err


def _rgba(img: Image.Image, fmt: str) -> np.ndarray:
    """A decoded PNG/WebP/BMP as uint8 [H, W, 4], as TensorFlow's decoders give it."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: the high byte (what libpng's strip_16 keeps).
        grey = (np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8)
        img = Image.fromarray(grey, "L")
    if fmt == "bmp":
        img = img.convert("RGB")  # TF's decode_bmp(channels=3): a fourth channel is ignored
    return np.asarray(img.convert("RGBA"), dtype=np.uint8)


def grey_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1|3|4] (RGB(A) order) -> grey v float32 [H, W] (step 3)."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        v = pixels.astype(np.float32) / np.float32(255.0)
        return reduce_grey(v)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise PictureError(f"expected a picture [H, W] or [H, W, 3|4], got shape {list(pixels.shape)}")
    rgb = pixels[:, :, :3].astype(np.float32)
    v = (np.float32(0.299) * rgb[:, :, 0] + np.float32(0.587) * rgb[:, :, 1]
         + np.float32(0.114) * rgb[:, :, 2]) / np.float32(255.0)
    if pixels.shape[2] == 4:
        alpha = pixels[:, :, 3]
        a = alpha.astype(np.float32) / np.float32(255.0)
        if 2 * int((_ring(alpha) < 128).sum()) > _ring(alpha).size:
            v = np.float32(1.0) - a  # transparent background: the alpha is the ink
        else:
            v = a * v + (np.float32(1.0) - a)
    return reduce_grey(v.astype(np.float32))


def reduce_grey(v: np.ndarray) -> np.ndarray:
    """Block-average v [H, W] by k = floor(L / DECODE_SIDE) when k >= 2 (end of step 3)."""
    h, w = v.shape
    if h == 0 or w == 0:
        raise PictureError(f"empty picture ({w}x{h} pixels)")
    k = max(h, w) // DECODE_SIDE
    if k < 2:
        return v
    hk, wk = max(1, h // k), max(1, w // k)
    if h < k or w < k:  # a strip thinner than a block: average what there is
        return _resize(v, hk, wk)
    return v[: hk * k, : wk * k].reshape(hk, k, wk, k).mean(axis=(1, 3), dtype=np.float32)


def _ring(values: np.ndarray) -> np.ndarray:
    """The border pixels of [H, W]: first and last row, first and last column (corners twice)."""
    return np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])


# --------------------------------------------------------------------------------------------
# Primitives (each has a TensorFlow twin in export/picture_graph.py)
# --------------------------------------------------------------------------------------------
def _resize_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangle-filter taps (indices int [n_out, span], weights float32 [n_out, span]) of
    tf.image.resize(method="bilinear", antialias=True) along one axis (TensorFlow's
    scale_and_translate_op.cc: half-pixel centres, kernel widened by 1/scale when shrinking,
    taps clipped to the input and renormalised)."""
    scale = n_out / n_in
    inv = 1.0 / scale
    kernel_scale = max(inv, 1.0)
    span = min(2 * int(math.ceil(kernel_scale)) + 1, n_in)
    sample = (np.arange(n_out, dtype=np.float64) + 0.5) * inv
    start = np.clip(np.ceil(sample - kernel_scale - 0.5), 0, n_in - 1).astype(np.int64)
    end = np.clip(np.floor(sample + kernel_scale - 0.5), 0, n_in - 1).astype(np.int64) + 1
    index = start[:, None] + np.arange(span)[None, :]
    valid = index < end[:, None]
    weight = np.maximum(0.0, 1.0 - np.abs((index + 0.5 - sample[:, None]) / kernel_scale)) * valid
    total = weight.sum(axis=1, keepdims=True)
    weight = np.where(total > 0, weight / np.where(total > 0, total, 1.0), 0.0)
    return np.minimum(index, n_in - 1), weight.astype(np.float32)


def _resize(values: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float32 [H, W] -> [out_h, out_w] with the triangle filter (see the module docstring)."""
    h, w = values.shape
    out = values
    if out_h != h:
        index, weight = _resize_weights(h, out_h)
        out = np.einsum("os,osw->ow", weight, out[index], dtype=np.float32)
    if out_w != w:
        index, weight = _resize_weights(w, out_w)
        out = np.einsum("os,hos->ho", weight, out[:, index], dtype=np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


def _box3(values: np.ndarray) -> np.ndarray:
    """Mean over the 3x3 window around each pixel, windows clipped at the borders: sums of
    three shifted copies down the columns, then along the rows, divided by how many pixels
    each window holds (the graph's box3 adds in the same order)."""
    values = values.astype(np.float32)
    padded = np.pad(values, ((1, 1), (0, 0)))
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    padded = np.pad(rows, ((0, 0), (1, 1)))
    total = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return total / (_window_counts(values.shape[0])[:, None] * _window_counts(values.shape[1])[None, :])


def _window_counts(n: int) -> np.ndarray:
    """float32 [n]: how many of the 3 pixels centred on each of n lie inside (2 at the ends)."""
    counts = np.full(n, 3, np.float32)
    counts[0] -= 1
    counts[-1] -= 1  # n == 1: the same pixel, 1
    return counts


def _blocks(values: np.ndarray, op: str) -> np.ndarray:
    """2x2 block min / max / mean of [H, W] (the last odd row and column dropped).

    The four pixels of each block are four strided views (a reduction over a [h, 2, w, 2]
    reshape is 10-30x slower); the mean adds them in the order of TensorFlow's 2x2 average
    pooling, so both implementations give the same float32 values.
    """
    h, w = values.shape[0] // 2, values.shape[1] // 2
    top_left, top_right = values[0 : 2 * h : 2, 0 : 2 * w : 2], values[0 : 2 * h : 2, 1 : 2 * w : 2]
    bottom_left, bottom_right = values[1 : 2 * h : 2, 0 : 2 * w : 2], values[1 : 2 * h : 2, 1 : 2 * w : 2]
    if op == "min":
        return np.minimum(np.minimum(top_left, top_right), np.minimum(bottom_left, bottom_right))
    if op == "max":
        return np.maximum(np.maximum(top_left, top_right), np.maximum(bottom_left, bottom_right))
    total = ((top_left + top_right) + bottom_left) + bottom_right
    return (total / np.float32(4.0)).astype(np.float32)


def _running(values: np.ndarray, size: int, axis: int, op: np.ufunc) -> np.ndarray:
    """Max or min (`op`) over the centred window of odd `size` along `axis`, windows clipped.

    Doubling: after n steps level[j] = op(padded[j : j + 2**n]); two overlapping windows of
    the largest power of two <= size then cover any window. log2(size) array operations.
    """
    half = size // 2
    if half == 0:
        return values
    moved = np.moveaxis(values, axis, 0)
    n = moved.shape[0]
    fill = np.full((half, *moved.shape[1:]), -np.inf if op is np.maximum else np.inf, moved.dtype)
    level, span = np.concatenate([fill, moved, fill], 0), 1
    while span * 2 <= size:
        level = op(level[:-span], level[span:])
        span *= 2
    out = op(level[:n], level[size - span : size - span + n])
    return np.moveaxis(out, 0, axis)


def _closing(values: np.ndarray, size: int, dark_ink: bool, pad_edges: bool = True) -> np.ndarray:
    """Grey closing (dark ink: max then min) or opening (light ink) with a size x size square,
    on a copy padded by size // 2 pixels of edge replication (`pad_edges`; else the windows
    are clipped at the borders).

    Removes strokes narrower than `size` and keeps everything broader: paper, gradients and the
    sharp edge of a shadow. The padding lets the second pass use windows centred outside the
    picture: clipping them instead fills the wedge between a shadow edge and the border with
    "paper" from the lit side, which then reads as ink. (Padding by more changes nothing: the
    replicated pixels all equal the edge pixel every such window already holds.)
    """
    first, second = (np.maximum, np.minimum) if dark_ink else (np.minimum, np.maximum)
    pad = size // 2 if pad_edges else 0
    out = np.pad(values, pad, mode="edge") if pad else values
    for op in (first, second):
        out = _running(_running(out, size, 0, op), size, 1, op)
    return out[pad : pad + values.shape[0], pad : pad + values.shape[1]] if pad else out


def _quantile(values: np.ndarray, q: float, lo: float, hi: float, weights: np.ndarray | None = None) -> float:
    """The q quantile of `values` (optionally weighted 0/1) from a QUANTILE_BINS-bin histogram
    over [lo, hi] (values outside fall into the end bins): the centre of the first bin whose
    cumulative count reaches q of the total."""
    values = np.asarray(values, dtype=np.float32).ravel()
    scale = np.float32(QUANTILE_BINS / (hi - lo))
    index = np.clip(np.floor((values - np.float32(lo)) * scale), 0, QUANTILE_BINS - 1).astype(np.int64)
    counts = np.bincount(index, weights=None if weights is None else np.asarray(weights, np.float32).ravel(),
                         minlength=QUANTILE_BINS).astype(np.float32)
    cumulative = np.cumsum(counts, dtype=np.float32)
    target = np.float32(q) * cumulative[-1]
    k = int(np.argmax(cumulative >= target))
    return float(np.float32(lo) + (np.float32(k) + np.float32(0.5)) / scale)


def _median_mad(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """(median, MAD noise) of values, both from _quantile over [lo, hi]."""
    median = _quantile(values, 0.5, lo, hi)
    spread = _quantile(np.abs(np.asarray(values, np.float32) - np.float32(median)), 0.5, 0.0, hi - lo)
    return median, 1.4826 * spread


def _dilate(values: np.ndarray, steps: int) -> np.ndarray:
    """Grey dilation by an octagon: `steps` passes of a 3x3 max, alternately the square (first)
    and the cross; borders clipped."""
    out = values
    for i in range(int(steps)):
        padded = np.pad(out, 1, mode="constant", constant_values=-np.inf if out.dtype.kind == "f" else 0)
        h, w = out.shape
        cross = np.maximum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                   padded[1:-1, :-2], padded[1:-1, 2:]])
        if i % 2 == 0:
            cross = np.maximum.reduce([cross, padded[:-2, :-2], padded[:-2, 2:], padded[2:, :-2], padded[2:, 2:]])
        out = cross[:h, :w]
    return out


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------
def looks_like_mnist(grey: np.ndarray, size: int = MNIST_SIZE) -> bool:
    """Step 4: True for a size x size uint8 picture with a dark border, a bright digit, centred.

    Every MNIST test and training digit passes: their 2-px border averages <= 12 and their
    centre of mass lies within 0.5 px of (14, 14). Thresholds leave room for hand-made ones.
    """
    if grey.shape != (size, size) or grey.dtype != np.uint8:
        return False
    values = grey.astype(np.float32)
    ring = np.ones(grey.shape, bool)
    ring[2:-2, 2:-2] = False
    if values[ring].mean() > 32 or np.median(values) > 32 or values.max() < 128:
        return False
    mass = values.sum()
    ys, xs = np.indices(grey.shape)
    com_y, com_x = (values * ys).sum() / mass, (values * xs).sum() / mass
    centre = size / 2
    return bool(abs(com_y - centre) <= 2.0 and abs(com_x - centre) <= 2.0)


def working_copy(v: np.ndarray) -> np.ndarray:
    """Step 5: grey v [H, W] -> float32 [h, w] with MIN_WORK_SIDE <= long side <= WORK_SIDE."""
    h, w = v.shape
    long_side = max(h, w)
    if long_side > WORK_SIDE:
        scale = WORK_SIDE / long_side
        return _resize(v, max(1, round(h * scale)), max(1, round(w * scale)))
    if long_side < MIN_WORK_SIDE:
        factor = -(-MIN_WORK_SIDE // long_side)
        return _resize(v, h * factor, w * factor)
    return v.astype(np.float32)


def polarity_and_window(work: np.ndarray) -> tuple[bool, int]:
    """Step 6: (dark_ink, background window size) of a working copy float32 [h, w]."""
    h, w = work.shape
    halved = max(h, w) > POLARITY_HALF_ABOVE
    if halved:
        dark_copy, light_copy, mean_copy = _blocks(work, "min"), _blocks(work, "max"), _blocks(work, "mean")
    else:
        dark_copy = light_copy = mean_copy = work
    offset = np.float32(POLARITY_LOG_OFFSET)
    log_dark, log_light, log_mean = (np.log(c + offset).astype(np.float32) for c in (dark_copy, light_copy, mean_copy))
    _, noise = _median_mad(log_mean - _box3(log_mean), -1.0, 1.0)
    threshold = np.float32(max(4.0 * noise, POLARITY_MIN_CONTRAST))
    energies: dict[bool, list[float]] = {True: [], False: []}  # dark_ink -> energy per window
    for black, white in top_hats(log_dark, log_light):
        energies[True].append(float(np.maximum(black - threshold, 0).sum(dtype=np.float32)))
        energies[False].append(float(np.maximum(white - threshold, 0).sum(dtype=np.float32)))
    border, border_clear = _border(work)
    dark_ink = _decide_polarity(energies, border, border_clear)
    top = max(7, int(round(BACKGROUND_WINDOW * max(h, w))) | 1)

    def window(dark: bool) -> int:
        ink_energy = energies[dark]
        stroke = next(k for k, e in zip(POLARITY_WINDOWS, ink_energy) if e >= 0.85 * ink_energy[-1])
        return int(round(STROKE_WINDOW_MARGIN * stroke * (2 if halved else 1))) | 1

    if window(dark_ink) >= top and (border > 0.85 or border < 0.15):
        # Strokes as wide as a sixth of the picture (a tight crop of a bold digit, whose paper
        # gaps can be narrower than its strokes) and a border at one extreme: the border,
        # paper wherever the ink does not touch it, decides.
        dark_ink = border > 0.85
    return dark_ink, int(min(max(window(dark_ink), 7), top))


# Edge replication step 6's top-hats pad their stack by: twice the largest half-window.
TOP_HAT_PAD = 2 * (max(POLARITY_WINDOWS) // 2)


def top_hats(log_dark: np.ndarray, log_light: np.ndarray) -> np.ndarray:
    """Step 6's black top-hats of `log_dark` (its closing minus it) and white top-hats of
    `log_light` (it minus its opening) for every window in POLARITY_WINDOWS: float32
    [windows, 2, H, W], equal to what _closing gives window by window (see top_hat_ladder).
    """
    stack = np.stack([log_dark, -log_light]).astype(np.float32)
    padded = np.pad(stack, ((0, 0), (TOP_HAT_PAD, TOP_HAT_PAD), (TOP_HAT_PAD, TOP_HAT_PAD)), mode="edge")
    return np.stack(top_hat_ladder(stack, padded, *log_dark.shape, np.maximum, np.minimum))


def top_hat_ladder(stack, padded, h, w, maximum, minimum) -> list:
    """The passes of step 6's top-hats, for numpy arrays here and for tensors in the graph
    (export/picture_graph.py): `stack` [2, h, w] = [log_dark, -log_light], `padded` = it with
    TOP_HAT_PAD pixels of edge replication on each side, `maximum`/`minimum` the library's
    elementwise extremes (h and w: ints, or scalar tensors where shapes are dynamic). Returns
    one [2, h, w] per window of POLARITY_WINDOWS: (closing of the stack) - stack, i.e. the
    black top-hat of log_dark and the white top-hat of log_light.

    The white top-hat of x is the black top-hat of -x, so both copies close together. The
    windows are 2**j + 1 pixels: the running max of 2**j x 2**j blocks is shared by all
    windows (one pairwise max per doubling and axis), a window of 2**j + 1 is two such blocks
    one pixel apart, and only the part the min pass needs is kept. With the padding every pass
    takes whole ("valid") windows, without fills or clipping (more replication than a window
    reaches changes nothing). Uses slicing and the two extremes only.
    """
    pad = TOP_HAT_PAD
    blocks = padded  # max over 1x1 blocks
    hats = []
    span = 1
    for k in POLARITY_WINDOWS:
        reach = k - 1  # a power of two: the window is reach + 1 pixels
        assert reach & (reach - 1) == 0, "POLARITY_WINDOWS must be 2**j + 1"
        while span < reach:
            blocks = _valid_pair(blocks, span, maximum)
            span *= 2
        grown = _valid_pair(blocks, 1, maximum)  # [i, j]: window centred at (i, j) + reach / 2
        # The min pass at the picture's pixels reads the max at +- reach / 2 around them.
        closed = grown[:, pad - reach : pad + h, pad - reach : pad + w]
        step = 1
        while step < reach:
            closed = _valid_pair(closed, step, minimum)
            step *= 2
        hats.append(_valid_pair(closed, 1, minimum) - stack)
    return hats


def _valid_pair(values, shift: int, extreme):
    """extreme of [C, H, W] and itself shifted by `shift` along axes 1 and 2, valid part only:
    [C, H - shift, W - shift] (blocks of s x s pixels -> of (s + shift) x (s + shift))."""
    values = extreme(values[:, :-shift], values[:, shift:])
    return extreme(values[:, :, :-shift], values[:, :, shift:])


def _border(work: np.ndarray) -> tuple[float, bool]:
    """(where the ring's median lies between the picture's 1% and 99% quantiles, 0..1;
    whether the ring is clear: its 10-90% spread under 0.25 of that span and its median
    outside the middle 0.3-0.7)."""
    ring = _ring(work)
    low, high = _quantile(work, 0.01, 0.0, 1.0), _quantile(work, 0.99, 0.0, 1.0)
    span = max(high - low, 1e-6)
    ring_low, ring_median, ring_high = (_quantile(ring, q, 0.0, 1.0) for q in (0.1, 0.5, 0.9))
    border = (ring_median - low) / span
    return border, bool((ring_high - ring_low) / span < 0.25 and (border > 0.7 or border < 0.3))


def _decide_polarity(energies: dict[bool, list[float]], border: float, border_clear: bool) -> bool:
    """The decision of step 6 from the top-hat energies and the working copy's border.

    The picture's border is almost always paper: where its median lies between the darkest
    and the brightest pixels says which side the paper is on. Only a uniform border counts
    (a shadow across it puts its median anywhere).
    """
    finals = {p: energies[p][-1] for p in (True, False)}
    largest = max(finals.values())
    rise = {p: next((i for i, e in enumerate(energies[p]) if e >= 0.5 * finals[p]), 0) for p in finals}
    competing = [p for p in (True, False) if finals[p] >= 0.1 * largest]
    i = min(rise[p] for p in competing)
    floor = 0.05 * largest + 1e-3
    ratio = (energies[True][i] + floor) / (energies[False][i] + floor)
    if len(competing) == 1:
        return competing[0]
    if abs(rise[True] - rise[False]) >= 2:
        return rise[True] < rise[False]
    if border_clear and 0.1 < ratio < 10:
        # Close call, e.g. a bold stroke in a tight crop whose paper margins are as narrow as
        # the stroke: a clear border decides.
        return border > 0.7
    if abs(math.log(ratio)) > math.log(1.2):
        return ratio > 1
    return border >= 0.5


def background(work: np.ndarray, dark_ink: bool, size: int) -> np.ndarray:
    """Step 7: paper and illumination float32 [h, w] under a working copy."""
    base = _box3(work)
    halved = max(work.shape) > POLARITY_HALF_ABOVE
    if halved:
        base, size = _blocks(base, "mean"), (size // 2) | 1
    padded = _closing(base, size, dark_ink, pad_edges=True)
    clipped = _closing(base, size, dark_ink, pad_edges=False)
    if dark_ink:
        cut = padded < np.float32(BORDER_INK_RATIO) * clipped
    else:
        cut = np.float32(1.0) - padded < np.float32(BORDER_INK_RATIO) * (np.float32(1.0) - clipped)
    paper = np.where(cut, clipped, padded)
    return _resize(paper, *work.shape) if halved else paper


def ink_strength(work: np.ndarray, dark_ink: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 7-8: working copy float32 [h, w] and step 6's findings -> (ink float32 [h, w]
    in 0..1, step 9's mask bool [h, w]), the mask computed once: step 8's second try needs it.

    0 = paper, 1 = the ink's typical core strength. Raises PictureError for a blank picture.
    """
    paper = background(work, dark_ink, size)
    if dark_ink:
        strength = (paper - work) / np.maximum(paper, np.float32(0.05))
    else:
        strength = (work - paper) / np.maximum(np.float32(1.0) - paper, np.float32(0.05))
    strength = strength.astype(np.float32)
    smooth = _box3(strength)
    ring = _ring(smooth)
    zero, noise = _median_mad(smooth, -1.0, 1.0)
    ring_zero, ring_noise = _median_mad(ring, -1.0, 1.0)
    if ring_zero < zero:
        zero, noise = ring_zero, ring_noise
    found, peak = _stretch(strength, smooth, zero, noise)
    mask = None if found is None else ink_mask(*found)
    if mask is None or not mask.any():
        # A tight crop whose ink covers much of its border: the medians' noise (or zero) is
        # the ink's, so nothing stands out. Second try: the ring's paper side.
        paper_side = ring_paper_side(ring)
        if paper_side is not None:
            second, _ = _stretch(strength, smooth, *paper_side)
            second_mask = None if second is None else ink_mask(*second)
            if second_mask is not None and second_mask.any():
                found, mask = second, second_mask
    if found is None:
        raise PictureError(
            f"empty picture: no ink found (strongest contrast {max(peak, 0.0):.3f}, need {MIN_CONTRAST})"
        )
    return found[0], mask


def _stretch(strength: np.ndarray, smooth: np.ndarray, zero: float,
             noise: float) -> tuple[tuple[np.ndarray, float] | None, float]:
    """Step 8 with a paper level `zero` and its noise: ((ink float32 [h, w], noise') or None
    when no ink stands out, the peak of smooth - zero)."""
    noise = max(noise, 0.5 / 255)
    smooth = smooth - np.float32(zero)
    ink_pixels = smooth > np.float32(max(NOISE_SIGMAS * noise, MIN_CONTRAST / 2))
    peak = float(smooth.max())
    if not ink_pixels.any() or peak < MIN_CONTRAST:
        return None, peak
    core = _quantile(smooth, 0.9, 0.0, 2.0, weights=ink_pixels)
    low = min(max(2.0 * noise, 0.1 * core), 0.5 * core)
    ink = np.clip((strength - np.float32(zero) - np.float32(low)) / np.float32(core - low), 0.0, 1.0)
    return (ink.astype(np.float32), noise / (core - low)), peak


def ring_paper_side(ring: np.ndarray) -> tuple[float, float] | None:
    """Step 8's second try: (zero, noise) of the paper side of the ring's box3(s) values
    float32 [n] (in _ring's order), or None when the ring is not paper and ink apart."""
    ring = np.asarray(ring, np.float32)
    bottom = _quantile(ring, PAPER_SIDE_LOW, -1.0, 1.0)
    side = ring < np.float32(bottom + PAPER_SIDE * MIN_CONTRAST)
    ink = ring >= np.float32(bottom + PAPER_GAP * MIN_CONTRAST)
    count, ink_count = int(side.sum()), int(ink.sum())
    gap = ring.size - count - ink_count
    upper = (ring >= np.float32(bottom + (PAPER_SIDE + PAPER_GAP) / 2 * MIN_CONTRAST)).astype(np.int8)
    changes = int(np.abs(np.diff(upper)).sum())
    if (min(count, ink_count) < PAPER_SIDE_MIN * ring.size or gap > PAPER_GAP_MAX * min(count, ink_count)
            or changes > PAPER_MAX_CHANGES):
        return None
    zero = _quantile(ring, 0.5, -1.0, 1.0, weights=side)
    noise = 1.4826 * _quantile(np.abs(ring - np.float32(zero)), 0.5, 0.0, 2.0, weights=side)
    return zero, noise


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool mask [h, w], in the order of step 9.

    Returns (labels int32 [h, w]: 0 = background, 1..n by decreasing area, ties by the first
    pixel in raster order; areas int64 [n + 1], areas[0] = 0). Run-length labelling with
    union-find: the Python loop is per run of pixels in a row, not per pixel.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # row-major order: pairs up with starts
    parent = [0]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    run_labels = []
    previous: list[tuple[int, int, int]] = []  # (start, end, label) of the row above
    current: list[tuple[int, int, int]] = []
    row, j = -2, 0
    for y, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist()):
        if y != row:
            previous = current if y == row + 1 else []
            current, row, j = [], y, 0
        # Runs of the row above touching columns [s - 1, e] (8-connectivity; e exclusive).
        while j < len(previous) and previous[j][1] < s:
            j += 1
        label = 0
        k = j
        while k < len(previous) and previous[k][0] <= e:
            other = find(previous[k][2])
            if label == 0:
                label = other
            elif other != label:
                label, other = min(label, other), max(label, other)
                parent[other] = label
            k += 1
        if label == 0:
            label = len(parent)
            parent.append(label)
        current.append((s, e, label))
        run_labels.append(label)
    if not run_labels:
        return np.zeros((h, w), np.int32), np.zeros(1, np.int64)
    roots = np.array([find(label) for label in run_labels], np.int64)
    # Each run's root -> component; runs are in raster order, so a component's first run holds
    # its first pixel.
    unique_roots, first_run, per_run = np.unique(roots, return_index=True, return_inverse=True)
    lengths = (ends - starts).astype(np.int64)
    areas = np.bincount(per_run.ravel(), weights=lengths, minlength=len(unique_roots)).astype(np.int64)
    first_pixel = rows[first_run].astype(np.int64) * w + starts[first_run]
    order = np.lexsort((first_pixel, -areas))  # by area, then first pixel
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    numbered = rank[per_run.ravel()] + 1
    # Paint each run: +label at its start, -label at its end, then a running sum along the row.
    marks = np.zeros((h, w + 1), np.int64)
    np.add.at(marks, (rows, starts), numbered)
    np.add.at(marks, (rows, ends), -numbered)
    labels = marks.cumsum(axis=1)[:, :w].astype(np.int32)
    return labels, np.concatenate([[0], areas[order]]).astype(np.int64)


def ink_mask(ink: np.ndarray, noise: float) -> np.ndarray:
    """Step 9's mask bool [h, w] of ink float32 [h, w] and its noise'."""
    return _box3(ink) > np.float32(max(0.35, 4 * noise))


def digit_mask(mask: np.ndarray, work: np.ndarray, dark_ink: bool) -> np.ndarray:
    """Step 9: step 9's mask bool [h, w] (from ink_strength) -> the digit's pixels bool [h, w]:
    the main ink components, specks and far marks dropped. Raises PictureError when what is
    kept is not digit-like."""
    halved = max(mask.shape) > POLARITY_HALF_ABOVE
    labels, areas = components(_blocks_any(mask) if halved else mask)
    if len(areas) <= 1:
        raise PictureError("empty picture: no ink found")
    biggest = int(areas[1])
    ys, xs = np.nonzero(labels == 1)
    top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    keep = np.zeros(len(areas), bool)
    keep[1] = True
    for label in range(2, min(len(areas), MAX_COMPONENTS + 1)):
        area = int(areas[label])
        if area < SPECK_FRACTION * biggest:
            break
        ys, xs = np.nonzero(labels == label)
        reach = NEAR * max(bottom - top + 1, right - left + 1)
        near = (ys.max() >= top - reach and ys.min() <= bottom + reach
                and xs.max() >= left - reach and xs.min() <= right + reach)
        if near or area >= FAR_FRACTION * biggest:
            keep[label] = True
            if near:
                top, bottom = min(top, int(ys.min())), max(bottom, int(ys.max()))
                left, right = min(left, int(xs.min())), max(right, int(xs.max()))
    kept = keep[labels]
    if halved:
        kept = np.repeat(np.repeat(kept, 2, axis=0), 2, axis=1)[: mask.shape[0], : mask.shape[1]] & mask
    _check_digit_like(kept, work, dark_ink)
    return kept


def _blocks_any(mask: np.ndarray) -> np.ndarray:
    """bool [h, w] -> [ceil(h/2), ceil(w/2)]: whether each 2x2 block (padded with False) has a
    pixel set."""
    h, w = mask.shape
    padded = np.pad(mask, ((0, h % 2), (0, w % 2)))
    return (padded[0::2, 0::2] | padded[0::2, 1::2]) | (padded[1::2, 0::2] | padded[1::2, 1::2])


def _check_digit_like(kept: np.ndarray, work: np.ndarray, dark_ink: bool) -> None:
    """Raise PictureError when the kept marks are no digit (step 9)."""
    rows = np.flatnonzero(kept.any(axis=1))
    cols = np.flatnonzero(kept.any(axis=0))
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    if max(height, width) < MIN_DIGIT_SIDE:
        raise PictureError(
            f"no digit-like ink: the largest mark is {width}x{height} px of the picture scaled to "
            f"{kept.shape[1]}x{kept.shape[0]}, too small to be a digit (crop the picture closer to the digit)"
        )
    if width > MAX_WIDTH_RATIO * height:
        raise PictureError(
            f"no digit-like ink: the marks are {width / height:.1f} times wider than tall "
            f"(a line or a word, not one digit)"
        )
    # A blot: its box, or the ellipse inside it, is ink-coloured nearly everywhere.
    box = work[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    paper = _quantile(_ring(work), 0.5, 0.0, 1.0)
    ink = _quantile(box, 0.05 if dark_ink else 0.95, 0.0, 1.0)
    middle = np.float32((paper + ink) / 2)
    inked = box < middle if dark_ink else box > middle
    fill = float(np.mean(inked, dtype=np.float32))
    round_fill = float(np.mean(inked[inscribed_ellipse(height, width, np.arange)], dtype=np.float32))
    if 0.5 <= width / height <= 2.0 and (fill > MAX_FILL or round_fill > MAX_ROUND_FILL):
        raise PictureError(
            f"no digit-like ink: a solid blot ({fill:.0%} of its box and {round_fill:.0%} of the "
            f"ellipse inside it are ink-coloured), not pen strokes"
        )


def inscribed_ellipse(height, width, arange):
    """bool [height, width]: the pixels whose centres lie in the ellipse inscribed in an
    h x w box (step 9), in integers: (2y + 1 - h)^2 w^2 + (2x + 1 - w)^2 h^2 <= h^2 w^2.
    `arange`: np.arange here, tf.range in the graph (height, width: int64 tensors there)."""
    ys = 2 * arange(height)[:, None] + 1 - height
    xs = 2 * arange(width)[None, :] + 1 - width
    return ys * ys * width * width + xs * xs * height * height <= height * height * width * width


def crop(ink: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 10: ink float32 and mask cut to the ink around the kept mask."""
    near = _dilate(mask, 2)
    digit = np.where(near, ink, np.float32(0.0)).astype(np.float32)
    rows = np.flatnonzero((digit > 0.05).any(axis=1))
    cols = np.flatnonzero((digit > 0.05).any(axis=0))
    if rows.size == 0:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return digit[window], mask[window]


def stroke_width(mask: np.ndarray) -> float:
    """Step 11: mean stroke width of a bool mask in pixels, 2 x area / perimeter.

    The perimeter counts 4-neighbour edges, scaled by pi/4 (the mean of |cos|+|sin|) so that
    slanted strokes are not over-counted.
    """
    area = float(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1).astype(np.int8)
    edges = np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum()
    return 2.0 * area / (float(edges) * math.pi / 4)


def normalise_strokes(patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Step 11: thicken thin strokes (fine pen, large digit) towards MNIST's stroke width."""
    long_side = max(patch.shape)
    width = stroke_width(mask)
    if long_side < 8 or width <= 0 or width >= THIN_STROKE * long_side:
        return patch
    grow = int(round((MNIST_STROKE * long_side - width) / 2))
    if grow < 1:
        return patch
    return _dilate(np.pad(patch, grow), grow)


def fit_box(patch: np.ndarray, box: int = MNIST_BOX) -> np.ndarray:
    """Step 12: resize float32 [h, w] so its long side is `box`, keeping the aspect ratio."""
    h, w = patch.shape
    scale = box / max(h, w)
    return np.clip(_resize(patch, max(1, round(h * scale)), max(1, round(w * scale))), 0.0, 1.0)


def place_by_mass(patch: np.ndarray, size: int = MNIST_SIZE) -> np.ndarray:
    """Step 13: float32 [h, w] (0..1) into a size x size uint8 field, centre of mass at the centre."""
    h, w = patch.shape
    values = patch.astype(np.float32)
    mass = float(values.sum(dtype=np.float32))
    if mass > 0:
        com_y = float((values.sum(axis=1) * np.arange(h, dtype=np.float32)).sum(dtype=np.float32)) / mass
        com_x = float((values.sum(axis=0) * np.arange(w, dtype=np.float32)).sum(dtype=np.float32)) / mass
    else:
        com_y, com_x = (h - 1) / 2, (w - 1) / 2
    top = int(np.clip(round(size / 2 - com_y), 0, size - h))
    left = int(np.clip(round(size / 2 - com_x), 0, size - w))
    field = np.zeros((size, size), np.float32)
    field[top : top + h, left : left + w] = values
    return np.rint(field * np.float32(255.0)).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def grey_to_mnist(v: np.ndarray) -> np.ndarray:
    """Steps 4-13: grey v float32 [H, W] in 0..1 -> MNIST form uint8 [28, 28].

    Raises PictureError when there is no digit to find (blank picture, no digit-like ink).
    """
    v = np.asarray(v, dtype=np.float32)
    if v.shape == (MNIST_SIZE, MNIST_SIZE):
        grey = np.rint(v * np.float32(255.0)).astype(np.uint8)
        if looks_like_mnist(grey):
            return grey
    work = working_copy(v)
    dark_ink, size = polarity_and_window(work)
    ink, mask = ink_strength(work, dark_ink, size)
    mask = digit_mask(mask, work, dark_ink)
    patch, patch_mask = crop(ink, mask)
    patch = normalise_strokes(patch, patch_mask)
    return place_by_mass(fit_box(patch))


def picture_to_mnist(data: bytes) -> np.ndarray:
    """Encoded picture bytes (PNG, JPEG, BMP, WebP) -> MNIST form uint8 [28, 28] (steps 1-13).

    Raises PictureError naming the problem (see the module docstring).
    """
    return grey_to_mnist(decode(data))


def to_mnist(image: np.ndarray | Image.Image, size: int = MNIST_SIZE) -> np.ndarray:
    """A decoded picture of one digit -> MNIST form uint8 [28, 28] (steps 3-13).

    `image`: uint8 grey [H, W] or [H, W, 3|4] (RGB(A) order), another numeric dtype (scaled by
    the range it implies), or a Pillow image (EXIF orientation applied). Raises PictureError
    when there is no digit to find; ValueError for a model size other than 28.
    """
    if size != MNIST_SIZE:
        raise ValueError(f"the preprocessing makes {MNIST_SIZE}x{MNIST_SIZE} pictures, not {size}x{size}")
    return grey_to_mnist(grey_from_pixels(as_pixels(image)))


def as_pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """A Pillow image or array -> uint8 [H, W] / [H, W, 3|4] for step 3."""
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        img = ImageOps.exif_transpose(image)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return _scale_to_uint8(np.asarray(img))
        return np.asarray(img.convert("RGBA") if "A" in img.mode or "transparency" in img.info
                          else img.convert("RGB") if img.mode != "L" else img, dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = _scale_to_uint8(array)
    if array.size == 0:
        raise PictureError(f"empty picture (shape {list(array.shape)})")
    return array


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float pixels -> uint8, by the range their type implies."""
    values = np.asarray(values)
    floating = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if floating and top <= 1.0:
        full = 1.0
    elif top <= 255:
        full = 255.0
    else:
        full = 65535.0 if top <= 65535 else top
    return np.clip(np.rint(values / full * 255.0), 0, 255).astype(np.uint8)


def resize_only(image: np.ndarray | Image.Image, size: int = MNIST_SIZE) -> np.ndarray:
    """What a naive pipeline does: grey, resize to size x size (aspect ignored), nothing else.

    uint8 [size, size]; a picture already that size is returned unchanged (rounded). This is
    the `--no-preprocess` path, and the baseline the benchmark compares against. Raises
    PictureError for a uniform picture (nothing to classify).
    """
    v = image if isinstance(image, np.ndarray) and image.dtype == np.float32 and image.ndim == 2 \
        else grey_from_pixels(as_pixels(image))
    grey = np.rint(v * np.float32(255.0)).astype(np.uint8)
    if int(grey.max()) == int(grey.min()):
        raise PictureError(f"empty picture: every pixel is {int(grey.min())}")
    if grey.shape == (size, size):
        return grey
    resized = Image.fromarray(grey).resize((size, size), _Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Reading files (the I/O edge)
# --------------------------------------------------------------------------------------------
def read_picture(path: Path) -> bytes:
    """The bytes of a picture file (at most MAX_FILE_BYTES). Raises PictureError for a
    missing, unreadable or oversized file, or a directory."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PictureError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PictureError(f"{path}: is a directory, not a picture") from None
    except OSError as err:
        raise PictureError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_FILE_BYTES:
        raise PictureError(f"{path}: picture too large: the file is over {MAX_FILE_BYTES // 2**20} MiB")
    return data


def load_grey(path: Path) -> np.ndarray:
    """Read and decode a picture file: grey v float32 [H, W] in 0..1 (steps 1-3).

    Raises PictureError, its message starting with the path, for anything that is not a
    picture this pipeline accepts (see the module docstring).
    """
    data = read_picture(path)
    try:
        return decode(data)
    except PictureError as err:
        raise PictureError(f"{path}: {err}") from None
