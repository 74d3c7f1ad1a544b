"""Is the mask decoder's predicted IoU a fair judge of a located structure's outline? (dev patients)

    python -m mimo_chat.evaluation.outline_check [--checkpoint DIR] [--cache DIR]

For every labelled structure of the locator's vocabulary on the cached dev slices
(``python -m mimo_chat.train.seg_cache``), the structure is located by name as the chat does
(``MimoPredictor.locate``: the phrase's heatmap box prompts the decoder) and its mask compared with
the label. Printed per threshold on the predicted IoU, without and with the heatmap-agreement bar
(``OUTLINE_FIT``): the share of found structures whose outline would be drawn, the share of drawn
outlines that hit the label (IoU >= 0.5, the benchmark's hit criterion) and the hits lost; the lowest
threshold at which nine in ten drawn outlines hit; then per structure the mean predicted IoU,
agreement and actual IoU. This is the check behind ``mimo_chat.evidence.policy.MASK_SHOWN`` and
``OUTLINE_FIT``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mimo_chat.evaluation.metrics import mask_iou_dice
from mimo_chat.evidence.policy import MASK_SHOWN, OUTLINE_FIT, outline_shown

HIT_IOU = 0.5
THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
PRECISION = 0.9  # the share of drawn outlines that must hit their label


def lowest_threshold(predicted: np.ndarray, hits: np.ndarray, precision: float = PRECISION) -> float | None:
    """The lowest predicted IoU, in steps of 0.01, from which ``precision`` of the drawn outlines hit."""
    for threshold in np.round(np.arange(0.0, 1.0, 0.01), 2):
        drawn = predicted >= threshold
        if drawn.any() and hits[drawn].mean() >= precision:
            return float(threshold)
    return None


def located_outlines(predictor, records: Sequence[dict]) -> list[tuple[str, str, float, float, float]]:
    """(source, name, predicted IoU, actual IoU, heatmap agreement) of every labelled vocabulary
    structure the locator finds."""
    from mimo_chat.predictor import MimoContext
    from mimo_chat.segmentation import ImageContext
    from mimo_chat.train.seg_cache import unpack_mask

    vocabulary = set(predictor.config.locator_vocabulary)
    rows = []
    for record in records:
        names = [name for name in record["masks"] if name in vocabulary]
        if not names:
            continue
        shape = tuple(int(v) for v in record["shape"])
        image = ImageContext(record["embedding"].float()[None], shape, predictor.processor.transform.input_size(shape))
        for found in predictor.locate(MimoContext(image), names):
            if found.mask is None:
                continue
            truth = unpack_mask(record["masks"][found.name], shape)
            rows.append((record["source"], found.name, float(found.score), mask_iou_dice(found.mask, truth)[0],
                         float(found.fit)))
    return rows


def report(rows: Sequence[tuple[str, str, float, float, float]]) -> str:
    predicted = np.array([row[2] for row in rows])
    actual = np.array([row[3] for row in rows])
    fit = np.array([row[4] for row in rows])
    hits = actual >= HIT_IOU
    lines = [f"{len(rows)} located structures on dev slices; outlines hitting the label: {hits.mean():.3f}"]
    for bar in (0.0, OUTLINE_FIT):
        agrees = fit >= bar
        lines += [f"heatmap agreement >= {bar:.2f}:",
                  "predicted IoU >=   drawn   hits among drawn   hits lost   misses kept out"]
        for threshold in THRESHOLDS:
            drawn = (predicted >= threshold) & agrees
            lines.append(f"{threshold:>17.2f}   {drawn.mean():5.2f}   {hits[drawn].mean() if drawn.any() else 0:16.3f}"
                         f"   {int((hits & ~drawn).sum()):9d}   {int((~hits & ~drawn).sum()):15d}")
        lowest = lowest_threshold(np.where(agrees, predicted, -1.0), hits)
        lines.append(f"lowest predicted IoU from which {PRECISION:.0%} of drawn outlines hit: "
                     f"{'none' if lowest is None else f'{lowest:.2f}'}")
    drawn = np.array([outline_shown(row[2], row[4]) for row in rows], dtype=bool)
    lines.append(f"the gate (MASK_SHOWN {MASK_SHOWN}, OUTLINE_FIT {OUTLINE_FIT}): {drawn.mean():.2f} drawn, "
                 f"{hits[drawn].mean() if drawn.any() else 0:.3f} of them hit, {int((hits & ~drawn).sum())} hits lost")
    by_name: dict[str, list[tuple[float, float, float, bool]]] = defaultdict(list)
    for (_, name, guess, truth, agreement), shown in zip(rows, drawn, strict=True):
        by_name[name].append((guess, agreement, truth, shown))
    lines.append("structure               n   predicted   agreement   actual   drawn   hits drawn")
    for name, values in sorted(by_name.items()):
        table = np.array(values, dtype=float)
        shown = table[:, 3] > 0
        lines.append(f"{name:<22}{len(table):>3}   {table[:, 0].mean():9.2f}   {table[:, 1].mean():9.2f}   "
                     f"{table[:, 2].mean():6.2f}   {int(shown.sum()):5d}   {int((shown & (table[:, 2] >= HIT_IOU)).sum()):10d}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.evaluation.outline_check", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="lite", help="model folder (default: the embedded lite model)")
    parser.add_argument("--cache", default=None, help="seg_cache folder (default: the cache's seg_cache)")
    args = parser.parse_args(argv)
    from mimo_chat.predictor import MimoPredictor, default_quantization
    from mimo_chat.train.seg_cache import default_cache, load_cache

    folder = Path(args.cache) if args.cache else default_cache()
    records = load_cache(folder / "dev")
    if not records:
        parser.error(f"no cached dev slices in {folder / 'dev'}: run python -m mimo_chat.train.seg_cache first")
    predictor = MimoPredictor.from_pretrained(args.checkpoint, quantize=default_quantization("auto", args.checkpoint, "cpu"))
    with torch.inference_mode():
        print(report(located_outlines(predictor, records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
