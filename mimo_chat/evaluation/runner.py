"""Drive a predictor over a benchmark: one answer per row, cached so an interrupted run resumes.

The chat driver asks any object with the ``MimoPredictor`` protocol (``encode(image)``,
``ask(ctx, question, boxes=, points=, point_labels=)`` returning a reply with ``raw_text``,
``text`` and ``phrases`` of ``(phrase, mask, box, score)``) the schema's prompt of each
task — the same calls the app makes. The engine driver answers the visual-prompt tasks
(``box_seg``, ``point_seg``) with a bare ``SegmentationPredictor`` (the LiteMedSAM baseline).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from mimo_chat.evaluation.parsing import mask_to_rle, rle_to_mask

V1_TASKS = ("text_seg", "box_seg", "point_seg", "box_name", "detect_box", "observe")
CONVERSATION_TASKS = ("multi_seg", "describe", "explain", "off_topic")  # schema v1.1
TASKS = V1_TASKS + CONVERSATION_TASKS
PROMPTS = {
    "text_seg": "Segment the {query}.",
    "box_seg": "Segment the structure in the box.",
    "point_seg": "Segment the structure at the point.",
    "box_name": "What is the structure in the box?",
    "detect_box": "Where is the {query}? Give its bounding box.",
    "observe": "Is there a {query} in this image? Answer yes or no.",
    "describe": "Which structures can you see on this image? Outline them.",
    "explain": "What is this structure and what does it do?",
}
REQUIRED_KEYS = {
    "text_seg": ("query", "target_mask"),
    "box_seg": ("prompt", "target_mask"),
    "point_seg": ("prompt", "target_mask"),
    "box_name": ("prompt", "target_name"),
    "detect_box": ("query", "target_box"),
    "observe": ("query", "target_answer"),
    "multi_seg": ("queries", "target_masks"),
    "describe": ("target_names", "target_masks"),
    "explain": ("prompt", "target_name"),
    "off_topic": ("question",),
}


class BenchmarkError(ValueError):
    """The benchmark folder does not follow the schema."""


def load_manifest(bench: str | Path, tasks: Sequence[str] | None = None, limit: int | None = None) -> list[dict]:
    """Rows of ``bench/manifest.jsonl`` (validated), filtered to ``tasks``.

    ``limit`` keeps that many rows spread evenly over the manifest (so a quick run still sees
    every task and source of a manifest written task by task), in manifest order.
    """
    folder = Path(bench)
    path = folder / "manifest.jsonl"
    if not path.is_file():
        raise BenchmarkError(f"{path} does not exist.")
    rows: list[dict] = []
    seen: set[str] = set()
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("id", "image", "modality", "task") if k not in row]
            if missing or row.get("task") not in TASKS:
                raise BenchmarkError(f"{path}:{number}: missing {missing} or unknown task {row.get('task')!r}")
            missing = [k for k in REQUIRED_KEYS[row["task"]] if k not in row]
            if missing:
                raise BenchmarkError(f"{path}:{number}: task {row['task']} needs {missing}")
            if row["id"] in seen:
                raise BenchmarkError(f"{path}:{number}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            if tasks is None or row["task"] in tasks:
                rows.append(row)
    if limit is None or limit >= len(rows):
        return rows
    keep = np.unique(np.linspace(0, len(rows) - 1, num=max(limit, 0)).round().astype(int))
    return [rows[i] for i in keep]


def load_image(bench: Path, relative: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB image of a benchmark row."""
    return np.asarray(Image.open(bench / relative).convert("RGB"))


def load_mask(bench: Path, relative: str) -> np.ndarray:
    """(H, W) bool target mask (non-zero = structure)."""
    return np.asarray(Image.open(bench / relative).convert("L")) > 0


def question_for(row: dict) -> str:
    """The schema's question of a row (``off_topic``: the row's own ``question``)."""
    if row["task"] == "off_topic":
        return str(row["question"])
    if row["task"] == "multi_seg":
        *first, last = [f"the {name}" for name in row["queries"]]
        return f"Segment {', '.join(first)} and {last}." if first else f"Segment {last}."
    return PROMPTS[row["task"]].format(query=row.get("query", "structure"))


@dataclass
class PhraseRecord:
    """One grounded phrase of an answer; ``mask`` is run-length coded (see ``parsing.mask_to_rle``)."""

    phrase: str
    mask: dict | None = None
    box: list[float] | None = None
    score: float | None = None

    def mask_array(self) -> np.ndarray | None:
        return None if self.mask is None else rle_to_mask(self.mask)


@dataclass
class Prediction:
    """What the model answered for one row, plus timing (seconds)."""

    id: str
    raw_text: str = ""
    text: str = ""
    phrases: list[PhraseRecord] = field(default_factory=list)
    answer_s: float = 0.0
    encode_s: float = 0.0
    error: str | None = None

    @property
    def latency_s(self) -> float:
        """Seconds for this row as a user would wait for it: image encoding plus answer."""
        return self.encode_s + self.answer_s

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Prediction:
        phrases = [PhraseRecord(**p) for p in data.get("phrases", [])]
        return cls(**{**data, "phrases": phrases})


class Driver(Protocol):
    tasks: tuple[str, ...]

    def encode(self, image: np.ndarray) -> Any: ...

    def answer(self, ctx: Any, row: dict) -> tuple[str, str, list[PhraseRecord]]: ...


def _phrase_records(phrases: Iterable[Any]) -> list[PhraseRecord]:
    records = []
    for phrase in phrases:
        mask = None if phrase.mask is None else mask_to_rle(np.asarray(phrase.mask, dtype=bool))
        box = None if phrase.box is None else [float(v) for v in phrase.box]
        score = None if phrase.score is None else float(phrase.score)
        records.append(PhraseRecord(str(phrase.phrase or ""), mask, box, score))
    return records


def _visual_prompt(row: dict) -> dict:
    prompt = row.get("prompt") or {}
    if "box" in prompt:
        return {"boxes": [list(map(float, prompt["box"]))]}
    if "points" in prompt:
        return {"points": [list(map(float, p)) for p in prompt["points"]],
                "point_labels": [int(v) for v in prompt.get("labels", [1] * len(prompt["points"]))]}
    return {}


class ChatDriver:
    """Asks a ``MimoPredictor``-like object each row's schema question (with its visual prompt)."""

    tasks = TASKS

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def encode(self, image: np.ndarray) -> Any:
        return self.predictor.encode(image)

    def answer(self, ctx: Any, row: dict) -> tuple[str, str, list[PhraseRecord]]:
        reply = self.predictor.ask(ctx, question_for(row), **_visual_prompt(row))
        return reply.raw_text, reply.text, _phrase_records(reply.phrases)


class EngineDriver:
    """Answers ``box_seg``/``point_seg`` with a bare ``SegmentationPredictor`` (no language model)."""

    tasks = ("box_seg", "point_seg")

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def encode(self, image: np.ndarray) -> Any:
        return self.engine.encode(image)

    def answer(self, ctx: Any, row: dict) -> tuple[str, str, list[PhraseRecord]]:
        result = self.engine.segment(ctx, **_visual_prompt(row))
        best = int(np.argmax(result.scores)) if len(result.scores) else 0
        mask = np.asarray(result.masks[best], dtype=bool)
        record = PhraseRecord("", mask_to_rle(mask), [float(v) for v in result.boxes[best]],
                              float(result.scores[best]))
        return "", "", [record]


class PredictionCache:
    """Append-only JSONL of predictions keyed by ``fingerprint|row id``."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.entries: dict[str, Prediction] = {}
        if path.exists():
            with open(path) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interruption
                    if entry.get("model") == fingerprint:
                        prediction = Prediction.from_json(entry["prediction"])
                        self.entries[prediction.id] = prediction

    def get(self, row_id: str) -> Prediction | None:
        return self.entries.get(row_id)

    def put(self, prediction: Prediction) -> None:
        self.entries[prediction.id] = prediction
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"model": self.fingerprint, "prediction": prediction.to_json()}) + "\n")


def run(driver: Driver, bench: str | Path, rows: Sequence[dict], cache: PredictionCache | None = None,
        progress: bool = True) -> dict[str, Prediction]:
    """Answer every row the driver supports (rows of one image share one encoding); return by row id."""
    folder = Path(bench)
    supported = [row for row in rows if row["task"] in driver.tasks]
    order = sorted(range(len(supported)), key=lambda i: (supported[i]["image"], i))
    predictions: dict[str, Prediction] = {}
    current_image, ctx, encode_s = None, None, 0.0
    for index in tqdm(order, desc="evaluating", unit="row", disable=not progress):
        row = supported[index]
        cached = cache.get(row["id"]) if cache is not None else None
        if cached is not None:
            predictions[row["id"]] = cached
            continue
        if row["image"] != current_image:
            image = load_image(folder, row["image"])
            start = time.perf_counter()
            ctx = driver.encode(image)
            encode_s = time.perf_counter() - start
            current_image = row["image"]
        start = time.perf_counter()
        try:
            raw_text, text, phrases = driver.answer(ctx, row)
            prediction = Prediction(row["id"], raw_text, text, phrases, time.perf_counter() - start, encode_s)
        except (RuntimeError, ValueError) as error:  # a failed answer is scored wrong, not skipped
            prediction = Prediction(row["id"], answer_s=time.perf_counter() - start, encode_s=encode_s,
                                    error=f"{type(error).__name__}: {error}")
        predictions[row["id"]] = prediction
        if cache is not None:
            cache.put(prediction)
    return predictions
