"""Helpers for the serving tests (the shared fixtures themselves are in tests/conftest.py).

- `publish_copy`: publish a new version of a model as a copy of an existing one, through
  export.publish.publish (temporary folder + atomic rename, as `make export` does).
- `saved_model_outputs` / `saved_model_bytes_outputs`: what the SavedModel itself answers,
  loaded with TensorFlow in this process: the reference every served answer must equal.
- `start_server` / `running_server`: the local server as a subprocess on free ports over a
  models root (`running_server` is a context manager that stops it whatever happens).
- `export_gate_model` + `RunGate`: a SavedModel whose runs wait for a file, so that a test
  holds a model run open exactly as long as it wants and sees it begin (no sleep, no race).
- `peak_memory` / `reset_peak_memory`: a process's peak resident memory (Linux /proc).
- `BLOCK_TENSORFLOW`: Python source that makes any import of tensorflow fail, for
  subprocesses that prove a module does not need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from common import contract

REPO = Path(__file__).resolve().parents[1]
COMPOSE_TOOL = REPO / ".tools" / "docker-compose"  # the Makefile's COMPOSE_TOOL (make setup-compose)


def compose_command() -> list[str] | None:
    """Docker Compose v2: `docker compose` where it works, else the standalone binary
    `make setup-compose` fetched; None when neither is here."""
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
            return ["docker", "compose"]
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    return [str(COMPOSE_TOOL)] if os.access(COMPOSE_TOOL, os.X_OK) else None

# Tolerance between the served probabilities and the SavedModel's own: the same graph on the
# same machine; batching only changes which rows run together (row-wise ops: exact).
PROBABILITY_ATOL = 1e-6


def publish_copy(model_dir: Path, source_version_dir: Path) -> int:
    """Publish the next version of `model_dir` as a copy of `source_version_dir`."""
    from export.publish import publish

    version, _path = publish(Path(model_dir), lambda tmp: shutil.copytree(source_version_dir, tmp))
    return version


def saved_model_outputs(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """serving_default of the SavedModel on uint8 [N, 28, 28], run by TensorFlow here."""
    from export.verify import load_signatures, predict_saved_model

    return predict_saved_model(load_signatures(version_dir), images)


def saved_model_bytes_outputs(version_dir: Path, pictures: Sequence[bytes]) -> dict[str, np.ndarray]:
    """serving_bytes of the SavedModel on encoded pictures, run by TensorFlow here."""
    import tensorflow as tf

    from export.verify import load_signatures

    fn = load_signatures(version_dir)[contract.SIGNATURE_BYTES]
    out = fn(**{contract.INPUT_BYTES: tf.constant(np.array(list(pictures), dtype=object))})
    return {k: v.numpy() for k, v in out.items()}


def png_bytes(image: np.ndarray) -> bytes:
    from export.warmup import encode_png

    return encode_png(image)


def write_models_config(path: Path, labels: dict[str, int], num_versions: int = 2) -> Path:
    """A models.config like serving/models.config (base path under /models) with these labels."""
    label_text = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in labels.items())
    path.write_text(
        "model_config_list {\n  config {\n"
        f'    name: "{contract.MODEL_NAME}"\n    base_path: "/models/{contract.MODEL_NAME}"\n'
        '    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ latest {{ num_versions: {num_versions} }} }}\n"
        f"{label_text}  }}\n}}\n"
    )
    return path


def start_server(models_root: Path, workdir: Path, args: Sequence[str] = ()):
    """A started LocalServerProcess (log and state under `workdir`). The caller stops it
    (`server.stop()` in a finally, or use `running_server`)."""
    from serving.process import LocalServerProcess

    return LocalServerProcess(models_root, workdir / "server.log", args=list(args),
                              state_dir=workdir / "state").start()


@contextlib.contextmanager
def running_server(models_root: Path, workdir: Path, args: Sequence[str] = ()):
    """`with running_server(...) as server:` a started server, stopped (SIGTERM, then
    SIGKILL if it hangs) when the block ends, pass or fail."""
    server = start_server(models_root, workdir, args)
    try:
        yield server
    finally:
        server.stop()


def wait_for(condition, timeout: float, what: str, every: float = 0.02):
    """Poll `condition()` until it is true (returns its value); AssertionError after
    `timeout` seconds, which only bounds a failure: nothing waits for time to pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------------------------
# A model run that lasts as long as the test wants
# --------------------------------------------------------------------------------------------
GATE_MODEL = "gate"


def export_gate_model(version_dir: Path) -> None:
    """A SavedModel whose serving_default (input `path`, string [N] with N >= 2; output
    `polls`, int64 [N]) creates the file path[0] when its run starts, then waits (checking
    every 10 ms or so, asleep in between) until the file path[1] exists. Its runs last
    exactly as long as a test wants, and show when they have begun (RunGate)."""
    import tensorflow as tf
    # tf.data's test-only sleep: a pause TensorFlow can serialize and cancel.
    from tensorflow.python.data.experimental.ops import testing

    class Gate(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="path")])
        def serve(self, path):
            started = tf.io.write_file(path[0], "")
            with tf.control_dependencies([started]):
                def closed(polls):
                    return tf.equal(tf.size(tf.io.matching_files(path[1])), 0)

                def pause(polls):
                    nap = tf.data.Dataset.range(1).apply(testing.sleep(10_000)).reduce(
                        tf.constant(0, tf.int64), lambda total, x: total + x)
                    return [polls + 1 + nap]

                polls = tf.while_loop(closed, pause, [tf.constant(0, tf.int64)])[0]
            return {"polls": tf.fill(tf.shape(path)[:1], polls)}

    gate = Gate()
    tf.saved_model.save(gate, str(version_dir), signatures={"serving_default": gate.serve})


def gate_models_root(root: Path, mnist_model_dir: Path) -> Path:
    """A models root with mnist (a copy of `mnist_model_dir`) and the gate model, and a
    models.config (`root / "models.config"`) serving both, latest version each."""
    shutil.copytree(mnist_model_dir, root / contract.MODEL_NAME)
    export_gate_model(root / GATE_MODEL / "1")
    (root / "models.config").write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{root / name}" model_platform: "tensorflow" }}\n'
        for name in (contract.MODEL_NAME, GATE_MODEL)) + "}\n")
    return root


class RunGate:
    """The files of one gate-model run: send `paths` as the request's input, then
    `wait_until_running()` (the run has begun and is waiting) and `release()` (it ends)."""

    def __init__(self, folder: Path):
        self.started, self.open = Path(folder) / "run-started", Path(folder) / "run-may-end"

    @property
    def paths(self) -> list[str]:
        return [str(self.started), str(self.open)]

    def wait_until_running(self, timeout: float = 120) -> None:
        wait_for(self.started.exists, timeout, "the model run to start")

    def release(self) -> None:
        self.open.write_text("")


def peak_memory(pid: int) -> int:
    """A process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def reset_peak_memory(pid: int) -> None:
    """Start measuring a process's peak memory afresh (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def error_of(response) -> str:
    """The {"error": ...} message of a REST response, asserting TF Serving's error layout."""
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = json.loads(response.text)
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


BLOCK_TENSORFLOW = """
import sys
class _BlockTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow.") or name.startswith("tensorflow_serving"):
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _BlockTensorFlow())
"""


def python() -> str:
    return sys.executable
