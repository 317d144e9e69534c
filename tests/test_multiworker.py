"""--strategy multiworker for real: worker processes on free localhost ports, CPU only, trained
on the fixture (tests/data) with a small model so that each case takes seconds.

- two workers train one model; the chief's run folder is complete, the other worker leaves
  nothing behind, and both saw the same (global) epoch metrics;
- kill -9 of a worker once the chief has started epoch 2; the chief stops with exit status 75
  and the same command on both resumes after epoch 1 and finishes with the same model as two
  workers never interrupted (distortions on: each worker's pipeline is keyed by its seed and
  the epoch);
- bad TF_CONFIG (malformed, a task the cluster lacks, unset), a cluster or settings that differ
  between workers, a worker that never comes: exit status 2 with a message, not a hang.

Plus `distributed.shard`, the data each worker reads. Every process a test starts is killed
when the test ends, pass or fail (`Workers` below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import contract
from model import cluster, evaluate
from serving.process import free_port

from .conftest import REPO, python_env
from .test_train import RUN_FILES

EVENT_TIMEOUT_S = 600  # generous: the machine may be loaded; every wait ends on an event


def train_args(out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "model.train", "--strategy", "multiworker",
            "--data-dir", str(REPO / "tests" / "data"), "--validation-size", "500",
            "--epochs", str(epochs), "--patience", str(epochs), "--no-augment",
            "--hidden-units", "64", "--out", str(out), "--verbose", "epoch",
            "--cluster-timeout", "60", *extra]


class Workers:
    """Worker processes of one cluster, each logging to its own file; all killed on exit."""

    def __init__(self, tmp: Path, count: int = 2):
        self.tmp = tmp
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port())
        self.jobs = {"worker": [f"localhost:{p}" for p in sorted(ports)]}
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    def start(self, index: int, args: list[str], tf_config: str | None = None, tag: str = "") -> None:
        """Start worker `index` (its TF_CONFIG from this cluster unless `tf_config` is given)."""
        tmpdir = self.tmp / f"tmp-{index}{tag}"
        tmpdir.mkdir(exist_ok=True)
        env = python_env(PYTHONUNBUFFERED="1", TMPDIR=str(tmpdir),
                         TF_CONFIG=tf_config or cluster.tf_config_for(self.jobs, "worker", index))
        self.logs[index] = self.tmp / f"worker-{index}{tag}.log"
        with open(self.logs[index], "w") as log:
            self.procs[index] = subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT, text=True)

    def output(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def wait_for_line(self, index: int, text: str) -> None:
        """Until worker `index` prints `text` (it must not exit first)."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while text not in self.output(index):
            assert self.procs[index].poll() is None, f"worker {index} exited first:\n{self.output(index)[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} from worker {index}"
            time.sleep(0.1)

    def wait(self, index: int) -> int:
        return self.procs[index].wait(timeout=EVENT_TIMEOUT_S)

    def wait_all(self) -> dict[int, int]:
        return {i: self.wait(i) for i in sorted(self.procs)}

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()  # TensorFlow's collective start-up does not always honour SIGTERM
                proc.wait()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()


@pytest.fixture
def workers(tmp_path):
    with Workers(tmp_path) as group:
        yield group


@pytest.fixture
def reference_workers(workers, tmp_path):
    """A second cluster (its own ports and folder), for runs to compare with."""
    (tmp_path / "reference-workers").mkdir()
    group = Workers(tmp_path / "reference-workers")
    while set(group.jobs["worker"]) & set(workers.jobs["worker"]):  # no port of the first
        group = Workers(tmp_path / "reference-workers")
    with group:
        yield group


def _tail(group: Workers) -> str:
    return "\n".join(f"--- worker {i}\n{group.output(i)[-2500:]}" for i in sorted(group.procs))


@pytest.mark.slow
def test_two_workers_train_one_model_and_only_the_chief_writes(workers, tmp_path):
    out = tmp_path / "runs"
    for index in (0, 1):
        workers.start(index, train_args(out, 2))
    assert workers.wait_all() == {0: 0, 1: 0}, _tail(workers)

    run_dir = (out / "latest").resolve()
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (run_dir / "backup").exists() and not (run_dir / ".unfinished").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([run_dir.name, "latest"])
    # The other worker wrote nowhere that outlives it: not even its temporary folder.
    assert list((tmp_path / "tmp-1").iterdir()) == []

    metrics = json.loads((run_dir / contract.RUN_METRICS_FILE).read_text())
    assert metrics["workers"] == 2 and metrics["replicas"] == 2 and metrics["epochs_run"] == 2
    assert metrics["test_accuracy"] > 0.7  # it learned, through two processes
    assert [r["epoch"] for r in evaluate.read_history(run_dir / "history.csv")] == [0, 1]
    assert "Test accuracy" in workers.output(0)
    assert f"the chief wrote the run folder {run_dir}" in workers.output(1)

    # One model: the epoch metrics are summed over both workers, so both print the same ones.
    def epoch_lines(text: str) -> list[str]:
        return [line.split(" - ", 3)[-1].rsplit(" - epoch_seconds", 1)[0]
                for line in text.splitlines() if "val_accuracy" in line]

    assert len(epoch_lines(workers.output(0))) == 2
    assert epoch_lines(workers.output(0)) == epoch_lines(workers.output(1))


@pytest.mark.slow
def test_kill_one_worker_mid_epoch_and_restart_both_resumes(workers, reference_workers, tmp_path):
    """... and ends with the model of the same two workers never interrupted: each worker's
    pipeline is keyed by (seed + worker index, epoch), distortions included, and every worker
    restores the chief's backup (issue 12)."""
    import keras

    out, reference_out = tmp_path / "runs", tmp_path / "reference"
    epochs = 3
    reference = reference_workers  # the same run, never interrupted, alongside
    for index in (0, 1):
        workers.start(index, train_args(out, epochs, "--augment"))
        reference.start(index, train_args(reference_out, epochs, "--augment"))
    # The chief prints "Epoch 2/3" after its epoch-1 callbacks, the backup among them, ran:
    # epoch 2 is under way.
    workers.wait_for_line(0, f"Epoch 2/{epochs}")
    os.kill(workers.procs[1].pid, signal.SIGKILL)
    assert workers.wait(1) == -signal.SIGKILL
    assert workers.wait(0) == cluster.EXIT_WORKER_LOST, _tail(workers)
    chief_log = workers.output(0)
    assert "lost the cluster during training" in chief_log
    assert "start every worker again with the same command" in chief_log

    run_dir = (out / "latest").resolve()
    assert (run_dir / ".unfinished").exists() and not (run_dir / contract.RUN_METRICS_FILE).exists()
    state = json.loads((run_dir / "backup" / "state.json").read_text())
    assert state["epoch"] == 1 and (run_dir / "backup" / state["weights"]).is_file()

    for index in (0, 1):  # the same command again on both
        workers.start(index, train_args(out, epochs, "--augment"), tag="-again")
    assert workers.wait_all() == {0: 0, 1: 0}, _tail(workers)
    assert reference.wait_all() == {0: 0, 1: 0}, _tail(reference)
    again = workers.output(0)
    assert f"Resuming {run_dir} after epoch 1" in again
    assert "after epoch 1" in workers.output(1)
    assert f"Epoch 2/{epochs}" in again and "Epoch 1/" not in again
    rows = evaluate.read_history(run_dir / "history.csv")
    assert [r["epoch"] for r in rows] == list(range(epochs))  # no duplicated, no missing epoch
    metrics = json.loads((run_dir / contract.RUN_METRICS_FILE).read_text())
    assert metrics["resumed"] is True and metrics["epochs_run"] == epochs and metrics["workers"] == 2
    assert not (run_dir / "backup").exists()

    reference_dir = (reference_out / "latest").resolve()
    resumed = keras.models.load_model(run_dir / contract.RUN_MODEL_FILE)
    uninterrupted = keras.models.load_model(reference_dir / contract.RUN_MODEL_FILE)
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    reference_rows = evaluate.read_history(reference_dir / "history.csv")
    for row, ref in zip(rows, reference_rows, strict=True):
        assert (row["loss"], row["accuracy"]) == (ref["loss"], ref["accuracy"]), row["epoch"]


@pytest.mark.parametrize("tf_config, message", [
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0', "not valid JSON"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 2}}',
     "task index 2 is out of range"),
    ("", "--strategy multiworker needs the TF_CONFIG environment variable, which is unset or empty"),
])
def test_bad_tf_config_exits_2_at_once(tf_config, message, tmp_path):
    env = python_env()
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = tf_config
    proc = subprocess.run(train_args(tmp_path / "runs", 1), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == cluster.EXIT_CLUSTER, proc.stdout + proc.stderr
    assert f"error: TF_CONFIG: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("differs", ["cluster", "settings"])
def test_workers_that_disagree_exit_2(differs, workers, tmp_path):
    out = tmp_path / "runs"
    workers.start(0, train_args(out, 1))
    if differs == "cluster":  # worker 1 believes in a third worker
        bigger = {"worker": [*workers.jobs["worker"], f"localhost:{free_port()}"]}
        workers.start(1, train_args(out, 1), tf_config=cluster.tf_config_for(bigger, "worker", 1))
    else:  # worker 1 was started with other flags
        workers.start(1, train_args(out, 1, "--batch-size", "64"))
    assert workers.wait_all() == {0: 2, 1: 2}, _tail(workers)
    chief = workers.output(0)
    assert "the workers disagree, so they cannot train one model" in chief
    if differs == "cluster":
        assert "cluster: worker 0 has 'worker: localhost:" in chief
    else:
        assert "--batch-size: worker 0 has 128, worker 1 has 64" in chief
    assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.slow
def test_a_worker_that_never_comes_fails_after_the_timeout(workers, tmp_path):
    workers.start(0, train_args(tmp_path / "runs", 1, "--cluster-timeout", "5"))
    assert workers.wait(0) == cluster.EXIT_CLUSTER, _tail(workers)
    text = workers.output(0)
    missing = workers.jobs["worker"][1]
    assert "did not assemble within --cluster-timeout 5 s" in text
    assert f"worker 1 ({missing}) never joined" in text


def test_shards_are_disjoint_equal_and_strided():
    from model import distributed
    from model.data import ArraySplit

    n = 1003
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    split = ArraySplit(images, (np.arange(n) % 10).astype(np.uint8))
    ids = []
    for index in range(3):
        part = distributed.shard(split, index, 3)
        assert len(part) == n // 3  # the same number of steps on every worker
        got = part.images[:, 0, 0].astype(int) + 256 * part.images[:, 0, 1].astype(int)
        assert list(got) == list(range(index, 3 * (n // 3), 3))  # every 3rd image from index
        np.testing.assert_array_equal(part.labels, got % 10)  # labels travel with their images
        ids += list(got)
    assert len(set(ids)) == len(ids) == 3 * (n // 3)  # disjoint: at most count-1 dropped
