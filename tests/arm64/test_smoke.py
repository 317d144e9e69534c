"""The pi-smoke driver's own logic: bundle checks, the CLI's JSON, the arm64-vs-x86 verdict.

No emulation here (see test_emulation.py and `make pi-smoke`); these run in milliseconds.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import configlib
from model import idx
from pi import smoke
from pi.smoke import SmokeConfig, SmokeError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def make_bundle(path: Path, files: dict[str, bytes]) -> Path:
    """A tar.gz holding `files` (name -> content), like pi/bundle.py's output."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def without(suffix: str) -> dict[str, bytes]:
    return {k: v for k, v in complete_bundle_files().items() if not k.endswith("/" + suffix)}


def complete_bundle_files(top: str = "mnist-pi") -> dict[str, bytes]:
    files = {f"{top}/{name}": b"x" for name in smoke.BUNDLE_REQUIRED if name != "samples"}
    files[f"{top}/samples/7-sample.png"] = b"png"
    files[f"{top}/samples/0-other.png"] = b"png"
    return files


# --- the bundle -------------------------------------------------------------------------------
def test_unpack_complete_bundle_and_list_its_samples(tmp_path):
    bundle = make_bundle(tmp_path / "b.tar.gz", complete_bundle_files())
    root = smoke.unpack_bundle(bundle, tmp_path / "work")
    assert root == tmp_path / "work" / "mnist-pi"
    assert (root / "mobile" / "classify.py").is_file()
    assert smoke.list_samples(root) == ["samples/0-other.png", "samples/7-sample.png"]


@pytest.mark.parametrize(
    "files, message",
    [
        ({**complete_bundle_files(), "other/x": b""}, "one top folder mnist-pi/"),
        (without("README.md"), "lacks README.md"),
        (without("requirements.txt"), "lacks requirements.txt"),
        ({**complete_bundle_files(), "mnist-pi/../../evil": b""}, "cannot unpack"),
    ],
)
def test_bad_bundles_are_refused_by_name(tmp_path, files, message):
    bundle = make_bundle(tmp_path / "b.tar.gz", files)
    with pytest.raises(SmokeError, match=message):
        smoke.unpack_bundle(bundle, tmp_path / "work")
    assert not (tmp_path / "evil").exists()


def test_missing_or_corrupt_bundle(tmp_path):
    with pytest.raises(SmokeError, match="make pi-bundle"):
        smoke.unpack_bundle(tmp_path / "absent.tar.gz", tmp_path / "work")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(SmokeError, match="cannot unpack"):
        smoke.unpack_bundle(tmp_path / "junk.tar.gz", tmp_path / "work")


def test_sample_without_its_digit_in_the_name_is_refused(tmp_path):
    files = {**complete_bundle_files(), "mnist-pi/samples/seven.png": b"png"}
    root = smoke.unpack_bundle(make_bundle(tmp_path / "b.tar.gz", files), tmp_path / "work")
    with pytest.raises(SmokeError, match="seven.png"):
        smoke.list_samples(root)


def test_written_digits_are_the_test_split_with_their_labels(tmp_path):
    names = smoke.write_digits(tmp_path, DATA_DIR, 25)
    split = idx.load_split(DATA_DIR, "test")
    assert len(names) == 25
    for i, name in enumerate(names):
        assert smoke.true_digit(name) == split.labels[i]
        with Image.open(tmp_path / name) as picture:
            assert picture.mode == "L" and picture.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(picture), split.images[i])


def test_asking_for_more_digits_than_the_data_holds(tmp_path):
    with pytest.raises(SmokeError, match="holds 1000 test digits"):
        smoke.write_digits(tmp_path, DATA_DIR, 1001)


# --- the CLI's JSON ---------------------------------------------------------------------------
def cli_json(results: dict[str, int | str], runtime="ai-edge-litert", **extra) -> str:
    entries = [
        {"file": f, "error": v} if isinstance(v, str)
        else {"file": f, "digit": v, "label": str(v), "probability": 0.9, "top": []}
        for f, v in results.items()
    ]  # fmt: skip
    payload = {"model": "mnist.tflite", "runtime": {"name": runtime, "version": "2.3.0"},
               "threads": 1, "results": entries, **extra}  # fmt: skip
    return json.dumps(payload)


def test_parse_cli_output_keys_results_by_the_pictures_given():
    pictures = ["samples/7-a.png", "pi-smoke-digits/2-t10k-00001.png"]
    stdout = cli_json({"./samples/7-a.png": 7, pictures[1]: "bad PNG"})
    out = smoke.parse_cli_output(stdout, pictures)
    assert out["results"]["samples/7-a.png"]["digit"] == 7
    assert out["results"][pictures[1]]["error"] == "bad PNG"
    assert out["runtime"]["name"] == "ai-edge-litert" and out["benchmark"] is None


@pytest.mark.parametrize(
    "stdout, message",
    [
        ("INFO: Created TensorFlow Lite XNNPACK delegate\n{}", "not one JSON object"),
        (cli_json({"a.png": 1}), "missing \\['b.png'\\]"),
        (cli_json({"a.png": 1, "b.png": 2, "c.png": 3}), "extra \\['c.png'\\]"),
        (json.dumps({"results": []}), "runtime name/version"),
    ],
)
def test_parse_cli_output_refuses_what_breaks_the_interface(stdout, message):
    with pytest.raises(SmokeError, match=message):
        smoke.parse_cli_output(stdout, ["a.png", "b.png"])


def test_classify_args_follow_the_documented_cli():
    args = smoke.classify_args("tflite-runtime", ["samples/1-a.png"], threads=2, benchmark_runs=50)
    assert args == ["-m", "mobile.classify", "--model", "mnist.tflite", "--threads", "2",
                    "--runtime", "tflite-runtime", "--json", "--benchmark", "50",
                    "samples/1-a.png"]  # fmt: skip


# --- the verdict ------------------------------------------------------------------------------
SAMPLES = ["samples/3-a.png", "samples/5-b.png"]
DIGITS = ["d/1-0.png", "d/2-1.png", "d/3-2.png", "d/4-3.png"]


def results(digits: list[int | str]) -> dict[str, dict]:
    """Results for SAMPLES + DIGITS, in that order, from predicted digits (str = error)."""
    pictures = [*SAMPLES, *DIGITS]
    return smoke.parse_cli_output(cli_json(dict(zip(pictures, digits))), pictures)["results"]


def test_identical_predictions_pass():
    x86 = results([3, 5, 1, 2, 3, 9])
    metrics, failures = smoke.compare(results([3, 5, 1, 2, 3, 9]), x86, SAMPLES, DIGITS, 0.5)
    assert failures == []
    assert metrics["agreement_with_x86"] == 1.0 and metrics["disagreements"] == []
    assert metrics["accuracy_digits"] == 0.75 and metrics["accuracy_samples"] == 1.0
    assert metrics["max_abs_top_probability_diff"] == 0.0


def test_a_flip_that_changes_accuracy_fails():
    metrics, failures = smoke.compare(
        results([3, 5, 1, 2, 8, 9]), results([3, 5, 1, 2, 3, 9]), SAMPLES, DIGITS, 0.0
    )
    assert metrics["agreement_with_x86"] == pytest.approx(5 / 6)
    assert metrics["disagreements"] == [{"file": "d/3-2.png", "arm64": 8, "x86": 3}]
    assert len(failures) == 1 and "differ from x86" in failures[0]


def test_a_flip_between_two_wrong_answers_keeps_accuracy_and_passes():
    metrics, failures = smoke.compare(
        results([3, 5, 1, 2, 3, 7]), results([3, 5, 1, 2, 3, 9]), SAMPLES, DIGITS, 0.0
    )
    assert failures == []
    assert metrics["agreement_with_x86"] < 1.0
    assert metrics["accuracy_digits"] == metrics["x86_accuracy_digits"]


@pytest.mark.parametrize(
    "arm, min_accuracy, message",
    [
        ([3, 5, 1, "cannot decode", 3, 4], 0.0, "1 picture\\(s\\) not classified"),
        ([3, 6, 1, 2, 3, 4], 0.0, "sample\\(s\\) misclassified"),
        ([3, 5, 1, 2, 3, 4], 1.01, "< --min-accuracy"),
    ],
)
def test_each_failed_check_is_named(arm, min_accuracy, message):
    x86 = results(arm)  # same on both sides: only the check under test can fail
    _metrics, failures = smoke.compare(results(arm), x86, SAMPLES, DIGITS, min_accuracy)
    assert any(re.search(message, f) for f in failures), failures


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["--targets", "tensorflow@bookworm"],
        ["--targets", "ai-edge-litert@bullseye"],
        ["--targets", "ai-edge-litert"],
        ["--targets", "ai-edge-litert@trixie,ai-edge-litert@trixie"],
        ["--digits", "0"],
        ["--no-such-flag", "1"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        configlib.parse_config(SmokeConfig, argv)
    assert exit_.value.code == 2


def test_targets_flag_parses_into_pairs():
    config = configlib.parse_config(
        SmokeConfig, ["--targets", "tflite-runtime@bookworm,ai-edge-litert@trixie"]
    )
    assert config.targets == ("tflite-runtime@bookworm", "ai-edge-litert@trixie")
