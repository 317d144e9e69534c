"""Make realistic pictures of handwritten digits from MNIST digits (numpy + Pillow).

Evaluation data for every path the model takes: the export's picture check (export/verify.py),
the benchmarks (`make bench-mobile`, `make bench-serve`), the Pi bundle's sample pictures and the
tests. It sits in the data layer beside the IDX reader and, like it, imports no TensorFlow
(tests/test_dependencies.py); it is not shipped to the Pi. Every picture draws its settings from
a seeded numpy Generator, so the same seed gives the same pictures on every machine.

The kinds of picture people send (`KINDS`), each made by `synthesize(kind, digit, rng)`:

- `photo`: a phone or Pi camera photo of dark ink on paper. The digit as pen strokes (its
  grey ramp turned into crisp ink with soft edges, sometimes a thinner pen, slightly
  rotated; black, blue, red-brown or pencil ink of varying strength), off-centre, 20-85% of
  the short side of a 64-1000 px picture of any aspect ratio; off-white textured paper lit
  unevenly (gradient, vignetting, sometimes a soft shadow across the page); defocus blur,
  sensor noise, JPEG (quality 35-95) or PNG.
- `canvas`: an HTML canvas exported with `toDataURL()`: RGBA PNG, 200-600 px, strokes of
  any colour (black, blue, red, green, white, yellow, ...) and width (4-14% of the
  digit's size) with anti-aliased alpha edges; 75% on a transparent background (fully
  transparent pixels are (0, 0, 0, 0), as browsers export them), the rest on an opaque
  background of a contrasting colour. No blur, no noise.
- `chalk`: light chalk strokes on a dark, unevenly lit board: grainy strokes, a faint haze of
  wiped chalk, sometimes a soft glare, camera noise, JPEG; 150-1000 px.
- `tight`: a digit cut tightly from a scanned form: dark ink on white, no margin at all (the
  crop is the ink's bounding box, give or take 2 px), 28-160 px, PNG or JPEG.
- `thinpen`: a fine pen (strokes 1-3 px wide) on white paper, the digit 40-80% of a
  200-600 px picture, lightly blurred and noisy like a scan; PNG or JPEG.
- `mnist`: the MNIST digit itself as a 28x28 PNG (the identity case).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

_Resampling = getattr(Image, "Resampling", Image)

KINDS = ("photo", "canvas", "chalk", "tight", "thinpen", "mnist")

# Ink colours (RGB): ballpoint black, blue, red-brown, graphite pencil.
INKS = ((28, 28, 34), (30, 42, 125), (120, 32, 30), (85, 85, 92))
# Canvas stroke colours: what drawing apps offer first.
CANVAS_COLOURS = ((0, 0, 0), (20, 60, 200), (220, 30, 30), (20, 150, 60), (255, 255, 255),
                  (250, 220, 0), (128, 0, 160), (255, 120, 0))


@dataclass(frozen=True)
class Photo:
    """One synthetic picture: the encoded file, its format, kind and decoded pixels."""

    data: bytes  # the file as written (JPEG or PNG)
    format: str  # "jpeg" or "png"
    pixels: np.ndarray  # uint8 [H, W, 3] or [H, W, 4] (RGBA) or [H, W], decoded from `data`
    kind: str = "photo"

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"


def _encode(img: Image.Image, fmt: str, kind: str, quality: int = 90) -> Photo:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        img.save(buffer, "JPEG", quality=int(quality))
    else:
        img.save(buffer, "PNG")
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        pixels = np.asarray(decoded, dtype=np.uint8)
    return Photo(data=data, format=fmt, pixels=pixels, kind=kind)


def _ink_alpha(digit: np.ndarray, height: int, rng: np.random.Generator, thin: bool) -> np.ndarray:
    """MNIST digit uint8 [28, 28] -> pen-stroke coverage float32 [s, s] in 0..1, s ~ height*1.4.

    `height` is the size of MNIST's 20-px box on the page.
    """
    side = max(8, int(round(height * 28 / 20)))
    # MNIST's grey ramp -> ink with a soft edge ~1.5 % of the digit wide. Thresholding the
    # ramp relative to its local ridge height (3x3 max at 28x28) keeps strokes continuous
    # where MNIST is faint; the threshold sets the pen: 0.25 = marker, 0.8 = fine liner.
    small = Image.fromarray(digit.astype(np.float32) / 255.0, "F")
    ridge_small = small.filter(ImageFilter.MaxFilter(3))
    level = np.asarray(small.resize((side, side), _Resampling.BICUBIC), dtype=np.float32)
    ridge = np.asarray(ridge_small.resize((side, side), _Resampling.BILINEAR), dtype=np.float32)
    relative = level / np.maximum(ridge, 0.35)
    threshold = rng.uniform(0.72, 0.85) if thin else rng.uniform(0.25, 0.6)
    softness = max(0.04, 0.6 / max(side, 1) * 28 / 20)
    alpha = np.clip((relative - threshold) / softness + 0.5, 0.0, 1.0)
    angle = rng.uniform(-8, 8)
    rotated = Image.fromarray(alpha.astype(np.float32), "F").rotate(angle, _Resampling.BICUBIC)
    return np.clip(np.asarray(rotated, dtype=np.float32), 0.0, 1.0)


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a bool mask [h, w]: its one-pixel-wide centre lines."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = img
            # Neighbours P2..P9, clockwise from north.
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(x.astype(np.int32) for x in n)
            transitions = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                a, b = n[0] * n[2] * n[4], n[2] * n[4] * n[6]
            else:
                a, b = n[0] * n[2] * n[6], n[0] * n[4] * n[6]
            remove = (p[1:-1, 1:-1] == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & (a == 0) & (b == 0)
            if remove.any():
                img = img.copy()
                img[1:-1, 1:-1][remove] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _stroke_alpha(digit: np.ndarray, side: int, width: float, rng: np.random.Generator) -> np.ndarray:
    """MNIST digit -> pen strokes `width` px wide (round caps and joints, anti-aliased) along
    its centre line, drawn in a side x side box: coverage float32 [side, side] in 0..1.

    The centre line is the skeleton of the digit's ridge upscaled x4; each pair of
    neighbouring skeleton pixels becomes a line segment, drawn at 4x and reduced (anti-aliasing).
    """
    from PIL import ImageDraw

    # The digit's ridge at x4 (as _ink_alpha, thresholded high): small loops stay open.
    small = Image.fromarray(digit.astype(np.float32) / 255.0, "F")
    level = np.asarray(small.resize((112, 112), _Resampling.BICUBIC), dtype=np.float32)
    ridge = np.asarray(small.filter(ImageFilter.MaxFilter(3)).resize((112, 112), _Resampling.BILINEAR), dtype=np.float32)
    skeleton = _skeleton(level / np.maximum(ridge, 0.35) > 0.7)
    ys, xs = np.nonzero(skeleton)
    angle = np.deg2rad(rng.uniform(-8, 8))
    supersample = 4
    scale = side * supersample / 112
    centre = 55.5

    def point(y: float, x: float) -> tuple[float, float]:
        dy, dx = y - centre, x - centre
        ry = np.cos(angle) * dy + np.sin(angle) * dx
        rx = -np.sin(angle) * dy + np.cos(angle) * dx
        return ((rx + centre + 0.5) * scale, (ry + centre + 0.5) * scale)

    big = Image.new("L", (side * supersample, side * supersample), 0)
    draw = ImageDraw.Draw(big)
    pen = max(1.0, width * supersample)
    on = set(zip(ys.tolist(), xs.tolist()))
    for y, x in on:
        a = point(y, x)
        draw.ellipse([a[0] - pen / 2, a[1] - pen / 2, a[0] + pen / 2, a[1] + pen / 2], fill=255)
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (y + dy, x + dx) in on:
                draw.line([a, point(y + dy, x + dx)], fill=255, width=int(round(pen)))
    small = big.resize((side, side), _Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _illumination(h: int, w: int, rng: np.random.Generator, shadow: float = 0.4) -> np.ndarray:
    """Light falling on the page float32 [h, w], about 0.45..1: gradient, vignette, shadow."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys, xs = ys / max(h - 1, 1) - 0.5, xs / max(w - 1, 1) - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * xs + np.sin(theta) * ys  # -0.7..0.7
    light = 1.0 - rng.uniform(0.0, 0.45) * (ramp + 0.7) / 1.4
    light *= 1.0 - rng.uniform(0.0, 0.3) * (xs**2 + ys**2) * 2
    if rng.random() < shadow:
        # A soft shadow (hand, phone): a darker half-plane with a blurred edge.
        phi = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-0.35, 0.35)
        distance = np.cos(phi) * xs + np.sin(phi) * ys - offset
        penumbra = rng.uniform(0.03, 0.15)
        shade = 1.0 / (1.0 + np.exp(-distance / penumbra * 4))
        light *= 1.0 - rng.uniform(0.2, 0.5) * shade
    return light.astype(np.float32)


def _smooth_noise(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise float32 [h, w], about N(0, 1), varying over `cell` pixels."""
    coarse = rng.normal(0.0, 1.0, (max(2, h // cell), max(2, w // cell))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((w, h), _Resampling.BICUBIC), dtype=np.float32)


def _paper_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency fibre/texture variation float32 [h, w] around 1 (a few percent)."""
    texture = _smooth_noise(h, w, 24, rng)
    return 1.0 + rng.uniform(0.005, 0.025) * texture


def _place(alpha: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Put coverage [s, s] somewhere on an h x w page (kept whole): float32 [h, w]."""
    side = alpha.shape[0]
    if side > min(h, w):  # keep the whole digit on the page
        side = min(h, w)
        alpha = np.asarray(Image.fromarray(alpha, "F").resize((side, side), _Resampling.BILINEAR))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    coverage = np.zeros((h, w), np.float32)
    coverage[top : top + side, left : left + side] = alpha
    return coverage


def _camera(rgb: np.ndarray, rng: np.random.Generator, blur_per_500: float, noise: tuple[float, float]) -> Image.Image:
    """Defocus blur and sensor noise on float RGB [h, w, 3]."""
    h, w = rgb.shape[:2]
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, blur_per_500) * max(h, w) / 500
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(*noise), (h, w, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _check(digit: np.ndarray) -> np.ndarray:
    digit = np.asarray(digit, dtype=np.uint8)
    if digit.shape != (28, 28):
        raise ValueError(f"expected an MNIST digit [28, 28], got {list(digit.shape)}")
    return digit


# --------------------------------------------------------------------------------------------
# The kinds
# --------------------------------------------------------------------------------------------
def synthesize_photo(digit: np.ndarray, rng: np.random.Generator, size: tuple[int, int] | None = None,
                     jpeg: bool | None = None) -> Photo:
    """A photo of `digit` (MNIST uint8 [28, 28], white on black) written on paper.

    Returns a Photo, RGB, any size from 64 to 1000 px (`size`: this (height, width) instead),
    JPEG 80% of the time, else PNG (`jpeg`: always JPEG when True, PNG when False).
    """
    digit = _check(digit)
    long_side = int(rng.integers(64, 1001))
    aspect = rng.uniform(0.6, 1.0)
    short_side = max(48, int(long_side * aspect))
    h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    if size is not None:
        h, w = size
    box = int(round(min(h, w) * rng.uniform(0.2, 0.85)))
    thin = rng.random() < 0.3
    alpha = _ink_alpha(digit, box, rng, thin) * rng.uniform(0.75, 1.0)
    coverage = _place(alpha, h, w, rng)
    paper = np.array([rng.uniform(215, 250), rng.uniform(210, 248), rng.uniform(195, 240)], np.float32)
    ink = np.array(INKS[int(rng.integers(len(INKS)))], np.float32) + rng.normal(0, 8, 3)
    page = paper[None, None, :] * _paper_texture(h, w, rng)[..., None]
    rgb = page * (1.0 - coverage[..., None]) + ink[None, None, :] * coverage[..., None]
    rgb *= _illumination(h, w, rng)[..., None]
    img = _camera(rgb, rng, 1.2, (1.0, 6.0))
    as_jpeg = rng.random() < 0.8
    quality = int(rng.integers(35, 96)) if as_jpeg else 0
    if jpeg is not None and jpeg != as_jpeg:
        as_jpeg, quality = jpeg, 85
    if as_jpeg:
        return _encode(img, "jpeg", "photo", quality)
    return _encode(img, "png", "photo")


def synthesize_canvas(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """An HTML canvas drawing of `digit`, exported as RGBA PNG (see the module docstring)."""
    digit = _check(digit)
    w = int(rng.integers(200, 601))
    h = w if rng.random() < 0.6 else int(w * rng.uniform(0.6, 1.0))
    side = int(round(min(h, w) * rng.uniform(0.45, 1.0)))
    width = side * rng.uniform(0.04, 0.14)
    coverage = _place(_stroke_alpha(digit, side, width, rng), h, w, rng)
    colour = np.array(CANVAS_COLOURS[int(rng.integers(len(CANVAS_COLOURS)))], np.float32)
    if rng.random() < 0.25:
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    rgba = np.zeros((h, w, 4), np.float32)
    if rng.random() < 0.75:
        # Transparent background: colour where anything is drawn, alpha = coverage.
        rgba[..., :3] = np.where(coverage[..., None] > 0, colour, 0.0)
        rgba[..., 3] = coverage * 255.0
    else:
        # An opaque background the app filled first, far from the stroke colour in luma.
        luma = float(colour @ np.array([0.299, 0.587, 0.114], np.float32))
        level = rng.uniform(225, 255) if luma < 128 else rng.uniform(0, 40)
        background = np.clip(level + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
        rgba[..., :3] = background * (1.0 - coverage[..., None]) + colour * coverage[..., None]
        rgba[..., 3] = 255.0
    img = Image.fromarray(np.clip(np.rint(rgba), 0, 255).astype(np.uint8), "RGBA")
    return _encode(img, "png", "canvas")


def synthesize_chalk(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """Light chalk strokes of `digit` on a dark, unevenly lit board, photographed (JPEG)."""
    digit = _check(digit)
    long_side = int(rng.integers(150, 1001))
    short_side = max(100, int(long_side * rng.uniform(0.6, 1.0)))
    h, w = (long_side, short_side) if rng.random() < 0.4 else (short_side, long_side)
    box = int(round(min(h, w) * rng.uniform(0.25, 0.8)))
    alpha = _ink_alpha(digit, box, rng, thin=rng.random() < 0.3)
    # Chalk grain: the stroke is broken up by the board's texture, about a hundredth of the
    # digit's size (a few millimetres on a board).
    grain_cell = max(1, box // 80)
    grain = np.clip(0.85 + 0.3 * _smooth_noise(alpha.shape[0], alpha.shape[1], grain_cell, rng), 0.4, 1.0)
    alpha = alpha * grain * rng.uniform(0.75, 1.0)
    coverage = _place(alpha, h, w, rng)
    greens = ((38, 58, 45), (30, 34, 36), (45, 52, 50), (25, 45, 35))
    board = np.array(greens[int(rng.integers(len(greens)))], np.float32) + rng.normal(0, 5, 3)
    chalk = np.array([rng.uniform(215, 250), rng.uniform(215, 250), rng.uniform(200, 240)], np.float32)
    # Wiped chalk: a faint light haze over the board, broader than the digit.
    smudge = np.clip(_smooth_noise(h, w, max(8, min(h, w) // 3), rng), 0, None) * rng.uniform(0.0, 0.06)
    base = board[None, None, :] + smudge[..., None] * (chalk - board)[None, None, :]
    rgb = base * (1.0 - coverage[..., None]) + chalk[None, None, :] * coverage[..., None]
    light = _illumination(h, w, rng, shadow=0.2)
    if rng.random() < 0.3:
        # A soft glare from a window or lamp: brightens a broad patch of the board.
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(0.2, 0.5) * max(h, w)
        light = light + rng.uniform(0.2, 0.6) * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
    rgb = rgb * light[..., None]
    img = _camera(rgb, rng, 1.0, (2.0, 7.0))
    return _encode(img, "jpeg", "chalk", int(rng.integers(40, 96)))


def synthesize_tight(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """`digit` cut tightly from a scanned form: dark on white, no margin (see the docstring)."""
    digit = _check(digit)
    height = int(rng.integers(28, 161))
    alpha = _ink_alpha(digit, int(round(height * 20 / 28 * 28 / 20)), rng, thin=rng.random() < 0.2)
    alpha = alpha * rng.uniform(0.8, 1.0)
    rows = np.flatnonzero(alpha.max(axis=1) > 0.1)
    cols = np.flatnonzero(alpha.max(axis=0) > 0.1)
    if rows.size == 0:
        rows = cols = np.arange(alpha.shape[0])
    # The cut: the ink's box, each side moved by -2..+2 px (into the ink or onto paper).
    pad = alpha.shape[0]
    padded = np.pad(alpha, pad)
    top, bottom = rows[0] + pad + int(rng.integers(-2, 3)), rows[-1] + pad + 1 + int(rng.integers(-2, 3))
    left, right = cols[0] + pad + int(rng.integers(-2, 3)), cols[-1] + pad + 1 + int(rng.integers(-2, 3))
    coverage = padded[top:bottom, left:right]
    h, w = coverage.shape
    paper = rng.uniform(225, 255)
    ink = rng.uniform(10, 70)
    grey = paper * (1.0 - coverage) + ink * coverage
    grey = grey + rng.normal(0, rng.uniform(0.5, 4.0), (h, w))
    img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    if rng.random() < 0.3:
        return _encode(img, "jpeg", "tight", int(rng.integers(60, 96)))
    return _encode(img, "png", "tight")


def synthesize_thinpen(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """`digit` written with a fine pen (1-3 px strokes) on white paper, scanned."""
    digit = _check(digit)
    size = int(rng.integers(200, 601))
    h, w = size, int(size * rng.uniform(0.7, 1.0))
    if rng.random() < 0.5:
        h, w = w, h
    side = int(round(min(h, w) * rng.uniform(0.4, 0.8)))
    coverage = _place(_stroke_alpha(digit, side, rng.uniform(1.0, 3.0), rng), h, w, rng)
    coverage = coverage * rng.uniform(0.75, 1.0)
    paper = rng.uniform(230, 255)
    ink = np.array(INKS[int(rng.integers(len(INKS)))], np.float32) + rng.normal(0, 8, 3)
    page = paper * _paper_texture(h, w, rng)[..., None] * np.ones(3, np.float32)
    rgb = page * (1.0 - coverage[..., None]) + ink[None, None, :] * coverage[..., None]
    rgb *= np.clip(_illumination(h, w, rng, shadow=0.0) + 0.3, 0.0, 1.0)[..., None]
    img = _camera(rgb, rng, 0.5, (0.5, 4.0))
    if rng.random() < 0.5:
        img = img.convert("L")
    if rng.random() < 0.4:
        return _encode(img, "jpeg", "thinpen", int(rng.integers(60, 96)))
    return _encode(img, "png", "thinpen")


def synthesize_mnist(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """The MNIST digit itself, as a 28x28 grey PNG."""
    return _encode(Image.fromarray(_check(digit), "L"), "png", "mnist")


_MAKERS = {
    "photo": synthesize_photo, "canvas": synthesize_canvas, "chalk": synthesize_chalk,
    "tight": synthesize_tight, "thinpen": synthesize_thinpen, "mnist": synthesize_mnist,
}


def synthesize(kind: str, digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """One picture of `kind` (one of KINDS) of `digit` (MNIST uint8 [28, 28]).

    Raises ValueError for an unknown kind or a digit that is not 28x28.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown kind of picture {kind!r}; expected one of {', '.join(KINDS)}")
    return _MAKERS[kind](digit, rng)


def synthesize_kind(kind: str, digits: np.ndarray, seed: int = 0) -> list[Photo]:
    """One picture of `kind` per digit uint8 [N, 28, 28], from a Generator seeded with
    (seed, the kind's index): each kind's pictures do not depend on which other kinds are made."""
    rng = np.random.default_rng([seed, KINDS.index(kind) if kind in KINDS else 0])
    return [synthesize(kind, d, rng) for d in np.asarray(digits)]


def synthesize_photos(digits: np.ndarray, seed: int = 0) -> list[Photo]:
    """One `photo` per digit uint8 [N, 28, 28], from a Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return [synthesize_photo(d, rng) for d in np.asarray(digits)]
