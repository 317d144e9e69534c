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

from model import idx


class DataError(RuntimeError):
    """The data cannot be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class ArraySplit:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1:] != (28, 28):
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
            np.concatenate(images).reshape(-1, 28, 28).astype(np.uint8),
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

def random_affine(images, seed, max_rotation_deg: float, max_shift_px: float, scale_range: float):
    """Random rotation, scale and shift of a uint8 batch [B, 28, 28] -> uint8 [B, 28, 28].

    One projective-transform op for the whole batch (bilinear, black fill), so it costs little
    next to the MLP. `seed` is a [2] int tensor for the stateless RNG.
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    angle = tf.random.stateless_uniform([batch], seeds[0], -1.0, 1.0) * (max_rotation_deg * math.pi / 180.0)
    scale = 1.0 + tf.random.stateless_uniform([batch], seeds[1], -1.0, 1.0) * scale_range
    shift = tf.random.stateless_uniform([batch, 2], seeds[2], -1.0, 1.0) * max_shift_px
    # The transform maps OUTPUT coordinates to INPUT coordinates: rotate/scale about the centre.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    centre = 13.5
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = centre - a0 * centre - a1 * centre - shift[:, 0]
    b2 = centre - b0 * centre - b1 * centre - shift[:, 1]
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)  # [B, 8]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None],  # [B, 28, 28, 1]
        transforms=transforms,
        output_shape=tf.constant([28, 28], tf.int32),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[..., 0]


# --- pipelines ---------------------------------------------------------------------------------

def make_train_dataset(
    split: ArraySplit,
    batch_size: int,
    seed: int,
    augment: bool = False,
    max_rotation_deg: float = 0.0,
    max_shift_px: float = 0.0,
    scale_range: float = 0.0,
):
    """Training pipeline: cache -> full shuffle (reshuffled each epoch) -> batch -> augment -> prefetch.

    Yields (uint8 [B, 28, 28], int32 [B]). Batches are full (drop_remainder) so XLA compiles
    one shape; the shuffle changes every epoch, so every image is still seen.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int32)))
    ds = ds.cache()
    ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        # One [2] stateless-RNG key per batch from a seeded random stream that is re-drawn every
        # epoch: augmentations differ between epochs yet the whole run is reproducible.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def augment_batch(batch, key):
            images, labels = batch
            return random_affine(images, key, max_rotation_deg, max_shift_px, scale_range), labels

        ds = tf.data.Dataset.zip((ds, keys)).map(
            augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(split: ArraySplit, batch_size: int):
    """Evaluation pipeline: batch -> cache -> prefetch, in order, nothing dropped."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int32)))
    return ds.batch(batch_size).cache().prefetch(tf.data.AUTOTUNE)
