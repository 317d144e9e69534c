"""What TensorFlow sees before we train: GPUs, CUDA, cuDNN, and whether a GPU really works.

    python -m model.gpu [--require-gpu] [--out report.json]      (make gpu-check)

`check_gpu()` must run before anything else touches the GPU, because memory growth can only be
set before the device is initialised. It returns a `GpuReport` (saved as gpu_report.json in each
run folder) and decides on mixed precision: only where every visible GPU has compute capability
>= 7.0 (Tensor Cores); elsewhere float16 is slower or unsupported.

With `require_gpu`, no usable GPU raises `NoGpuError`; entry points turn it into exit status
EXIT_NO_GPU (3) and print the diagnosis, which names the likely cause and its fix. With a CUDA
build and a driver, the diagnosis loads every CUDA library TensorFlow needs under the exact
name TensorFlow's loader asks for (cuda_libraries(): from TensorFlow's own and-cuda metadata),
and names each one that does not load, or loads at another version, with its fix.
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

from common.versions import version_tuple

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
    # The CUDA libraries TensorFlow loads, as probed (LibraryProbe fields): filled when the
    # GPU is not usable with a CUDA build and a driver.
    cuda_libraries: list[dict[str, Any]] = field(default_factory=list)

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
        if self.cuda_libraries:
            probes = [_as_probe(p) for p in self.cuda_libraries]
            missing = [p.soname for p in probes if not p.loaded]
            lines.append(
                f"CUDA libraries TensorFlow loads: {len(probes) - len(missing)} of {len(probes)} load"
                + (f" (not: {', '.join(missing)})" if missing else "")
            )
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
    """common.versions.version_tuple, or () for a version that is unknown or unreadable."""
    try:
        return version_tuple(text or "")
    except ValueError:
        return ()


# --------------------------------------------------------------------------------------------
# The CUDA libraries TensorFlow loads
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CudaLibrary:
    """One shared library TensorFlow's GPU support dlopens, by the exact name it asks for."""

    name: str  # "cudnn": TF's loader asks for lib<name>.so.<major>
    soname: str  # "libcudnn.so.9"
    what: str  # "cuDNN"
    package: str | None  # the pip package of tensorflow[and-cuda] that ships it ("nvidia-cudnn-cu12")
    minimum: str | None  # that package's lowest allowed version ("9.3.0.75")
    required: bool  # without it TensorFlow registers no GPU at all


# The libraries of TensorFlow's `and-cuda` extra that its loader opens: package stem -> (library,
# what it is, required). tsl/platform/default/dso_loader.cc opens lib<name>.so.<version>, the
# versions compiled in from cuda_config.h; tsl/platform/default/dlopen_checker.cc
# (TryDlopenCUDALibraries) refuses the GPU unless cudart, cublas, cublasLt, cufft, cusolver,
# cusparse and cudnn all load. NCCL is opened later, for multi-GPU all-reduce only.
_AND_CUDA_LIBRARIES = {
    "nvidia-cuda-runtime": [("cudart", "the CUDA runtime", True)],
    "nvidia-cublas": [("cublas", "cuBLAS", True), ("cublasLt", "cuBLASLt", True)],
    "nvidia-cufft": [("cufft", "cuFFT", True)],
    "nvidia-cusolver": [("cusolver", "cuSOLVER", True)],
    "nvidia-cusparse": [("cusparse", "cuSPARSE", True)],
    "nvidia-cudnn": [("cudnn", "cuDNN", True)],
    "nvidia-nccl": [("nccl", "NCCL (multi-GPU all-reduce)", False)],
}
# TensorFlow 2.21.0's `and-cuda` requirements, for a TensorFlow whose metadata has none (a
# build from source): the same lines as its METADATA.
_TF_2_21_AND_CUDA = (
    'nvidia-cublas-cu12<13.0,>=12.5.3.2; extra == "and-cuda"',
    'nvidia-cuda-runtime-cu12<13.0,>=12.5.82; extra == "and-cuda"',
    'nvidia-cudnn-cu12<10.0,>=9.3.0.75; extra == "and-cuda"',
    'nvidia-cufft-cu12<12.0,>=11.2.3.61; extra == "and-cuda"',
    'nvidia-cusolver-cu12<12.0,>=11.6.3.83; extra == "and-cuda"',
    'nvidia-cusparse-cu12<13.0,>=12.5.1.3; extra == "and-cuda"',
    'nvidia-nccl-cu12<3.0,>=2.27.7; extra == "and-cuda"',
)
# The NVIDIA driver's library (not a pip package): TensorFlow opens libcuda.so.1.
DRIVER_LIBRARY = CudaLibrary("cuda", "libcuda.so.1", "the NVIDIA driver's CUDA library", None, None, True)


def cuda_libraries(requirements: list[str] | None = None) -> list[CudaLibrary]:
    """The CUDA libraries the installed TensorFlow loads, with the sonames it asks for.

    Taken from TensorFlow's own metadata: its `and-cuda` extra lists the nvidia-*-cu12 pip
    packages its loader opens, and the soname's number is the major version of each package's
    minimum (nvidia-cufft-cu12>=11.2 ships libcufft.so.11). `requirements` replaces the
    metadata (tests); TensorFlow 2.21.0's list is the fallback. The driver's libcuda.so.1
    comes first.
    """
    if requirements is None:
        from importlib import metadata

        try:
            requirements = [r for r in metadata.requires("tensorflow") or [] if "and-cuda" in r]
        except metadata.PackageNotFoundError:
            requirements = []
        requirements = requirements or list(_TF_2_21_AND_CUDA)
    libraries = [DRIVER_LIBRARY]
    for line in requirements:
        match = re.match(r"\s*(?P<package>(?P<stem>nvidia-[a-z-]+?)-cu\d+)\s*(?P<spec>[^;]*)", line)
        if not match or match.group("stem") not in _AND_CUDA_LIBRARIES:
            continue
        minimum = re.search(r">=\s*([\d.]+)", match.group("spec"))
        if minimum is None:
            continue
        major = minimum.group(1).split(".")[0]
        for name, what, required in _AND_CUDA_LIBRARIES[match.group("stem")]:
            libraries.append(CudaLibrary(name, f"lib{name}.so.{major}", what, match.group("package"),
                                         minimum.group(1), required))
    return libraries


def elf_soname(path: Path) -> str | None:
    """The DT_SONAME of an ELF shared library (what the loader knows it as), or None.

    Reads the section headers, the SHT_DYNAMIC section and its string table (System V ABI,
    ELF-32/64, either byte order) without reading the whole file (cuDNN's are hundreds of MB).
    """
    import struct

    try:
        with open(path, "rb") as fh:
            ident = fh.read(16)
            if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                return None
            wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
            header = fh.read(48 if wide else 36)
            if wide:
                shoff, = struct.unpack_from(order + "Q", header, 0x28 - 16)
                shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A - 16)
            else:
                shoff, = struct.unpack_from(order + "I", header, 0x20 - 16)
                shentsize, shnum = struct.unpack_from(order + "HH", header, 0x2E - 16)
            fh.seek(shoff)
            table = fh.read(shentsize * shnum)
            section = order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
            sections = [struct.unpack_from(section, table, i * shentsize) for i in range(shnum)]
            for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
                if kind != 6:  # SHT_DYNAMIC
                    continue
                fh.seek(offset)
                dynamic = fh.read(size)
                entry = order + ("qQ" if wide else "iI")
                strtab = sections[link]
                for i in range(0, size - entsize + 1, entsize or 1):
                    tag, value = struct.unpack_from(entry, dynamic, i)
                    if tag == 0:  # DT_NULL
                        break
                    if tag == 14:  # DT_SONAME: an offset into the linked string table
                        fh.seek(strtab[4] + value)
                        return fh.read(256).split(b"\0", 1)[0].decode(errors="replace")
    except (OSError, struct.error, IndexError):
        return None
    return None


@dataclass
class LibraryProbe:
    """What loading one CudaLibrary the way TensorFlow does gave on this machine."""

    soname: str
    what: str
    required: bool
    package: str | None
    minimum: str | None
    path: str | None = None  # the file that loaded (None: none did)
    error: str | None = None  # why it did not load (the loader's message)
    version: str | None = None  # the version the library reports (cudart, cudnn), when it can
    others: list[str] = field(default_factory=list)  # "<file> (<its soname>)": other versions seen

    @property
    def loaded(self) -> bool:
        return self.path is not None and self.error is None


def library_search_dirs() -> list[Path]:
    """Where TensorFlow's dlopen looks before the system's cache, in its order: the folders
    of LD_LIBRARY_PATH, then its RUNPATH's nvidia/*/lib next to the tensorflow package (where
    `pip install tensorflow[and-cuda]` puts the libraries)."""
    import importlib.util

    dirs = [Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    spec = importlib.util.find_spec("tensorflow")
    if spec is not None and spec.origin:
        dirs += sorted((Path(spec.origin).parent.parent / "nvidia").glob("*/lib"))
    return dirs


def probe_cuda_libraries(
    libraries: list[CudaLibrary], search_dirs: list[Path] | None = None, system: bool = True
) -> list[LibraryProbe]:
    """Load each library as TensorFlow does and say what happened.

    Looks for the exact soname in `search_dirs` (default library_search_dirs()), then, with
    `system`, through the dynamic loader itself (its cache and default folders). A file with
    the right name whose own SONAME differs (a renamed or symlinked library of another
    version) does not count. When a library does not load, other versions of it in those
    folders (e.g. an unversioned libcudart.so of CUDA 13) are listed, since they are a
    common reason to believe it is installed.
    """
    dirs = library_search_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    probes = []
    for lib in libraries:
        probe = LibraryProbe(lib.soname, lib.what, lib.required, lib.package, lib.minimum)
        handle = None
        for folder in dirs:
            candidate = folder / lib.soname
            if candidate.exists():
                handle, probe.path, probe.error = _load(str(candidate), lib.soname)
                break
        if probe.path is None and system:
            handle, probe.path, probe.error = _load(lib.soname, lib.soname)
        if probe.path is None and probe.error is None:
            probe.error = f"{lib.soname} is in none of {', '.join(map(str, dirs)) or 'the search folders'}"
        if handle is not None and probe.error is None:
            probe.version = _reported_version(lib.name, handle)
        if not probe.loaded:
            probe.others = _other_versions(lib, dirs + (_loader_cache_dirs() if system else []))
        probes.append(probe)
    return probes


def _load(target: str, soname: str):
    """dlopen `target` (a path, or a soname for the loader to find); (handle, path, error)."""
    try:
        handle = ctypes.CDLL(target)
    except OSError as err:
        if "/" in target:
            return None, target, str(err)
        return None, None, str(err)
    path = target if "/" in target else _loaded_path(handle) or target
    real = elf_soname(Path(path)) if "/" in path else None
    if real is not None and real != soname:
        return None, path, f"{path} is {real} (its SONAME), not {soname}: a library of another version"
    return handle, path, None


def _loaded_path(handle) -> str | None:
    """The file the loader picked for a handle (glibc's dlinfo RTLD_DI_LINKMAP)."""

    class LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]

    try:
        dlinfo = ctypes.CDLL(None).dlinfo
    except AttributeError:
        return None
    link_map = ctypes.POINTER(LinkMap)()
    if dlinfo(ctypes.c_void_p(handle._handle), 2, ctypes.byref(link_map)) != 0 or not link_map:
        return None
    name = link_map.contents.l_name
    return name.decode() if name else None


def _reported_version(name: str, handle) -> str | None:
    """The version the library itself reports (cudaRuntimeGetVersion, cudnnGetVersion)."""
    try:
        if name == "cudart":
            value = ctypes.c_int()
            if handle.cudaRuntimeGetVersion(ctypes.byref(value)) != 0:
                return None
            return f"{value.value // 1000}.{value.value % 1000 // 10}"
        if name == "cudnn":
            handle.cudnnGetVersion.restype = ctypes.c_size_t
            value = int(handle.cudnnGetVersion())
            # cuDNN 9 encodes major*10000 + minor*100 + patch; cuDNN 8, major*1000 + minor*100 + patch.
            major, rest = (value // 10000, value % 10000) if value >= 90000 else (value // 1000, value % 1000)
            return f"{major}.{rest // 100}.{rest % 100}"
    except (AttributeError, OSError):
        return None
    return None


def _other_versions(lib: CudaLibrary, dirs: list[Path]) -> list[str]:
    found, seen = [], set()
    for folder in dirs:
        for path in sorted(folder.glob(f"lib{lib.name}.so*")):
            if path.name == lib.soname or path.resolve() in seen or not re.fullmatch(
                    rf"lib{re.escape(lib.name)}\.so(\.\d+)*", path.name):
                continue
            seen.add(path.resolve())
            soname = elf_soname(path)
            if soname != lib.soname:
                found.append(f"{path} ({soname or 'no SONAME'})")
    return found


def _loader_cache_dirs() -> list[Path]:
    """The folders of the dynamic loader's cache (`ldconfig -p`) and its default folders."""
    dirs: list[Path] = []
    listing = _run(["ldconfig", "-p"]) or _run(["/sbin/ldconfig", "-p"]) or ""
    for line in listing.splitlines():
        if "=>" in line:
            folder = Path(line.split("=>", 1)[1].strip()).parent
            if folder not in dirs:
                dirs.append(folder)
    for folder in ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/cuda/lib64"):
        if Path(folder).is_dir() and Path(folder) not in dirs:
            dirs.append(Path(folder))
    return dirs


def diagnose(report: GpuReport) -> list[str]:
    """Likely reasons TensorFlow has no usable GPU, each with its fix (most specific first)."""
    problems: list[str] = []
    tf_version = _version_tuple(report.tensorflow_version)
    if sys.platform == "win32" and tf_version >= (2, 11):
        problems.append(
            "Native Windows: TensorFlow >= 2.11 has no GPU support on native Windows. "
            "Run under WSL2 (Ubuntu) with the NVIDIA driver for WSL, then pip install "
            f'"tensorflow[and-cuda]=={report.tensorflow_version}".'
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
            f'pip install "tensorflow[and-cuda]=={report.tensorflow_version}" '
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
        if report.built_with_cuda:
            problems.extend(library_problems(report))
    if "microsoft" in _read_text("/proc/version").lower():
        problems.append(
            "WSL2 detected: install the NVIDIA driver on Windows (not inside WSL), keep "
            "/usr/lib/wsl/lib on LD_LIBRARY_PATH, and use "
            f'pip install "tensorflow[and-cuda]=={report.tensorflow_version}".'
        )
    if not problems:
        problems.append(
            "TensorFlow found no GPU and no specific cause was detected. Run `nvidia-smi`, then "
            "`python -c \"import tensorflow as tf; print(tf.config.list_physical_devices())\"` "
            "with TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own loader messages."
        )
    return problems


def library_problems(report: GpuReport) -> list[str]:
    """One problem per CUDA library TensorFlow needs and could not load (or loaded too old),
    each with its fix, from report.cuda_libraries (probe_cuda_libraries' results)."""
    problems = []
    install = f'pip install "tensorflow[and-cuda]=={report.tensorflow_version}"'
    for probe in map(_as_probe, report.cuda_libraries):
        if probe.loaded:
            minimum = _version_tuple(probe.minimum)[:2]
            if probe.version and minimum and _version_tuple(probe.version)[:2] < minimum:
                problems.append(
                    f"{probe.soname} ({probe.what}) at {probe.path} is version {probe.version}, older than "
                    f"the {probe.minimum} TensorFlow {report.tensorflow_version} was built for "
                    f"({probe.package}>={probe.minimum}). Fix: {install}, or put a newer {probe.what} first "
                    "on LD_LIBRARY_PATH."
                )
            continue
        if not probe.required and probe.package is not None:
            continue  # NCCL: one GPU works without it
        found = f" Found instead: {'; '.join(probe.others)}, which TensorFlow does not load." if probe.others else ""
        if probe.package is None:  # the driver's own library
            problems.append(
                f"{probe.soname} ({probe.what}) could not be loaded: {probe.error}.{found} Fix: install the "
                "NVIDIA driver (in a container: the NVIDIA Container Toolkit and --gpus all; under WSL2: "
                "keep /usr/lib/wsl/lib on LD_LIBRARY_PATH)."
            )
            continue
        problems.append(
            f"{probe.soname} ({probe.what}) could not be loaded: {probe.error}.{found} TensorFlow "
            f"{report.tensorflow_version} needs exactly this file. Fix: {install} (brings "
            f"{probe.package}>={probe.minimum}), or add the folder that holds {probe.soname} to "
            "LD_LIBRARY_PATH."
        )
    return problems


def _as_probe(value: LibraryProbe | dict[str, Any]) -> LibraryProbe:
    return value if isinstance(value, LibraryProbe) else LibraryProbe(**value)


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
        if report.built_with_cuda and report.nvidia_smi and not report.nvidia_smi.get("error"):
            report.cuda_libraries = [
                dataclasses.asdict(p) for p in probe_cuda_libraries(cuda_libraries())
            ]
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
    from common import configlib

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
