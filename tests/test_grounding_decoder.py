"""The grounding decoder, which draws the by-name masks from the locator's boxes: where a box covers
only part of a structure (as a heatmap over the head of a pancreas or the inner end of a clavicle
does) it outlines more of the structure than the engine's decoder, and on a tight box it still
outlines the structure. Real dev patients of CURVAS CT and JSRT chest radiographs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mimo_chat.boxes import mask_to_box
from mimo_chat.evaluation.metrics import mask_iou_dice
from mimo_chat.modeling.mimo import REPOSITORY_CHECKPOINTS
from mimo_chat.modeling.sam import build_mask_decoder, load_decoder_weights
from mimo_chat.segmentation import SegmentationPredictor

CASES = (("curvas_ct", "pancreas", 3), ("curvas_ct", "liver", 2), ("jsrt_scr_cxr", "left clavicle", 3),
         ("jsrt_scr_cxr", "heart", 2))


@pytest.fixture(scope="module")
def structures(shared_data):
    """(image, structure mask) of dev slices only."""
    from mimo_chat.data.sources import iter_source

    found = []
    for source, name, count in CASES:
        labelled = (s for s in iter_source(source, split="dev") if s.masks.get(name) is not None and s.masks[name].sum() > 200)
        found += [(s.image, s.masks[name]) for s in itertools.islice(labelled, count)]
    assert len(found) == sum(count for *_, count in CASES)
    return found


def part_box(mask: np.ndarray, share: float) -> list[float]:
    """The structure's box cut to its first ``share`` of the width (left side of the image)."""
    x0, y0, x1, y1 = mask_to_box(mask)
    return [x0, y0, x0 + share * (x1 - x0), y1]


@torch.inference_mode()
def test_grounding_decoder_completes_what_a_partial_box_leaves_out(structures) -> None:
    engine = SegmentationPredictor.from_pretrained()
    grounding = build_mask_decoder(engine.model.config)
    load_decoder_weights(grounding, engine.model.config, REPOSITORY_CHECKPOINTS / "grounding")
    scores = {"engine part": [], "grounding part": [], "engine tight": [], "grounding tight": []}
    for image, mask in structures:
        context = engine.encode(image)
        for kind, box in (("part", part_box(mask, 0.6)), ("tight", mask_to_box(mask))):
            model_box = torch.as_tensor(engine.transform.apply_boxes(np.array([box]), context.original_size),
                                        dtype=torch.float32)
            for name, decoder in (("engine", None), ("grounding", grounding)):
                sparse, dense = engine.model.embed_prompts(boxes=model_box)
                logits, iou = engine.model.decode(context.embedding, sparse, dense, decoder=decoder)
                predicted = engine.postprocess(context, logits, iou).masks[0]
                scores[f"{name} {kind}"].append(mask_iou_dice(predicted, mask)[0])
    means = {key: float(np.mean(values)) for key, values in scores.items()}
    assert means["grounding part"] >= means["engine part"] + 0.15, means
    assert means["grounding tight"] >= 0.6 and means["grounding tight"] >= means["engine tight"] - 0.05, means
