"""The data sources and the tf.data pipeline."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model import data


def _hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(im.tobytes()).digest() for im in images}


def test_validation_is_carved_from_the_end_of_training(fixture_mnist):
    train, val = data.split_validation(fixture_mnist.train, 500)
    assert len(train) == 2500 and len(val) == 500
    np.testing.assert_array_equal(val.images, fixture_mnist.train.images[-500:])
    np.testing.assert_array_equal(train.images, fixture_mnist.train.images[:-500])


@pytest.mark.parametrize("size", [0, 3000, 5000])
def test_validation_size_must_leave_training_images(fixture_mnist, size):
    with pytest.raises(data.DataError, match="--validation-size"):
        data.split_validation(fixture_mnist.train, size)


def test_train_pipeline_shapes_dtypes_and_full_batches(fixture_mnist):
    train, _ = data.split_validation(fixture_mnist.train, 500)
    ds = data.make_train_dataset(train, batch_size=128, seed=3)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2500 // 128  # drop_remainder: one static shape for XLA
    for images, labels in batches:
        assert images.dtype == np.uint8 and images.shape == (128, 28, 28)
        assert labels.dtype == np.int32 and labels.shape == (128,)


def test_train_pipeline_reshuffles_each_epoch_reproducibly(fixture_mnist):
    train, _ = data.split_validation(fixture_mnist.train, 500)

    def two_epochs(seed):
        ds = data.make_train_dataset(train, batch_size=500, seed=seed)
        return [np.concatenate([y for _, y in ds.as_numpy_iterator()]) for _ in range(2)]

    first, second = two_epochs(7)
    assert not np.array_equal(first, second)  # a new order every epoch
    again_first, again_second = two_epochs(7)
    np.testing.assert_array_equal(first, again_first)  # the same seed, the same orders
    np.testing.assert_array_equal(second, again_second)


def test_training_never_sees_test_or_validation_images(fixture_mnist):
    train, val = data.split_validation(fixture_mnist.train, 500)
    ds = data.make_train_dataset(train, batch_size=100, seed=1)  # 2500 / 100: nothing dropped
    seen = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
    seen_hashes = _hashes(seen)
    assert seen_hashes == _hashes(train.images)
    assert not seen_hashes & _hashes(fixture_mnist.test.images)
    assert not seen_hashes & _hashes(val.images)


def test_augmentation_keeps_uint8_and_moves_pixels(fixture_mnist):
    train, _ = data.split_validation(fixture_mnist.train, 500)
    plain = data.make_train_dataset(train, batch_size=2500, seed=5)
    augmented = data.make_train_dataset(
        train, batch_size=2500, seed=5, augment=True, max_rotation_deg=10, max_shift_px=2, scale_range=0.1
    )
    (x_plain, y_plain), = plain.as_numpy_iterator()
    (x_aug, y_aug), = augmented.as_numpy_iterator()
    assert x_aug.dtype == np.uint8 and x_aug.shape == x_plain.shape
    np.testing.assert_array_equal(y_plain, y_aug)  # same order, only the pixels move
    changed = (x_plain != x_aug).reshape(len(x_aug), -1).any(axis=1).mean()
    assert changed > 0.95
    # Still digits: ink mass is roughly preserved (no blanking, no saturation).
    ratio = x_aug.astype(float).sum() / x_plain.astype(float).sum()
    assert 0.85 < ratio < 1.15


def test_eval_pipeline_keeps_order_and_every_image(fixture_mnist):
    ds = data.make_eval_dataset(fixture_mnist.test, batch_size=300)
    images = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
    np.testing.assert_array_equal(images, fixture_mnist.test.images)


def test_tfds_source_under_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data replaces the download, so the reachability check has nothing to guard.
    monkeypatch.setattr(data, "check_download_reachable", lambda *a, **k: None)
    with tfds.testing.mock_data(num_examples=64):
        mnist = data.load_mnist(None)
    assert mnist.source["kind"] == "tfds"
    for split in (mnist.train, mnist.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28)
        assert split.labels.max() < 10 and len(split) == 64


def test_unreachable_download_host_fails_fast_with_the_offline_hint():
    with pytest.raises(data.DataError, match=r"cannot reach.*--data-dir.*DATA_DIR=\.\./shared/datasets/mnist"):
        data.check_download_reachable("no-such-host.invalid", timeout=5)


def test_tfds_failure_points_to_the_offline_source(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(data, "check_download_reachable", lambda *a, **k: None)
    monkeypatch.setattr(tfds, "load", no_network)
    with pytest.raises(data.DataError, match=r"TFDS could not load 'mnist'.*--data-dir.*DATA_DIR"):
        data.load_mnist(None, tfds_data_dir=tmp_path)
