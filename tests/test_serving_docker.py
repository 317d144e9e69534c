"""The same end-to-end check against the real TF Serving container (serving/compose.yaml).

Runs only where a Docker engine answers (`docker info`) and Docker Compose v2 is here (the
plugin, or .tools/docker-compose from `make setup-compose`); skips with that reason
elsewhere. It checks the image's TensorFlow first (serving/docker_check.py),
starts the CPU service on free ports over a copy of the exported model, and compares REST
and gRPC answers (raw pixels and b64 PNGs) with the SavedModel's own outputs.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid

import numpy as np
import pytest
import requests

from common import contract
from tests.serving_fixtures import (
    PROBABILITY_ATOL, REPO, compose_command, png_bytes, saved_model_bytes_outputs, saved_model_outputs,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = os.environ.get("TF_SERVING_TAG", "2.21.0")


def _docker_problem() -> str | None:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        return f"docker is not usable here ({err})"
    if info.returncode != 0:
        return "no Docker engine answers (`docker info` failed: " + (info.stderr.strip().splitlines() or ["?"])[-1] + ")"
    if compose_command() is None:
        return "no Docker Compose v2: neither the docker compose plugin nor .tools/docker-compose (make setup-compose)"
    return None


@pytest.fixture(scope="session")
def docker_ready():
    """Skips (with the reason) before any expensive fixture runs."""
    problem = _docker_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def container(docker_ready, exported, tmp_path_factory):
    from serving import docker_check
    from serving.process import free_port

    root = tmp_path_factory.mktemp("docker") / "models"
    import shutil

    shutil.copytree(exported.serving_base, root, symlinks=True)
    check = docker_check.check(docker_check.DockerCheckConfig(image=f"tensorflow/serving:{TAG}", models_root=root))
    assert check == 0, "the image cannot load this model (see the message above)"
    rest, grpc_port = free_port(), free_port()
    project = f"mnist-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MODEL_BASE": str(root), "REST_PORT": str(rest), "GRPC_PORT": str(grpc_port),
           "TF_SERVING_TAG": TAG}
    compose = [*compose_command(), "-p", project, "-f", str(REPO / "serving" / "compose.yaml")]
    try:  # `down` even when `up` fails half-way or times out: the container must not outlive the test
        subprocess.run([*compose, "up", "-d", "tfserving"], check=True, env=env, timeout=900)
        url = f"http://127.0.0.1:{rest}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                status = requests.get(f"{url}/v1/models/mnist", timeout=5).json()
                if any(s["state"] == "AVAILABLE" for s in status.get("model_version_status", [])):
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        else:
            logs = subprocess.run([*compose, "logs"], capture_output=True, text=True, env=env).stdout
            pytest.fail(f"TF Serving did not serve the model within 300 s:\n{logs[-3000:]}")
        yield url, f"127.0.0.1:{grpc_port}", root
    finally:
        subprocess.run([*compose, "down"], env=env, timeout=300)


def test_tf_serving_container_matches_the_saved_model(container, fixture_mnist):
    from serving.client import RestClient
    from serving.grpc_client import GrpcClient

    url, target, root = container
    images = fixture_mnist.test.images[:32]
    pictures = [png_bytes(im if i % 2 == 0 else 255 - im) for i, im in enumerate(images[:16])]
    expected = saved_model_outputs(root / contract.MODEL_NAME / "1", images)
    expected_bytes = saved_model_bytes_outputs(root / contract.MODEL_NAME / "1", pictures)
    with RestClient(url) as rest, GrpcClient(target) as grpc_client:
        for client in (rest, grpc_client):
            pixels = client.predict(images)
            np.testing.assert_array_equal(pixels.digits, expected["digit"])
            np.testing.assert_allclose(pixels.probabilities, expected["probabilities"], atol=PROBABILITY_ATOL)
            encoded = client.predict_encoded(pictures)
            np.testing.assert_array_equal(encoded.digits, expected_bytes["digit"])
            np.testing.assert_allclose(encoded.probabilities, expected_bytes["probabilities"], atol=PROBABILITY_ATOL)
        # The raw b64 request, exactly as documented for TF Serving.
        body = {"signature_name": "serving_bytes", "instances": [{"b64": base64.b64encode(pictures[0]).decode()}]}
        answer = requests.post(f"{url}/v1/models/mnist:predict", json=body, timeout=30).json()
        assert answer["predictions"][0]["digit"] == int(expected_bytes["digit"][0])
        assert rest.status() == grpc_client.status()
