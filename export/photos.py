"""Make realistic "photos of a digit written on paper" from MNIST digits (numpy + Pillow).

Used by the tests, the benchmark (`make bench-mobile`) and the bundle's sample pictures; not
shipped to the Pi. Each photo draws its settings from a seeded numpy Generator, so the same
seed gives the same pictures on every machine.

What a phone or Pi camera photo of a handwritten digit has, and how it is made here:

- the digit as pen strokes: the MNIST digit upscaled to its size on the page, its grey ramp
  turned into crisp ink with soft edges, sometimes a thinner pen (eroded strokes), slightly
  rotated, dark ink (black, blue, red-brown, pencil grey) of varying strength;
- off-centre and any size: canvas 64-1000 px, any aspect ratio, the digit 20-85% of the short
  side anywhere on it;
- off-white paper with texture, lit unevenly: a linear gradient, vignetting and sometimes a
  soft-edged shadow across the page;
- the camera: defocus blur, sensor noise, JPEG compression (quality 35-95), sometimes PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

_Resampling = getattr(Image, "Resampling", Image)

# Ink colours (RGB): ballpoint black, blue, red-brown, graphite pencil.
INKS = ((28, 28, 34), (30, 42, 125), (120, 32, 30), (85, 85, 92))


@dataclass(frozen=True)
class Photo:
    """One synthetic photo: the encoded file, its format and the decoded RGB pixels."""

    data: bytes  # the file as written (JPEG or PNG)
    format: str  # "jpeg" or "png"
    rgb: np.ndarray  # uint8 [H, W, 3], decoded from `data` (JPEG artefacts included)

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"


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


def _illumination(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Light falling on the page float32 [h, w], about 0.45..1: gradient, vignette, shadow."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys, xs = ys / max(h - 1, 1) - 0.5, xs / max(w - 1, 1) - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * xs + np.sin(theta) * ys  # -0.7..0.7
    light = 1.0 - rng.uniform(0.0, 0.45) * (ramp + 0.7) / 1.4
    light *= 1.0 - rng.uniform(0.0, 0.3) * (xs**2 + ys**2) * 2
    if rng.random() < 0.4:
        # A soft shadow (hand, phone): a darker half-plane with a blurred edge.
        phi = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-0.35, 0.35)
        distance = np.cos(phi) * xs + np.sin(phi) * ys - offset
        penumbra = rng.uniform(0.03, 0.15)
        shade = 1.0 / (1.0 + np.exp(-distance / penumbra * 4))
        light *= 1.0 - rng.uniform(0.2, 0.5) * shade
    return light.astype(np.float32)


def _paper_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency fibre/texture variation float32 [h, w] around 1 (a few percent)."""
    coarse = rng.normal(0.0, 1.0, (max(2, h // 24), max(2, w // 24))).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, "F").resize((w, h), _Resampling.BICUBIC), dtype=np.float32)
    return 1.0 + rng.uniform(0.005, 0.025) * texture


def synthesize_photo(digit: np.ndarray, rng: np.random.Generator) -> Photo:
    """A photo of `digit` (MNIST uint8 [28, 28], white on black) written on paper.

    Returns a Photo (JPEG 80% of the time, else PNG), RGB, any size from 64 to 1000 px.
    """
    digit = np.asarray(digit, dtype=np.uint8)
    if digit.shape != (28, 28):
        raise ValueError(f"expected an MNIST digit [28, 28], got {list(digit.shape)}")
    long_side = int(rng.integers(64, 1001))
    aspect = rng.uniform(0.6, 1.0)
    short_side = max(48, int(long_side * aspect))
    h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    box = int(round(min(h, w) * rng.uniform(0.2, 0.85)))
    thin = rng.random() < 0.3
    alpha = _ink_alpha(digit, box, rng, thin) * rng.uniform(0.75, 1.0)
    side = alpha.shape[0]
    if side > min(h, w):  # keep the whole digit on the page
        scale = min(h, w) / side
        alpha = np.asarray(Image.fromarray(alpha, "F").resize((min(h, w), min(h, w)), _Resampling.BILINEAR))
        side = alpha.shape[0]
        del scale
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    coverage = np.zeros((h, w), np.float32)
    coverage[top : top + side, left : left + side] = alpha

    paper = np.array([rng.uniform(215, 250), rng.uniform(210, 248), rng.uniform(195, 240)], np.float32)
    ink = np.array(INKS[int(rng.integers(len(INKS)))], np.float32) + rng.normal(0, 8, 3)
    page = paper[None, None, :] * _paper_texture(h, w, rng)[..., None]
    rgb = page * (1.0 - coverage[..., None]) + ink[None, None, :] * coverage[..., None]
    rgb *= _illumination(h, w, rng)[..., None]
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 1.2) * max(h, w) / 500
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(1.0, 6.0), (h, w, 3))
    img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")

    buffer = io.BytesIO()
    if rng.random() < 0.8:
        img.save(buffer, "JPEG", quality=int(rng.integers(35, 96)))
        fmt = "jpeg"
    else:
        img.save(buffer, "PNG")
        fmt = "png"
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        rgb_out = np.asarray(decoded.convert("RGB"), dtype=np.uint8)
    return Photo(data=data, format=fmt, rgb=rgb_out)


def synthesize_photos(digits: np.ndarray, seed: int = 0) -> list[Photo]:
    """One photo per digit uint8 [N, 28, 28], from a Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return [synthesize_photo(d, rng) for d in np.asarray(digits)]
