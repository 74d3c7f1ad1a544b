"""The project's knowledge base: a curated table of every structure and lesion MIMO Chat covers.

The table lives in ``knowledge_base.json`` beside this module. Each entry gives location
and relations, function, appearance on CT and MR, a typical attenuation range, common
pathology, short "clues" for reasoning questions (perspective III), the SNOMED CT code
read from the ``totalsegmentator`` wheel's mapping table, and its named sources.

Entries may ``extend`` an abstract entry (e.g. ``kidney_left`` extends ``kidney``) and
override some fields; :func:`load_knowledge_base` resolves that once.

Every generated question and answer for perspectives III and IV states only sentences
returned by :meth:`KnowledgeEntry.facts`, so a test can check them verbatim.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mimo_chat.data.names import canonical_name, names_structure

KNOWLEDGE_BASE_PATH = Path(__file__).with_name("knowledge_base.json")
TOTALSEGMENTATOR_SPEC = "totalsegmentator==2.18.0"
SNOMED_TABLE = "totalsegmentator/resources/totalsegmentator_snomed_mapping.csv"

FACT_TOPICS = ("location", "relations", "function", "ct", "mr", "hu", "pathology", "clues")
OPTIONAL_TOPICS = ("size", "xr")  # normal size; chest radiograph appearance (not every entry has them)
MODALITIES = ("CT", "MR", "XR")

# Structures at the thoracic inlet and above: never on an abdominal slice (the knowledge base files
# them under "thorax" with the lungs, so the region alone cannot tell them apart).
UPPER_CHEST = ("trachea", "brachiocephalic trunk", "left brachiocephalic vein", "right brachiocephalic vein",
               "left subclavian artery", "right subclavian artery", "superior vena cava", "clavicle")
# Structures at or above the diaphragm: excluded on abdominal slices shown to be below it.
ABOVE_DIAPHRAGM = ("heart", "lung", "pulmonary vein", "left atrial appendage", "lung tumour")
# Present on a slice, these show it lies below the lung bases and the heart.
BELOW_DIAPHRAGM_EVIDENCE = ("pancreas", "left kidney", "right kidney", "kidney tumour", "pancreatic tumour",
                            "small bowel")
# Abdominal structures a chest radiograph may show below the left hemidiaphragm (the gastric air bubble).
CHEST_RADIOGRAPH_ALLOWED = ("stomach",)


def below_diaphragm_slice(names: Iterable[str]) -> bool:
    """Whether an axial CT / MR slice showing ``names`` lies below the lung bases and the heart."""
    return any(names_structure(name, below) for name in names for below in BELOW_DIAPHRAGM_EVIDENCE)


def above_diaphragm(name: str) -> bool:
    """Whether ``name`` is a structure at or above the diaphragm or at the thoracic inlet, so that it
    cannot share an axial slice with one of :data:`BELOW_DIAPHRAGM_EVIDENCE`."""
    return any(names_structure(name, higher) for higher in (*ABOVE_DIAPHRAGM, *UPPER_CHEST))


# Typical cranio-caudal span of a structure in an adult, by vertebral level; compared as numbers.
VERTEBRAL_LEVELS = (
    [f"C{n}" for n in range(1, 8)] + [f"T{n}" for n in range(1, 13)] + [f"L{n}" for n in range(1, 6)]
    + [f"S{n}" for n in range(1, 6)]
)


@dataclass(frozen=True)
class SnomedCode:
    """SNOMED CT coding of a structure, as in TotalSegmentator's mapping table row ``structure``."""

    structure: str
    code: str
    meaning: str
    modifier_code: str | None = None
    modifier_meaning: str | None = None


@dataclass(frozen=True)
class Fact:
    """One sentence of the knowledge base about one structure, tagged with its topic."""

    key: str
    topic: str
    text: str


@dataclass(frozen=True)
class KnowledgeEntry:
    """A resolved knowledge-base entry (inheritance already applied)."""

    key: str  # TotalSegmentator-style class name, e.g. "kidney_left"
    name: str  # plain English display name, e.g. "left kidney"
    group: str  # the abstract entry it extends, or its own key ("kidney" for both kidneys)
    kind: str  # "organ", "vessel" or "lesion"
    region: str
    synonyms: tuple[str, ...]
    snomed: SnomedCode | None
    location: str
    relations: tuple[str, ...]
    function: tuple[str, ...]
    ct: str
    mr: str
    hu: tuple[int, int, str] | None  # (min, max, phase)
    hu_note: str | None
    pathology: tuple[str, ...]
    clues: tuple[str, ...]  # verb phrases: "Which organ {clue}?" / "The {name} {clue}."
    sources: tuple[str, ...]
    hu_sentence_template: str = field(repr=False, default="")
    modalities: tuple[str, ...] = MODALITIES  # where the structure can be seen ("XR" = plain radiograph)
    regions: tuple[str, ...] = ()  # body regions whose images can show it ("thorax", "abdomen", ...)
    size: tuple[str, ...] = ()
    xr: str | None = None
    levels: tuple[int, int] | None = None  # indices into VERTEBRAL_LEVELS, cranial first
    source_topics: dict[str, frozenset[str]] = field(default_factory=dict)  # this entry's overrides of the table's
    group_names: tuple[str, ...] = ()  # the abstract entry's name and synonyms ("clavicle", "collarbone")

    def hu_sentence(self) -> str | None:
        """The attenuation fact as one sentence, or None when the entry has no HU range (MR lesions)."""
        if self.hu is None:
            return None
        low, high, phase = self.hu
        return self.hu_sentence_template.format(phase=phase, name=self.name, min=low, max=high)

    def clue_sentence(self, clue: str) -> str:
        return f"The {self.name} {clue}."

    def facts(self, topic: str | None = None) -> list[Fact]:
        """All fact sentences of this entry (optionally of one topic of :data:`FACT_TOPICS` or :data:`OPTIONAL_TOPICS`)."""
        by_topic: dict[str, list[str]] = {
            "location": [self.location],
            "relations": list(self.relations),
            "function": list(self.function),
            "ct": [self.ct],
            "mr": [self.mr],
            "hu": [s for s in (self.hu_sentence(), self.hu_note) if s],
            "pathology": list(self.pathology),
            "clues": [self.clue_sentence(clue) for clue in self.clues],
            "size": list(self.size),
            "xr": [self.xr] if self.xr else [],
        }
        topics = [topic] if topic else [*FACT_TOPICS, *OPTIONAL_TOPICS]
        return [Fact(self.key, name, text) for name in topics for text in by_topic[name]]


def normalise_name(name: str) -> str:
    """Names compare as :func:`mimo_chat.data.names.canonical_name` does ('Kidney, Left' == 'left kidney')."""
    return canonical_name(name)


class KnowledgeBase:
    """Lookup of :class:`KnowledgeEntry` by key, name or synonym."""

    def __init__(
        self,
        entries: list[KnowledgeEntry],
        references: dict[str, str],
        labels: dict[str, str] | None = None,
        source_topics: dict[str, Iterable[str]] | None = None,
        uncovered: Iterable[str] = (),
    ):
        self.entries = {entry.key: entry for entry in entries}
        self.references = references
        self.labels = dict(labels or {})  # short reference names for a "Source: ..." line
        # source -> the fact topics it supports; a source not listed supports every topic
        self.source_topics = {source: frozenset(topics) for source, topics in (source_topics or {}).items()}
        # anatomy the reference does not describe (a question about it is told so)
        self.uncovered = tuple(uncovered)
        self._by_name: dict[str, str] = {}
        for entry in entries:  # keys and names first so that shared synonyms ("tumour") never shadow them
            self._by_name.setdefault(normalise_name(entry.key), entry.key)
            self._by_name.setdefault(normalise_name(entry.name), entry.key)
        for entry in entries:
            for synonym in entry.synonyms:
                self._by_name.setdefault(normalise_name(synonym), entry.key)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, name: str) -> KnowledgeEntry | None:
        """The entry whose key, name or synonym matches ``name`` (case, spelling and side order ignored)."""
        key = self._by_name.get(normalise_name(name))
        return self.entries.get(key) if key else None

    def get(self, name: str) -> KnowledgeEntry:
        entry = self.find(name)
        if entry is None:
            raise KeyError(f"No knowledge-base entry for {name!r}.")
        return entry

    def sources_of(self, entry: KnowledgeEntry, *texts: str) -> list[str]:
        """The entry's sources (each once, in the entry's order) that support some of its sentences
        ``texts``: those whose topics include a sentence's topic (the entry's ``source_topics``, else
        the table's); sentences not in the entry get none."""
        topics = {fact.topic for fact in entry.facts() if fact.text in texts}
        supported = {**self.source_topics, **entry.source_topics}
        return [source for source in entry.sources if topics and (source not in supported or topics & supported[source])]

    def citation(self, source: str) -> str:
        """The full reference of one entry source (a key of ``references`` or a "Radiopaedia: title")."""
        return self.references.get(source, source)

    def label(self, source: str) -> str:
        """A short name of one entry source for a one-line "Source: ..." (no full stops inside)."""
        return self.labels.get(source, source)

    def groups_by_clue(self) -> dict[str, list[str]]:
        """clue -> keys of the entries that share it (both sides of a paired organ share clues)."""
        result: dict[str, list[str]] = {}
        for entry in self.entries.values():
            for clue in entry.clues:
                result.setdefault(clue, []).append(entry.key)
        return result


def _resolve(raw: dict, abstract: dict[str, dict], template: str) -> KnowledgeEntry:
    parent = abstract.get(raw.get("extends", ""), {})
    merged = {**parent, **raw}
    merged["synonyms"] = list(raw.get("synonyms", []))  # a parent's synonyms name the pair, not one side
    snomed = merged.get("snomed")
    hu = merged.get("hu")
    return KnowledgeEntry(
        key=merged["key"],
        name=merged["name"],
        group=raw.get("extends", merged["key"]),
        kind=merged["kind"],
        region=merged["region"],
        synonyms=tuple(merged["synonyms"]),
        snomed=SnomedCode(**{k: v for k, v in snomed.items() if k != "note"}) if snomed else None,
        location=merged["location"],
        relations=tuple(merged.get("relations", [])),
        function=tuple(merged.get("function", [])),
        ct=merged["ct"],
        mr=merged["mr"],
        hu=(hu["min"], hu["max"], hu["phase"]) if hu else None,
        hu_note=hu.get("note") if hu else None,
        pathology=tuple(merged.get("pathology", [])),
        clues=tuple(merged.get("clues", [])),
        sources=tuple(merged.get("sources", [])),
        hu_sentence_template=template,
        modalities=tuple(merged.get("modalities", MODALITIES)),
        regions=tuple(merged.get("regions", [merged["region"]])),
        size=tuple(merged.get("size", [])),
        xr=merged.get("xr"),
        levels=_levels(merged.get("levels")),
        source_topics={source: frozenset(topics) for source, topics in raw.get("source_topics", {}).items()},
        group_names=(parent["name"], *parent.get("synonyms", [])) if parent else (),
    )


def _levels(span: list[str] | None) -> tuple[int, int] | None:
    if not span:
        return None
    first, last = (VERTEBRAL_LEVELS.index(level) for level in span)
    return first, last


@lru_cache(maxsize=4)
def load_knowledge_base(path: str | Path = KNOWLEDGE_BASE_PATH) -> KnowledgeBase:
    """Read and resolve the knowledge-base JSON (cached: the returned object is never mutated)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    abstract = {raw["key"]: raw for raw in data["entries"] if raw.get("abstract")}
    entries = [_resolve(raw, abstract, data["hu_sentence"]) for raw in data["entries"] if not raw.get("abstract")]
    return KnowledgeBase(entries, data["references"], data.get("reference_labels"), data.get("source_topics"),
                         data.get("uncovered", ()))


def read_snomed_table(csv_path: str | Path) -> dict[str, SnomedCode]:
    """Parse TotalSegmentator's ``totalsegmentator_snomed_mapping.csv`` into structure -> code."""
    table: dict[str, SnomedCode] = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            modifier = row.get("SegmentedPropertyTypeModifierCodeSequence.CodeValue") or None
            table[row["Structure"]] = SnomedCode(
                structure=row["Structure"],
                code=row["SegmentedPropertyTypeCodeSequence.CodeValue"],
                meaning=row["SegmentedPropertyTypeCodeSequence.CodeMeaning"],
                modifier_code=modifier,
                modifier_meaning=row.get("SegmentedPropertyTypeModifierCodeSequence.CodeMeaning") or None,
            )
    return table


def totalsegmentator_snomed_table() -> dict[str, SnomedCode]:
    """The SNOMED table from the ``totalsegmentator`` wheel, fetched once from PyPI into the cache."""
    from mimo_chat.resources import fetch_registry_package

    return read_snomed_table(fetch_registry_package(TOTALSEGMENTATOR_SPEC) / SNOMED_TABLE)
