"""Dev Dice of the segmentation engine on cached real slices (held-out patients only).

    python -m mimo_chat.evaluation.engine_dice [--cache DIR] [--split dev] [--checkpoint DIR | --baseline]

For every structure on every cached slice of ``--split`` (see :mod:`mimo_chat.train.seg_cache`;
the split comes from :func:`mimo_chat.data.sources.split_of`): ``box`` = the tight box,
``click`` = one positive click at the interior point farthest from the border (as
``make_bench``'s ``point_seg``). Dice is computed at the original resolution. Structures
covering at least 0.5 % of the image form the ``click`` target set (``click_large``).

A user's correction is scored too: ``loose`` = the tight box pushed out by ``LOOSE_FRACTION`` of
the image side on every side; where its mask leaks (at least ``MIN_LEAK`` pixels off the
structure), ``corrected`` = the same box with one negative click at the deepest point of the
largest leak, and ``removed`` = the share of those clicks whose pixel the corrected mask leaves
out (``loose`` and ``corrected`` are scored on those structures only).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from mimo_chat.boxes import mask_to_box
from mimo_chat.evaluation.outline_check import HIT_IOU
from mimo_chat.segmentation import CHECKPOINT_DIR, ImageContext, SegmentationPredictor
from mimo_chat.train.seg_cache import default_cache, load_cache, unpack_mask

LARGE_FRACTION = 0.005
LOOSE_FRACTION = 0.08
MIN_LEAK = 50


def interior_point(mask: np.ndarray) -> list[float]:
    """[x, y] pixel centre farthest from the border of ``mask``."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [col + 0.5, row + 0.5]


def loose_box(mask: np.ndarray) -> list[float]:
    """The tight box of ``mask`` pushed out by ``LOOSE_FRACTION`` of the image side, clipped to the image."""
    height, width = mask.shape
    margin = LOOSE_FRACTION * max(height, width)
    x0, y0, x1, y1 = mask_to_box(mask)
    return [max(x0 - margin, 0.0), max(y0 - margin, 0.0), min(x1 + margin, float(width)), min(y1 + margin, float(height))]


def leak_click(prediction: np.ndarray, target: np.ndarray) -> list[float] | None:
    """[x, y] deepest point of the largest part of ``prediction`` off ``target``; None below ``MIN_LEAK`` pixels."""
    components, count = ndimage.label(prediction & ~target)
    if not count:
        return None
    sizes = np.bincount(components.ravel())[1:]
    if sizes.max() < MIN_LEAK:
        return None
    return interior_point(components == int(np.argmax(sizes)) + 1)


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    total = prediction.sum() + target.sum()
    return float(2 * (prediction & target).sum() / total) if total else 1.0


def context_of(record: dict, predictor: SegmentationPredictor) -> ImageContext:
    shape = tuple(record["shape"])
    embedding = record["embedding"].float()[None].to(predictor.device)
    return ImageContext(embedding, shape, predictor.transform.input_size(shape))


def evaluate(predictor: SegmentationPredictor, records: list[dict], min_pixels: int = 100) -> dict:
    """Mean Dice per prompt kind, per source, modality and (source, structure); the correction by modality."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in records:
        context = context_of(record, predictor)
        shape = tuple(record["shape"])
        masks = {name: unpack_mask(packed, shape) for name, packed in record["masks"].items()}
        masks = {name: mask for name, mask in masks.items() if mask.sum() >= min_pixels * shape[0] * shape[1] / 512**2}
        if not masks:
            continue
        names = sorted(masks)
        boxes = [mask_to_box(masks[name]) for name in names]
        clicks = [[interior_point(masks[name])] for name in names]
        box_result = predictor.segment(context, boxes=boxes)
        click_result = predictor.segment(context, points=clicks, point_labels=[[1]] * len(names))
        loose = [loose_box(masks[name]) for name in names]
        loose_result = predictor.segment(context, boxes=loose)
        leaks = [leak_click(loose_result.masks[i], masks[name]) for i, name in enumerate(names)]
        leaking = [i for i, click in enumerate(leaks) if click is not None]
        if leaking:
            corrected = predictor.segment(context, boxes=[loose[i] for i in leaking],
                                          points=[[leaks[i]] for i in leaking], point_labels=[[0]] * len(leaking))
            for k, i in enumerate(leaking):
                x, y = leaks[i]
                for kind, value in (("loose", dice(loose_result.masks[i], masks[names[i]])),
                                    ("corrected", dice(corrected.masks[k], masks[names[i]])),
                                    ("removed", float(not corrected.masks[k][int(y), int(x)]))):
                    for key in (kind, f"{kind}/{record['modality']}"):
                        scores[key].append(value)
        for index, name in enumerate(names):
            target = masks[name]
            large = target.mean() >= LARGE_FRACTION
            for kind, result in (("box", box_result), ("click", click_result)):
                value = dice(result.masks[index], target)
                for key in (f"{kind}_hit", f"{kind}_hit/{record['modality']}"):
                    scores[key].append(float(value / (2 - value) >= HIT_IOU))  # IoU from Dice
                keys = [kind, f"{kind}/{record['source']}", f"{kind}/{record['modality']}",
                        f"{kind}/{record['source']}/{name}"]
                if large:
                    keys += [f"{kind}_large", f"{kind}_large/{record['source']}"]
                for key in keys:
                    scores[key].append(value)
    def measure(key: str) -> str:
        return "share" if key.startswith("removed") or "_hit" in key else "dice"

    return {key: {"n": len(values), measure(key): round(float(np.mean(values)), 4)} for key, values in sorted(scores.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--checkpoint", type=Path, default=None, help="prompt weights folder (default: checkpoints/segmenter)")
    parser.add_argument("--baseline", action="store_true", help="unmodified LiteMedSAM (no trained prompt weights)")
    parser.add_argument("--sources", default=None, help="comma-separated sources to keep (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-refine", action="store_true", help="clicks: skip the second decode with the first mask's box")
    args = parser.parse_args(argv)
    predictor = SegmentationPredictor.from_pretrained(checkpoint=None if args.baseline else args.checkpoint or CHECKPOINT_DIR)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor.refine_clicks = not args.no_refine
    records = load_cache((args.cache or default_cache()) / args.split, sources=args.sources)
    print(json.dumps(evaluate(predictor, records), indent=1))


if __name__ == "__main__":
    main()
