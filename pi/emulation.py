"""Run Python programs in an emulated arm64 Debian userland on an x86 machine.

What a Raspberry Pi 4 running 64-bit Pi OS has, rebuilt from Debian's and PyPI's own files:

    sysroot   a minimal arm64 Debian tree (`mmdebstrap --variant=extract`: the packages'
              files are unpacked, nothing is configured, so no arm64 code runs to build it)
              holding python3.X, its standard library and libstdc++;
    wheels    the aarch64 wheels of one runtime set (ai-edge-litert + numpy 2 + pillow, or
              tflite-runtime + numpy 1.26 + pillow), fetched by the host's pip for the
              sysroot's Python and unpacked into one folder that becomes PYTHONPATH;
    qemu      `qemu-aarch64 -L <sysroot>` runs the sysroot's python3.X; with -L the guest's
              absolute paths (/lib/ld-linux-aarch64.so.1, /usr/lib/python3.X, ...) resolve
              inside the sysroot first, so neither chroot nor binfmt is needed.
              QEMU_CPU=cortex-a72 emulates the Pi 4's core (its instruction set, not its speed).

Both caches live under one folder (artifacts/arm64/ by default), keyed by what they were
built from, and are built in a temporary folder that is renamed into place when complete: a
killed build never leaves a half tree that looks usable.

Needs on the host: mmdebstrap and qemu-user (>= 10 for ai-edge-litert), both installed by
`.ci/install-pi-tools`, and a pip for the wheels. This module imports no TensorFlow and no
third-party package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from common import configlib

INSTALL_HINT = "install it as root with .ci/install-pi-tools"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The Pi 4's core (Cortex-A72, Armv8.0-A): code built for a newer core faults here as on a Pi.
DEFAULT_QEMU_CPU = "cortex-a72"

# With `--platform` pip matches exactly the tags given, not the older manylinux tags a newer
# one implies, and the wheels are tagged variously (tflite-runtime 2.14.0: manylinux_2_34;
# ai-edge-litert 2.3.0: manylinux_2_27; numpy 2 and pillow: manylinux_2_27/_2_28; numpy
# 1.26: manylinux2014), so every tag is listed. All need glibc <= 2.34: Bookworm has 2.36.
WHEEL_PLATFORMS = (
    "manylinux_2_34_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux2014_aarch64",
)

SYSROOT_STAMP = ".pi-smoke-sysroot.json"
WHEELS_STAMP = ".pi-smoke-wheels.json"


class EmulationError(RuntimeError):
    """The emulated userland could not be built or run; the message says what to do."""


@dataclass(frozen=True)
class Release:
    """A Debian release as a Pi OS base: its codename and the python3.X it ships."""

    name: str
    python: str  # "3.11"

    @property
    def packages(self) -> tuple[str, ...]:
        # base-files carries Trixie's merged-/usr links (/lib -> usr/lib), without which the
        # loader /lib/ld-linux-aarch64.so.1 is not found; on Bookworm it is harmless.
        return (
            "base-files",
            f"python{self.python}-minimal",
            f"libpython{self.python}-stdlib",
            "libstdc++6",
        )


@dataclass(frozen=True)
class RuntimeSpec:
    """A TFLite runtime as the bundle ships it: its requirements file and what it needs."""

    name: str
    requirements_file: str  # inside the bundle folder
    min_qemu: tuple[int, int]  # oldest qemu-aarch64 (major, minor) it runs under
    min_qemu_why: str = ""


# 64-bit Pi OS Bookworm runs Python 3.11, Trixie Python 3.13.
RELEASES: dict[str, Release] = {
    "bookworm": Release("bookworm", "3.11"),
    "trixie": Release("trixie", "3.13"),
}

# Bundle file names are part of the bundle's fixed interface (pi/bundle.py writes them).
RUNTIMES: dict[str, RuntimeSpec] = {
    "ai-edge-litert": RuntimeSpec(
        "ai-edge-litert",
        "requirements.txt",
        (10, 0),
        "qemu 7.2 (Debian 12's own) crashes inside ai-edge-litert",
    ),
    "tflite-runtime": RuntimeSpec("tflite-runtime", "requirements-tflite-runtime.txt", (0, 0)),
}


# --- qemu --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Qemu:
    """A qemu-aarch64 binary, its version and the CPU model it emulates."""

    path: str
    version: tuple[int, int, int]
    cpu: str = DEFAULT_QEMU_CPU

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def require(self, runtime: RuntimeSpec) -> None:
        """Raise EmulationError when this qemu is too old to run `runtime`."""
        if self.version[:2] < runtime.min_qemu:
            need = ".".join(map(str, runtime.min_qemu))
            raise EmulationError(
                f"{runtime.name} needs qemu-aarch64 >= {need} but {self.path} is "
                f"{self.version_text} ({runtime.min_qemu_why}). On Debian 12 install qemu-user "
                f"from bookworm-backports: run .ci/install-pi-tools as root."
            )


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """'qemu-aarch64 version 10.0.2 (Debian ...)' -> (10, 0, 2)."""
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise EmulationError(f"cannot read a version from qemu's output: {text.strip()[:200]!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def find_qemu(name: str = "qemu-aarch64", cpu: str = DEFAULT_QEMU_CPU) -> Qemu:
    """Locate qemu-aarch64 (a name on PATH or a path) and read its version."""
    path = shutil.which(name)
    if path is None:
        raise EmulationError(f"{name} not found: {INSTALL_HINT} (Debian package qemu-user >= 10)")
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise EmulationError(f"{path} --version failed: {err}") from err
    return Qemu(path=path, version=parse_qemu_version(out), cpu=cpu)


# --- caches: lock, build in a temp folder, rename ------------------------------------------
@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on cache entry `name` (two builds of one entry wait in turn)."""
    with configlib.exclusive_lock(cache_dir / f".{name}.lock"):
        yield


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _temp_sibling(final: Path) -> Path:
    """The temporary build folder of `final`; leftovers of killed builds are removed first."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        _remove_tree(stale)  # safe: we hold this entry's lock
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _install(tmp: Path, final: Path) -> None:
    """Move the complete tree `tmp` to `final`, replacing an outdated one there."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        _remove_tree(old)


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, payload: Mapping) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_host(argv: Sequence[str], timeout: float, what: str, **kwargs) -> str:
    """Run a host command, return its output (stdout + stderr); raise with its tail on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            **kwargs,
        )
    except FileNotFoundError as err:
        raise EmulationError(f"{what}: {argv[0]} not found: {INSTALL_HINT}") from err
    except subprocess.TimeoutExpired as err:
        raise EmulationError(f"{what}: timed out after {timeout:.0f} s: {' '.join(argv)}") from err
    if proc.returncode != 0:
        raise EmulationError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{_tail(proc.stdout)}"
        )
    return proc.stdout


# --- (1) the sysroot ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Sysroot:
    """A built arm64 Debian tree and the facts recorded when it was built."""

    path: Path
    release: str
    python: str  # "3.11", the interpreter's name
    python_version: str  # "3.11.2", what it reported under emulation
    packages: tuple[str, ...]

    @property
    def interpreter(self) -> Path:
        return self.path / "usr" / "bin" / f"python{self.python}"


def sysroot_dir(cache_dir: Path, release: Release) -> Path:
    return Path(cache_dir) / f"sysroot-{release.name}-py{release.python}"


def _sysroot_from_stamp(path: Path, release: Release, mirror: str) -> Sysroot | None:
    stamp = _read_stamp(path / SYSROOT_STAMP)
    wanted = {"packages": list(release.packages), "mirror": mirror}
    if not stamp or {k: stamp.get(k) for k in wanted} != wanted:
        return None
    root = Sysroot(path, release.name, release.python, stamp["python_version"], release.packages)
    return root if root.interpreter.is_file() else None


def ensure_sysroot(
    cache_dir: Path,
    release: Release,
    qemu: Qemu,
    *,
    mirror: str = DEBIAN_MIRROR,
    mmdebstrap: str = "mmdebstrap",
    timeout: float = 900.0,
) -> Sysroot:
    """Return the cached arm64 sysroot of `release`, building it first if needed.

    Built with `mmdebstrap --arch=arm64 --variant=extract` into a temporary folder, checked by
    running its python under qemu, stamped, then renamed to
    `<cache_dir>/sysroot-<release>-py<X.Y>/`. A tree is reused only when its stamp names the
    same packages and mirror, so a killed or outdated build is never mistaken for a good one.
    """
    # Absolute: qemu's -L and the interpreter path are used from other working directories.
    final = sysroot_dir(Path(cache_dir).resolve(), release)
    with _locked(final.parent, final.name):
        cached = _sysroot_from_stamp(final, release, mirror)
        if cached is not None:
            return cached
        if shutil.which(mmdebstrap) is None:
            raise EmulationError(f"{mmdebstrap} not found: {INSTALL_HINT}")
        tmp = _temp_sibling(final)
        try:
            _run_host(
                [
                    mmdebstrap,
                    "--quiet",
                    "--arch=arm64",
                    "--variant=extract",
                    "--include=" + ",".join(release.packages),
                    release.name,
                    str(tmp),
                    mirror,
                ],
                timeout,
                f"building the arm64 {release.name} sysroot",
            )
            probe = Sysroot(tmp, release.name, release.python, "", release.packages)
            if not probe.interpreter.is_file():
                raise EmulationError(f"mmdebstrap finished but {probe.interpreter} is missing")
            proc = run_python(
                probe,
                qemu,
                ["-c", "import platform; print(platform.machine(), platform.python_version())"],
                cwd=tmp,
                timeout=120,
            )
            check_completed(proc, f"python{release.python} in the new {release.name} sysroot")
            machine, version = proc.stdout.split()
            if machine != "aarch64":
                raise EmulationError(f"emulated python reports machine {machine!r}, not aarch64")
            _write_stamp(
                tmp / SYSROOT_STAMP,
                {
                    "release": release.name,
                    "python": release.python,
                    "python_version": version,
                    "packages": list(release.packages),
                    "mirror": mirror,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            _install(tmp, final)
        except BaseException:
            _remove_tree(tmp)  # never leave a half tree behind (also on Ctrl-C)
            raise
    return Sysroot(final, release.name, release.python, version, release.packages)


# --- (2) the wheels ----------------------------------------------------------------------------
def wheels_dir(cache_dir: Path, runtime: str, python: str) -> Path:
    return Path(cache_dir) / f"wheels-{runtime}-py{python}"


def pip_install_command(
    host_python: str, requirements: Path, target: Path, python: str
) -> list[str]:
    """The host pip command that unpacks aarch64 wheels for CPython `python` into `target`.

    `--only-binary=:all:` is required with `--platform` (pip cannot build for another
    machine); `--no-warn-conflicts` because pip would compare against the host's own packages.
    """
    abi = "cp" + python.replace(".", "")
    argv = [
        host_python, "-m", "pip", "install",
        "--disable-pip-version-check", "--no-warn-conflicts", "--no-warn-script-location",
        "--no-compile",  # the emulated interpreter writes its own .pyc on first import
        "--target", str(target),
        "--only-binary=:all:",
        "--python-version", python,
        "--implementation", "cp",
        "--abi", abi,
    ]  # fmt: skip
    for platform in WHEEL_PLATFORMS:
        argv += ["--platform", platform]
    return argv + ["-r", str(requirements)]


def ensure_wheels(
    cache_dir: Path,
    runtime: RuntimeSpec,
    requirements: Path,
    python: str,
    *,
    host_python: str = sys.executable,
    timeout: float = 900.0,
) -> Path:
    """Return `<cache_dir>/wheels-<runtime>-py<X.Y>/`, the runtime set's aarch64 packages.

    The pins are the bundle's own `requirements` file; the cache is reused while that file's
    content (and the platform tags) are unchanged, rebuilt otherwise.
    """
    requirements = Path(requirements)
    try:
        req_text = requirements.read_text(encoding="utf-8")
    except OSError as err:
        raise EmulationError(f"cannot read {runtime.name}'s requirements: {err}") from err
    key = {
        "runtime": runtime.name,
        "python": python,
        "requirements_sha256": hashlib.sha256(req_text.encode()).hexdigest(),
        "platforms": list(WHEEL_PLATFORMS),
    }
    final = wheels_dir(Path(cache_dir).resolve(), runtime.name, python)
    with _locked(final.parent, final.name):
        stamp = _read_stamp(final / WHEELS_STAMP)
        if stamp and {k: stamp.get(k) for k in key} == key:
            return final
        tmp = _temp_sibling(final)
        try:
            try:
                _run_host(
                    pip_install_command(host_python, requirements, tmp, python),
                    timeout,
                    f"fetching the aarch64 wheels of {runtime.name} for Python {python}",
                )
            except EmulationError as err:
                if "No matching distribution" in str(err) or "Could not find a version" in str(err):
                    raise EmulationError(
                        f"{err}\nA package pinned in {requirements.name} has no aarch64 wheel "
                        f"for CPython {python} under the platform tags {', '.join(WHEEL_PLATFORMS)}"
                        f" (pip matches each --platform tag exactly; a wheel tagged otherwise, "
                        f"or none for this Python, is not found)."
                    ) from err
                raise
            _write_stamp(tmp / WHEELS_STAMP, {**key, "requirements": req_text})
            _install(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
    return final


# --- (3) running in the emulated userland ----------------------------------------------------
def emulated_env(qemu: Qemu, pythonpath: Sequence[Path] = ()) -> dict[str, str]:
    """A clean environment for the guest: nothing of the host's Python settings leaks in."""
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "TMPDIR": "/tmp",
        "PYTHONNOUSERSITE": "1",
        "QEMU_CPU": qemu.cpu,
    }
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return env


def run_python(
    sysroot: Sysroot,
    qemu: Qemu,
    args: Sequence[str],
    *,
    cwd: Path,
    pythonpath: Sequence[Path] = (),
    timeout: float = 600.0,
) -> subprocess.CompletedProcess:
    """Run `python3.X <args>` of `sysroot` under qemu in `cwd`; return the finished process.

    Output is captured as text. A timeout kills qemu's whole process group and raises
    EmulationError; a non-zero exit is returned, not raised (see check_completed).
    """
    argv = [qemu.path, "-L", str(sysroot.path), str(sysroot.interpreter), *args]
    return run_with_timeout(argv, cwd=cwd, env=emulated_env(qemu, pythonpath), timeout=timeout)


def run_with_timeout(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """subprocess.run that, on timeout, kills the command's whole process group."""
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so a timeout kills all of it
        )
    except OSError as err:
        raise EmulationError(f"cannot start {argv[0]}: {err}") from err
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)  # a process that left the group may hold the pipes
        raise EmulationError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


# qemu's own words when the guest dies of a signal (the crash of an old qemu inside a runtime).
_QEMU_CRASH = re.compile(r"qemu: uncaught target signal|qemu-aarch64: .*(?:fault|Illegal)")


def crashed(proc: subprocess.CompletedProcess) -> bool:
    """Did the guest die of a signal (as opposed to exiting with a status)?"""
    if proc.returncode < 0 or proc.returncode >= 128:  # killed by a signal / shell's 128+N
        return True
    return bool(_QEMU_CRASH.search(proc.stderr or ""))


def check_completed(proc: subprocess.CompletedProcess, what: str) -> None:
    """Raise EmulationError naming `what`, its exit and its stderr's tail unless it exited 0."""
    if proc.returncode == 0:
        return
    how = f"crashed (exit {proc.returncode})" if crashed(proc) else f"exited {proc.returncode}"
    raise EmulationError(f"{what} {how}:\n{_tail(proc.stderr or '')}")


def describe(qemu: Qemu) -> dict:
    """JSON-ready facts about the emulator, for reports."""
    return {**asdict(qemu), "version": qemu.version_text}
