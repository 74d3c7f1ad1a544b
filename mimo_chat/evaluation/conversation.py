"""Scoring of the v1.1 conversation tasks of the benchmark schema: ``multi_seg``, ``describe``,
``explain`` and ``off_topic``.

Rules beyond the schema (also written into the report under ``"conventions"``):

- ``multi_seg`` / ``describe``: a structure's mask is that of the FIRST grounded phrase (a phrase
  with a mask) that names it, so naming a structure twice cannot pick the better mask. No
  grounded phrase at all = unparseable (every query / target scores IoU 0).
- ``explain``: correct when the first known structure named in the answer text is
  ``target_name`` and every grounded phrase that names a known structure names ``target_name``
  (a mask on the box labelled with another structure is a wrong identification; other
  structures may still be mentioned in sentences, e.g. relations). No known structure named =
  unparseable. Known structures: the knowledge base's names and synonyms plus the labelled
  structures of the data sources (``KNOWN_EXTRA``).
- ``off_topic``: declined when the answer has no phrase (grounded or not), no mask, and says
  what the tool can help with (``parsing.says_capabilities``). An empty answer = unparseable.
- ``hallucination``: a row counts once when any of its ``forbidden_names`` is named anywhere in
  the answer text (raw text included, so a name inside ``<p>`` counts too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mimo_chat.data.names import SYNONYMS, canonical_name, names_structure, normalize
from mimo_chat.evaluation import metrics
from mimo_chat.evaluation.parsing import says_capabilities
from mimo_chat.evaluation.runner import Prediction, load_mask

if TYPE_CHECKING:
    from mimo_chat.evaluation.scoring import RowScore

CONVERSATION_CONVENTIONS = __doc__.split("(also written into the report under ``\"conventions\"``):")[1].strip()

# Labelled structures of the data sources (and their generic forms) that the knowledge base may lack.
KNOWN_EXTRA = (
    "lung", "left lung", "right lung", "clavicle", "left clavicle", "right clavicle", "kidney", "kidney tumour",
    "pancreatic tumour", "small bowel", "large bowel", "colon", "brain", "heart", "diaphragm", "rib", "spine",
    "vertebra", "adrenal gland", "bladder", "tumour",
)
MAX_NAME_WORDS = 6


@lru_cache(maxsize=1)
def known_structures() -> tuple[str, ...]:
    """Names of every structure the project knows (knowledge base names and synonyms, ``KNOWN_EXTRA``)."""
    from mimo_chat.data.knowledge import load_knowledge_base

    names = set(KNOWN_EXTRA)
    for entry in load_knowledge_base():
        names.add(entry.name)
        names.update(entry.synonyms)
    return tuple(sorted(names))


@lru_cache(maxsize=4096)
def _tokens(name: str) -> frozenset[str]:
    """Words of every variant of ``name`` (a mention must contain one of them)."""
    canonical = canonical_name(name)
    return frozenset(w for variant in (canonical, *SYNONYMS.get(canonical, ())) for w in normalize(variant).split())


def _first_span(words: Sequence[str], name: str) -> tuple[int, int] | None:
    """(start, end) word indices of the first mention of ``name`` in ``words``, or None."""
    tokens = _tokens(name)
    for end in range(1, len(words) + 1):
        last = words[end - 1]
        if {last, last.removesuffix("s"), last.removesuffix("es")} & tokens and names_structure(" ".join(words[max(0, end - MAX_NAME_WORDS):end]), name):
            start = max(s for s in range(max(0, end - MAX_NAME_WORDS), end)
                        if names_structure(" ".join(words[s:end]), name))
            return start, end
    return None


def first_named(text: str, vocabulary: Iterable[str] | None = None) -> str | None:
    """The structure of ``vocabulary`` (default :func:`known_structures`) named first in ``text``.

    Mentions are ordered by their first word; of two starting there ("kidney" and "kidney
    (left)") the longer, more specific one wins. Returns the canonical name.
    """
    words = normalize(text).split()
    stems = {w for word in words for w in (word, word.removesuffix("s"), word.removesuffix("es"))}
    names = [n for n in (tuple(vocabulary) if vocabulary is not None else known_structures()) if _tokens(n) & stems]
    spans = [(span[0], -(span[1] - span[0]), name) for name in names if (span := _first_span(words, name)) is not None]
    return canonical_name(min(spans)[2]) if spans else None


def names_any(text: str, names: Sequence[str]) -> bool:
    return any(names_structure(text, name) for name in names)


def _grounded(prediction: Prediction) -> list[tuple[str, np.ndarray]]:
    """(phrase, mask) of every phrase with a mask, in answer order."""
    pairs = [(p.phrase, p.mask_array()) for p in prediction.phrases if p.mask is not None]
    return [(phrase, mask) for phrase, mask in pairs if mask is not None]


def structure_ious(grounded: Sequence[tuple[str, np.ndarray]], targets: dict[str, np.ndarray]) -> dict[str, float]:
    """Per target name: IoU of the first grounded phrase naming it with its mask (0 when not named)."""
    result = {}
    for name, target in targets.items():
        mask = next((m for phrase, m in grounded if names_structure(phrase, name)), None)
        result[name] = 0.0 if mask is None else metrics.mask_iou_dice(mask, target)[0]
    return result


def _answer_text(prediction: Prediction) -> str:
    return f"{prediction.text}\n{prediction.raw_text}"


def _target_masks(row: dict, names: Sequence[str], bench: Path) -> dict[str, np.ndarray]:
    return {name: load_mask(bench, row["target_masks"][name]) for name in names}


def score_conversation(score: RowScore, row: dict, prediction: Prediction, bench: Path, failed: bool) -> None:
    """Fill ``score`` for one row of a conversation task (the prediction already failed or not)."""
    task = row["task"]
    text = "" if failed else _answer_text(prediction)
    forbidden = list(row.get("forbidden_names", []))
    if task in ("multi_seg", "describe", "explain"):
        score.hallucination = names_any(text, forbidden)
    grounded = [] if failed else _grounded(prediction)
    if task in ("multi_seg", "describe"):
        names = list(row["queries"] if task == "multi_seg" else row["target_names"])
        ious = structure_ious(grounded, _target_masks(row, names, bench))
        score.query_ious = ious
        score.iou = metrics.mean(list(ious.values()))
        score.recall = metrics.share_at_least(list(ious.values()))
        score.unparseable = failed or not grounded
        score.empty_mask = not grounded or not all(m.any() for _, m in grounded)
        if task == "multi_seg":
            score.extra_phrases = sum(not names_any(phrase, names) for phrase, _ in grounded)
    elif task == "explain":
        first = first_named(prediction.text or prediction.raw_text) if not failed else None
        target = row["target_name"]
        known = known_structures()
        wrong_masks = [p for p, _ in grounded if names_any(p, known) and not names_structure(p, target)]
        score.unparseable = first is None
        score.correct = first is not None and names_structure(first, target) and not wrong_masks
        score.named = score.correct
    elif task == "off_topic":
        answer = prediction.text or prediction.raw_text
        score.unparseable = failed or not answer.strip()
        no_phrase = not prediction.phrases and "<p>" not in prediction.raw_text
        score.correct = not score.unparseable and no_phrase and says_capabilities(answer)


def conversation_metrics(task: str, scores: Sequence[RowScore]) -> dict:
    """The schema's metric keys of one conversation task over ``scores``."""
    if task in ("multi_seg", "describe"):
        ious = [v for s in scores for v in (s.query_ious or {}).values()]
        result = {"miou": metrics.mean(ious), "recall": metrics.share_at_least(ious)}
        if task == "multi_seg":
            result["extra_phrases"] = metrics.mean([float(s.extra_phrases or 0) for s in scores])
        result["hallucination"] = metrics.mean([float(bool(s.hallucination)) for s in scores])
        return result
    if task == "explain":
        return {"accuracy": metrics.mean([float(bool(s.correct)) for s in scores]),
                "hallucination": metrics.mean([float(bool(s.hallucination)) for s in scores])}
    if task == "off_topic":
        return {"decline_rate": metrics.mean([float(bool(s.correct)) for s in scores])}
    raise ValueError(f"not a conversation task: {task}")


def per_structure(task: str, scores: Sequence[RowScore]) -> dict[str, dict]:
    """Per structure name of ``multi_seg``/``describe`` rows: n (times asked), miou, recall."""
    values: dict[str, list[float]] = {}
    for score in scores:
        for name, iou in (score.query_ious or {}).items():
            values.setdefault(canonical_name(name), []).append(iou)
    return {name: {"n": len(ious), "miou": metrics.mean(ious), "recall": metrics.share_at_least(ious)}
            for name, ious in values.items()}
