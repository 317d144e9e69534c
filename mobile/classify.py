"""Classify pictures of handwritten digits with a TFLite model (Raspberry Pi or anywhere).

    python3 -m mobile.classify --model mnist.tflite samples/7-photo.jpg samples/3-scan.png
    python3 -m mobile.classify --model mnist.tflite --json samples/*
    python3 -m mobile.classify --model mnist.tflite --benchmark 1000 samples/7-photo.jpg
    python3 -m mobile.classify --model mnist.tflite --camera

Each picture (PNG, JPEG, BMP or WebP, any size up to the pixel budget, colour or grey, dark
ink on paper or the reverse, photos, canvas drawings with transparency, scans) is put into
MNIST form first (mobile/preprocess.py, the specification TF Serving's serving_bytes follows
too); `--no-preprocess` only converts to grey and resizes to 28x28. All pictures go through
the model as one batch.

Output: one line per picture (file, digit, probability, top K), or with `--json` one JSON
object on stdout:

    {"model": str, "runtime": {"name": str, "version": str}, "threads": int,
     "results": [{"file", "digit", "label", "probability", "top": [{"digit", "label",
                  "probability"}, ...]} or {"file", "error"}, ...],
     "benchmark": {"runs", "latency_us_p50", "latency_us_p99", "latency_us_mean", ...}}

`--benchmark N` times N single-picture inferences (batch 1, after warm-up) of the first
picture; latency_us_* is the model call (input conversion, invoke, output), and the time each
picture took to decode and preprocess is reported beside it.

Exit status: 0 every picture classified; 1 at least one picture failed (the others are still
reported); 2 usage error, missing/corrupt model or labels file, no interpreter, no camera.
Errors go to stderr.

Imports only the standard library, numpy, Pillow and the interpreter it picks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from mobile import preprocess as pre
from mobile.camera import CameraUnavailable
from mobile.runtime import RUNTIME_CHOICES, Classifier, ModelError, RuntimeNotAvailable, latency_stats

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
CAMERA_NAME = "camera"  # the "file" of a camera capture in the results
WARMUP_RUNS = 10


@dataclass(frozen=True)
class ClassifyConfig:
    """Settings of one classify run (the command line's flags)."""

    model: Path
    pictures: tuple[Path, ...] = ()
    labels: Path | None = None  # default: labels.txt beside the model
    threads: int = 1
    runtime: str = "auto"
    json: bool = False
    top: int = 3
    benchmark: int = 0  # timed single-picture runs; 0 = none
    camera: bool = False
    preprocess: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the flag whose value cannot be used."""
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {self.threads}); 0 and -1 are not accepted by ai-edge-litert")
        if self.top < 1:
            raise ValueError(f"--top must be >= 1 (got {self.top})")
        if self.benchmark < 0:
            raise ValueError(f"--benchmark must be >= 0 (got {self.benchmark})")
        if self.runtime not in RUNTIME_CHOICES:
            raise ValueError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}")
        if not self.pictures and not self.camera and not self.benchmark:
            raise ValueError("give at least one PICTURE, --camera or --benchmark N")


@dataclass
class Outcome:
    """What a run produced: the JSON document and the exit status."""

    document: dict[str, Any]
    status: int
    errors: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m mobile.classify",
        description="Classify pictures of handwritten digits with a TFLite MNIST model.",
        allow_abbrev=False,
    )
    parser.add_argument("pictures", nargs="*", type=Path, metavar="PICTURE", help="PNG/JPEG files")
    parser.add_argument("--model", type=Path, required=True, help="the .tflite model")
    parser.add_argument("--labels", type=Path, default=None, help="class names, one per line (default: labels.txt beside the model)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads, >= 1 (default: 1, fastest for this small model)")
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help="interpreter (default: auto = ai-edge-litert, else tflite-runtime, else tensorflow)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--top", type=int, default=3, help="how many best classes to list (default: 3)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N single-picture inferences and print latency p50/p99")
    parser.add_argument("--camera", action="store_true", help="also classify one frame from the Pi camera (picamera2)")
    parser.add_argument("--no-preprocess", dest="preprocess", action="store_false", help="only grey + resize to 28x28 (for pictures already in MNIST form)")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ClassifyConfig:
    """Command line -> validated ClassifyConfig; bad usage exits with status 2."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))  # each flag's dest is a field of ClassifyConfig
    try:
        config = ClassifyConfig(**{**flags, "pictures": tuple(flags["pictures"])})
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    return config


# --------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------
def prepare(image: np.ndarray, size: tuple[int, int], preprocess: bool) -> np.ndarray:
    """A decoded picture (uint8 grey [H, W] or RGB [H, W, 3], e.g. a camera frame) -> model
    input uint8 [h, w]."""
    _check_size(size, preprocess)
    if preprocess:
        return pre.to_mnist(image)
    return pre.resize_only(image, size=size[0])


def prepare_file(path: Path, size: tuple[int, int], preprocess: bool) -> np.ndarray:
    """A picture file -> model input uint8 [h, w]: the whole specification of
    mobile/preprocess.py (the file's header checked before anything is decoded), or grey +
    resize with `preprocess` off. Raises PictureError."""
    _check_size(size, preprocess)
    if preprocess:
        data = pre.read_picture(path)
        try:
            return pre.picture_to_mnist(data)
        except pre.PictureError as err:
            raise pre.PictureError(f"{path}: {err}") from None
    return pre.resize_only(pre.load_grey(path), size=size[0])


def _check_size(size: tuple[int, int], preprocess: bool) -> None:
    if size[0] != size[1]:
        raise pre.PictureError(f"the model takes {size[0]}x{size[1]} pictures; only square inputs are supported")
    if preprocess and size[0] != pre.MNIST_SIZE:
        raise pre.PictureError(f"the model takes {size[0]}x{size[0]} pictures; the preprocessing makes "
                               f"{pre.MNIST_SIZE}x{pre.MNIST_SIZE} (use --no-preprocess)")


def load_pictures(
    paths: Sequence[Path], size: tuple[int, int], preprocess: bool
) -> tuple[list[tuple[str, np.ndarray | str]], list[float]]:
    """Read and prepare each file. Returns ([(name, uint8 [h, w] or error message)], seconds
    each successful picture took to decode and prepare)."""
    prepared: list[tuple[str, np.ndarray | str]] = []
    seconds = []
    for path in paths:
        start = time.perf_counter()
        try:
            image = prepare_file(path, size, preprocess)
        except pre.PictureError as err:
            message = str(err)
            prefix = f"{path}: "
            prepared.append((str(path), message[len(prefix):] if message.startswith(prefix) else message))
            continue
        except Exception as err:  # noqa: BLE001 - one bad picture must not stop the others
            prepared.append((str(path), f"unexpected error while reading it ({type(err).__name__}: {err})"))
            continue
        seconds.append(time.perf_counter() - start)
        prepared.append((str(path), image))
    return prepared, seconds


def percentiles_us(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean in microseconds of a list of durations in seconds."""
    return latency_stats(seconds, 1e6)


def benchmark(classifier: Classifier, image: np.ndarray, runs: int) -> dict[str, float]:
    """Latency of `runs` single-picture predictions (batch 1) after WARMUP_RUNS untimed ones."""
    batch = image[None]
    for _ in range(WARMUP_RUNS):
        classifier.predict(batch)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.predict(batch)
        seconds.append(time.perf_counter() - start)
    stats = percentiles_us(seconds)
    return {
        "runs": runs,
        "latency_us_p50": stats["p50"],
        "latency_us_p99": stats["p99"],
        "latency_us_mean": stats["mean"],
        "batch": 1,
        "warmup_runs": WARMUP_RUNS,
    }


def run(config: ClassifyConfig) -> Outcome:
    """Load the model, classify every picture (and the camera frame), optionally benchmark.

    Raises ModelError / RuntimeNotAvailable / CameraUnavailable for problems that stop the
    whole run; a picture that fails is reported in its result instead.
    """
    classifier = Classifier.load(config.model, config.labels, threads=config.threads, runtime=config.runtime)
    size = classifier.input_size
    prepared, prep_seconds = load_pictures(config.pictures, size, config.preprocess)
    if config.camera:
        from mobile.camera import capture_frame  # picamera2 only when asked for

        frame = capture_frame()
        try:
            prepared.append((CAMERA_NAME, prepare(frame, size, config.preprocess)))
        except pre.PictureError as err:
            prepared.append((CAMERA_NAME, str(err)))

    ok = [(name, image) for name, image in prepared if not isinstance(image, str)]
    predictions = classifier.classify(np.stack([image for _, image in ok]), top=config.top) if ok else []
    by_name = iter(predictions)
    results: list[dict[str, Any]] = []
    errors = []
    for name, image in prepared:
        if isinstance(image, str):
            results.append({"file": name, "error": image})
            errors.append(f"{name}: {image}")
        else:
            results.append({"file": name, **next(by_name).to_json()})

    document: dict[str, Any] = {
        "model": str(config.model),
        "runtime": classifier.runtime.to_json(),
        "threads": config.threads,
        "preprocess": config.preprocess,
        "results": results,
    }
    if config.benchmark:
        image = ok[0][1] if ok else np.zeros(size, np.uint8)
        stats = benchmark(classifier, image, config.benchmark)
        stats["input"] = ok[0][0] if ok else "blank"
        if prep_seconds:
            prep = percentiles_us(prep_seconds)
            stats.update(
                preprocess_pictures=len(prep_seconds),
                preprocess_us_p50=prep["p50"],
                preprocess_us_p99=prep["p99"],
            )
        document["benchmark"] = stats
    return Outcome(document, EXIT_SOME_FAILED if errors else EXIT_OK, errors)


def format_text(document: dict[str, Any]) -> str:
    """The human-readable report: one line per picture, then the benchmark if any."""
    lines = []
    width = max([len(r["file"]) for r in document["results"]] + [4])
    for result in document["results"]:
        if "error" in result:
            continue  # reported on stderr
        top = "  ".join(f"{t['label']} {t['probability']:6.1%}" for t in result["top"])
        lines.append(f"{result['file']:<{width}}  {result['label']}  {result['probability']:6.1%}   top: {top}")
    bench = document.get("benchmark")
    if bench:
        runtime = document["runtime"]
        lines.append(
            f"latency over {bench['runs']} runs (batch 1, {document['threads']} thread(s), "
            f"{runtime['name']} {runtime['version']}): p50 {bench['latency_us_p50']:.1f} us, "
            f"p99 {bench['latency_us_p99']:.1f} us, mean {bench['latency_us_mean']:.1f} us"
        )
        if "preprocess_us_p50" in bench:
            lines.append(
                f"decode + preprocess over {bench['preprocess_pictures']} picture(s): "
                f"p50 {bench['preprocess_us_p50'] / 1000:.1f} ms, p99 {bench['preprocess_us_p99'] / 1000:.1f} ms"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Entry point: parse flags, run, print. Returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    config = parse_config(argv)
    try:
        outcome = run(config)
    except (ModelError, RuntimeNotAvailable, CameraUnavailable) as err:
        print(f"error: {err}", file=stderr)
        return EXIT_USAGE
    for message in outcome.errors:
        print(f"error: {message}", file=stderr)
    if config.json:
        json.dump(outcome.document, stdout)
        stdout.write("\n")
    else:
        text = format_text(outcome.document)
        if text:
            print(text, file=stdout)
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
