"""The GPU check (model/gpu.py) on this CPU-only machine, and its diagnosis of machines with a
GPU, whose drivers and CUDA libraries are faked: a fake nvidia-smi, and tiny real shared
libraries built with the C compiler, with the right or a wrong soname and version."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model import gpu

from .conftest import REPO, python_env

# TensorFlow 2.21.0 on Linux: what tsl's dso_loader opens (the driver's library, the and-cuda
# extra's libraries); all but NCCL must load for TensorFlow to register a GPU.
TF_2_21_SONAMES = {
    "libcuda.so.1": True, "libcudart.so.12": True, "libcublas.so.12": True, "libcublasLt.so.12": True,
    "libcufft.so.11": True, "libcusolver.so.11": True, "libcusparse.so.12": True, "libcudnn.so.9": True,
    "libnccl.so.2": False,
}
INSTALL_FIX = 'pip install "tensorflow[and-cuda]==2.21.0"'
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) to build the fake CUDA libraries")


def test_gpu_check_reports_no_gpu_here():
    report = gpu.check_gpu(require_gpu=False)
    assert report.tensorflow_version and report.keras_version
    assert report.gpus == [] and not report.gpu_usable and not report.mixed_precision
    assert report.problems, "no GPU must come with a diagnosis"
    assert "no usable GPU" in report.mixed_precision_reason
    assert "TensorFlow sees no GPU" in report.summary()


def test_require_gpu_exits_with_its_own_code_and_the_diagnosis(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "model.gpu", "--require-gpu", "--out", str(tmp_path / "r.json")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == gpu.EXIT_NO_GPU == 3
    assert "No usable GPU, and --require-gpu was given" in proc.stderr
    assert "nvidia-smi" in proc.stderr  # this machine's likely cause
    assert not (tmp_path / "r.json").exists()


def test_train_with_require_gpu_stops_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "model.train", "--require-gpu", "--data-dir", str(REPO / "tests" / "data"),
         "--out", str(tmp_path / "runs")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "No usable GPU" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written: it stopped before training


def test_gpu_check_without_require_warns_and_succeeds(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "model.gpu", "--out", str(tmp_path / "r.json")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0
    assert "WARNING: no usable GPU" in proc.stderr
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["gpu_usable"] is False and saved["tensorflow_version"]


def _report(**kw):
    base = dict(tensorflow_version="2.21.0", built_with_cuda=True, built_cuda_version="12.5.1",
                nvidia_smi={"driver_version": "535", "cuda_version": "12.2", "gpus": [{"name": "T4"}]})
    base.update(kw)
    return gpu.GpuReport(**base)


def _report(**kw):
    base = dict(tensorflow_version="2.21.0", built_with_cuda=True, built_cuda_version="12.5.1",
                nvidia_smi={"driver_version": "535", "cuda_version": "12.2", "gpus": [{"name": "T4"}]})
    base.update(kw)
    return gpu.GpuReport(**base)


def test_diagnosis_names_causes_and_fixes(monkeypatch):
    monkeypatch.setattr(gpu, "_read_text", lambda path: "")
    old_driver = gpu.diagnose(_report())
    assert any("driver is older than the CUDA runtime" in p for p in old_driver)

    cpu_build = gpu.diagnose(_report(built_with_cuda=False, nvidia_smi=None))
    assert any(INSTALL_FIX in p for p in cpu_build)
    assert any("nvidia-smi was not found" in p for p in cpu_build)

    hidden = gpu.diagnose(_report(cuda_visible_devices="-1"))
    assert any("CUDA_VISIBLE_DEVICES='-1' hides every GPU" in p for p in hidden)

    monkeypatch.setattr(gpu, "_read_text", lambda path: "Linux version 5.15 microsoft-standard-WSL2")
    assert any("WSL2" in p for p in gpu.diagnose(_report()))

    monkeypatch.setattr(gpu.sys, "platform", "win32")
    assert any("Native Windows" in p and "2.11" in p for p in gpu.diagnose(_report()))


# --- the CUDA libraries -------------------------------------------------------------------

def test_the_library_list_is_tensorflows_own():
    import tensorflow as tf

    libraries = gpu.cuda_libraries()
    assert {lib.soname: lib.required for lib in libraries} == TF_2_21_SONAMES
    by_name = {lib.name: lib for lib in libraries}
    # The sonames agree with the CUDA and cuDNN versions TensorFlow reports it was built with.
    build = tf.sysconfig.get_build_info()
    assert by_name["cudart"].soname == f"libcudart.so.{build['cuda_version'].split('.')[0]}"
    assert by_name["cudnn"].soname == f"libcudnn.so.{build['cudnn_version'].split('.')[0]}"
    assert (by_name["cudnn"].package, by_name["cudnn"].minimum) == ("nvidia-cudnn-cu12", "9.3.0.75")
    # Without and-cuda metadata (a TensorFlow built from source): TensorFlow 2.21.0's list.
    assert [lib.soname for lib in gpu.cuda_libraries(list(gpu._TF_2_21_AND_CUDA))] == \
        [lib.soname for lib in libraries]


def _build(folder: Path, filename: str, soname: str, body: str = "") -> Path:
    """A real shared library `folder/filename` whose SONAME is `soname`."""
    source = folder / f"{filename}.c"
    source.write_text(body or f"int fake_{abs(hash(filename))}(void) {{ return 0; }}\n")
    subprocess.run([CC, "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(folder / filename), str(source)],
                   check=True, capture_output=True, timeout=60)
    return folder / filename


CUDART_12_5 = "int cudaRuntimeGetVersion(int *v) { *v = 12050; return 0; }\n"


def _cudnn(version: int) -> str:
    return f"unsigned long cudnnGetVersion(void) {{ return {version}UL; }}\n"


def _cuda_folder(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Every library TensorFlow 2.21 loads, faked in `folder` (minus `skip`), at good versions."""
    folder.mkdir(parents=True, exist_ok=True)
    for soname in TF_2_21_SONAMES:
        if soname in skip:
            continue
        body = CUDART_12_5 if soname.startswith("libcudart") else _cudnn(90300) if soname.startswith("libcudnn") else ""
        _build(folder, soname, soname, body)
    return folder


def _diagnose_with(folder: Path, monkeypatch) -> tuple[list[gpu.LibraryProbe], list[str]]:
    monkeypatch.setattr(gpu, "_read_text", lambda path: "")
    probes = gpu.probe_cuda_libraries(gpu.cuda_libraries(), search_dirs=[folder], system=False)
    report = _report(nvidia_smi={"driver_version": "570", "cuda_version": "12.8", "gpus": [{"name": "T4"}]},
                     cuda_libraries=[dataclasses.asdict(p) for p in probes])
    return probes, gpu.diagnose(report)


@needs_cc
def test_libraries_that_load_are_not_problems(tmp_path, monkeypatch):
    probes, problems = _diagnose_with(_cuda_folder(tmp_path / "lib"), monkeypatch)
    assert all(p.loaded for p in probes), [(p.soname, p.error) for p in probes]
    versions = {p.soname: p.version for p in probes}
    assert (versions["libcudart.so.12"], versions["libcudnn.so.9"]) == ("12.5", "9.3.0")
    assert len(problems) == 1 and "no specific cause" in problems[0]  # nothing left to blame


@needs_cc
def test_cudart_loads_but_cudnn_does_not(tmp_path, monkeypatch):
    """The issue's machine: libcudart loads, libcudnn.so.9 does not."""
    probes, problems = _diagnose_with(_cuda_folder(tmp_path / "lib", skip=("libcudnn.so.9",)), monkeypatch)
    (problem,) = problems
    assert problem.startswith("libcudnn.so.9 (cuDNN) could not be loaded")
    assert INSTALL_FIX in problem and "nvidia-cudnn-cu12>=9.3.0.75" in problem and "LD_LIBRARY_PATH" in problem
    assert "no specific cause" not in " ".join(problems)


@needs_cc
def test_a_library_of_another_major_version_does_not_count(tmp_path, monkeypatch):
    folder = _cuda_folder(tmp_path / "lib", skip=("libcudart.so.12", "libcudnn.so.9"))
    # An unversioned libcudart.so of CUDA 11 (what a CUDA 11 toolkit installs)...
    old_cudart = _build(folder, "libcudart.so", "libcudart.so.11.0",
                        "int cudaRuntimeGetVersion(int *v) { *v = 11080; return 0; }\n")
    # ...and cuDNN 8 renamed (here: symlinked) to the name TensorFlow asks for.
    cudnn8 = _build(folder, "libcudnn.so.8", "libcudnn.so.8", _cudnn(8907))
    (folder / "libcudnn.so.9").symlink_to(cudnn8.name)
    assert gpu.elf_soname(old_cudart) == "libcudart.so.11.0"

    probes, problems = _diagnose_with(folder, monkeypatch)
    by_soname = {p.soname: p for p in probes}
    assert not by_soname["libcudart.so.12"].loaded and not by_soname["libcudnn.so.9"].loaded
    cudart, cudnn = problems
    assert cudart.startswith("libcudart.so.12 (the CUDA runtime) could not be loaded")
    assert f"Found instead: {old_cudart} (libcudart.so.11.0), which TensorFlow does not load" in cudart
    assert "nvidia-cuda-runtime-cu12>=12.5.82" in cudart
    assert f"{folder / 'libcudnn.so.9'} is libcudnn.so.8 (its SONAME), not libcudnn.so.9" in cudnn


@needs_cc
def test_a_cudnn_older_than_tensorflow_was_built_for(tmp_path, monkeypatch):
    folder = _cuda_folder(tmp_path / "lib", skip=("libcudnn.so.9",))
    _build(folder, "libcudnn.so.9", "libcudnn.so.9", _cudnn(90100))
    _probes, problems = _diagnose_with(folder, monkeypatch)
    (problem,) = problems
    assert "libcudnn.so.9 (cuDNN)" in problem and "is version 9.1.0, older than the 9.3.0.75" in problem
    assert INSTALL_FIX in problem


@needs_cc
def test_gpu_check_names_the_missing_library_end_to_end(tmp_path):
    """`make gpu-check REQUIRE_GPU=1` on a machine with a driver, cudart, and no cuDNN."""
    # In a fresh process: this one may hold the fakes of the tests above under that soname.
    real_cudnn = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcudnn.so.9')"],
                                capture_output=True, timeout=60)
    if real_cudnn.returncode == 0:
        pytest.skip("this machine has a real libcudnn.so.9 on its loader's path")
    folder = _cuda_folder(tmp_path / "lib", skip=("libcudnn.so.9", "libcuda.so.1"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  --query-gpu=*) echo "Tesla T4, 570.86.15, 15360 MiB, 7.5" ;;\n'
        '  *) echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |" ;;\n'
        "esac\n"
    )
    smi.chmod(0o755)
    proc = subprocess.run(
        [sys.executable, "-m", "model.gpu", "--require-gpu"], cwd=REPO, capture_output=True, text=True, timeout=180,
        env=python_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LD_LIBRARY_PATH=str(folder)),
    )
    assert proc.returncode == gpu.EXIT_NO_GPU, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert any(line.startswith("  - libcudnn.so.9 (cuDNN) could not be loaded") and INSTALL_FIX in line
               for line in lines), proc.stderr[-3000:]
    assert not any("libcudart.so.12" in line for line in lines)
    assert "no specific cause" not in proc.stderr
