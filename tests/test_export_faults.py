"""Write failures during the export (a full disk, a quota, a read-only folder...): one `error:`
line naming the file and the cause, a documented exit status, nothing half-published, and
what a killed export left removed by the next one.

The failures are injected where the kernel reports them: OSError(ENOSPC) from a Python
write() names no file, as a real one does not; RLIMIT_FSIZE makes TensorFlow's own C++
writer fail for real (EFBIG) without root.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import configlib, contract
from export import pipeline, tflite
from export import saved_model as sm

ENOSPC_TEXT = "No space left on device (ENOSPC)"


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() gives: no filename


def _dead_pid() -> int:
    """The pid of a process that has exited (as a killed export's is)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- naming the file and the cause ----------------------------------------------------------

def test_write_failure_names_the_file_and_the_cause():
    import tensorflow as tf

    with pytest.raises(OSError) as info, configlib.naming_file(Path("/data/a.tflite")):
        _enospc()
    assert configlib.write_failure(info.value) == f"/data/a.tflite: {ENOSPC_TEXT}"
    assert configlib.write_failure(PermissionError(errno.EACCES, "Permission denied", "/ro/x")) == \
        "/ro/x: Permission denied (EACCES)"
    assert configlib.write_failure(OSError(errno.EDQUOT, "Disk quota exceeded", "/home/q")) == \
        "/home/q: Disk quota exceeded (EDQUOT)"
    # h5py (Keras .weights.h5 files) names the file in its message only.
    h5py_style = OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Mon Nov 30, "
                                       "filename = '/runs/backup/latest.weights.h5', file descriptor = 6, errno = 28)")
    assert configlib.write_failure(h5py_style) == f"/runs/backup/latest.weights.h5: {ENOSPC_TEXT}"
    # TensorFlow's SaveV2 on a full tmpfs, as it was seen here.
    tf_error = tf.errors.ResourceExhaustedError(
        None, None,
        "{{function_node __wrapped__SaveV2_dtypes_27_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        "/srv/mnist/.tmp-export-1-2/variables/variables_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; "
        "No space left on device [Op:SaveV2]")
    assert configlib.write_failure(tf_error) == (
        "/srv/mnist/.tmp-export-1-2/variables/variables_temp/part-00000-of-00001.data-00000-of-00001.tempstate1: "
        + ENOSPC_TEXT)
    # Not file operations: no one-line treatment, the traceback stays.
    assert configlib.write_failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert configlib.write_failure(ValueError("bad")) is None
    assert configlib.write_failure(tf.errors.InvalidArgumentError(None, None, "shape [2]; expected [3]")) is None


def test_json_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    configlib.write_json_atomic(target, {"v": 1})
    monkeypatch.setattr(configlib.os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        configlib.write_json_atomic(target, {"v": 2})
    assert configlib.write_failure(info.value) == f"{target}: {ENOSPC_TEXT}"
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# --- publishing a version: a failure at each step ------------------------------------------

def _writer(tmp: Path) -> None:
    tmp.mkdir(parents=True)
    (tmp / "saved_model.pb").write_bytes(b"graph")


def _fail_fsync_of(predicate):
    real = os.fsync

    def fsync(fd):
        if predicate(_fd_path(fd)):
            _enospc()
        return real(fd)

    return fsync


def _fail_write_text_of(name):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            _enospc()
        return real(self, *args, **kwargs)

    return write_text


@pytest.mark.parametrize("step", ["write", "verify", "fsync", "high-water mark", "rename"])
def test_a_failed_step_publishes_nothing_and_names_the_file(tmp_path, monkeypatch, step):
    model_dir = tmp_path / "mnist"
    assert sm.publish(model_dir, _writer)[0] == 1
    write, verify, expected_file = _writer, None, None
    if step == "write":
        def write(tmp):  # noqa: F811 - a writer whose second file does not fit
            _writer(tmp)
            with configlib.naming_file(tmp / "variables.data"):
                _enospc()
        expected_file = "variables.data"
    elif step == "verify":
        def verify(tmp):
            configlib.write_json_atomic(tmp / "assets.extra" / "metrics.json", {"accuracy": 1.0})
        monkeypatch.setattr(configlib.os, "fsync", _enospc)
        expected_file = "metrics.json"
    elif step == "fsync":
        monkeypatch.setattr(os, "fsync", _fail_fsync_of(lambda path: path.endswith("saved_model.pb")))
        expected_file = "saved_model.pb"
    elif step == "high-water mark":
        monkeypatch.setattr(Path, "write_text", _fail_write_text_of(f".{sm.HIGH_WATER_FILE}.tmp"))
        expected_file = sm.HIGH_WATER_FILE
    elif step == "rename":
        monkeypatch.setattr(os, "rename", _enospc)
        expected_file = str(model_dir / "2")

    with pytest.raises(sm.ExportError) as info:
        sm.publish(model_dir, write, before_rename=verify)
    message = str(info.value)
    assert "\n" not in message
    assert ENOSPC_TEXT in message and "nothing was published" in message
    assert message.split(f": {ENOSPC_TEXT}")[0].endswith(expected_file), message
    assert sm.numeric_versions(model_dir) == [1]
    assert not list(model_dir.glob(f"{sm.TMP_PREFIX}*")) and not list(model_dir.glob("*.tmp"))
    monkeypatch.undo()
    assert sm.publish(model_dir, _writer)[0] >= 2  # the next export works


def test_once_renamed_the_version_is_published_even_if_the_last_flush_fails(tmp_path, monkeypatch):
    """The window where the version was complete and visible but the export exited 1."""
    model_dir = tmp_path / "mnist"
    monkeypatch.setattr(os, "fsync", _fail_fsync_of(lambda path: path == str(model_dir)))
    logged: list[str] = []
    number, final = sm.publish(model_dir, _writer, log=logged.append)
    assert (number, final) == (1, model_dir / "1") and (final / "saved_model.pb").read_bytes() == b"graph"
    assert sm.next_version(model_dir) == 2
    (warning,) = logged
    assert warning.startswith(f"warning: version 1 is published at {final}") and ENOSPC_TEXT in warning


# --- the TFLite stage and `python -m export` as a whole -------------------------------------

def _export_args(exported, tmp_path: Path, *extra: str) -> list[str]:
    return ["--run", str(exported.run_dir), "--serving-base", str(tmp_path / "serving"),
            "--tflite-builds", str(tmp_path / "tflite"), "--mobile-dir", str(tmp_path / "mobile"),
            "--min-accuracy", "0", "--no-cli-check", "--parity-images", "100", "--calibration-images", "50",
            "--latency-runs", "10", "--tflite-runtime-python", "none", *extra]


def test_disk_full_in_the_tflite_stage_says_the_savedmodel_was_published(exported, tmp_path, monkeypatch, capsys):
    builds = tmp_path / "tflite"
    builds.mkdir()
    # What killed exports left: removed by this one. A live export's folder stays.
    stale = tflite.build_tmp_path(builds / "old-run", _dead_pid())
    (stale / tflite.CONVERSION_DIR).mkdir(parents=True)
    (stale / "float32.tflite").write_bytes(b"half")
    live = tflite.build_tmp_path(builds / "other-run", os.getppid())
    live.mkdir()

    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if self.suffix == ".tflite":
            _enospc()
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    status = pipeline.main(_export_args(exported, tmp_path))
    err = capsys.readouterr().err.strip()

    assert status == pipeline.EXIT_PARTIAL == 5
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    version = tmp_path / "serving" / contract.MODEL_NAME / "1"
    assert f"SavedModel version 1 was published complete at {version}" in err
    assert f"float32.tflite: {ENOSPC_TEXT}" in err and "no TFLite build was made" in err
    # The version is whole: TF Serving can load it.
    assert (version / "saved_model.pb").is_file() and (version / "variables" / "variables.index").is_file()
    assert sm.read_version_metrics(version)["test_accuracy"] > 0
    # No TFLite build, no half of one, no link; the dead export's leftovers are gone.
    assert sorted(p.name for p in builds.iterdir()) == [live.name]
    assert not (tmp_path / "mobile").exists()


def test_a_real_write_failure_inside_tensorflow_is_one_line(exported, tmp_path, capsys):
    """RLIMIT_FSIZE: TensorFlow's C++ checkpoint writer fails on the variables file (EFBIG)."""
    import resource

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, old_limit[1]))
        status = pipeline.main(_export_args(exported, tmp_path, "--no-tflite"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capsys.readouterr().err.strip()
    assert status == pipeline.EXIT_FAILED == 1
    assert len(err.splitlines()) == 1, err
    assert "File too large (EFBIG)" in err and "/variables/" in err and "nothing was published" in err
    model_dir = tmp_path / "serving" / contract.MODEL_NAME
    assert sm.numeric_versions(model_dir) == []
    assert not list(model_dir.glob(f"{sm.TMP_PREFIX}*"))


def test_a_failed_link_update_keeps_the_build_and_the_old_link(tmp_path, monkeypatch):
    builds, link = tmp_path / "tflite", tmp_path / "mobile"
    (builds / "a").mkdir(parents=True)
    (builds / "b").mkdir()
    stale_tmp = link.with_name(f".{link.name}{tflite.TMP_INFIX}{_dead_pid()}")
    stale_tmp.symlink_to("tflite/a")
    tflite.point_link_at(link, builds / "a")
    assert os.readlink(link) == "tflite/a" and not stale_tmp.is_symlink()  # the leftover is gone

    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tflite.os, "replace", replace)
    with pytest.raises(tflite.TFLiteError) as info:
        tflite.point_link_at(link, builds / "b")
    assert str(info.value) == (f"cannot point {link} at {builds / 'b'}: {link}: Read-only file system (EROFS); "
                               f"{link} still points at tflite/a")
    assert os.readlink(link) == "tflite/a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mobile", "tflite"]



# --- a damaged run folder -------------------------------------------------------------------

@pytest.mark.parametrize("damaged, message", [
    # Keras says "File not found" for a truncated .keras archive.
    (contract.RUN_MODEL_FILE, "not a readable Keras model (not a .keras zip archive: truncated or damaged)"),
    (contract.RUN_METRICS_FILE, "not a readable metrics file (Expecting"),
    (contract.RUN_CONFIG_FILE, "not a readable training config (Expecting"),
])
def test_a_damaged_run_folder_is_one_line_naming_the_file(trained_run, tmp_path, capsys, damaged, message):
    """Each of these ended in a traceback (JSONDecodeError, Keras' ValueError)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("tensorboard", "*.png"))
    with open(run / damaged, "r+b") as fh:  # cut short, as by a full disk or a killed copy
        fh.truncate(1)
    status = pipeline.main(["--run", str(run), "--serving-base", str(tmp_path / "serving"),
                            "--tflite-builds", str(tmp_path / "tflite"), "--mobile-dir", str(tmp_path / "mobile")])
    err = capsys.readouterr().err.strip()
    assert status == pipeline.EXIT_FAILED == 1
    assert err.splitlines() == [err] and err.startswith(f"error: {run / damaged}: {message}"), err
    assert not (tmp_path / "serving").exists() and not (tmp_path / "tflite").exists()
