"""matplotlib figures next to report.json: per-structure bars, IoU histograms, overlays, confusion.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state) and saved as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mimo_chat.evaluation.runner import Prediction, load_image, load_mask
from mimo_chat.evaluation.scoring import RowScore

SEG_TASKS = ("text_seg", "box_seg", "point_seg", "box_name")


def per_structure_bars(report: dict, path: Path) -> Path | None:
    """Grouped bars of mIoU per query for each segmentation task."""
    tasks = [t for t in SEG_TASKS if t in report["tasks"]]
    queries = [q for q, per_task in report["per_query"].items() if any(t in per_task for t in tasks)]
    if not tasks or not queries:
        return None
    figure = Figure(figsize=(max(6.0, 0.7 * len(queries) * len(tasks) ** 0.5), 4.0), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(tasks)
    positions = np.arange(len(queries))
    for index, task in enumerate(tasks):
        values = [report["per_query"][q].get(task, {}).get("miou", np.nan) for q in queries]
        axes.bar(positions + index * width, values, width, label=task)
    axes.set_xticks(positions + width * (len(tasks) - 1) / 2, queries, rotation=45, ha="right")
    axes.set_ylabel("mIoU")
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small")
    axes.set_title("mIoU per structure")
    figure.savefig(path, dpi=100)
    return path


def iou_histograms(scores: Sequence[RowScore], path: Path) -> Path | None:
    """Histogram of per-row mask IoU for each segmentation task (and box IoU for detect_box)."""
    series = {t: [s.iou for s in scores if s.task == t and s.iou is not None] for t in SEG_TASKS}
    series["detect_box (box IoU)"] = [s.box_iou for s in scores if s.task == "detect_box" and s.box_iou is not None]
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure = Figure(figsize=(3.2 * len(series), 3.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(series)))
    for ax, (name, values) in zip(axes, series.items()):
        ax.hist(values, bins=np.linspace(0, 1, 21), color="tab:blue")
        ax.set_title(f"{name} (n={len(values)})", fontsize="small")
        ax.set_xlabel("IoU")
    figure.savefig(path, dpi=100)
    return path


def overlay_grid(bench: Path, rows: Sequence[dict], predictions: dict[str, Prediction],
                 scores: Sequence[RowScore], path: Path, count: int = 4) -> Path | None:
    """Best and worst rows by IoU: image, true mask (green outline) and predicted mask (red)."""
    by_id = {row["id"]: row for row in rows}
    ranked = sorted((s for s in scores if s.iou is not None and s.id in predictions
                     and "target_mask" in by_id[s.id]), key=lambda s: s.iou)
    if not ranked:
        return None
    best = ranked[-count:][::-1]
    worst = ranked[:count]
    columns = max(len(best), len(worst))
    figure = Figure(figsize=(2.6 * columns, 5.8), layout="constrained")
    axes = np.asarray(figure.subplots(2, columns, squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, score in [(axes[0, i], s) for i, s in enumerate(best)] + [(axes[1, i], s) for i, s in enumerate(worst)]:
        row = by_id[score.id]
        image = load_image(bench, row["image"]).astype(np.float32) / 255.0
        truth = load_mask(bench, row["target_mask"])
        predicted = next((m for m in (p.mask_array() for p in predictions[score.id].phrases) if m is not None), None)
        if predicted is not None:
            image[predicted] = 0.5 * image[predicted] + 0.5 * np.array([1.0, 0.1, 0.1])
        ax.imshow(image)
        ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{score.task}: {score.query}\nIoU {score.iou:.2f}", fontsize="x-small")
    figure.suptitle("best (top) and worst (bottom) by IoU: green = truth, red = prediction", fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def observe_confusion(report: dict, path: Path) -> Path | None:
    """2x2 confusion table of observe answers (rows truth, columns answer; positive = yes)."""
    observe = report["tasks"].get("observe")
    if not observe:
        return None
    confusion = observe["confusion"]
    table = np.array([[confusion["tp"], confusion["fn"]], [confusion["fp"], confusion["tn"]]])
    figure = Figure(figsize=(3.4, 3.0), layout="constrained")
    axes = figure.subplots()
    axes.imshow(table, cmap="Blues")
    for (i, j), value in np.ndenumerate(table):
        axes.text(j, i, str(value), ha="center", va="center", color="black")
    axes.set_xticks([0, 1], ["answer yes", "answer no"])
    axes.set_yticks([0, 1], ["truth yes", "truth no"])
    axes.set_title(f"observe (n={observe['n']}, F1 {observe['f1']:.2f})", fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def write_plots(report: dict, bench: Path, rows: Sequence[dict], predictions: dict[str, Prediction],
                scores: Sequence[RowScore], folder: Path, stem: str = "report") -> list[Path]:
    """All figures, saved as ``{stem}_*.png`` in ``folder``; returns the paths written."""
    made = [
        per_structure_bars(report, folder / f"{stem}_per_structure.png"),
        iou_histograms(scores, folder / f"{stem}_iou_histogram.png"),
        overlay_grid(bench, rows, predictions, scores, folder / f"{stem}_overlays.png"),
        observe_confusion(report, folder / f"{stem}_observe_confusion.png"),
    ]
    return [p for p in made if p is not None]
