"""The SavedModel export for TensorFlow Serving: gate, write, verify, publish one version.

Layout TF Serving expects under its model base path:

    <base>/mnist/<version>/saved_model.pb
                          /variables/...
                          /assets.extra/tf_serving_warmup_requests   (replayed at load)
                          /assets.extra/metrics.json                 (what we measured)

One module per concern; this one runs them in order (export_saved_model):

    export/quality_gate.py   bless or refuse the candidate against the published baseline
    export/serving_graph.py  the signatures (serving_default: pixels, serving_bytes: pictures)
    export/warmup.py         the warm-up file TF Serving replays at load
    export/verify.py         parity with Keras, warm-up replay, picture parity, saved_model_cli
    export/publish.py        the atomic publish of a numbered version (temporary folder, rename)

Nothing is visible under the model folder until every check has passed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import configlib, contract
from common.versions import numeric_versions
from export.publish import (
    HIGH_WATER_FILE, LOCK_FILE, TMP_PREFIX, ExportError, fsync_path, next_version, publish, publish_lock,
    remove_stale_temporaries,
)
from export.quality_gate import GateDecision, GateRefused, baseline_accuracy, quality_gate
from export.serving_graph import build_archive, pixels_archive
from export.verify import (
    PARITY_MAX_ABS_DIFF, PICTURE_PARITY_DIGITS, PICTURE_PARITY_MAX_MEAN_DIFF, load_signatures,
    picture_parity, predict_saved_model, replay_warmup, saved_model_cli, verify_parity, verify_with_cli,
)
from export.warmup import WARMUP_BATCH_SIZES, encode_png, read_warmup, warmup_images, warmup_pictures, write_warmup

# The names above are this module's API as well (callers and tests use saved_model.publish,
# saved_model.ExportError, ...); each is defined once, in the module of its concern.
__all__ = [
    "HIGH_WATER_FILE", "LOCK_FILE", "TMP_PREFIX", "WARMUP_BATCH_SIZES", "PARITY_MAX_ABS_DIFF",
    "PICTURE_PARITY_DIGITS", "PICTURE_PARITY_MAX_MEAN_DIFF", "ExportError", "GateDecision", "GateRefused",
    "baseline_accuracy", "build_archive", "encode_png", "export_saved_model", "fsync_path", "load_signatures",
    "next_version", "numeric_versions", "picture_parity", "pixels_archive", "predict_saved_model", "publish",
    "publish_lock", "quality_gate", "read_version_metrics", "read_warmup", "remove_stale_temporaries",
    "replay_warmup", "saved_model_cli", "verify_parity", "verify_with_cli", "warmup_images",
    "warmup_pictures", "write_warmup",
]


def export_saved_model(
    model,
    model_dir: Path,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    run_metrics: dict[str, Any],
    min_accuracy: float = 0.97,
    max_regression: float = 0.002,
    force: bool = False,
    version: int | None = None,
    parity_images: int = 1000,
    cli_check: bool = True,
    before_rename: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Gate, write, verify and publish `model` as the next version under `model_dir`.

    Args:
      model: the trained keras.Model (uint8 [B, 28, 28] -> float32 [B, 10]).
      model_dir: `<base>/<model name>`, the folder TF Serving watches for versions.
      test_images, test_labels: the test set (uint8 [N, 28, 28], int [N]): the gate measures
        candidate and published baseline on them; the parity check uses the first
        `parity_images`.
      run_metrics: the run's metrics.json content, recorded beside the version.
    Returns a summary dict (version, path, gate, parity). Raises GateRefused or ExportError;
    in both cases nothing new is visible under `model_dir`.
    """
    model_dir = Path(model_dir)
    probs = model.predict(test_images, batch_size=1024, verbose=0)
    candidate = float((probs.argmax(axis=1) == test_labels).mean())
    base_version, base_acc = baseline_accuracy(model_dir, test_images, test_labels)
    gate = quality_gate(candidate, base_acc, base_version, min_accuracy, max_regression, force)
    if not gate.passed and not force:
        raise GateRefused(
            "quality gate refused to publish: " + "; ".join(gate.reasons) + ". Pass --force to publish anyway."
        )
    if gate.forced:
        log("WARNING: publishing despite the quality gate (--force): " + "; ".join(gate.reasons))

    n = min(parity_images, len(test_images))
    checks: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        build_archive(model).write_out(str(tmp), verbose=False)
        write_warmup(tmp / contract.WARMUP_FILE)

    def verify(tmp: Path) -> None:
        checks["parity"] = verify_parity(tmp, probs[:n], test_images[:n])
        if cli_check:
            checks["saved_model_cli"] = verify_with_cli(tmp)
        record = {
            "test_accuracy": candidate,
            "test_images": int(len(test_images)),
            "gate": gate.as_dict(),
            "parity": checks["parity"],
            "run": run_metrics,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        configlib.write_json_atomic(tmp / contract.VERSION_METRICS_FILE, record)
        if before_rename is not None:
            before_rename(tmp)

    number, final = publish(model_dir, write, version=version, before_rename=verify, log=log)
    log(
        f"Published SavedModel version {number} at {final} (test accuracy {candidate:.4f}; "
        f"parity max diff {checks['parity']['max_abs_diff']:.1e} on {n} images)"
    )
    return {"version": number, "path": str(final), "test_accuracy": candidate,
            "gate": gate.as_dict(), **checks}


def read_version_metrics(version_dir: Path) -> dict[str, Any]:
    return json.loads((Path(version_dir) / contract.VERSION_METRICS_FILE).read_text(encoding="utf-8"))
