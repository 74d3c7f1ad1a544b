"""The dev chat regression set: its questions are valid, its checks judge real masks right, and the
real predictor meets the issue's thresholds on it (slow: loads the model)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.evaluation import chat_regression
from mimo_chat.evaluation.chat_checks import check_turn
from mimo_chat.evidence.framing import fill
from mimo_chat.grounding import GroundedPhrase, GroundedReply

KINDS = ("segment_one", "segment_several", "what_is_box", "what_is_click", "function", "is_there", "where_is",
         "describe", "relations", "slice_level", "follow_up", "off_topic", "unknown_anatomy")
EXPECT_KEYS = {"grounded", "grounded_any", "first", "absent", "answer", "kb", "decline", "follow_up", "uncovered"}


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    return chat_regression.load_conversations()


@pytest.fixture(scope="module")
def images(shared_data, conversations):
    return chat_regression.load_images(conversations)


def test_set_covers_every_kind_with_paraphrases_on_ct_mr_and_xr(conversations, images) -> None:
    turns = [turn for c in conversations for turn in c["turns"]]
    assert len(turns) >= 80
    assert set(KINDS) <= {c["kind"] for c in conversations}
    groups = Counter(c["group"] for c in conversations)
    for kind in set(KINDS) - {"follow_up", "off_topic"}:  # the same question asked in other words
        assert any(n >= 2 for g, n in groups.items() if g.startswith(f"{kind}/")), kind
    assert sum(t["expect"].get("follow_up", False) for t in turns) >= 8
    assert {images[(c["image"]["source"], c["image"]["slice"])].modality for c in conversations} == {"CT", "MR", "XR"}
    for conversation in conversations:
        assert set(conversation["image"]) == {"source", "patient", "slice"}  # references, never pixels
        sample = images[(conversation["image"]["source"], conversation["image"]["slice"])]
        assert sample.split == "dev" and sample.patient == conversation["image"]["patient"]
        for turn in conversation["turns"]:
            assert set(turn["expect"]) <= EXPECT_KEYS and turn["question"].strip()
            for key in ("box", "point"):
                if key in turn:
                    assert sample.masks[turn[key]].sum() >= 300, (conversation["id"], turn[key])
            for name in turn["expect"].get("grounded", []):
                assert name in sample.masks, (conversation["id"], name)
            for name in turn["expect"].get("absent", []):
                assert name in sample.absent, (conversation["id"], name)


def _reply(text: str, phrases: list[tuple[str, np.ndarray | None]]) -> GroundedReply:
    raw = text + "".join(f" <p>{p}</p><SEG>" for p, _ in phrases)
    return GroundedReply(raw, text, [GroundedPhrase(p, m, None, None) for p, m in phrases])


def test_checks_judge_replies_on_a_real_chest_radiograph(conversations, images) -> None:
    conversation = next(c for c in conversations if c["image"]["source"] == "jsrt_scr_cxr")
    sample = images[(conversation["image"]["source"], conversation["image"]["slice"])]
    truth = chat_regression.image_truth(sample)
    assert "pancreas" in truth.forbidden and "heart" not in truth.forbidden and "stomach" not in truth.forbidden
    heart = sample.masks["heart"]
    function = " ".join(f.text for f in load_knowledge_base().get("heart").facts("function"))
    expect = {"first": "heart", "grounded": ["heart"], "kb": ["heart", "function"]}

    framed = f"This is the heart. {function}\nSource: Gray's Anatomy, 42nd ed. (2020)."  # framing + facts + source
    good = check_turn(_reply(framed, [("heart", heart)]), expect, truth, [])
    assert good.checks["forbidden"] and good.checks["masks"] and good.checks["knowledge"]
    assert good.checks["unsupported"], good.notes

    wrong_mask = check_turn(_reply(function, [("heart", sample.masks["left lung"])]), expect, truth, [])
    assert wrong_mask.checks["masks"] is False and wrong_mask.checks["names"] is False

    pancreas = check_turn(_reply("This is the pancreas.", [("pancreas", heart)]), expect, truth, [])
    assert pancreas.checks["forbidden"] is False and pancreas.checks["names"] is False
    assert pancreas.checks["knowledge"] is False

    wrong_fact = check_turn(_reply("The pancreas filters air.", [("heart", heart)]), expect, truth, [])
    assert wrong_fact.checks["unsupported"] is False

    made_up = check_turn(_reply(function + " The heart is about the size of two limes.", [("heart", heart)]),
                         expect, truth, [])
    assert made_up.checks["unsupported"] is False

    decline = {"decline": True}
    assert check_turn(_reply("I can only help with questions about this image.", []), decline, truth, []).checks["decline"]
    assert not check_turn(_reply("Paris.", []), decline, truth, []).checks["decline"]
    assert not check_turn(_reply("I can help.", [("heart", heart)]), decline, truth, []).checks["decline"]
    finding = {"answer": None}  # "Is there any free fluid?": no verdict, but not declined as off-topic either
    off_topic = fill("off_topic")
    judged = check_turn(_reply(off_topic, []), finding, truth, [])
    assert judged.checks["absent"] and judged.checks["on_topic"] is False and not judged.passed
    assert check_turn(_reply(fill("judgement_image"), []), finding, truth, []).checks["on_topic"]

    sternum = {"grounded": ["heart"], "uncovered": ["sternum"]}
    said = "Here is the heart. The sternum is not in the model's reference, so it cannot find, outline or explain it."
    assert check_turn(_reply(said, [("heart", heart)]), sternum, truth, []).checks["uncovered"]
    # the sternum read as the last turn's lung, or not said to be outside the reference
    assert not check_turn(_reply(said, [("heart", heart), ("left lung", sample.masks["left lung"])]), sternum,
                          truth, []).checks["uncovered"]
    assert not check_turn(_reply("Here is the heart.", [("heart", heart)]), sternum, truth, []).checks["uncovered"]


@pytest.fixture(scope="module")
def regression_report(conversations, images) -> dict:
    from mimo_chat.predictor import MimoPredictor, default_quantization

    predictor = MimoPredictor.from_pretrained("lite", quantize=default_quantization("auto", "lite", "cpu"))
    records = chat_regression.run(predictor, conversations, progress=False)
    report = chat_regression.summary(records)
    print("\n" + chat_regression.table(report))
    assert report["all"]["n"] == sum(len(c["turns"]) for c in conversations)
    return report


@pytest.mark.slow
def test_predictor_meets_the_thresholds_on_the_regression_set(regression_report) -> None:
    assert chat_regression.failures(regression_report) == []
