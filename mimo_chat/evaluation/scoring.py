"""Score predictions against benchmark rows and aggregate them into the schema's report.

Rules beyond the schema (also written into the report under ``"conventions"``):

- ``text_seg``: the predicted mask is the union of the masks of phrases that name the
  query; if no phrase names anything (LISA-style "Sure, <SEG>") the unnamed masks are used
  for IoU, but they never count as grounding true positives. No mask at all = unparseable.
- ``box_seg``/``point_seg``: the first phrase with a mask. No mask at all = unparseable.
- ``box_name``: correct when the answer text (or a grounded phrase) names ``target_name``;
  the mask scored is that phrase's (else the first mask).
- ``detect_box``: the box of the grounded mask naming the query (an empty mask = absent),
  else the first ``{<x1><y1><x2><y2>}`` box in the text (0–100 grid), else "absent" when
  the text says so, else unparseable (scored 0).
- ``observe``: unparseable answers count as the wrong answer.
- A prediction that raised an error is unparseable and scored wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.names import names_structure
from mimo_chat.evaluation import metrics
from mimo_chat.evaluation.conversation import (
    CONVERSATION_CONVENTIONS,
    conversation_metrics,
    per_structure,
    score_conversation,
)
from mimo_chat.evaluation.parsing import parse_text_box, parse_yes_no, says_absent
from mimo_chat.evaluation.runner import CONVERSATION_TASKS, Prediction, load_mask
from mimo_chat.evaluation.text_metrics import text_scores

CONVENTIONS = (__doc__.split("beyond the schema (also written into the report under ``\"conventions\"``):")[1].strip()
               + "\n" + CONVERSATION_CONVENTIONS)


@dataclass
class RowScore:
    """Scores of one benchmark row (``None`` = not applicable to the task)."""

    id: str
    task: str
    query: str
    source: str
    modality: str = ""
    iou: float | None = None
    dice: float | None = None
    named: bool | None = None
    box_iou: float | None = None
    predicted_box: list[float] | None = None
    predicted_answer: str | None = None
    target_answer: str | None = None
    correct: bool | None = None
    unparseable: bool = False
    empty_mask: bool = False
    grounding_tp: int = 0
    grounding_predicted: int = 0
    grounding_actual: int = 0
    latency_s: float = 0.0
    answer_s: float = 0.0
    text: str = ""
    recall: float | None = None  # multi_seg/describe: share of this row's structures found (IoU >= 0.5)
    query_ious: dict[str, float] | None = None  # multi_seg/describe: IoU per asked/labelled structure
    extra_phrases: int | None = None  # multi_seg: grounded phrases naming no query
    hallucination: bool | None = None  # multi_seg/describe/explain: a forbidden name in the answer


def _union(masks: Sequence[np.ndarray]) -> np.ndarray | None:
    return np.logical_or.reduce(list(masks)) if masks else None


def _named_masks(prediction: Prediction, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(masks of phrases naming ``name``, masks of phrases naming nothing)."""
    named, unnamed = [], []
    for phrase in prediction.phrases:
        mask = phrase.mask_array()
        if mask is None:
            continue
        if names_structure(phrase.phrase, name):
            named.append(mask)
        elif not phrase.phrase.strip():
            unnamed.append(mask)
    return named, unnamed


def _first_mask(prediction: Prediction) -> np.ndarray | None:
    return next((m for m in (p.mask_array() for p in prediction.phrases) if m is not None), None)


def _score_mask(score: RowScore, mask: np.ndarray | None, target: np.ndarray) -> None:
    score.empty_mask = mask is None or not mask.any()
    score.iou, score.dice = metrics.mask_iou_dice(mask, target)


def score_row(row: dict, prediction: Prediction | None, bench: Path) -> RowScore:
    """Score one row; a missing prediction or an error is unparseable and wrong."""
    task, query = row["task"], row.get("query") or row.get("target_name") or ""
    if task in CONVERSATION_TASKS:
        query = row.get("target_name") or ("+".join(row.get("queries", [])) or task)
    score = RowScore(row["id"], task, query, str(row.get("source", "")).split(":")[0], str(row.get("modality", "")))
    if prediction is None or prediction.error is not None:
        prediction = Prediction(row["id"], error="no prediction")
    score.latency_s, score.answer_s = prediction.latency_s, prediction.answer_s
    score.text = prediction.text or prediction.raw_text
    failed = prediction.error is not None
    target = load_mask(bench, row["target_mask"]) if "target_mask" in row else None
    if task == "text_seg":
        named, unnamed = _named_masks(prediction, query)
        _score_mask(score, _union(named or unnamed), target)
        pairs = [(p.phrase, p.mask_array()) for p in prediction.phrases if p.mask is not None]
        score.unparseable = failed or not pairs
        score.grounding_tp = metrics.grounding_matches(pairs, [(query, target)])
        score.grounding_predicted, score.grounding_actual = len(pairs), 1
    elif task in ("box_seg", "point_seg"):
        mask = _first_mask(prediction)
        score.unparseable = failed or mask is None
        _score_mask(score, mask, target)
    elif task == "box_name":
        name = row["target_name"]
        phrases = [p.phrase for p in prediction.phrases]
        score.named = any(names_structure(t, name) for t in [prediction.text, prediction.raw_text, *phrases])
        score.unparseable = failed or not (prediction.text or prediction.raw_text).strip()
        score.correct = bool(score.named) and not failed
        if target is not None:
            named, _ = _named_masks(prediction, name)
            _score_mask(score, named[0] if named else _first_mask(prediction), target)
    elif task == "detect_box":
        _score_detect_box(score, row, prediction, bench, failed)
    elif task in CONVERSATION_TASKS:
        score_conversation(score, row, prediction, bench, failed)
    elif task == "observe":
        answer = None if failed else parse_yes_no(prediction.text or prediction.raw_text)
        score.unparseable = answer is None
        wanted = str(row["target_answer"]).strip().lower()
        score.target_answer = wanted
        score.predicted_answer = answer if answer is not None else ("no" if wanted == "yes" else "yes")
        score.correct = answer == wanted
    return score


def _score_detect_box(score: RowScore, row: dict, prediction: Prediction, bench: Path, failed: bool) -> None:
    named = [p for p in prediction.phrases if (p.mask is not None or p.box is not None)
             and (names_structure(p.phrase, score.query) or not p.phrase.strip())]
    box: list[float] | None = None
    if named and not failed:
        first = named[0]
        box = mask_to_box(first.mask_array()) if first.mask is not None else list(first.box)
    elif not failed:
        width, height = Image.open(bench / row["image"]).size
        box = parse_text_box(prediction.raw_text, (height, width)) or parse_text_box(prediction.text, (height, width))
        if box is None and says_absent(prediction.text or prediction.raw_text):
            box = list(metrics.ABSENT_BOX)
    score.unparseable = box is None
    score.predicted_box = box
    score.box_iou = 0.0 if box is None else metrics.detect_box_score(box, row["target_box"])
    score.correct = score.box_iou >= 0.5


def task_metrics(task: str, scores: Sequence[RowScore]) -> dict:
    """The schema's metrics of one task over ``scores`` (plus a few extra keys)."""
    result: dict = {"n": len(scores), "unparseable": sum(s.unparseable for s in scores),
                    "empty_masks": sum(s.empty_mask for s in scores)}
    if task in CONVERSATION_TASKS:
        return {**result, **conversation_metrics(task, scores)}
    ious = [s.iou for s in scores if s.iou is not None]
    if task in ("text_seg", "box_seg", "point_seg", "box_name"):
        result.update(miou=metrics.mean(ious), dice=metrics.mean([s.dice for s in scores if s.dice is not None]),
                      ap50=metrics.share_at_least(ious))
    if task == "text_seg":
        tp = sum(s.grounding_tp for s in scores)
        predicted, actual = sum(s.grounding_predicted for s in scores), sum(s.grounding_actual for s in scores)
        result.update(grounding_f1=metrics.f1_from_counts(tp, predicted, actual),
                      grounding_precision=tp / predicted if predicted else 0.0,
                      grounding_recall=tp / actual if actual else 0.0)
    if task == "box_name":
        result["accuracy"] = metrics.mean([float(bool(s.correct)) for s in scores])
    if task == "detect_box":
        values = [s.box_iou or 0.0 for s in scores]
        result.update(box_iou=metrics.mean(values), acc50=metrics.share_at_least(values))
    if task == "observe":
        predicted = [s.predicted_answer == "yes" for s in scores]
        actual = [s.target_answer == "yes" for s in scores]
        result.update(metrics.binary_classification(predicted, actual))
        result["confusion"] = {
            "tp": sum(p and a for p, a in zip(predicted, actual)), "fp": sum(p and not a for p, a in zip(predicted, actual)),
            "fn": sum(a and not p for p, a in zip(predicted, actual)),
            "tn": sum(not a and not p for p, a in zip(predicted, actual)),
        }
    return result


def aggregate(rows: Sequence[dict], scores: Sequence[RowScore]) -> dict:
    """The report object: schema keys first, then extras (per source, text metrics, conventions)."""
    by_task: dict[str, list[RowScore]] = {}
    for score in scores:
        by_task.setdefault(score.task, []).append(score)
    tasks = {task: task_metrics(task, items) for task, items in by_task.items()}
    for task, items in by_task.items():
        # generated text vs a reference: the optional key ``target_text`` (any task), else box_name's name
        references = {row["id"]: row.get("target_text") or (row.get("target_name") if task == "box_name" else None)
                      for row in rows if row["task"] == task}
        scored = [s for s in items if references.get(s.id)]
        if scored:
            tasks[task]["text"] = text_scores([s.text for s in scored], [references[s.id] for s in scored])
    per_query: dict[str, dict] = {}
    per_source: dict[str, dict] = {}
    per_modality: dict[str, dict] = {}
    for task, items in by_task.items():
        for key, table in (("query", per_query), ("source", per_source), ("modality", per_modality)):
            if key == "query" and task in ("multi_seg", "describe", "off_topic"):
                continue  # one row asks about several structures (or none): per structure below
            groups: dict[str, list[RowScore]] = {}
            for score in items:
                groups.setdefault(getattr(score, key), []).append(score)
            for name, group in groups.items():
                table.setdefault(name, {})[task] = task_metrics(task, group)
        if task in ("multi_seg", "describe"):
            for name, values in per_structure(task, items).items():
                per_query.setdefault(name, {})[task] = values
    return {
        "n": len(scores),
        "unparseable": sum(s.unparseable for s in scores),
        "empty_masks": sum(s.empty_mask for s in scores),
        "tasks": tasks,
        "per_query": dict(sorted(per_query.items())),
        "latency_s": {
            **metrics.latency_summary([s.latency_s for s in scores]),
            **{f"answer_{k}": v for k, v in metrics.latency_summary([s.answer_s for s in scores]).items()},
        },
        "per_source": dict(sorted(per_source.items())),
        "per_modality": dict(sorted(per_modality.items())),
        "conventions": CONVENTIONS,
    }
