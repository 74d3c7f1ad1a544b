"""Is model B better or worse than model A on the same rows? Paired differences with bootstrap intervals.

``python -m mimo_chat.evaluate --compare a.json b.json --paired`` re-scores both reports' cached
predictions (``report.predictions.jsonl`` beside each ``report.json``) on the rows both answered,
and prints per task, overall and per data source: the mean per-row metric of A and of B, the mean
difference B - A, and its 95 % interval from a bootstrap that resamples *patients* (rows of one
patient are not independent), or rows where a group holds fewer than ``MIN_CLUSTERS`` patients
(marked ``rows``: that interval is too narrow for a claim about other patients).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mimo_chat.evaluation.runner import PredictionCache, load_manifest
from mimo_chat.evaluation.scoring import score_row

PAIRED_METRIC = {  # the per-row number each task is compared on
    "text_seg": "iou", "box_seg": "dice", "point_seg": "dice", "box_name": "correct",
    "detect_box": "box_iou", "observe": "correct",
    "multi_seg": "recall", "describe": "recall", "explain": "correct", "off_topic": "correct",
}
MIN_CLUSTERS = 5


class PairedError(ValueError):
    """The reports cannot be paired (no cached predictions, other benchmarks, no shared rows)."""


def row_values(report_path: str | Path) -> tuple[Path, dict[str, tuple[str, str, float]]]:
    """A report's benchmark folder and, per row id it answered, (task, "source:patient", metric)."""
    path = Path(report_path)
    report = json.loads(path.read_text())
    predictions_path = path.with_suffix(".predictions.jsonl")
    if not predictions_path.is_file():
        raise PairedError(f"{path}: no cached predictions at {predictions_path} (was it written with --no-cache?)")
    cache = PredictionCache(predictions_path, report.get("model", "model"))
    bench = Path(report["bench"])
    values = {}
    for row in load_manifest(bench):
        prediction = cache.get(row["id"])
        if prediction is None or row["task"] not in PAIRED_METRIC:
            continue
        value = getattr(score_row(row, prediction, bench), PAIRED_METRIC[row["task"]])
        parts = row.get("source", row["id"]).split(":")
        values[row["id"]] = (row["task"], ":".join(parts[:2]), float(value or 0.0))
    return bench, values


def bootstrap_interval(differences: np.ndarray, clusters: Sequence[str], resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, str]:
    """95 % interval of the mean difference, resampling clusters (or rows if too few clusters)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(clusters))
    if len(names) >= MIN_CLUSTERS:
        index = {name: i for i, name in enumerate(names)}
        of_row = np.array([index[c] for c in clusters])
        sums = np.bincount(of_row, weights=differences, minlength=len(names))
        counts = np.bincount(of_row, minlength=len(names))
        draws = rng.integers(0, len(names), size=(resamples, len(names)))
        means = sums[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
        unit = "patients"
    else:
        draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
        means = differences[draws].mean(1)
        unit = "rows"
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high), unit


def paired_table(path_a: str | Path, path_b: str | Path, resamples: int = 2000) -> str:
    """The table ``--compare A B --paired`` prints."""
    bench_a, a = row_values(path_a)
    bench_b, b = row_values(path_b)
    if bench_a.resolve() != bench_b.resolve():
        raise PairedError(f"the reports are on different benchmarks: {bench_a} vs {bench_b}")
    shared = sorted(set(a) & set(b))
    if not shared:
        raise PairedError("the reports share no answered rows")
    lines = [f"A = {path_a}", f"B = {path_b}",
             "task / source  metric  n rows  n patients  A  B  B-A  95% interval (resampled)"]
    for task, metric in PAIRED_METRIC.items():
        ids = [i for i in shared if a[i][0] == task]
        if not ids:
            continue
        groups = {"all": ids}
        for i in ids:
            groups.setdefault(a[i][1].split(":")[0], []).append(i)
        for name, members in groups.items():
            first = np.array([a[i][2] for i in members])
            second = np.array([b[i][2] for i in members])
            clusters = [a[i][1] for i in members]
            low, high, unit = bootstrap_interval(second - first, clusters, resamples)
            lines.append(f"{task} / {name}  {metric}  {len(members)}  {len(set(clusters))}  "
                         f"{first.mean():.3f}  {second.mean():.3f}  {second.mean() - first.mean():+.3f}  "
                         f"[{low:+.3f}, {high:+.3f}] ({unit})")
    return "\n".join(lines)
