"""A few of TF Serving's metrics, in Prometheus text format (PrometheusExporter's layout).

Names are TF Serving's monitoring names with '/' turned into ':' as its exporter does:

    :tensorflow:serving:request_count{model_name, status}         counter
    :tensorflow:serving:request_latency{model_name, API, entrypoint}   histogram, microseconds
    :tensorflow:serving:runtime_latency{model_name, API, runtime}      histogram, microseconds:
        the model run of each successful Predict (servables/tensorflow/util.cc, recorded by
        predict_util.cc around Session::Run; with batching, the wait for the batch too)
    :tensorflow:serving:batching_session:processed_batch_size     histogram, rows per run
    :tensorflow:serving:batching_session:padding_size             histogram, padded rows
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}  counter
    :tensorflow:serving:model_warmup_latency{model_path}          histogram, microseconds

Thread-safe; no dependency beyond the standard library.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# Bucket limits: TF Serving's request latency buckets are exponential in microseconds.
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
BATCH_BUCKETS = tuple(float(2**i) for i in range(0, 13))

PROCESSED_BATCH_SIZE = ":tensorflow:serving:batching_session:processed_batch_size"
PADDING_SIZE = ":tensorflow:serving:batching_session:padding_size"
REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
RUNTIME_LATENCY = ":tensorflow:serving:runtime_latency"


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    def escape(v: str) -> str:
        # The text format's label escapes: backslash, double quote and line feed
        # (prometheus.io/docs/instrumenting/exposition_formats); anything else stays as is.
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{k}="{escape(v)}"' for k, v in pairs)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
        self._histograms: dict[str, tuple[tuple[float, ...], dict[tuple, list]]] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] += amount

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS_US, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            limits, series = self._histograms.setdefault(name, (buckets, {}))
            counts = series.setdefault(key, [[0] * (len(limits) + 1), 0.0])
            counts[0][bisect.bisect_left(limits, value)] += 1
            counts[1] += value

    def render(self) -> str:
        """The whole page: '# TYPE' line, then one line per series (histograms cumulative)."""
        lines = []
        with self._lock:
            for name in sorted(self._counters):
                lines.append(f"# TYPE {name} counter")
                for key, value in sorted(self._counters[name].items()):
                    lines.append(f"{name}{{{_labels(key)}}} {value}")
            for name in sorted(self._histograms):
                limits, series = self._histograms[name]
                lines.append(f"# TYPE {name} histogram")
                for key, (counts, total) in sorted(series.items()):
                    prefix = _labels(key)
                    sep = "," if prefix else ""
                    cumulative = 0
                    for i, count in enumerate(counts):
                        cumulative += count
                        le = "+Inf" if i == len(limits) else f"{limits[i]:g}"
                        lines.append(f'{name}_bucket{{{prefix}{sep}le="{le}"}} {cumulative}')
                    lines.append(f"{name}_sum{{{prefix}}} {total:g}")
                    lines.append(f"{name}_count{{{prefix}}} {cumulative}")
        return "\n".join(lines) + "\n"


def histogram_totals(page: str, name: str) -> tuple[float, float]:
    """(sum, count) of histogram `name` over all its series, read from a rendered page."""
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in page.splitlines():
        for suffix in totals:
            if line.startswith(name + suffix + "{"):
                totals[suffix] += float(line.rsplit(" ", 1)[1])
    return totals["_sum"], totals["_count"]
