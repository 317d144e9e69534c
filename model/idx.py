"""Read and write MNIST's IDX files with numpy only, checking everything a bad file can get wrong.

The IDX format (LeCun et al.): a big-endian header, then raw values.

    bytes 0-1  zero
    byte  2    type code (0x08 = unsigned byte)
    byte  3    number of dimensions D
    D x int32  size of each dimension (big-endian)
    data       prod(sizes) values

so images have magic 2051 (0x00000803, D=3: N x 28 x 28) and labels 2049 (0x00000801, D=1: N).
Each file may be gzip'd (`name.gz`). No TensorFlow here: the REST client and the tests read
the test set through this module on machines without it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import contract

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
ROWS, COLS = contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH
NUM_CLASSES = 10

# The four standard files, by split. Each may also carry a ".gz" suffix.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# SHA-256 of the canonical MNIST files after gunzip (what other loaders pin). A file of the
# canonical size whose content differs is probably another dataset in MNIST's format
# (Fashion-MNIST, KMNIST): we say so instead of silently training on it.
CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
CANONICAL_COUNTS = {"train": 60000, "test": 10000}


class IdxError(ValueError):
    """A missing, truncated or malformed IDX file. The message names the file."""


@dataclass(frozen=True)
class IdxFile:
    """One parsed IDX file: its array, where it came from and its content hash."""

    path: Path
    array: np.ndarray
    sha256: str


@dataclass(frozen=True)
class Split:
    """Images [N, 28, 28] uint8 and labels [N] uint8 of one split, with provenance."""

    images: np.ndarray
    labels: np.ndarray
    images_file: IdxFile
    labels_file: IdxFile

    @property
    def canonical(self) -> bool:
        """True when both files are byte-for-byte the canonical MNIST content."""
        return all(
            CANONICAL_SHA256.get(_base_name(f.path)) == f.sha256
            for f in (self.images_file, self.labels_file)
        )


def _base_name(path: Path) -> str:
    name = Path(path).name
    return name[:-3] if name.endswith(".gz") else name


def find_file(data_dir: Path, base_name: str) -> Path:
    """`data_dir/base_name` or `data_dir/base_name.gz`; IdxError when neither exists."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IdxError(
            f"{data_dir}: no such directory. --data-dir must be a folder holding the four "
            f"MNIST IDX files ({', '.join(n for pair in FILES.values() for n in pair)}, "
            f"each optionally .gz)."
        )
    for candidate in (data_dir / base_name, data_dir / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    raise IdxError(
        f"{data_dir / base_name}[.gz]: missing. The folder must hold the four MNIST IDX files "
        f"(found there: {', '.join(sorted(p.name for p in data_dir.iterdir())) or 'nothing'})."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, zlib.error) as err:
        raise IdxError(f"{path}: truncated or corrupt gzip stream ({err}).") from err
    except gzip.BadGzipFile as err:
        raise IdxError(f"{path}: not a gzip file although it ends in .gz ({err}).") from err
    except OSError as err:
        raise IdxError(f"{path}: cannot read ({err.strerror or err}).") from err


def parse_idx(data: bytes, path: Path, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """Parse IDX bytes, checking magic, rank, trailing dimensions and length.

    Returns an array of shape [N, *shape_tail] (uint8). `path` only names the file in errors.
    """
    ndim = 1 + len(shape_tail)
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise IdxError(f"{path}: {len(data)} bytes, too short to hold an IDX header.")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(found_magic)
        hint = f" (that is the magic of an IDX {kind} file: are two files swapped?)" if kind else ""
        raise IdxError(
            f"{path}: magic number {found_magic} (0x{found_magic:08x}), expected {magic} "
            f"(0x{magic:08x}){hint}."
        )
    if len(data) < header_len:
        raise IdxError(f"{path}: truncated header ({len(data)} of {header_len} bytes).")
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    if dims[1:] != tuple(shape_tail):
        raise IdxError(
            f"{path}: dimensions {'x'.join(map(str, dims))}, expected N x "
            f"{'x'.join(map(str, shape_tail))}."
        )
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise IdxError(
            f"{path}: truncated: the header promises {dims[0]} items "
            f"({expected} bytes) but the file holds {len(data)} bytes."
        )
    if len(data) > expected:
        raise IdxError(
            f"{path}: {len(data) - expected} unexpected bytes after the {dims[0]} items "
            f"the header declares."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def read_idx(path: Path, magic: int, shape_tail: tuple[int, ...]) -> IdxFile:
    """Read one IDX file (plain or .gz) into an IdxFile."""
    path = Path(path)
    data = _read_bytes(path)
    array = parse_idx(data, path, magic, shape_tail)
    return IdxFile(path=path, array=array, sha256=hashlib.sha256(data).hexdigest())


def load_split(data_dir: Path, split: str) -> Split:
    """Load the images and labels of `split` ('train' or 'test') from `data_dir`.

    Checks both files and that they agree: same count, labels within 0-9.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    images_name, labels_name = FILES[split]
    images = read_idx(find_file(data_dir, images_name), IMAGES_MAGIC, (ROWS, COLS))
    labels = read_idx(find_file(data_dir, labels_name), LABELS_MAGIC, ())
    n_images, n_labels = len(images.array), len(labels.array)
    if n_images != n_labels:
        raise IdxError(
            f"{images.path} holds {n_images} images but {labels.path} holds {n_labels} labels."
        )
    if n_images == 0:
        raise IdxError(f"{images.path}: holds no images.")
    bad = labels.array >= NUM_CLASSES
    if bad.any():
        first = int(np.argmax(bad))
        raise IdxError(
            f"{labels.path}: label {int(labels.array[first])} at index {first} is not a digit "
            f"0-{NUM_CLASSES - 1}."
        )
    return Split(images.array, labels.array, images, labels)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip'd when `path` ends in .gz), atomically."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {3: IMAGES_MAGIC, 1: LABELS_MAGIC}.get(array.ndim)
    if magic is None:
        raise ValueError(f"IDX writer handles rank 1 (labels) or 3 (images), got {array.ndim}")
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix == ".gz":
        # mtime=0: the same arrays always give the same bytes.
        with open(tmp, "wb") as raw, gzip.GzipFile(
            filename="", fileobj=raw, mode="wb", mtime=0
        ) as fh:
            fh.write(payload)
    else:
        tmp.write_bytes(payload)
    os.replace(tmp, path)
