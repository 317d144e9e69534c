"""The arm64 emulation library: qemu checks, cache atomicity, pip flags, timeouts.

Fast tests use fake mmdebstrap/pip scripts to drive the failure paths; one `pi` test builds a
real arm64 sysroot (mmdebstrap from deb.debian.org, ~10 s) and runs its Python under qemu.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from pi import emulation
from pi.emulation import EmulationError, Qemu

BOOKWORM = emulation.RELEASES["bookworm"]
LITERT = emulation.RUNTIMES["ai-edge-litert"]
TFLITE_RUNTIME = emulation.RUNTIMES["tflite-runtime"]


def fake_tool(folder: Path, name: str, body: str) -> str:
    """An executable shell script standing in for an external tool; returns its path."""
    path = folder / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


# --- qemu -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, version",
    [
        ("qemu-aarch64 version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopy", (10, 0, 2)),
        ("qemu-aarch64 version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)", (7, 2, 19)),
        ("qemu-aarch64 version 9.1 (custom)", (9, 1, 0)),
    ],
)
def test_parse_qemu_version(text, version):
    assert emulation.parse_qemu_version(text) == version


def test_parse_qemu_version_rejects_garbage():
    with pytest.raises(EmulationError, match="cannot read a version"):
        emulation.parse_qemu_version("command not found")


def test_old_qemu_is_refused_for_ai_edge_litert_with_the_fix():
    old = Qemu("/usr/bin/qemu-aarch64", (7, 2, 19))
    with pytest.raises(EmulationError) as err:
        old.require(LITERT)
    message = str(err.value)
    assert ">= 10" in message and "7.2.19" in message
    assert "bookworm-backports" in message and ".ci/install-pi-tools" in message
    old.require(TFLITE_RUNTIME)  # tflite-runtime runs under Debian 12's own qemu
    Qemu("/usr/bin/qemu-aarch64", (10, 0, 2)).require(LITERT)


def test_missing_qemu_names_the_installer():
    with pytest.raises(EmulationError, match="install-pi-tools"):
        emulation.find_qemu("qemu-aarch64-that-does-not-exist")


def test_find_qemu_reads_the_version_of_the_binary_given(tmp_path):
    qemu = fake_tool(tmp_path, "qemu-aarch64", 'echo "qemu-aarch64 version 10.1.0 (test)"\n')
    found = emulation.find_qemu(qemu, cpu="cortex-a53")
    assert found == Qemu(qemu, (10, 1, 0), "cortex-a53")
    assert emulation.describe(found)["version"] == "10.1.0"


def test_emulated_env_does_not_leak_host_python_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/host/site-packages")
    monkeypatch.setenv("PYTHONHOME", "/host")
    env = emulation.emulated_env(Qemu("q", (10, 0, 0), "cortex-a72"), [tmp_path / "w"])
    assert env["PYTHONPATH"] == str(tmp_path / "w")
    assert env["QEMU_CPU"] == "cortex-a72"
    assert "PYTHONHOME" not in env


# --- sysroot cache ----------------------------------------------------------------------------
def test_failed_sysroot_build_leaves_no_tree(tmp_path):
    """A build that dies half-way (here: mmdebstrap exits 1 after writing files) leaves nothing
    that a later run could take for a sysroot, and clears a killed build's leftovers."""
    cache = tmp_path / "cache"
    stale = cache / f".{emulation.sysroot_dir(cache, BOOKWORM).name}.tmp-99999"
    (stale / "usr/bin").mkdir(parents=True)
    mmdebstrap = fake_tool(
        tmp_path,
        "mmdebstrap",
        """\
        for arg; do target=$suite_or_target; suite_or_target=$arg; done  # ... TARGET MIRROR
        mkdir -p "$target/usr/bin" && touch "$target/usr/bin/python3.11"
        echo "E: download failed" >&2; exit 1
        """,
    )
    with pytest.raises(EmulationError, match="download failed"):
        emulation.ensure_sysroot(
            cache, BOOKWORM, Qemu("/bin/false", (10, 0, 0)), mmdebstrap=mmdebstrap
        )
    assert not emulation.sysroot_dir(cache, BOOKWORM).exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_sysroot_whose_python_does_not_run_is_not_kept(tmp_path):
    cache = tmp_path / "cache"
    mmdebstrap = fake_tool(
        tmp_path,
        "mmdebstrap",
        """\
        for arg; do target=$suite_or_target; suite_or_target=$arg; done  # ... TARGET MIRROR
        mkdir -p "$target/usr/bin" && touch "$target/usr/bin/python3.11"
        """,
    )
    crashing_qemu = fake_tool(
        tmp_path,
        "qemu",
        'echo "qemu: uncaught target signal 11 (Segmentation fault)" >&2; exit 139\n',
    )
    with pytest.raises(EmulationError, match="crashed"):
        emulation.ensure_sysroot(
            cache, BOOKWORM, Qemu(crashing_qemu, (10, 0, 0)), mmdebstrap=mmdebstrap
        )
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def _fake_complete_sysroot(cache: Path, packages) -> Path:
    root = emulation.sysroot_dir(cache, BOOKWORM)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").touch()
    stamp = {"packages": list(packages), "mirror": emulation.DEBIAN_MIRROR,
             "python_version": "3.11.2"}  # fmt: skip
    (root / emulation.SYSROOT_STAMP).write_text(json.dumps(stamp))
    return root


def test_complete_sysroot_is_reused_and_outdated_one_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    root = _fake_complete_sysroot(cache, BOOKWORM.packages)
    qemu = Qemu("/bin/false", (10, 0, 0))
    # No mmdebstrap at all: reuse must not need it.
    got = emulation.ensure_sysroot(cache, BOOKWORM, qemu, mmdebstrap="/nonexistent/mmdebstrap")
    assert got.path == root and got.python_version == "3.11.2"
    assert got.interpreter == root / "usr/bin/python3.11"
    # A stamp naming other packages is outdated: a rebuild is attempted (and fails here).
    (root / emulation.SYSROOT_STAMP).write_text(
        json.dumps({"packages": ["python3.11-minimal"], "mirror": emulation.DEBIAN_MIRROR})
    )
    with pytest.raises(EmulationError, match="mmdebstrap not found"):
        emulation.ensure_sysroot(cache, BOOKWORM, qemu, mmdebstrap="/nonexistent/mmdebstrap")


# --- wheels cache -----------------------------------------------------------------------------
def test_pip_command_fetches_aarch64_wheels_for_the_sysroot_python(tmp_path):
    req = tmp_path / "requirements.txt"
    argv = emulation.pip_install_command("/x/python", req, tmp_path / "w", "3.13")
    assert argv[:4] == ["/x/python", "-m", "pip", "install"]
    assert argv[-2:] == ["-r", str(req)]
    for flag, value in [("--python-version", "3.13"), ("--implementation", "cp"),
                        ("--abi", "cp313"), ("--target", str(tmp_path / "w"))]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert "--only-binary=:all:" in argv
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms == list(emulation.WHEEL_PLATFORMS)
    assert len(platforms) > 1  # with one tag pip finds nothing for some of the pins


def test_wheels_cache_follows_the_requirements_file(tmp_path):
    cache, req = tmp_path / "cache", tmp_path / "requirements.txt"
    req.write_text("tflite-runtime==2.14.0\nnumpy==1.26.4\n")
    pip_log = tmp_path / "pip-calls"
    # A fake host Python whose "pip install --target DIR" drops one module into DIR.
    python = fake_tool(
        tmp_path,
        "python",
        f"""\
        echo "$@" >> {pip_log}
        while [ "$1" != "--target" ]; do shift; done
        mkdir -p "$2" && echo "x = 1" > "$2/fake_runtime.py"
        """,
    )
    first = emulation.ensure_wheels(cache, TFLITE_RUNTIME, req, "3.11", host_python=python)
    assert first == cache / "wheels-tflite-runtime-py3.11"
    assert (first / "fake_runtime.py").is_file()
    emulation.ensure_wheels(cache, TFLITE_RUNTIME, req, "3.11", host_python=python)
    assert len(pip_log.read_text().splitlines()) == 1  # reused
    req.write_text("tflite-runtime==2.14.0\nnumpy==1.26.3\n")  # a pin changed
    emulation.ensure_wheels(cache, TFLITE_RUNTIME, req, "3.11", host_python=python)
    assert len(pip_log.read_text().splitlines()) == 2  # rebuilt
    stamp = json.loads((first / emulation.WHEELS_STAMP).read_text())
    assert "numpy==1.26.3" in stamp["requirements"]


def test_wheels_not_found_explains_platform_tags_and_keeps_nothing(tmp_path):
    cache, req = tmp_path / "cache", tmp_path / "requirements.txt"
    req.write_text("tflite-runtime==2.14.0\n")
    python = fake_tool(
        tmp_path,
        "python",
        """\
        while [ "$1" != "--target" ]; do shift; done
        mkdir -p "$2" && touch "$2/partial"
        echo "ERROR: No matching distribution found for tflite-runtime==2.14.0"; exit 1
        """,
    )
    with pytest.raises(EmulationError) as err:
        emulation.ensure_wheels(cache, TFLITE_RUNTIME, req, "3.13", host_python=python)
    assert "CPython 3.13" in str(err.value) and "manylinux2014_aarch64" in str(err.value)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


# --- running ----------------------------------------------------------------------------------
def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(EmulationError, match="timed out"):
        emulation.run_with_timeout(
            ["sh", "-c", f"sleep 300 >/dev/null 2>&1 & echo $! > {pid_file}; wait"],
            cwd=tmp_path, env={"PATH": os.environ["PATH"]}, timeout=1,
        )  # fmt: skip
    grandchild = int(pid_file.read_text())
    # Killed with its group: gone, or a zombie waiting for init to reap it; not sleeping.
    for _ in range(50):
        status = Path(f"/proc/{grandchild}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived the timeout")


def test_crash_is_told_from_an_exit_status():
    def done(code, stderr=""):
        return subprocess.CompletedProcess(["qemu"], code, "", stderr)

    assert emulation.crashed(done(-11))
    assert emulation.crashed(done(139, "qemu: uncaught target signal 11 (Segmentation fault)"))
    assert not emulation.crashed(done(1, "Traceback ..."))
    with pytest.raises(EmulationError, match="crashed"):
        emulation.check_completed(done(-4), "python3.11")
    with pytest.raises(EmulationError, match="exited 2:\nusage"):
        emulation.check_completed(done(2, "usage: ..."), "python3.11")
    emulation.check_completed(done(0), "python3.11")


# --- the real thing ---------------------------------------------------------------------------
@pytest.mark.pi
def test_real_sysroot_runs_python_as_aarch64(tmp_path):
    missing = [tool for tool in ("qemu-aarch64", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (run .ci/install-pi-tools as root)")
    qemu = emulation.find_qemu()
    sysroot = emulation.ensure_sysroot(tmp_path, BOOKWORM, qemu, timeout=600)
    assert sysroot.python_version.startswith("3.11.")
    proc = emulation.run_python(
        sysroot, qemu,
        ["-c", "import platform, sys; print(platform.machine(), sys.prefix)"],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    emulation.check_completed(proc, "emulated python")
    machine, prefix = proc.stdout.split()
    assert machine == "aarch64"
    assert prefix == str(sysroot.path / "usr")  # its own stdlib, not the host's
    # Reused on the second call: same tree, no rebuild (mmdebstrap is not even needed).
    again = emulation.ensure_sysroot(tmp_path, BOOKWORM, qemu, mmdebstrap="/nonexistent")
    assert again == sysroot
