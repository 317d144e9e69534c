"""A pytest plugin: every process a test starts ends with the test session, or the run fails.

Tests start servers, exporters, trainers, browsers. A test that fails before its cleanup
(an assertion between Popen and kill, a missing teardown) leaves them running after pytest,
holding ports and CPU. This plugin (loaded by tests/conftest.py; `-p tests.process_guard`
elsewhere) finds such processes, names them, kills them, and fails the session:

1. At start-up it marks the session in the environment (`MNIST_TEST_SESSION`), which every
   process the tests start inherits, and makes pytest a child subreaper (Linux
   `prctl(PR_SET_CHILD_SUBREAPER)`): a process whose parent died (a server started by a
   shell that exited, a daemon that double-forked) is re-parented to pytest instead of init,
   so it stays in pytest's process tree.
2. After each test it notes the new processes in that tree and the test they appeared in.
3. At the end of the session, the survivors are pytest's descendants plus every process that
   carries the session's mark (zombies and the multiprocessing helpers that end with pytest
   excepted). Each gets `GRACE_SECONDS` to exit on its own (a process stopped by its last
   test may still be on its way out); those left are listed with their command line and the
   test they appeared in, sent SIGTERM, then SIGKILL, and the session exits with status 1.
4. A watchdog process, started at the beginning, kills the marked processes if pytest itself
   dies without reaching step 3 (SIGKILL, the OOM killer, a hard exit).

What it cannot see: a process that dropped the mark (started with an empty environment) AND
left pytest's tree (re-parented elsewhere than to pytest, e.g. by a daemon manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import psutil
import pytest

MARKER = "MNIST_TEST_SESSION"
GRACE_SECONDS = float(os.environ.get("PROCESS_GUARD_GRACE_SECONDS", "5"))
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Helpers that Python's multiprocessing starts for the parent's lifetime; they exit with it.
ALLOWED_COMMANDS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")

HOW_TO_FIX = """\
How to fix: stop every process a test starts in a teardown that runs whether the test passes
or fails:
  - a fixture that starts the process, yields it, and stops it after the yield
    (proc.terminate(); proc.wait(timeout) - then proc.kill() if it did not exit);
  - or `with tests.process_guard.stopping(subprocess.Popen(...)) as proc:` around the test's
    use of it (LocalServerProcess is a context manager too: `with start_server(...) as server`);
  - a process that starts children of its own (make, a shell, a browser, worker processes):
    start it with start_new_session=True and stop its whole group (os.killpg), or have it
    stop its children itself before it exits.
A fixture of module or session scope stops its process in its own teardown, which pytest runs
before this check."""


@dataclass(frozen=True)
class Seen:
    """A process noticed in the test session: identity (pid + start time) and where it appeared."""

    pid: int
    create_time: float
    test: str


class ProcessGuard:
    """The plugin's state; one per pytest session (see the module docstring)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.marker = f"{os.getpid()}-{time.time_ns()}"
        self.preexisting = {self._key(p) for p in self._descendants()}
        self.seen: dict[tuple[int, float], Seen] = {}
        self.report: list[str] = []
        self.watchdog: subprocess.Popen | None = None

    # -- start-up ------------------------------------------------------------------------

    def start(self) -> None:
        os.environ[MARKER] = self.marker
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        # Its own session: a Ctrl-C in the terminal reaches pytest, not the watchdog. Its stdin
        # is a pipe from pytest: end-of-file means pytest is gone, however it ended.
        self.watchdog = subprocess.Popen(
            [sys.executable, __file__, "--watchdog", self.marker],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True,
        )

    # -- observation ---------------------------------------------------------------------

    @staticmethod
    def _key(proc: psutil.Process) -> tuple[int, float]:
        try:
            return proc.pid, proc.create_time()
        except psutil.Error:
            return proc.pid, 0.0

    def _descendants(self) -> list[psutil.Process]:
        try:
            return self.me.children(recursive=True)
        except psutil.Error:
            return []

    def note(self, test: str) -> None:
        """Remember the processes in pytest's tree now, with the test that was running."""
        for proc in self._descendants():
            key = self._key(proc)
            if key not in self.seen and key not in self.preexisting:
                self.seen[key] = Seen(proc.pid, key[1], test)

    def _ignored(self, proc: psutil.Process) -> bool:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True  # exited; only its exit status is left for its parent to collect
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            return True  # gone meanwhile
        if self.watchdog is not None and proc.pid == self.watchdog.pid:
            return True
        return any(allowed in cmdline for allowed in ALLOWED_COMMANDS)

    def survivors(self) -> list[psutil.Process]:
        """Live processes the tests started: pytest's descendants and every marked process."""
        found = {self._key(p): p for p in self._descendants()}
        found.update({self._key(p): p for p in marked_processes(self.marker)})
        return [p for key, p in found.items() if key not in self.preexisting and not self._ignored(p)]

    # -- the end of the session ----------------------------------------------------------

    def finish(self) -> list[str]:
        """Kill what survived (after the grace), stop the watchdog; lines for the report."""
        self.note("(session teardown)")
        survivors = self.survivors()
        survivors = wait_ended(survivors, GRACE_SECONDS)
        lines = []
        for proc in survivors:
            seen = self.seen.get(self._key(proc))
            where = f"appeared during {seen.test}" if seen else "appeared outside pytest's process tree"
            try:
                command = " ".join(proc.cmdline()) or proc.name()
            except psutil.Error:
                command = "?"
            lines.append(f"pid {proc.pid}: {_shorten(command)}  ({where})")
        stop(survivors)
        self._stop_watchdog()
        self.report = lines
        return lines

    def _stop_watchdog(self) -> None:
        if self.watchdog is None:
            return
        with contextlib.suppress(OSError):
            self.watchdog.stdin.close()  # end-of-file: it sweeps once more and exits
        try:
            self.watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait()


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes whose environment carries MARKER=marker (readable ones: ours, or all as root)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s for the processes to end; those still running.

    A zombie counts as ended: it has exited and only waits for its parent to collect its
    status (psutil.wait_procs would wait for that too, and a non-child's zombie never goes
    while its parent lives). Our own children are collected here.
    """
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        still = []
        for proc in alive:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(psutil.Error, ChildProcessError):
                        proc.wait(0)  # collects it when it is our child
                    continue
                still.append(proc)
            except psutil.NoSuchProcess:
                continue
            except psutil.Error:
                still.append(proc)
        alive = still
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def stop(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `timeout` seconds."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    for proc in wait_ended(procs, timeout):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    wait_ended(procs, timeout)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def stopping(proc: subprocess.Popen, timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """Yield `proc`; on the way out, pass or fail, stop it (SIGTERM, SIGKILL after `timeout`)
    and wait for it. A process started with start_new_session=True is stopped with its whole
    process group (what it started too)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            group = _own_group(proc)
            _signal(proc, group, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal(proc, group, signal.SIGKILL)
                proc.wait()


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _signal(proc: subprocess.Popen, group: bool, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


# --------------------------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------------------------

_GUARD_KEY = pytest.StashKey[ProcessGuard]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller guards
        return
    guard = ProcessGuard()
    guard.start()
    config.stash[_GUARD_KEY] = guard


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        guard = item.config.stash.get(_GUARD_KEY, None)
        if guard is not None:
            guard.note(item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = session.config.stash.get(_GUARD_KEY, None)
    if guard is None:
        return
    if guard.finish() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    guard = config.stash.get(_GUARD_KEY, None)
    if guard is None or not guard.report:
        return
    terminalreporter.write_sep("=", "processes that outlived their tests", red=True)
    terminalreporter.line(
        f"{len(guard.report)} process(es) started by the tests were still running at the end of "
        "the session; they were killed and the run fails:", red=True,
    )
    for line in guard.report:
        terminalreporter.line(f"  {line}")
    terminalreporter.line(HOW_TO_FIX)


# --------------------------------------------------------------------------------------------
# The watchdog: python tests/process_guard.py --watchdog MARKER
# --------------------------------------------------------------------------------------------

def _watchdog(marker: str) -> int:
    """Wait until pytest closes our stdin (it finished, or died), then stop its marked processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()
    leftovers = marked_processes(marker)
    if leftovers:
        names = ", ".join(f"{p.pid}" for p in leftovers)
        print(f"process_guard watchdog: pytest ended without stopping processes {names}; stopping them",
              file=sys.stderr)
        stop(leftovers)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python tests/process_guard.py",
        description="The process guard's watchdog, started by the pytest plugin: when its stdin "
                    "closes (pytest finished or died), stop every process carrying MARKER.")
    parser.add_argument("--watchdog", metavar="MARKER", required=True,
                        help=f"the session's mark (the value of ${MARKER})")
    return _watchdog(parser.parse_args(argv).watchdog)


if __name__ == "__main__":
    sys.exit(main())
