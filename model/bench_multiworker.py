"""Benchmark multi-worker training against one worker: `make bench-multiworker`.

    python -m model.bench_multiworker --data-dir ../shared/datasets/mnist --seeds 1,2,3

For each seed, one run of `python -m model.train` alone and one of N worker processes with
--strategy multiworker on free localhost ports (TF_CONFIG built per worker), both with the
same flags and so the same global batch (--one-worker-seeds adds cheap one-worker runs). Reports each run's test accuracy, epochs and time,
the one-worker runs' seed-to-seed spread, and whether every N-worker accuracy lies within it.
Writes `artifacts/bench/multiworker.json` (runs under artifacts/bench/multiworker-runs/).

On one machine the N workers share its cores and talk over loopback: the times show the cost
of the collectives, not the speed-up of N machines.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import configlib, contract
from common.configlib import ConfigError, check_bounds, field
from model import cluster


@dataclass(frozen=True)
class MultiworkerBenchConfig:
    """Compare the test accuracy and time of N-worker and one-worker training over seeds."""

    data_dir: Path | None = field(None, "MNIST IDX folder (default: TFDS)")
    seeds: tuple[int, ...] = field((1, 2, 3), "seeds, comma-separated: one run of each kind per seed")
    one_worker_seeds: tuple[int, ...] = field(
        (), "more seeds run with one worker only: a wider seed spread at a small cost")
    workers: int = field(2, "worker processes of the multi-worker runs", at_least=2)
    train_args: str = field("", "more flags for python -m model.train (both kinds), e.g. '--epochs 10'")
    runs: Path = field(Path("artifacts/bench/multiworker-runs"), "parent folder of the runs")
    out: Path = field(Path("artifacts/bench/multiworker.json"), "JSON report")

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        check_bounds(self)


def _free_ports(count: int) -> list[int]:
    from common.net import free_port

    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _train_command(config: MultiworkerBenchConfig, seed: int, out: Path) -> list[str]:
    command = [sys.executable, "-m", "model.train", "--seed", str(seed), "--out", str(out),
               "--verbose", "epoch", *config.train_args.split()]
    if config.data_dir is not None:
        command += ["--data-dir", str(config.data_dir)]
    return command


def _run(commands: list[tuple[list[str], dict[str, str], Path]]) -> float:
    """Start every command at once, wait for all; kill the others if one fails. Seconds."""
    start = time.perf_counter()
    procs = []
    try:
        for command, env, log_path in commands:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc, (_command, _env, log_path) in zip(procs, commands):
            if proc.wait() != 0:
                raise RuntimeError(f"{' '.join(_command[:4])}... exited {proc.returncode}: see {log_path}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return time.perf_counter() - start


def _metrics(out: Path) -> dict:
    metrics = json.loads((out / "latest" / contract.RUN_METRICS_FILE).read_text())
    return {key: metrics[key] for key in ("test_accuracy", "val_accuracy", "epochs_run", "best_epoch",
                                          "train_seconds", "replicas", "workers")}


def run_benchmark(config: MultiworkerBenchConfig, log=print) -> dict:
    """Run the comparison; returns the report (also written to config.out)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    env.pop(cluster.TF_CONFIG_ENV, None)
    results: dict[str, list[dict]] = {"1": [], str(config.workers): []}
    plan = [(seed, count) for seed in config.seeds for count in (config.workers, 1)]
    plan += [(seed, 1) for seed in config.one_worker_seeds if seed not in config.seeds]
    for seed, count in plan:
        out = Path(config.runs) / stamp / f"{count}-workers-seed{seed}"
        if count == 1:
            commands = [(_train_command(config, seed, out), env, out / "train.log")]
        else:
            jobs = {"worker": [f"localhost:{p}" for p in _free_ports(count)]}
            commands = [([*_train_command(config, seed, out), "--strategy", "multiworker"],
                         {**env, cluster.TF_CONFIG_ENV: cluster.tf_config_for(jobs, "worker", i)},
                         out / f"worker-{i}.log") for i in range(count)]
        log(f"seed {seed}, {count} worker(s): training...")
        wall = _run(commands)
        row = {"seed": seed, "wall_seconds": round(wall, 1), **_metrics(out)}
        log(f"  test accuracy {row['test_accuracy']:.4f} after {row['epochs_run']} epochs, "
            f"{row['train_seconds']:.0f} s of training, {wall:.0f} s in all")
        results[str(count)].append(row)

    def summary(rows: list[dict]) -> dict:
        accuracies = [r["test_accuracy"] for r in rows]
        return {"test_accuracy": accuracies, "mean": statistics.fmean(accuracies),
                "min": min(accuracies), "max": max(accuracies),
                "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "median_train_seconds": statistics.median(r["train_seconds"] for r in rows)}

    one, many = summary(results["1"]), summary(results[str(config.workers)])
    report = {
        "config": configlib.to_jsonable(config),
        "runs": results,
        "one_worker": one,
        "multi_worker": many,
        # The one-worker seeds' range is the spread; each N-worker run should fall inside it.
        "within_seed_spread": all(one["min"] <= a <= one["max"] for a in many["test_accuracy"]),
        "mean_difference": many["mean"] - one["mean"],
        "note": "all workers on one machine: times include loopback collectives, not N machines' speed",
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    configlib.write_json_atomic(Path(config.out), report)
    log(f"1 worker: accuracy {one['min']:.4f}-{one['max']:.4f} (mean {one['mean']:.4f}); "
        f"{config.workers} workers: {many['min']:.4f}-{many['max']:.4f} (mean {many['mean']:.4f}); "
        f"within the spread: {report['within_seed_spread']}. Report: {config.out}")
    return report


def main(argv: list[str] | None = None) -> int:
    config = configlib.parse_config(MultiworkerBenchConfig, argv, prog="python -m model.bench_multiworker")
    try:
        run_benchmark(config)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
