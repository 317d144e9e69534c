"""The training cluster as TF_CONFIG describes it: parsed and checked before TensorFlow starts.

`--strategy multiworker` runs one process per worker, each with the same TF_CONFIG except its
`task` (TensorFlow's format, read by tf.distribute.cluster_resolver.TFConfigClusterResolver):

    {"cluster": {"worker": ["host0:23456", "host1:23456"]},
     "task": {"type": "worker", "index": 0}}

A `chief` job of one task may stand beside `worker`; it trains like the workers and writes the
run folder. Without one, worker 0 is the chief (TensorFlow's multi_worker_util.is_chief rule).

`parse_tf_config` turns every mistake a user can make in that JSON into a `ClusterError` that
names it (entry points exit with EXIT_CLUSTER = 2), instead of the hang or the C++ abort that
TensorFlow gives for most of them. Mistakes that only show once the processes meet (two workers
with different clusters, a worker that never starts) are caught by model/distributed.py, which
compares `ClusterSpec.fingerprint()` across workers under a start-up timeout.

`python -m model.cluster --workers N --index I --host 'train-{index}.train' --port 2222`
prints one worker's TF_CONFIG: what each pod of the Kubernetes training Job runs
(serving/kubernetes/training/job.yaml) with its completion index.

Pure Python (no TensorFlow): importable anywhere, cheap to test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from common import configlib

EXIT_CLUSTER = 2  # a usage error, like a bad flag: the cluster settings must change

TF_CONFIG_ENV = "TF_CONFIG"
# The jobs MultiWorkerMirroredStrategy trains with, in TensorFlow's id order (chief first).
TRAINING_JOBS = ("chief", "worker")
# Jobs other strategies use; named so the error can say why they are refused.
OTHER_JOBS = {
    "ps": "parameter servers belong to ParameterServerStrategy, not MultiWorkerMirroredStrategy",
    "evaluator": "a side-car evaluator is not supported: the chief evaluates on the test set itself",
}
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")


class ClusterError(RuntimeError):
    """TF_CONFIG is malformed, names a missing task, or disagrees with the other workers';
    or the cluster did not assemble in time. The message names the problem and the fix."""


# sysexits.h EX_TEMPFAIL: nothing is wrong with the settings; run the same command again.
EXIT_WORKER_LOST = 75


class WorkerLostError(RuntimeError):
    """A worker failed or stopped during training, so every worker's collective ops abort.
    The last finished epoch's backup stays; the same command on every worker resumes it."""


@dataclass(frozen=True)
class ClusterSpec:
    """One process's view of the cluster.

    jobs: job name -> task addresses ("host:port"), only "chief" and/or "worker".
    task_type, task_index: this process's task.
    """

    jobs: Mapping[str, tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def tasks(self) -> list[tuple[str, int]]:
        """Every training task in TensorFlow's id order: the chief first, then workers."""
        return [(job, i) for job in TRAINING_JOBS for i in range(len(self.jobs.get(job, ())))]

    @property
    def num_workers(self) -> int:
        """Training processes in the cluster (chief included)."""
        return len(self.tasks)

    @property
    def worker_id(self) -> int:
        """This task's place in `tasks` (0 = the chief): its data shard and its key suffix."""
        return self.tasks.index((self.task_type, self.task_index))

    @property
    def is_chief(self) -> bool:
        """The chief writes the run folder; the rule of TensorFlow's multi_worker_util.is_chief."""
        return self.worker_id == 0

    @property
    def task_name(self) -> str:
        return f"{self.task_type} {self.task_index}"

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.task_index]

    def fingerprint(self) -> str:
        """Identical on every process of one cluster (the task is left out)."""
        canonical = json.dumps({k: list(v) for k, v in sorted(self.jobs.items())}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def cluster_text(self) -> str:
        """The cluster in one line: "chief: h0:23456; worker: h1:23456, h2:23456"."""
        return "; ".join(f"{job}: {', '.join(self.jobs[job])}" for job in TRAINING_JOBS if job in self.jobs)

    def describe(self) -> str:
        return f"{self.task_name} of {self.num_workers} ({self.cluster_text})"


def _fail(problem: str) -> ClusterError:
    example = ('{"cluster": {"worker": ["host0:23456", "host1:23456"]}, '
               '"task": {"type": "worker", "index": 0}}')
    return ClusterError(f"TF_CONFIG: {problem}. Expected JSON like {example}, the same cluster "
                        "on every worker and each worker's own task")


def parse_tf_config(text: str | None) -> ClusterSpec:
    """Parse and check a TF_CONFIG value (a JSON string). Raises ClusterError, naming the
    problem: unset or empty, not JSON, not an object, no cluster or task, an unknown or
    unsupported job, addresses that are not host:port, a repeated address, more than one
    chief, a task type the cluster lacks, an index out of range or not an integer."""
    if text is None or not text.strip():
        raise _fail("--strategy multiworker needs the TF_CONFIG environment variable, which is "
                    "unset or empty")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(config, dict):
        raise _fail(f"must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - {"cluster", "task", "environment", "rpc_layer"})
    if unknown:
        raise _fail(f"unknown keys {unknown}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise _fail('"cluster" is missing or not a non-empty object of job -> addresses')
    jobs: dict[str, tuple[str, ...]] = {}
    for job, addresses in cluster.items():
        if job in OTHER_JOBS:
            raise _fail(f'job "{job}" is not supported: {OTHER_JOBS[job]}')
        if job not in TRAINING_JOBS:
            raise _fail(f'unknown job "{job}" (jobs: {", ".join(TRAINING_JOBS)})')
        if isinstance(addresses, str):
            addresses = [addresses]
        if not isinstance(addresses, list) or not addresses:
            raise _fail(f'cluster "{job}" must be a non-empty list of "host:port" addresses')
        for address in addresses:
            match = _ADDRESS.match(address) if isinstance(address, str) else None
            if match is None or not 0 < int(match["port"]) < 65536:
                raise _fail(f'cluster "{job}": {address!r} is not a "host:port" address')
        jobs[job] = tuple(addresses)
    if len(jobs.get("chief", ())) > 1:
        raise _fail(f'at most one chief, got {len(jobs["chief"])}')
    every = [a for job in TRAINING_JOBS for a in jobs.get(job, ())]
    repeated = sorted({a for a in every if every.count(a) > 1})
    if repeated:
        raise _fail(f"addresses repeated in the cluster: {', '.join(repeated)} (one port per task)")
    if not isinstance(task, dict):
        raise _fail('"task" is missing or not an object like {"type": "worker", "index": 0}')
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in jobs:
        raise _fail(f'task type {task_type!r} is not a job of this cluster ({", ".join(jobs)})')
    if isinstance(index, bool) or not isinstance(index, int):
        raise _fail(f'task index must be an integer, got {index!r}')
    if not 0 <= index < len(jobs[task_type]):
        raise _fail(f'task index {index} is out of range: the cluster has {len(jobs[task_type])} '
                    f'{task_type} task(s), indices 0-{len(jobs[task_type]) - 1}')
    return ClusterSpec(jobs=jobs, task_type=task_type, task_index=index)


def from_environment(environ: Mapping[str, str] | None = None) -> ClusterSpec:
    """`parse_tf_config` of the TF_CONFIG environment variable."""
    return parse_tf_config((os.environ if environ is None else environ).get(TF_CONFIG_ENV))


def tf_config_for(jobs: Mapping[str, list[str]], task_type: str, index: int) -> str:
    """The TF_CONFIG JSON for one task of `jobs` (what the README, the tests and the Kubernetes
    Job's pods give each worker)."""
    payload: dict[str, Any] = {"cluster": {k: list(v) for k, v in jobs.items()},
                               "task": {"type": task_type, "index": index}}
    return json.dumps(payload, separators=(",", ":"))


@dataclass(frozen=True)
class TfConfigRequest:
    """Print the TF_CONFIG of one worker of N whose addresses follow a pattern (an Indexed
    Job's pods: `<job>-<index>.<headless service>`)."""

    workers: int = configlib.field(0, "number of workers (the Job's completions)", at_least=1)
    index: int = configlib.field(-1, "this worker's index (the pod's JOB_COMPLETION_INDEX)")
    host: str = configlib.field("", "host name pattern with {index}, e.g. mnist-train-{index}.mnist-train")
    port: int = configlib.field(2222, "port every worker listens on")

    def validate(self) -> None:
        configlib.check_bounds(self)
        if not 0 <= self.index < self.workers:
            raise configlib.ConfigError(f"--index {self.index} is not in 0-{self.workers - 1}")
        if "{index}" not in self.host:
            raise configlib.ConfigError(f"--host {self.host!r} must contain {{index}}")
        if not 0 < self.port < 65536:
            raise configlib.ConfigError(f"--port {self.port} is not a TCP port")

    def tf_config(self) -> str:
        hosts = [f"{self.host.format(index=i)}:{self.port}" for i in range(self.workers)]
        text = tf_config_for({"worker": hosts}, "worker", self.index)
        parse_tf_config(text)  # what the workers will check, checked here first
        return text


def main(argv: list[str] | None = None) -> int:
    """`python -m model.cluster --workers N --index I --host PATTERN [--port P]` prints the
    TF_CONFIG JSON for worker I (the Kubernetes training Job runs it in each pod)."""
    request = configlib.parse_config(TfConfigRequest, argv, prog="python -m model.cluster")
    try:
        print(request.tf_config())
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CLUSTER
    return 0


if __name__ == "__main__":
    sys.exit(main())
