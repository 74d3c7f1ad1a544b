"""Reading answers: yes/no, "it is absent", boxes written as text, names; compact mask encoding.

Name matching itself lives in :mod:`mimo_chat.data.names` (shared with the data builders).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mimo_chat.data.names import names_structure, normalize
from mimo_chat.grounding import grid_box_to_pixels

__all__ = ["mask_to_rle", "names_structure", "parse_text_box", "parse_yes_no", "rle_to_mask", "says_absent",
           "says_capabilities"]

_YES = {"yes", "yeah", "yep", "yup", "correct", "affirmative", "true", "present", "visible"}
_NO = {"no", "nope", "negative", "false", "absent", "none"}

_ABSENT_PATTERNS = [
    r"\bno (visible |identifiable |obvious |evident )?[a-z ]*\b(is |are )?(seen|visible|present|shown|identified)\b",
    r"\bthere (is|are) no\b",
    r"\bno [a-z ]{0,40}\b(in|on) (this|the) (image|slice|scan)\b",
    r"\b(is|are) not (visible|present|seen|shown|included|identified|depicted|in (this|the) (image|slice|scan))\b",
    r"\b(isn t|aren t|is not|are not) (visible|present|seen|shown|there)\b",
    r"\bnot (visible|present|seen|shown|identified|depicted)\b",
    r"\b(does not|doesn t|do not|don t) (contain|show|include|appear|depict)\b",
    r"\b(does not|doesn t|do not|don t) (find|mark)\b",  # "the model does not mark a tumour on this slice"
    r"\b(cannot|can not|can t|could not|couldn t) (be )?(see|find|seen|found|identify|identified|locate|located)\b",
    r"\babsent\b",
    r"\bnot (in|on) (this|the) (image|slice|scan)\b",
]
# "cannot tell whether there is a tumour" answers neither way, though it contains "there is a"
# (matched on normalised text: "can't" reads "can t").
_UNSURE_PATTERNS = [r"\b(cannot|can not|can t|cant) (tell|say|determine|decide)\b", r"\b(not sure|unsure) whether\b"]

_AFFIRM_PATTERNS = [
    r"\bthere (is|are) (a|an|the|some)\b",
    r"\b(is|are) (visible|present|seen|shown)\b",
    r"\b(i can see|i see|shows|contains|depicts|demonstrates|appears)\b",
]


# A decline that says what the tool is for: "I can help with questions about this image: ...".
_CAPABILITY_PATTERNS = [
    (r"\bi (can|could) (only )?(help|assist|segment|outline|show|answer|describe|find|identify|locate|explain|"
    r"name|point|highlight|mark|tell)\b"),
    r"\bi (am|m) (only )?(able|here|designed|built|made) to\b",
    r"\bi (only )?(answer|help with|work with|handle|deal with|cover)\b",
    (r"\b(this|the) (tool|assistant|app|chat) (can|could|only|is (for|made|built|designed)|helps|answers|segments|"
    r"outlines|names|describes|finds|shows|explains|works)\b"),
    r"\bask me (about|to|for)\b",
    r"\bi (am|m) an? [a-z ]{0,30}\b(assistant|tool)\b",
]


def says_capabilities(text: str) -> bool:
    """Whether the answer says what the tool can help with (the second half of a polite decline)."""
    clean = normalize(text)
    return any(re.search(pattern, clean) for pattern in _CAPABILITY_PATTERNS)


def says_absent(text: str) -> bool:
    """Whether the answer states that the structure is not in the image."""
    clean = normalize(text)
    return any(re.search(pattern, clean) for pattern in _ABSENT_PATTERNS)


def parse_yes_no(text: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (unparseable) from a free-text answer.

    The first yes/no word decides ("Yes, there is no doubt" -> yes); without one, saying it
    cannot tell is no answer, a statement of absence means no and a statement of presence means yes.
    """
    words = normalize(text).split()
    for word in words:
        if word in {"yes", "yeah", "yep", "yup"}:
            return "yes"
        if word in {"no", "nope"}:
            return "no"
    if words and words[0] in _YES:
        return "yes"
    if words and words[0] in _NO:
        return "no"
    clean = " ".join(words)
    if any(re.search(pattern, clean) for pattern in _UNSURE_PATTERNS):
        return None
    if says_absent(text):
        return "no"
    if any(re.search(pattern, clean) for pattern in _AFFIRM_PATTERNS):
        return "yes"
    return None


_GRID_BOX = re.compile(r"\{?\s*<\s*(\d+(?:\.\d+)?)\s*>\s*<\s*(\d+(?:\.\d+)?)\s*>\s*<\s*(\d+(?:\.\d+)?)\s*>\s*<\s*(\d+(?:\.\d+)?)\s*>\s*\}?")


def parse_text_box(text: str, size: tuple[int, int]) -> list[float] | None:
    """The first ``{<x1><y1><x2><y2>}`` box in ``text`` (0–100 grid) in pixels of an image of ``size`` (H, W).

    Grid value ``v`` maps to ``v / 100 * W`` (x) or ``v / 100 * H`` (y); corners are sorted.
    """
    match = _GRID_BOX.search(text)
    if match is None:
        return None
    return grid_box_to_pixels([float(v) for v in match.groups()], size)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Run-length code of a 2D bool mask in row-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`: (H, W) bool."""
    height, width = rle["size"]
    counts: Sequence[int] = rle["counts"]
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(height, width)
