"""The MLP's interface, the training config and its flags (the GPU check: tests/test_gpu.py)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from common import configlib, contract
from model.train import TrainConfig

from .conftest import REPO


# --- the network ---------------------------------------------------------------------------

def expected_parameters(hidden, batch_norm=True):
    """Dense kernels (+ biases without BN) + BN's gamma/beta/mean/variance + the output layer."""
    total, fan_in = 0, 28 * 28
    for units in hidden:
        total += fan_in * units + (4 * units if batch_norm else units)
        fan_in = units
    return total + fan_in * 10 + 10


def test_default_model_interface_and_parameter_count():
    from model.network import build_mlp

    config = TrainConfig()
    model = build_mlp(config.hidden_units, config.dropout, config.input_dropout, config.batch_norm)
    (inp,), (out,) = model.inputs, model.outputs
    assert inp.name == contract.KERAS_INPUT_NAME and inp.dtype == "uint8" and tuple(inp.shape) == (None, 28, 28)
    assert model.output_names == [contract.OUTPUT_PROBABILITIES]
    assert out.dtype == "float32" and tuple(out.shape) == (None, 10)
    assert model.count_params() == expected_parameters(config.hidden_units)
    # No convolutions: it is an MLP.
    assert not [layer for layer in model.layers if "conv" in layer.__class__.__name__.lower()]
    # int8 weights of the default model stay under 1 MB (+ a few KB of flatbuffer).
    assert model.count_params() < 950_000


def test_normalisation_lives_inside_the_model():
    from model.network import build_mlp

    model = build_mlp((16,), dropout=0.0, batch_norm=False, seed=0)
    rescale = model.get_layer("rescale")
    out = rescale(np.full((1, 28, 28), 255, dtype=np.uint8))
    np.testing.assert_allclose(np.asarray(out), 1.0)
    probs = model.predict(np.zeros((3, 28, 28), np.uint8), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_bad_widths_are_rejected():
    from model.network import build_mlp

    with pytest.raises(ValueError, match="hidden_units"):
        build_mlp((128, 0))


# --- flags ---------------------------------------------------------------------------------

def test_flags_override_fields_with_types():
    config = configlib.parse_config(
        TrainConfig,
        ["--epochs", "3", "--seed", "2", "--learning-rate", "0.01", "--hidden-units", "512,128",
         "--data-dir", str(REPO / "tests" / "data"), "--no-augment", "--strategy", "mirrored"],
    )
    assert config.epochs == 3 and config.seed == 2 and config.learning_rate == 0.01
    assert config.hidden_units == (512, 128) and config.augment is False
    assert config.strategy == "mirrored" and config.data_dir == REPO / "tests" / "data"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epoch", "3"], "unrecognized arguments: --epoch"),  # no abbreviations
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--epochs", "three"], "argument --epochs: expected int, got 'three'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--strategy", "tpu"], "is not one of none, mirrored, multiworker"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
        # NaN passes every range check written as a comparison (nan <= 0 is False): these
        # were accepted, and NaN cannot be saved in config.json as JSON.
        (["--learning-rate", "nan"], "argument --learning-rate: expected a finite number, got 'nan'"),
        (["--cluster-timeout", "inf"], "argument --cluster-timeout: expected a finite number, got 'inf'"),
        (["--max-rotation=-Infinity"], "argument --max-rotation: expected a finite number, got '-Infinity'"),
    ],
)
def test_bad_flags_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configlib.parse_config(TrainConfig, argv, prog="python -m model.train")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_json_roundtrip(tmp_path):
    config = configlib.parse_config(TrainConfig, ["--hidden-units", "64,32", "--seed", "9"])
    configlib.save_config(config, tmp_path / "config.json")
    assert configlib.load_config(TrainConfig, tmp_path / "config.json") == config
    data = json.loads((tmp_path / "config.json").read_text())
    data["surprise"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(configlib.ConfigError, match="unknown keys"):
        configlib.load_config(TrainConfig, tmp_path / "config.json")


def test_make_passes_args_through():
    out = subprocess.run(
        ["make", "-n", "train", "ARGS=--seed 2 --epochs 3", "DATA_DIR=/data/mnist", "REQUIRE_GPU=1"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    train_line = next(line for line in out.splitlines() if "-m model.train" in line)
    assert "--data-dir /data/mnist" in train_line and "--require-gpu" in train_line
    assert "--seed 2 --epochs 3 --run-record " in train_line
    assert "-m export --run " in out  # make train ends by exporting


@pytest.mark.parametrize("chief", [True, False])
def test_make_train_exports_the_run_it_trained_on_the_chief_only(tmp_path, chief):
    """make train exported artifacts/runs/latest whatever the training did: with
    ARGS="--out /shared/runs" (the README's multi-worker command) it published an older run
    as the new version, and every worker of a multi-worker run exported it. Now the export
    gets the run model.train records, and a worker that records none does not export. Run
    with a stand-in for python that records each call (no training here: tests/test_train.py
    trains)."""
    calls, run = tmp_path / "calls.txt", tmp_path / "elsewhere" / "20260101-000000-seed1"
    shim = tmp_path / "python"
    shim.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$2" = model.train ]; then\n'
        '  while [ $# -gt 0 ]; do [ "$1" = --run-record ] && record=$2; shift; done\n'
        + (f'  mkdir -p "$(dirname "$record")"; echo {run} > "$record"\n'  # as model.train does
           if chief else '  rm -f "$record"\n')
        + "fi\n")
    shim.chmod(0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "-o", "setup-tflite-runtime", "train", f"PY={shim}",
         f"ARGS=--out {run.parent} --epochs 1", "EXPORT_ARGS=--no-tflite"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("-m model.train ") and f"--out {run.parent} --epochs 1" in lines[0]
    if chief:
        assert lines[1:] == [f"-m export --run {run} --no-tflite"]
    else:
        assert lines[1:] == [] and "not the chief worker: the chief exports the run" in done.stdout
    record = lines[0].split("--run-record ")[1].split()[0]  # as the shell expanded it
    assert ".train-run-$" not in record and not (REPO / record).exists(), "the record is left behind"


@pytest.mark.parametrize("chief", [True, False])
def test_the_run_record_names_the_chiefs_finished_run(tmp_path, monkeypatch, chief):
    from model import train

    run_dir = tmp_path / "runs" / "r1"
    result = train.RunResult(run_dir=run_dir, metrics={"test_accuracy": 0.9, "test_loss": 0.3,
                                                       "epochs_run": 1, "train_seconds": 1.0} if chief else {})
    monkeypatch.setattr(train, "train_and_evaluate", lambda config: result)
    record = tmp_path / "record" / "run.txt"
    record.parent.mkdir()
    record.write_text("/a/stale/run\n")  # a previous make's: never exported again
    assert train.main(["--run-record", str(record)]) == 0
    if chief:
        assert record.read_text() == f"{run_dir.resolve()}\n"
    else:
        assert not record.exists()


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    makefile = (REPO / "Makefile").read_text()
    import re

    targets = re.findall(r"^([a-zA-Z0-9_-]+):.*## ", makefile, flags=re.M)
    assert {"setup", "train", "test", "gpu-check", "export", "bench-train"} <= set(targets)
    for target in targets:
        assert target in out
