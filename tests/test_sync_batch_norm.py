"""Several replicas train as one device would: BatchNormalization's batch statistics are
synchronised over the global batch (model.train.build_training_model with replicas > 1).

Per-replica statistics (Keras' default) are taken over global batch / replicas images, a
different, noisier normalisation: a 2-worker run then ended ~0.1 point below one worker with
the same global batch in `make bench-multiworker`. The check here is on one training step, in a
fresh process with two logical CPU devices under MirroredStrategy (the collective all-reduce
MultiWorkerMirroredStrategy also uses): the same global batch of 128 gives the one-device
weights with synchronised statistics, and measurably other weights without.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from .conftest import REPO, python_env

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from model.train import TrainConfig, build_training_model

    config = TrainConfig(hidden_units=(64, 32), dropout=0.0, seed=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(128, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(128,)).astype(np.int64)

    def one_step(strategy, replicas):
        with strategy.scope():
            model = build_training_model(config, dropout_rng="keras", replicas=replicas)
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.SparseCategoricalCrossentropy())
        # One global batch of 128: split 64 + 64 over the two replicas.
        model.fit(images, labels, batch_size=128, epochs=1, shuffle=False, verbose=0)
        return model.get_weights(), [l.synchronized for l in model.layers
                                     if isinstance(l, keras.layers.BatchNormalization)]

    one, one_flags = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), 1)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    synced, synced_flags = one_step(mirrored, 2)
    # The same two replicas, per-replica statistics (what Keras does by default).
    per_replica, per_flags = one_step(mirrored, 1)

    def diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    print(json.dumps({"synced": diff(one, synced), "per_replica": diff(one, per_replica),
                      "flags": [one_flags, synced_flags, per_flags]}))
""")


def test_two_replicas_take_one_step_as_one_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["flags"] == [[False, False], [True, True], [False, False]], result
    # Synchronised: the one-device step up to float32 summation order.
    assert result["synced"] < 1e-4, result
    # Per-replica statistics move the weights by far more than rounding: the check above
    # would notice if synchronisation stopped happening.
    assert result["per_replica"] > 100 * max(result["synced"], 1e-6), result
