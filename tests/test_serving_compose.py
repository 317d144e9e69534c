"""serving/compose.yaml as Docker Compose itself resolves it (`compose config`), with no
Docker engine: the deployment file is checked on every machine, not only where the
docker-marked test (test_serving_docker.py) can start TF Serving.

Compose is `docker compose` where that works, else Debian's static build that
`make setup-compose` (part of `make test`) puts in .tools/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from common import contract
from serving import config_files, docker_check
from tests.serving_fixtures import COMPOSE_TOOL, REPO, compose_command

COMPOSE_FILE = REPO / "serving" / "compose.yaml"
SERVICE, GPU_SERVICE = "tfserving", "tfserving-gpu"
# What the compose file reads from the environment (the Makefile's COMPOSE_ENV).
COMPOSE_VARIABLES = ("MODEL_BASE", "REST_PORT", "GRPC_PORT", "BIND_ADDRESS", "TF_SERVING_TAG")
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def resolve():
    command = compose_command()
    if command is None:
        pytest.skip(f"no Docker Compose here: `docker compose` does not work and {COMPOSE_TOOL} is "
                    "missing (`make setup-compose` fetches it on Linux amd64/arm64)")

    def run(*args: str, **env: str) -> dict:
        clean = {k: v for k, v in os.environ.items()
                 if k not in COMPOSE_VARIABLES and not k.startswith("COMPOSE_")}
        done = subprocess.run([*command, "-f", str(COMPOSE_FILE), *args, "config", "--format", "json"],
                              capture_output=True, text=True, timeout=60, env={**clean, **env})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


def _makefile_default(variable: str) -> str:
    match = re.search(rf"^{variable} \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, f"no `{variable} ?=` in the Makefile"
    return match.group(1)


def _check_service(service: dict, models_source: Path, rest_port: str, grpc_port: str,
                   bind_address: str = LOOPBACK) -> None:
    assert service["entrypoint"] == ["tensorflow_model_server"]
    flags = dict(arg[2:].split("=", 1) for arg in service["command"])
    assert (flags["port"], flags["rest_api_port"]) == ("8500", "8501")
    ports = {p["target"]: p["published"] for p in service["ports"]}
    assert ports == {8500: grpc_port, 8501: rest_port}
    assert all(p["protocol"] == "tcp" for p in service["ports"])
    # Published on one host address only: without host_ip Docker listens on every interface.
    assert [p.get("host_ip") for p in service["ports"]] == [bind_address, bind_address]

    mounts = {v["target"]: v for v in service["volumes"]}
    assert all(v["type"] == "bind" and v.get("read_only") for v in mounts.values()), mounts
    assert Path(mounts["/models"]["source"]) == models_source
    # Every file a flag names is mounted from the file the local server reads too.
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        mount = mounts[flags[flag]]
        assert Path(mount["source"]).parent == REPO / "serving" and Path(mount["source"]).is_file(), mount
    assert flags["enable_batching"] == "true"
    assert flags["allow_version_labels_for_unavailable_models"] == "true"
    # The model config's base paths lie under the models mount.
    specs = config_files.read_model_config(Path(mounts[flags["model_config_file"]]["source"]), models_source)
    assert [s.name for s in specs] == [contract.MODEL_NAME]
    assert all(Path(s.base_path).parent == models_source for s in specs)
    # The health check asks the REST port inside the container about our model.
    check = " ".join(service["healthcheck"]["test"])
    assert "/dev/tcp/127.0.0.1/8501" in check and f"/v1/models/{contract.MODEL_NAME}" in check


def test_compose_defaults_serve_artifacts_on_the_standard_ports_of_this_machine_only(resolve):
    config = resolve()
    assert set(config["services"]) == {SERVICE}  # the GPU service only with its profile
    service = config["services"][SERVICE]
    _check_service(service, REPO / "artifacts" / "serving", "8501", "8500", bind_address=LOOPBACK)
    # The Makefile passes the same default, and the local server binds it too.
    assert _makefile_default("BIND_ADDRESS") == LOOPBACK
    assert re.search(r"^serve-local:.*\n\t.*--host \$\(BIND_ADDRESS\)", (REPO / "Makefile").read_text(), re.M)

    tag = service["image"].removeprefix("tensorflow/serving:")
    assert service["image"] == f"tensorflow/serving:{tag}"
    assert tag == _makefile_default("TF_SERVING_TAG")
    # An older server fails on the SavedModel with "Op type not registered".
    assert docker_check.version_tuple(tag) >= docker_check.version_tuple(metadata.version("tensorflow"))


def test_compose_follows_the_makefile_variables(resolve, tmp_path):
    config = resolve(MODEL_BASE=str(tmp_path), REST_PORT="18501", GRPC_PORT="18500", TF_SERVING_TAG="2.99.0")
    service = config["services"][SERVICE]
    _check_service(service, tmp_path, "18501", "18500")
    assert service["image"] == "tensorflow/serving:2.99.0"


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.7", "::1"])
def test_bind_address_exposes_the_ports_where_asked(resolve, address):
    config = resolve("--profile", "gpu", BIND_ADDRESS=address)
    for service in (SERVICE, GPU_SERVICE):
        _check_service(config["services"][service], REPO / "artifacts" / "serving", "8501", "8500",
                       bind_address=address)


def test_compose_gpu_profile_reserves_an_nvidia_gpu(resolve):
    config = resolve("--profile", "gpu")
    assert set(config["services"]) == {SERVICE, GPU_SERVICE}
    cpu, gpu = config["services"][SERVICE], config["services"][GPU_SERVICE]
    assert gpu["image"] == cpu["image"] + "-gpu"
    _check_service(gpu, REPO / "artifacts" / "serving", "8501", "8500")
    assert gpu["command"] == cpu["command"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"], d["count"]) for d in devices] == [("nvidia", ["gpu"], 1)]
    assert "deploy" not in cpu


def test_makefile_starts_the_services_compose_defines():
    makefile = (REPO / "Makefile").read_text()
    started = set(re.findall(r"\bup (tfserving[\w-]*)", makefile))
    assert started == {SERVICE, GPU_SERVICE}
    assert f'"up", "-d", "{SERVICE}"' in (REPO / "tests" / "test_serving_docker.py").read_text()


def _fetch_compose_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("fetch_compose", str(REPO / ".ci" / "fetch-compose"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _deb(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_fetch_compose_reads_the_binary_out_of_a_deb_and_names_what_is_wrong():
    import io
    import tarfile

    fetch = _fetch_compose_module()

    def data_tar(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    good = _deb({"debian-binary": b"2.0\n", "control.tar.xz": data_tar({}),
                 "data.tar.xz": data_tar({fetch.MEMBER: b"\x7fELF compose"})})
    assert fetch.compose_binary(good) == b"\x7fELF compose"
    with pytest.raises(fetch.FetchError, match="not a .deb"):
        fetch.compose_binary(b"<html>404</html>")
    with pytest.raises(fetch.FetchError, match="no data.tar"):
        fetch.compose_binary(_deb({"debian-binary": b"2.0\n"}))
    with pytest.raises(fetch.FetchError, match="holds no ./usr/libexec"):
        fetch.compose_binary(_deb({"data.tar.xz": data_tar({"./usr/bin/other": b"x"})}))
