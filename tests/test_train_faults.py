"""A write that fails in `make train`'s run folder: one `error:` line naming the file and the
cause, exit status 1, and a run folder the same command carries on with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import contract

from .conftest import REPO, python_env

FILE_LIMIT = 1 << 20  # bytes: the per-epoch backup of the default model is ~10 MB


def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "model.train", "--data-dir", str(REPO / "tests" / "data"),
            "--validation-size", "500", "--epochs", "1", "--patience", "1", "--no-augment",
            "--out", str(out), "--verbose", "quiet"]


def _with_file_size_limit(command: list[str]) -> list[str]:
    """`command` in a process whose files cannot grow past FILE_LIMIT: writes beyond it fail
    with EFBIG (SIGXFSZ ignored, a disposition exec keeps), as on a full disk, without root."""
    setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", setup, *command]


@pytest.mark.slow
def test_a_failed_backup_write_is_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "runs"
    failed = subprocess.run(_with_file_size_limit(_train_cmd(out)), cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=600)
    # 1, not 139: h5py's clean-up of the failed file would crash the interpreter at exit.
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    error = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, failed.stderr[-3000:]
    # The file is the epoch's backup in the run folder, whatever the backup calls it.
    assert error[0].startswith(f"error: cannot write {run_dir / 'backup'}/"), error
    assert error[0].endswith(": File too large (EFBIG). Make room (or fix the folder), then run the same "
                             "command again: it resumes from the last finished epoch."), error
    assert not (run_dir / contract.RUN_METRICS_FILE).exists()

    # The same command carries on in the same run folder: nothing half-written trips it up.
    again = subprocess.run(_train_cmd(out), cwd=REPO, env=python_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run_dir / contract.RUN_METRICS_FILE).read_text())
    assert metrics["epochs_run"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([run_dir.name, "latest"])
