"""Helpers for the serving tests (the shared fixtures themselves are in tests/conftest.py).

- `publish_copy`: publish a new version of a model as a copy of an existing one, through
  export.saved_model.publish (temporary folder + atomic rename, as `make export` does).
- `saved_model_outputs` / `saved_model_bytes_outputs`: what the SavedModel itself answers,
  loaded with TensorFlow in this process: the reference every served answer must equal.
- `start_server`: the local server as a subprocess on free ports over a models root.
- `BLOCK_TENSORFLOW`: Python source that makes any import of tensorflow fail, for
  subprocesses that prove a module does not need it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from model import contract

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
    from export.saved_model import publish

    version, _path = publish(Path(model_dir), lambda tmp: shutil.copytree(source_version_dir, tmp))
    return version


def saved_model_outputs(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """serving_default of the SavedModel on uint8 [N, 28, 28], run by TensorFlow here."""
    from export.saved_model import load_signatures, predict_saved_model

    return predict_saved_model(load_signatures(version_dir), images)


def saved_model_bytes_outputs(version_dir: Path, pictures: Sequence[bytes]) -> dict[str, np.ndarray]:
    """serving_bytes of the SavedModel on encoded pictures, run by TensorFlow here."""
    import tensorflow as tf

    from export.saved_model import load_signatures

    fn = load_signatures(version_dir)[contract.SIGNATURE_BYTES]
    out = fn(**{contract.INPUT_BYTES: tf.constant(np.array(list(pictures), dtype=object))})
    return {k: v.numpy() for k, v in out.items()}


def png_bytes(image: np.ndarray) -> bytes:
    from export.saved_model import encode_png

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
    """A started LocalServerProcess (log and state under `workdir`)."""
    from serving.process import LocalServerProcess

    return LocalServerProcess(models_root, workdir / "server.log", args=list(args),
                              state_dir=workdir / "state").start()


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
