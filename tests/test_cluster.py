"""TF_CONFIG parsing (model/cluster.py): pure Python, no TensorFlow. The multi-process cases
are in tests/test_multiworker.py."""

from __future__ import annotations

import json

import pytest

from model import cluster
from model.cluster import ClusterError, parse_tf_config

TWO = {"worker": ["localhost:23450", "localhost:23451"]}


def test_worker_only_cluster_makes_worker_0_the_chief():
    spec = parse_tf_config(cluster.tf_config_for(TWO, "worker", 1))
    assert spec.num_workers == 2 and spec.worker_id == 1 and not spec.is_chief
    assert spec.address == "localhost:23451"
    assert parse_tf_config(cluster.tf_config_for(TWO, "worker", 0)).is_chief


def test_a_chief_job_comes_first_and_is_the_chief():
    jobs = {"worker": ["w0:2222", "w1:2222"], "chief": ["c:2222"]}
    chief = parse_tf_config(cluster.tf_config_for(jobs, "chief", 0))
    worker0 = parse_tf_config(cluster.tf_config_for(jobs, "worker", 0))
    assert chief.is_chief and chief.worker_id == 0
    assert not worker0.is_chief and worker0.worker_id == 1 and worker0.num_workers == 3
    assert chief.fingerprint() == worker0.fingerprint()  # the task is not part of it
    assert chief.cluster_text == "chief: c:2222; worker: w0:2222, w1:2222"


def test_fingerprints_differ_for_different_clusters():
    a = parse_tf_config(cluster.tf_config_for(TWO, "worker", 0))
    b = parse_tf_config(cluster.tf_config_for({"worker": [*TWO["worker"], "localhost:23452"]}, "worker", 0))
    assert a.fingerprint() != b.fingerprint()


def test_ipv6_and_kubernetes_names_are_addresses():
    jobs = {"worker": ["[::1]:2222", "mnist-train-0.mnist-train.default.svc:2222"]}
    assert parse_tf_config(cluster.tf_config_for(jobs, "worker", 1)).address.endswith(".svc:2222")


@pytest.mark.parametrize("text, message", [
    (None, "TF_CONFIG environment variable, which is unset or empty"),
    ("  ", "unset or empty"),
    ("{'cluster': 1}", "not valid JSON"),
    ('["worker"]', "must be a JSON object, got list"),
    ('{"task": {"type": "worker", "index": 0}}', '"cluster" is missing'),
    ('{"cluster": {"worker": ["a:1"]}, "tsak": {}}', "unknown keys ['tsak']"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "ParameterServerStrategy"),
    ('{"cluster": {"workers": ["a:1"]}, "task": {"type": "worker", "index": 0}}', 'unknown job "workers"'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "'a' is not a \"host:port\""),
    ('{"cluster": {"worker": ["a:99999"]}, "task": {"type": "worker", "index": 0}}', "not a \"host:port\""),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "repeated"),
    ('{"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}', "at most one chief"),
    ('{"cluster": {"worker": ["a:1"]}}', '"task" is missing'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not a job of this cluster"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     "task index 2 is out of range: the cluster has 2 worker task(s), indices 0-1"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "must be an integer"),
])
def test_bad_tf_config_names_the_problem(text, message):
    with pytest.raises(ClusterError) as info:
        parse_tf_config(text)
    assert message in str(info.value)
    assert str(info.value).startswith("TF_CONFIG: ")


def test_from_environment_reads_tf_config():
    env = {"TF_CONFIG": json.dumps({"cluster": TWO, "task": {"type": "worker", "index": 1}})}
    assert cluster.from_environment(env).worker_id == 1
    with pytest.raises(ClusterError):
        cluster.from_environment({})


def test_the_tf_config_cli_builds_each_pods_tf_config(capsys):
    assert cluster.main(["--workers", "3", "--index", "2", "--host", "train-{index}.svc", "--port", "2222"]) == 0
    spec = parse_tf_config(capsys.readouterr().out)
    assert spec.jobs == {"worker": ("train-0.svc:2222", "train-1.svc:2222", "train-2.svc:2222")}
    assert spec.worker_id == 2


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2", "--index", "2", "--host", "h-{index}"], "--index 2 is not in 0-1"),
    (["--workers", "0", "--index", "0", "--host", "h-{index}"], "--workers must be >= 1"),
    (["--workers", "2", "--index", "0", "--host", "h"], "must contain {index}"),
])
def test_the_tf_config_cli_refuses_impossible_requests(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cluster.main(argv)
    assert info.value.code == cluster.EXIT_CLUSTER
    assert message in capsys.readouterr().err
