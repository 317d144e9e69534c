"""Train the MNIST MLP and evaluate it: `python -m model.train [flags]` (make train).

    python -m model.train --data-dir ../shared/datasets/mnist --seed 2 --epochs 30

`train_and_evaluate(config)` is the library function; `main()` only parses flags. One run:

 1. GPU check (model/gpu.py) before anything touches the device; --require-gpu stops here.
 2. Data: TFDS `mnist` or `--data-dir` IDX files; the last `validation_size` training images
    become the validation set; the test set is read only by the final evaluation.
 3. Fit with a progress bar, cosine learning-rate schedule, early stopping on validation
    accuracy (best weights restored), BackupAndRestore (an interrupted run started again with
    the same flags resumes from its last finished epoch), TensorBoard and CSV history.
 4. Evaluate on the test set; write metrics, plots and the model into the run folder, and point
    `<out>/latest` at it.

With --strategy multiworker one process runs per worker (TF_CONFIG: model/cluster.py); they
train one model with MultiWorkerMirroredStrategy (model/distributed.py), each on its shard of
the data, and only the chief writes the run folder, which must be on storage they all share.

Run folder `<out>/<run-id>/`: model.keras, config.json, gpu_report.json, history.csv,
metrics.json, training_curves.png, confusion_matrix.png, tensorboard/.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from model import cluster, configlib, contract
from model.configlib import ConfigError, field

EXIT_INTERRUPTED = 130  # like a shell's exit status after Ctrl-C


@dataclass(frozen=True)
class TrainConfig:
    """Train the MNIST MLP and evaluate it on the test set."""

    # --- data -----------------------------------------------------------------------------
    data_dir: Path | None = field(
        None, "folder with the four MNIST IDX files (.gz or not); default: TFDS 'mnist'"
    )
    tfds_dir: Path | None = field(None, "TFDS data folder (default ~/tensorflow_datasets)")
    validation_size: int = field(5000, "training images held out (from the end) for validation")
    # --- model ----------------------------------------------------------------------------
    hidden_units: tuple[int, ...] = field((800, 256), "hidden layer widths, comma-separated")
    dropout: float = field(0.2, "dropout after each hidden layer")
    input_dropout: float = field(0.0, "dropout on the input pixels")
    batch_norm: bool = field(True, "BatchNormalization in each hidden layer")
    # --- optimisation ---------------------------------------------------------------------
    epochs: int = field(20, "maximum epochs (early stopping may end sooner)")
    batch_size: int = field(128, "global batch size (split across replicas)")
    learning_rate: float = field(2e-3, "peak learning rate (AdamW, warm-up then cosine decay)")
    warmup_epochs: float = field(1.0, "linear learning-rate warm-up, in epochs")
    weight_decay: float = field(1e-4, "AdamW decoupled weight decay")
    patience: int = field(5, "early stopping: epochs without validation improvement")
    # --- augmentation (training pipeline only, after the cache; never at inference) --------
    augment: bool = field(True, "random rotation/scale/shift of training images")
    max_rotation: float = field(10.0, "augmentation: maximum rotation in degrees")
    max_shift: float = field(2.0, "augmentation: maximum shift in pixels")
    max_scale: float = field(0.1, "augmentation: maximum relative scale change")
    # --- execution ------------------------------------------------------------------------
    seed: int = field(1, "seed for weights, shuffling, dropout and augmentation")
    strategy: Literal["none", "mirrored", "multiworker"] = field(
        "none", "tf.distribute strategy: none, mirrored (all local GPUs) or multiworker (TF_CONFIG)"
    )
    cpu_devices: int = field(
        1, "split the CPU into N logical devices (lets --strategy mirrored run without GPUs)"
    )
    cluster_timeout: float = field(
        120.0, "multiworker: seconds to wait for every worker to join (and answer) before failing"
    )
    jit_compile: Literal["auto", "on", "off"] = field(
        "auto", "XLA: auto = on with a GPU, off on the CPU (measured slower there: make bench-train)"
    )
    steps_per_execution: int = field(32, "training steps per tf.function call (less Python overhead)")
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
        positive = {
            "epochs": self.epochs, "batch_size": self.batch_size,
            "validation_size": self.validation_size, "steps_per_execution": self.steps_per_execution,
            "cpu_devices": self.cpu_devices,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.cluster_timeout <= 0:
            raise ConfigError(f"--cluster-timeout must be > 0 seconds, got {self.cluster_timeout}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.patience < 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError("--patience, --warmup-epochs and --weight-decay must be >= 0")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")
        if not self.hidden_units or min(self.hidden_units) < 1:
            raise ConfigError(f"--hidden-units must be positive widths, got {self.hidden_units}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"--data-dir {self.data_dir}: no such directory")
        if self.run_name is not None and (
            not self.run_name or "/" in self.run_name or self.run_name in (".", "..", "latest")
        ):
            raise ConfigError(f"--run-name {self.run_name!r} is not a usable folder name")

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
        saved = json.loads((run_dir / contract.RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        saved_config = configlib.load_config(TrainConfig, run_dir / contract.RUN_CONFIG_FILE)
    except (OSError, ValueError, TypeError):
        return None
    del saved
    return run_dir if saved_config.identity() == config.identity() else None


def point_latest_at(run_dir: Path) -> None:
    """Atomically make `<out>/latest` a relative symlink to `run_dir`."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


# --------------------------------------------------------------------------------------------
# Keras pieces
# --------------------------------------------------------------------------------------------

def _callbacks_module():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Adds `epoch_seconds` to the epoch logs (and thus to history.csv)."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["epoch_seconds"] = time.perf_counter() - self._start

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose state (best score, its epoch and weights, patience used) survives
        an interruption: saved beside BackupAndRestore's backup, reloaded on resume.

        Plain EarlyStopping starts from scratch after a resume and could restore a worse epoch
        than one it saw before the interruption.
        """

        def __init__(self, state_dir: Path, writer: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.state_dir = Path(state_dir)
            self.writer = writer  # under several workers only the chief writes; all read

        @property
        def _state_path(self) -> Path:
            return self.state_dir / "early_stopping.json"

        @property
        def _weights_path(self) -> Path:
            return self.state_dir / "best.weights.h5"

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if not self._state_path.exists():
                return
            state = json.loads(self._state_path.read_text(encoding="utf-8"))
            self.best = state["best"]
            self.best_epoch = state["best_epoch"]
            self.wait = state["wait"]
            if self.restore_best_weights and self._weights_path.exists():
                current = self.model.get_weights()
                self.model.load_weights(self._weights_path)
                self.best_weights = self.model.get_weights()
                self.model.set_weights(current)

        def on_epoch_end(self, epoch, logs=None):
            previous_best = self.best
            super().on_epoch_end(epoch, logs)
            if not self.writer:
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if self.best_weights is not None and self.best != previous_best:
                tmp = self._weights_path.with_name(".best.tmp.weights.h5")
                current = self.model.get_weights()
                self.model.set_weights(self.best_weights)
                self.model.save_weights(tmp)
                self.model.set_weights(current)
                os.replace(tmp, self._weights_path)
            configlib.write_json_atomic(
                self._state_path,
                {"best": None if self.best is None else float(self.best),
                 "best_epoch": int(self.best_epoch), "wait": int(self.wait), "epoch": int(epoch)},
            )

    return EpochTimer, ResumableEarlyStopping


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


def build_compiled_model(
    config: TrainConfig, steps_per_epoch: int, use_xla: bool, steps_per_execution: int | None = None
):
    """The MLP with its optimiser, loss and metrics (call inside the strategy scope)."""
    import keras

    from model.network import build_mlp

    model = build_mlp(
        hidden_units=config.hidden_units,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        batch_norm=config.batch_norm,
        seed=config.seed,
    )
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


def _truncate_history(path: Path, keep_epochs: int) -> None:
    """Drop history rows of epochs that will be re-run after a resume."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.strip() and int(ln.split(",", 1)[0]) < keep_epochs]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def train_and_evaluate(config: TrainConfig, log=print) -> RunResult:
    """Train, evaluate and write a run folder. Returns its path and metrics.

    Raises gpu.NoGpuError (with --require-gpu), data.DataError / idx.IdxError for bad data,
    cluster.ClusterError for a bad TF_CONFIG or a cluster that does not assemble or agree,
    cluster.WorkerLostError when a worker fails during training, and KeyboardInterrupt
    untouched (the backup stays so that the next run resumes). Under several workers, only
    the chief's result has metrics (the others' is empty).
    """
    from model import gpu

    # TF_CONFIG is checked before anything starts: a mistake in it fails in a second.
    spec = cluster.from_environment() if config.strategy == "multiworker" else None
    # The GPU check runs first: memory growth must be set before TF touches the GPU, and with
    # --require-gpu we stop before reading any data.
    _split_cpu(config.cpu_devices)
    gpu_report = gpu.check_gpu(
        require_gpu=config.require_gpu, enable_mixed_precision=config.mixed_precision
    )
    log(gpu_report.summary())
    if not gpu_report.gpu_usable:
        gpu.warn_cpu_fallback(gpu_report)

    import keras
    import numpy as np
    import tensorflow as tf

    from model import data, evaluate

    # The strategy before the data: a worker that cannot join fails in seconds, and collective
    # ops are best configured before other TF ops run.
    strategy, workers = _start_workers(config, spec, log)
    chief = workers.is_chief
    keras.utils.set_random_seed(config.seed)  # Python, numpy and TF seeds

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

    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch-size {config.batch_size} must divide evenly over {replicas} replicas")
    use_xla = config.jit_compile == "on" or (config.jit_compile == "auto" and gpu_report.gpu_usable)
    if config.strategy != "none" and use_xla and not gpu_report.gpu_usable:
        use_xla = False

    # Run folder: resume an interrupted run with the same settings, else start a new one. Only
    # the chief writes there; the other workers write nothing that outlives them.
    run_dir, resuming = _prepare_run_dir(config, workers)
    if chief:
        configlib.write_json_atomic(run_dir / contract.RUN_GPU_REPORT_FILE, gpu_report.to_dict())
    backup_dir = run_dir / "backup"
    history_path = run_dir / "history.csv"

    from model import distributed

    train_ds, steps_per_epoch = distributed.train_input(
        strategy, workers, train_split, config.batch_size,
        lambda split, batch_size, seed: data.make_train_dataset(
            split, batch_size, seed, augment=config.augment,
            max_rotation_deg=config.max_rotation, max_shift_px=config.max_shift,
            scale_range=config.max_scale,
        ),
        config.seed,
    )
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {len(train_split)} training images"
        )
    val_ds = distributed.eval_input(strategy, data.make_eval_dataset(val_split, 1024))

    steps_per_execution = config.steps_per_execution
    if replicas > 1 and steps_per_execution > 1:
        # Keras 3.15 on TF 2.21: the multi-step loop under MirroredStrategy fails ("You must
        # feed a value for placeholder tensor 'while/cond/Placeholder'"); one step per call works.
        log(f"Note: steps_per_execution {steps_per_execution} -> 1 under {replicas} replicas (Keras/TF bug)")
        steps_per_execution = 1
    with strategy.scope():
        model = build_compiled_model(config, steps_per_epoch, use_xla, steps_per_execution)

    # Every worker reads the backup: they must all start from the same epoch and weights.
    backup = distributed.backup_state(backup_dir)
    initial_epoch = int(backup["epoch"]) if backup else 0
    workers.agree("resume", {"resume_after_epoch": initial_epoch})
    if resuming:
        log(f"Resuming {run_dir} after epoch {initial_epoch} (its backup was left by an interrupted run).")
        if chief:
            _truncate_history(history_path, initial_epoch)
    log(f"Run folder: {run_dir}")
    log(
        f"Training {model.count_params():,} parameters, batch {config.batch_size} over {replicas} "
        f"replica(s) on {workers.count} worker(s), XLA {'on' if use_xla else 'off'}, up to "
        f"{config.epochs} epochs"
    )

    EpochTimer, ResumableEarlyStopping = _callbacks_module()
    callbacks = [
        # BackupAndRestore first: its on_train_begin restores the weights and epoch counter that
        # the others then build on.
        distributed.backup_and_restore(backup_dir, writer=chief),  # committed by one rename
        EpochTimer(),
        ResumableEarlyStopping(
            state_dir=backup_dir, writer=chief, monitor="val_accuracy", mode="max",
            patience=config.patience, restore_best_weights=True, verbose=1,
        ),
    ]
    if chief:
        callbacks += [
            keras.callbacks.CSVLogger(str(history_path), append=True),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
        ]
    verbosity = _progress_verbosity(config.verbose)
    start = time.perf_counter()
    try:
        model.fit(
            train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks,
            verbose=verbosity, shuffle=False,  # the pipeline shuffles, reseeded each epoch
        )
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as err:
        if workers.spec is None:
            raise
        # A peer died: MWMS cannot go on without it (its collectives abort on every worker).
        raise cluster.WorkerLostError(
            f"{workers.spec.task_name} lost the cluster during training: "
            f"{distributed.first_line(err)}. The backup of the last finished epoch is in "
            f"{backup_dir}: start every worker again with the same command to resume from it."
        ) from None
    fit_seconds = time.perf_counter() - start
    if not chief:
        # The chief evaluates and writes the run folder; wait for it, so that the cluster ends
        # together (a worker leaving early shows on the chief as a failed peer).
        workers.wait_for_all("finished", distributed.FINAL_BARRIER_TIMEOUT_S)
        return RunResult(run_dir=run_dir, metrics={})

    history = evaluate.read_history(history_path)
    train_seconds = sum(row.get("epoch_seconds", 0.0) for row in history) or fit_seconds
    epochs_run = len(history)
    early_stopping = callbacks[2]
    best_epoch = int(early_stopping.best_epoch)

    # Final evaluation: the only place the test set is read (on the chief alone).
    predictor = distributed.local_model(model, strategy)
    test_probs = predictor.predict(dataset.test.images, batch_size=1024, verbose=0)
    test = evaluate.classification_metrics(dataset.test.labels, test_probs)
    val_probs = predictor.predict(val_split.images, batch_size=1024, verbose=0)
    val = evaluate.classification_metrics(val_split.labels, val_probs)

    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "val_accuracy": val["accuracy"],
        "best_epoch": best_epoch + 1,
        "epochs_run": epochs_run,
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_second": round(
            epochs_run * steps_per_epoch * config.batch_size / max(train_seconds, 1e-9), 1
        ),
        "train_images": len(train_split),
        "validation_images": len(val_split),
        "test_images": len(dataset.test),
        "parameters": int(model.count_params()),
        "resumed": resuming,
        "xla": use_xla,
        "steps_per_execution": steps_per_execution,
        "replicas": replicas,
        "workers": workers.count,
        "device": "GPU" if gpu_report.gpu_usable else "CPU",
        "mixed_precision": gpu_report.mixed_precision,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "data_source": dataset.source,
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }

    tmp_model = run_dir / f".{contract.RUN_MODEL_FILE}.tmp.keras"
    model.save(tmp_model)
    os.replace(tmp_model, run_dir / contract.RUN_MODEL_FILE)
    evaluate.plot_training_curves(history, run_dir / "training_curves.png", best_epoch)
    evaluate.plot_confusion_matrix(
        np.asarray(test["confusion_matrix"]), run_dir / "confusion_matrix.png",
        contract.LABELS, f"MNIST test set: accuracy {test['accuracy']:.2%}",
    )
    # metrics.json last: its presence marks the run complete.
    configlib.write_json_atomic(run_dir / contract.RUN_METRICS_FILE, metrics)
    (run_dir / UNFINISHED_MARKER).unlink(missing_ok=True)
    shutil.rmtree(backup_dir, ignore_errors=True)
    workers.wait_for_all("finished", distributed.FINAL_BARRIER_TIMEOUT_S)
    return RunResult(run_dir=run_dir, metrics=metrics)


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
