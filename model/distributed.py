"""tf.distribute for training: the strategy, the cluster's handshake, and what Keras 3 needs to
train under MultiWorkerMirroredStrategy (MWMS) with TensorFlow 2.21.

Keras 3 does not support MWMS officially (keras-team/keras#20585), and `model.fit` under it
fails in two places of keras/src/backend/tensorflow/trainer.py (Keras 3.15.1); tensorflow/
tensorflow#72388 reports the second and its only answer is to go back to Keras 2:

1. `TensorFlowTrainer._maybe_symbolic_build` takes the first batch and all-reduces it across
   workers (`strategy.reduce("MEAN", batch)`), only to read its shapes. The collective reduce of
   a nested (images, labels) structure fails ("Attempt to convert a value (PerReplica ...) to a
   Tensor"). We build from this worker's own batch instead: same shapes, no collective.
2. `reduce_per_replica(..., reduction="auto")` reduces each step's metric values across workers
   with `strategy.reduce("MEAN", v, axis=0)`; the values are scalars, so this fails ("Invalid
   reduction dimension 0 for input with 0 dimensions"). We keep this worker's value: it only
   feeds the per-batch progress bar. Epoch-end logs (what callbacks, history.csv and early
   stopping see) come from `get_metrics_result()` in cross-replica context, which sums the
   metrics' ON_READ variables over every replica of every worker: exact global values,
   identical on all workers (tests/test_multiworker.py checks both).

`apply_keras_multiworker_fixes()` installs both, only in processes that train with MWMS.

Everything else in fit works: the distributed dataset, gradients all-reduced (packed into one
collective, `bytes_per_pack`), BatchNormalization's moving statistics, the optimizer.

The handshake (`Workers`): MWMS itself waits forever for a worker that never comes and does not
notice workers started with different clusters or settings (they hang in their first collective
or abort in C++). Right after the strategy starts, every worker publishes its cluster and
training fingerprints in the coordination service's key-value store and reads everyone else's
under a start-up timeout; any difference is a ClusterError naming the worker and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from model.cluster import ClusterError, ClusterSpec, WorkerLostError

# Gradients of all variables in one all-reduce instead of one per variable: each collective
# costs a round trip between workers, which dominates a small model's step. 32 MiB holds the
# default MLP's 3.4 MB of gradients many times over.
BYTES_PER_PACK = 32 * 1024 * 1024
# A dead peer is noticed after this long without heartbeats (TensorFlow's default, stated).
HEARTBEAT_TIMEOUT_S = 10
# The chief evaluates and writes the run folder while the others wait at the final barrier.
FINAL_BARRIER_TIMEOUT_S = 3600
_KEY_PREFIX = "mnist_kit"



def first_line(err: BaseException) -> str:
    """The line of a TensorFlow error that says what happened (its message continues with the
    graph's Python stack and RPC details)."""
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "aborted by" in line or "unhealthy" in line:
            return line
    noise = ("Graph execution error", "Detected at node", "File ", "{{function_node", "[[")
    for line in lines:
        if not line.startswith(noise):
            return line
    return type(err).__name__


@dataclass
class Workers:
    """This process's place among the training processes, and the handshake between them.

    `spec` is None for single-process strategies: then every exchange is with oneself.
    `timeout_s` bounds each wait for the other workers (start-up, agreement, broadcast).
    """

    spec: ClusterSpec | None
    timeout_s: float

    @property
    def count(self) -> int:
        return 1 if self.spec is None else self.spec.num_workers

    @property
    def index(self) -> int:
        return 0 if self.spec is None else self.spec.worker_id

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def _context(self):
        from tensorflow.python.eager import context

        return context.context()

    def _get(self, key: str, who: str) -> str:
        import tensorflow as tf

        try:
            return self._context().get_config_key_value(key, int(self.timeout_s * 1000))
        except tf.errors.DeadlineExceededError:
            raise ClusterError(
                f"{who} did not answer within --cluster-timeout {self.timeout_s:g} s: is it "
                f"running, with the same TF_CONFIG cluster ({self.spec.describe()})?"
            ) from None
        except tf.errors.OpError as err:
            raise ClusterError(f"lost the cluster while waiting for {who}: {first_line(err)}") from None

    def exchange(self, key: str, value: str) -> list[str]:
        """Publish `value` under `key` and return every worker's value, in worker order."""
        return list(self._exchange(key, value))

    def _exchange(self, key: str, value: str):
        if self.spec is None:
            yield value
            return
        self._context().set_config_key_value(f"{_KEY_PREFIX}/{key}/{self.index}", value)
        for i, (job, task) in enumerate(self.spec.tasks):
            yield value if i == self.index else self._get(f"{_KEY_PREFIX}/{key}/{i}", f"{job} {task}")

    def agree(self, key: str, facts: dict[str, Any]) -> None:
        """Raise ClusterError unless every worker has the same `facts` (JSON-able values).

        Compares each worker's facts as they arrive (chief first), so a worker whose cluster
        lists a task that does not exist fails on the first difference, not on the wait.
        """
        names = [f"{job} {i}" for job, i in self.spec.tasks] if self.spec else ["this process"]
        for name, text in zip(names, self._exchange(key, json.dumps(facts, sort_keys=True))):
            theirs = json.loads(text)
            problems = [f"{field}: {names[self.index]} has {mine!r}, {name} has {theirs.get(field)!r}"
                        for field, mine in facts.items() if theirs.get(field) != mine]
            if problems:
                raise ClusterError(
                    "the workers disagree, so they cannot train one model: " + "; ".join(problems)
                    + ". Start every worker with the same flags and TF_CONFIG cluster.")

    def broadcast(self, key: str, value: str | None = None) -> str:
        """The chief's `value` on every worker (the others pass None)."""
        if self.spec is None:
            return value
        if self.is_chief:
            self._context().set_config_key_value(f"{_KEY_PREFIX}/{key}", value)
            return value
        return self._get(f"{_KEY_PREFIX}/{key}", "the chief")

    def wait_for_all(self, name: str, timeout_s: float) -> None:
        """Block until every worker reaches the barrier `name` (or one fails)."""
        if self.spec is None:
            return
        import tensorflow as tf

        try:
            self._context().wait_at_barrier(f"{_KEY_PREFIX}/{name}", int(timeout_s * 1000))
        except tf.errors.OpError as err:
            raise WorkerLostError(f"the workers did not all reach '{name}' (one failed or "
                                  f"stopped): {first_line(err)}") from None


def make_strategy(kind: str, spec: ClusterSpec | None, timeout_s: float):
    """The tf.distribute strategy for `kind` ("none", "mirrored", "multiworker").

    For "multiworker", configures TensorFlow's coordination service (start-up and heartbeat
    timeouts) before MultiWorkerMirroredStrategy starts it, and turns start-up failures (a port
    in use, a peer that cannot be reached) into ClusterError. Must run before the first TF op
    that the strategy would have to distribute.
    """
    import tensorflow as tf

    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if kind != "multiworker":
        return tf.distribute.get_strategy()  # the default, no-op strategy

    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster_spec = tf.train.ClusterSpec({job: list(addresses) for job, addresses in spec.jobs.items()})
    # What MWMS would configure itself (collective_all_reduce_strategy.py), plus timeouts: it
    # keeps a configuration that is already there.
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster_spec),
        cluster_register_timeout_in_ms=int(timeout_s * 1000),
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(spec.jobs[job]))
            for job in ("chief", "worker") if job in spec.jobs
        ],
    )
    # Every task waits at registration until all have registered, and fails after the
    # start-up timeout (without the barrier, a lone worker waits forever in device discovery).
    context.context()._coordination_service_config.cluster_register_with_barrier = True
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster_spec, task_type=spec.task_type, task_id=spec.task_index, rpc_layer="grpc",
    )
    options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=BYTES_PER_PACK)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
    except (tf.errors.OpError, RuntimeError, ValueError) as err:
        raise ClusterError(_explain_start_failure(err, spec, timeout_s)) from None
    apply_keras_multiworker_fixes()
    return strategy


def _explain_start_failure(err: BaseException, spec: ClusterSpec, timeout_s: float) -> str:
    """A start-up failure of MWMS in words a user can act on (TensorFlow's are about barriers
    and RPCs). The coordination service's leader is the chief (worker 0 without a chief)."""
    import tensorflow as tf

    text = getattr(err, "message", None) or str(err)
    me = f"{spec.task_name} ({spec.address})"
    addresses = {f"{job}/{i}": f"{job} {i} ({spec.jobs[job][i]})" for job, i in spec.tasks}
    if "Could not start gRPC server" in text:
        return (f"{me} could not listen on {spec.address}: the port is in use (another worker "
                "started with the same task, or another program) or the host is not this machine")
    if "Wait_for_all_tasks_to_register" in text or "Barrier timed out" in text:
        missing = sorted({addresses.get(f"{job}/{i}", f"{job} {i}")
                          for job, i in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text.split(
                              "timed out task names:", 1)[-1])} - {me})
        who = ", ".join(missing) or "some workers"
        return (f"the cluster did not assemble within --cluster-timeout {timeout_s:g} s: {who} "
                "never joined. Start every worker (same TF_CONFIG cluster, its own task index) "
                "and check that each can reach the others' host:port")
    if isinstance(err, tf.errors.DeadlineExceededError) or "Deadline Exceeded" in text:
        leader = spec.tasks[0]
        return (f"{me} could not reach the chief, {addresses[f'{leader[0]}/{leader[1]}']}, within "
                f"--cluster-timeout {timeout_s:g} s: is it running, with the same TF_CONFIG "
                "cluster, and reachable from here?")
    return f"{me} could not join the cluster {spec.describe()}: {first_line(err)}"


def apply_keras_multiworker_fixes() -> None:
    """Install the two Keras 3 fixes described in this module's docstring (idempotent).

    Both act only when the model's strategy is a multi-worker MWMS; other strategies take
    Keras' own code paths untouched.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_mnist_kit_multiworker_fixes", False):
        return
    multi_worker = tf_trainer._collective_all_reduce_multi_worker
    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def local_value(value, strategy):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def reduce_one(value):
            local = local_value(value, strategy)
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return local  # a metric's running value on this worker: the progress bar's
            return original_reduce(value, strategy, reduction)

        return tf.nest.map_structure(reduce_one, values)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or not multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        data_batch = tf.nest.map_structure(lambda v: local_value(v, strategy), data_batch)
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer._mnist_kit_multiworker_fixes = True


def is_multi_worker(strategy) -> bool:
    """Does `strategy` span several processes (MWMS with more than one worker)?"""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._in_multi_worker_mode()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def shard(split, index: int, count: int):
    """Worker `index` of `count`'s share of an ArraySplit: every count-th image from `index`
    on (MNIST's files are ordered by writer, so a strided shard is a fair sample), cut to
    len(split) // count images so that every worker runs the same number of steps (a worker
    with one step more would wait forever in its all-reduce). Drops at most count-1 images."""
    from model.data import ArraySplit

    size = len(split) // count
    return ArraySplit(split.images[index::count][:size], split.labels[index::count][:size])


def train_input(strategy, workers: Workers, split, global_batch: int,
                make_dataset: Callable[[Any, int, int], Any], seed: int):
    """The training input for `model.fit` and its steps per epoch.

    make_dataset(split, batch_size, seed) -> tf.data.Dataset of (images, labels) batches.

    One process (no strategy, or MirroredStrategy): the whole split batched with the global
    batch; Keras splits each batch over the local replicas. Several workers: each reads only
    its `shard` (sharded by us, not by tf.data's auto-sharding, which would run the whole
    pipeline, augmentation included, on every worker and keep 1/N of it), batched with the
    global batch's share of its local replicas, shuffled and augmented with a seed of its own
    (seed + worker index: the same seed would give every worker the same augmentation draws).
    """
    if not is_multi_worker(strategy):
        return make_dataset(split, global_batch, seed), len(split) // global_batch
    import tensorflow as tf

    own = shard(split, workers.index, workers.count)
    per_worker_batch = global_batch // workers.count  # every worker has as many replicas

    def dataset_fn(context: tf.distribute.InputContext):
        # One input pipeline per worker: its own shard, one replica's batch per element.
        assert context.num_input_pipelines == workers.count
        return make_dataset(own, context.get_per_replica_batch_size(global_batch),
                            seed + context.input_pipeline_id)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    return dataset, len(own) // per_worker_batch


def eval_input(strategy, dataset):
    """The validation dataset for `model.fit`: under several workers each evaluates a share of
    the batches (tf.data DATA sharding, stated to skip its FILE attempt and warning); the
    metrics are summed over all workers at the epoch's end."""
    if not is_multi_worker(strategy):
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def local_model(model, strategy):
    """A model that runs on this process alone: `model` itself, or under several workers a
    clone with the same weights outside the strategy (Keras' predict would otherwise shard the
    inputs over the workers and need all of them to take part)."""
    if not is_multi_worker(strategy):
        return model
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone
