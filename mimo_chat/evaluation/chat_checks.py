"""Automatic checks of one chat reply against the label masks of a real dev image.

Used by the chat regression set (:mod:`mimo_chat.evaluation.chat_regression`). A reply is
checked for:

- ``forbidden``: no structure that cannot be on this kind of image is named
  (:func:`mimo_chat.data.chat_bench.forbidden_names`);
- ``unsupported``: every sentence is a knowledge-base statement about a structure grounded in
  this reply or an earlier turn of the conversation (drawn with a mask, or stated found without
  a reliable outline: ``mimo_chat.evidence.framing.found_without_outline``), or matches one of
  ``mimo_chat.evidence.framing.FRAMING_PATTERNS`` (the fixed framing sentences);
- ``names``: the first structure named is the expected one, and no grounded phrase names a
  labelled structure its mask does not cover (IoU below ``MASK_IOU``) or one labelled absent;
- ``masks``: each structure asked for has a grounded phrase naming it whose mask has IoU >=
  ``MASK_IOU`` with the label (or, for ``grounded_any``, at least one of them does);
- ``absent``: no non-empty mask is given to a structure labelled absent, and a yes/no answer
  (``answer``) is read from the reply;
- ``knowledge``: the reply contains a knowledge-base fact of the asked topic about the structure;
- ``decline``: an off-topic question gets no phrase, no mask and a statement of what the tool does;
- ``on_topic``: any other question (a finding the model does not judge included) does not get that decline.

``MASK_IOU = 0.5`` is the schema's hit criterion (AP50, ``multi_seg``/``describe`` recall), so this
set and the benchmark agree on what "the mask is on the structure" means; a mask on a neighbouring
organ overlaps the asked one's label far below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from mimo_chat.data.names import names_structure
from mimo_chat.evaluation import metrics
from mimo_chat.evaluation.conversation import first_named, names_any
from mimo_chat.evaluation.parsing import parse_yes_no, says_capabilities
from mimo_chat.evidence.framing import FRAMING_PATTERNS, fill, found_without_outline

MASK_IOU = 0.5
CHECKS = ("forbidden", "unsupported", "names", "masks", "absent", "knowledge", "decline", "on_topic", "uncovered")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class ImageTruth:
    """What is known about one dev image: label masks of present structures, labelled-absent names,
    forbidden names."""

    masks: dict[str, np.ndarray]
    absent: tuple[str, ...]
    forbidden: tuple[str, ...]


@dataclass
class TurnResult:
    """Outcome of each applicable check of one turn (``None`` = not applicable)."""

    checks: dict[str, bool | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(v for v in self.checks.values() if v is not None)



@lru_cache(maxsize=1)
def _kb_entries() -> tuple:
    from mimo_chat.data.knowledge import load_knowledge_base

    return tuple(load_knowledge_base())


def kb_entry_names(entry) -> list[str]:
    return [entry.name, *entry.synonyms]


def grounded_phrases(reply) -> list[tuple[str, np.ndarray]]:
    """(phrase, mask) of every phrase of ``reply`` with a mask."""
    return [(p.phrase, np.asarray(p.mask, dtype=bool)) for p in reply.phrases if p.mask is not None]


def found_names(reply) -> list[str]:
    """Structures the reply grounds: phrases drawn with a mask and those it says are found without an outline."""
    return [p.phrase for p in reply.phrases if p.mask is not None] + found_without_outline(reply.text)


def grounded_entries(phrases: Iterable[str]) -> list:
    """Knowledge-base entries named by any of ``phrases``."""
    names = list(phrases)
    return [e for e in _kb_entries() if any(names_any(p, kb_entry_names(e)) for p in names)]


def split_sentences(text: str) -> list[str]:
    """Sentences of a reply; a ``Source: ...`` line stays one sentence (reference titles hold full stops)."""
    sentences = []
    for line in text.splitlines():
        head, marker, source = line.partition("Source:")
        sentences += [s.strip() for s in _SENTENCE_END.split(head) if s.strip(" .")]
        if marker:
            sentences.append(f"{marker}{source}".strip())
    return sentences


def unsupported_sentences(text: str, grounded: Iterable[str]) -> list[str]:
    """Sentences of ``text`` that are neither a KB fact of a grounded structure nor framing.

    Facts are cut out of the text first (verbatim, longest first, so a fact's own full stops
    such as "approx." cannot split it); each remaining sentence must match a framing pattern in full.
    """
    facts = sorted({f.text.strip() for e in grounded_entries(grounded) for f in e.facts()}, key=len, reverse=True)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for fact in facts:
        lines = [line.replace(" ".join(fact.split()), "\n") for line in lines]
    patterns = FRAMING_PATTERNS
    return [s for s in split_sentences("\n".join(lines)) if not any(p.fullmatch(s) for p in patterns)]


def _iou(mask: np.ndarray, target: np.ndarray) -> float:
    return metrics.mask_iou_dice(mask, target)[0]


def check_turn(reply, expect: dict, truth: ImageTruth, earlier_grounded: Sequence[str]) -> TurnResult:
    """Run every check that applies to one reply (``expect`` as in ``tests/chat_regression.jsonl``)."""
    result = TurnResult()
    text = f"{reply.text}\n{reply.raw_text}"
    grounded = grounded_phrases(reply)
    found = [n for n in truth.forbidden if names_structure(text, n)]
    result.checks["forbidden"] = not found
    if found:
        result.notes.append(f"forbidden names: {found}")
    if expect.get("decline"):
        result.checks["decline"] = declines(reply)
        return _unsupported(result, reply.text, [])
    result.checks["on_topic"] = not declines(reply)
    if not result.checks["on_topic"]:
        result.notes.append("declined as off-topic")
    result.checks["names"] = _names_ok(result, reply, expect, truth, grounded)
    if "grounded" in expect or "grounded_any" in expect:
        result.checks["masks"] = _masks_ok(result, expect, truth, grounded)
    if "absent" in expect or "answer" in expect:
        result.checks["absent"] = _absent_ok(result, reply, expect, grounded)
    if "uncovered" in expect:
        result.checks["uncovered"] = _uncovered_ok(result, reply, expect, grounded)
    if "kb" in expect:
        name, topic = expect["kb"]
        wanted = [" ".join(f.text.split()) for e in grounded_entries([name]) if names_structure(e.name, name)
                  for f in e.facts(topic)]
        result.checks["knowledge"] = any(fact in " ".join(reply.text.split()) for fact in wanted)
        if not result.checks["knowledge"]:
            result.notes.append(f"no {topic} fact of the {name}")
    return _unsupported(result, reply.text, found_names(reply) + list(earlier_grounded))


def declines(reply) -> bool:
    """The off-topic decline: no phrase, no mask, and a statement of what the tool can do."""
    return not reply.phrases and "<p>" not in reply.raw_text and says_capabilities(reply.text)


def _unsupported(result: TurnResult, text: str, grounded: Sequence[str]) -> TurnResult:
    extra = unsupported_sentences(text, grounded)
    result.checks["unsupported"] = not extra
    if extra:
        result.notes.append(f"unsupported: {extra[:3]}")
    return result


def _names_ok(result: TurnResult, reply, expect: dict, truth: ImageTruth,
              grounded: Sequence[tuple[str, np.ndarray]]) -> bool:
    ok = True
    if "first" in expect:
        first = first_named(reply.text)
        if first is None or not names_structure(first, expect["first"]):
            result.notes.append(f"first named {first!r}, expected {expect['first']!r}")
            ok = False
    for phrase, mask in grounded:
        labelled = [n for n in truth.masks if names_structure(phrase, n)]
        if labelled and max(_iou(mask, truth.masks[n]) for n in labelled) < MASK_IOU:
            result.notes.append(f"'{phrase}' mask misses its label")
            ok = False
        if mask.any() and any(names_structure(phrase, n) for n in truth.absent) and not labelled:
            result.notes.append(f"'{phrase}' is labelled absent but got a mask")
            ok = False
    return ok


def _masks_ok(result: TurnResult, expect: dict, truth: ImageTruth, grounded: Sequence[tuple[str, np.ndarray]]) -> bool:
    def hit(name: str) -> bool:
        masks = [m for p, m in grounded if names_structure(p, name)]
        return bool(masks) and _iou(masks[0], truth.masks[name]) >= MASK_IOU

    if "grounded" in expect:
        missed = [n for n in expect["grounded"] if not hit(n)]
        if missed:
            result.notes.append(f"no mask on {missed}")
        return not missed
    ok = any(hit(n) for n in expect["grounded_any"] if n in truth.masks)
    if not ok:
        result.notes.append(f"none of {expect['grounded_any']} grounded")
    return ok


def _uncovered_ok(result: TurnResult, reply, expect: dict, grounded: Sequence[tuple[str, np.ndarray]]) -> bool:
    """Anatomy the reference does not cover is said to be so, and nothing else is outlined in its place."""
    text = " ".join(reply.text.split())
    unsaid = [name for name in expect["uncovered"] if fill("not_in_reference", name=name) not in text]
    stray = [phrase for phrase, _ in grounded if not any(names_structure(phrase, n) for n in expect.get("grounded", []))]
    if unsaid:
        result.notes.append(f"not said to be outside the reference: {unsaid}")
    if stray:
        result.notes.append(f"outlined instead: {stray}")
    return not unsaid and not stray


def _absent_ok(result: TurnResult, reply, expect: dict, grounded: Sequence[tuple[str, np.ndarray]]) -> bool:
    ok = True
    for name in expect.get("absent", []):
        if any(m.any() for p, m in grounded if names_structure(p, name)):
            result.notes.append(f"mask given to absent {name}")
            ok = False
    if "answer" in expect:
        answer = parse_yes_no(reply.text)
        if answer != expect["answer"]:
            result.notes.append(f"answered {answer!r}, expected {expect['answer']!r}")
            ok = False
    return ok
