"""Metrics for the benchmark tasks (torchmetrics, torchvision and scipy where they fit).

Conventions (documented in the report too):

- Mask IoU/Dice with an empty target AND an empty prediction is 1 (the model correctly
  segments nothing); with exactly one of them empty it is 0. Benchmarks built by
  ``make_bench`` never have empty targets, so this only matters for other benchmarks.
- ``detect_box``: a target ``[0, 0, 0, 0]`` means absent. Absent target: an absent answer
  scores IoU 1, any box 0. Present target: an absent answer scores 0, a box its IoU.
- Yes/no: unparseable answers are scored as the wrong answer (never skipped).
- Grounding F1: a predicted (phrase, mask) pair is a true positive when its phrase names
  the target and its mask has IoU > 0.5 with the target; pairs are matched one-to-one by
  maximum IoU (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_precision,
    binary_recall,
)
from torchvision.ops import box_iou as _torchvision_box_iou

from mimo_chat.data.names import names_structure

ABSENT_BOX = (0.0, 0.0, 0.0, 0.0)


def mask_iou_dice(prediction: np.ndarray | None, target: np.ndarray) -> tuple[float, float]:
    """(IoU, Dice) of two (H, W) bool masks; ``None`` prediction counts as an empty mask.

    Counted with numpy: torchmetrics' binary_jaccard_index/binary_f1_score give the same
    values (``zero_division=1``) but validate every 512x512 mask with ``torch.unique``,
    about 0.3 s per call on a shared CPU — too slow for thousands of rows.
    """
    target = np.asarray(target, dtype=bool)
    if prediction is None:
        prediction = np.zeros_like(target)
    prediction = np.asarray(prediction, dtype=bool)
    if prediction.shape != target.shape:
        raise ValueError(f"Mask shapes differ: prediction {prediction.shape}, target {target.shape}")
    overlap = int(np.count_nonzero(prediction & target))
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(target))
    if total == 0:
        return 1.0, 1.0  # both empty: correctly nothing
    return overlap / (total - overlap), 2 * overlap / total


def is_absent_box(box: Sequence[float] | None) -> bool:
    return box is None or all(float(v) == 0.0 for v in box)


def box_iou(prediction: Sequence[float], target: Sequence[float]) -> float:
    """IoU of two XYXY boxes (pixels); 0 when either is degenerate."""
    first = torch.tensor([list(prediction)], dtype=torch.float64)
    second = torch.tensor([list(target)], dtype=torch.float64)
    value = _torchvision_box_iou(first, second)[0, 0]
    return 0.0 if torch.isnan(value) else float(value)


def detect_box_score(prediction: Sequence[float] | None, target: Sequence[float]) -> float:
    """The schema's ``detect_box`` score; ``prediction`` None or zeros means "absent"."""
    if is_absent_box(target):
        return 1.0 if is_absent_box(prediction) else 0.0
    if is_absent_box(prediction):
        return 0.0
    return box_iou(prediction, target)


def grounding_matches(
    phrases: Sequence[tuple[str, np.ndarray | None]],
    targets: Sequence[tuple[str, np.ndarray]],
    threshold: float = 0.5,
) -> int:
    """True positives among predicted (phrase, mask) pairs vs target (name, mask) pairs.

    Pairs can only match when the phrase names the target; the one-to-one assignment
    maximises the summed IoU; a match counts when IoU > ``threshold``.
    """
    if not phrases or not targets:
        return 0
    scores = np.zeros((len(phrases), len(targets)))
    for i, (phrase, mask) in enumerate(phrases):
        for j, (name, target_mask) in enumerate(targets):
            if mask is not None and names_structure(phrase, name):
                scores[i, j] = mask_iou_dice(mask, target_mask)[0]
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return int(sum(scores[i, j] > threshold for i, j in zip(rows, cols)))


def f1_from_counts(true_positives: int, predicted: int, actual: int) -> float:
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def binary_classification(predicted_yes: Sequence[bool], actual_yes: Sequence[bool]) -> dict[str, float]:
    """accuracy, precision, recall, F1 with "yes" as the positive class (0 when undefined)."""
    if not actual_yes:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    predictions = torch.tensor([int(v) for v in predicted_yes])
    targets = torch.tensor([int(v) for v in actual_yes])
    return {
        "accuracy": float(binary_accuracy(predictions, targets)),
        "precision": float(binary_precision(predictions, targets, zero_division=0.0)),
        "recall": float(binary_recall(predictions, targets, zero_division=0.0)),
        "f1": float(binary_f1_score(predictions, targets, zero_division=0.0)),
    }


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def share_at_least(values: Sequence[float], threshold: float = 0.5) -> float:
    """Fraction of values >= threshold (AP50 for mask IoUs, acc50 for box IoUs)."""
    return float(np.mean(np.asarray(values) >= threshold)) if len(values) else 0.0


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    if not len(seconds):
        return {"median": 0.0, "p95": 0.0}
    return {"median": float(np.median(seconds)), "p95": float(np.percentile(seconds, 95))}
