"""Atomic publishing of numbered SavedModel versions under a model folder TF Serving watches.

    <base>/mnist/<version>/...       a complete version, never touched again
    <base>/mnist/.tmp-export-<pid>-<ms>/   a version being written (non-numeric: ignored)
    <base>/mnist/.last_version       the high-water mark: versions only grow
    <base>/mnist/.publish.lock       serialises publishers of one folder

TF Serving polls the base path every second and would try to load a half-written folder, so
a version is written and verified under a temporary name in the same folder, flushed to
disk, then renamed to its number. A failed write (a full disk, a quota, a read-only folder)
removes the temporary folder and raises ExportError naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from common import configlib
from common.versions import numeric_versions

TMP_PREFIX = ".tmp-export-"  # non-numeric: TF Serving ignores such folders
HIGH_WATER_FILE = ".last_version"
LOCK_FILE = ".publish.lock"


class ExportError(RuntimeError):
    """The export cannot go on; nothing was published."""


def next_version(model_dir: Path) -> int:
    """One more than every version ever published here (deleted ones included)."""
    high = max(numeric_versions(model_dir), default=0)
    mark = model_dir / HIGH_WATER_FILE
    if mark.exists():
        try:
            high = max(high, int(mark.read_text().strip() or 0))
        except ValueError:
            pass
    return high + 1


@contextlib.contextmanager
def publish_lock(model_dir: Path) -> Iterator[None]:
    """Serialise publishers of one model folder (two exports never pick the same number)."""
    with configlib.exclusive_lock(model_dir / LOCK_FILE):
        yield


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk; an OSError names `path`."""
    with configlib.naming_file(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk before the rename makes it visible."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def remove_stale_temporaries(model_dir: Path) -> list[Path]:
    """Delete temporary export folders whose writer process is gone (a crash or kill)."""
    return configlib.remove_leftovers(model_dir, re.escape(TMP_PREFIX) + r"(?P<pid>\d+)-.*")


def publish(
    model_dir: Path,
    write: Callable[[Path], None],
    version: int | None = None,
    before_rename: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int, Path]:
    """Write a SavedModel with `write(tmp_dir)`, then atomically rename it to its version.

    `before_rename(tmp_dir)` runs after writing (verification hooks; tests inject failures
    there). Any exception removes the temporary folder and publishes nothing; a failed file
    operation (a full disk, a quota, a read-only or unwritable folder) becomes an ExportError
    whose one line names the file and the cause. The high-water mark is written before the
    rename, so the rename is the last step that can fail: once the version folder is visible
    it is complete, and only the folder's final flush remains (a failure there is logged:
    the version is published). Returns (version, final path).
    """
    model_dir = Path(model_dir)
    tmp = model_dir / f"{TMP_PREFIX}{os.getpid()}-{int(time.time() * 1000)}"
    try:
        with configlib.naming_file(model_dir):
            model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(model_dir)
        write(tmp)
        if before_rename is not None:
            before_rename(tmp)
        _fsync_tree(tmp)
        with publish_lock(model_dir):
            number = next_version(model_dir) if version is None else int(version)
            if number < 1:
                raise ExportError(f"version must be a positive integer, got {number}")
            final = model_dir / str(number)
            if final.exists():
                raise ExportError(f"{final} already exists: published versions are never overwritten")
            if number < next_version(model_dir):
                raise ExportError(
                    f"version {number} is not above the highest version ever published here "
                    f"({next_version(model_dir) - 1}): versions only grow"
                )
            # The mark first: if the rename then fails, a number is skipped, which is harmless.
            _write_high_water_mark(model_dir, number)
            with configlib.naming_file(final):
                os.rename(tmp, final)  # atomic on one filesystem
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = configlib.write_failure(err)
        if failure is not None and not isinstance(err, ExportError):
            raise ExportError(
                f"writing the new version under {model_dir} failed: {failure}; nothing was published"
            ) from err
        raise
    try:
        fsync_path(model_dir)  # makes the rename itself durable
    except OSError as err:
        log(f"warning: version {number} is published at {final}, but flushing {model_dir} to disk failed "
            f"({configlib.write_failure(err)}): a power cut now could lose the rename")
    return number, final


def _write_high_water_mark(model_dir: Path, number: int) -> None:
    mark, mark_tmp = model_dir / HIGH_WATER_FILE, model_dir / f".{HIGH_WATER_FILE}.tmp"
    try:
        with configlib.naming_file(mark):
            mark_tmp.write_text(f"{number}\n")
            fsync_path(mark_tmp)
            os.replace(mark_tmp, mark)
    except BaseException:
        mark_tmp.unlink(missing_ok=True)
        raise
