"""IDX parsing: the real fixture loads, and each kind of bad file gets an error naming it."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import idx

TRAIN_IMAGES, TRAIN_LABELS = idx.FILES["train"]
TEST_IMAGES, TEST_LABELS = idx.FILES["test"]


def test_fixture_loads_with_expected_shapes(fixture_data_dir):
    train = idx.load_split(fixture_data_dir, "train")
    test = idx.load_split(fixture_data_dir, "test")
    assert train.images.shape == (3000, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.shape == (3000,) and set(np.unique(train.labels)) == set(range(10))
    assert test.images.shape == (1000, 28, 28) and test.labels.shape == (1000,)
    # Real digits: mostly black background with some bright ink, not noise.
    assert 0.05 < (train.images > 128).mean() < 0.25


def test_roundtrip_plain_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    for suffix in ("", ".gz"):
        folder = tmp_path / f"d{suffix or 'plain'}"
        folder.mkdir()
        idx.write_idx(folder / f"{TRAIN_IMAGES}{suffix}", images)
        idx.write_idx(folder / f"{TRAIN_LABELS}{suffix}", labels)
        split = idx.load_split(folder, "train")
        np.testing.assert_array_equal(split.images, images)
        np.testing.assert_array_equal(split.labels, labels)


def test_full_mnist_checksums_are_canonical():
    full = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
    if not full.is_dir():
        pytest.skip(f"the full MNIST is not at {full} on this machine")
    split = idx.load_split(full, "test")
    assert split.canonical and len(split.labels) == 10000


@pytest.fixture
def good_dir(tmp_path, fixture_data_dir):
    folder = tmp_path / "mnist"
    shutil.copytree(fixture_data_dir, folder)
    return folder


def _raw(folder: Path, name: str) -> bytes:
    return gzip.decompress((folder / f"{name}.gz").read_bytes())


def _replace(folder: Path, name: str, payload: bytes, compress: bool = True) -> Path:
    (folder / f"{name}.gz").unlink()
    path = folder / (f"{name}.gz" if compress else name)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(idx.IdxError, match="no such directory"):
        idx.load_split(tmp_path / "nowhere", "train")


def test_missing_file_names_it(good_dir):
    (good_dir / f"{TRAIN_LABELS}.gz").unlink()
    with pytest.raises(idx.IdxError, match=f"{TRAIN_LABELS}.*missing"):
        idx.load_split(good_dir, "train")


def test_swapped_files_report_wrong_magic(good_dir):
    images, labels = _raw(good_dir, TEST_IMAGES), _raw(good_dir, TEST_LABELS)
    _replace(good_dir, TEST_IMAGES, labels)
    _replace(good_dir, TEST_LABELS, images)
    with pytest.raises(idx.IdxError, match=r"magic number 2049.*expected 2051.*swapped"):
        idx.load_split(good_dir, "test")


def test_truncated_data_names_file_and_counts(good_dir):
    payload = _raw(good_dir, TEST_IMAGES)
    path = _replace(good_dir, TEST_IMAGES, payload[:-1000])
    with pytest.raises(idx.IdxError, match=f"{path.name}: truncated: the header promises 1000 items"):
        idx.load_split(good_dir, "test")


def test_truncated_header(good_dir):
    _replace(good_dir, TEST_IMAGES, _raw(good_dir, TEST_IMAGES)[:10])
    with pytest.raises(idx.IdxError, match="truncated header"):
        idx.load_split(good_dir, "test")


def test_trailing_bytes_are_rejected(good_dir):
    _replace(good_dir, TEST_LABELS, _raw(good_dir, TEST_LABELS) + b"\0\0\0")
    with pytest.raises(idx.IdxError, match="3 unexpected bytes"):
        idx.load_split(good_dir, "test")


def test_wrong_image_dimensions(good_dir):
    payload = bytearray(_raw(good_dir, TEST_IMAGES))
    payload[8:12] = (32).to_bytes(4, "big")  # rows = 32
    _replace(good_dir, TEST_IMAGES, bytes(payload))
    with pytest.raises(idx.IdxError, match="dimensions 1000x32x28, expected N x 28x28"):
        idx.load_split(good_dir, "test")


def test_count_mismatch_between_images_and_labels(good_dir):
    labels = idx.load_split(good_dir, "test").labels
    _replace(good_dir, TEST_LABELS, b"")
    idx.write_idx(good_dir / f"{TEST_LABELS}.gz", labels[:999])
    with pytest.raises(idx.IdxError, match="holds 1000 images but .* holds 999 labels"):
        idx.load_split(good_dir, "test")


def test_label_out_of_range(good_dir):
    labels = idx.load_split(good_dir, "test").labels.copy()
    labels[17] = 12
    (good_dir / f"{TEST_LABELS}.gz").unlink()
    idx.write_idx(good_dir / f"{TEST_LABELS}.gz", labels)
    with pytest.raises(idx.IdxError, match="label 12 at index 17 is not a digit"):
        idx.load_split(good_dir, "test")


def test_truncated_gzip_stream(good_dir):
    path = good_dir / f"{TEST_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(idx.IdxError, match=f"{path.name}: truncated or corrupt gzip"):
        idx.load_split(good_dir, "test")


def test_gz_name_without_gzip_content(good_dir):
    path = good_dir / f"{TEST_IMAGES}.gz"
    path.write_bytes(_raw(good_dir, TEST_IMAGES))  # plain bytes under a .gz name
    with pytest.raises(idx.IdxError, match="not a gzip file"):
        idx.load_split(good_dir, "test")


def test_uncompressed_files_are_found(good_dir):
    _replace(good_dir, TEST_IMAGES, _raw(good_dir, TEST_IMAGES), compress=False)
    assert idx.load_split(good_dir, "test").images.shape == (1000, 28, 28)
