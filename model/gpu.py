"""What TensorFlow sees before we train: GPUs, CUDA, cuDNN, and whether a GPU really works.

    python -m model.gpu [--require-gpu] [--out report.json]      (make gpu-check)

`check_gpu()` must run before anything else touches the GPU, because memory growth can only be
set before the device is initialised. It returns a `GpuReport` (saved as gpu_report.json in each
run folder) and decides on mixed precision: only where every visible GPU has compute capability
>= 7.0 (Tensor Cores); elsewhere float16 is slower or unsupported.

With `require_gpu`, no usable GPU raises `NoGpuError`; entry points turn it into exit status
EXIT_NO_GPU (3) and print the diagnosis, which names the likely cause and its fix.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_NO_GPU = 3  # distinct from 1 (failure) and 2 (usage): scripts can tell "no GPU" apart
MIXED_PRECISION_MIN_CC = (7, 0)


class NoGpuError(RuntimeError):
    """--require-gpu was given and no GPU is usable. The message holds the diagnosis."""


@dataclass
class GpuReport:
    tensorflow_version: str = ""
    keras_version: str = ""
    python_version: str = platform.python_version()
    platform: str = platform.platform()
    built_with_cuda: bool = False
    built_cuda_version: str | None = None
    built_cudnn_version: str | None = None
    built_compute_capabilities: list[str] = field(default_factory=list)
    cuda_visible_devices: str | None = None
    nvidia_smi: dict[str, Any] | None = None  # {"driver_version", "cuda_version", "gpus": [...]}
    gpus: list[dict[str, Any]] = field(default_factory=list)  # name, compute_capability
    memory_growth: bool = False
    test_op_device: str | None = None  # where the matmul placed on /GPU:0 really ran
    gpu_usable: bool = False
    mixed_precision: bool = False
    mixed_precision_reason: str = ""
    problems: list[str] = field(default_factory=list)  # likely causes + fixes when no GPU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few plain lines for the console."""
        lines = [
            f"TensorFlow {self.tensorflow_version}, Keras {self.keras_version}, "
            f"Python {self.python_version}",
            "Built with CUDA: "
            + (
                f"yes (CUDA {self.built_cuda_version}, cuDNN {self.built_cudnn_version})"
                if self.built_with_cuda
                else "no"
            ),
        ]
        if self.nvidia_smi:
            smi = self.nvidia_smi
            lines.append(
                f"NVIDIA driver {smi.get('driver_version')} (supports CUDA {smi.get('cuda_version')}); "
                + ", ".join(g.get("name", "?") for g in smi.get("gpus", []))
            )
        else:
            lines.append("nvidia-smi: not found")
        lines.append(f"CUDA_VISIBLE_DEVICES: {self.cuda_visible_devices!r}")
        if self.gpus:
            for gpu in self.gpus:
                lines.append(
                    f"TensorFlow sees {gpu['device']}: {gpu.get('name')} "
                    f"(compute capability {gpu.get('compute_capability')})"
                )
        else:
            lines.append("TensorFlow sees no GPU.")
        if self.test_op_device:
            lines.append(f"Test matmul on /GPU:0 ran on: {self.test_op_device}")
        lines.append(
            f"Mixed precision: {'on' if self.mixed_precision else 'off'} ({self.mixed_precision_reason})"
        )
        return "\n".join(lines)


def _run(cmd: list[str], timeout: float = 15.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def query_nvidia_smi() -> dict[str, Any] | None:
    """Driver version, the CUDA version the driver supports, and each GPU; None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    info: dict[str, Any] = {"path": exe, "gpus": []}
    header = _run([exe]) or ""
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    info["cuda_version"] = match.group(1) if match else None
    csv = _run(
        [exe, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    )
    for line in (csv or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            info["driver_version"] = parts[1]
            info["gpus"].append({"name": parts[0], "memory": parts[2], "compute_capability": parts[3]})
    if csv is None:
        info["error"] = "nvidia-smi is installed but failed (driver not loaded?)"
    return info


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or ""))


def _can_load(names: list[str]) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def diagnose(report: GpuReport) -> list[str]:
    """Likely reasons TensorFlow has no usable GPU, each with its fix (most specific first)."""
    problems: list[str] = []
    tf_version = _version_tuple(report.tensorflow_version)
    if sys.platform == "win32" and tf_version >= (2, 11):
        problems.append(
            "Native Windows: TensorFlow >= 2.11 has no GPU support on native Windows. "
            "Run under WSL2 (Ubuntu) with the NVIDIA driver for WSL, then pip install "
            "'tensorflow[and-cuda]'."
        )
    cvd = report.cuda_visible_devices
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        problems.append(
            f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU. Unset it or list the GPUs to use "
            "(e.g. export CUDA_VISIBLE_DEVICES=0)."
        )
    if not report.built_with_cuda:
        problems.append(
            "This TensorFlow build has no CUDA support. On Linux: "
            f"pip install 'tensorflow[and-cuda]=={report.tensorflow_version}' "
            "(the and-cuda extra brings CUDA and cuDNN as pip packages)."
        )
    if report.nvidia_smi is None:
        problems.append(
            "nvidia-smi was not found: no NVIDIA driver is installed (or this machine has no "
            "NVIDIA GPU). Install the NVIDIA driver for your GPU; in a container, run with "
            "--gpus all (Docker) and the NVIDIA Container Toolkit."
        )
    elif report.nvidia_smi.get("error"):
        problems.append(f"{report.nvidia_smi['error']}: check `nvidia-smi` and dmesg.")
    else:
        driver_cuda = _version_tuple(report.nvidia_smi.get("cuda_version"))
        built_cuda = _version_tuple(report.built_cuda_version)
        if driver_cuda and built_cuda and driver_cuda[:2] < built_cuda[:2]:
            problems.append(
                f"The NVIDIA driver supports CUDA {report.nvidia_smi.get('cuda_version')} but "
                f"TensorFlow was built for CUDA {report.built_cuda_version}: the driver is older "
                "than the CUDA runtime. Update the NVIDIA driver."
            )
        if report.built_with_cuda and not _can_load(
            ["libcudart.so.12", "libcudart.so"]
        ) and not _can_load(["libcudnn.so.9", "libcudnn.so"]):
            problems.append(
                "The CUDA/cuDNN libraries are not on the library path. Either pip install "
                f"'tensorflow[and-cuda]=={report.tensorflow_version}' (recommended), or add the "
                "folders holding libcudart.so.12 and libcudnn.so.9 to LD_LIBRARY_PATH."
            )
    if "microsoft" in _read_text("/proc/version").lower():
        problems.append(
            "WSL2 detected: install the NVIDIA driver on Windows (not inside WSL), keep "
            "/usr/lib/wsl/lib on LD_LIBRARY_PATH, and use pip install 'tensorflow[and-cuda]'."
        )
    if not problems:
        problems.append(
            "TensorFlow found no GPU and no specific cause was detected. Run `nvidia-smi`, then "
            "`python -c \"import tensorflow as tf; print(tf.config.list_physical_devices())\"` "
            "with TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own loader messages."
        )
    return problems


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def check_gpu(require_gpu: bool = False, enable_mixed_precision: bool = True) -> GpuReport:
    """Inspect the GPU set-up, set memory growth, test a real op, choose mixed precision.

    Call before any other TensorFlow work in the process. Raises NoGpuError when
    `require_gpu` and no GPU is usable; otherwise returns the report (gpu_usable tells).
    """
    import keras
    import tensorflow as tf

    report = GpuReport(tensorflow_version=tf.__version__, keras_version=keras.__version__)
    build = dict(tf.sysconfig.get_build_info())
    report.built_with_cuda = bool(build.get("is_cuda_build"))
    report.built_cuda_version = build.get("cuda_version")
    report.built_cudnn_version = build.get("cudnn_version")
    report.built_compute_capabilities = list(build.get("cuda_compute_capabilities", []) or [])
    report.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    report.nvidia_smi = query_nvidia_smi()

    gpus = tf.config.list_physical_devices("GPU")
    # Memory growth: allocate as needed instead of grabbing the whole card. Must precede
    # the first op on the device, hence this function runs first.
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
            report.memory_growth = True
        except RuntimeError as err:  # already initialised by earlier code in this process
            report.problems.append(f"could not set memory growth on {gpu.name}: {err}")
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        cc = details.get("compute_capability")
        report.gpus.append(
            {
                "device": gpu.name,
                "name": details.get("device_name"),
                "compute_capability": ".".join(map(str, cc)) if cc else None,
            }
        )

    if gpus:
        # TF places ops on the CPU silently when the GPU kernel cannot run (soft placement):
        # run a real matmul and look where it ran.
        try:
            with tf.device("/GPU:0"):
                a = tf.random.uniform((256, 256))
                b = tf.linalg.matmul(a, a)
            _ = b.numpy()
            report.test_op_device = b.device
            report.gpu_usable = "GPU" in b.device.upper()
            if not report.gpu_usable:
                report.problems.append(
                    f"A matmul placed on /GPU:0 ran on {b.device}: TensorFlow fell back to "
                    "the CPU (missing or incompatible CUDA kernels for this GPU)."
                )
        except Exception as err:  # CUDA errors surface here (e.g. unsupported arch)
            report.test_op_device = None
            report.problems.append(f"A test matmul on /GPU:0 failed: {err}")

    if report.gpu_usable:
        ccs = [_version_tuple(g["compute_capability"]) for g in report.gpus]
        if enable_mixed_precision and ccs and all(cc >= MIXED_PRECISION_MIN_CC for cc in ccs):
            keras.mixed_precision.set_global_policy("mixed_float16")
            report.mixed_precision = True
            report.mixed_precision_reason = (
                "mixed_float16: every GPU has compute capability >= 7.0 (Tensor Cores); "
                "the softmax stays float32"
            )
        elif not enable_mixed_precision:
            report.mixed_precision_reason = "disabled by --no-mixed-precision"
        else:
            report.mixed_precision_reason = (
                "float32: a GPU has compute capability < 7.0, where float16 does not pay"
            )
    else:
        report.mixed_precision_reason = "float32: no usable GPU"
        report.problems.extend(p for p in diagnose(report) if p not in report.problems)
        if require_gpu:
            raise NoGpuError(_no_gpu_message(report))
    return report


def _no_gpu_message(report: GpuReport) -> str:
    causes = "\n".join(f"  - {p}" for p in report.problems)
    return f"No usable GPU, and --require-gpu was given. Likely causes and fixes:\n{causes}"


WARNING_BANNER = "=" * 78


def warn_cpu_fallback(report: GpuReport, stream=None) -> None:
    """A loud warning: training goes on, on the CPU."""
    stream = stream or sys.stderr
    print(WARNING_BANNER, file=stream)
    print("WARNING: no usable GPU - training runs on the CPU (slower).", file=stream)
    for problem in report.problems:
        print(f"  - {problem}", file=stream)
    print("  Pass --require-gpu (make train REQUIRE_GPU=1) to stop instead.", file=stream)
    print(WARNING_BANNER, file=stream, flush=True)


@dataclass(frozen=True)
class GpuCheckConfig:
    """Check what TensorFlow sees (GPU, CUDA, cuDNN) and whether a GPU really works."""

    require_gpu: bool = dataclasses.field(
        default=False, metadata={"help": f"exit with status {EXIT_NO_GPU} when no GPU is usable"}
    )
    out: Path | None = dataclasses.field(
        default=None, metadata={"help": "also write the report as JSON to this file"}
    )


def main(argv: list[str] | None = None) -> int:
    from model import configlib

    config = configlib.parse_config(GpuCheckConfig, argv, prog="python -m model.gpu")
    try:
        report = check_gpu(require_gpu=config.require_gpu)
    except NoGpuError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_GPU
    print(report.summary())
    if not report.gpu_usable:
        warn_cpu_fallback(report)
    if config.out is not None:
        configlib.write_json_atomic(config.out, report.to_dict())
        print(f"Report written to {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
