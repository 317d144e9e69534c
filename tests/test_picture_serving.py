"""Pictures through the served model: serving_bytes over REST and gRPC, the client CLI's
`predict` and `predict --bytes`, bad pictures and decompression bombs.

The local server runs the exported SavedModel; its preprocessing is the graph's
(export/picture_graph.py), so what holds here holds in TF Serving, which runs the same graph.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from common import contract
from mobile import preprocess as pre
from model import pictures as photos
from tests.conftest import python_env
from tests.serving_fixtures import REPO, error_of, saved_model_bytes_outputs, start_server
from tests.test_picture_parity import BAD, CASES, jpeg_declaring, png_bomb

pytestmark = pytest.mark.slow
# Memory a refused bomb may add to a process (decoding the 12000 x 12000 PNG would take 144 MB
# as grey bytes, 576 MB as RGBA, 2.3 GB as float32 RGBA).
BOMB_RSS_ALLOWANCE = 64 * 2**20


@pytest.fixture(scope="module")
def base(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures") / "models"
    shutil.copytree(exported.serving_base, root, symlinks=True)
    return root


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    work = tmp_path_factory.mktemp("pictures-server")
    server = start_server(base, work, ["--model-config-file", "none"])
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def pictures(fixture_mnist) -> list[tuple[str, bytes]]:
    """(name, bytes): two synthetic pictures of every kind and the shared cases."""
    made = [(f"{kind}-{i}", photo.data) for kind in photos.KINDS
            for i, photo in enumerate(photos.synthesize_kind(kind, fixture_mnist.test.images[:2], seed=3))]
    return made + [(path.name, path.read_bytes()) for path in sorted(CASES.iterdir())[::4]]


def rest_bytes(server, datas: list[bytes]) -> requests.Response:
    body = {"signature_name": contract.SIGNATURE_BYTES,
            "instances": [{"b64": base64.b64encode(d).decode()} for d in datas]}
    return requests.post(f"{server.rest_url}/v1/models/{contract.MODEL_NAME}:predict", json=body, timeout=120)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_rest_and_grpc_give_the_pis_28x28_and_the_savedmodels_digits(server, base, pictures):
    from serving.grpc_client import GrpcClient

    names, datas = zip(*pictures)
    reference = saved_model_bytes_outputs(base / contract.MODEL_NAME / "1", datas)
    pi = np.stack([pre.picture_to_mnist(d) for d in datas])
    np.testing.assert_array_equal(reference[contract.OUTPUT_MNIST_IMAGE], pi)

    response = rest_bytes(server, list(datas))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert set(rows[0]) == {contract.OUTPUT_DIGIT, contract.OUTPUT_PROBABILITIES, contract.OUTPUT_MNIST_IMAGE}
    np.testing.assert_array_equal([r[contract.OUTPUT_MNIST_IMAGE] for r in rows], pi)
    np.testing.assert_array_equal([r[contract.OUTPUT_DIGIT] for r in rows], reference[contract.OUTPUT_DIGIT])

    with GrpcClient(server.grpc_target) as client:
        answer = client.predict_encoded(list(datas))
    np.testing.assert_array_equal(answer.mnist_images, pi)
    np.testing.assert_array_equal(answer.digits, reference[contract.OUTPUT_DIGIT])


@pytest.mark.parametrize("name", ["text", "gif", "png-bomb-30000", "jpeg-bomb", "blank-white", "a-line"])
def test_bad_pictures_get_400_and_invalid_argument_with_the_reason(server, name):
    import grpc

    from serving.client import RequestRejected, RetryPolicy
    from serving.grpc_client import GrpcClient

    data, message = BAD[name]
    response = rest_bytes(server, [data])
    assert response.status_code == 400, response.text
    assert message in error_of(response)
    with GrpcClient(server.grpc_target, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(RequestRejected) as refused:
            client.predict_encoded([data], validate=False)
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT.name
    assert message in refused.value.server_message


def test_a_decompression_bomb_leaves_the_servers_memory_as_it_was(server, pictures):
    """A 17 KB PNG declaring 12000 x 12000 pixels (issue 12) and a JPEG declaring 60000 x
    60000: refused before decoding, the server's resident memory does not grow."""
    normal = [d for name, d in pictures if name.startswith("photo")][:1]
    for _ in range(2):  # the same path, warmed up
        assert rest_bytes(server, normal).status_code == 200
    before = rss_bytes(server.proc.pid)
    for bomb in (png_bomb(12000, 12000), jpeg_declaring(60000, 60000)):
        assert len(bomb) < 64 * 1024
        response = rest_bytes(server, [bomb])
        assert response.status_code == 400 and "picture too large" in error_of(response)
    assert rest_bytes(server, normal).status_code == 200  # and it still answers
    grown = rss_bytes(server.proc.pid) - before
    assert grown < BOMB_RSS_ALLOWANCE, f"the server grew by {grown / 2**20:.0f} MiB"


def run_query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.query", *args], capture_output=True, text=True,
                          cwd=REPO, env=python_env(), timeout=300)


def test_cli_predict_and_predict_bytes_agree_and_report_each_bad_picture(server, pictures, tmp_path):
    files = []
    for name, data in pictures[::2]:
        extension = "jpg" if pre.picture_format(data) == "jpeg" else "png"
        path = tmp_path / (name if "." in name else f"{name}.{extension}")
        path.write_bytes(data)
        files.append(str(path))
    blank = tmp_path / "blank.png"
    blank.write_bytes(BAD["blank-white"][0])
    port = ["--rest-port", str(server.rest_port)]
    on_client = run_query(*port, "--json", "predict", "--save-mnist", str(tmp_path / "client"), *files)
    on_server = run_query(*port, "--json", "predict", "--bytes", "--save-mnist", str(tmp_path / "server"), *files)
    assert on_client.returncode == 0 and on_server.returncode == 0, on_client.stderr + on_server.stderr
    digits = [[row["digit"] for row in json.loads(run.stdout)] for run in (on_client, on_server)]
    assert digits[0] == digits[1] and len(digits[0]) == len(files)
    saved = sorted(p.name for p in (tmp_path / "client").iterdir())
    assert saved == sorted(p.name for p in (tmp_path / "server").iterdir()) and len(saved) == len(files)
    for name in saved:
        assert (tmp_path / "client" / name).read_bytes() == (tmp_path / "server" / name).read_bytes(), name

    # A blank page: refused on the client (exit 3) or by the server (exit 5); the others are
    # still classified, the bad one named on stderr.
    for flags, status in (([], 3), (["--bytes"], 5)):
        done = run_query(*port, "--json", "predict", *flags, files[0], str(blank), files[1])
        assert done.returncode == status, done.stderr
        rows = json.loads(done.stdout)
        assert [r.get("digit") for r in rows] == [digits[0][0], None, digits[0][1]]
        assert "empty picture" in rows[1]["error"] and done.stderr.count(f"{blank}") == 1, done.stderr


def test_the_benchmarks_picture_section_measures_every_kind_and_path(server, fixture_data_dir, tmp_path):
    from serving.bench import BenchConfig, measure_pictures

    config = BenchConfig(data_dir=fixture_data_dir, out=tmp_path / "serve.json", pictures=4, picture_latency_runs=5)
    report = measure_pictures(server, config, log=lambda *_: None)
    assert set(report["kinds"]) == set(photos.KINDS) and report["count_per_kind"] == 4
    for kind, entry in report["kinds"].items():
        assert entry["cli_paths_agree"], kind
        for path in ("rest", "grpc", "cli_predict_bytes"):
            assert entry[path]["same_28x28_as_the_pi"] == "4/4" and entry[path]["refused"] == 0, (kind, path)
    mnist = report["kinds"]["mnist"]  # MNIST PNGs pass through: the raw pixels' accuracy on every path
    for path in ("rest", "grpc", "cli_predict", "cli_predict_bytes"):
        assert mnist[path]["accuracy"] == report["raw_pixels_accuracy"], path
    for path in ("rest", "grpc"):
        latency = report["photo_1mp"][path]
        assert latency["runs"] == 5 and 0 < latency["p50_ms"] <= latency["p99_ms"]
        # The server's own split (its metrics page): the model run is part of its time.
        assert 0 < latency["model_run_mean_ms"] <= latency["server_request_mean_ms"], path
    assert set(report["targets"]) == {"every_kind_and_path_accuracy", "photo_1mp_p50_ms", "mnist_png_gap_points"}
