"""Instruction and response templates for the training conversations.

Grounded answers follow LISA/GLaMM: a phrase in ``<p>...</p>`` followed by ``<SEG>`` whose
hidden state decodes the phrase's mask. Boxes in text follow MiniGPT-v2:
``{<x0><y0><x1><y1>}`` with integers on a 0-100 grid of the image (x right, y down).

The first instruction of each task is the exact wording of the benchmark prompt
(``../shared/benchmarks/SCHEMA.md``), so the model sees it in training; the others vary it.

Response templates only frame names and masks; every statement of fact in an answer comes
verbatim from the knowledge base (:mod:`mimo_chat.data.knowledge`). ``FRAME_SENTENCES`` lists
the framing sentences so a test can check that nothing else is asserted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SEG_TOKEN = "<SEG>"
BOX_GRID = 100

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    # Perspective I: text -> mask(s).
    "text_seg": (
        "Segment the {query}.",
        "Please segment the {query} in this image.",
        "Can you outline the {query}?",
        "Show me the {query}.",
        "Highlight the {query} on this slice.",
        "Delineate the {query}.",
        "Where is the {query}? Please give its mask.",
        "Mark the {query} in this scan.",
    ),
    # Perspective II: visual prompt -> name + mask.
    "box_name": (
        "What is the structure in the box?",
        "What is this?",
        "Which structure is inside the box?",
        "Name the structure I have boxed.",
        "What am I looking at in the box?",
    ),
    "point_name": (
        "What is the structure at the point?",
        "What is this?",
        "What did I click on?",
        "Name the structure under the point.",
    ),
    "box_seg": (
        "Segment the structure in the box.",
        "Outline what is inside the box.",
        "Give me the mask of the boxed structure.",
    ),
    "point_seg": (
        "Segment the structure at the point.",
        "Outline the structure I clicked.",
        "Give me the mask of the structure under the point.",
    ),
    # MiniGPT-Pancreas tasks.
    "detect_box": (
        "Where is the {query}? Give its bounding box.",
        "Give the bounding box of the {query}.",
        "Locate the {query} and give its box.",
        "[detection] {query}",
    ),
    "observe": (
        "Is there a {query} in this image? Answer yes or no.",
        "Is the {query} on this slice?",
        "Can you see the {query} in this image?",
        "Does this slice show the {query}?",
    ),
}

# Perspective III: reasoning questions built from a knowledge-base clue (a verb phrase).
REASONING_QUESTIONS: tuple[str, ...] = (
    "Which {kind} {clue}?",
    "Which {kind} in this image {clue}? Please segment it.",
    "Show me the {kind} that {clue}.",
    "Find the {kind} that {clue}.",
)

# Perspective IV: questions about a boxed region, by knowledge-base topic.
REGION_QUESTIONS: dict[str, tuple[str, ...]] = {
    "function": ("What does the structure in the box do?", "What is the function of the boxed structure?"),
    "location": ("Where is the boxed structure located in the body?", "Describe the position of the structure in the box."),
    "relations": ("What is the boxed structure related to?", "What lies next to the structure in the box?"),
    "ct": ("How does the structure in the box look on CT?", "Describe the CT appearance of the boxed structure."),
    "mr": ("How does the structure in the box look on MR?", "Describe the MR appearance of the boxed structure."),
    "hu": ("What attenuation does the boxed structure usually have?", "How dense is the structure in the box on CT?"),
    "pathology": ("What diseases commonly affect the structure in the box?", "What findings are common in the boxed structure?"),
}

RESPONSES: dict[str, tuple[str, ...]] = {
    "grounded": (  # {phrases}: "<p>liver</p><SEG>" or "<p>liver</p><SEG> and <p>spleen</p><SEG>"
        "{phrases}.",
        "Here is the {phrases}.",
        "Sure, the {phrases}.",
        "This is the {phrases}.",
    ),
    "named": (  # perspective II
        "It is the {phrases}.",
        "This is the {phrases}.",
        "The structure is the {phrases}.",
    ),
    # presence answers are grounded first: the <SEG> tells the model what the locator found on the
    # image (modeling/locator.py), and the words after it follow that
    "absent": (  # {phrases}: the one grounded phrase, whose mask is empty
        "{phrases}: there is no {name} on this slice.",
        "{phrases}: the {name} is not visible on this slice.",
    ),
    "box": (  # {box}: MiniGPT-v2 style tokens
        "The {phrases} is at {box}.",
        "{phrases} {box}.",
    ),
    "box_absent": (
        "{phrases}: there is no {name} on this slice, so there is no box.",
    ),
    "yes": (
        "{phrases}: yes, it is on this slice.",
        "{phrases}: yes, it is visible.",
    ),
    "yes_unmasked": (  # present by an image-level label: the <SEG> has no mask target
        "{phrases}: yes, there is a {name} in this image.",
        "{phrases}: yes, it is visible.",
    ),
    "no": (
        "{phrases}: no, there is no {name} on this slice.",
        "{phrases}: no, it is not visible in this image.",
    ),
    "reasoning": (
        "It is the {phrases}.",
        "That is the {phrases}.",
    ),
    "reasoning_multi": (
        "They are the {phrases}.",
    ),
    "region": (
        "This is the {phrases}.",
        "The box contains the {phrases}.",
    ),
}

# Framing sentences (after grounding markup is stripped) that state no fact of their own.
FRAME_SENTENCES: tuple[str, ...] = tuple(
    sentence.strip()
    for templates in RESPONSES.values()
    for template in templates
    for sentence in re.split(r"(?<=[.?!])\s+", template)
    if sentence.strip()
)


def presence_answer(kind: str, name: str, template: str) -> str:
    """An ``absent`` / ``box_absent`` / ``yes_unmasked`` / ``no`` answer about ``name``, grounded first."""
    if template not in RESPONSES[kind]:
        raise ValueError(f"{template!r} is not a {kind!r} template")
    return template.format(phrases=grounded_phrase(name), name=name)


def grounded_phrase(name: str, with_mask: bool = True) -> str:
    """``<p>name</p><SEG>`` (or just ``<p>name</p>`` when there is no mask to decode)."""
    return f"<p>{name}</p>{SEG_TOKEN if with_mask else ''}"


def join_phrases(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c' (the article 'the' is repeated before each item after the first)."""
    if len(phrases) == 1:
        return phrases[0]
    items = [phrases[0]] + [f"the {phrase}" for phrase in phrases[1:]]
    return ", ".join(items[:-1]) + " and " + items[-1]


def box_to_tokens(box: Sequence[float], size: tuple[int, int]) -> str:
    """``[x0, y0, x1, y1]`` pixels of an (H, W) image -> ``{<x0><y0><x1><y1>}`` on the 0-100 grid."""
    height, width = size
    scale = (width, height, width, height)
    values = [min(max(round(BOX_GRID * float(v) / s), 0), BOX_GRID) for v, s in zip(box, scale)]
    return "{" + "".join(f"<{v}>" for v in values) + "}"


def tokens_to_box(text: str, size: tuple[int, int]) -> list[float] | None:
    """Inverse of :func:`box_to_tokens` for the first box in ``text`` (pixels), or None."""
    match = re.search(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}", text)
    if not match:
        return None
    height, width = size
    x0, y0, x1, y1 = (int(v) / BOX_GRID for v in match.groups())
    return [x0 * width, y0 * height, x1 * width, y1 * height]


def strip_grounding(text: str) -> str:
    """Answer text without ``<p>``/``</p>``/``<SEG>`` markup and box tokens."""
    text = re.sub(r"\{(<\d+>){4}\}", "", text)
    return re.sub(r"\s+", " ", text.replace("<p>", "").replace("</p>", "").replace(SEG_TOKEN, "")).strip()


def frame_pattern(template: str) -> re.Pattern[str]:
    """A regex matching a framing sentence with any names filled in."""
    escaped = re.escape(strip_grounding(template))
    for slot in ("phrases", "name", "box"):
        escaped = escaped.replace(re.escape("{" + slot + "}"), r"[\w ,'()-]*")
    return re.compile(rf"^{escaped.strip()}$")
