"""The MLP's interface, the training config and its flags (the GPU check: tests/test_gpu.py)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from model import configlib, contract
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
    assert train_line.rstrip().endswith("--seed 2 --epochs 3")
    assert "-m export --run artifacts/runs/latest" in out  # make train ends by exporting


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    makefile = (REPO / "Makefile").read_text()
    import re

    targets = re.findall(r"^([a-zA-Z0-9_-]+):.*## ", makefile, flags=re.M)
    assert {"setup", "train", "test", "gpu-check", "export", "bench-train"} <= set(targets)
    for target in targets:
        assert target in out
