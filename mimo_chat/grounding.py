"""Grounded replies: parse ``<p>phrase</p><SEG>`` and MiniGPT-v2 boxes ``{<x1><y1><x2><y2>}``.

A reply's raw text may contain

* ``<p>name</p><SEG>`` – a phrase and the request for its mask (the k-th ``<SEG>`` gets the k-th
  decoded mask); ``<p>name<SEG>`` (unclosed) also grounds ``name``;
* ``<p>name</p>`` without ``<SEG>`` – a phrase with **no mask** (kept, reported explicitly);
* ``{<x1><y1><x2><y2>}`` – a MiniGPT-v2 box on a 0–100 grid, attached to the phrase just before it;
* nested ``<p>`` (the inner tags are ignored), stray ``</p>`` (ignored), a ``<SEG>`` with no phrase
  (kept as a grounded phrase with an empty name).

Masks and boxes are one structure: every grounded mask also gets its tight box, and a text box
without a mask is a :class:`GroundedPhrase` with ``mask=None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mimo_chat.boxes import mask_to_box
from mimo_chat.modeling.language_model import IMAGE_TOKEN, PHRASE_END, PHRASE_START, SEG_TOKEN

_NUMBER = r"\s*<\s*\d+(?:\.\d+)?\s*>\s*"
_BOX = r"\{" + _NUMBER * 4 + r"\}"
_MARKUP = re.compile(rf"(<p>|</p>|<SEG>|<image>|{_BOX})")
_PARTIAL_TAIL = re.compile(r"(\{[\s<>\d.]*|<[/pSEGimage]*)$")  # an unfinished tag or box at the end


@dataclass
class GroundedPhrase:
    phrase: str
    mask: np.ndarray | None  # (H, W) bool at the original resolution; None = no mask
    box: list[float] | None  # [x0, y0, x1, y1] original pixels, x1/y1 exclusive
    score: float | None  # decoder-predicted IoU of the mask
    name_score: float | None = None  # how sure the locator / namer is of the name (0..1)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None


@dataclass
class GroundedReply:
    raw_text: str  # as generated, with tags
    text: str  # plain text for display (tags and boxes removed)
    phrases: list[GroundedPhrase]
    sources: list[str] = field(default_factory=list)  # references of the knowledge-base sentences


@dataclass
class PhraseSpan:
    """A phrase found in raw text: which ``<SEG>`` (0-based) grounds it and any text box (0–100 grid)."""

    phrase: str
    seg_index: int | None = None
    grid_box: list[float] | None = None


def _clean(text: str) -> str:
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r" +([.,;:!?])", r"\1", text)


def parse_grounded_text(raw: str) -> tuple[str, list[PhraseSpan]]:
    """Raw reply text -> (plain text, phrases in order of appearance)."""
    plain: list[str] = []
    spans: list[PhraseSpan] = []
    depth = 0
    buffer: list[str] = []
    attachable: PhraseSpan | None = None  # the phrase a following <SEG> or box may attach to
    seg_count = 0

    def close_open_phrase() -> PhraseSpan:
        nonlocal depth
        span = PhraseSpan(phrase=" ".join("".join(buffer).split()))
        spans.append(span)
        depth = 0
        buffer.clear()
        return span

    for piece in _MARKUP.split(raw):
        if not piece:
            continue
        if piece == PHRASE_START:
            if depth == 0:
                buffer.clear()
            depth += 1
        elif piece == PHRASE_END:
            if depth == 1:
                attachable = close_open_phrase()
            elif depth > 1:
                depth -= 1
        elif piece == SEG_TOKEN:
            if depth > 0:
                attachable = close_open_phrase()
            if attachable is None or attachable.seg_index is not None:
                attachable = PhraseSpan(phrase="")
                spans.append(attachable)
            attachable.seg_index = seg_count
            seg_count += 1
        elif piece == IMAGE_TOKEN:
            continue
        elif piece.startswith("{"):
            grid_box = [float(value) for value in re.findall(r"\d+(?:\.\d+)?", piece)]
            if depth > 0:
                attachable = close_open_phrase()
            if attachable is None or attachable.grid_box is not None:
                attachable = PhraseSpan(phrase="")
                spans.append(attachable)
            attachable.grid_box = grid_box
        else:
            plain.append(piece)
            if depth > 0:
                buffer.append(piece)
            elif re.search(r"\w", piece):
                attachable = None  # words between a phrase and a <SEG> break the link
    if depth > 0:
        close_open_phrase()
    return _clean("".join(plain)).strip(), spans


def render_plain_text(raw: str, partial: bool = False) -> str:
    """Plain display text of ``raw``; with ``partial`` an unfinished tag or box at the end is held back."""
    if partial:
        raw = _PARTIAL_TAIL.sub("", raw)
        text, _ = parse_grounded_text(raw + "\x00")  # keep trailing spaces while streaming
        return text[:-1]
    return parse_grounded_text(raw)[0]


def grid_box_to_pixels(grid_box: list[float], image_size: tuple[int, int]) -> list[float]:
    """MiniGPT-v2 box on the 0–100 grid -> [x0, y0, x1, y1] pixels of an (H, W) image (clipped, ordered)."""
    height, width = image_size
    x0, y0, x1, y1 = (min(max(v, 0.0), 100.0) / 100.0 for v in grid_box)
    x0, x1 = sorted((x0 * width, x1 * width))
    y0, y1 = sorted((y0 * height, y1 * height))
    return [x0, y0, x1, y1]


def pixels_to_grid_box(box: list[float], image_size: tuple[int, int]) -> str:
    """[x0, y0, x1, y1] pixels -> the MiniGPT-v2 text ``{<x0><y0><x1><y1>}`` on the 0–100 grid."""
    height, width = image_size
    scaled = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    return "{" + "".join(f"<{round(100 * v)}>" for v in scaled) + "}"


def ground_phrase(
    span: PhraseSpan,
    masks: list[tuple[np.ndarray, float]],
    image_size: tuple[int, int],
    name_scores: list[float | None] | None = None,
) -> GroundedPhrase:
    """One span with the decoded ``masks`` (k-th ``<SEG>`` -> k-th entry, with its name score) -> a GroundedPhrase."""
    if span.seg_index is not None and span.seg_index < len(masks):
        mask, score = masks[span.seg_index]
        scores = name_scores or []
        name_score = scores[span.seg_index] if span.seg_index < len(scores) else None
        return GroundedPhrase(span.phrase, mask, mask_to_box(mask), float(score), name_score)
    if span.grid_box is not None:
        return GroundedPhrase(span.phrase, None, grid_box_to_pixels(span.grid_box, image_size), None)
    return GroundedPhrase(span.phrase, None, None, None)


def build_reply(
    raw_text: str,
    masks: list[tuple[np.ndarray, float]],
    image_size: tuple[int, int],
    name_scores: list[float | None] | None = None,
    sources: list[str] | None = None,
) -> GroundedReply:
    """Raw text + the decoded (mask, score) and name score of each ``<SEG>`` in order -> GroundedReply."""
    text, spans = parse_grounded_text(raw_text)
    phrases = [ground_phrase(span, masks, image_size, name_scores) for span in spans]
    return GroundedReply(raw_text, text, phrases, list(sources or []))


def describe_phrase(phrase: GroundedPhrase) -> str:
    """One line for terminals and logs, saying "no mask" explicitly."""
    name = phrase.phrase or "(unnamed)"
    if phrase.mask is not None:
        named = "" if phrase.name_score is None else f", name score {phrase.name_score:.2f}"
        return (
            f"{name}: mask of {int(phrase.mask.sum())} px, box {[round(v, 1) for v in phrase.box]}, "
            f"score {phrase.score:.2f}{named}"
        )
    if phrase.box is not None:
        return f"{name}: no mask; box from text {[round(v, 1) for v in phrase.box]}"
    return f"{name}: no mask"
