"""Gather the image evidence of one question from the model (tensors in, plain numbers out).

    evidence = gather_evidence(model, features, knowledge, kind_hint, prompt_masks)

* presence of every vocabulary name: the locator's heatmap peak of the name alone (the same
  ``MimoModel.phrase_presence`` that decides "absent" at a ``<SEG>``);
* image kind: the caller's metadata (``"XR chest"``, ``"CT"``, a DICOM modality); what it leaves
  open (often the body region) from the locator's scene head when the checkpoint has one;
* each prompted object's name fit: ``MimoModel.region_name_scores`` of the engine's mask.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mimo_chat.data.knowledge import KnowledgeBase
from mimo_chat.evidence.policy import Evidence, ImageKind, build_evidence
from mimo_chat.modeling.locator import target_fractions
from mimo_chat.modeling.mimo import MimoModel

SCENE_CONFIDENCE = 0.5  # the scene head's top kind is used from this probability on


@torch.inference_mode()
def vocabulary_presence(model: MimoModel, features: torch.Tensor) -> torch.Tensor:
    """(V,) presence probabilities of the locator's vocabulary on (1, W, E, E) ``features``."""
    count = len(model.vocabulary_ids)
    if not count:
        return torch.zeros(0)
    rows = torch.zeros(count, dtype=torch.long, device=features.device)
    presence = model.phrase_presence(features, rows, model.phrase_embeddings(model.vocabulary_ids))
    return presence.float().sigmoid().cpu()


@torch.inference_mode()
def scene_kind(model: MimoModel, features: torch.Tensor) -> ImageKind:
    """The locator's scene head's image kind when the checkpoint has one (``config.image_kinds``)."""
    # older checkpoints have no scene head and their config no ``image_kinds``
    kinds = tuple(getattr(model.config, "image_kinds", ()))
    head = getattr(model.locator, "image_kind_logits", None)
    if not kinds or head is None:
        return ImageKind()
    probabilities = head(features).float().softmax(-1)[0]  # (K,)
    best = int(probabilities.argmax())
    if float(probabilities[best]) < SCENE_CONFIDENCE:
        return ImageKind()
    return ImageKind.parse(kinds[best], source="scene head")


@torch.inference_mode()
def gather_evidence(
    model: MimoModel,
    features: torch.Tensor,
    knowledge: KnowledgeBase,
    kind_hint: str | None = None,
    prompt_masks: torch.Tensor | None = None,
    presence: torch.Tensor | None = None,
) -> Evidence:
    """Evidence on one image: ``features`` (1, W, E, E); ``prompt_masks`` (N, S, S) the engine's masks of
    the user's prompts in the model frame; ``presence`` (V,) when already computed for this image."""
    kind = ImageKind.parse(kind_hint)
    if kind.modality is None or kind.region is None:  # what the metadata leaves open, the image may tell
        scene = scene_kind(model, features)
        if scene.known:
            source = kind.source if kind.known else scene.source
            kind = replace(kind, modality=kind.modality or scene.modality, region=kind.region or scene.region,
                           source=source)
    if presence is None:
        presence = vocabulary_presence(model, features)
    scores = None
    if prompt_masks is not None and len(prompt_masks):
        fractions = target_fractions(prompt_masks.to(features.device), features.shape[-1])
        scores = model.region_name_scores(features, fractions).float().cpu().numpy()  # (N, V)
    return build_evidence(knowledge, list(model.config.locator_vocabulary), presence.numpy(), kind, scores)
