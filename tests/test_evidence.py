"""Evidence rules: unseen paraphrases, follow-ups, what each kind of image may show, supported sentences."""

from __future__ import annotations

import numpy as np
import pytest

from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.evaluation.parsing import parse_yes_no
from mimo_chat.evidence.compose import plan_reply
from mimo_chat.evidence.framing import (
    FRAMING_PATTERNS,
    TEMPLATES,
    fill,
    found_without_outline,
    is_framing,
    split_sentences,
)
from mimo_chat.evidence.intent import EXAMPLES, Intent, IntentReader
from mimo_chat.evidence.policy import ImageKind, build_evidence
from mimo_chat.grounding import parse_grounded_text

KB = load_knowledge_base()
VOCABULARY = ("aorta", "heart", "inferior vena cava", "left kidney", "liver", "pancreas", "right kidney", "spleen",
              "stomach", "left lung", "right lung", "left clavicle", "right clavicle", "tumour")
# the structures of the labelled chest X-ray, CT and MR sets
SET_STRUCTURES = ("heart", "left lung", "right lung", "left clavicle", "right clavicle", "stomach", "small bowel",
                  "large bowel", "spleen", "liver", "left kidney", "right kidney", "pancreas", "kidney tumour",
                  "pancreatic tumour", "aorta", "inferior vena cava", "vertebra")


def unsupported(raw_text: str) -> list[str]:
    """Sentences of a reply that are neither framing nor a knowledge-base fact about a structure it names."""
    text, spans = parse_grounded_text(raw_text)
    facts = {fact.text for span in spans if KB.find(span.phrase) for fact in KB.find(span.phrase).facts()}
    return [s for s in split_sentences(text) if not is_framing(s) and s not in facts]


@pytest.fixture(scope="module")
def reader() -> IntentReader:
    return IntentReader(KB, VOCABULARY)


def test_every_framing_sentence_matches_a_pattern_and_no_fact_does() -> None:
    for template, where in ((template, where) for template in TEMPLATES.values() for where in ("slice", "image")):
        filled = template.format(name="liver", names="liver and the spleen", kind="a CT of the abdomen",
                                 sources="Gray's Anatomy (42nd edition, 2020)", where=where)
        assert all(is_framing(sentence) for sentence in split_sentences(filled)), template
    facts = [fact.text for entry in KB for fact in entry.facts()]
    assert len(FRAMING_PATTERNS) >= len(TEMPLATES) and not [f for f in facts if is_framing(f)]


@pytest.mark.parametrize(("question", "prompted", "intent", "names"), [
    ("Could you please highlight the pancreas for me?", False, "segment", ["pancreas"]),
    ("I'd like to see the liver and the spleen outlined", False, "segment", ["liver", "spleen"]),
    ("what's that thing i boxed", True, "identify", []),
    ("What job does the spleen have in the body?", False, "function", ["spleen"]),
    ("How large should a healthy kidney be?", False, "size", ["left kidney", "right kidney"]),
    ("Can you spot any tumor here?", False, "presence", ["tumour"]),
    ("Where exactly is the aorta on this picture?", False, "locate", ["aorta"]),
    ("What's visible in this scan?", False, "describe", []),
    ("Which organs sit right next to the pancreas?", False, "relations", ["pancreas"]),
    ("Are we above or below the kidneys here?", False, "level", ["left kidney", "right kidney"]),
    ("What is the liver volume in this patient?", False, "volume", ["liver"]),
    ("How does the heart look on a chest X-ray?", False, "appearance", ["heart"]),
    ("Outline the lesion please", False, "segment", ["tumour"]),  # "lesion" was no name: read as a judgement
    ("Is there a renal lesion?", False, "presence", ["kidney tumour"]),
    ("Hi, can you help me read this CT?", False, "describe", []),  # was declined as off-topic
    ("Help me interpret this X-ray", False, "describe", []),
])
def test_unseen_paraphrases_get_their_intent_and_structures(reader, question, prompted, intent, names) -> None:
    assert all(question != example for examples in EXAMPLES.values() for example in examples)
    read = reader.read(question, prompted=prompted)
    assert (read.intent, read.names) == (intent, names)


@pytest.mark.parametrize("question", [
    "What is the capital of France?", "Can you recommend a good restaurant?", "Write me a limerick about cats.",
    "Who will win the election?", "good morning", "What's the exchange rate of the euro?",
    "Can you help me with my homework?", "Help me write an email",
])
def test_off_topic_questions_are_declined(reader, question) -> None:
    assert reader.read(question).intent == "off_topic"


@pytest.mark.parametrize(("question", "intent", "names"), [
    ("Outline the spleen and the liver please", "segment", ["spleen", "liver"]),
    ("please outline the spleen and the liver", "segment", ["spleen", "liver"]),
    ("Kindly mark the aorta.", "segment", ["aorta"]),
    ("What does the spleen do, please?", "function", ["spleen"]),
    ("Could I get the outline of the liver?", "segment", ["liver"]),  # "outline" as a noun
    ("Give me a summary of the pancreas", "about", ["pancreas"]),
])
def test_a_courtesy_word_does_not_change_the_request(reader, question, intent, names) -> None:
    """"Outline the spleen and the liver please" was read as "tell me about": the word "please" pulled
    it towards the examples that happen to have it; so was "Give me the outline of the aorta"."""
    assert all(question != example for examples in EXAMPLES.values() for example in examples)
    read = reader.read(question)
    assert (read.intent, read.names) == (intent, names)


def test_follow_ups_resolve_to_the_last_turn(reader) -> None:
    history = [("Segment the right kidney.", "Here is the <p>right kidney</p><SEG>.")]
    assert (reader.read("and the left one?", history).intent, reader.read("and the left one?", history).names) == (
        "segment", ["left kidney"])
    does = reader.read("What does it do?", history)
    assert (does.intent, does.names, does.follow_up) == ("function", ["right kidney"], True)
    spleen = reader.read("and the spleen?", history)
    assert (spleen.intent, spleen.names) == ("segment", ["spleen"])
    polite = reader.read("and the spleen, please?", history)  # a courtesy word asks nothing of its own
    assert (polite.intent, polite.names, polite.follow_up) == ("segment", ["spleen"], True)
    # a box on screen: "it" is the prompted object, not the last turn's structure
    assert reader.read("What does it do?", history, prompted=True).names == []


def test_the_kind_of_image_decides_what_can_be_named() -> None:
    chest = ImageKind.parse("CR chest")
    assert (chest.modality, chest.region, chest.phrase()) == ("XR", "thorax", "a chest radiograph")
    assert ImageKind.parse("MRI abdomen").phrase() == "an MR image of the abdomen" and not ImageKind.parse("").known
    for name in SET_STRUCTURES:
        assert KB.find(name) is not None, name
    for name in ("pancreas", "left kidney", "liver", "spleen", "stomach", "kidney tumour"):
        assert not chest.allows(KB.find(name)), name
    for name in ("heart", "left lung", "right clavicle"):
        assert chest.allows(KB.find(name)), name
    assert not ImageKind.parse("CT abdomen").allows(KB.find("brain tumour"))


def _evidence(kind: str, present: dict[str, float], region_scores=None):
    presence = np.array([present.get(name, 0.05) for name in VOCABULARY])
    return build_evidence(KB, VOCABULARY, presence, ImageKind.parse(kind), region_scores)


def test_a_chest_radiograph_never_gets_abdominal_names_even_when_the_locator_says_so() -> None:
    evidence = _evidence("XR chest", {"pancreas": 0.99, "heart": 0.9, "left lung": 0.8, "liver": 0.95})
    described = plan_reply(Intent("describe"), evidence, KB)
    assert "pancreas" not in described.raw_text and "liver" not in described.raw_text
    assert [seg.name for seg in described.segs] == ["heart", "left lung"]
    asked = plan_reply(Intent("presence", ["pancreas"]), evidence, KB)
    assert asked.raw_text == "The <p>pancreas</p> is not seen on a chest radiograph." and not asked.segs


def test_an_axial_slice_below_the_diaphragm_gets_no_chest_names() -> None:
    found = {"right kidney": 0.9, "liver": 0.9, "heart": 0.7, "left lung": 0.6}
    for hint in ("", "CT abdomen", "MR"):  # unknown, metadata, modality only
        described = plan_reply(Intent("describe"), _evidence(hint, found), KB)
        assert sorted(seg.name for seg in described.segs) == ["liver", "right kidney"], hint
    # a coronal view and a radiograph span many levels: the heart may share them with the abdomen
    for hint in ("CT abdomen coronal", "XR"):
        kept = {name for name, _ in _evidence(hint, found).present()}
        assert "heart" in kept, hint
    assert ImageKind.parse("CT coronal").axial is False and not ImageKind.parse("coronal").known
    assert ImageKind.parse("CT chest abdomen pelvis").region is None  # several regions: none is assumed
    upper = _evidence("", {"left kidney": 0.9, "left clavicle": 0.8})
    assert not upper.is_present("left clavicle") and "left clavicle" in upper.excluded


def test_a_found_structure_without_a_reliable_outline_is_named_without_a_mask() -> None:
    evidence = _evidence("CT abdomen", {"liver": 0.95, "pancreas": 0.9, "spleen": 0.8})
    evidence.outline = {"liver": 0.9, "pancreas": 0.4, "spleen": 0.8}
    shown = plan_reply(Intent("segment", ["pancreas", "liver"]), evidence, KB)
    assert [seg.name for seg in shown.segs] == ["liver"]
    assert "<p>pancreas</p> on this slice but cannot outline it reliably" in shown.raw_text
    described = plan_reply(Intent("describe"), evidence, KB)
    assert [seg.name for seg in described.segs] == ["liver", "spleen"]
    assert "It also finds the <p>pancreas</p>, without a reliable outline." in described.raw_text
    # a confident mask that the name's own heatmap does not agree with (the box led the decoder
    # onto a neighbour) is not drawn either
    evidence.fit = {"liver": 0.9, "spleen": 0.3}
    disputed = plan_reply(Intent("describe"), evidence, KB)
    assert [seg.name for seg in disputed.segs] == ["liver"]
    assert "It also finds the <p>spleen</p> and the <p>pancreas</p>, without a reliable outline." in disputed.raw_text \
        or "It also finds the <p>pancreas</p> and the <p>spleen</p>, without a reliable outline." in disputed.raw_text
    for plan in (shown, described, disputed):
        assert unsupported(plan.raw_text) == [], plan.raw_text


def test_found_structures_without_an_outline_are_read_back_and_clicks_point_inside() -> None:
    from mimo_chat.evidence.framing import found_without_outline
    from mimo_chat.evidence.policy import clicks_inside

    evidence = _evidence("CT abdomen", {"liver": 0.95, "pancreas": 0.9, "spleen": 0.8})
    evidence.outline = {"liver": 0.3, "pancreas": 0.4, "spleen": 0.5}
    text, _ = parse_grounded_text(plan_reply(Intent("describe"), evidence, KB).raw_text)
    assert sorted(found_without_outline(text)) == ["liver", "pancreas", "spleen"]
    asked, _ = parse_grounded_text(plan_reply(Intent("presence", ["pancreas"]), evidence, KB).raw_text)
    assert asked.startswith("Yes,") and found_without_outline(asked) == ["pancreas"]
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:20] = True
    assert clicks_inside([[12, 6]], [1], mask) and clicks_inside([[12, 6], [0, 0]], [1, 0], mask)
    assert not clicks_inside([[12, 6], [25, 6]], [1, 1], mask) and not clicks_inside([[0, 0]], [0], mask)


def test_planned_replies_say_only_framing_and_cited_facts() -> None:
    box = np.zeros((1, len(VOCABULARY)))
    box[0, VOCABULARY.index("right kidney")] = 0.7
    evidence = _evidence("CT abdomen", {"liver": 0.9, "right kidney": 0.8, "left kidney": 0.7}, box)
    cases = [
        (Intent("function"), 1), (Intent("segment", ["liver", "spleen"]), 2), (Intent("describe"), 4),
        (Intent("size", ["left kidney", "right kidney"]), 2), (Intent("relations", ["pancreas"]), 1),
        (Intent("level", ["left kidney", "right kidney"]), 4), (Intent("appearance", ["liver"]), 2),
    ]
    for intent, segs in cases:
        plan = plan_reply(intent, evidence, KB, "How does it look on CT?")
        assert unsupported(plan.raw_text) == [], plan.raw_text
        assert len(plan.segs) == segs == plan.raw_text.count("<SEG>"), plan.raw_text
        assert plan.segs[0].prompt_index == 0 and plan.segs[0].name == "right kidney"  # the box comes first
    function = plan_reply(Intent("function"), evidence, KB)
    assert function.raw_text.startswith("This is the <p>right kidney</p><SEG>. The kidneys filter the blood")
    assert function.raw_text.endswith(".") and "Source: Gray's Anatomy (42nd edition, 2020)" in function.raw_text
    assert any(source.startswith("Standring S") for source in function.sources)
    absent = plan_reply(Intent("segment", ["liver", "spleen"]), _evidence("CT abdomen", {"liver": 0.9}), KB)
    assert absent.raw_text == "Here is the <p>liver</p><SEG>. The <p>spleen</p> is not on this slice."
    both = _evidence("CT abdomen", {"liver": 0.9, "spleen": 0.8})
    assert plan_reply(Intent("segment", ["liver", "spleen"]), both, KB).raw_text == (
        "Here are the <p>liver</p><SEG> and the <p>spleen</p><SEG>.")
    unknown = plan_reply(Intent("size", ["stomach"]), _evidence("CT abdomen", {"stomach": 0.9}), KB)
    assert unknown.raw_text.endswith("I don't have that in my reference.")
    declined = plan_reply(Intent("off_topic"), evidence, KB)
    assert not declined.segs and "<p>" not in declined.raw_text


def test_an_uncertain_name_is_said_so_and_a_lesion_is_an_observation() -> None:
    box = np.zeros((1, len(VOCABULARY)))
    box[0, VOCABULARY.index("liver")] = 0.3
    plan = plan_reply(Intent("identify"), _evidence("CT abdomen", {"liver": 0.9}, box), KB)
    assert plan.raw_text == "This looks like the <p>liver</p><SEG>, but I am not sure."
    # On MR such guesses were mostly wrong on dev patients: the mask is shown without a name.
    mr = plan_reply(Intent("identify"), _evidence("MR abdomen", {"liver": 0.9}, box), KB)
    assert mr.raw_text == "I cannot name the <p>structure</p><SEG> with confidence."
    assert [seg.prompt_index for seg in mr.segs] == [0]
    box[0, VOCABULARY.index("liver")] = 0.8
    sure = plan_reply(Intent("identify"), _evidence("MR abdomen", {"liver": 0.9}, box), KB)
    assert sure.raw_text.startswith("This is the <p>liver</p><SEG>")
    lesion = plan_reply(Intent("presence", ["tumour"]), _evidence("CT abdomen", {"tumour": 0.8}), KB)
    assert lesion.raw_text.startswith("Yes, the model marks a possible <p>tumour</p><SEG> on this slice.")
    assert lesion.raw_text.endswith("This is a model observation, not a diagnosis.")


def test_a_lesion_is_stated_only_with_an_outline_and_its_absence_does_not_rule_one_out() -> None:
    """The tumour verdict alone is not reliable (model card): a lesion the locator finds is named only
    with a drawn outline the user can check; otherwise the reply says the model cannot tell, and a
    "no" says it does not rule one out. Organs found without an outline are still named."""
    evidence = _evidence("CT abdomen", {"left kidney": 0.9, "tumour": 0.8, "liver": 0.9})
    evidence.outline = {"left kidney": 0.9, "tumour": 0.5, "liver": 0.55}
    asked = plan_reply(Intent("presence", ["tumour"]), evidence, KB)
    assert asked.raw_text == "The model cannot tell reliably whether there is a <p>tumour</p> on this slice."
    assert not asked.segs and parse_yes_no(parse_grounded_text(asked.raw_text)[0]) is None
    described = plan_reply(Intent("describe"), evidence, KB)
    assert [seg.name for seg in described.segs] == ["left kidney"] and "tumour" not in described.raw_text
    assert "It also finds the <p>liver</p>, without a reliable outline." in described.raw_text
    shown = plan_reply(Intent("segment", ["tumour", "left kidney"]), evidence, KB)
    assert [seg.name for seg in shown.segs] == ["left kidney"] and "cannot tell reliably" in shown.raw_text
    alone = _evidence("CT abdomen", {"tumour": 0.8})
    alone.outline = {"tumour": 0.5}
    assert plan_reply(Intent("describe"), alone, KB).raw_text.endswith(
        "The model finds none of the structures it knows on this slice.")

    evidence.outline["tumour"] = 0.8  # outlined: marked as a possible lesion, with its mask
    marked = plan_reply(Intent("describe"), evidence, KB)
    assert [seg.name for seg in marked.segs] == ["left kidney", "tumour"]
    assert marked.raw_text.endswith("This is a model observation, not a diagnosis.")

    absent = plan_reply(Intent("presence", ["tumour"]), _evidence("CT abdomen", {"left kidney": 0.9}), KB)
    assert absent.raw_text == ("No, the model does not mark a <p>tumour</p> on this slice. "
                               "The model's lesion detection is not reliable enough to rule one out.")
    assert parse_yes_no(parse_grounded_text(absent.raw_text)[0]) == "no"
    # "Segment the lesion." on a slice where the model marks none: never "The tumour is not on this slice."
    unmarked = plan_reply(Intent("segment", ["tumour"]), _evidence("CT abdomen", {"left kidney": 0.9}), KB)
    assert unmarked.raw_text == ("The model does not mark a <p>tumour</p> on this slice. "
                                 "The model's lesion detection is not reliable enough to rule one out.")
    for plan in (asked, described, shown, marked, absent, unmarked):
        assert unsupported(plan.raw_text) == [], plan.raw_text


def test_lung_lobes_are_named_on_ct_but_never_on_a_radiograph() -> None:
    """A frontal radiograph superimposes the lobes (read by zones): the locator's lobe findings are
    dropped there, while the lungs stay; on a CT slice both are kept."""
    vocabulary = ("left lung", "right lung", "left upper lung lobe", "left lower lung lobe", "heart")
    presence = np.array([0.95, 0.9, 0.99, 0.97, 0.9])
    radiograph = build_evidence(KB, vocabulary, presence, ImageKind.parse("XR chest"))
    assert {name for name, _ in radiograph.present()} == {"left lung", "right lung", "heart"}
    assert {"left upper lung lobe", "left lower lung lobe"} <= set(radiograph.excluded)
    ct = build_evidence(KB, vocabulary, presence, ImageKind.parse("CT chest"))
    assert {"left upper lung lobe", "left lower lung lobe"} <= {name for name, _ in ct.present()}
    # "the lungs" stand for the left and the right lung, not their lobes as well
    from mimo_chat.evidence.intent import NameFinder

    assert NameFinder(KB, vocabulary).find("Segment the lungs.") == ["left lung", "right lung"]
    assert NameFinder(KB, vocabulary).find("and the left upper lobe?") == ["left upper lung lobe"]


def test_one_noun_for_both_sides_asks_for_both_in_the_asked_order() -> None:
    from mimo_chat.evidence.intent import NameFinder

    finder = NameFinder(KB, VOCABULARY)
    assert finder.find("Show the left and the right clavicle.") == ["left clavicle", "right clavicle"]
    assert finder.find("where are the right and left kidneys, and the liver?") == ["right kidney", "left kidney", "liver"]
    assert finder.find("the left or right adrenal gland") == ["left adrenal gland", "right adrenal gland"]
    assert finder.find("the left kidney and the spleen") == ["left kidney", "spleen"]


@pytest.mark.parametrize(("question", "names"), [
    ("Does the heart look enlarged to you?", ["heart"]),
    ("Is there something wrong with the liver?", ["liver"]),
    ("Could this be pneumonia?", []),
    ("Does this patient have any disease?", []),
    ("Is there a pleural effusion?", []),  # a finding the model does not look for: not off-topic
    ("Is there a mass in the liver?", ["liver"]),
])
def test_a_clinical_judgement_is_not_answered_with_a_finding(reader, question, names) -> None:
    """"Is the heart enlarged?" once got "Yes, the model finds the heart on this slice.": a presence
    answer that reads as a diagnosis. The model does not judge; it says so, shows the structure and,
    for a question about size, quotes the reference's normal size."""
    assert all(question != example for examples in EXAMPLES.values() for example in examples)
    read = reader.read(question)
    assert (read.intent, read.names) == ("judgement", names)
    evidence = _evidence("XR chest" if names == ["heart"] else "CT abdomen", {"heart": 0.9, "liver": 0.9})
    plan = plan_reply(read, evidence, KB, question)
    text = parse_grounded_text(plan.raw_text)[0]
    assert parse_yes_no(text) is None and "does not make diagnoses" in text and not unsupported(plan.raw_text)
    assert [seg.name for seg in plan.segs] == names
    assert ("half as wide as the chest" in text) == (names == ["heart"])  # the heart's size fact, cited
    assert ("Source:" in text) == (names == ["heart"])


def test_is_it_normal_refers_to_the_boxed_structure_and_a_lesion_question_stays_with_the_lesion_policy(reader) -> None:
    box = np.zeros((1, len(VOCABULARY)))
    box[0, VOCABULARY.index("right kidney")] = 0.9
    history = [("What is this?", "This is the <p>right kidney</p><SEG>.")]
    read = reader.read("Is that normal?", history)
    assert (read.intent, read.names, read.follow_up) == ("judgement", ["right kidney"], True)
    evidence = _evidence("CT abdomen", {"right kidney": 0.9}, box)
    boxed = plan_reply(reader.read("Is this normal?", prompted=True), evidence, KB)
    assert boxed.raw_text.startswith("This is the <p>right kidney</p><SEG>. I cannot tell whether the right kidney is")
    assert reader.read("Is there a tumour in the kidney?").intent == "presence"
    both = reader.read("Is the left one bigger than the right one?", history)
    assert (both.intent, both.names) == ("judgement", ["left kidney", "right kidney"])


def test_a_follow_up_with_a_question_of_its_own_is_not_read_as_a_repeat(reader) -> None:
    history = [("How big is the liver normally?", "In adults the liver usually spans less than about 16 cm.")]
    assert reader.read("and which organs touch it?", history).intent == "relations"
    assert reader.read("and what does it do?", history).intent == "function"
    spleen = reader.read("and the spleen?", history)
    assert (spleen.intent, spleen.names, spleen.follow_up) == ("size", ["spleen"], True)
    assert reader.read("Thanks a lot, that helps!").intent == "thanks"
    assert plan_reply(Intent("thanks"), _evidence("CT abdomen", {}), KB).raw_text == "You're welcome."


@pytest.mark.parametrize(("question", "intent", "names"), [
    ("What is the spleen's blood supply?", "relations", ["spleen"]),
    ("Which vessel feeds the liver?", "relations", ["liver"]),
    ("How many HU does the liver measure on CT?", "appearance", ["liver"]),
    ("What level of the spine are we at?", "level", ["vertebra"]),
])
def test_a_question_that_is_not_yes_or_no_gets_no_yes(reader, question, intent, names) -> None:
    """"What is the spleen's blood supply?" once got "Yes, the model finds the spleen on this slice."."""
    assert all(question != example for examples in EXAMPLES.values() for example in examples)
    read = reader.read(question)
    assert (read.intent, read.names) == (intent, names)
    evidence = _evidence("CT abdomen", {"liver": 0.9, "spleen": 0.9})
    assert parse_yes_no(parse_grounded_text(plan_reply(read, evidence, KB, question).raw_text)[0]) is None


def test_the_asked_modality_decides_the_appearance_fact_and_a_bare_follow_up_keeps_the_subject(reader) -> None:
    history = [("Show the spleen.", "Here is the <p>spleen</p><SEG>.")]
    read = reader.read("how does it look on MRI?", history)
    plan = plan_reply(read, _evidence("CT abdomen", {"spleen": 0.9}), KB, "how does it look on MRI?")
    assert KB.find("spleen").mr in plan.raw_text and KB.find("spleen").ct not in plan.raw_text
    ultrasound = plan_reply(reader.read("And on ultrasound?", history), _evidence("CT abdomen", {"spleen": 0.9}), KB,
                            "And on ultrasound?")
    assert "I don't have that in my reference." in ultrasound.raw_text and KB.find("spleen").ct not in ultrasound.raw_text
    where = reader.read("where exactly?", [("Is there a liver?", "Yes, the model finds the <p>liver</p><SEG> on this slice.")])
    assert (where.intent, where.names, where.follow_up) == ("locate", ["liver"], True)


@pytest.mark.parametrize(("question", "intent"), [
    ("Please mark every organ you can find.", "describe"),
    ("Highlight all structures on this slice", "describe"),
    ("How old is this patient?", "off_topic"),
    ("On what date was the exam done?", "off_topic"),
])
def test_segment_everything_is_the_grounded_caption_and_questions_about_the_patient_are_declined(
        reader, question, intent) -> None:
    plan = plan_reply(reader.read(question), _evidence("CT abdomen", {"liver": 0.9, "spleen": 0.9}), KB, question)
    if intent == "describe":
        assert "On this slice the model finds the <p>liver</p><SEG> and the <p>spleen</p><SEG>." in plan.raw_text
    else:
        assert plan.raw_text == TEMPLATES["off_topic"] and not plan.segs


@pytest.mark.parametrize(("question", "names", "uncovered"), [
    ("segment the skull", [], ["skull"]),
    ("What does the femur do?", [], ["femur"]),
    ("where is the appendix?", [], ["appendix"]),
    ("Show me the liver and the right femur.", ["liver"], ["femur"]),
])
def test_anatomy_the_reference_does_not_cover_is_said_so_and_never_replaced_by_the_last_subject(
        reader, question, names, uncovered) -> None:
    """"segment the skull" after "show me the gallbladder" was answered about the gallbladder, "where is
    the appendix?" got a description of the slice and "what does the femur do?" was declined as off-topic."""
    history = [("show me the spleen", "Here is the <p>spleen</p><SEG>.")]
    read = reader.read(question, history)
    assert (read.names, read.uncovered, read.follow_up) == (names, uncovered, False)
    evidence = _evidence("CT abdomen", {"liver": 0.9, "spleen": 0.9})
    plan = plan_reply(read, evidence, KB, question)
    said = fill("not_in_reference", name=uncovered[0])
    assert plan.raw_text.endswith(said) and unsupported(plan.raw_text) == []
    assert [seg.name for seg in plan.segs] == names  # no spleen from the last turn, no guess for the femur
    assert all(KB.find(name) is None for name in KB.uncovered)
    # a prompted object is what "this bone" means: uncovered words do not override the box
    assert reader.read("Which bone is this?", prompted=True).uncovered == []


def test_the_brain_is_known_and_impossible_on_an_abdominal_ct(reader) -> None:
    read = reader.read("segment the brain")
    assert (read.intent, read.names) == ("segment", ["brain"])
    plan = plan_reply(read, _evidence("CT abdomen", {"liver": 0.9}), KB, "segment the brain")
    assert plan.raw_text == "The <p>brain</p> is not seen on a CT of the abdomen." and not plan.segs
    brain_tumour = reader.read("is there a brain tumour?")
    assert brain_tumour.names == ["brain tumour"]


@pytest.mark.parametrize(("question", "topic", "cited", "not_cited"), [
    ("Where is the liver?", "location", "Gray's Anatomy (42nd edition, 2020)", "Radiopaedia: Hepatomegaly"),
    ("What is the normal size of the liver?", "size", "Radiopaedia: Hepatomegaly", "Radiopaedia: Hepatic steatosis"),
    ("What does the pancreas do?", "function", "Radiopaedia: Pancreas", "Radiopaedia: Pancreatic ductal adenocarcinoma"),
    ("How does the heart look on a chest X-ray?", "xr", "Felson's Principles of Chest Roentgenology (5th edition, 2020)",
     "Webb, Fundamentals of Body CT (5th edition, 2019)"),
])
def test_a_reply_cites_the_sources_of_the_sentences_it_states(reader, question, topic, cited, not_cited) -> None:
    """The Source line once listed every reference of an entry: "where is the liver?" cited hepatomegaly."""
    kind = "XR chest" if topic == "xr" else "CT abdomen"
    present = {"heart": 0.9} if topic == "xr" else {"liver": 0.9, "pancreas": 0.9}
    plan = plan_reply(reader.read(question), _evidence(kind, present), KB, question)
    source_line = split_sentences(parse_grounded_text(plan.raw_text)[0])[-1]
    assert source_line.startswith("Source: ") and cited in source_line and not_cited not in source_line, plan.raw_text
    assert len(plan.sources) == source_line.count(";") + 1
    # every sentence the knowledge base can state has at least one source
    assert all(KB.sources_of(entry, fact.text) for entry in KB for fact in entry.facts())


def test_a_pair_is_found_by_its_common_name_and_a_radiograph_has_no_slice_level(reader) -> None:
    """"Show me the clavicles" once got a description of the whole radiograph: the pair's common name
    ("clavicle", "collarbone") was not a name, only its key ("clavicula") was."""
    for question in ("Show me the clavicles.", "Segment both collarbones.", "Outline the clavicle"):
        read = reader.read(question)
        assert (read.intent, read.names) == ("segment", ["left clavicle", "right clavicle"]), question
    chest = _evidence("XR chest", {"heart": 0.9, "left lung": 0.9, "right lung": 0.9})
    history = [("Where is the heart?", "The <p>heart</p><SEG> is marked on the image.")]
    for question in ("What level is this?", "Is this above the kidneys?"):
        plan = plan_reply(reader.read(question, history), chest, KB, question)
        assert plan.raw_text.endswith(TEMPLATES["level_not_axial"]) and "is above" not in plan.raw_text
    # and what the model finds on it is said to be on the image, not on a slice
    caption = plan_reply(reader.read("What do you see?"), chest, KB, "What do you see?").raw_text
    assert "On this image the model finds the <p>heart</p><SEG>" in caption and "slice" not in caption
    liver = plan_reply(reader.read("Is there a liver?"), chest, KB, "Is there a liver?").raw_text
    assert liver == "The <p>liver</p> is not seen on a chest radiograph."
    heart = plan_reply(reader.read("Is there a heart?"), _evidence("XR chest", {}), KB, "Is there a heart?").raw_text
    assert heart == "No, the model does not find the <p>heart</p> on this image."
    assert found_without_outline("On this image the model finds the heart, without a reliable outline.") == ["heart"]
    side = reader.read("Which side is the heart on?")
    assert (side.intent, side.names) == ("locate", ["heart"])


def test_a_plain_text_answer_in_the_history_refers_to_what_it_showed_not_to_the_neighbours_its_facts_mention(
        reader) -> None:
    kidney = KB.get("right kidney")
    plain = f"This is the right kidney. {' '.join(kidney.relations)} Source: Gray's Anatomy (42nd edition, 2020)."
    assert "liver" in plain  # the relations mention the liver above the kidney
    read = reader.read("What does it do?", [("What is this?", plain)])
    assert (read.intent, read.names, read.follow_up) == ("function", ["right kidney"], True)
    other = reader.read("and the other one?", [("What is this?", plain)])
    assert other.names == ["left kidney"]


def test_with_a_box_what_am_i_looking_at_asks_about_the_box_and_the_whole_image_is_still_described(reader) -> None:
    assert reader.read("What am I looking at?", prompted=True).intent == "identify"
    assert reader.read("What am I looking at?").intent == "describe"
    assert reader.read("Describe this whole image.", prompted=True).intent == "describe"
