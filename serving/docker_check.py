"""Check a tensorflow/serving image before `make serve-docker` starts it.

    python -m serving.docker_check --image tensorflow/serving:2.21.0 --models-root artifacts/serving

A server whose TensorFlow is older than the one that wrote the SavedModel fails to load it
("Op type not registered ..."), so this reads the image's own versions
(`tensorflow_model_server --version` run inside it: "TensorFlow ModelServer: ..." and
"TensorFlow Library: ...") and the newest published version's `tensorflow_version`
(saved_model.pb's meta_info_def), and exits 1 with an explanation when the image is older.
Exit 0 when the image will do; 2 for bad flags; 3 when Docker cannot run the image.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common import configlib, contract
from common.configlib import field
from common.versions import version_tuple

MIN_TENSORFLOW = "2.21.0"  # the TensorFlow this kit trains and exports with


@dataclass(frozen=True)
class DockerCheckConfig:
    """Check that a TF Serving image can load this kit's SavedModels."""

    image: str = field("tensorflow/serving:2.21.0", "image to check (pulled if absent)")
    models_root: Path = field(Path("artifacts/serving"), "folder with <model>/<version>/ SavedModels")
    model_name: str = field(contract.MODEL_NAME, "model whose newest version sets the minimum")
    timeout: float = field(600.0, "seconds allowed for pulling and running the image")


def parse_server_versions(output: str) -> tuple[str, str]:
    """(ModelServer version, TensorFlow Library version) from `--version` output."""
    server = re.search(r"TensorFlow ModelServer:\s*(\S+)", output)
    library = re.search(r"TensorFlow Library:\s*(\S+)", output)
    if not server or not library:
        raise ValueError(f"unexpected `tensorflow_model_server --version` output: {output.strip()[:300]!r}")
    return server.group(1), library.group(1)


def image_versions(image: str, timeout: float = 600.0) -> tuple[str, str]:
    """Run the image's tensorflow_model_server --version; (server, TensorFlow) versions."""
    cmd = ["docker", "run", "--rm", "--entrypoint", "tensorflow_model_server", image, "--version"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise RuntimeError("the docker command is not installed") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return parse_server_versions(proc.stdout + proc.stderr)


def model_tensorflow_version(models_root: Path, model_name: str) -> tuple[int | None, str | None]:
    """(newest version number, the TensorFlow version recorded in its saved_model.pb)."""
    from common.versions import numeric_versions

    versions = numeric_versions(Path(models_root) / model_name)
    if not versions:
        return None, None
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    pb = Path(models_root) / model_name / str(versions[-1]) / "saved_model.pb"
    saved.ParseFromString(pb.read_bytes())
    recorded = [m.meta_info_def.tensorflow_version for m in saved.meta_graphs if m.meta_info_def.tensorflow_version]
    return versions[-1], (recorded[0] if recorded else None)


def check(config: DockerCheckConfig, log=print) -> int:
    try:
        server, library = image_versions(config.image, config.timeout)
    except RuntimeError as err:
        log(f"error: cannot check {config.image}: {err}")
        return 3
    version, model_tf = model_tensorflow_version(config.models_root, config.model_name)
    needed = max(version_tuple(MIN_TENSORFLOW), version_tuple(model_tf)) if model_tf else version_tuple(MIN_TENSORFLOW)
    needed_text = ".".join(map(str, needed))
    source = (f"version {version} of {config.model_name} was written by TensorFlow {model_tf}"
              if model_tf else f"this kit exports with TensorFlow {MIN_TENSORFLOW}")
    if version_tuple(library) < needed:
        log(f"error: {config.image} runs TensorFlow {library} (ModelServer {server}), but {source}: "
            f"it would fail to load it (\"Op type not registered\"). Use a tag built on TensorFlow "
            f">= {needed_text} (TF_SERVING_TAG=...), or make serve-local.")
        return 1
    log(f"{config.image}: ModelServer {server}, TensorFlow {library} >= {needed_text} ({source}): ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(DockerCheckConfig, argv, prog="python -m serving.docker_check")
    return check(config)


if __name__ == "__main__":
    sys.exit(main())
