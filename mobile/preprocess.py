"""Turn a real picture of one handwritten digit into MNIST form, with numpy and Pillow only.

MNIST digits (LeCun et al.) were made like this: bilevel NIST scans, size-normalised to fit a
20x20 box keeping the aspect ratio (the anti-aliasing gives grey edges), then placed in a 28x28
field so that the centre of mass of the pixels sits at the centre. White digit, black
background. `to_mnist` does the same to a photo:

    picture (any size, PNG/JPEG, colour/grey, dark-on-light or light-on-dark, uneven light)
      -> grey, working copy with the long side <= 256 px                 (_working_copy)
      -> polarity and stroke width from black/white top-hats at growing windows
                                                                       (_polarity_and_scale)
      -> paper and illumination: a grey closing (opening for light ink) wider than the
         strokes, which keeps the sharp edge of a shadow, unlike a blur  (_closing)
      -> relative ink strength (1 - pixel / paper for dark ink: shadows and gradients
         cancel), contrast stretch of the ink's core to 1 that keeps anti-aliased edges
                                                                       (_ink_strength)
      -> connected ink components, specks and far-away marks dropped   (_digit_mask)
      -> crop to the ink, thin pen strokes thickened towards MNIST's stroke width
      -> resize to fit 20x20 keeping the aspect ratio (anti-aliased), centre of mass at
         (14, 14) of a 28x28 field (MNIST's centres of mass all lie within 0.5 px of it)

A 28x28 picture that already looks like MNIST (dark background, bright digit, roughly centred)
is returned unchanged, byte for byte.

Everything here takes and returns numpy arrays; `load_grey` is the one function that reads
files. Errors are `PictureError`s whose message names the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow >= 9.1 has Image.Resampling; older Pillows (Debian's python3-pil) have the constants.
_Resampling = getattr(Image, "Resampling", Image)

MNIST_SIZE = 28  # the field
MNIST_BOX = 20  # the digit's long side inside it
# Working resolution: long side of the copy the analysis runs on. A digit covering a tenth of
# the photo's height is still ~25 px there, more than the 20 px it ends at.
WORK_SIDE = 256
# Small pictures (e.g. 28x28 dark-on-light) are upscaled to at least this long side, so the
# analysis' window sizes stay meaningful.
MIN_WORK_SIDE = 112
# Decoding JPEGs at a reduced scale (DCT scaling, Image.draft) is much faster on a Pi than
# decoding 12 MP and resizing; keep at least this long side so the box filter still averages.
DECODE_SIDE = 2 * WORK_SIDE

# Ink detection (ink strength is 0 on paper, ~1 at full contrast).
MIN_CONTRAST = 0.10  # weaker than this everywhere = a blank picture
NOISE_SIGMAS = 4.0  # candidate ink must stand this many noise sigmas above the paper
# Upper bound of the paper/illumination window, as a fraction of the working copy's long side
# (a bold digit filling a tight crop needs about half of it).
BACKGROUND_WINDOW = 0.5
# The paper estimate's window is this many times the window that just holds the strokes.
STROKE_WINDOW_MARGIN = 3.0
# Window sizes (half-size copy pixels) tried when looking for the ink's polarity and width.
POLARITY_WINDOWS = (3, 5, 9, 17, 33)
# Top-hat values below this (log units) are paper texture and JPEG noise, not ink.
POLARITY_MIN_CONTRAST = 0.2
# log(pixel + offset): the offset keeps sensor noise on a dark background from being
# amplified into "contrast".
POLARITY_LOG_OFFSET = 0.1
# Pillow filter for the final resize into the 20x20 box.
FIT_FILTER = "BILINEAR"
# Components smaller than this fraction of the largest are specks; up to FAR_FRACTION they
# must also lie near the digit's bounding box (within NEAR of its long side) to be kept.
SPECK_FRACTION = 0.04
FAR_FRACTION = 0.30
NEAR = 0.25
# MNIST's median stroke width is 12.5% of the digit's long side (10th percentile 9%, measured
# on 3000 training digits upscaled x4 with the estimator in _stroke_width); strokes thinner
# than THIN_STROKE are thickened towards MNIST_STROKE.
MNIST_STROKE = 0.125
THIN_STROKE = 0.11


class PictureError(ValueError):
    """A picture that cannot be classified: unreadable, not an image, blank. Says which."""


# --------------------------------------------------------------------------------------------
# Reading pictures (the I/O edge)
# --------------------------------------------------------------------------------------------
def load_grey(path: Path, max_side: int | None = DECODE_SIDE) -> np.ndarray:
    """Read an image file as grey pixels uint8 [H, W] (luma, ITU-R 601-2, as Pillow's "L").

    EXIF orientation is applied; transparency is composited onto a background opposite to the
    ink (a black digit on a transparent background becomes black on white); 16-bit and float
    images are scaled to 0-255. JPEGs larger than `max_side` are decoded at a reduced scale
    (never below `max_side`). Raises PictureError for missing, unreadable or non-image files.
    """
    path = Path(path)
    if not path.exists():
        raise PictureError(f"{path}: no such file")
    if path.is_dir():
        raise PictureError(f"{path}: is a directory, not a picture")
    try:
        with Image.open(path) as img:
            if max_side and img.format == "JPEG" and max(img.size) > max_side:
                img.draft(img.mode, (max_side, max_side))
            img.load()
            return image_to_grey(img)
    except PictureError:
        raise
    except Image.DecompressionBombError as err:
        raise PictureError(f"{path}: too large to decode safely ({err})") from err
    except PermissionError as err:
        raise PictureError(f"{path}: cannot read ({err.strerror})") from err
    except (Image.UnidentifiedImageError, SyntaxError) as err:
        raise PictureError(
            f"{path}: not an image Pillow can read (expected PNG, JPEG or another "
            f"picture format)"
        ) from err
    except (OSError, ValueError, EOFError) as err:
        raise PictureError(f"{path}: corrupt or truncated image ({err})") from err


def image_to_grey(img: Image.Image) -> np.ndarray:
    """A Pillow image of any mode -> grey uint8 [H, W]."""
    img = ImageOps.exif_transpose(img)
    if img.width == 0 or img.height == 0:
        raise PictureError(f"empty picture ({img.width}x{img.height} pixels)")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_uint8(np.asarray(img))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        grey = np.asarray(img.convert("RGBA").convert("RGB").convert("L"), dtype=np.float32)
        if alpha.min() >= 1.0:
            return grey.astype(np.uint8)
        return _composite(grey, alpha)
    if img.mode != "L":
        img = img.convert("RGB").convert("L")
    return np.asarray(img, dtype=np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float pixels -> uint8, by the range their type implies."""
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if np.issubdtype(np.asarray(values).dtype, np.floating) and top <= 1.0:
        full = 1.0
    elif top <= 255:
        full = 255.0
    else:
        full = 65535.0 if top <= 65535 else top
    return np.clip(np.rint(values / full * 255.0), 0, 255).astype(np.uint8)


def _composite(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten a transparent picture onto paper of the opposite brightness to its strokes."""
    weight = float(alpha.sum())
    ink_level = float((grey * alpha).sum() / weight) if weight > 0 else 0.0
    paper = 255.0 if ink_level < 128 else 0.0
    return np.rint(grey * alpha + paper * (1.0 - alpha)).astype(np.uint8)


def to_grey(image: np.ndarray | Image.Image) -> np.ndarray:
    """Grey uint8 [H, W] from a Pillow image or an array [H, W], [H, W, 1|3|4] (RGB order)."""
    if isinstance(image, Image.Image):
        return image_to_grey(image)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        if array.size == 0:
            raise PictureError(f"empty picture ({array.shape[1]}x{array.shape[0]} pixels)")
        return array if array.dtype == np.uint8 else _scale_to_uint8(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if array.dtype != np.uint8:
            array = _scale_to_uint8(array)
        if array.size == 0:
            raise PictureError(f"empty picture ({array.shape[1]}x{array.shape[0]} pixels)")
        return image_to_grey(Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB"))
    raise PictureError(f"expected a picture [H, W] or [H, W, 3|4], got shape {list(array.shape)}")


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def looks_like_mnist(grey: np.ndarray, size: int = MNIST_SIZE) -> bool:
    """True for a size x size grey picture with a dark background, a bright digit, centred.

    Every MNIST test and training digit passes: their 2-px border averages <= 12 and their
    centre of mass lies within 0.5 px of (14, 14). Thresholds leave room for hand-made ones.
    """
    if grey.shape != (size, size) or grey.dtype != np.uint8:
        return False
    values = grey.astype(np.float64)
    ring = np.ones(grey.shape, bool)
    ring[2:-2, 2:-2] = False
    if values[ring].mean() > 32 or np.median(values) > 32 or values.max() < 128:
        return False
    mass = values.sum()
    ys, xs = np.indices(grey.shape)
    com_y, com_x = (values * ys).sum() / mass, (values * xs).sum() / mass
    centre = size / 2
    return abs(com_y - centre) <= 2.0 and abs(com_x - centre) <= 2.0


def to_mnist(image: np.ndarray | Image.Image, size: int = MNIST_SIZE, box: int | None = None) -> np.ndarray:
    """A picture of one digit -> MNIST form: uint8 [size, size], white digit on black.

    `image` is grey [H, W] / colour [H, W, 3|4] uint8 or a Pillow image, any size. `box` is the
    long side the digit is scaled to (default 20/28 of `size`, as MNIST). Raises PictureError
    when there is no digit to find (blank or uniform picture).
    """
    box = box or round(size * MNIST_BOX / MNIST_SIZE)
    grey = to_grey(image)
    if grey.shape == (size, size) and looks_like_mnist(grey, size):
        return grey.copy()
    work = _working_copy(grey)
    ink, noise = _ink_strength(work)
    mask = _digit_mask(ink, noise)
    patch, patch_mask = _crop(ink, mask)
    patch = _normalise_strokes(patch, patch_mask)
    fitted = _fit_box(patch, box)
    return _place_by_mass(fitted, size)


def resize_only(image: np.ndarray | Image.Image, size: int = MNIST_SIZE) -> np.ndarray:
    """What a naive pipeline does: grey, resize to size x size (aspect ignored), nothing else.

    uint8 [size, size]; a picture already that size is returned unchanged. This is the
    `--no-preprocess` path, and the baseline the benchmark compares `to_mnist` against.
    Raises PictureError for a uniform picture (nothing to classify).
    """
    grey = to_grey(image)
    if int(grey.max()) == int(grey.min()):
        raise PictureError(f"empty picture: every pixel is {int(grey.min())}")
    if grey.shape == (size, size):
        return grey.copy()
    resized = Image.fromarray(grey).resize((size, size), _Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _working_copy(grey: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> float32 [h, w] in 0..1 with MIN_WORK_SIDE <= long side <= WORK_SIDE."""
    h, w = grey.shape
    long_side = max(h, w)
    img = Image.fromarray(grey)
    if long_side > WORK_SIDE:
        scale = WORK_SIDE / long_side
        # BOX = area averaging: thin strokes keep their ink mass instead of aliasing away.
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), _Resampling.BOX)
    elif long_side < MIN_WORK_SIDE:
        factor = -(-MIN_WORK_SIDE // long_side)
        img = img.resize((w * factor, h * factor), _Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window around each pixel, windows clipped at the borders.

    Integral-image implementation: O(pixels) whatever the radius.
    """
    h, w = values.shape
    r = max(0, int(radius))
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = values.cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    total = (
        integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    )
    count = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return (total / count).astype(np.float32)


def _mad_sigma(values: np.ndarray) -> float:
    """Noise standard deviation from the median absolute deviation (robust to the ink)."""
    median = np.median(values)
    return float(1.4826 * np.median(np.abs(values - median)))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary or grey dilation by an octagon of `radius` (alternating 3x3 square and cross)."""
    out = mask
    for i in range(int(radius)):
        padded = np.pad(out, 1, mode="constant")
        cross = np.maximum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        if i % 2 == 0:
            cross = np.maximum.reduce(
                [cross, padded[:-2, :-2], padded[:-2, 2:], padded[2:, :-2], padded[2:, 2:]]
            )
        out = cross
    return out


def _running_extreme(values: np.ndarray, size: int, axis: int, op: np.ufunc) -> np.ndarray:
    """Max or min (`op` = np.maximum / np.minimum) over a centred window of odd `size` along
    `axis`, edges replicated.

    Doubling: after n steps level[j] = op(padded[j : j + 2**n]); two overlapping windows of
    the largest power of two <= size then cover any window. log2(size) array operations.
    """
    half = size // 2
    if half == 0:
        return values
    moved = np.moveaxis(values, axis, 0)
    n = moved.shape[0]
    padded = np.concatenate([np.repeat(moved[:1], half, 0), moved, np.repeat(moved[-1:], half, 0)], 0)
    level, span = padded, 1
    while span * 2 <= size:
        level = op(level[:-span], level[span:])
        span *= 2
    out = op(level[:n], level[size - span : size - span + n])
    return np.moveaxis(out, 0, axis)


def _closing(values: np.ndarray, size: int, dark_ink: bool) -> np.ndarray:
    """Grey closing (dark ink: max then min) or opening (light ink) with a size x size square.

    Removes ink strokes narrower than `size` and keeps everything broader: paper, gradients
    and, unlike a blur, the sharp edge of a shadow falling across the page.
    """
    first, second = (np.maximum, np.minimum) if dark_ink else (np.minimum, np.maximum)
    # Work on a copy padded by edge replication: the second pass may then use windows centred
    # outside the picture. Clipping them instead fills the wedge between a shadow edge and the
    # border with "paper" from the lit side, which then reads as ink.
    pad = size
    out = np.pad(values, pad, mode="edge")
    for op in (first, second):
        out = _running_extreme(_running_extreme(out, size, 0, op), size, 1, op)
    return out[pad:-pad, pad:-pad]


def _polarity_and_scale(work: np.ndarray) -> tuple[bool, int]:
    """Is the ink darker than the paper, and what window removes its strokes?

    Returns (dark_ink, size): `size` (odd, working-copy pixels) is a square window wider than
    the strokes, for `_closing`.

    A black top-hat (closing - picture) keeps the dark features narrower than its window, a
    white top-hat (picture - opening) the bright ones. Growing the window, the ink's top-hat
    fills up as soon as the window is wider than the strokes; the other top-hat fills up
    later, as the window starts to fit the gaps between and around the strokes (wider than
    the strokes, except in bold tight crops). Shadow edges and lighting gradients are steps
    and slopes, which neither keeps. So the ink is the polarity whose top-hat rises first;
    when that is close, a uniform picture border (paper, in nearly every photo) decides.
    Measured on a half-size log copy: in log units the ink's contrast does not depend on the
    light falling on it.
    """
    h, w = work.shape
    factor = 2 if max(h, w) > 128 else 1
    small = work if factor == 1 else np.asarray(
        Image.fromarray(work, "F").resize((max(1, w // 2), max(1, h // 2)), _Resampling.BOX),
        dtype=np.float32,
    )
    log = np.log(small + POLARITY_LOG_OFFSET).astype(np.float32)
    noise = _mad_sigma(log - _box_mean(log, 1))
    threshold = max(4.0 * noise, POLARITY_MIN_CONTRAST)
    sizes = [k for k in POLARITY_WINDOWS if k <= max(small.shape) // 2] or [3]
    energies = {True: [], False: []}  # dark_ink -> energy per window size
    for k in sizes:
        black = _closing(log, k, dark_ink=True) - log
        white = log - _closing(log, k, dark_ink=False)
        energies[True].append(float(np.maximum(black - threshold, 0).sum()))
        energies[False].append(float(np.maximum(white - threshold, 0).sum()))

    # Where each top-hat has half its final energy: the ink rises at the stroke width, the
    # other at the (wider) gaps. A top-hat with next to nothing in it (under a tenth of the
    # other's) takes no part.
    finals = {p: energies[p][-1] for p in (True, False)}
    largest = max(finals.values())
    rise = {p: next(i for i, e in enumerate(energies[p]) if e >= 0.5 * finals[p]) for p in finals}
    competing = [p for p in finals if finals[p] >= 0.1 * largest]
    i = min(rise[p] for p in competing)
    floor = 0.05 * largest + 1e-3
    ratio = (energies[True][i] + floor) / (energies[False][i] + floor)
    # The picture's border is almost always paper: where its median lies between the darkest
    # and the brightest pixels says which side the paper is on. Only a uniform border counts
    # (a shadow across it puts its median anywhere).
    ring = np.concatenate([work[0], work[-1], work[:, 0], work[:, -1]])
    low, high = np.percentile(work, [1, 99])
    span = max(float(high - low), 1e-6)
    ring_low, ring_median, ring_high = np.percentile(ring, [10, 50, 90])
    border = float((ring_median - low) / span)
    border_clear = (ring_high - ring_low) / span < 0.25 and (border > 0.7 or border < 0.3)
    if len(competing) == 1:
        dark_ink = competing[0]
    elif abs(rise[True] - rise[False]) >= 2:
        dark_ink = rise[True] < rise[False]
    elif border_clear and 0.1 < ratio < 10:
        # Close call, e.g. a bold stroke in a tight crop whose paper margins are as narrow as
        # the stroke: a clear border decides.
        dark_ink = border > 0.7
    elif abs(np.log(ratio)) > np.log(1.2):
        dark_ink = ratio > 1
    else:
        dark_ink = border >= 0.5
    # The stroke window: where the ink's top-hat has (nearly) all of its energy.
    ink_energy = energies[dark_ink]
    stroke_window = sizes[next(j for j, e in enumerate(ink_energy) if e >= 0.85 * ink_energy[-1])]
    size = int(round(STROKE_WINDOW_MARGIN * stroke_window * factor)) | 1
    return dark_ink, int(np.clip(size, 7, max(7, round(BACKGROUND_WINDOW * max(h, w))) | 1))


def _ink_strength(work: np.ndarray) -> tuple[np.ndarray, float]:
    """Working copy float32 [h, w] -> (ink float32 [h, w] in 0..1, its noise sigma).

    0 = paper, 1 = the ink's typical core strength. Raises PictureError for a blank picture.
    """
    dark_ink, size = _polarity_and_scale(work)
    # Paper and illumination: a closing with a window wider than the pen strokes, on a
    # lightly smoothed copy so that noise maxima do not bias it upwards.
    background = _closing(_box_mean(work, 1), size, dark_ink)
    # Relative ink strength: for dark ink 1 - pixel/paper cancels the illumination (pixel =
    # light x reflectance), so a digit half in shadow keeps one contrast; light ink is
    # measured against the headroom above its background.
    if dark_ink:
        strength = (background - work) / np.maximum(background, 0.05)
    else:
        strength = (work - background) / np.maximum(1.0 - background, 0.05)
    smooth = _box_mean(strength, 1)
    # Paper is the majority: its median is the zero, its spread the noise.
    zero = float(np.median(smooth))
    noise = max(_mad_sigma(smooth), 0.5 / 255)
    strength, smooth = strength - zero, smooth - zero
    ink_pixels = smooth > max(NOISE_SIGMAS * noise, MIN_CONTRAST / 2)
    peak = float(smooth.max())
    if not ink_pixels.any() or peak < MIN_CONTRAST:
        raise PictureError(
            f"empty picture: no ink found (strongest contrast {max(peak, 0.0):.3f}, "
            f"need {MIN_CONTRAST})"
        )
    # Contrast stretch: the ink's core (90th percentile) -> 1, the noise floor -> 0, linear
    # in between so that anti-aliased stroke edges stay grey.
    core = float(np.percentile(smooth[ink_pixels], 90))
    low = min(max(2.0 * noise, 0.1 * core), 0.5 * core)
    ink = np.clip((strength - low) / (core - low), 0.0, 1.0).astype(np.float32)
    return ink, noise / (core - low)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool mask [h, w].

    Returns (labels int32 [h, w], 0 = background, 1..n; areas int64 [n + 1], areas[0] = 0).
    Run-length labelling with union-find: the Python loop is per run of pixels in a row,
    not per pixel.
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
    # Number the roots 1..n and paint each run: +label at its start, -label at its end, then
    # a cumulative sum along the row.
    roots = np.array([find(label) for label in run_labels], np.int64)
    _, numbered = np.unique(roots, return_inverse=True)
    numbered = numbered.reshape(-1).astype(np.int64) + 1
    marks = np.zeros((h, w + 1), np.int64)
    np.add.at(marks, (rows, starts), numbered)
    np.add.at(marks, (rows, ends), -numbered)
    labels = marks.cumsum(axis=1)[:, :w].astype(np.int32)
    count = int(numbered.max()) if numbered.size else 0
    areas = np.bincount(labels.ravel(), minlength=count + 1).astype(np.int64)
    areas[0] = 0
    return labels, areas


def _digit_mask(ink: np.ndarray, noise: float) -> np.ndarray:
    """The digit's pixels: bool [h, w]. Keeps the main ink components, drops specks and marks
    far from the digit."""
    smooth = _box_mean(ink, 1)
    mask = smooth > max(0.35, 4 * noise)
    labels, areas = _components(mask)
    if len(areas) <= 1:
        raise PictureError("empty picture: no ink found")
    order = np.argsort(-areas[1:]) + 1
    largest = int(order[0])
    biggest = areas[largest]
    keep = np.zeros(len(areas), bool)
    keep[largest] = True
    ys, xs = np.nonzero(labels == largest)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    reach = NEAR * max(bottom - top + 1, right - left + 1)
    for label in order[1:]:
        area = areas[label]
        if area < SPECK_FRACTION * biggest:
            break
        ys, xs = np.nonzero(labels == label)
        near = (
            ys.max() >= top - reach
            and ys.min() <= bottom + reach
            and xs.max() >= left - reach
            and xs.min() <= right + reach
        )
        if area >= FAR_FRACTION * biggest or near:
            keep[label] = True
            if near:
                top, bottom = min(top, ys.min()), max(bottom, ys.max())
                left, right = min(left, xs.min()), max(right, xs.max())
    return keep[labels]


def _crop(ink: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut the digit out: ink float32 and its mask, cropped to the ink around the mask.

    Ink outside a 2-px margin around the kept components (specks, noise) is zeroed.
    """
    near = _dilate(mask, 2)
    digit = np.where(near, ink, 0.0).astype(np.float32)
    rows = np.flatnonzero((digit > 0.05).any(axis=1))
    cols = np.flatnonzero((digit > 0.05).any(axis=0))
    if rows.size == 0:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return digit[window], mask[window]


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a bool mask in pixels: 2 x area / perimeter.

    The perimeter counts 4-neighbour edges, scaled by pi/4 (the mean of |cos|+|sin|) so that
    slanted strokes are not over-counted.
    """
    area = float(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1).astype(np.int8)
    edges = np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum()
    return 2.0 * area / (float(edges) * np.pi / 4)


def _normalise_strokes(patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Thicken thin strokes (fine pen, large digit) towards MNIST's relative stroke width."""
    long_side = max(patch.shape)
    width = _stroke_width(mask)
    if long_side < 8 or width <= 0 or width >= THIN_STROKE * long_side:
        return patch
    grow = int(round((MNIST_STROKE * long_side - width) / 2))
    if grow < 1:
        return patch
    padded = np.pad(patch, grow)
    return _dilate(padded, grow)


def _fit_box(patch: np.ndarray, box: int) -> np.ndarray:
    """Resize float32 [h, w] so its long side is `box`, keeping the aspect ratio."""
    h, w = patch.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(patch.astype(np.float32), "F")
    # Downscaling with a filter whose support grows with the factor = anti-aliasing, as MNIST.
    resized = np.asarray(img.resize(size, getattr(_Resampling, FIT_FILTER)), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _place_by_mass(patch: np.ndarray, size: int) -> np.ndarray:
    """Put float32 [h, w] (0..1) into a size x size field, centre of mass at (size/2, size/2)."""
    h, w = patch.shape
    mass = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    com_y = float((patch * ys).sum() / mass) if mass > 0 else (h - 1) / 2
    com_x = float((patch * xs).sum() / mass) if mass > 0 else (w - 1) / 2
    top = int(np.clip(round(size / 2 - com_y), 0, size - h))
    left = int(np.clip(round(size / 2 - com_x), 0, size - w))
    field = np.zeros((size, size), np.float32)
    field[top : top + h, left : left + w] = patch
    return np.rint(field * 255.0).astype(np.uint8)
