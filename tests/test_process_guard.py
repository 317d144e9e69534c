"""The session-end check of tests/process_guard.py, run on small pytest sessions of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from .conftest import python_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard's subreaper is Linux-only")

LEAKY_TESTS = '''
import os, signal, subprocess
from pathlib import Path

from tests.process_guard import stopping

PIDS = Path(os.environ["PIDS_FILE"])


def record(kind, pid):
    with PIDS.open("a") as fh:
        fh.write(f"{kind} {pid}\\n")


def test_leaves_its_child_running():
    record("leak", subprocess.Popen(["sleep", "300"]).pid)


def test_leaves_an_orphan_whose_shell_exited():
    out = subprocess.run(["sh", "-c", "sleep 301 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    record("leak", int(out.stdout))


def test_leaves_a_child_with_a_clean_environment():
    record("leak", subprocess.Popen(["sleep", "302"], env={"PATH": os.environ["PATH"]}).pid)


def test_stops_what_it_starts_even_when_it_fails():
    with stopping(subprocess.Popen(["sleep", "303"])) as proc:
        record("stopped", proc.pid)
        assert False, "fails with its process running"
'''

DYING_TESTS = '''
import os, signal, subprocess
from pathlib import Path

PIDS = Path(os.environ["PIDS_FILE"])


def test_pytest_itself_is_killed():
    pid = subprocess.Popen(["sleep", "304"]).pid
    PIDS.write_text(f"leak {pid}\\n")
    os.kill(os.getpid(), signal.SIGKILL)
'''


def _run_session(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess, dict[str, list[int]]]:
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(source))
    pids_file = tmp_path / "pids.txt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.process_guard", "-p", "no:cacheprovider", "-q",
         str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=python_env(PIDS_FILE=str(pids_file), PROCESS_GUARD_GRACE_SECONDS="0.2"),
    )
    pids: dict[str, list[int]] = {}
    for line in pids_file.read_text().splitlines():
        kind, pid = line.split()
        pids.setdefault(kind, []).append(int(pid))
    return done, pids


def _ended(pid: int, timeout: float) -> bool:
    """Has `pid` exited (or become a zombie, which only waits to be collected)?"""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


def test_survivors_fail_the_session_are_named_and_killed(tmp_path):
    done, pids = _run_session(tmp_path, LEAKY_TESTS)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # 3 tests pass, 1 fails on purpose
    assert "1 failed, 3 passed" in out
    assert "3 process(es) started by the tests were still running" in out
    for command, test in [("sleep 300", "test_leaves_its_child_running"),
                          ("sleep 301", "test_leaves_an_orphan_whose_shell_exited"),
                          ("sleep 302", "test_leaves_a_child_with_a_clean_environment")]:
        assert f"{command}  (appeared during test_inner.py::{test})" in out, out
    assert "sleep 303" not in out  # stopped by its own teardown although its test failed
    assert "How to fix:" in out and "start_new_session=True" in out
    for pid in pids["leak"] + pids["stopped"]:
        assert _ended(pid, timeout=10), f"process {pid} still runs"


def test_a_clean_session_passes(tmp_path):
    done, _pids = _run_session(tmp_path, LEAKY_TESTS.split("def test_leaves_its_child_running")[0] + '''
def test_clean():
    with stopping(subprocess.Popen(["sleep", "305"])) as proc:
        record("stopped", proc.pid)
''')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outlived" not in done.stdout


def test_the_watchdog_stops_what_a_killed_pytest_left(tmp_path):
    done, pids = _run_session(tmp_path, DYING_TESTS)
    assert done.returncode == -9, done.stdout + done.stderr
    (pid,) = pids["leak"]
    # pytest died without its session-end check: the watchdog sees its stdin close and stops
    # every process carrying the session's mark.
    assert _ended(pid, timeout=30), f"process {pid} outlived its killed pytest"
