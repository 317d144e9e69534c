"""Benchmark the Pi code on this machine: accuracy and latency through the mobile runtime.

    python -m export.bench_mobile [--data-dir ../shared/datasets/mnist]     (make bench-mobile)

Writes `artifacts/bench/mobile.json` (and the resolved config beside it):

- `variants`: every TFLite variant in `--models-dir` (artifacts/mobile) run through
  mobile.runtime.Classifier on the whole test set, with the export report's accuracy for the
  same file beside it (`matches_export_report`).
- `cli_test_set`: the recommended mnist.tflite through the real CLI (`python -m
  mobile.classify --json` on the test digits written as 28x28 PNGs, so decoding and the
  MNIST pass-through are included), once per runtime: ai-edge-litert from this Python,
  tflite-runtime from `--tflite-runtime-python` when that venv exists.
- `photos`: `--photos` synthetic photos of handwritten digits on paper (export/photos.py: dark
  ink, off-centre, any size, uneven light and shadows, noise, JPEG) made from the first test
  digits: accuracy with the preprocessing (mobile.preprocess.to_mnist), without it (grey +
  resize, `--no-preprocess`), and on the same digits clean, per variant; and the time the
  preprocessing takes per photo.
- `cli_latency`: `python -m mobile.classify --threads 1 --benchmark N` on a sample photo:
  latency p50/p99 of one picture through the model, per runtime.

Nothing here is asserted: targets are for the reader (and the report) to compare.
A development-machine tool (it reads MNIST through model/idx.py); not part of the bundle.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from model import configlib, contract
from model.configlib import ConfigError, field

REPO = Path(__file__).resolve().parents[1]
CLI_CHUNK = 1000  # pictures per CLI call (keeps the command line short)


@dataclass(frozen=True)
class MobileBenchConfig:
    """Benchmark the Raspberry Pi code (mobile/) on this machine."""

    models_dir: Path = field(Path("artifacts/mobile"), "folder with the TFLite variants, mnist.tflite, labels.txt, report.json")
    data_dir: Path | None = field(None, "MNIST IDX folder (default: tests/data, 1,000 test digits)")
    photos: int = field(1000, "synthetic photos made from the first test digits")
    seed: int = field(0, "seed of the synthetic photos")
    latency_runs: int = field(2000, "single-picture runs of the CLI benchmark")
    threads: int = field(1, "interpreter threads")
    tflite_runtime_python: Path | None = field(
        Path(".venv-tflite-runtime/bin/python"), "Python with tflite-runtime 2.14.0 for the second runtime ('none' skips)"
    )
    out: Path = field(Path("artifacts/bench/mobile.json"), "where to write the results")

    def validate(self) -> None:
        if not (Path(self.models_dir) / contract.MOBILE_MODEL_FILE).is_file():
            raise ConfigError(f"--models-dir {self.models_dir}: no {contract.MOBILE_MODEL_FILE} there. Run make train / make export first.")
        if self.photos < 1 or self.latency_runs < 1 or self.threads < 1:
            raise ConfigError("--photos, --latency-runs and --threads must be >= 1")


def _variants(models_dir: Path) -> list[dict[str, Any]]:
    """[{name, path, report_accuracy?}] for every .tflite in the folder, report facts merged."""
    report_path = models_dir / contract.MOBILE_REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    by_file = {str(v.get("path")): v for v in report.get("variants", [])}
    found = []
    for path in sorted(models_dir.glob("*.tflite")):
        entry: dict[str, Any] = {"name": path.stem, "path": str(path), "size_bytes": path.stat().st_size}
        facts = by_file.get(path.name)
        if path.name == contract.MOBILE_MODEL_FILE and report.get("recommended"):
            entry["recommended"] = report["recommended"]
            facts = by_file.get(f"{report['recommended']}.tflite")
        if facts and "accuracy" in facts:
            entry["export_report_accuracy"] = facts["accuracy"]
        found.append(entry)
    return found


def _cli(python: Path, args: Sequence[str], cwd: Path | None = None) -> dict[str, Any]:
    """Run `python -m mobile.classify --json ...` with this repo importable; its JSON object."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [str(python), "-m", "mobile.classify", "--json", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=1800,
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{python} -m mobile.classify failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def _runtimes(config: MobileBenchConfig) -> dict[str, Path]:
    """Runtime name -> Python that runs the CLI with it."""
    pythons = {"ai-edge-litert": Path(sys.executable)}
    other = config.tflite_runtime_python
    if other is not None and Path(other).is_file():
        # absolute() but not resolve(): a venv's python is a symlink that must stay one.
        pythons["tflite-runtime"] = Path(other).absolute()
    return pythons


def run_benchmark(config: MobileBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything the module docstring lists; returns the JSON-ready result."""
    from export import photos
    from mobile import preprocess
    from mobile.classify import percentiles_us
    from mobile.runtime import Classifier, ModelError
    from model import idx

    started = time.perf_counter()
    models_dir = Path(config.models_dir)
    data_dir = Path(config.data_dir) if config.data_dir else REPO / "tests" / "data"
    test = idx.load_split(data_dir, "test")
    labels = models_dir / contract.LABELS_FILE
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "data": {"dir": str(data_dir), "test_images": int(len(test.labels)), "canonical_mnist": test.canonical},
        "threads": config.threads,
    }

    # 1. Every variant on the whole test set, in process (ai-edge-litert).
    variants = _variants(models_dir)
    classifiers: dict[str, Classifier] = {}
    for entry in variants:
        try:
            classifier = Classifier.load(Path(entry["path"]), labels, threads=config.threads)
        except ModelError as err:
            entry["error"] = str(err)
            continue
        classifiers[entry["name"]] = classifier
        start = time.perf_counter()
        predicted = classifier.predict(test.images).argmax(axis=1)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        entry["runtime"] = classifier.runtime.to_json()
        entry["accuracy"] = float((predicted == test.labels).mean())
        if "export_report_accuracy" in entry:
            entry["matches_export_report"] = abs(entry["accuracy"] - entry["export_report_accuracy"]) < 0.5 / len(test.labels)
        log(f"{entry['name']:>8}: accuracy {entry['accuracy']:.4f} (export report: {entry.get('export_report_accuracy', 'n/a')})")
    result["variants"] = variants

    with tempfile.TemporaryDirectory(prefix="bench-mobile-") as tmp:
        tmp_dir = Path(tmp)
        # 2. The CLI on the test digits as PNG files, per runtime.
        names = []
        for i, image in enumerate(test.images):
            name = f"{i:05d}-{int(test.labels[i])}.png"
            Image.fromarray(image).save(tmp_dir / name)
            names.append(name)
        cli_runs = {}
        for runtime, python in _runtimes(config).items():
            start = time.perf_counter()
            digits: list[int] = []
            failed = 0
            for begin in range(0, len(names), CLI_CHUNK):
                document = _cli(python, ["--model", str((models_dir / contract.MOBILE_MODEL_FILE).resolve()), "--runtime", runtime, *names[begin : begin + CLI_CHUNK]], cwd=tmp_dir)
                for item in document["results"]:
                    failed += "error" in item
                    digits.append(int(item.get("digit", -1)))
            accuracy = float((np.array(digits) == test.labels).mean())
            cli_runs[runtime] = {
                "version": document["runtime"]["version"],
                "accuracy": accuracy,
                "failed": failed,
                "seconds": round(time.perf_counter() - start, 1),
            }
            log(f"CLI {runtime}: accuracy {accuracy:.4f} on {len(digits)} PNG test digits")
        result["cli_test_set"] = cli_runs

        # 3. Synthetic photos: with / without preprocessing / clean, per variant.
        count = min(config.photos, len(test.labels))
        rng = np.random.default_rng(config.seed)
        start = time.perf_counter()
        photos = [photos.synthesize_photo(image, rng) for image in test.images[:count]]
        synth_seconds = time.perf_counter() - start
        prepared, naive, prep_seconds, failures = [], [], [], 0
        for photo in photos:
            t0 = time.perf_counter()
            try:
                prepared.append(preprocess.to_mnist(photo.rgb))
            except preprocess.PictureError:
                failures += 1
                prepared.append(np.zeros((28, 28), np.uint8))  # counts as wrong
            prep_seconds.append(time.perf_counter() - t0)
            naive.append(preprocess.resize_only(photo.rgb))
        truth = test.labels[:count]
        per_variant = {}
        for name, classifier in classifiers.items():
            per_variant[name] = {
                "clean_accuracy": float((classifier.predict(test.images[:count]).argmax(1) == truth).mean()),
                "preprocessed_accuracy": float((classifier.predict(np.stack(prepared)).argmax(1) == truth).mean()),
                "no_preprocess_accuracy": float((classifier.predict(np.stack(naive)).argmax(1) == truth).mean()),
            }
            per_variant[name]["gap_points"] = round(100 * (per_variant[name]["clean_accuracy"] - per_variant[name]["preprocessed_accuracy"]), 2)
        sizes = np.array([max(p.rgb.shape[:2]) for p in photos])
        prep = percentiles_us(prep_seconds)
        result["photos"] = {
            "count": count,
            "seed": config.seed,
            "jpeg_fraction": float(np.mean([p.format == "jpeg" for p in photos])),
            "long_side_px": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
            "preprocess_failures": failures,
            "preprocess_us_p50": prep["p50"],
            "preprocess_us_p99": prep["p99"],
            "synthesis_seconds": round(synth_seconds, 1),
            "variants": per_variant,
        }
        rec = per_variant.get("mnist", {})
        log(f"photos ({count}): clean {rec.get('clean_accuracy')}, preprocessed {rec.get('preprocessed_accuracy')}, without preprocessing {rec.get('no_preprocess_accuracy')}")

        # 4. CLI latency with one thread, per runtime, on a sample photo (JPEG).
        sample = tmp_dir / f"sample.{photos[0].extension}"
        sample.write_bytes(photos[0].data)
        latency = {}
        for runtime, python in _runtimes(config).items():
            document = _cli(python, ["--model", str((models_dir / contract.MOBILE_MODEL_FILE).resolve()), "--runtime", runtime, "--threads", str(config.threads), "--benchmark", str(config.latency_runs), str(sample)])
            latency[runtime] = {"version": document["runtime"]["version"], **document["benchmark"]}
            log(f"CLI latency {runtime}: p50 {document['benchmark']['latency_us_p50']:.1f} us, p99 {document['benchmark']['latency_us_p99']:.1f} us")
        result["cli_latency"] = latency
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(MobileBenchConfig, argv, prog="python -m export.bench_mobile")
    try:
        result = run_benchmark(config)
    except (OSError, ValueError, RuntimeError) as err:  # idx.IdxError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    configlib.write_json_atomic(Path(config.out), {"config": config, **result})
    configlib.save_config(config, Path(config.out).with_name(Path(config.out).stem + ".config.json"))
    print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
