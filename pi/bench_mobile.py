"""Benchmark the Pi code on this machine: accuracy and latency through the mobile runtime.

    python -m pi.bench_mobile [--data-dir ../shared/datasets/mnist]     (make bench-mobile)

Writes `artifacts/bench/mobile.json` (and the resolved config beside it):

- `variants`: every TFLite variant in `--models-dir` (artifacts/mobile) run through
  mobile.runtime.Classifier on the whole test set, with the export report's accuracy for the
  same file beside it (`matches_export_report`).
- `cli_test_set`: the recommended mnist.tflite through the real CLI (`python -m
  mobile.classify --json` on the test digits written as 28x28 PNGs, so decoding and the
  MNIST pass-through are included), once per runtime: ai-edge-litert from this Python,
  tflite-runtime from `--tflite-runtime-python` when that venv exists.
- `pictures`: per kind of picture (model/pictures.py: photo, canvas, chalk, tight, thinpen,
  mnist), `--pictures` synthetic pictures made from the first test digits, written as files:
  accuracy through the real CLI (the Pi's whole path: file, header, decode, preprocessing,
  model) with the recommended model, refusals, and in process per variant: accuracy of the
  preprocessed pictures, of the clean digits they were made from, and without preprocessing
  (grey + resize); decode + preprocessing time per picture (p50/p99); and the parity of the
  two implementations of the specification: the TensorFlow graph of serving_bytes
  (export/picture_graph.py) against mobile/preprocess.py on the same bytes (mean |difference|
  of the 28x28 pictures in grey levels, exact matches, the digits the recommended model reads
  from each, refusals). `photo_1mp`: decode + preprocessing of 1-megapixel JPEG photos.
- `cases`: the shared cases (tests/data/pictures) through the CLI: which come out as their digit.
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

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field

REPO = Path(__file__).resolve().parents[1]
CLI_CHUNK = 1000  # pictures per CLI call (keeps the command line short)


@dataclass(frozen=True)
class MobileBenchConfig:
    """Benchmark the Raspberry Pi code (mobile/) on this machine."""

    models_dir: Path = field(Path("artifacts/mobile"), "folder with the TFLite variants, mnist.tflite, labels.txt, report.json")
    data_dir: Path | None = field(None, "MNIST IDX folder (default: tests/data, 1,000 test digits)")
    pictures: int = field(1000, "synthetic pictures of each kind, made from the first test digits", at_least=1)
    kinds: tuple[str, ...] = field(("photo", "canvas", "chalk", "tight", "thinpen", "mnist"), "kinds of picture (model/pictures.py)")
    parity: bool = field(True, "compare with the TensorFlow graph of serving_bytes (needs TensorFlow)")
    seed: int = field(0, "seed of the synthetic photos")
    latency_runs: int = field(2000, "single-picture runs of the CLI benchmark", at_least=1)
    threads: int = field(1, "interpreter threads", at_least=1)
    tflite_runtime_python: Path | None = field(
        Path(".venv-tflite-runtime/bin/python"), "Python with tflite-runtime 2.14.0 for the second runtime ('none' skips)"
    )
    out: Path = field(Path("artifacts/bench/mobile.json"), "where to write the results")

    def validate(self) -> None:
        check_bounds(self)
        if not (Path(self.models_dir) / contract.MOBILE_MODEL_FILE).is_file():
            raise ConfigError(f"--models-dir {self.models_dir}: no {contract.MOBILE_MODEL_FILE} there. Run make train / make export first.")
        from model.pictures import KINDS

        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ConfigError(f"--kinds takes some of {', '.join(KINDS)}; got {', '.join(self.kinds) or 'none'}")


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
    from model.pictures import synthesize_photo
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

        # 3. Every kind of picture: the CLI, each variant, timing, parity with the graph.
        count = min(config.pictures, len(test.labels))
        recommended = models_dir / contract.MOBILE_MODEL_FILE
        graph = _graph_preprocessing() if config.parity else None
        kinds: dict[str, Any] = {}
        made: dict[str, list] = {}
        for kind in config.kinds:
            kinds[kind], made[kind] = _measure_kind(kind, test, count, config, classifiers, recommended, tmp_dir, graph, log)
        result["pictures"] = {"count_per_kind": count, "seed": config.seed, "kinds": kinds}
        result["cases"] = _cases(recommended)
        log(f"shared cases (tests/data/pictures): {result['cases']['right']}/{result['cases']['count']} read as their digit")
        result["photo_1mp"] = _photo_1mp(test, config.seed)
        log(f"1-MP JPEG photo, decode + preprocessing: p50 {result['photo_1mp']['preprocess_ms_p50']:.1f} ms")

        # 4. CLI latency with one thread, per runtime, on a sample photo (JPEG).
        photo = next((p for p in made.get("photo", []) if p.format == "jpeg"), None)
        if photo is None:
            photo = synthesize_photo(test.images[0], np.random.default_rng(config.seed), jpeg=True)
        sample = tmp_dir / f"sample.{photo.extension}"
        sample.write_bytes(photo.data)
        latency = {}
        for runtime, python in _runtimes(config).items():
            document = _cli(python, ["--model", str((models_dir / contract.MOBILE_MODEL_FILE).resolve()), "--runtime", runtime, "--threads", str(config.threads), "--benchmark", str(config.latency_runs), str(sample)])
            latency[runtime] = {"version": document["runtime"]["version"], **document["benchmark"]}
            log(f"CLI latency {runtime}: p50 {document['benchmark']['latency_us_p50']:.1f} us, p99 {document['benchmark']['latency_us_p99']:.1f} us")
        result["cli_latency"] = latency
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _graph_preprocessing() -> Callable[[bytes], np.ndarray | str]:
    """export/picture_graph.py's picture_to_mnist as a function of bytes: uint8 [28, 28], or
    the reason it refuses the picture."""
    import tensorflow as tf

    from export import picture_graph

    fn = tf.function(picture_graph.picture_to_mnist, input_signature=[tf.TensorSpec([], tf.string)])

    def run(data: bytes) -> np.ndarray | str:
        try:
            return fn(tf.constant(data)).numpy()
        except tf.errors.InvalidArgumentError as err:
            return err.message

    return run


def _measure_kind(kind: str, test: Any, count: int, config: MobileBenchConfig, classifiers: dict[str, Any],
                  recommended: Path, tmp_dir: Path, graph: Callable | None, log: Callable[[str], None]) -> tuple[dict[str, Any], list]:
    """One kind's entry of `pictures` (see the module docstring) and the pictures made."""
    from model.pictures import synthesize_kind
    from mobile import preprocess
    from mobile.classify import percentiles_us

    digits, truth = test.images[:count], test.labels[:count]
    pictures = synthesize_kind(kind, digits, seed=config.seed)
    folder = tmp_dir / kind
    folder.mkdir()
    names = []
    for i, photo in enumerate(pictures):
        name = f"{i:05d}-{int(truth[i])}.{photo.extension}"
        (folder / name).write_bytes(photo.data)
        names.append(name)
    cli_digits: list[int] = []
    cli_refused: dict[str, int] = {}
    for begin in range(0, len(names), CLI_CHUNK):
        document = _cli(Path(sys.executable), ["--model", str(recommended.resolve()), "--runtime", "ai-edge-litert",
                                               *names[begin : begin + CLI_CHUNK]], cwd=folder)
        for item in document["results"]:
            cli_digits.append(int(item.get("digit", -1)))
            if "error" in item:
                reason = item["error"].split(":")[0]
                cli_refused[reason] = cli_refused.get(reason, 0) + 1
    prepared: list[np.ndarray | None] = []  # None: refused
    naive, seconds = [], []
    for photo in pictures:
        start = time.perf_counter()
        try:
            prepared.append(preprocess.picture_to_mnist(photo.data))
        except preprocess.PictureError:
            prepared.append(None)
        seconds.append(time.perf_counter() - start)
        naive.append(preprocess.resize_only(preprocess.decode(photo.data)))
    refused = sum(p is None for p in prepared)
    blank = np.zeros((28, 28), np.uint8)  # a refused picture counts as wrong
    prepared_array = np.stack([blank if p is None else p for p in prepared])
    per_variant = {}
    for name, classifier in classifiers.items():
        clean = float((classifier.predict(digits).argmax(1) == truth).mean())
        right = float((classifier.predict(prepared_array).argmax(1) == truth).mean())
        per_variant[name] = {
            "clean_accuracy": clean, "preprocessed_accuracy": right,
            "no_preprocess_accuracy": float((classifier.predict(np.stack(naive)).argmax(1) == truth).mean()),
            "gap_points": round(100 * (clean - right), 2),
        }
    timing = percentiles_us(seconds)
    sizes = np.array([max(p.pixels.shape[:2]) for p in pictures])
    entry: dict[str, Any] = {
        "count": len(pictures),
        "formats": {f: int(sum(p.format == f for p in pictures)) for f in sorted({p.format for p in pictures})},
        "long_side_px": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "cli_accuracy": float((np.array(cli_digits) == truth).mean()),
        "cli_refused": cli_refused,
        "refused": refused,
        "preprocess_ms_p50": round(timing["p50"] / 1000, 2),
        "preprocess_ms_p99": round(timing["p99"] / 1000, 2),
        "variants": per_variant,
    }
    if graph is not None:
        entry["parity"] = _parity(pictures, prepared, graph, classifiers.get("mnist"))
    rec = per_variant.get("mnist", {})
    log(f"{kind:8s} ({len(pictures)}): CLI {entry['cli_accuracy']:.4f}, in process {rec.get('preprocessed_accuracy')}, "
        f"clean {rec.get('clean_accuracy')}, refused {refused}, p50 {entry['preprocess_ms_p50']} ms"
        + (f", parity: mean |diff| {entry['parity']['mean_abs_diff']:.3f}, digits agree {entry['parity']['digits_agree']:.4f}"
           if "parity" in entry else ""))
    return entry, pictures


def _parity(pictures: list, prepared: list[np.ndarray | None], graph: Callable, classifier: Any) -> dict[str, Any]:
    """The graph's 28x28 pictures against the Pi's (`prepared`, None where it refused)."""
    diffs, exact, both_refused, one_refused, graph_images, pi_images = [], 0, 0, 0, [], []
    for photo, mine in zip(pictures, prepared):
        theirs = graph(photo.data)
        pi_refused = mine is None
        if isinstance(theirs, str) or pi_refused:
            both_refused += isinstance(theirs, str) and pi_refused
            one_refused += isinstance(theirs, str) != pi_refused
            continue
        difference = np.abs(mine.astype(np.int16) - theirs.astype(np.int16))
        diffs.append(float(difference.mean()))
        exact += int(not difference.any())
        graph_images.append(theirs)
        pi_images.append(mine)
    agree = 1.0
    if classifier is not None and graph_images:
        agree = float((classifier.predict(np.stack(graph_images)).argmax(1) == classifier.predict(np.stack(pi_images)).argmax(1)).mean())
    return {
        "compared": len(diffs), "mean_abs_diff": float(np.mean(diffs)) if diffs else 0.0,
        "max_mean_abs_diff": float(np.max(diffs)) if diffs else 0.0, "identical": exact,
        "digits_agree": agree, "refused_by_both": both_refused, "refused_by_one_only": one_refused,
    }


def _cases(model: Path) -> dict[str, Any]:
    """The pictures that failed when the kit was first tried (tests/data/pictures,
    `<kind>-<n>-<digit>.<ext>`) through the CLI with `model`: which come out as their digit."""
    folder = REPO / "tests" / "data" / "pictures"
    names = sorted(p.name for p in folder.iterdir())
    document = _cli(Path(sys.executable), ["--model", str(model.resolve()), "--runtime", "ai-edge-litert", *names], cwd=folder)
    rows = {}
    for name, item in zip(names, document["results"]):
        digit = int(name.split(".")[0].split("-")[2])
        rows[name] = {"digit": item.get("digit"), "probability": item.get("probability"), "error": item.get("error"),
                      "right": item.get("digit") == digit}
    return {"count": len(names), "right": sum(r["right"] for r in rows.values()), "files": rows}


def _photo_1mp(test: Any, seed: int, count: int = 20) -> dict[str, Any]:
    """Decode + preprocessing of 1-megapixel (1155 x 866) JPEG photos, after one untimed run each."""
    from model.pictures import synthesize_photo
    from mobile import preprocess
    from mobile.classify import percentiles_us

    rng = np.random.default_rng([seed, 1])
    pictures = [synthesize_photo(d, rng, size=(866, 1155), jpeg=True) for d in test.images[:count]]
    seconds = []
    for photo in pictures:
        preprocess.picture_to_mnist(photo.data)
        start = time.perf_counter()
        preprocess.picture_to_mnist(photo.data)
        seconds.append(time.perf_counter() - start)
    timing = percentiles_us(seconds)
    return {"pictures": count, "size": [866, 1155], "preprocess_ms_p50": round(timing["p50"] / 1000, 2),
            "preprocess_ms_p99": round(timing["p99"] / 1000, 2), "target_ms_p50": 15.0,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(MobileBenchConfig, argv, prog="python -m pi.bench_mobile")
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
