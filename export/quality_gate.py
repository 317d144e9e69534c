"""The quality gate: bless or refuse a candidate model before it is published, as TFX's
Evaluator does before pushing (an accuracy floor, and no regression against the published
version measured on the same test images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import contract
from common.versions import numeric_versions
from export.publish import ExportError
from export.verify import load_signatures, predict_saved_model


class GateRefused(ExportError):
    """The quality gate refused the model (override with --force)."""


@dataclass
class GateDecision:
    candidate_accuracy: float
    min_accuracy: float
    baseline_version: int | None
    baseline_accuracy: float | None
    max_regression: float
    passed: bool
    forced: bool
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def quality_gate(
    candidate_accuracy: float,
    baseline_accuracy: float | None,
    baseline_version: int | None,
    min_accuracy: float,
    max_regression: float,
    force: bool,
) -> GateDecision:
    """Bless or refuse a model, as TFX's Evaluator does before pushing.

    Refuses when the candidate's test accuracy is below `min_accuracy`, or more than
    `max_regression` (absolute, 0.002 = 0.2 points) below the published baseline measured on
    the same test images. `force` publishes anyway (the refusal is recorded).
    """
    reasons = []
    if candidate_accuracy < min_accuracy:
        reasons.append(
            f"test accuracy {candidate_accuracy:.4f} is below the threshold {min_accuracy:.4f}"
        )
    if baseline_accuracy is not None and candidate_accuracy < baseline_accuracy - max_regression:
        reasons.append(
            f"test accuracy {candidate_accuracy:.4f} is {100 * (baseline_accuracy - candidate_accuracy):.2f} "
            f"points below published version {baseline_version} ({baseline_accuracy:.4f}) on the same "
            f"test images; at most {100 * max_regression:.2f} points are allowed"
        )
    return GateDecision(
        candidate_accuracy, min_accuracy, baseline_version, baseline_accuracy, max_regression,
        passed=not reasons, forced=bool(reasons) and force, reasons=reasons,
    )


def baseline_accuracy(model_dir: Path, images: np.ndarray, labels: np.ndarray) -> tuple[int | None, float | None]:
    """Accuracy of the newest published version on these images (None when nothing is published)."""
    versions = numeric_versions(model_dir)
    if not versions:
        return None, None
    version = versions[-1]
    try:
        out = predict_saved_model(load_signatures(model_dir / str(version)), images)
    except Exception as err:  # a broken baseline must not block a good candidate silently
        raise ExportError(f"cannot evaluate the published version {version} as the baseline: {err}") from err
    return version, float((out[contract.OUTPUT_DIGIT] == labels).mean())
