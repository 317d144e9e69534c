"""The Kubernetes manifests, checked offline: every kustomization renders (`kubectl kustomize`,
or `kustomize build`), every rendered object validates against the OpenAPI schemas of pinned
Kubernetes releases (kubernetes-validate, strict: an unknown or misspelt field fails), and the
manifests are tied to the kit:

- TF Serving's image, flags, mounts and ports equal serving/compose.yaml's (read from the
  file, as Compose resolves its defaults), its ConfigMaps hold serving/'s files byte for byte;
- the readiness probe, run for real against the local server, passes only when the model has
  a version AVAILABLE (not on any 200); liveness, startup and Prometheus use monitoring.config's
  path;
- the training Job's pods get TF_CONFIGs that name each other (python -m model.cluster), run
  what `make train` runs (training, then the export of the run it wrote, on the chief only),
  and the image installs the pinned training set.

Kustomize overlays cannot live inside the folder of the kustomization they build on, so the
GPU and model-from-image variants are Components that a user's overlay (outside serving/)
enables; the tests write such overlays in a temporary folder, as the README tells users to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from common import contract
from model import cluster
from serving import config_files
from serving.process import free_port

from .conftest import REPO, python_env

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: make setup")

SERVING = REPO / "serving"
K8S = SERVING / "kubernetes"
# The Kubernetes releases the rendered objects must be valid for: the oldest the manifests
# need (Job podFailurePolicy and the batch.kubernetes.io/controller-uid label are GA there)
# and the newest kubernetes-validate 1.37.0 ships schemas for.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Flags the Deployment adds to compose.yaml's: TensorFlow's thread pools sized to the CPU limit.
K8S_ONLY_FLAGS = {"tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` would send (load restrictor on, as kubectl)."""
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is on PATH: cannot render the kustomizations "
                    "(install kubectl, which includes kustomize)")
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def overlay(tmp_path: Path, *components: str) -> Path:
    """A user's overlay of serving/ with `components` enabled, outside the repository's tree,
    written as the README shows (kustomize wants relative paths)."""
    folder = tmp_path / ("overlay-" + "-".join(components or ("plain",)))
    folder.mkdir()
    base = os.path.relpath(SERVING, folder)
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             f"resources: [{base}]"]
    if components:
        lines.append("components: [" + ", ".join(f"{base}/kubernetes/components/{c}" for c in components) + "]")
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return folder


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def serving_objects() -> list[dict]:
    return render(SERVING)


@pytest.fixture(scope="module")
def training_objects() -> list[dict]:
    return render(K8S / "training")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("overlays")
    return {name: render(overlay(tmp, name)) for name in ("gpu", "model-from-image")}


# --------------------------------------------------------------------------------------------
# compose.yaml as Compose reads it (its ${VAR:-default} resolved to the defaults)
# --------------------------------------------------------------------------------------------

def _defaults(value):
    if isinstance(value, str):
        return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _defaults(yaml.safe_load((SERVING / "compose.yaml").read_text()))["services"]


def flags(args: list[str]) -> dict[str, str]:
    assert all(a.startswith("--") and "=" in a for a in args), args
    return dict(a[2:].split("=", 1) for a in args)


def container(deployment: dict, name: str = "tfserving") -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


# --------------------------------------------------------------------------------------------
# Every kustomization renders and every object is valid Kubernetes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
        version, serving_objects, training_objects, variants):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the dev extra: make setup")
    rendered = {"serving/": serving_objects, "serving/kubernetes/training": training_objects,
                **{f"components/{k}": v for k, v in variants.items()}}
    checked = 0
    for source, objects in rendered.items():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{source}: {obj['kind']} {obj['metadata']['name']} is not valid "
                            f"Kubernetes {version}: {err}")
            checked += 1
    assert checked == sum(map(len, rendered.values())) >= 15


def test_the_kustomizations_hold_the_objects_they_promise(serving_objects, training_objects, variants):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in serving_objects)
    assert [k for k, _ in kinds] == sorted(["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                                            "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "Service"])
    assert sorted(o["kind"] for o in training_objects) == sorted(
        ["Job", "Service", "PersistentVolumeClaim", "PersistentVolumeClaim"])
    # Every claim a pod names is in the same kustomization (apply -k creates it).
    for objects in (serving_objects, training_objects, *variants.values()):
        claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
        for workload in (o for o in objects if o["kind"] in ("Deployment", "Job")):
            for volume in workload["spec"]["template"]["spec"]["volumes"]:
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims


# --------------------------------------------------------------------------------------------
# TF Serving: tied to compose.yaml and to serving/'s files
# --------------------------------------------------------------------------------------------

def test_tfserving_runs_compose_yamls_image_and_flags(serving_objects, compose):
    server = container(one(serving_objects, "Deployment", "tfserving"))
    reference = compose["tfserving"]
    assert server["image"] == reference["image"]
    assert server["command"] == reference["entrypoint"]
    ours, theirs = flags(server["args"]), flags(reference["command"])
    for flag, value in theirs.items():
        assert ours.get(flag) == value, (
            f"compose.yaml passes --{flag}={value}; the Deployment (serving/kubernetes/tfserving/"
            f"deployment.yaml) passes {ours.get(flag)!r}")
    assert set(ours) - set(theirs) == K8S_ONLY_FLAGS
    # The thread pools match the CPU the pod may use.
    cpu_limit = server["resources"]["limits"]["cpu"]
    assert ours["tensorflow_intra_op_parallelism"] == ours["tensorflow_inter_op_parallelism"] == cpu_limit


def test_the_gpu_component_uses_composes_gpu_image_and_one_gpu(variants, compose):
    deployment = one(variants["gpu"], "Deployment", "tfserving")
    server = container(deployment)
    assert server["image"] == compose["tfserving-gpu"]["image"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    reservation = compose["tfserving-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["count"] == server["resources"]["limits"]["nvidia.com/gpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        deployment["spec"]["template"]["spec"]["tolerations"]


def test_config_maps_hold_servings_own_files(serving_objects):
    names = {o["metadata"]["name"]: o for o in serving_objects if o["kind"] == "ConfigMap"}
    files = {}
    for config_map in names.values():
        files.update(config_map["data"])
    for name in ("models.config", "batching_parameters.txt", "monitoring.config"):
        assert files[name] == (SERVING / name).read_text(), f"{name} differs from serving/{name}"
    # models.config keeps its name (edits reach running pods, which re-read it); the files read
    # only at start carry a content hash, so changing them rolls the Deployment out.
    assert "tfserving-models-config" in names
    hashed = [n for n in names if n.startswith("tfserving-config-")]
    assert len(hashed) == 1 and set(names[hashed[0]]["data"]) == {"batching_parameters.txt", "monitoring.config"}


def test_config_and_models_are_mounted_where_the_flags_and_models_config_look(serving_objects, compose):
    deployment = one(serving_objects, "Deployment", "tfserving")
    spec = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    ours = flags(server["args"])
    config_volume = volumes[mounts["/config"]["name"]]
    projected = {s["configMap"]["name"] for s in config_volume["projected"]["sources"]}
    data = {}
    for config_map in serving_objects:
        if config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] in projected:
            data.update(config_map["data"])
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        folder, name = ours[flag].rsplit("/", 1)
        assert folder == "/config" and name in data, flag
    # The same container paths as compose.yaml's read-only binds.
    binds = {v["target"] for v in compose["tfserving"]["volumes"]}
    assert {"/models", *(ours[f] for f in ("model_config_file", "batching_parameters_file",
                                           "monitoring_config_file"))} == binds
    assert mounts["/models"]["readOnly"] is True
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "mnist-models"
    specs = config_files.read_model_config(SERVING / "models.config", Path("/host"), "/models")
    assert [Path(s.base_path) for s in specs] == [Path("/host") / contract.MODEL_NAME]  # under /models


def test_ports_services_and_scaling_point_at_the_served_ports(serving_objects):
    deployment = one(serving_objects, "Deployment", "tfserving")
    server = container(deployment)
    ours = flags(server["args"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": int(ours["port"]), "http": int(ours["rest_api_port"])}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in serving_objects if s["kind"] == "Service"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
    rest, grpc = services["tfserving"], services["tfserving-grpc"]
    rest_port, grpc_port = int(ours["rest_api_port"]), int(ours["port"])
    assert [(p["port"], ports[p["targetPort"]]) for p in rest["spec"]["ports"]] == \
        [(rest_port, rest_port), (grpc_port, grpc_port)]
    # gRPC: headless, so that clients see every pod and balance calls over them.
    assert grpc["spec"]["clusterIP"] == "None"
    assert [(p["port"], ports[p["targetPort"]], p["appProtocol"]) for p in grpc["spec"]["ports"]] == \
        [(grpc_port, grpc_port, "grpc")]
    budget = one(serving_objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    autoscaler = one(serving_objects, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tfserving"}
    assert autoscaler["spec"]["minReplicas"] >= 2 and budget["spec"]["maxUnavailable"] == 1
    # A rollout never lowers capacity: surge first, and only Ready pods count.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_liveness_startup_and_prometheus_use_monitoring_configs_path(serving_objects):
    deployment = one(serving_objects, "Deployment", "tfserving")
    server = container(deployment)
    monitoring = config_files.read_monitoring_config(SERVING / "monitoring.config")
    assert monitoring.prometheus_enabled
    for probe in (server["livenessProbe"], server["startupProbe"]):
        assert probe["httpGet"] == {"path": monitoring.prometheus_path, "port": "http"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == monitoring.prometheus_path
    assert annotations["prometheus.io/port"] == flags(server["args"])["rest_api_port"]


def test_model_from_image_copies_into_a_pod_volume_instead_of_the_claim(variants):
    objects = variants["model-from-image"]
    spec = one(objects, "Deployment", "tfserving")["spec"]["template"]["spec"]
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models == {"name": "models", "emptyDir": {}}
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    copy = spec["initContainers"][0]
    target = next(m["mountPath"] for m in copy["volumeMounts"] if m["name"] == "models")
    assert copy["command"] == ["cp", "-R", f"/models/{contract.MODEL_NAME}", target + "/"]


# --------------------------------------------------------------------------------------------
# The readiness probe, run for real
# --------------------------------------------------------------------------------------------

def _probe_command(serving_objects) -> str:
    server = container(one(serving_objects, "Deployment", "tfserving"))
    command = server["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"]
    rest_port = flags(server["args"])["rest_api_port"]
    script = command[2]
    assert f"/dev/tcp/127.0.0.1/{rest_port}" in script
    assert f"GET /v1/models/{contract.MODEL_NAME} HTTP/1.0" in script
    return script.replace(f"/dev/tcp/127.0.0.1/{rest_port}", "/dev/tcp/127.0.0.1/{port}")


def _run_probe(script: str, port: int) -> int:
    return subprocess.run(["bash", "-c", script.replace("{port}", str(port))],
                          capture_output=True, timeout=30).returncode


@pytest.mark.skipif(shutil.which("bash") is None, reason="the probe runs bash, as in the TF Serving image")
def test_readiness_passes_only_when_the_model_is_available(serving_objects, exported, tmp_path):
    from .serving_fixtures import start_server

    script = _probe_command(serving_objects)

    class LoadingStatus(BaseHTTPRequestHandler):
        """200 on the status URL while the version loads: what TF Serving answers then."""

        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps({"model_version_status": [
                {"version": "1", "state": "LOADING", "status": {"error_code": "OK", "error_message": ""}}]},
                indent=1).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    loading = HTTPServer(("127.0.0.1", 0), LoadingStatus)
    thread = threading.Thread(target=loading.serve_forever, daemon=True)
    thread.start()
    try:
        assert _run_probe(script, loading.server_address[1]) != 0  # 200, but not AVAILABLE
    finally:
        loading.shutdown()
        loading.server_close()
    assert _run_probe(script, free_port()) != 0  # nothing listening
    server = start_server(exported.serving_base, tmp_path)
    try:
        assert _run_probe(script, server.rest_port) == 0  # the model is AVAILABLE
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Training: the Indexed Job, its TF_CONFIGs, its command, its image
# --------------------------------------------------------------------------------------------

def _train_container(training_objects) -> tuple[dict, dict, dict]:
    job = one(training_objects, "Job", "mnist-train")
    pod = job["spec"]["template"]["spec"]
    train = next(c for c in pod["containers"] if c["name"] == "train")
    env = {e["name"]: e.get("value") for e in train["env"]}
    return job, train, env


def test_the_indexed_job_and_its_headless_service_agree(training_objects):
    job, train, env = _train_container(training_objects)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["WORKERS"])
    service = one(training_objects, "Service", "mnist-train")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in train["ports"]}
    assert [(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]] == \
        [(int(env["WORKER_PORT"]), int(env["WORKER_PORT"]))]
    # Retries that cannot help end the Job: bad data or settings, no GPU, the quality gate.
    from export.pipeline import EXIT_GATE_REFUSED
    from model.gpu import EXIT_NO_GPU

    fail = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail[0]["onExitCodes"]["values"] == [1, EXIT_NO_GPU, EXIT_GATE_REFUSED]
    assert cluster.EXIT_WORKER_LOST not in fail[0]["onExitCodes"]["values"]  # that one retries
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_each_pod_gets_a_tf_config_naming_every_pods_dns_name(training_objects):
    job, train, env = _train_container(training_objects)
    script = train["args"][0]
    match = re.search(r'python -m model\.cluster (.+?)\)"', script)
    assert match, script
    workers = int(env["WORKERS"])
    pods = [f"{job['metadata']['name']}-{i}.{job['spec']['template']['spec']['subdomain']}:{env['WORKER_PORT']}"
            for i in range(workers)]
    for index in range(workers):
        args = (match.group(1).replace('"$WORKERS"', env["WORKERS"])
                .replace('"$JOB_COMPLETION_INDEX"', str(index))
                .replace('"$WORKER_PORT"', env["WORKER_PORT"]).replace("'", "").split())
        done = subprocess.run([sys.executable, "-m", "model.cluster", *args], cwd=REPO,
                              env=python_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        spec = cluster.parse_tf_config(done.stdout)
        assert spec.jobs == {"worker": tuple(pods)} and spec.worker_id == index
        assert spec.is_chief == (index == 0)


def _makefile_train_recipe() -> list[str]:
    """The train target's recipe lines (continuation lines joined)."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^train:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "no train: target in the Makefile"
    return [line.strip() for line in recipe.group(1).replace("\\\n\t", " ").splitlines()]


def test_the_pods_run_what_make_train_runs(training_objects, tmp_path):
    """The same programs in the same order as `make train`, and the export gets the run the
    training wrote; run through the pod's own shell script with `python` recorded."""
    recipe = _makefile_train_recipe()
    modules = [re.search(r"-m (\S+)", line).group(1) for line in recipe]
    assert modules == ["model.train", "export"]
    # The run model.train just wrote, as it records it (tests/test_model.py runs the recipe).
    record = re.search(r"--run-record (\S+)", recipe[0]).group(1)
    assert f"cat {record}" in recipe[1] and '--run "$$run"' in recipe[1]

    _job, train, env = _train_container(training_objects)
    assert train["command"] == ["/bin/sh", "-c"]
    data = tmp_path / "data"
    script = train["args"][0].replace("/data/", f"{data}/")
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "calls.txt"
    (shim / "python").write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = model.cluster ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "$*" >> {calls}\n')
    (shim / "python").chmod(0o755)

    def run_pod(index: int) -> list[str]:
        calls.write_text("")
        pod_env = {**python_env(), **{k: v for k, v in env.items() if v is not None},
                   "PATH": f"{shim}:{os.environ['PATH']}", "JOB_COMPLETION_INDEX": str(index),
                   "JOB_UID": "0f1e2d3c", "TRAIN_ARGS": "--epochs 3", "EXPORT_ARGS": "--min-accuracy 0.9"}
        done = subprocess.run(["/bin/sh", "-c", script], cwd=REPO, env=pod_env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return calls.read_text().splitlines()

    run_dir = f"{data}/runs/job-0f1e2d3c"
    chief = run_pod(0)
    assert [re.search(r"-m (\S+)", c).group(1) for c in chief] == modules
    train_call, export_call = chief
    assert "--strategy multiworker" in train_call and train_call.endswith("--epochs 3")
    out = re.search(r"--out (\S+)", train_call).group(1)
    name = re.search(r"--run-name (\S+)", train_call).group(1)
    assert f"{out}/{name}" == run_dir == re.search(r"--run (\S+)", export_call).group(1)
    assert "--serving-base /models" in export_call and export_call.endswith("--min-accuracy 0.9")
    # The model volume TF Serving reads is where the export publishes.
    models_mount = next(m["mountPath"] for m in train["volumeMounts"] if m["name"] == "models")
    assert models_mount == "/models"
    assert [c.split()[1] for c in run_pod(1)] == ["model.train"]  # workers only train
    # A retry after the training finished (the export failed) only exports.
    Path(run_dir).mkdir(parents=True)
    (Path(run_dir) / contract.RUN_METRICS_FILE).write_text("{}")
    assert [c.split()[1] for c in run_pod(0)] == ["export"]
    assert run_pod(1) == []


def test_the_training_image_installs_the_pinned_training_set(training_objects):
    dockerfile = (K8S / "training" / "Dockerfile").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    makefile = (REPO / "Makefile").read_text()
    assert python == re.search(r"^PYTHON \?= \$\(shell command -v python(\d+\.\d+)", makefile, re.M).group(1)
    assert 'pip install -c requirements/constraints.txt ".[train]"' in dockerfile
    for package in ("common", "model", "export", "serving", "mobile"):  # pyproject's packages
        assert f"COPY {package}/ {package}/" in dockerfile
    uid = re.search(r"useradd --uid (\d+)", dockerfile).group(1)
    job, _train, _env = _train_container(training_objects)
    assert str(job["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid
    images = {container(one(training_objects, "Job"), "train")["image"]}
    assert images == {"mnist-kit:0.1.0"}
