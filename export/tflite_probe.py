"""Load and run TFLite files with one runtime, in whatever Python that runtime lives in.

    <python> export/tflite_probe.py --images images.npy model1.tflite model2.tflite ...

Prints one JSON object: {"runtime": {"name", "version"}, "numpy": version, "models":
{path: {"ok": true, "digits": [...], "latency_us_p50": .., "latency_us_p99": ..} or
{"ok": false, "error": "..."}}}. Latency: one image, one thread, --latency-runs runs.

The export runs it with `.venv-tflite-runtime/bin/python` (tflite-runtime 2.14.0 and numpy 1.x,
the only runtime 32-bit Raspberry Pi OS can install) to learn which variants load there. It is
deliberately standalone: stdlib + numpy + the interpreter, nothing from this project, and
Python 3.8+ syntax, so it runs in any runtime environment.
"""

import argparse
import json
import sys


def load_interpreter_class(preferred):
    """(Interpreter class, runtime name, version) for `preferred` or the first available."""
    order = [preferred] if preferred != "auto" else ["tflite-runtime", "ai-edge-litert"]
    errors = []
    for name in order:
        try:
            if name == "tflite-runtime":
                import tflite_runtime
                from tflite_runtime.interpreter import Interpreter

                return Interpreter, name, getattr(tflite_runtime, "__version__", "?")
            if name == "ai-edge-litert":
                import ai_edge_litert
                from ai_edge_litert.interpreter import Interpreter

                return Interpreter, name, getattr(ai_edge_litert, "__version__", "?")
        except ImportError as err:
            errors.append(f"{name}: {err}")
    raise SystemExit("no TFLite runtime importable: " + "; ".join(errors))


def run_model(interpreter_cls, path, images, latency_runs):
    import time

    import numpy as np

    interpreter = interpreter_cls(model_path=path, num_threads=1)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], [len(images), 28, 28])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    scores = interpreter.get_tensor(out["index"])
    result = {"ok": True, "digits": np.argmax(scores, axis=1).astype(int).tolist()}
    if latency_runs > 0:
        interpreter.resize_tensor_input(inp["index"], [1, 28, 28])
        interpreter.allocate_tensors()
        one = images[:1].astype(inp["dtype"])
        for _ in range(min(20, latency_runs)):
            interpreter.set_tensor(inp["index"], one)
            interpreter.invoke()
        times = []
        for _ in range(latency_runs):
            start = time.perf_counter()
            interpreter.set_tensor(inp["index"], one)
            interpreter.invoke()
            interpreter.get_tensor(out["index"])
            times.append(time.perf_counter() - start)
        times = np.array(times) * 1e6
        result["latency_us_p50"] = round(float(np.percentile(times, 50)), 2)
        result["latency_us_p99"] = round(float(np.percentile(times, 99)), 2)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run TFLite files with one runtime.")
    parser.add_argument("--images", required=True, help=".npy file, uint8 [N, 28, 28]")
    parser.add_argument("--runtime", default="auto", choices=["auto", "tflite-runtime", "ai-edge-litert"])
    parser.add_argument("--latency-runs", type=int, default=0, help="single-image runs timed per model")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args(argv)

    import numpy as np

    interpreter_cls, name, version = load_interpreter_class(args.runtime)
    images = np.load(args.images)
    result = {"runtime": {"name": name, "version": version}, "numpy": np.__version__, "models": {}}
    for path in args.models:
        try:
            result["models"][path] = run_model(interpreter_cls, path, images, args.latency_runs)
        except Exception as err:  # report every failure, keep probing the other files
            result["models"][path] = {"ok": False, "error": f"{type(err).__name__}: {err}".strip()}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
