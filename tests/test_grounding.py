"""Grounded-text parsing: phrases, <SEG>, nested / unclosed / stray tags, MiniGPT-v2 boxes."""

from __future__ import annotations

import numpy as np

from mimo_chat.boxes import mask_to_box
from mimo_chat.grounding import (
    build_reply,
    describe_phrase,
    grid_box_to_pixels,
    parse_grounded_text,
    pixels_to_grid_box,
    render_plain_text,
)


def spans_of(raw: str) -> list[tuple[str, int | None, list[float] | None]]:
    return [(span.phrase, span.seg_index, span.grid_box) for span in parse_grounded_text(raw)[1]]


def test_phrases_with_and_without_seg() -> None:
    text, _ = parse_grounded_text("The <p>pancreas</p><SEG> lies behind the <p>stomach</p>.")
    assert text == "The pancreas lies behind the stomach."
    assert spans_of("The <p>pancreas</p><SEG> lies behind the <p>stomach</p>.") == [
        ("pancreas", 0, None),
        ("stomach", None, None),  # named but not segmented: kept, with no mask
    ]


def test_nested_unclosed_and_stray_tags() -> None:
    assert spans_of("<p>left <p>kidney</p></p><SEG>") == [("left kidney", 0, None)]
    assert spans_of("</p>the <p>liver<SEG> and <p>spleen") == [("liver", 0, None), ("spleen", None, None)]
    assert parse_grounded_text("</p>the <p>liver<SEG> and <p>spleen")[0] == "the liver and spleen"
    # words between a phrase and a <SEG> break the link: the <SEG> has no name
    assert spans_of("<p>aorta</p> is large <SEG>") == [("aorta", None, None), ("", 0, None)]
    # two <SEG> after one phrase: the second one is unnamed, never silently dropped
    assert spans_of("<p>liver</p><SEG><SEG>") == [("liver", 0, None), ("", 1, None)]
    assert spans_of("<image>plain text") == []


def test_minigpt_boxes() -> None:
    raw = "The <p>pancreas</p> {<10><20><30.5><40>} and {< 1 ><2><3><4>}."
    text, _ = parse_grounded_text(raw)
    assert text == "The pancreas and."
    assert spans_of(raw) == [("pancreas", None, [10.0, 20.0, 30.5, 40.0]), ("", None, [1.0, 2.0, 3.0, 4.0])]
    assert grid_box_to_pixels([10, 20, 30, 40], (200, 400)) == [40.0, 40.0, 120.0, 80.0]
    assert grid_box_to_pixels([30, 40, 10, 120], (100, 100)) == [10.0, 40.0, 30.0, 100.0]  # ordered, clipped
    assert pixels_to_grid_box([40, 40, 120, 80], (200, 400)) == "{<10><20><30><40>}"


def test_streaming_render_holds_back_unfinished_markup() -> None:
    assert render_plain_text("The <p>pancreas</p> {<12><3", partial=True) == "The pancreas "
    assert render_plain_text("It is ", partial=True) == "It is "
    assert render_plain_text("It is ") == "It is"


def test_every_grounded_mask_gives_a_box() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:9, 10:31] = True
    assert mask_to_box(mask) == [10.0, 5.0, 31.0, 9.0]
    assert mask_to_box(np.zeros((4, 4), dtype=bool)) == [0.0, 0.0, 0.0, 0.0]
    reply = build_reply("<p>liver</p><SEG>, <p>spleen</p> {<0><0><50><50>} and <p>colon</p>", [(mask, 0.8)], (40, 60))
    liver, spleen, colon = reply.phrases
    assert liver.mask is mask and liver.box == [10.0, 5.0, 31.0, 9.0] and liver.score == 0.8
    assert spleen.mask is None and spleen.box == [0.0, 0.0, 30.0, 20.0]
    assert colon.mask is None and colon.box is None
    assert describe_phrase(colon) == "colon: no mask"
    assert reply.text == "liver, spleen and colon"
