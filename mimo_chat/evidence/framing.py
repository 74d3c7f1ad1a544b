"""The fixed framing sentences of a grounded reply: the only sentences that are not knowledge-base facts.

A reply is planned (``mimo_chat.evidence.compose``) from three kinds of sentence:

* knowledge-base statements (``KnowledgeEntry.facts``) about a structure the image evidence grounds;
* a ``Source: ...`` line naming where those statements come from;
* the framing sentences below, which connect names and facts and assert nothing medical themselves.

Each template's slots are filled with structure names (``{name}``, ``{names}``), an image kind
(``{kind}``) or a reference list (``{sources}``); in the raw reply a name slot holds the grounded
markup ``<p>name</p><SEG>``. :data:`FRAMING_PATTERNS` matches the plain display text of a framing
sentence (markup removed), so a checker can tell framing from facts with :func:`split_sentences`.
"""

from __future__ import annotations

import re

# A slot holding one or several structure names ("liver", "liver, the spleen and the left kidney").
_NAMES = r"[\w ,'()/-]+?"
# What the image is called: "slice" for an axial slice, "image" for a radiograph or a coronal / sagittal view.
WHERES = ("slice", "image")
_WHERE = "(?:" + "|".join(WHERES) + ")"
_KIND = r"[\w ,'()/-]+?"
_SOURCES = r".+?"

TEMPLATES: dict[str, str] = {
    # segment / show
    "segment": "Here is the {names}.",
    "segment_several": "Here are the {names}.",
    "absent": "The {name} is not on this {where}.",
    "no_outline": "The model finds the {name} on this {where} but cannot outline it reliably.",
    "present_no_outline": "Yes, the model finds the {name} on this {where} but cannot outline it reliably.",
    "not_on_kind": "The {name} is not seen on {kind}.",
    "cannot_find": "The model has not learned to find the {name} on images.",
    "not_in_reference": "The {name} is not in the model's reference, so it cannot find, outline or explain it.",
    # what is this (box / click)
    "identify": "This is the {name}.",
    "identify_several": "These are the {names}.",
    "identify_unsure": "This looks like the {name}, but I am not sure.",
    "identify_unknown": "I cannot name the {name} with confidence.",
    # is there X
    "present": "Yes, the model finds the {name} on this {where}.",
    "not_present": "No, the model does not find the {name} on this {where}.",
    "lesion_present": "Yes, the model marks a possible {name} on this {where}.",
    "lesion_absent": "No, the model does not mark a {name} on this {where}.",
    "lesion_not_marked": "The model does not mark a {name} on this {where}.",
    "lesion_unsure": "The model cannot tell reliably whether there is a {name} on this {where}.",
    "lesion_caveat": "The model's lesion detection is not reliable enough to rule one out.",
    "observation": "This is a model observation, not a diagnosis.",
    # where is X
    "locate": "The {name} is marked on the image.",
    # describe the image
    "kind": "This looks like {kind}.",
    "describe": "On this {where} the model finds the {names}.",
    "describe_none": "The model finds none of the structures it knows on this {where}.",
    "describe_no_outline": "It also finds the {names}, without a reliable outline.",
    "describe_none_outlined": "On this {where} the model finds the {names}, without a reliable outline.",
    # slice level
    "level_at": "This slice is at the level of the {name}.",
    "level_above": "This slice is above the {name}.",
    "level_below": "This slice is below the {name}.",
    "level_unknown": "I cannot tell the level of this slice from the structures the model finds.",
    "level_not_axial": "This image is not an axial slice: it shows many levels at once, so it has no single level.",
    # whole-study size and volume
    "volume": "Sizes and volumes need the whole study; the model measures the {names} over every slice of an opened volume.",
    # is it normal? (a judgement the model does not make)
    "judgement": (
        "I cannot tell whether the {name} is normal or abnormal; the model names and outlines anatomy and does not "
        "make diagnoses."
    ),
    "judgement_several": (
        "I cannot tell whether the {names} are normal or abnormal; the model names and outlines anatomy and does not "
        "make diagnoses."
    ),
    "judgement_image": (
        "I cannot tell what is normal or abnormal on this image; the model names and outlines anatomy and does not "
        "make diagnoses."
    ),
    "thanks": "You're welcome.",
    # no answer / no target / off-topic
    "unknown_fact": "I don't have that in my reference.",
    "need_prompt": "Draw a box or click on a structure first, or name the structure you mean.",
    "need_name": "Which structure do you mean?",
    "off_topic": (
        "I can only answer questions about this image: I can segment and find structures, name what you "
        "box or click, describe the slice and explain anatomy from my reference."
    ),
    "source": "Source: {sources}.",
}


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template)
    return re.compile(rf"^{_slots_to_regex(escaped)}$")


def _slots_to_regex(escaped: str) -> str:
    for slot, expression in (("names", _NAMES), ("name", _NAMES), ("kind", _KIND), ("sources", _SOURCES),
                             ("where", _WHERE)):
        escaped = escaped.replace(re.escape("{" + slot + "}"), expression)
    return escaped


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Plain reply text -> sentences (split after ``.``, ``?`` or ``!`` before a capital letter)."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


# One compiled regex per framing sentence (templates of two sentences give two patterns).
FRAMING_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    _pattern(sentence) for template in TEMPLATES.values() for sentence in split_sentences(template)
)

def is_framing(sentence: str) -> bool:
    """Whether a plain-text sentence is one of the fixed framing sentences (names filled in)."""
    return any(pattern.match(sentence.strip()) for pattern in FRAMING_PATTERNS)


# Sentences that state structures found on the image without drawing them (their names are evidence
# as much as a drawn mask is).
FOUND_WITHOUT_OUTLINE = ("no_outline", "present_no_outline", "describe_no_outline", "describe_none_outlined")


def found_without_outline(text: str) -> list[str]:
    """The names that ``text`` (plain display text) says are found but not outlined."""
    found = []
    for key in FOUND_WITHOUT_OUTLINE:
        slot = "{names}" if "{names}" in TEMPLATES[key] else "{name}"
        head, tail = TEMPLATES[key].split(slot)
        pattern = re.compile(_slots_to_regex(re.escape(head)) + r"(?P<names>" + _NAMES + r")"
                             + _slots_to_regex(re.escape(tail)))
        for sentence in split_sentences(text):
            match = pattern.fullmatch(sentence.strip())
            if match:
                found += [name.strip() for name in re.split(r",\s*|\s+and\s+", match["names"])]
    return [name.removeprefix("the ").strip() for name in found if name.strip()]


def fill(key: str, **slots: str) -> str:
    """The framing sentence ``key`` with its slots filled (raw text: names may carry markup);
    ``where`` ("slice" or "image", default "slice") names what the image is."""
    slots.setdefault("where", "slice")
    if slots["where"] not in WHERES:
        raise ValueError(f"where must be one of {WHERES}, not {slots['where']!r}")
    return TEMPLATES[key].format(**slots)


def join_names(items: list[str]) -> str:
    """'a', 'a and the b', 'a, the b and the c' (items are already marked up)."""
    if len(items) <= 1:
        return "".join(items)
    rest = [f"the {item}" for item in items[1:]]
    return ", ".join([items[0], *rest[:-1]]) + " and " + rest[-1]


__all__ = ["FRAMING_PATTERNS", "TEMPLATES", "fill", "found_without_outline", "is_framing", "join_names", "split_sentences"]
