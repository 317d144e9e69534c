"""`make pi-smoke`: the Pi bundle under arm64 emulation, checked against the same bundle on x86.

    python -m pi.smoke [--bundle artifacts/mnist-pi.tar.gz] [--targets A@R,...]
                                [--digits 300] [--data-dir DIR] [--help for the rest]

1. Unpacks the bundle (one top folder `mnist-pi/`) into a fresh temporary folder and writes
   the first `--digits` MNIST test digits (tests/data, or --data-dir) into it as 28x28 PNGs
   named like the bundle's samples: `<true digit>-<anything>.png`.
2. Runs the bundle's own CLI on x86 once per runtime, from its own folder:
   `python -m mobile.classify --model mnist.tflite --runtime R --json PICTURE...`, with
   ai-edge-litert from .venv and tflite-runtime from .venv-tflite-runtime.
3. For each target `runtime@release` (Bookworm: Python 3.11, Trixie: Python 3.13) runs the
   same command under qemu-aarch64 in an arm64 Debian sysroot with the aarch64 wheels the
   bundle's requirements file pins (see emulation.py), then once more with `--benchmark N` on
   one picture for an (indicative) emulated latency.
4. Checks every picture was classified, the samples' digits are right, the arm64 predictions
   equal the x86 ones of the same runtime (or, failing that, the accuracy is identical) and
   the accuracy is above a floor; writes artifacts/pi-smoke/report.json (and config.json
   beside it) and exits 1 naming each failure.

Exit status: 0 all targets passed, 1 a check or a step failed, 2 bad flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from common import configlib
from common.configlib import ConfigError, check_bounds, field
from model import idx
from pi import emulation
from pi.emulation import EmulationError

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DATA_DIR = REPO_ROOT / "tests" / "data"

# The bundle's fixed layout (written by pi/bundle.py).
BUNDLE_TOP = "mnist-pi"
BUNDLE_MODEL = "mnist.tflite"
BUNDLE_REQUIRED = (
    "mobile/__init__.py",
    "mobile/classify.py",
    BUNDLE_MODEL,
    "labels.txt",
    "samples",
    "requirements.txt",
    "requirements-tflite-runtime.txt",
    "README.md",
)
# A picture's true digit is the first character of its name: "7-anything.png".
PICTURE_NAME = re.compile(r"^(\d)-.+\.[A-Za-z0-9]+$")
DIGITS_FOLDER = "pi-smoke-digits"  # inside the unpacked bundle, beside samples/

REPORT_FILE = "report.json"
CONFIG_FILE = "config.json"


class SmokeError(RuntimeError):
    """The smoke run cannot go on (bad bundle, missing data); the message says why."""


@dataclass(frozen=True)
class SmokeConfig:
    """Run the Pi bundle under arm64 emulation with each runtime; compare with x86."""

    bundle: Path = field(Path("artifacts/mnist-pi.tar.gz"), "the Pi bundle (make pi-bundle)")
    out_dir: Path = field(Path("artifacts/pi-smoke"), "where report.json and config.json go")
    cache_dir: Path = field(Path("artifacts/arm64"), "cache of arm64 sysroots and wheels")
    targets: tuple[str, ...] = field(
        ("ai-edge-litert@bookworm", "tflite-runtime@bookworm", "ai-edge-litert@trixie"),
        "comma-separated RUNTIME@RELEASE pairs; runtimes: "
        + ", ".join(emulation.RUNTIMES)
        + "; releases: "
        + ", ".join(f"{r.name} (Python {r.python})" for r in emulation.RELEASES.values()),
    )
    data_dir: Optional[Path] = field(None, "IDX folder of the test digits (default: tests/data)")
    digits: int = field(300, "how many MNIST test digits to classify, from the first", at_least=1)
    benchmark_runs: int = field(100, "timed inferences under emulation (0: no benchmark)", at_least=0)
    threads: int = field(1, "interpreter threads, on x86 and under emulation", at_least=1)
    min_accuracy: float = field(0.8, "fail below this accuracy on the digits (any runtime)", at_least=0, at_most=1)
    x86_python_ai_edge_litert: Path = field(
        REPO_ROOT / ".venv/bin/python", "x86 Python with ai-edge-litert (make setup)"
    )
    x86_python_tflite_runtime: Path = field(
        REPO_ROOT / ".venv-tflite-runtime/bin/python",
        "x86 Python with tflite-runtime (make setup-tflite-runtime)",
    )
    qemu: str = field("qemu-aarch64", "qemu user-mode emulator (name on PATH or path)")
    qemu_cpu: str = field(emulation.DEFAULT_QEMU_CPU, "CPU model qemu emulates (the Pi 4's)")
    mirror: str = field(emulation.DEBIAN_MIRROR, "Debian mirror mmdebstrap fetches from")
    timeout: float = field(900.0, "seconds allowed to each step (sysroot, wheels, one run)", above=0)
    keep_work: bool = field(False, "keep the unpacked bundle and pictures (path is printed)")

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("--targets: name at least one RUNTIME@RELEASE")
        for target in self.targets:
            runtime, _, release = target.partition("@")
            if runtime not in emulation.RUNTIMES or release not in emulation.RELEASES:
                raise ConfigError(
                    f"--targets: {target!r} is not RUNTIME@RELEASE with RUNTIME one of "
                    f"{', '.join(emulation.RUNTIMES)} and RELEASE one of "
                    f"{', '.join(emulation.RELEASES)}"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--targets: {','.join(self.targets)} names a target twice")
        check_bounds(self)


def log(message: str) -> None:
    print(f"pi-smoke: {message}", file=sys.stderr, flush=True)


# --- the bundle and the pictures ---------------------------------------------------------------
def unpack_bundle(bundle: Path, dest: Path) -> Path:
    """Unpack `bundle` (a tar.gz with one top folder `mnist-pi/`) into `dest`; return that folder.

    Raises SmokeError for a missing or unreadable archive, members outside `mnist-pi/` or
    unsafe ones (absolute paths, `..`, devices), and a bundle missing a required file.
    """
    bundle = Path(bundle)
    if not bundle.is_file():
        raise SmokeError(f"bundle {bundle} not found: build it with `make pi-bundle`")
    try:
        with tarfile.open(bundle, "r:*") as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if Path(m.name).parts}
            if tops != {BUNDLE_TOP}:
                raise SmokeError(
                    f"{bundle}: expected one top folder {BUNDLE_TOP}/, found {sorted(tops)}"
                )
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..', devices, ...
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SmokeError(f"{bundle}: cannot unpack: {err}") from err
    root = Path(dest) / BUNDLE_TOP
    missing = [name for name in BUNDLE_REQUIRED if not (root / name).exists()]
    if missing:
        raise SmokeError(f"{bundle}: the bundle lacks {', '.join(missing)}")
    return root


def true_digit(picture: str) -> int:
    """'samples/7-foo.png' -> 7 (the naming convention of the bundle's samples)."""
    match = PICTURE_NAME.match(Path(picture).name)
    if not match:
        raise SmokeError(f"{picture}: name does not start with '<digit>-'")
    return int(match.group(1))


def list_samples(bundle_dir: Path) -> list[str]:
    """The bundle's sample pictures, as paths relative to `bundle_dir`, sorted."""
    samples = sorted(
        f"samples/{p.name}" for p in (bundle_dir / "samples").iterdir() if p.is_file()
    )
    samples = [s for s in samples if not Path(s).name.startswith(".")]
    if not samples:
        raise SmokeError("the bundle's samples/ folder holds no pictures")
    for sample in samples:
        true_digit(sample)  # raises for a name without its digit
    return samples


def write_digits(bundle_dir: Path, data_dir: Path, count: int) -> list[str]:
    """Write the first `count` MNIST test digits as 28x28 greyscale PNGs into the bundle.

    Returns their paths relative to `bundle_dir`, named `<label>-t10k-<index>.png`.
    """
    from PIL import Image  # only the driver needs Pillow, not emulation.py

    try:
        split = idx.load_split(data_dir, "test")
    except (idx.IdxError, OSError) as err:
        raise SmokeError(f"cannot read the MNIST test split from {data_dir}: {err}") from err
    if len(split.labels) < count:
        raise SmokeError(f"{data_dir} holds {len(split.labels)} test digits, asked for {count}")
    folder = bundle_dir / DIGITS_FOLDER
    folder.mkdir()
    names = []
    for i in range(count):
        name = f"{DIGITS_FOLDER}/{int(split.labels[i])}-t10k-{i:05d}.png"
        Image.fromarray(split.images[i]).save(bundle_dir / name)  # [28, 28] uint8
        names.append(name)
    return names


# --- the CLI's answer -------------------------------------------------------------------------
def classify_args(
    runtime: str, pictures: Sequence[str], threads: int, benchmark_runs: int = 0
) -> list[str]:
    """Arguments after `python`: the bundle's CLI as its README tells a Pi user to run it."""
    args = ["-m", "mobile.classify", "--model", BUNDLE_MODEL, "--threads", str(threads)]
    args += ["--runtime", runtime, "--json"]
    if benchmark_runs:
        args += ["--benchmark", str(benchmark_runs)]
    return args + list(pictures)


def parse_cli_output(stdout: str, pictures: Sequence[str]) -> dict:
    """Check the CLI's `--json` output; return it with `results` keyed by picture.

    Returns {"runtime": {...}, "results": {picture: result}, "benchmark": {...} or None}.
    Raises SmokeError when stdout is not exactly one JSON object of the documented shape or
    does not answer for exactly the pictures given.
    """
    try:
        payload = json.loads(stdout)
    except ValueError as err:
        raise SmokeError(f"stdout is not one JSON object ({err}): {stdout[:300]!r}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise SmokeError(f"JSON output lacks a 'results' list: {stdout[:300]!r}")
    runtime = payload.get("runtime")
    if not isinstance(runtime, dict) or not {"name", "version"} <= set(runtime):
        raise SmokeError(f"JSON output lacks runtime name/version: {runtime!r}")
    results: dict[str, dict] = {}
    for entry in payload["results"]:
        name = entry.get("file") if isinstance(entry, dict) else None
        key = os.path.normpath(name) if isinstance(name, str) else None
        if key is None or ("digit" not in entry and "error" not in entry):
            raise SmokeError(f"malformed result {entry!r}")
        results[key] = entry
    expected = {os.path.normpath(p): p for p in pictures}
    if set(results) != set(expected):
        missing = sorted(set(expected) - set(results))[:5]
        extra = sorted(set(results) - set(expected))[:5]
        raise SmokeError(
            f"results do not match the pictures given: missing {missing}, extra {extra}"
        )
    benchmark = payload.get("benchmark")
    return {
        "runtime": runtime,
        "results": {expected[k]: v for k, v in results.items()},
        "benchmark": benchmark,
    }


def accuracy(results: dict[str, dict], pictures: Sequence[str]) -> float:
    """Fraction of `pictures` whose predicted digit is the digit its name starts with."""
    right = sum(results[p].get("digit") == true_digit(p) for p in pictures)
    return right / len(pictures)


def compare(
    arm: dict[str, dict], x86: dict[str, dict], samples: Sequence[str], digits: Sequence[str],
    min_accuracy: float,
) -> tuple[dict, list[str]]:
    """Compare one emulated run with the x86 run of the same runtime on the same pictures.

    Returns (metrics, failures): metrics are accuracies, agreement and the largest difference
    of the top probability; failures are sentences naming each check that did not hold.
    """
    failures = []
    pictures = [*samples, *digits]
    errors = {p: arm[p]["error"] for p in pictures if "error" in arm[p]}
    if errors:
        first = list(errors.items())[:3]
        failures.append(f"{len(errors)} picture(s) not classified, e.g. {first}")
    x86_errors = [p for p in pictures if "error" in x86[p]]
    if x86_errors:
        failures.append(
            f"{len(x86_errors)} picture(s) not classified on x86, e.g. {x86_errors[:3]}"
        )
    disagreements = [
        {"file": p, "arm64": arm[p].get("digit"), "x86": x86[p].get("digit")}
        for p in pictures
        if arm[p].get("digit") != x86[p].get("digit")
    ]
    prob_diffs = [
        abs(float(arm[p]["probability"]) - float(x86[p]["probability"]))
        for p in pictures
        if "digit" in arm[p] and arm[p].get("digit") == x86[p].get("digit")
    ]
    metrics = {
        "pictures": len(pictures),
        "classified": len(pictures) - len(errors),
        "accuracy_samples": accuracy(arm, samples),
        "accuracy_digits": accuracy(arm, digits),
        "x86_accuracy_samples": accuracy(x86, samples),
        "x86_accuracy_digits": accuracy(x86, digits),
        "agreement_with_x86": 1.0 - len(disagreements) / len(pictures),
        "disagreements": disagreements,
        "max_abs_top_probability_diff": max(prob_diffs, default=None),
    }
    wrong_samples = [
        {"file": s, "digit": arm[s].get("digit")}
        for s in samples
        if arm[s].get("digit") != true_digit(s)
    ]
    if wrong_samples:
        failures.append(f"sample(s) misclassified: {wrong_samples}")
    if disagreements and (
        metrics["accuracy_digits"] != metrics["x86_accuracy_digits"]
        or metrics["accuracy_samples"] != metrics["x86_accuracy_samples"]
    ):
        failures.append(
            f"{len(disagreements)} prediction(s) differ from x86 and so does the accuracy "
            f"(digits {metrics['accuracy_digits']:.4f} vs {metrics['x86_accuracy_digits']:.4f}): "
            f"e.g. {disagreements[:3]}"
        )
    if metrics["accuracy_digits"] < min_accuracy:
        failures.append(
            f"accuracy on the digits {metrics['accuracy_digits']:.4f} "
            f"< --min-accuracy {min_accuracy}"
        )
    return metrics, failures


# --- running ----------------------------------------------------------------------------------
def run_x86(
    python: Path, runtime: str, bundle_dir: Path, pictures: Sequence[str], config: SmokeConfig
) -> dict:
    """Run the bundle's CLI with the x86 `python`; return parse_cli_output's dict + seconds."""
    if not Path(python).is_file():
        raise SmokeError(
            f"x86 Python for {runtime} not found at {python} "
            f"(make {'setup' if runtime == 'ai-edge-litert' else 'setup-tflite-runtime'})"
        )
    # PYTHONPATH first: the bundle's own mobile/, not a copy installed in the venv.
    env = {**os.environ, "PYTHONPATH": str(bundle_dir), "PYTHONNOUSERSITE": "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    start = time.monotonic()
    proc = emulation.run_with_timeout(
        [str(python), *classify_args(runtime, pictures, config.threads)],
        cwd=bundle_dir,
        env=env,
        timeout=config.timeout,
    )
    return _checked_run(proc, f"x86 {runtime}", pictures, runtime, time.monotonic() - start)


def _checked_run(proc, what: str, pictures: Sequence[str], runtime: str, seconds: float) -> dict:
    # Exit 1 means "some pictures failed": the JSON still says which, so parse it then.
    if proc.returncode not in (0, 1) or emulation.crashed(proc):
        emulation.check_completed(proc, what)
    try:
        parsed = parse_cli_output(proc.stdout, pictures)
    except SmokeError as err:
        raise SmokeError(f"{what}: {err}\nstderr:\n{emulation._tail(proc.stderr)}") from err
    if parsed["runtime"]["name"] != runtime:
        used = parsed["runtime"]["name"]
        raise SmokeError(f"{what}: the CLI used runtime {used!r}, not {runtime!r}")
    return {**parsed, "exit": proc.returncode, "seconds": round(seconds, 2)}


def run_target(
    target: str,
    config: SmokeConfig,
    qemu: emulation.Qemu,
    bundle_dir: Path,
    samples: Sequence[str],
    digits: Sequence[str],
    x86: dict,
) -> dict:
    """Build (or reuse) the sysroot and wheels of `target`, run the CLI under emulation, check.

    Returns the target's report entry; its "failures" list is empty when every check held.
    """
    runtime_name, _, release_name = target.partition("@")
    runtime, release = emulation.RUNTIMES[runtime_name], emulation.RELEASES[release_name]
    entry: dict = {"target": target, "runtime": runtime_name, "release": release_name,
                   "python": release.python, "failures": []}  # fmt: skip
    seconds: dict[str, float] = {}
    start = time.monotonic()
    try:
        qemu.require(runtime)
        t = time.monotonic()
        log(f"{target}: sysroot ({release.name}, python{release.python})")
        sysroot = emulation.ensure_sysroot(
            config.cache_dir, release, qemu, mirror=config.mirror, timeout=config.timeout
        )
        entry["python_version"] = sysroot.python_version
        seconds["sysroot"] = time.monotonic() - t
        t = time.monotonic()
        log(f"{target}: aarch64 wheels from {runtime.requirements_file}")
        wheels = emulation.ensure_wheels(
            config.cache_dir, runtime, bundle_dir / runtime.requirements_file, release.python,
            timeout=config.timeout,
        )  # fmt: skip
        seconds["wheels"] = time.monotonic() - t

        pictures = [*samples, *digits]
        log(f"{target}: classifying {len(pictures)} pictures under qemu-aarch64 -cpu {qemu.cpu}")
        t = time.monotonic()
        proc = emulation.run_python(
            sysroot, qemu, classify_args(runtime_name, pictures, config.threads),
            cwd=bundle_dir, pythonpath=[wheels], timeout=config.timeout,
        )  # fmt: skip
        seconds["classify"] = time.monotonic() - t
        what = f"arm64 {target} (qemu-aarch64 {qemu.version_text})"
        arm = _checked_run(proc, what, pictures, runtime_name, seconds["classify"])
        entry["runtime_version"] = arm["runtime"]["version"]
        entry["exit"] = arm["exit"]
        metrics, failures = compare(
            arm["results"], x86["results"], samples, digits, config.min_accuracy
        )
        entry.update(metrics)
        entry["failures"] += failures
        # The documented contract: exit 0 when every picture was classified, 1 otherwise.
        if arm["exit"] != (0 if metrics["classified"] == metrics["pictures"] else 1):
            entry["failures"].append(
                f"the CLI exited {arm['exit']} with {metrics['pictures'] - metrics['classified']}"
                f" picture(s) unclassified (expected exit 0 when all are classified, else 1)"
            )
        if arm["runtime"]["version"] != x86["runtime"]["version"]:
            entry["failures"].append(
                f"runtime version differs: arm64 {arm['runtime']['version']}, "
                f"x86 {x86['runtime']['version']}"
            )

        if config.benchmark_runs:
            log(f"{target}: benchmark, {config.benchmark_runs} runs on {samples[0]}")
            t = time.monotonic()
            proc = emulation.run_python(
                sysroot, qemu,
                classify_args(runtime_name, samples[:1], config.threads, config.benchmark_runs),
                cwd=bundle_dir, pythonpath=[wheels], timeout=config.timeout,
            )  # fmt: skip
            seconds["benchmark"] = time.monotonic() - t
            bench = _checked_run(
                proc, f"{what}, benchmark", samples[:1], runtime_name, seconds["benchmark"]
            )
            if not isinstance(bench["benchmark"], dict):
                entry["failures"].append("--benchmark gave no 'benchmark' object in the JSON")
            else:
                entry["benchmark"] = bench["benchmark"]
    except (EmulationError, SmokeError) as err:
        entry["failures"].append(str(err))
    seconds["total"] = time.monotonic() - start
    entry["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    entry["ok"] = not entry["failures"]
    return entry


def run_smoke(config: SmokeConfig) -> dict:
    """Run every target of `config`; write report.json and config.json; return the report.

    Raises SmokeError/EmulationError when nothing can run (no bundle, no qemu, no data);
    a failing target is recorded in the report (report["ok"] is then False).
    """
    started = time.monotonic()
    qemu = emulation.find_qemu(config.qemu, config.qemu_cpu)
    log(f"qemu-aarch64 {qemu.version_text} ({qemu.path}), CPU {qemu.cpu}")
    data_dir = config.data_dir or FIXTURE_DATA_DIR
    work = Path(tempfile.mkdtemp(prefix="pi-smoke-"))
    try:
        bundle_dir = unpack_bundle(config.bundle, work)
        samples = list_samples(bundle_dir)
        digits = write_digits(bundle_dir, data_dir, config.digits)
        pictures = [*samples, *digits]
        log(f"{config.bundle} unpacked in {bundle_dir}: {len(samples)} samples, "
            f"{len(digits)} digits")

        runtimes = sorted({t.partition("@")[0] for t in config.targets})
        x86_pythons = {
            "ai-edge-litert": config.x86_python_ai_edge_litert,
            "tflite-runtime": config.x86_python_tflite_runtime,
        }
        x86_runs: dict[str, dict] = {}
        x86_report: dict[str, dict] = {}
        failures: list[str] = []
        for runtime in runtimes:
            log(f"x86 {runtime}: classifying {len(pictures)} pictures")
            try:
                run = run_x86(x86_pythons[runtime], runtime, bundle_dir, pictures, config)
            except (EmulationError, SmokeError) as err:
                failures.append(f"x86 {runtime}: {err}")
                continue
            x86_runs[runtime] = run
            x86_report[runtime] = {
                "runtime_version": run["runtime"]["version"],
                "python": str(x86_pythons[runtime]),
                "accuracy_samples": accuracy(run["results"], samples),
                "accuracy_digits": accuracy(run["results"], digits),
                "seconds": run["seconds"],
            }

        targets = []
        for target in config.targets:
            runtime = target.partition("@")[0]
            if runtime not in x86_runs:
                targets.append({"target": target, "ok": False,
                                "failures": [f"no x86 reference run for {runtime}"]})  # fmt: skip
                continue
            entry = run_target(target, config, qemu, bundle_dir, samples, digits, x86_runs[runtime])
            targets.append(entry)
            log(f"{target}: {'ok' if entry['ok'] else 'FAILED'}")
        failures += [f"{t['target']}: {f}" for t in targets for f in t["failures"]]
    finally:
        if config.keep_work:
            log(f"kept the work folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    report = {
        "ok": not failures,
        "failures": failures,
        "bundle": str(config.bundle),
        "bundle_sha256": hashlib.sha256(Path(config.bundle).read_bytes()).hexdigest(),
        "qemu": emulation.describe(qemu),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "pictures": {
            "samples": len(samples),
            "digits": len(digits),
            "digits_source": f"{data_dir} (MNIST test split, first {len(digits)})",
        },
        "x86": x86_report,
        "targets": targets,
        "seconds_total": round(time.monotonic() - started, 2),
    }
    configlib.save_config(config, config.out_dir / CONFIG_FILE)
    configlib.write_json_atomic(config.out_dir / REPORT_FILE, report)
    return report


def _cell(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summary(report: dict) -> str:
    """A table of the report, one line per target, for the terminal."""
    columns = [("target", 26), ("runtime", 9), ("python", 8), ("acc", 8), ("x86 acc", 9),
               ("agree", 7), ("samples", 9), ("p50 us", 9), ("p99 us", 9), ("s", 7)]  # fmt: skip
    lines = ["".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}"
                     for i, (name, w) in enumerate(columns))]  # fmt: skip
    n_samples = report["pictures"]["samples"]
    for t in report["targets"]:
        bench = t.get("benchmark") or {}
        right = t.get("accuracy_samples")
        cells = [
            t["target"],
            t.get("runtime_version", "-"),
            t.get("python_version", "-"),
            _cell(t.get("accuracy_digits"), ".4f"),
            _cell(t.get("x86_accuracy_digits"), ".4f"),
            _cell(t.get("agreement_with_x86"), ".3f"),
            f"{round(right * n_samples)}/{n_samples}" if right is not None else "-",
            _cell(bench.get("latency_us_p50"), ".0f"),
            _cell(bench.get("latency_us_p99"), ".0f"),
            _cell(t.get("seconds", {}).get("total"), ".1f"),
        ]
        lines.append("".join(
            f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
            for i, (cell, (_name, w)) in enumerate(zip(cells, columns))
        ))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(SmokeConfig, argv, prog="python -m pi.smoke")
    try:
        report = run_smoke(config)
    except (SmokeError, EmulationError) as err:
        log(f"error: {err}")
        return 1
    print(summary(report))
    print(f"report: {config.out_dir / REPORT_FILE} ({report['seconds_total']:.0f} s)")
    for failure in report["failures"]:
        log(f"FAILED {failure}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
