"""`python -m pi.bundle`: the archive's contents, and the bundle running from a fresh folder.

The bundle is built from the session's exported fixture model, unpacked into an empty folder
and run from there with only a TFLite runtime, numpy and Pillow: with tflite-runtime 2.14 in
.venv-tflite-runtime (numpy 1.26, no TensorFlow, no repo on sys.path), and with ai-edge-litert
from .venv with TensorFlow blocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import mobile
from pi.bundle import BundleConfig, build_bundle
from tests.test_mobile_runtime import BLOCK_TENSORFLOW

REPO = Path(__file__).resolve().parents[1]
TFLITE_RUNTIME_PYTHON = REPO / ".venv-tflite-runtime" / "bin" / "python"


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory, fixture_data_dir) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mnist-pi.tar.gz"
    build_bundle(BundleConfig(model=exported.mobile_dir / "mnist.tflite", out=out, data_dir=fixture_data_dir), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("fresh")
    with tarfile.open(bundle) as tar:
        tar.extractall(target, filter="data")
    assert [p.name for p in target.iterdir()] == ["mnist-pi"]
    return target / "mnist-pi"


def test_archive_holds_exactly_the_interface(bundle, exported):
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        members = tar.getmembers()
    assert all(n == "mnist-pi" or n.startswith("mnist-pi/") for n in names)
    files = {n[len("mnist-pi/"):] for n, m in zip(names, members) if m.isfile()}
    code = {f for f in files if f.startswith("mobile/")}
    assert code == {f"mobile/{m}.py" for m in mobile.SHIPPED_MODULES}  # no synth/bundle/bench
    assert {"mnist.tflite", "labels.txt", "requirements.txt", "requirements-tflite-runtime.txt", "README.md", "SHA256SUMS"} <= files
    samples = sorted(f for f in files if f.startswith("samples/"))
    assert {Path(s).suffix for s in samples} == {".jpg", ".png"}
    assert {Path(s).name[0] for s in samples} == set("0123456789")
    assert all(m.uid == 0 and m.gid == 0 for m in members)


def test_bundle_files_match_their_sources(unpacked, exported):
    assert (unpacked / "mnist.tflite").read_bytes() == (exported.mobile_dir / "mnist.tflite").read_bytes()
    assert (unpacked / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    pins = (unpacked / "requirements.txt").read_text()
    assert "ai-edge-litert==" in pins and "numpy==2." in pins and "pillow==" in pins
    legacy = (unpacked / "requirements-tflite-runtime.txt").read_text()
    assert "tflite-runtime==2.14.0" in legacy and "numpy==1.26.4" in legacy and "pillow==" in legacy
    readme = (unpacked / "README.md").read_text()
    for needed in ("python3 -m venv", "pip install -r", "Bookworm", "Trixie", "3.13", "32-bit", "python3-picamera2"):
        assert needed in readme, needed
    for line in (unpacked / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((unpacked / name).read_bytes()).hexdigest() == digest, name


def _samples(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in (folder / "samples").iterdir())


def _check_samples(stdout: str, runtime: str) -> None:
    document = json.loads(stdout)
    assert document["runtime"]["name"] == runtime
    for result in document["results"]:
        assert result["digit"] == int(Path(result["file"]).name[0]), result


@pytest.mark.skipif(not TFLITE_RUNTIME_PYTHON.exists(), reason="no .venv-tflite-runtime (make setup-tflite-runtime)")
def test_bundle_runs_from_a_fresh_folder_with_tflite_runtime(unpacked):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(TFLITE_RUNTIME_PYTHON), "-c", "import mobile, numpy; print(mobile.__file__, numpy.__version__)"],
        capture_output=True, text=True, cwd=unpacked, env=env, timeout=60,
    )
    module_file, numpy_version = where.stdout.split()
    assert Path(module_file).parent == unpacked / "mobile" and numpy_version.startswith("1.26")
    done = subprocess.run(
        [str(TFLITE_RUNTIME_PYTHON), "-m", "mobile.classify", "--model", "mnist.tflite", "--json", *_samples(unpacked)],
        capture_output=True, text=True, cwd=unpacked, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _check_samples(done.stdout, "tflite-runtime")


def test_bundle_runs_from_a_fresh_folder_with_ai_edge_litert_and_no_tensorflow(unpacked):
    code = BLOCK_TENSORFLOW + (
        "import mobile, sys\n"
        f"assert mobile.__file__.startswith({str(unpacked)!r}), mobile.__file__\n"
        "from mobile.classify import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code, "--model", "mnist.tflite", "--threads", "2", "--json", *_samples(unpacked)],
        capture_output=True, text=True, cwd=unpacked, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _check_samples(done.stdout, "ai-edge-litert")


def test_the_same_inputs_build_the_same_bytes(bundle, exported, fixture_data_dir, tmp_path):
    again = tmp_path / "again.tar.gz"
    build_bundle(BundleConfig(model=exported.mobile_dir / "mnist.tflite", out=again, data_dir=fixture_data_dir), log=lambda *_: None)
    assert again.read_bytes() == bundle.read_bytes()
    assert json.loads((tmp_path / "again.config.json").read_text())["model"].endswith("mnist.tflite")


def test_missing_model_or_labels_say_run_train_and_export_first(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pi.bundle", "--model", str(tmp_path / "mnist.tflite"), "--out", str(tmp_path / "b.tar.gz")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )
    assert done.returncode == 2 and "make train / make export first" in done.stderr
    (tmp_path / "mnist.tflite").write_bytes(b"x")
    done = subprocess.run(
        [sys.executable, "-m", "pi.bundle", "--model", str(tmp_path / "mnist.tflite"), "--out", str(tmp_path / "b.tar.gz")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )
    assert done.returncode == 2 and "labels" in done.stderr and "make train / make export first" in done.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_a_corrupt_model_is_not_bundled(tmp_path, exported):
    (tmp_path / "mnist.tflite").write_bytes(b"\x00" * 64)
    (tmp_path / "labels.txt").write_bytes((exported.mobile_dir / "labels.txt").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pi.bundle", "--model", str(tmp_path / "mnist.tflite"), "--out", str(tmp_path / "b.tar.gz")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )
    assert done.returncode == 1 and "not a TFLite model" in done.stderr
    assert not (tmp_path / "b.tar.gz").exists() and not list(tmp_path.glob(".b.tar.gz*"))
