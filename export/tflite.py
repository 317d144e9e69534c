"""TFLite files for edge devices: four variants, each evaluated, checked in both Pi runtimes.

Variants (all take raw uint8 pixels [N, 28, 28] and return probabilities [N, 10]):

    float32  plain conversion
    float16  weights stored as float16 (half the size; computed in float32 on CPUs)
    dynamic  dynamic-range: int8 weights, float activations. Dense layers use per-tensor
             scales: TF 2.21's per-channel variant emits FULLY_CONNECTED version 12, which
             tflite-runtime 2.14.0 (32-bit Pi OS) cannot load.
    int8     full-integer: int8 weights and activations, calibrated on training images (never
             test images); input stays raw uint8, output is uint8 with its own scale/zero point

Each variant is evaluated with the LiteRT interpreter (ai-edge-litert) on the whole test set:
accuracy, agreement with the Keras model's digits, size, and single-image latency with one
thread. `tflite_probe.py` then loads every file under tflite-runtime 2.14.0 (its own venv,
numpy < 2) to record which runtimes each variant works in. The recommended model is copied
to mnist.tflite with labels.txt beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common import configlib, contract
from mobile.runtime import Classifier, latency_stats

VARIANTS = ("float32", "float16", "dynamic", "int8")
RECOMMENDED_FILE = contract.MOBILE_MODEL_FILE
# int8 is recommended when it stays this close (absolute) to float32 and loads everywhere.
INT8_MAX_ACCURACY_DROP = 0.003
# Parity between a float TFLite file and Keras: same maths, different kernels.
FLOAT_PARITY_MAX_ABS_DIFF = 1e-4


class TFLiteError(RuntimeError):
    """Conversion or validation failed; the message names the variant."""


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def _static_flatten_chain(model):
    """`model` as a function whose flatten reshapes to a constant [-1, features].

    Keras' Flatten computes its target shape from tf.shape(x) at run time (SHAPE,
    STRIDED_SLICE, PACK ops in the TFLite file). Such dynamic shapes make tflite-runtime
    2.14 re-prepare every later op on each invoke and keep XNNPACK from taking the graph, which
    roughly doubles the per-image latency of the float32 and dynamic-range files. Only for a
    single-input chain of layers (our MLP); anything else is called as it is.
    """
    import keras
    import tensorflow as tf

    layers = model.layers[1:]  # after the InputLayer
    is_chain = len(model.inputs) == 1 and len(model.outputs) == 1 and all(
        len(layer._inbound_nodes) == 1 for layer in layers  # noqa: SLF001 - Keras graph walk
    )
    if not is_chain:
        return lambda image: model(image, training=False)

    def call(image):
        x = image
        for layer in layers:
            if isinstance(layer, keras.layers.Flatten):
                features = int(np.prod(x.shape[1:]))
                x = tf.reshape(x, [-1, features])
            else:
                x = layer(x, training=False)
        return x

    return call


def write_conversion_saved_model(model, directory: Path) -> Path:
    """A single-signature SavedModel (image -> probabilities) for the TFLite converter.

    The converter freezes variables only when converting from a SavedModel; the serving
    export's second output (`digit`, an int64 ArgMax) is left out: the device takes argmax.
    The flatten becomes a constant-shape reshape (see _static_flatten_chain).
    """
    from export.serving_graph import pixels_archive

    forward = _static_flatten_chain(model)

    def serve(image):
        return {contract.OUTPUT_PROBABILITIES: forward(image)}

    archive = pixels_archive(model, serve)
    archive.write_out(str(directory), verbose=False)
    return directory


def convert(saved_model_dir: Path, variant: str, calibration_images: np.ndarray | None = None) -> bytes:
    """Convert the conversion SavedModel into one TFLite variant; returns the flatbuffer."""
    import tensorflow as tf

    if variant not in VARIANTS:
        raise TFLiteError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[contract.SIGNATURE_PIXELS]
    )
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # Per-tensor weight scales for Dense layers keep FULLY_CONNECTED at an op version that
        # tflite-runtime 2.14.0 knows (per-channel gives version 12: "Didn't find op for
        # builtin opcode 'FULLY_CONNECTED' version '12'").
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    elif variant == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise TFLiteError("int8 conversion needs calibration images (a sample of training images)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative_dataset():
            for image in calibration_images:
                yield {contract.INPUT_PIXELS: image[None]}  # uint8 [1, 28, 28]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # raw pixels, as every other form takes
        converter.inference_output_type = tf.uint8  # dequantized by the reader's scale/zp
    try:
        with warnings.catch_warnings():
            # The int8 calibrator uses tf.lite.Interpreter, which warns about its own deprecation.
            warnings.simplefilter("ignore", UserWarning)
            return converter.convert()
    except Exception as err:
        if configlib.write_failure(err) is not None:
            raise  # a full disk is not a conversion problem: export_tflite names the file
        raise TFLiteError(f"{variant}: conversion failed: {err}") from err


# --------------------------------------------------------------------------------------------
# Running a TFLite file (ai-edge-litert, the maintained runtime)
# --------------------------------------------------------------------------------------------

class LiteModel(Classifier):
    """A TFLite file under ai-edge-litert, driven by the Pi's own Classifier (mobile.runtime):
    raw uint8 pixels in, float probabilities out, the input/output dtypes and quantization
    read from the file, so every variant is driven the same way, and the export measures
    exactly the code that runs on the device. Adds what the export report needs."""

    def __init__(self, path: Path, num_threads: int = 1):
        super().__init__(Path(path), threads=num_threads, runtime="ai-edge-litert")
        self.path = self.model_path

    def latency_us(self, image: np.ndarray, runs: int, warmup: int = 100) -> dict[str, float]:
        """Single-image latency of the interpreter alone, in microseconds
        (Classifier.time_invocations): {"latency_us_p50", "latency_us_p99", "latency_us_mean"}."""
        seconds = self.time_invocations(image, runs, warmup)
        return {f"latency_us_{k}": round(v, 2) for k, v in latency_stats(seconds, 1e6).items()}

    def describe(self) -> dict[str, Any]:
        def tensor(d):
            scale, zero_point = d["quantization"]
            return {"dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape_signature"]],
                    "scale": float(scale), "zero_point": int(zero_point)}

        return {"input": tensor(self.input_details), "output": tensor(self.output_details)}


# --------------------------------------------------------------------------------------------
# Other runtimes
# --------------------------------------------------------------------------------------------

PROBE_SCRIPT = Path(__file__).with_name("tflite_probe.py")


def probe_runtime(
    python: Path, models: Sequence[Path], images: np.ndarray, latency_runs: int = 0, timeout: float = 600
) -> dict[str, Any]:
    """Run tflite_probe.py with another interpreter (e.g. tflite-runtime's venv).

    Returns its JSON, or {"error": ...} when that Python or runtime is unavailable.
    """
    python = Path(python)
    if not python.exists():
        return {"error": f"{python} not found (make setup-tflite-runtime creates it)"}
    with tempfile.TemporaryDirectory() as scratch:
        npy = Path(scratch) / "images.npy"
        with configlib.naming_file(npy):
            np.save(npy, images)
        proc = subprocess.run(
            [str(python), str(PROBE_SCRIPT), "--images", str(npy), "--latency-runs", str(latency_runs),
             *map(str, models)],
            capture_output=True, text=True, timeout=timeout,
        )
    if proc.returncode != 0:
        return {"error": f"probe failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def choose_recommended(variants: list[dict[str, Any]]) -> str:
    """int8 where its accuracy is within 0.3 points of float32 and it loads in both runtimes;
    else the most accurate variant that loads in both; else float32."""
    by_name = {v["name"]: v for v in variants}
    both = {"ai-edge-litert", "tflite-runtime"}
    int8, float32 = by_name.get("int8"), by_name.get("float32")
    if (
        int8 and float32 and both <= set(int8["runtimes"])
        and float32["accuracy"] - int8["accuracy"] <= INT8_MAX_ACCURACY_DROP
    ):
        return "int8"
    portable = [v for v in variants if both <= set(v["runtimes"])]
    if portable:
        return max(portable, key=lambda v: (v["accuracy"], -v["size_bytes"]))["name"]
    return "float32"


def write_report_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# TFLite variants",
        "",
        f"Run: `{report['run']}`  ",
        f"Keras model accuracy on {report['test_images']} test images: **{report['keras_accuracy']:.4f}**  ",
        f"Recommended: **{report['recommended']}** (copied to `{RECOMMENDED_FILE}`)",
        "",
        "| variant | size (bytes) | accuracy | agreement with Keras | latency p50 (us) | latency p99 (us) "
        "| tflite-runtime p50 (us) | runtimes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {v['size_bytes']:,} | {v['accuracy']:.4f} | {v['agreement']:.4f} | "
            f"{v['latency_us_p50']:.1f} | {v['latency_us_p99']:.1f} | "
            f"{_fmt(v.get('tflite_runtime_latency_us_p50'))} | {', '.join(v['runtimes']) or 'none'} |"
        )
    failures = [(v["name"], rt, err) for v in report["variants"] for rt, err in v.get("runtime_errors", {}).items()]
    if failures:
        lines += ["", "Runtime failures:", ""]
        lines += [f"- {name} in {rt}: {err}" for name, rt, err in failures]
    lines += [
        "",
        "Latency: one image, one thread, on the export machine: ai-edge-litert "
        f"({report['latency_runs']} runs) and tflite-runtime 2.14.0 ({max(1, report['latency_runs'] // 4)} runs).",
        "tflite-runtime 2.14 does not hand this int8 graph to XNNPACK; its own int8 kernels take",
        "milliseconds per image on x86 where ai-edge-litert takes microseconds. Its ARM kernels are",
        "faster: under arm64 emulation (make pi-smoke) int8 took ~3x ai-edge-litert's time, not",
        "~100x. On a 32-bit Pi, time it with `python3 -m mobile.classify --benchmark 1000`; if it",
        "is too slow there, ship dynamic.tflite (make pi-bundle PI_MODEL=artifacts/mobile/dynamic.tflite).",
        "",
    ]
    with configlib.naming_file(path):
        path.write_text("\n".join(lines), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_size_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["name"] for v in report["variants"]]
    sizes = [v["size_bytes"] / 1024 for v in report["variants"]]
    accs = [100 * v["accuracy"] for v in report["variants"]]
    fig, (ax_size, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax_size.bar(names, sizes, color="#4c72b0")
    ax_size.bar_label(bars, fmt="%.0f KiB")
    ax_size.set_title("file size (KiB)")
    bars = ax_acc.bar(names, accs, color="#55a868")
    ax_acc.bar_label(bars, fmt="%.2f%%")
    ax_acc.axhline(100 * report["keras_accuracy"], color="grey", linestyle=":", label="Keras")
    ax_acc.set_ylim(min(accs + [100 * report["keras_accuracy"]]) - 1, 100)
    ax_acc.set_title("test accuracy (%)")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    try:
        with configlib.naming_file(path):
            fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# The whole TFLite export
# --------------------------------------------------------------------------------------------

@dataclass
class TFLiteResult:
    directory: Path
    report: dict[str, Any]


def export_tflite(
    model,
    out_dir: Path,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    calibration_images: np.ndarray,
    run_name: str,
    tflite_runtime_python: Path | None,
    latency_runs: int = 2000,
    variants: Sequence[str] = VARIANTS,
    before_rename: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> TFLiteResult:
    """Convert, evaluate and report every variant into `out_dir` (a new folder).

    Everything is built in a temporary folder beside it (`.<name>.tmp-<pid>`, with the
    conversion SavedModel inside) and renamed at the end, so `out_dir` appears complete or
    not at all. Temporary folders that killed exports left beside it are removed first.

    Args:
      model: the trained keras.Model.
      out_dir: folder to create (must not exist); holds <variant>.tflite, mnist.tflite,
        labels.txt, report.json, report.md, size_accuracy.png.
      test_images, test_labels: the whole test set (uint8 [N, 28, 28], int [N]).
      calibration_images: uint8 [M, 28, 28] training images for int8 calibration.
      tflite_runtime_python: the Python of tflite-runtime's venv (None: not checked).
      before_rename: called with the temporary folder just before the rename (to add files).
    Raises TFLiteError; a failed file operation (a full disk, a quota, a read-only folder)
    becomes one whose one line names the file and the cause.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise TFLiteError(f"{out_dir} already exists; TFLite builds are never overwritten")
    start = time.perf_counter()
    keras_probs = model.predict(test_images, batch_size=1024, verbose=0)
    keras_digits = keras_probs.argmax(axis=1)
    keras_accuracy = float((keras_digits == test_labels).mean())

    tmp = build_tmp_path(out_dir, os.getpid())
    try:
        remove_stale_builds(out_dir.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        with configlib.naming_file(tmp):
            tmp.mkdir(parents=True)
        # In the temporary folder, not in /tmp: what a killed export leaves is found and removed.
        conversion_dir = write_conversion_saved_model(model, tmp / CONVERSION_DIR)
        for variant in variants:
            flatbuffer = convert(conversion_dir, variant, calibration_images)
            with configlib.naming_file(tmp / f"{variant}.tflite"):
                (tmp / f"{variant}.tflite").write_bytes(flatbuffer)
        shutil.rmtree(conversion_dir)
        log(f"Converted {len(variants)} TFLite variants in {time.perf_counter() - start:.1f} s")

        records = []
        for variant in variants:
            path = tmp / f"{variant}.tflite"
            lite = LiteModel(path, num_threads=1)
            probs = lite.predict(test_images)
            digits = probs.argmax(axis=1)
            record = {
                "name": variant,
                "path": f"{variant}.tflite",
                "size_bytes": path.stat().st_size,
                "accuracy": float((digits == test_labels).mean()),
                "agreement": float((digits == keras_digits).mean()),
                "max_abs_diff_vs_keras": float(np.max(np.abs(probs - keras_probs))),
                **lite.latency_us(test_images[0], runs=latency_runs),
                "tensors": lite.describe(),
                "runtimes": ["ai-edge-litert"],
                "runtime_errors": {},
            }
            records.append(record)

        # tflite-runtime 2.14.0: load and run every file on a sample, in its own environment.
        sample = test_images[:1000]
        if tflite_runtime_python is not None:
            probe = probe_runtime(
                tflite_runtime_python, [tmp / f"{v}.tflite" for v in variants], sample,
                latency_runs=max(1, latency_runs // 4),
            )
            for record in records:
                if "error" in probe:
                    record["runtime_errors"]["tflite-runtime"] = f"not checked: {probe['error']}"
                    continue
                result = probe["models"][str(tmp / record["path"])]
                if result["ok"]:
                    lite_digits = LiteModel(tmp / record["path"]).predict(sample).argmax(axis=1)
                    agreement = float((np.asarray(result["digits"]) == lite_digits).mean())
                    record["tflite_runtime_agreement"] = agreement
                    record["tflite_runtime_latency_us_p50"] = result.get("latency_us_p50")
                    record["tflite_runtime_latency_us_p99"] = result.get("latency_us_p99")
                    record["runtimes"].append("tflite-runtime")
                else:
                    record["runtime_errors"]["tflite-runtime"] = result["error"]
            runtime_version = probe.get("runtime", {}).get("version")
        else:
            runtime_version = None

        report = {
            "run": run_name,
            "keras_accuracy": keras_accuracy,
            "test_images": int(len(test_images)),
            "calibration_images": int(len(calibration_images)),
            "latency_runs": latency_runs,
            "runtimes_checked": {
                "ai-edge-litert": _package_version("ai-edge-litert"),
                "tflite-runtime": runtime_version,
            },
            "variants": records,
        }
        report["recommended"] = choose_recommended(records)
        with configlib.naming_file(tmp / RECOMMENDED_FILE):
            shutil.copyfile(tmp / f"{report['recommended']}.tflite", tmp / RECOMMENDED_FILE)
        with configlib.naming_file(tmp / contract.LABELS_FILE):
            (tmp / contract.LABELS_FILE).write_text("\n".join(contract.LABELS) + "\n", encoding="utf-8")
        report["seconds"] = round(time.perf_counter() - start, 1)
        configlib.write_json_atomic(tmp / contract.MOBILE_REPORT_FILE, report)
        write_report_markdown(report, tmp / "report.md")
        plot_size_accuracy(report, tmp / "size_accuracy.png")
        if before_rename is not None:
            before_rename(tmp)
        with configlib.naming_file(out_dir):
            os.rename(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = configlib.write_failure(err)
        if failure is not None and not isinstance(err, TFLiteError):
            raise TFLiteError(f"writing the TFLite build {out_dir} failed: {failure}; no TFLite build was made") from err
        raise
    return TFLiteResult(out_dir, report)


TMP_INFIX = configlib.TMP_INFIX  # `.<build>.tmp-<pid>`: a build being written
CONVERSION_DIR = ".conversion-saved-model"  # inside it, removed before the rename


def build_tmp_path(out_dir: Path, pid: int) -> Path:
    """Where process `pid` writes the build `out_dir` until it is complete."""
    return out_dir.with_name(f".{out_dir.name}{TMP_INFIX}{pid}")


def remove_stale_builds(builds: Path) -> list[Path]:
    """Remove the temporary build folders of exports that were killed (their pid is gone)."""
    return configlib.remove_leftovers(builds, r"\..+" + re.escape(TMP_INFIX) + r"(?P<pid>\d+)")


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def point_link_at(link: Path, target: Path) -> None:
    """configlib.point_link_at, failing with TFLiteError."""
    configlib.point_link_at(link, target, error=TFLiteError)
