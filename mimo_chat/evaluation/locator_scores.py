"""Dev scores of the locator + engine by name, by box and by kind, on cached embeddings (unseen patients).

    python -m mimo_chat.evaluation.locator_scores --locator RUN_OR_CHECKPOINT [--cache DIR] [--split dev]
        [--sources a,b] [--engine-checkpoint DIR | --baseline-engine] [--json OUT]

What the chat predictor does with a name or a box, without the language model around it, on
every slice of :mod:`mimo_chat.train.seg_cache` of ``--split`` (held-out patients):

- ``text_seg``: the name's heatmap -> presence -> its box -> the engine's mask; IoU with the
  ground truth at the original resolution (an absent verdict scores 0);
- ``box_name``: the engine's mask of the tight box -> the vocabulary name whose heatmap fits it
  best (soft Dice, as ``MimoModel.region_name_scores``); accuracy, over every vocabulary name and
  over the names the image's predicted kind allows (``kind_names``);
- ``kind``: the image-kind head's accuracy.

Scores are printed per (source, structure) and per source. The locator comes from a run folder of
``python -m mimo_chat.train.locator`` or a checkpoint folder (model.safetensors + config.json).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.names import same_structure
from mimo_chat.evaluation.engine_dice import context_of
from mimo_chat.evaluation.report import print_json
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.locator import StructureLocator, heatmap_box, presence_logits, target_fractions
from mimo_chat.segmentation import CHECKPOINT_DIR, SegmentationPredictor
from mimo_chat.train.locator import PhraseEmbedder
from mimo_chat.train.locator_targets import IMAGE_KINDS, image_kind
from mimo_chat.train.seg_cache import default_cache, load_cache, unpack_mask

PYRADIOMICS_NAMES = {"lung": "lung tumour", "brain": "brain tumour", "breast": "breast lesion"}


def load_locator(folder: Path) -> tuple[StructureLocator, tuple[str, ...], tuple[str, ...]]:
    """(locator, vocabulary, image kinds) from a locator run folder or a MIMO checkpoint folder."""
    if (folder / "locator.json").exists():
        summary = json.loads((folder / "locator.json").read_text())
        state = load_file(str(folder / "locator.safetensors"))
        vocabulary, kinds, width = tuple(summary["vocabulary"]), tuple(summary.get("image_kinds", ())), summary["width"]
    else:
        config = MimoConfig.load(folder / "config.json")
        state = load_file(str(folder / "model.safetensors"))
        vocabulary, kinds, width = config.locator_vocabulary, config.image_kinds, config.locator_width
    state = {key.removeprefix("locator."): value.float() for key, value in state.items() if key.startswith("locator.")}
    text_hidden = state["phrase_mlp.0.weight"].shape[0]
    locator = StructureLocator(image_channels=256, text_hidden=text_hidden, width=width, num_image_kinds=len(kinds))
    locator.load_state_dict(state)
    return locator.eval(), vocabulary, kinds


def kind_names(split_folder: Path) -> dict[str, set[str]]:
    """The structure names labelled on training images of each kind (what a kind allows)."""
    allowed: dict[str, set[str]] = defaultdict(set)
    for record in load_cache(split_folder, embeddings=False):
        kind = image_kind(record["source"], record["modality"], set(record["masks"]))
        if kind is not None:
            allowed[kind] |= {locator_name(record, name) for name in record["masks"]}
    return allowed


def locator_name(record: dict, name: str) -> str:
    """The locator's name of a cached mask (pyradiomics lesions are named by their collection)."""
    if record["source"] == "pyradiomics" and name in ("tumour", "lesion"):
        return PYRADIOMICS_NAMES.get("".join(ch for ch in record["patient"] if ch.isalpha()), name)
    return name


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    union = (prediction | target).sum()
    return float((prediction & target).sum() / union) if union else 1.0


@torch.inference_mode()
def evaluate(locator: StructureLocator, vocabulary: tuple[str, ...], kinds: tuple[str, ...],
             engine: SegmentationPredictor, embed: PhraseEmbedder, records: list[dict],
             allowed: dict[str, set[str]], min_pixels: int = 100) -> dict:
    """Per-key lists of scores -> {key: {"n", "mean"}} (see the module docstring)."""
    scores: dict[str, list[float]] = defaultdict(list)
    names_embedded = embed(list(vocabulary))  # (V, H)
    grid, size = 64, engine.transform.image_size
    for record in records:
        shape = tuple(record["shape"])
        context = context_of(record, engine)
        masks = {locator_name(record, name): unpack_mask(packed, shape) for name, packed in record["masks"].items()}
        masks = {name: mask for name, mask in masks.items() if mask.sum() >= min_pixels * shape[0] * shape[1] / 512**2}
        features = locator.image_features(record["embedding"].float()[None])
        source = record["source"]
        kind = image_kind(source, record["modality"], set(masks))
        predicted_kind = kinds[int(locator.image_kind_logits(features).argmax(1))] if kinds else None
        if kind is not None and predicted_kind is not None:
            for key in ("kind", f"kind/{source}"):
                scores[key].append(float(predicted_kind == kind))
        heatmaps = locator(features, torch.zeros(len(vocabulary), dtype=torch.long), names_embedded)  # (V, E, E)
        presence = presence_logits(heatmaps)
        probabilities = heatmaps.sigmoid().flatten(1)  # (V, E*E)
        for name, target in masks.items():
            if name in vocabulary:
                index = vocabulary.index(name)
                box = heatmap_box(heatmaps[index].numpy(), size / grid) if float(presence[index]) > 0 else None
                if box is None:
                    value = 0.0
                else:
                    original = engine.transform.unapply_boxes(np.asarray([box], dtype=np.float32), shape)[0].tolist()
                    value = iou(engine.segment(context, boxes=[original]).masks[0], target)
                for key in ("text_seg", f"text_seg/{source}", f"text_seg/{source}/{name}"):
                    scores[key].append(value)
            region = engine.segment(context, boxes=[mask_to_box(target)]).masks[0]
            fraction = target_fractions(engine.transform.apply_mask(region)[None], grid).flatten(1)  # (1, E*E)
            dice = (2 * fraction @ probabilities.T / (fraction.sum() + probabilities.sum(1) + 1e-6))[0]  # (V,)
            ranked = [vocabulary[i] for i in dice.argsort(descending=True).tolist()]
            permitted = allowed.get(predicted_kind or "", set(vocabulary))
            best_allowed = next((n for n in ranked if n in permitted), ranked[0])
            for prefix, guess in (("box_name", ranked[0]), ("box_name_kind", best_allowed)):
                for key in (prefix, f"{prefix}/{source}", f"{prefix}/{source}/{name}"):
                    scores[key].append(float(same_structure(guess, name)))
    return {key: {"n": len(values), "mean": round(float(np.mean(values)), 4)} for key, values in sorted(scores.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locator", type=Path, required=True, help="locator run folder or MIMO checkpoint folder")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--sources", default=None, help="comma-separated sources to keep (default: all)")
    parser.add_argument("--engine-checkpoint", type=Path, default=None, help="prompt weights (default: checkpoints/segmenter)")
    parser.add_argument("--baseline-engine", action="store_true", help="unmodified LiteMedSAM prompt weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache or default_cache()
    locator, vocabulary, kinds = load_locator(args.locator)
    checkpoint = None if args.baseline_engine else args.engine_checkpoint or CHECKPOINT_DIR
    engine = SegmentationPredictor.from_pretrained(checkpoint=checkpoint)
    records = load_cache(cache / args.split, sources=args.sources)
    result = evaluate(locator, vocabulary, kinds, engine, PhraseEmbedder(MimoConfig.lite()), records,
                      kind_names(cache / "train"))
    result["_about"] = {"locator": str(args.locator), "split": args.split, "slices": len(records),
                        "image_kinds": list(kinds), "known_kinds": list(IMAGE_KINDS)}
    print_json(result, args.json)


if __name__ == "__main__":
    main()
