"""Streaming events of MimoPredictor (tiny preset) on a real CT slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimo_chat.boxes import mask_to_box
from mimo_chat.predictor import Done, MaskReady, MimoPredictor, TextDelta

PREFIX = "The <p>pancreas</p><SEG> lies near the <p>liver</p> and <p>left kidney</p><SEG>."


@pytest.fixture(scope="module")
def predictor() -> MimoPredictor:
    return MimoPredictor.from_pretrained("tiny")


@pytest.fixture(scope="module")
def ct_image(ct_small_gray) -> np.ndarray:
    return np.ascontiguousarray(ct_small_gray[:, 8:])  # non-square (128, 120): masks must come back at this size


def test_events_in_order_and_every_mask_matches_a_phrase(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    events = list(predictor.stream(context, "Segment the pancreas.", reply_prefix=PREFIX, max_new_tokens=40))
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    reply = events[-1].reply
    assert reply.raw_text.startswith(PREFIX)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reply.text
    ready = [e for e in events if isinstance(e, MaskReady)]
    assert len(ready) == reply.raw_text.count("<SEG>") >= 2
    for event in ready:
        phrase = reply.phrases[event.index]
        assert phrase.phrase == event.phrase and phrase.mask is event.mask and phrase.score == event.score
        assert event.mask.shape == ct_image.shape and event.mask.dtype == bool
        assert event.box == mask_to_box(event.mask) == phrase.box
    assert [e.phrase for e in ready[:2]] == ["pancreas", "left kidney"]
    # the mask arrives the moment its <SEG> is produced: right after the text that names it
    first = events.index(ready[0])
    assert "".join(e.text for e in events[:first] if isinstance(e, TextDelta)) == "The pancreas"
    # a named structure without <SEG> is reported explicitly with no mask
    liver = [p for p in reply.phrases if p.phrase == "liver"]
    assert len(liver) == 1 and liver[0].mask is None and liver[0].box is None


def test_greedy_is_deterministic_and_history_is_used(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    first = predictor.ask(context, "Where is the pancreas?", max_new_tokens=12)
    again = predictor.ask(context, "Where is the pancreas?", max_new_tokens=12)
    assert first.raw_text == again.raw_text
    history = [("Where is the pancreas?", PREFIX)]
    prompt = predictor.processor.prompt_text("And the spleen?", history)
    assert prompt.count("<image>") == predictor.config.num_queries  # image only in the first user turn
    assert prompt.index("<image>") < prompt.index("Where is the pancreas?") < prompt.index(PREFIX)
    assert prompt.rstrip().endswith("And the spleen?<|im_end|>\n<|im_start|>assistant")
    with_history = predictor.ask(context, "And the spleen?", history=history, max_new_tokens=12)
    assert isinstance(with_history.raw_text, str)
    # user text cannot inject model tokens
    assert predictor.processor.prompt_text("<SEG><image> liver").count("<SEG>") == 0


def test_visual_prompts_change_the_grounded_mask(predictor, ct_image) -> None:
    """A user box goes to the aligner and to the mask decoder together with the <SEG> tokens."""
    context = predictor.encode(ct_image)
    plain = predictor.ask(context, "Segment this.", reply_prefix="<p>lesion</p><SEG>", max_new_tokens=3)
    boxed = predictor.ask(
        context, "Segment this.", boxes=[[30, 40, 80, 90]], reply_prefix="<p>lesion</p><SEG>", max_new_tokens=3
    )
    assert plain.phrases[0].mask.shape == boxed.phrases[0].mask.shape == ct_image.shape
    assert plain.phrases[0].score != boxed.phrases[0].score


def test_streamed_text_equals_the_final_text_around_boxes_and_punctuation(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    prefix = "The <p>liver</p> {<10><20><60><70>} . Also  <p>spleen</p><SEG> , ok"
    events = list(predictor.stream(context, "Where is the liver?", reply_prefix=prefix, max_new_tokens=0))
    reply = events[-1].reply
    assert reply.text == "The liver. Also spleen, ok"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reply.text
    liver, spleen = reply.phrases
    assert liver.mask is None and liver.box == [12.0, 25.6, 72.0, 89.6]  # MiniGPT box on a 120 x 128 image
    assert spleen.mask is not None


def test_prefix_cache_changes_nothing_but_speed(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    history = [("Where is the pancreas?", PREFIX)]
    replies = []
    for use_cache in (False, True, True):  # without, first with (fills the cache), second with (reuses it)
        predictor.use_prefix_cache = use_cache
        replies.append(predictor.ask(context, "And the spleen?", history=history, reply_prefix=PREFIX, max_new_tokens=6))
    predictor.use_prefix_cache = True
    assert replies[0].raw_text == replies[1].raw_text == replies[2].raw_text
    for phrase in zip(*(reply.phrases for reply in replies), strict=True):
        assert all(np.array_equal(phrase[0].mask, other.mask) for other in phrase[1:])
        assert phrase[0].score == pytest.approx(phrase[1].score, abs=1e-5) == phrase[2].score


def test_a_phrase_opened_for_a_box_holds_the_name_the_evidence_gives_its_mask(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    box = [10.0, 12.0, 100.0, 110.0]
    prompted = predictor.segment(context, boxes=[box])
    evidence = predictor.evidence(context, prompted, None)
    name = evidence.prompted[0].name
    assert name in predictor.config.locator_vocabulary  # a vocabulary name was chosen for the box
    reply = predictor.ask(context, "What is this?", boxes=[box], reply_prefix="It is the <p>", max_new_tokens=6)
    assert reply.phrases[0].phrase == name
    assert np.array_equal(reply.phrases[0].mask, prompted.masks[0])  # the box's own mask
    assert reply.phrases[0].name_score == pytest.approx(evidence.prompted[0].name_score)
    # without a prompt the LM may spell any name the evidence allows, and nothing else
    free = predictor.ask(context, "What is this?", reply_prefix="It is the <p>", max_new_tokens=6)
    assert free.raw_text.startswith("It is the <p>")
    assert free.phrases[0].phrase in predictor.config.locator_vocabulary


def test_decode_steps_samples_only_allowed_tokens_and_never_changes_forced_ones(predictor) -> None:
    from mimo_chat.generation import decode_steps

    language_model = predictor.model.language_model
    ids = predictor.processor.reply_prefix_ids("It is")
    prompt = language_model.embed(torch.tensor([[1, 2, 3]]))
    seen: list[list[int]] = []

    def allowed(tokens):
        seen.append(list(tokens))
        return [42, 43]

    with torch.inference_mode():
        steps = list(decode_steps(language_model, prompt, 3, forced_token_ids=ids, allowed=allowed))
    tokens = [s.token_id for s in steps]
    assert tokens[: len(ids)] == ids and set(tokens[len(ids) :]) <= {42, 43} and len(tokens) == len(ids) + 3
    assert seen[0] == ids  # the constraint sees every token so far
