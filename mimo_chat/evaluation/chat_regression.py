"""The dev chat regression set: real questions on real dev images, asked through ``MimoPredictor.ask``
and checked automatically (:mod:`mimo_chat.evaluation.chat_checks`).

    python -m mimo_chat.evaluate --chat-regression [--out report.json] [--kinds describe,off_topic]
    python -m mimo_chat.evaluation.chat_regression [...]        # the same

``tests/chat_regression.jsonl`` holds one conversation per line: ``kind``, ``group`` (paraphrases
share it), ``image`` (``source``, ``patient``, ``slice`` of a dev patient of a ``../shared/data``
set; never image data) and ``turns`` (``question``, optional ``box``/``point`` = the structure
whose label mask gives the prompt, and ``expect``). Each image is encoded once; each conversation
passes its earlier turns as ``history``. ``summary`` gives, per kind and per modality, the share of
turns passing each check; :data:`THRESHOLDS` are what the system must reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.make_bench import interior_point
from mimo_chat.evaluation.chat_checks import CHECKS, ImageTruth, TurnResult, check_turn, found_names

REGRESSION_PATH = Path(__file__).resolve().parents[2] / "tests" / "chat_regression.jsonl"

# (check, modalities it is asserted on, minimum share of turns passing). From the "done when":
# hallucination <= 0.01 -> forbidden; explain accuracy >= 0.90 -> names on CT; multi_seg recall >= 0.80
# on CT -> masks on CT; off-topic decline >= 0.95. Sentences outside the knowledge base and framing
# are held to the hallucination bound; follow-ups must resolve as often as first questions name right;
# anatomy outside the reference is said to be so, as off-topic questions are declined; a question
# about the image or anatomy (a finding the model does not judge included) is never declined as off-topic.
THRESHOLDS = (
    ("forbidden", ("CT", "MR", "XR"), 0.99),
    ("unsupported", ("CT", "MR", "XR"), 0.99),
    ("decline", ("CT", "MR", "XR"), 0.95),
    ("on_topic", ("CT", "MR", "XR"), 0.95),
    ("names", ("CT",), 0.90),
    ("masks", ("CT",), 0.80),
    ("follow_up", ("CT",), 0.80),
    ("uncovered", ("CT", "MR", "XR"), 0.95),
)


@dataclass
class TurnRecord:
    """One asked question: where it came from, the reply text and its check results."""

    conversation: str
    kind: str
    modality: str
    question: str
    follow_up: bool
    reply: str
    result: TurnResult
    seconds: float


def load_conversations(path: str | Path = REGRESSION_PATH, kinds: Sequence[str] | None = None) -> list[dict]:
    conversations = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [c for c in conversations if not kinds or c["kind"] in kinds]


def load_images(conversations: Sequence[dict]) -> dict[tuple[str, str], object]:
    """(source, slice) -> LabelledSlice of every image the conversations use; each must be a dev patient."""
    from mimo_chat.data.sources import split_of

    for conversation in conversations:
        image = conversation["image"]
        if split_of(image["source"], image["patient"]) != "dev":
            raise ValueError(f"{conversation['id']}: {image['source']}/{image['patient']} is not a dev patient")
    return dev_slices((c["image"]["source"], c["image"]["slice"]) for c in conversations)


def dev_slices(wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], object]:
    """(source, slice id) -> LabelledSlice, read from the dev split of each source only."""
    from mimo_chat.data.sources import iter_source

    by_source: dict[str, set[str]] = {}
    for source, slice_id in wanted:
        by_source.setdefault(source, set()).add(slice_id)
    samples = {}
    for source, slices in by_source.items():
        for sample in iter_source(source, split="dev"):
            if sample.slice_id in slices:
                samples[(source, sample.slice_id)] = sample
    missing = {(s, i) for s, ids in by_source.items() for i in ids} - set(samples)
    if missing:
        raise ValueError(f"images not found among the dev slices: {sorted(missing)}")
    return samples


def image_truth(sample) -> ImageTruth:
    from mimo_chat.data.chat_bench import forbidden_names, present_structures

    present = present_structures(sample, min_area=1)
    return ImageTruth({n: sample.masks[n] for n in present}, tuple(sample.absent),
                      tuple(forbidden_names(sample, present)))


def visual_prompt(turn: dict, sample) -> dict:
    """``boxes`` or ``points``/``point_labels`` from the label mask of the turn's ``box``/``point``."""
    if "box" in turn:
        return {"boxes": [mask_to_box(sample.masks[turn["box"]])]}
    if "point" in turn:
        return {"points": [interior_point(sample.masks[turn["point"]])], "point_labels": [1]}
    return {}


def run(predictor, conversations: Sequence[dict], progress: bool = True) -> list[TurnRecord]:
    """Ask every turn (images encoded once, history passed on) and check each reply."""
    samples = load_images(conversations)
    by_image: dict[tuple[str, str], list[dict]] = {}
    for conversation in conversations:
        by_image.setdefault((conversation["image"]["source"], conversation["image"]["slice"]), []).append(conversation)
    records: list[TurnRecord] = []
    bar = tqdm(total=sum(len(c["turns"]) for c in conversations), desc="chat regression", unit="question",
               disable=not progress)
    for key, group in by_image.items():
        sample = samples[key]
        ctx = predictor.encode(sample.image)
        truth = image_truth(sample)
        for conversation in group:
            records += _ask_conversation(predictor, ctx, conversation, sample, truth)
            bar.update(len(conversation["turns"]))
    bar.close()
    return records


def _ask_conversation(predictor, ctx, conversation: dict, sample, truth: ImageTruth) -> list[TurnRecord]:
    history: list[tuple[str, str]] = []
    grounded: list[str] = []
    records = []
    for turn in conversation["turns"]:
        start = time.perf_counter()
        reply = predictor.ask(ctx, turn["question"], history=list(history) or None, **visual_prompt(turn, sample))
        seconds = time.perf_counter() - start
        result = check_turn(reply, turn["expect"], truth, grounded)
        records.append(TurnRecord(conversation["id"], conversation["kind"], sample.modality, turn["question"],
                                  bool(turn["expect"].get("follow_up")), reply.text, result, seconds))
        history.append((turn["question"], reply.raw_text))
        grounded += found_names(reply)
    return records


def _shares(records: Sequence[TurnRecord]) -> dict:
    row: dict = {"n": len(records), "passed": float(np.mean([r.result.passed for r in records])) if records else 0.0}
    for check in CHECKS:
        values = [r.result.checks[check] for r in records if r.result.checks.get(check) is not None]
        row[check] = float(np.mean(values)) if values else None
    follow = [r.result.passed for r in records if r.follow_up]
    row["follow_up"] = float(np.mean(follow)) if follow else None
    return row


def summary(records: Sequence[TurnRecord]) -> dict:
    """Share of turns passing each check: overall, per kind and per modality."""
    kinds = sorted({r.kind for r in records})
    modalities = sorted({r.modality for r in records})
    return {
        "all": _shares(records),
        "per_kind": {k: _shares([r for r in records if r.kind == k]) for k in kinds},
        "per_modality": {m: _shares([r for r in records if r.modality == m]) for m in modalities},
        "median_s": float(np.median([r.seconds for r in records])) if records else 0.0,
    }


def failures(report: dict) -> list[str]:
    """Thresholds of :data:`THRESHOLDS` the summary misses (empty when all are met)."""
    missed = []
    for check, modalities, minimum in THRESHOLDS:
        for modality in modalities:
            value = report["per_modality"].get(modality, {}).get(check)
            if value is not None and value < minimum:
                missed.append(f"{check} on {modality}: {value:.3f} < {minimum}")
    return missed


def table(report: dict) -> str:
    """The per-kind and per-modality table printed by the command."""
    columns = ("n", "passed", *CHECKS, "follow_up")
    lines = ["group".ljust(18) + "".join(c[:11].rjust(12) for c in columns)]
    groups = [("all", report["all"])] + list(report["per_kind"].items()) + list(report["per_modality"].items())
    for name, row in groups:
        cells = [str(row["n"]) if c == "n" else ("—" if row[c] is None else f"{row[c]:.2f}") for c in columns]
        lines.append(name.ljust(18) + "".join(cell.rjust(12) for cell in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.evaluation.chat_regression", description=__doc__.split("\n")[0])
    parser.add_argument("--set", default=str(REGRESSION_PATH), help="the conversations (JSONL)")
    parser.add_argument("--kinds", default=None, help="comma-separated subset of kinds")
    parser.add_argument("--checkpoint", default=None, help="model folder (default: the embedded lite model)")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8-weights", "int8"))
    parser.add_argument("--out", default=None, help="write the summary and every reply as JSON")
    args = parser.parse_args(argv)
    from mimo_chat.predictor import MimoPredictor, default_quantization

    source = args.checkpoint or "lite"
    predictor = MimoPredictor.from_pretrained(source, quantize=default_quantization(args.quantize, source, "cpu"))
    conversations = load_conversations(args.set, [k for k in (args.kinds or "").split(",") if k])
    records = run(predictor, conversations, progress=sys.stderr.isatty())
    report = summary(records)
    print(table(report))
    missed = failures(report)
    print("thresholds: " + ("all met" if not missed else "; ".join(missed)))
    if args.out:
        replies = [{"id": r.conversation, "kind": r.kind, "question": r.question, "reply": r.reply,
                    "checks": r.result.checks, "notes": r.result.notes} for r in records]
        Path(args.out).write_text(json.dumps({"summary": report, "missed": missed, "turns": replies}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
