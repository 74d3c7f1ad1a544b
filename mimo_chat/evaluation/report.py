"""Views of a report: ``report.md``, the side-by-side ``--compare`` table and a check's printed JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

HEADLINE = {
    "text_seg": ("miou", "dice", "ap50", "grounding_f1"),
    "box_seg": ("miou", "dice"),
    "point_seg": ("miou", "dice"),
    "box_name": ("accuracy", "miou", "dice"),
    "detect_box": ("box_iou", "acc50"),
    "observe": ("accuracy", "precision", "recall", "f1"),
    "multi_seg": ("recall", "miou", "extra_phrases", "hallucination"),
    "describe": ("recall", "miou", "hallucination"),
    "explain": ("accuracy", "hallucination"),
    "off_topic": ("decline_rate",),
}


def print_json(result: dict, path: Path | None = None) -> None:
    """Print ``result`` as indented JSON, and write the same text to ``path`` when one is given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """report.md: headline metrics, per-query and per-source tables, observe confusion, notes, plots."""
    lines = [f"# Evaluation report: {report.get('model', 'model')}", ""]
    lines += [(f"Benchmark `{report.get('bench', '?')}` — {report['n']} rows, {report['unparseable']} unparseable "
              f"answers, {report['empty_masks']} empty masks. Latency per sample: median "
              f"{report['latency_s']['median']:.3f} s, p95 {report['latency_s']['p95']:.3f} s "
              "(image encoding + answer)."), ""]
    rows = []
    for task, values in report["tasks"].items():
        metrics = ", ".join(f"{k} {values[k]:.3f}" for k in HEADLINE.get(task, ()) if k in values)
        rows.append((task, values["n"], metrics, values.get("unparseable", 0), values.get("empty_masks", 0)))
    lines += ["## Tasks", ""] + _table(("task", "n", "metrics", "unparseable", "empty masks"), rows) + [""]
    for title, key in (("Per query", "per_query"), ("Per source", "per_source"), ("Per modality", "per_modality")):
        rows = []
        for name, per_task in report.get(key, {}).items():
            for task, values in per_task.items():
                main = HEADLINE.get(task, ("n",))[0]
                rows.append((name, task, values["n"], values.get(main), main))
        lines += [f"## {title}", ""] + _table((key.split("_")[1], "task", "n", "value", "metric"), rows) + [""]
    observe = report["tasks"].get("observe")
    if observe:
        confusion = observe["confusion"]
        lines += ["## observe confusion (positive = yes)", ""]
        lines += _table(("", "answer yes", "answer no"),
                        [("truth yes", confusion["tp"], confusion["fn"]), ("truth no", confusion["fp"], confusion["tn"])])
        lines += [""]
    text = report["tasks"].get("box_name", {}).get("text")
    if text:
        lines += ["## Generated text (box_name answers vs reference)", "",
                  f"BLEU-4 {text['bleu4']:.3f}, ROUGE-L {text['rouge_l']:.3f}, METEOR {_fmt(text['meteor'])}"
                  + (f" — {text['meteor_note']}" if text.get("meteor_note") else ""), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Scoring conventions", "", report.get("conventions", ""), ""]
    return "\n".join(lines)


def compare(paths: Sequence[str | Path]) -> str:
    """A side-by-side table of the headline metrics of several report.json files."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    names = [str(r.get("model") or Path(p).stem) for r, p in zip(reports, paths)]
    header = ["metric", *names]
    rows: list[list[object]] = [["n", *[r["n"] for r in reports]],
                                ["unparseable", *[r["unparseable"] for r in reports]],
                                ["latency median s", *[r["latency_s"]["median"] for r in reports]]]
    tasks = sorted({t for r in reports for t in r["tasks"]}, key=list(HEADLINE).index)
    for task in tasks:
        for metric in ("n", *HEADLINE[task]):
            rows.append([f"{task}.{metric}", *[r["tasks"].get(task, {}).get(metric) for r in reports]])
    queries = sorted({q for r in reports for q in r.get("per_query", {})})
    for query in queries:
        for task in tasks:
            metric = HEADLINE[task][0]
            values = [r.get("per_query", {}).get(query, {}).get(task, {}).get(metric) for r in reports]
            if any(v is not None for v in values):
                rows.append([f"{query} / {task}.{metric}", *values])
    widths = [max(len(_fmt(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(_fmt(v).ljust(w) for v, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
