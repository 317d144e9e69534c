"""MNIST for training: where it comes from (TFDS or local IDX files) and the tf.data pipeline.

Two sources give the same thing, `MnistData` (numpy uint8 images [N, 28, 28], uint8 labels [N]
for train and test, plus provenance):

- TFDS `mnist` (the default), downloaded on first use into ~/tensorflow_datasets;
- a folder with the four standard IDX files (`--data-dir`), for machines that cannot download.

`split_validation` carves the validation set from the END of the training set; the test set
serves only the final evaluation. `make_train_dataset` / `make_eval_dataset` build the tf.data
pipelines. Images stay uint8 all the way to the model's own Rescaling layer; augmentation (if
any) runs after the cache, on uint8 batches, and never at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import contract
from model import idx


class DataError(RuntimeError):
    """The data cannot be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class ArraySplit:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1:] != contract.IMAGE_SHAPE:
            raise DataError(f"images must be uint8 [N, 28, 28], got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MnistData:
    train: ArraySplit
    test: ArraySplit
    source: dict[str, Any] = field(default_factory=dict)  # provenance, saved in metrics.json


def load_idx_dir(data_dir: Path) -> MnistData:
    """Load MNIST from a folder of IDX files (plain or .gz). Raises idx.IdxError."""
    train = idx.load_split(Path(data_dir), "train")
    test = idx.load_split(Path(data_dir), "test")
    files = {
        f.path.name: f.sha256
        for s in (train, test)
        for f in (s.images_file, s.labels_file)
    }
    source = {
        "kind": "idx",
        "data_dir": str(Path(data_dir).resolve()),
        "sha256": files,
        "canonical_mnist": train.canonical and test.canonical,
        "looks_like_other_dataset": (
            (len(train.labels), len(test.labels))
            == (idx.CANONICAL_COUNTS["train"], idx.CANONICAL_COUNTS["test"])
            and not (train.canonical and test.canonical)
        ),
    }
    return MnistData(ArraySplit(train.images, train.labels), ArraySplit(test.images, test.labels), source)


OFFLINE_HINT = (
    "To train offline, point --data-dir (make train DATA_DIR=...) at a folder holding the four "
    "MNIST IDX files: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each may be .gz), e.g. make train DATA_DIR=../shared/datasets/mnist"
)


# Where TFDS downloads MNIST from (its mnist builder's URLs).
TFDS_DOWNLOAD_HOST = "storage.googleapis.com"


def check_download_reachable(host: str = TFDS_DOWNLOAD_HOST, timeout: float = 10.0) -> None:
    """Fail in seconds, not minutes: TFDS retries an unreachable host for several minutes."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise DataError(
            f"TFDS must download MNIST from {host}, which this machine cannot reach ({err}). "
            f"{OFFLINE_HINT}"
        ) from err


def load_tfds(tfds_data_dir: Path | None = None) -> MnistData:
    """Load TFDS `mnist` (downloading it on first use) as numpy arrays.

    Raises DataError, naming the offline alternative, when TFDS cannot download or prepare it.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise DataError(f"tensorflow-datasets is not installed ({err}). {OFFLINE_HINT}") from err
    builder = tfds.builder("mnist", data_dir=None if tfds_data_dir is None else str(tfds_data_dir))
    if not builder.is_prepared():
        check_download_reachable()
    try:
        (train, test), info = tfds.load(
            "mnist",
            split=["train", "test"],
            as_supervised=True,
            with_info=True,
            data_dir=None if tfds_data_dir is None else str(tfds_data_dir),
        )
    except Exception as err:  # TFDS raises many kinds: network, checksum, permission
        raise DataError(
            f"TFDS could not load 'mnist' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"{OFFLINE_HINT}"
        ) from err

    def to_split(ds) -> ArraySplit:
        # Large batches, not batch_size=-1 (which needs a known cardinality): a few steps.
        images, labels = [], []
        for x, y in tfds.as_numpy(ds.batch(10_000)):
            images.append(x)
            labels.append(y)
        # TFDS gives [N, 28, 28, 1]; our model takes [N, 28, 28].
        return ArraySplit(
            np.concatenate(images).reshape(-1, *contract.IMAGE_SHAPE).astype(np.uint8),
            np.concatenate(labels).astype(np.uint8),
        )

    source = {"kind": "tfds", "name": "mnist", "version": str(info.version)}
    return MnistData(to_split(train), to_split(test), source)


def load_mnist(data_dir: Path | None, tfds_data_dir: Path | None = None) -> MnistData:
    """The one entry point: IDX files when `data_dir` is given, else TFDS."""
    if data_dir is not None:
        return load_idx_dir(data_dir)
    return load_tfds(tfds_data_dir)


def split_validation(train: ArraySplit, validation_size: int) -> tuple[ArraySplit, ArraySplit]:
    """Carve the LAST `validation_size` training images off as the validation set.

    MNIST's training set is ordered by writer group, not by class, so its tail is a fair
    sample; keeping the split deterministic (no shuffle) makes runs comparable.
    """
    n = len(train)
    if not 0 < validation_size < n:
        raise DataError(
            f"--validation-size {validation_size} must be between 1 and {n - 1} "
            f"(the training set holds {n} images)"
        )
    cut = n - validation_size
    return (
        ArraySplit(train.images[:cut], train.labels[:cut]),
        ArraySplit(train.images[cut:], train.labels[cut:]),
    )


# --- augmentation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """Random distortions of training images: affine (rotation, scale, shift) and elastic.

    Elastic distortions follow Simard, Steinkraus and Platt, "Best practices for convolutional
    neural networks applied to visual document analysis" (ICDAR 2003), section 2: a random
    displacement field, uniform in [-1, 1] per pixel and axis, convolved with a Gaussian of
    standard deviation `elastic_sigma` pixels and scaled by `elastic_alpha` pixels (their
    MNIST setting: sigma 4, alpha 34). Every distortion here is applied in ONE bilinear
    resampling of the original image, so pixels are interpolated once.

    All zeros (the default) means no augmentation.
    """

    max_rotation_deg: float = 0.0  # rotation uniform in [-max, +max] degrees
    max_shift_px: float = 0.0  # shift uniform in [-max, +max] pixels, per axis
    scale_range: float = 0.0  # scale uniform in [1 - range, 1 + range]
    elastic_alpha: float = 0.0  # elastic displacement scale, pixels (0: no elastic distortion)
    elastic_sigma: float = 4.0  # elastic smoothing, pixels (Gaussian standard deviation)

    def __post_init__(self):
        values = (self.max_rotation_deg, self.max_shift_px, self.scale_range, self.elastic_alpha)
        if min(values) < 0 or self.elastic_sigma <= 0 or self.scale_range >= 1:
            raise DataError(f"augmentation settings out of range: {self}")

    @property
    def enabled(self) -> bool:
        return any((self.max_rotation_deg, self.max_shift_px, self.scale_range, self.elastic_alpha))


def gaussian_smoothing_matrix(size: int, sigma: float, stride: int = 1) -> np.ndarray:
    """float32 [size, ceil(size / stride)] G with (G @ f)[i] = sum_j g(i - x_j) f[j].

    g is the unit-area Gaussian of standard deviation `sigma` and x_j = stride * j + c the
    lattice points, centred on the image (c = 0.5 for 28 pixels and stride 2), so G @ F @ G.T
    convolves a field F given on the lattice with the 2-D Gaussian (nothing outside the
    image): two small matrix products instead of a 4*sigma-wide convolution.
    """
    points = stride * np.arange(-(-size // stride))
    points = points + ((size - 1) - points[-1]) / 2.0
    offsets = np.arange(size)[:, None] - points[None, :]
    return (np.exp(-0.5 * (offsets / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)).astype(np.float32)


def bilinear_sample(images, rows, cols):
    """Sample uint8 [B, H, W] images at float coordinates [B, H, W] (rows, cols) -> float32
    [B, H, W], bilinearly; 0 outside the image.

    The images get a zero border (1 pixel before, 2 after) and the coordinates are clamped
    into it, so no tap needs a bounds mask. Each pixel's 2 x 2 uint8 neighbourhood is packed
    into one int32, so one gather fetches all four taps (TF's gather costs per element).
    """
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    # int32 [B, H + 2, W + 2]: each padded pixel's 2 x 2 neighbourhood, one byte each
    # (little-endian bitcast order: top-left, top-right, bottom-left, bottom-right).
    padded = tf.cast(tf.pad(images, [[0, 0], [1, 2], [1, 2]]), tf.int32)  # [B, H + 3, W + 3]
    shift = tf.bitwise.left_shift
    packed = tf.bitwise.bitwise_or(
        tf.bitwise.bitwise_or(padded[:, :-1, :-1], shift(padded[:, :-1, 1:], 8)),
        tf.bitwise.bitwise_or(shift(padded[:, 1:, :-1], 16), shift(padded[:, 1:, 1:], 24)),
    )
    stride = width + 2
    packed = tf.reshape(packed, [-1])

    rows = tf.clip_by_value(rows, -1.0, float(height))
    cols = tf.clip_by_value(cols, -1.0, float(width))
    row0, col0 = tf.floor(rows), tf.floor(cols)
    weight_row, weight_col = rows - row0, cols - col0
    batch = tf.shape(images)[0]
    base = tf.reshape(tf.range(batch) * ((height + 2) * stride), [-1, 1, 1])  # [B, 1, 1]
    index = base + tf.cast(row0 + 1.0, tf.int32) * stride + tf.cast(col0 + 1.0, tf.int32)
    taps = tf.cast(tf.bitcast(tf.gather(packed, index), tf.uint8), tf.float32)  # [B, H, W, 4]
    top = taps[..., 0] + weight_col * (taps[..., 1] - taps[..., 0])
    bottom = taps[..., 2] + weight_col * (taps[..., 3] - taps[..., 2])
    return top + weight_row * (bottom - top)


# Elastic noise lattice: the uniform noise is drawn on every other pixel (a centred 14 x 14
# lattice for MNIST) and smoothed onto all of them, its amplitude doubled so that the field's
# variance is the per-pixel construction's: within 0.5% everywhere at sigma 4, 2% at sigma 2
# (tests/test_data.py compares them), at a quarter of the random numbers.
ELASTIC_NOISE_STRIDE = 2


def elastic_field(batch, size: int, key, alpha: float, sigma: float):
    """float32 [batch, 2, size, size]: random displacements (rows, then columns) in pixels,
    Simard et al.'s uniform noise smoothed by a Gaussian of std `sigma`, times `alpha`
    (drawn on a lattice of every ELASTIC_NOISE_STRIDE-th pixel when sigma >= 2)."""
    import tensorflow as tf

    stride = ELASTIC_NOISE_STRIDE if sigma >= 2 else 1
    smooth = tf.constant(gaussian_smoothing_matrix(size, sigma, stride))  # [H, h]
    coarse = smooth.shape[1]
    noise = tf.random.stateless_uniform([batch * 2, coarse, coarse], key, -1.0, 1.0, alg="philox")
    field = tf.matmul(tf.matmul(smooth, noise), smooth, transpose_b=True)  # [2B, H, W]
    return tf.reshape(field * (alpha * stride), [batch, 2, size, size])


def distort(images, key, augmentation: Augmentation):
    """Randomly distort a uint8 batch [B, 28, 28] -> uint8 [B, 28, 28] (see `Augmentation`).

    `key` is a [2] int tensor for TF's stateless RNG: the same key gives the same distortions,
    whatever the process, thread or run (that is what makes a resumed run repeat an
    uninterrupted one). Each output pixel p samples the original at
    centre + A (p + d(p) - centre) - t: d the elastic field, A rotation and scale, t the shift.
    """
    import tensorflow as tf

    a = augmentation
    batch = tf.shape(images)[0]
    size = images.shape[1]
    keys = tf.random.experimental.stateless_split(key, 2, alg="philox")

    grid = tf.range(size, dtype=tf.float32)
    rows, cols = grid[None, :, None], grid[None, None, :]  # broadcast to [B, H, W] below
    if a.elastic_alpha > 0:
        field = elastic_field(batch, size, keys[0], a.elastic_alpha, a.elastic_sigma)
        rows, cols = rows + field[:, 0], cols + field[:, 1]
    if a.max_rotation_deg or a.scale_range or a.max_shift_px:
        u = tf.random.stateless_uniform([4, batch, 1, 1], keys[1], -1.0, 1.0, alg="philox")
        angle = u[0] * (a.max_rotation_deg * math.pi / 180.0)
        scale = 1.0 + u[1] * a.scale_range
        centre = (size - 1) / 2.0
        y, x = rows - centre, cols - centre
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        rows = (centre - u[2] * a.max_shift_px) + sin * x + cos * y
        cols = (centre - u[3] * a.max_shift_px) + cos * x - sin * y
    rows = tf.broadcast_to(rows, [batch, size, size])
    cols = tf.broadcast_to(cols, [batch, size, size])
    out = bilinear_sample(images, rows, cols)
    return tf.cast(tf.clip_by_value(out + 0.5, 0.0, 255.0), tf.uint8)  # round half up


# --- pipelines ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    """How many batches make an epoch, and how many of them one tf.function call runs.

    Keras runs `steps_per_execution` training steps per call and an epoch of
    `steps_per_epoch` steps as whole calls, so the epoch length must be a multiple of it for
    epochs to start where the pipeline's epochs start. `plan_epochs` picks both.
    """

    steps_per_epoch: int
    steps_per_execution: int
    batch_size: int

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size


def plan_epochs(num_images: int, batch_size: int, steps_per_execution: int) -> EpochPlan:
    """The fewest calls of at most `steps_per_execution` steps that see every image once.

    E.g. 55,000 images, batch 128, up to 32 steps a call: 430 batches are needed (the last
    one partly filled), so 14 calls of 31 steps = 434 batches; the 552 extra places are
    filled from the start of the epoch's order (they are seen twice that epoch).
    """
    if num_images < 1 or batch_size < 1 or steps_per_execution < 1:
        raise DataError(f"cannot plan epochs of {num_images} images in batches of {batch_size}")
    needed = -(-num_images // batch_size)  # ceil: every image at least once per epoch
    calls = -(-needed // steps_per_execution)
    per_call = -(-needed // calls)
    return EpochPlan(steps_per_epoch=calls * per_call, steps_per_execution=per_call, batch_size=batch_size)


def epoch_order(num_images: int, length: int, seed: int, epoch):
    """int32 [length]: a permutation of range(num_images), drawn from (seed, epoch) alone,
    continued from its start when `length` > `num_images` (length < 2 * num_images)."""
    import tensorflow as tf

    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64))
    order = tf.random.experimental.stateless_shuffle(tf.range(num_images, dtype=tf.int32), key)
    return tf.concat([order, order[: length - num_images]], axis=0)


def make_train_dataset(
    split: ArraySplit,
    batch_size: int,
    seed: int,
    augmentation: Augmentation | None = None,
    first_epoch: int = 0,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
):
    """Training batches of epochs `first_epoch` .. `epochs - 1` (default: just `first_epoch`).

    Yields (uint8 [B, 28, 28], int32 [B]), `steps_per_epoch` full batches per epoch (default:
    enough to see every image once, see `plan_epochs`). Everything random is a pure function
    of (seed, epoch, step): epoch e's order is `epoch_order(seed, e)` and batch s of it is
    distorted with the key fold_in(fold_in([seed, 1], e), s). So the pipeline started at
    epoch e (a resumed run) yields exactly what an uninterrupted run yields from epoch e, and
    parallel map calls cannot change the result.
    """
    import tensorflow as tf

    n = len(split)
    if steps_per_epoch is None:
        steps_per_epoch = -(-n // batch_size)
    if not n <= steps_per_epoch * batch_size < 2 * n + batch_size:
        raise DataError(f"{steps_per_epoch} batches of {batch_size} cannot show {n} images once per epoch")
    end = first_epoch + 1 if epochs is None else epochs
    images = tf.constant(split.images)  # uint8 [N, 28, 28], held once in memory
    labels = tf.constant(split.labels.astype(np.int32))  # int32 [N]
    length = steps_per_epoch * batch_size
    augment = augmentation is not None and augmentation.enabled
    # XLA fuses the distortion's ~40 elementwise ops into a few loops, which costs less CPU
    # per batch than running them one by one in the tf.data map.
    distort_xla = tf.function(lambda batch, key: distort(batch, key, augmentation), jit_compile=True)

    def epoch_batches(epoch):
        order = tf.reshape(epoch_order(n, length, seed, epoch), [steps_per_epoch, batch_size])
        steps = tf.data.Dataset.from_tensor_slices((order, tf.range(steps_per_epoch, dtype=tf.int64)))
        return steps.map(lambda index, step: (index, epoch, step))

    def load(index, epoch, step):
        batch = tf.gather(images, index)  # [B, 28, 28]
        if augment:
            key = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), epoch), step
            )
            batch = distort_xla(batch, key)
        return batch, tf.gather(labels, index)

    ds = tf.data.Dataset.range(first_epoch, end).flat_map(epoch_batches)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(split: ArraySplit, batch_size: int):
    """Evaluation pipeline: batch -> cache -> prefetch, in order, nothing dropped."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int32)))
    return ds.batch(batch_size).cache().prefetch(tf.data.AUTOTUNE)
