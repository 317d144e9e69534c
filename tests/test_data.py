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
    assert len(batches) == -(-2500 // 128)  # every image once; the last batch filled up
    for images, labels in batches:
        assert images.dtype == np.uint8 and images.shape == (128, 28, 28)  # one shape for XLA
        assert labels.dtype == np.int32 and labels.shape == (128,)


@pytest.mark.parametrize("n, batch, per_call, steps, calls_of", [
    (55_000, 128, 32, 434, 31),  # 430 batches needed -> 14 calls of 31
    (2_500, 64, 32, 40, 20),
    (2_500, 100, 32, 25, 25),
    (1_000, 1000, 32, 1, 1),
    (5_000, 128, 1, 40, 1),
])
def test_epoch_plan_whole_calls_cover_every_image(n, batch, per_call, steps, calls_of):
    plan = data.plan_epochs(n, batch, per_call)
    assert (plan.steps_per_epoch, plan.steps_per_execution) == (steps, calls_of)
    assert plan.steps_per_epoch % plan.steps_per_execution == 0  # Keras' epochs = the pipeline's
    assert n <= plan.images_per_epoch < n + batch * (plan.steps_per_epoch // plan.steps_per_execution)


def test_every_epoch_shows_every_image_and_reshuffles(fixture_mnist):
    train, _ = data.split_validation(fixture_mnist.train, 500)
    plan = data.plan_epochs(len(train), 64, 32)
    ds = data.make_train_dataset(train, 64, seed=7, epochs=2, steps_per_epoch=plan.steps_per_epoch)
    labels = np.concatenate([y for _, y in ds.as_numpy_iterator()]).reshape(2, -1)
    images = np.concatenate([x for x, _ in ds.as_numpy_iterator()]).reshape(2, -1, 28, 28)
    for epoch in range(2):
        assert _hashes(images[epoch]) == _hashes(train.images)  # all of them, nothing else
    assert not np.array_equal(labels[0], labels[1])  # a new order every epoch


def _batches(train, **kwargs):
    return list(data.make_train_dataset(train, **kwargs).as_numpy_iterator())


DISTORTIONS = data.Augmentation(max_rotation_deg=10, max_shift_px=2, scale_range=0.1,
                                elastic_alpha=34, elastic_sigma=4)


def test_pipeline_started_at_epoch_e_repeats_an_uninterrupted_run(fixture_mnist):
    """What makes a resumed run end with the same model: epoch e's order and distortions are
    a function of (seed, e) alone, not of how many epochs this process has iterated."""
    train, _ = data.split_validation(fixture_mnist.train, 500)
    common = dict(batch_size=250, seed=11, augmentation=DISTORTIONS)
    uninterrupted = _batches(train, first_epoch=0, epochs=3, **common)  # 10 batches an epoch
    resumed = _batches(train, first_epoch=2, epochs=3, **common)
    assert len(uninterrupted) == 30 and len(resumed) == 10
    for (x1, y1), (x2, y2) in zip(uninterrupted[20:], resumed):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)
    # ... and the epochs differ from each other, distortions included.
    assert not np.array_equal(uninterrupted[0][0], uninterrupted[10][0])
    other_seed = _batches(train, first_epoch=2, epochs=3, **{**common, "seed": 12})
    assert not np.array_equal(other_seed[0][1], resumed[0][1])


def test_training_never_sees_test_or_validation_images(fixture_mnist):
    train, val = data.split_validation(fixture_mnist.train, 500)
    ds = data.make_train_dataset(train, batch_size=100, seed=1)  # 2500 / 100: nothing repeated
    seen = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
    seen_hashes = _hashes(seen)
    assert seen_hashes == _hashes(train.images)
    assert not seen_hashes & _hashes(fixture_mnist.test.images)
    assert not seen_hashes & _hashes(val.images)


def test_augmentation_keeps_uint8_and_moves_pixels(fixture_mnist):
    train, _ = data.split_validation(fixture_mnist.train, 500)
    (x_plain, y_plain), = _batches(train, batch_size=2500, seed=5)
    for augmentation in (DISTORTIONS, data.Augmentation(elastic_alpha=34, elastic_sigma=4),
                         data.Augmentation(max_rotation_deg=10, max_shift_px=2, scale_range=0.1)):
        (x_aug, y_aug), = _batches(train, batch_size=2500, seed=5, augmentation=augmentation)
        assert x_aug.dtype == np.uint8 and x_aug.shape == x_plain.shape
        np.testing.assert_array_equal(y_plain, y_aug)  # same order, only the pixels move
        changed = (x_plain != x_aug).reshape(len(x_aug), -1).any(axis=1).mean()
        assert changed > 0.95, augmentation
        # Still digits: ink mass is roughly preserved (no blanking, no saturation).
        ratio = x_aug.astype(float).sum() / x_plain.astype(float).sum()
        assert 0.85 < ratio < 1.15, augmentation


def test_no_distortion_is_the_identity_and_keys_decide_everything(fixture_mnist):
    import tensorflow as tf

    images = tf.constant(fixture_mnist.train.images[:64])
    key = tf.constant([3, 4], tf.int64)
    # Zero settings sample every pixel at its own place: bilinear interpolation is exact.
    np.testing.assert_array_equal(data.distort(images, key, data.Augmentation()).numpy(), images.numpy())
    first = data.distort(images, key, DISTORTIONS).numpy()
    np.testing.assert_array_equal(first, data.distort(images, key, DISTORTIONS).numpy())
    other = data.distort(images, tf.constant([3, 5], tf.int64), DISTORTIONS).numpy()
    assert (first != other).reshape(64, -1).any(axis=1).all()


def _reference_bilinear(images, rows, cols):
    """Bilinear sampling, zero outside the image, one pixel at a time (the definition)."""
    b, h, w = images.shape
    out = np.zeros(rows.shape)
    for index in np.ndindex(*rows.shape):
        r, c = rows[index], cols[index]
        r0, c0 = int(np.floor(r)), int(np.floor(c))
        total = 0.0
        for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
            rr, cc = r0 + dr, c0 + dc
            weight = (1 - abs(r - rr)) * (1 - abs(c - cc))
            if 0 <= rr < h and 0 <= cc < w:
                total += weight * float(images[index[0], rr, cc])
        out[index] = total
    return out


def test_bilinear_sampling_matches_its_definition_inside_and_outside_the_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rows = rng.uniform(-4, 32, (3, 28, 28)).astype(np.float32)  # a fifth fall outside
    cols = rng.uniform(-4, 32, (3, 28, 28)).astype(np.float32)
    rows[0, 0, :4] = [-1.0, 27.0, 27.5, 28.0]  # the edges of the zero border
    got = data.bilinear_sample(images, rows, cols).numpy()
    np.testing.assert_allclose(got, _reference_bilinear(images, rows, cols), atol=1e-3)


def test_elastic_field_has_simards_statistics():
    """The lattice shortcut draws noise on every other pixel; its smoothed field must have the
    variance and smoothness of Simard et al.'s per-pixel construction (alpha 34, sigma 4)."""
    import tensorflow as tf

    n, size, alpha, sigma = 2000, 28, 34.0, 4.0
    ours = data.elastic_field(n, size, tf.constant([1, 2], tf.int64), alpha, sigma).numpy()
    g = data.gaussian_smoothing_matrix(size, sigma)  # stride 1: the per-pixel construction
    noise = np.random.default_rng(1).uniform(-1, 1, (n, 2, size, size))
    reference = alpha * np.einsum("ij,bcjk,lk->bcil", g, noise, g)
    # Per-position standard deviation (smaller near the edges), and of the spatial gradient.
    np.testing.assert_allclose(ours.std(axis=0), reference.std(axis=0), rtol=0.1)
    np.testing.assert_allclose(np.diff(ours, axis=3).std(), np.diff(reference, axis=3).std(), rtol=0.05)
    assert 0.8 < reference[..., 14, 14].std() < 2.0  # about 1.4 px at the centre: what it should be


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
