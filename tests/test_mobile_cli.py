"""`python -m mobile.classify`: output formats, exit statuses, errors, benchmark, camera.

Runs the real CLI in subprocesses against the session's exported int8 model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import idx
from model import pictures as synth

REPO = Path(__file__).resolve().parents[1]


def classify(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "mobile.classify", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported.mobile_dir / "mnist.tflite"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, fixture_data_dir, exported):
    """Photos of four test digits the fixture model gets right, a raw MNIST PNG, and junk."""
    from mobile import preprocess
    from mobile.runtime import Classifier

    folder = tmp_path_factory.mktemp("pictures")
    test = idx.load_split(fixture_data_dir, "test")
    clf = Classifier.load(exported.mobile_dir / "mnist.tflite")
    good = []
    rng = np.random.default_rng(4)
    for i in range(200):
        photo = synth.synthesize_photo(test.images[i], rng)
        try:
            right = clf.predict(preprocess.picture_to_mnist(photo.data)).argmax() == test.labels[i]
        except preprocess.PictureError:
            continue
        if right:
            path = folder / f"{test.labels[i]}-photo{i}.{photo.extension}"
            path.write_bytes(photo.data)
            good.append(path)
        if len(good) == 4:
            break
    mnist = folder / f"{test.labels[0]}-mnist.png"
    Image.fromarray(test.images[0]).save(mnist)
    text = folder / "notes.jpg"
    text.write_text("not a picture")
    blank = folder / "blank.png"
    Image.new("RGB", (90, 60), (240, 235, 220)).save(blank)
    return {"good": good + [mnist], "text": text, "blank": blank}


def test_json_reports_every_picture_and_one_bad_one_does_not_stop_the_others(model, pictures):
    files = [pictures["good"][0], pictures["text"], *pictures["good"][1:], pictures["blank"]]
    done = classify("--model", model, "--json", *files)
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert document["model"] == str(model)
    assert document["runtime"]["name"] == "ai-edge-litert" and document["runtime"]["version"]
    assert document["threads"] == 1 and "benchmark" not in document
    results = document["results"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    for result, path in zip(results, files):
        if path in (pictures["text"], pictures["blank"]):
            assert set(result) == {"file", "error"}
        else:
            assert result["digit"] == int(path.name[0])  # the true digit is the first character
            assert result["label"] == path.name[0]
            assert 0.0 <= result["probability"] <= 1.0
            assert len(result["top"]) == 3 and result["top"][0]["digit"] == result["digit"]
    assert "not an image" in results[1]["error"] and "empty picture" in results[-1]["error"]
    assert f"{pictures['text']}: not an image" in done.stderr
    assert f"{pictures['blank']}: empty picture" in done.stderr


def test_text_output_and_exit_zero_when_all_are_classified(model, pictures):
    done = classify("--model", model, "--top", "2", *pictures["good"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(pictures["good"])
    for line, path in zip(lines, pictures["good"]):
        name, digit, probability, _top, *rest = line.split()
        assert name == str(path) and digit == path.name[0] and probability.endswith("%")
        assert len(rest) == 4  # two (label, probability) pairs


def test_benchmark_reports_latency_percentiles(model, pictures):
    done = classify("--model", model, "--json", "--benchmark", "300", pictures["good"][0])
    assert done.returncode == 0, done.stderr
    bench = json.loads(done.stdout)["benchmark"]
    assert bench["runs"] == 300
    assert 0 < bench["latency_us_p50"] <= bench["latency_us_p99"]
    assert bench["latency_us_mean"] > 0 and bench["preprocess_pictures"] == 1
    text = classify("--model", model, "--benchmark", "50")  # no picture: a blank input
    assert text.returncode == 0, text.stderr
    assert "latency over 50 runs" in text.stdout and "p99" in text.stdout


def test_camera_without_picamera2_says_so(model):
    done = classify("--model", model, "--camera")
    assert done.returncode == 2
    assert "picamera2" in done.stderr and "apt install python3-picamera2" in done.stderr


def test_no_preprocess_is_a_plain_resize(model, pictures, tmp_path):
    mnist = pictures["good"][-1]  # already MNIST form: same answer either way
    with_pre = json.loads(classify("--model", model, "--json", mnist).stdout)["results"][0]
    without = json.loads(classify("--model", model, "--json", "--no-preprocess", mnist).stdout)
    assert without["preprocess"] is False
    assert without["results"][0]["probability"] == pytest.approx(with_pre["probability"])
    # A photo of dark ink on paper, only resized, is not read as its digit most of the time;
    # here: the answer differs from the preprocessed one for at least one of the photos.
    photos = pictures["good"][:4]
    plain = json.loads(classify("--model", model, "--json", "--no-preprocess", *photos).stdout)["results"]
    assert any(r["digit"] != int(p.name[0]) for r, p in zip(plain, photos))


def test_custom_labels_file(model, pictures, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit-{i}\n" for i in range(10)))
    document = json.loads(classify("--model", model, "--labels", names, "--json", pictures["good"][0]).stdout)
    result = document["results"][0]
    assert result["label"] == f"digit-{result['digit']}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 1"),
        (["--top", "0"], "--top must be >= 1"),
        (["--benchmark", "-5"], "--benchmark must be >= 0"),
        (["--runtime", "onnx"], "invalid choice"),
        (["--frobnicate"], "unrecognized arguments"),
        ([], "give at least one PICTURE"),
    ],
)
def test_usage_errors_exit_2(model, pictures, args, message):
    files = [pictures["good"][0]] if args else []
    done = classify("--model", model, *args, *files)
    assert done.returncode == 2 and message in done.stderr
    assert done.stdout == ""


def test_missing_or_corrupt_model_and_labels_exit_2(tmp_path, model, pictures):
    picture = pictures["good"][0]
    done = classify("--model", tmp_path / "none.tflite", "--json", picture)
    assert done.returncode == 2 and "model file not found" in done.stderr and done.stdout == ""
    corrupt = tmp_path / "mnist.tflite"
    corrupt.write_bytes(b"PK\x03\x04" + bytes(200))  # e.g. a zip saved under the wrong name
    (tmp_path / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    done = classify("--model", corrupt, picture)
    assert done.returncode == 2 and "not a TFLite model" in done.stderr
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "mnist.tflite").write_bytes(model.read_bytes())
    done = classify("--model", lonely / "mnist.tflite", picture)
    assert done.returncode == 2 and "labels file not found" in done.stderr


FAKE_PICAMERA2 = '''
"""Stand-in for picamera2 (Pi-only, needs libcamera) with the calls mobile/camera.py makes.
Serves the frame saved in frame.npy beside it, in libcamera's RGB888 layout (B, G, R)."""
from pathlib import Path
import numpy as np

class Picamera2:
    def create_still_configuration(self, main):
        assert main["format"] == "RGB888"
        return {"main": main}
    def configure(self, config):
        self.config = config
    def start(self):
        pass
    def capture_array(self, name="main"):
        rgb = np.load(Path(__file__).with_name("frame.npy"))
        return np.ascontiguousarray(rgb[:, :, ::-1])  # stored B, G, R
    def close(self):
        pass
'''


def test_camera_frame_is_classified_through_picamera2s_api(model, pictures, tmp_path):
    """picamera2 cannot run here (no libcamera, no camera): a stand-in with its API serves a
    photo, to check the capture path (configuration, BGR order, preprocessing, result)."""
    fake = tmp_path / "fake" / "picamera2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_PICAMERA2)
    photo = pictures["good"][0]
    np.save(fake / "frame.npy", np.asarray(Image.open(photo).convert("RGB")))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path / 'fake'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "mobile.classify", "--model", str(model), "--json", "--camera"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["file"] == "camera" and result["digit"] == int(photo.name[0])


# Peak memory a refused decompression bomb may add to the CLI (decoding the 12000 x 12000 PNG
# would take 144 MB as grey bytes; 30000 x 30000, 900 MB).
BOMB_PEAK_RSS_ALLOWANCE = 64 * 2**20

_BOMB_DRIVER = """
import io, json, sys
from mobile import classify

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

model, good, *bombs = sys.argv[1:]
assert classify.main(["--model", model, good], io.StringIO(), io.StringIO()) == 0
before = peak()
out, err = io.StringIO(), io.StringIO()
status = classify.main(["--model", model, "--json", good, *bombs, good], out, err)
print(json.dumps({"status": status, "grown": peak() - before, "document": json.loads(out.getvalue()),
                  "stderr": err.getvalue()}))
"""


def test_decompression_bombs_are_refused_before_decoding_and_memory_stays_bounded(model, pictures, tmp_path):
    """A few-KB PNG declaring 30000 x 30000 (and 12000 x 12000, issue 12) and a JPEG declaring
    60000 x 60000: PictureError from the header, exit 1, the other pictures still reported,
    and the CLI's peak resident memory (VmHWM, the same process before and after) hardly grows."""
    from tests.test_picture_parity import jpeg_declaring, png_bomb

    bombs = {"bomb-30000.png": png_bomb(30000, 30000), "bomb-12000.png": png_bomb(12000, 12000),
             "bomb-60000.jpg": jpeg_declaring(60000, 60000)}
    for name, data in bombs.items():
        assert len(data) < 64 * 1024
        (tmp_path / name).write_bytes(data)
    good = pictures["good"][0]
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_DRIVER, str(model), str(good), *(str(tmp_path / n) for n in bombs)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 1
    results = report["document"]["results"]
    assert results[0]["digit"] == results[-1]["digit"] == int(good.name[0])
    for result, name in zip(results[1:-1], bombs):
        assert set(result) == {"file", "error"} and "picture too large" in result["error"], result
        assert f"{name}: picture too large" in report["stderr"]
    assert report["grown"] < BOMB_PEAK_RSS_ALLOWANCE, f"peak RSS grew by {report['grown'] / 2**20:.0f} MiB"
