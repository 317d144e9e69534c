"""Train the MNIST MLP and evaluate it: `python -m model.train [flags]` (make train).

    python -m model.train --data-dir ../shared/datasets/mnist --seed 2 --epochs 30

`train_and_evaluate(config)` is the library function; `main()` only parses flags. One run:

 1. GPU check (model/gpu.py) before anything touches the device; --require-gpu stops here.
 2. Data: TFDS `mnist` or `--data-dir` IDX files; the last `validation_size` training images
    become the validation set; the test set is read only by the final evaluation.
 3. Fit with a progress bar, cosine learning-rate schedule, early stopping on validation
    accuracy (best weights restored), a backup after every epoch (an interrupted run started
    again with the same flags resumes from its last finished epoch and ends with the same
    model as an uninterrupted run: the data pipeline's randomness is a function of the seed
    and the epoch, and the backup holds everything else), TensorBoard and CSV history.
 4. Calibrate: temperature scaling fitted on the validation split, kept inside the model
    when the validation ECE exceeds 0.02 (`--calibrate`).
 5. Evaluate on the test set; write metrics, plots and the model into the run folder, and point
    `<out>/latest` at it.

With --strategy multiworker one process runs per worker (TF_CONFIG: model/cluster.py); they
train one model with MultiWorkerMirroredStrategy (model/distributed.py), each on its shard of
the data, and only the chief writes the run folder, which must be on storage they all share.

Run folder `<out>/<run-id>/`: model.keras, config.json, gpu_report.json, history.csv,
metrics.json, training_curves.png, confusion_matrix.png, reliability.png, tensorboard/.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field
from model import cluster

EXIT_INTERRUPTED = 130  # like a shell's exit status after Ctrl-C


@dataclass(frozen=True)
class TrainConfig:
    """Train the MNIST MLP and evaluate it on the test set."""

    # --- data -----------------------------------------------------------------------------
    data_dir: Path | None = field(
        None, "folder with the four MNIST IDX files (.gz or not); default: TFDS 'mnist'"
    )
    tfds_dir: Path | None = field(None, "TFDS data folder (default ~/tensorflow_datasets)")
    validation_size: int = field(5000, "training images held out (from the end) for validation", at_least=1)
    # --- model ----------------------------------------------------------------------------
    hidden_units: tuple[int, ...] = field((800, 256), "hidden layer widths, comma-separated")
    dropout: float = field(0.1, "dropout after each hidden layer", at_least=0, below=1)
    input_dropout: float = field(0.0, "dropout on the input pixels", at_least=0, below=1)
    batch_norm: bool = field(True, "BatchNormalization in each hidden layer")
    # --- optimisation ---------------------------------------------------------------------
    epochs: int = field(60, "epochs: the length of the learning-rate schedule", at_least=1)
    batch_size: int = field(128, "global batch size (split across replicas)", at_least=1)
    learning_rate: float = field(2e-3, "peak learning rate (AdamW, warm-up then cosine decay)", above=0)
    warmup_epochs: float = field(1.0, "linear learning-rate warm-up, in epochs", at_least=0)
    weight_decay: float = field(1e-4, "AdamW decoupled weight decay", at_least=0)
    patience: int | None = field(
        None, "early stopping: stop after this many epochs without validation improvement; "
        "default: never stop early (the schedule runs out; the best epoch's weights are kept)",
        at_least=0,
    )
    # --- augmentation (training pipeline only; never at inference) ---------------------------
    augment: bool = field(True, "distort training images (the affine and elastic settings below)")
    max_rotation: float = field(10.0, "augmentation: maximum rotation in degrees", at_least=0)
    max_shift: float = field(2.0, "augmentation: maximum shift in pixels", at_least=0)
    max_scale: float = field(0.1, "augmentation: maximum relative scale change", at_least=0, below=1)
    elastic_alpha: float = field(
        20.0, "elastic distortion scale in pixels (Simard et al., ICDAR 2003; 0 disables it)",
        at_least=0,
    )
    elastic_sigma: float = field(4.0, "elastic distortion smoothness: Gaussian std in pixels", above=0)
    # --- calibration ----------------------------------------------------------------------
    calibrate: Literal["auto", "on", "off"] = field(
        "auto", "temperature scaling fitted on the validation split: auto = when its ECE > 0.02"
    )
    # --- execution ------------------------------------------------------------------------
    seed: int = field(1, "seed for weights, shuffling, dropout and augmentation")
    strategy: Literal["none", "mirrored", "multiworker"] = field(
        "none", "tf.distribute strategy: none, mirrored (all local GPUs) or multiworker (TF_CONFIG)"
    )
    cpu_devices: int = field(
        1, "split the CPU into N logical devices (lets --strategy mirrored run without GPUs)", at_least=1
    )
    cluster_timeout: float = field(
        120.0, "multiworker: seconds to wait for every worker to join (and answer) before failing",
        above=0,
    )
    jit_compile: Literal["auto", "on", "off"] = field(
        "auto", "XLA-compiled training step: auto = on (off under --strategy with several replicas on the CPU)"
    )
    steps_per_execution: int = field(32, "at most this many training steps per tf.function call", at_least=1)
    threads: int = field(0, "threads of the training step (TF intra-op); 0 = one per physical core",
                         at_least=0, bounds_note="0: one per physical core")
    require_gpu: bool = field(False, "exit with status 3 before training when no GPU is usable")
    mixed_precision: bool = field(True, "mixed_float16 where it pays (GPU compute capability >= 7.0)")
    # --- output ---------------------------------------------------------------------------
    out: Path = field(Path("artifacts/runs"), "parent folder of run folders")
    run_name: str | None = field(None, "run folder name (default: <timestamp>-seed<seed>)")
    resume: bool = field(True, "resume the latest run if it was interrupted with the same settings")
    verbose: Literal["auto", "bar", "epoch", "quiet"] = field(
        "auto", "progress: bar (Keras progress bar), epoch (a line per epoch), quiet; auto = bar on a terminal"
    )
    run_record: Path | None = field(
        None, "write the finished run folder's path to this file (the chief's only; other workers "
        "remove it): what make train exports, wherever --out put the run"
    )

    def validate(self) -> None:
        check_bounds(self)  # the bounds declared on the fields above
        if not self.hidden_units or min(self.hidden_units) < 1:
            raise ConfigError(f"--hidden-units must be positive widths, got {self.hidden_units}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"--data-dir {self.data_dir}: no such directory")
        if self.run_name is not None and (
            not self.run_name or "/" in self.run_name or self.run_name in (".", "..", "latest")
        ):
            raise ConfigError(f"--run-name {self.run_name!r} is not a usable folder name")

    def augmentation(self):
        """The training pipeline's distortions (model.data.Augmentation); None without --augment."""
        from model import data

        if not self.augment:
            return None
        return data.Augmentation(
            max_rotation_deg=self.max_rotation, max_shift_px=self.max_shift,
            scale_range=self.max_scale, elastic_alpha=self.elastic_alpha,
            elastic_sigma=self.elastic_sigma,
        )

    def identity(self) -> dict[str, Any]:
        """The settings that define what a run computes (used to decide whether to resume)."""
        data = configlib.to_jsonable(self)
        for key in ("run_name", "resume", "verbose", "require_gpu", "out", "cluster_timeout", "run_record"):
            data.pop(key, None)
        return data


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------

UNFINISHED_MARKER = ".unfinished"  # present from start until metrics.json is written


def _new_run_dir(config: TrainConfig) -> Path:
    out = Path(config.out)
    name = config.run_name or f"{_dt.datetime.now():%Y%m%d-%H%M%S}-seed{config.seed}"
    run_dir = out / name
    suffix = 1
    while run_dir.exists():
        if config.run_name:
            raise ConfigError(f"--run-name {name}: {run_dir} already exists (runs are never overwritten)")
        suffix += 1
        run_dir = out / f"{name}-{suffix}"
    return run_dir


def find_resumable_run(config: TrainConfig) -> Path | None:
    """The run `<out>/latest` points at, if it is unfinished and was started with these settings."""
    if not config.resume:
        return None
    latest = Path(config.out) / "latest"
    if not latest.exists():
        return None
    run_dir = latest.resolve()
    if not (run_dir / UNFINISHED_MARKER).exists():
        return None
    if config.run_name is not None and run_dir.name != config.run_name:
        return None
    try:
        saved_config = configlib.load_config(TrainConfig, run_dir / contract.RUN_CONFIG_FILE)
    except (OSError, ValueError, TypeError):
        return None
    return run_dir if saved_config.identity() == config.identity() else None


def point_latest_at(run_dir: Path) -> None:
    """Atomically make `<out>/latest` a relative symlink to `run_dir` (ConfigError if it cannot)."""
    configlib.point_link_at(run_dir.parent / "latest", run_dir)


# --------------------------------------------------------------------------------------------
# Keras pieces
# --------------------------------------------------------------------------------------------

BACKUP_STATE_FILE = "state.json"  # inside <run>/backup/: written last, names the weights file


def read_backup_state(backup_dir: Path) -> dict[str, Any] | None:
    """The last committed backup's state (see ResumableBackup), or None when there is none."""
    path = Path(backup_dir) / BACKUP_STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # written atomically, so this is not our file
        raise ConfigError(f"{path} is unreadable ({err}); start over with --no-resume") from None
    for key in ("weights", "best_weights"):
        if state.get(key) and not (Path(backup_dir) / state[key]).is_file():
            raise ConfigError(f"{path} names {state[key]}, which is missing (a worker that cannot see "
                              "the run folder?); start over with --no-resume")
    return state


def _callbacks_module():
    import keras
    import numpy as np

    class EpochTimer(keras.callbacks.Callback):
        """Adds to the epoch logs `epoch_seconds` (the whole epoch: training, validation,
        callbacks before it), `epoch_train_seconds` (the training steps alone) and
        `epoch_cpu_seconds` (CPU time of this process in the epoch, all threads: what the
        epoch costs, whatever else the machine is doing)."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._cpu_start = time.process_time()
            self._train_end = None

        def on_test_begin(self, logs=None):
            if self._train_end is None:
                self._train_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                now = time.perf_counter()
                logs["epoch_seconds"] = now - self._start
                logs["epoch_train_seconds"] = (self._train_end or now) - self._start
                logs["epoch_cpu_seconds"] = time.process_time() - self._cpu_start

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose state (best score, its epoch and weights, patience used) can be
        saved and restored, so that it survives an interruption (ResumableBackup does it).

        Plain EarlyStopping starts from scratch after a resume and could restore a worse epoch
        than one it saw before the interruption.
        """

        def get_state(self) -> dict[str, Any]:
            return {"best": None if self.best is None else float(self.best),
                    "best_epoch": int(self.best_epoch), "wait": int(self.wait)}

        def set_state(self, state: dict[str, Any], best_weights) -> None:
            self.best = state["best"]
            self.best_epoch = state["best_epoch"]
            self.wait = state["wait"]
            if best_weights is not None:
                self.best_weights = best_weights

    class ResumableBackup(keras.callbacks.Callback):
        """Everything a resumed run needs to continue exactly as if never interrupted, saved
        after every epoch: the weights and the optimizer's state, the dropout layers' RNG
        states (Keras leaves them out of weight files), early stopping's state and best
        weights, and the history rows so far.

        Replaces keras.callbacks.BackupAndRestore, which writes the weights in place (a kill
        during the write corrupts them, hence its `double_checkpoint` copies), misses the RNG
        states, and makes the epoch wait for h5py's save of the whole model. Here the
        epoch only copies the values (~10 MB of numpy arrays); a thread writes them to a new
        file, syncs it, then commits by atomically replacing `state.json`, which names it. A
        kill at any point leaves the previous commit intact. A write error (an OSError naming
        the file, see configlib.write_failure) is raised at the next epoch's end, at the end
        of training, or by `finish()`.

        Several workers (MultiWorkerMirroredStrategy): every worker restores from the same
        `backup_dir` (the run folder on shared storage), so all start from the same epoch,
        weights, optimizer and RNG states; only the `writer` (the chief) writes, so workers
        never race on a file. The others keep the history rows in memory only.
        """

        def __init__(self, backup_dir: Path, early_stopping: ResumableEarlyStopping, writer: bool = True):
            super().__init__()
            self.backup_dir = Path(backup_dir)
            self.early_stopping = early_stopping
            self.writer = writer
            self.rows: list[dict[str, Any]] = []
            self._writer: threading.Thread | None = None
            self._error: BaseException | None = None
            self._committed: dict[str, Any] = {}

        def _variables(self):
            # Weights, then the optimizer's variables (step count, moments), then the
            # SeedGenerator states: all by position, the same for the same settings.
            model = self.model
            rng = [v for v in model.variables if v.path.endswith("seed_generator_state")]
            return list(model.weights) + list(model.optimizer.variables) + rng

        def on_train_begin(self, logs=None):
            state = read_backup_state(self.backup_dir)
            if state is None:
                return
            optimizer = self.model.optimizer
            if not optimizer.built:
                optimizer.build(self.model.trainable_variables)  # so its variables exist
            variables = self._variables()
            with np.load(self.backup_dir / state["weights"]) as saved:
                values = [saved[f"v{i}"] for i in range(len(saved.files))]
            if [tuple(v.shape) for v in variables] != [a.shape for a in values]:
                raise ConfigError(f"{self.backup_dir}: the backup does not match this model; use --no-resume")
            for variable, value in zip(variables, values):
                variable.assign(value)
            best = None
            if state.get("best_weights"):
                with np.load(self.backup_dir / state["best_weights"]) as saved:
                    best = [saved[f"v{i}"] for i in range(len(saved.files))]
            self.early_stopping.set_state(state["early_stopping"], best)
            self.rows = state["history"]
            self._committed = state

        def on_epoch_end(self, epoch, logs=None):
            start, cpu_start = time.perf_counter(), time.process_time()
            self._wait()
            # A snapshot (the writer's only; reading a variable is local, never a collective).
            values = [np.array(v.numpy()) for v in self._variables()] if self.writer else []
            best = None
            if self.early_stopping.best_weights is not None and self.early_stopping.best_epoch == epoch:
                best = self.early_stopping.best_weights  # a new list each improvement
            if logs is not None:  # the epoch's time includes this backup's share of it
                logs["epoch_backup_seconds"] = time.perf_counter() - start
                logs["epoch_seconds"] = logs.get("epoch_seconds", 0.0) + logs["epoch_backup_seconds"]
                logs["epoch_cpu_seconds"] = logs.get("epoch_cpu_seconds", 0.0) + time.process_time() - cpu_start
            self.rows.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
            if not self.writer:
                return
            state = {
                "epoch": epoch + 1,  # epochs finished
                "weights": f"epoch-{epoch + 1}.npz",
                "best_weights": f"best-epoch-{epoch + 1}.npz" if best is not None else self._committed.get("best_weights"),
                "early_stopping": self.early_stopping.get_state(),
                "history": list(self.rows),
            }
            self._writer = threading.Thread(
                target=self._write, args=(state, values, best), name="backup-writer", daemon=True
            )
            self._writer.start()

        def _write(self, state, values, best) -> None:
            try:
                self.backup_dir.mkdir(parents=True, exist_ok=True)
                _write_synced(self.backup_dir / state["weights"], values)
                if best is not None:
                    _write_synced(self.backup_dir / state["best_weights"], best)
                configlib.write_json_atomic(self.backup_dir / BACKUP_STATE_FILE, state)  # the commit
                previous, self._committed = self._committed, state
                for name in {previous.get("weights"), previous.get("best_weights")} - {
                        state["weights"], state["best_weights"], None}:
                    (self.backup_dir / name).unlink(missing_ok=True)
            except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                self._error = err

        def _wait(self) -> None:
            if self._writer is not None:
                self._writer.join()
                self._writer = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error  # the OSError names the file (configlib.naming_file)

        def on_train_end(self, logs=None):
            self._wait()

        def finish(self) -> None:
            """Let the last epoch's write commit (or fail) before the process goes: fit was
            interrupted (Ctrl-C, a lost worker) and skips on_train_end; the writer thread is a
            daemon. Its error, if any, is left for the exception already under way."""
            if self._writer is not None:
                self._writer.join()
                self._writer = None

    return EpochTimer, ResumableEarlyStopping, ResumableBackup


def _write_synced(path: Path, arrays: Sequence[Any]) -> None:
    """Save arrays as .npz (keys v0, v1, ...) beside `path`, sync it to disk, rename it into place."""
    import numpy as np

    with configlib.naming_file(path):  # a failed write() names no file by itself
        configlib.write_file_atomic(
            path, lambda fh: np.savez(fh, **{f"v{i}": a for i, a in enumerate(arrays)}),
            binary=True, tmp=path.with_name(f".{path.stem}.tmp.npz"),
        )


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite history.csv from the backup's rows, as keras.callbacks.CSVLogger writes it
    (header: epoch, then the sorted log keys), so that its appended rows follow on."""
    import csv
    import io

    keys = sorted({k for row in rows for k in row} - {"epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["epoch", *keys], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"epoch": int(row["epoch"]), **{k: row.get(k, "NA") for k in keys}})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue() if rows else "", encoding="utf-8")
    os.replace(tmp, path)


def _start_workers(config: TrainConfig, spec: cluster.ClusterSpec | None, log):
    """The tf.distribute strategy and this process's `distributed.Workers`.

    With --strategy multiworker (`spec` parsed from TF_CONFIG), the strategy starts under
    --cluster-timeout, and the workers check that they share one cluster, the same settings
    and the same versions (ClusterError otherwise, exit status 2).
    """
    from model import distributed

    if spec is None:
        if os.environ.get(cluster.TF_CONFIG_ENV):
            log(f"Note: TF_CONFIG is set but --strategy is {config.strategy}: training on this "
                "machine alone (pass --strategy multiworker to train with the cluster).")
        strategy = distributed.make_strategy(config.strategy, None, config.cluster_timeout)
        return strategy, distributed.Workers(None, config.cluster_timeout)
    log(f"Joining the cluster as {spec.describe()}; waiting up to {config.cluster_timeout:g} s")
    strategy = distributed.make_strategy("multiworker", spec, config.cluster_timeout)
    workers = distributed.Workers(spec, config.cluster_timeout)
    import keras
    import tensorflow as tf

    # The settings that decide what is computed, flag by flag (the data is compared by its
    # checksums once loaded: its folder may be mounted at different paths).
    settings = {f"--{key.replace('_', '-')}": value for key, value in configlib.to_jsonable(
        config.identity()).items() if key not in ("data_dir", "tfds_dir")}
    workers.agree("start", {
        "cluster": spec.cluster_text,
        "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}",
        **settings,
    })
    return strategy, workers


def _prepare_run_dir(config: TrainConfig, workers) -> tuple[Path, bool]:
    """(run folder, resuming?): the chief resumes `<out>/latest` when it was interrupted with
    these settings, else makes a new folder, and tells the other workers which one. Only the
    chief writes; the others check that they see the same folder (the backup they must restore
    from lives there), so --out must be storage every worker shares at the same path."""
    if workers.is_chief:
        run_dir = find_resumable_run(config)
        resuming = run_dir is not None
        if run_dir is None:
            run_dir = _new_run_dir(config)
            run_dir.mkdir(parents=True)
            (run_dir / UNFINISHED_MARKER).touch()
            configlib.save_config(config, run_dir / contract.RUN_CONFIG_FILE)
            point_latest_at(run_dir)
        workers.broadcast("run_dir", json.dumps([str(run_dir.resolve()), resuming]))
        return run_dir, resuming
    path, resuming = json.loads(workers.broadcast("run_dir"))
    run_dir = Path(path)
    if not (run_dir / contract.RUN_CONFIG_FILE).is_file():
        raise cluster.ClusterError(
            f"{workers.spec.task_name} cannot see the chief's run folder {run_dir}: --out "
            f"({config.out}) must be a folder every worker shares at the same path (NFS, a "
            "ReadWriteMany volume), since every worker restores the run's backup from it")
    return run_dir, resuming


def _split_cpu(count: int) -> None:
    """Expose the CPU as `count` logical devices; must run before TF initialises its devices."""
    import tensorflow as tf

    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )


def _progress_verbosity(mode: str) -> int:
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "epoch"
    return {"bar": 1, "epoch": 2, "quiet": 0}[mode]


def physical_cores() -> int:
    """CPU cores this process may run on, counting each physical core once (hyperthreads of
    one core share its arithmetic units, which the training step saturates)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" + (topology / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def configure_threads(threads: int) -> dict[str, int]:
    """Size TF's thread pools; must run before TF runs its first op. Returns the sizes.

    The training step's ops get one thread per physical core (`threads`, 0 = all of them):
    more only queue behind each other on the same arithmetic units, and spinning threads are
    what makes a busy laptop unresponsive. Independent ops (inter-op) get 2 threads: the
    step is one chain of matrix products, so more buy nothing. The tf.data pipeline has its
    own pool (model.data.make_train_dataset).
    """
    import tensorflow as tf

    intra = threads or physical_cores()
    inter = min(2, intra)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TF already runs (the caller ran ops first): its pools stay as they are
        return {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1,
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count() or 1,
        }
    return {"intra_op": intra, "inter_op": inter}


def build_training_model(config: TrainConfig, dropout_rng: str = "philox", replicas: int = 1):
    """The MLP as trained: Philox dropout (fast under XLA; see model.network) and, over several
    replicas, BatchNormalization synchronised across them (statistics of the global batch, as
    one device would compute them). Uncompiled."""
    from model.network import build_mlp

    return build_mlp(
        hidden_units=config.hidden_units,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        batch_norm=config.batch_norm,
        seed=config.seed,
        dropout_rng=dropout_rng,
        synchronized_batch_norm=replicas > 1,
    )


def inference_model(config: TrainConfig, trained, temperature: float = 1.0):
    """The model that is saved and exported: built-in Keras layers only, the trained
    weights, and the calibration temperature inside (probabilities = softmax(logits / T))."""
    from model.network import build_mlp

    model = build_mlp(
        hidden_units=config.hidden_units, dropout=config.dropout,
        input_dropout=config.input_dropout, batch_norm=config.batch_norm, seed=config.seed,
        temperature=temperature,
    )
    model.set_weights(trained.get_weights())
    return model


def build_compiled_model(
    config: TrainConfig, steps_per_epoch: int, use_xla: bool, steps_per_execution: int | None = None,
    replicas: int = 1,
):
    """The MLP with its optimiser, loss and metrics (call inside the strategy scope, with the
    strategy's `num_replicas_in_sync`)."""
    import keras

    model = build_training_model(config, replicas=replicas)
    total_steps = max(1, config.epochs * steps_per_epoch)
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else config.learning_rate,
        decay_steps=total_steps - warmup_steps,
        warmup_target=config.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=use_xla,
        steps_per_execution=steps_per_execution or config.steps_per_execution,
    )
    return model


def plan_training(config: TrainConfig, num_images: int, workers, steps_per_execution: int):
    """The epoch plan (model.data.EpochPlan) of one worker's pipeline: under several workers
    each reads its shard (model.distributed.shard: num_images // workers images) in batches
    of its share of the global batch; every worker gets the same plan, so all run the same
    number of steps."""
    from model import data

    if config.batch_size > num_images:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {num_images} training images")
    return data.plan_epochs(num_images // workers.count, config.batch_size // workers.count,
                            steps_per_execution)


def make_training_input(config: TrainConfig, train_split, plan, strategy=None, workers=None,
                        first_epoch: int = 0):
    """The training tf.data pipeline from epoch `first_epoch` to the last (model.data), for
    `model.fit` under `strategy` (model.distributed.train_input: under several workers each
    reads its own shard, with seed + worker index, so their orders and distortions differ).

    Its randomness is a function of (seed, epoch, step) alone, so a pipeline started at
    `first_epoch` (a resumed run) yields what an uninterrupted run's yields from there.
    """
    from model import data, distributed

    def make(split, batch_size, seed):
        return data.make_train_dataset(
            split, batch_size, seed, config.augmentation(),
            first_epoch=first_epoch, epochs=config.epochs, steps_per_epoch=plan.steps_per_epoch,
        )

    if strategy is None:
        return make(train_split, config.batch_size, config.seed)
    dataset, _ = distributed.train_input(strategy, workers, train_split, config.batch_size, make, config.seed)
    return dataset


def make_callbacks(
    config: TrainConfig, run_dir: Path, extra: Sequence[Any] = (), writer: bool = True
) -> list[Any]:
    """The run's Keras callbacks, in the order their hooks must run. `writer`: this process
    writes the run folder (the chief; under several workers the others only read the backup).

    Early stopping before the backup (the backup saves early stopping's updated state and
    restores it after early stopping's own on_train_begin has reset it); the timer before
    the backup (whose writing time it then adds) and before CSVLogger (which writes the
    times); the backup before CSVLogger, so a kill between the two loses no row (a resumed
    run rewrites history.csv from the backup).
    """
    import keras

    EpochTimer, ResumableEarlyStopping, ResumableBackup = _callbacks_module()
    early_stopping = ResumableEarlyStopping(
        monitor="val_accuracy", mode="max",
        patience=config.epochs if config.patience is None else config.patience,
        restore_best_weights=True, verbose=1,
    )
    callbacks = [
        *extra,
        EpochTimer(),
        early_stopping,
        ResumableBackup(run_dir / "backup", early_stopping, writer=writer),
    ]
    if writer:
        callbacks += [
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
        ]
    return callbacks


ECE_THRESHOLD = 0.02  # calibrate (--calibrate auto) when the validation ECE is above this


def logits_model(model):
    """A Keras model sharing `model`'s layers, from its input to its logits [B, 10]."""
    import keras

    return keras.Model(model.inputs, model.get_layer("logits").output)


def softmax(logits):
    """float [N, C] -> float [N, C] probabilities (numpy, in float64)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def calibrate(config: TrainConfig, model, val_split) -> dict[str, Any]:
    """Temperature scaling fitted on the validation split (Guo et al., ICML 2017).

    Returns the fitted temperature, the validation ECE before and after it, whether it is
    applied (--calibrate on; or auto and the validation ECE > ECE_THRESHOLD) and the
    temperature the saved model carries (1.0 when not applied). The test set is not read.
    """
    from model import evaluate

    logits = logits_model(model).predict(val_split.images, batch_size=1024, verbose=0)
    fitted = evaluate.fit_temperature(logits, val_split.labels)
    before = evaluate.expected_calibration_error(val_split.labels, softmax(logits))
    after = evaluate.expected_calibration_error(val_split.labels, softmax(logits / fitted))
    applied = config.calibrate == "on" or (config.calibrate == "auto" and before > ECE_THRESHOLD)
    return {
        "method": "temperature scaling, fitted on the validation split",
        "fitted_temperature": round(fitted, 4),
        "applied": applied,
        "temperature": round(fitted, 4) if applied else 1.0,
        "val_ece_uncalibrated": before,
        "val_ece_temperature_scaled": after,
        "val_ece_applied": after if applied else before,
        "ece_bins": evaluate.ECE_BINS,
        "threshold": ECE_THRESHOLD,
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def train_and_evaluate(config: TrainConfig, log=print, extra_callbacks: Sequence[Any] = ()) -> RunResult:
    """Train, evaluate and write a run folder. Returns its path and metrics.

    `extra_callbacks` (Keras callbacks) run before the run's own in every hook, so an
    `on_epoch_begin` there happens before the epoch's timer starts (model/bench.py uses this
    to alternate epochs with another framework).

    Raises gpu.NoGpuError (with --require-gpu), data.DataError / idx.IdxError for bad data,
    cluster.ClusterError for a bad TF_CONFIG or a cluster that does not assemble or agree,
    cluster.WorkerLostError when a worker fails during training, and KeyboardInterrupt
    untouched (the backup stays so that the next run resumes). Under several workers, only
    the chief's result has metrics (the others' is empty).
    """
    spec, threads, gpu_report = _prepare_devices(config, log)

    import keras

    # The strategy before the data: a worker that cannot join fails in seconds, and collective
    # ops are best configured before other TF ops run.
    strategy, workers = _start_workers(config, spec, log)
    keras.utils.set_random_seed(config.seed)  # Python, numpy and TF seeds
    dataset, train_split, val_split = _load_data(config, workers, log)
    run = _open_run(config, strategy, workers, gpu_report, len(train_split), log)
    model, train_ds, val_ds = _build_model(config, run, strategy, workers, train_split, val_split)
    log(f"Run folder: {run.run_dir}")
    log(
        f"Training {model.count_params():,} parameters, batch {config.batch_size} over {run.replicas} "
        f"replica(s) on {workers.count} worker(s), {run.plan.steps_per_epoch} steps per epoch "
        f"({run.plan.steps_per_execution} per call), XLA {'on' if run.use_xla else 'off'}, "
        f"{threads['intra_op']} threads, up to {config.epochs} epochs"
    )
    callbacks = make_callbacks(config, run.run_dir, extra_callbacks, writer=workers.is_chief)
    _fit(config, model, train_ds, val_ds, callbacks, run, workers)
    if not workers.is_chief:
        # The chief evaluates and writes the run folder; wait for it, so that the cluster ends
        # together (a worker leaving early shows on the chief as a failed peer).
        from model import distributed

        workers.wait_for_all("finished", distributed.FINAL_BARRIER_TIMEOUT_S)
        return RunResult(run_dir=run.run_dir, metrics={})
    best_epoch = int(next(c for c in callbacks if hasattr(c, "get_state")).best_epoch)  # early stopping's
    model, outcome = _evaluate(config, model, dataset, val_split)
    metrics = _run_metrics(config, run, workers, threads, gpu_report, dataset, train_split, val_split,
                           model, outcome, best_epoch)
    _write_run(run, workers, model, dataset, outcome, metrics, best_epoch)
    return RunResult(run_dir=run.run_dir, metrics=metrics)


def _prepare_devices(config: TrainConfig, log) -> tuple[cluster.ClusterSpec | None, dict[str, Any], Any]:
    """The cluster spec (TF_CONFIG), thread pools and the GPU check, before TF runs an op.

    TF_CONFIG is checked before anything starts: a mistake in it fails in a second. Thread
    pools and the GPU check run first: both must be set before TF runs an op, and with
    --require-gpu we stop before reading any data. Returns (spec or None, threads, gpu report).
    """
    from model import gpu

    spec = cluster.from_environment() if config.strategy == "multiworker" else None
    _split_cpu(config.cpu_devices)
    threads = configure_threads(config.threads)
    gpu_report = gpu.check_gpu(
        require_gpu=config.require_gpu, enable_mixed_precision=config.mixed_precision
    )
    log(gpu_report.summary())
    if not gpu_report.gpu_usable:
        gpu.warn_cpu_fallback(gpu_report)
    return spec, threads, gpu_report


def _load_data(config: TrainConfig, workers, log):
    """MNIST (data.load_mnist) and its train/validation split; every worker checks that the
    others loaded the same data. Returns (dataset, train split, validation split)."""
    from model import data

    dataset = data.load_mnist(config.data_dir, config.tfds_dir)
    train_split, val_split = data.split_validation(dataset.train, config.validation_size)
    log(
        f"Data ({dataset.source['kind']}): {len(train_split)} training, {len(val_split)} "
        f"validation, {len(dataset.test)} test images"
    )
    if dataset.source.get("looks_like_other_dataset"):
        log(
            "WARNING: these IDX files have MNIST's exact sizes but not its checksums: another "
            "dataset in MNIST's format (Fashion-MNIST? KMNIST?) or modified files."
        )
    workers.agree("data", {"data": _data_fingerprint(dataset)})
    return dataset, train_split, val_split


@dataclass
class _Run:
    """What the steps of one training run share once its folder is open."""

    run_dir: Path
    resuming: bool
    backup_dir: Path
    history_path: Path
    plan: Any  # plan_training's result
    initial_epoch: int  # epochs already done (from the backup when resuming)
    replicas: int
    use_xla: bool


def _open_run(config: TrainConfig, strategy, workers, gpu_report, num_train_images: int, log) -> _Run:
    """The run folder (resume an interrupted run with the same settings, else a new one), the
    step plan, and the epoch to start from. Only the chief writes there; the other workers
    write nothing that outlives them."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch-size {config.batch_size} must divide evenly over {replicas} replicas")
    use_xla = config.jit_compile != "off"
    if config.strategy != "none" and use_xla and not gpu_report.gpu_usable:
        use_xla = False

    run_dir, resuming = _prepare_run_dir(config, workers)
    if workers.is_chief:
        configlib.write_json_atomic(run_dir / contract.RUN_GPU_REPORT_FILE, gpu_report.to_dict())
    backup_dir = run_dir / "backup"
    history_path = run_dir / "history.csv"

    steps_per_execution = config.steps_per_execution
    if replicas > 1 and steps_per_execution > 1:
        # Keras 3.15 on TF 2.21: the multi-step loop under MirroredStrategy fails ("You must
        # feed a value for placeholder tensor 'while/cond/Placeholder'"); one step per call works.
        log(f"Note: steps_per_execution {steps_per_execution} -> 1 under {replicas} replicas (Keras/TF bug)")
        steps_per_execution = 1
    plan = plan_training(config, num_train_images, workers, steps_per_execution)

    # Every worker reads the backup: they must all start from the same epoch and weights.
    backup = read_backup_state(backup_dir)
    initial_epoch = int(backup["epoch"]) if backup else 0
    workers.agree("resume", {"resume_after_epoch": initial_epoch})
    if resuming:
        log(f"Resuming {run_dir} after epoch {initial_epoch} (its backup was left by an interrupted run).")
        if workers.is_chief:
            write_history(history_path, backup["history"] if backup else [])
    return _Run(run_dir, resuming, backup_dir, history_path, plan, initial_epoch, replicas, use_xla)


def _build_model(config: TrainConfig, run: _Run, strategy, workers, train_split, val_split):
    """The input pipelines and the compiled model under the strategy: (model, train, val)."""
    from model import data, distributed

    train_ds = make_training_input(config, train_split, run.plan, strategy, workers, first_epoch=run.initial_epoch)
    val_ds = distributed.eval_input(strategy, data.make_eval_dataset(val_split, 1024))
    with strategy.scope():
        model = build_compiled_model(config, run.plan.steps_per_epoch, run.use_xla, run.plan.steps_per_execution,
                                     run.replicas)
    return model, train_ds, val_ds


def _fit(config: TrainConfig, model, train_ds, val_ds, callbacks, run: _Run, workers) -> None:
    """model.fit from the run's initial epoch. Raises cluster.WorkerLostError when a peer dies
    under several workers; the last finished epoch's backup is committed either way."""
    import tensorflow as tf

    from model import distributed

    backup_callback = next(c for c in callbacks if hasattr(c, "finish"))
    try:
        model.fit(
            train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=run.initial_epoch,
            steps_per_epoch=run.plan.steps_per_epoch, callbacks=callbacks,
            verbose=_progress_verbosity(config.verbose), shuffle=False,  # the pipeline shuffles
        )
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as err:
        if workers.spec is None:
            raise
        # A peer died: MWMS cannot go on without it (its collectives abort on every worker).
        raise cluster.WorkerLostError(
            f"{workers.spec.task_name} lost the cluster during training: "
            f"{distributed.first_line(err)}. The backup of the last finished epoch is in "
            f"{run.backup_dir}: start every worker again with the same command to resume from it."
        ) from None
    finally:
        backup_callback.finish()  # the last finished epoch's backup commits before we leave


def _evaluate(config: TrainConfig, trained, dataset, val_split) -> tuple[Any, dict[str, Any]]:
    """Calibrate on the validation split, then evaluate the model as shipped on the test set
    (the only place the test set is read; the chief alone). Returns (shipped model, outcome)."""
    from model import evaluate

    # Calibration on the validation split; the model that is saved carries the temperature.
    # Both run on this process's copy of the model, outside the strategy (under several
    # workers Keras' predict would shard the inputs over them all).
    model = inference_model(config, trained)
    calibration = calibrate(config, model, val_split)
    model = inference_model(config, model, calibration["temperature"])

    test_probs = model.predict(dataset.test.images, batch_size=1024, verbose=0)  # as shipped
    test = evaluate.classification_metrics(dataset.test.labels, test_probs)
    test_logits = logits_model(model).predict(dataset.test.images, batch_size=1024, verbose=0)
    val_probs = model.predict(val_split.images, batch_size=1024, verbose=0)
    val = evaluate.classification_metrics(val_split.labels, val_probs)
    test_ece = {
        "uncalibrated": evaluate.expected_calibration_error(dataset.test.labels, softmax(test_logits)),
        "temperature_scaled": evaluate.expected_calibration_error(
            dataset.test.labels, softmax(test_logits / calibration["fitted_temperature"])
        ),
    }
    return model, {"calibration": calibration, "test": test, "test_probs": test_probs,
                   "test_logits": test_logits, "val": val, "test_ece": test_ece}


def _run_metrics(config: TrainConfig, run: _Run, workers, threads, gpu_report, dataset, train_split, val_split,
                 model, outcome: dict[str, Any], best_epoch: int) -> dict[str, Any]:
    """metrics.json's content: the evaluation, the history's timings and how the run ran."""
    import keras
    import tensorflow as tf

    from model import evaluate

    history = evaluate.read_history(run.history_path)
    train_seconds = sum(row.get("epoch_seconds", 0.0) for row in history)
    epochs_run = len(history)
    test, val, test_ece, calibration = outcome["test"], outcome["val"], outcome["test_ece"], outcome["calibration"]
    return {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "val_accuracy": val["accuracy"],
        # Calibration (expected calibration error, 15 bins) of what users see: the shipped
        # model's probabilities; the uncalibrated and temperature-scaled values beside them.
        "test_ece": evaluate.expected_calibration_error(dataset.test.labels, outcome["test_probs"]),
        "test_ece_uncalibrated": test_ece["uncalibrated"],
        "test_ece_temperature_scaled": test_ece["temperature_scaled"],
        "val_ece": calibration["val_ece_applied"],
        "calibration": calibration,
        "best_epoch": best_epoch + 1,
        "epochs_run": epochs_run,
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_second": round(
            epochs_run * run.plan.images_per_epoch * workers.count / max(train_seconds, 1e-9), 1
        ),
        "train_steps_per_epoch": run.plan.steps_per_epoch,
        "train_images": len(train_split),
        "validation_images": len(val_split),
        "test_images": len(dataset.test),
        "parameters": int(model.count_params()),
        "resumed": run.resuming,
        "xla": run.use_xla,
        "steps_per_execution": run.plan.steps_per_execution,
        "threads": threads,
        "replicas": run.replicas,
        "workers": workers.count,
        "device": "GPU" if gpu_report.gpu_usable else "CPU",
        "mixed_precision": gpu_report.mixed_precision,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "data_source": dataset.source,
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def _write_run(run: _Run, workers, model, dataset, outcome: dict[str, Any], metrics: dict[str, Any],
               best_epoch: int) -> None:
    """The chief's run folder: the model, the plots, then metrics.json (its presence marks the
    run complete); the backup goes, and every worker is told the run is finished."""
    import numpy as np

    from model import distributed, evaluate

    run_dir, test = run.run_dir, outcome["test"]
    history = evaluate.read_history(run.history_path)
    tmp_model = run_dir / f".{contract.RUN_MODEL_FILE}.tmp.keras"
    model.save(tmp_model)
    os.replace(tmp_model, run_dir / contract.RUN_MODEL_FILE)
    evaluate.plot_training_curves(history, run_dir / "training_curves.png", best_epoch)
    evaluate.plot_confusion_matrix(
        np.asarray(test["confusion_matrix"]), run_dir / "confusion_matrix.png",
        contract.LABELS, f"MNIST test set: accuracy {test['accuracy']:.2%}",
    )
    evaluate.plot_reliability(
        dataset.test.labels, {"uncalibrated": softmax(outcome["test_logits"]), "shipped": outcome["test_probs"]},
        run_dir / "reliability.png",
    )
    # metrics.json last: its presence marks the run complete.
    configlib.write_json_atomic(run_dir / contract.RUN_METRICS_FILE, metrics)
    (run_dir / UNFINISHED_MARKER).unlink(missing_ok=True)
    shutil.rmtree(run.backup_dir, ignore_errors=True)
    workers.wait_for_all("finished", distributed.FINAL_BARRIER_TIMEOUT_S)


def _data_fingerprint(dataset) -> str:
    """What identifies the data a worker loaded (its files' checksums, or the TFDS version):
    workers with different data would train one model on two datasets."""
    source = dataset.source
    if source.get("kind") == "idx":
        return json.dumps(source.get("sha256"), sort_keys=True)
    return f"{source.get('kind')} {source.get('name')} {source.get('version')} {len(dataset.train)}"


T = TypeVar("T")


def run_reporting_errors(fn: Callable[[], T]) -> tuple[T | None, int]:
    """(fn(), 0), or (None, exit status) after printing a one-line error for the failures a
    user can fix: no GPU with --require-gpu (gpu.EXIT_NO_GPU), a bad TF_CONFIG or a cluster
    that does not assemble (cluster.EXIT_CLUSTER, 2), a worker lost during training
    (cluster.EXIT_WORKER_LOST, 75: run the same command again), bad data or settings, a
    failed write in the run folder (1; configlib.write_failure names the file and cause).
    Shared by the entry points that train (model.train, model.bench)."""
    from model import data, gpu, idx

    try:
        return fn(), 0
    except gpu.NoGpuError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, gpu.EXIT_NO_GPU
    except cluster.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, cluster.EXIT_CLUSTER
    except cluster.WorkerLostError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, cluster.EXIT_WORKER_LOST
    except (data.DataError, idx.IdxError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1
    except Exception as err:
        failure = configlib.write_failure(err)  # a full disk, a quota, a read-only folder...
        if failure is None:
            raise
        print(f"error: cannot write {failure}. Make room (or fix the folder), then run the same "
              "command again: it resumes from the last finished epoch.", file=sys.stderr, flush=True)
        if any("/h5py/" in frame.filename for frame in traceback.extract_tb(err.__traceback__)):
            # h5py cannot close a .h5 file whose write failed: its clean-up at interpreter exit
            # crashes the process (SIGSEGV, exit 139, after a page of tracebacks). Leave now.
            sys.stdout.flush()
            os._exit(1)
        return None, 1


def main(argv: list[str] | None = None) -> int:
    config = configlib.parse_config(TrainConfig, argv, prog="python -m model.train")
    if config.run_record is not None:
        Path(config.run_record).unlink(missing_ok=True)  # only a finished chief's run is exported
    try:
        result, status = run_reporting_errors(lambda: train_and_evaluate(config))
    except KeyboardInterrupt:
        print(
            "\nInterrupted. Run the same command again to resume from the last finished epoch "
            "(or pass --no-resume to start over).",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if status:
        return status
    if not result.metrics:
        print(f"This worker's part is done; the chief wrote the run folder {result.run_dir}")
        return 0
    m = result.metrics
    print(
        f"Test accuracy: {m['test_accuracy']:.2%} (loss {m['test_loss']:.4f}) after {m['epochs_run']} "
        f"epochs, {m['train_seconds']:.0f} s of training\nRun folder: {result.run_dir}"
    )
    if config.run_record is not None:
        record = Path(config.run_record)
        try:
            with configlib.naming_file(record):
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(f"{Path(result.run_dir).resolve()}\n", encoding="utf-8")
        except OSError as err:
            print(f"error: cannot write {configlib.write_failure(err)}; export the run with "
                  f"python -m export --run {result.run_dir}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
