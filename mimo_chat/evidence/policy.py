"""What the image evidence allows a reply to name.

Evidence for one image and question (computed by the predictor, plain numbers here):

* the image kind (modality + body region): from the study's metadata when the caller gives it,
  what that leaves open from the locator's scene head when the checkpoint has one, else unknown;
* the locator's presence probability of every vocabulary name allowed on that kind of image;
* for boxes / clicks: how well each vocabulary name fits the engine's mask of each prompt.

A structure the knowledge base says cannot be on this kind of image (its ``modalities`` /
``regions``) is never named from the image. On a cross-sectional image (CT, MR or unknown), a
structure found that lies wholly below the diaphragm rules out those at or above it
(``mimo_chat.data.knowledge.ABOVE_DIAPHRAGM``) and those at the thoracic inlet (``UPPER_CHEST``):
one axial slice cannot show both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mimo_chat.data.knowledge import KnowledgeBase, KnowledgeEntry, above_diaphragm, below_diaphragm_slice

PRESENT = 0.5  # presence probability above which the locator finds a structure (logit 0)
SURE_NAME = 0.5  # a prompted object's name score from which the name is stated without doubt
MIN_NAME = 0.05  # below this no name fits the prompted object
# Modalities on which a prompted object's name below SURE_NAME is not offered even as a guess: on
# the MR dev patients such guesses were mostly wrong, on CT mostly right (the model card's
# "Naming a box or a click"). A name at or above SURE_NAME is still given.
GUESSES_WITHHELD = frozenset({"MR"})
MAX_DESCRIBED = 6  # structures named in a caption of the image
# A located structure's mask is drawn only when the name's heatmap agrees with it (soft Dice at least
# OUTLINE_FIT: the box drawn from the heatmap did not lead the decoder onto a neighbour) and the mask
# decoder predicts at least MASK_SHOWN IoU for it; otherwise the structure is named without an
# outline (a wrong outline misleads as a wrong name does). Chosen on the dev slices with
# python -m mimo_chat.evaluation.outline_check, which prints the lowest MASK_SHOWN at which nine in
# ten drawn outlines hit their label with and without the agreement bar (with it, MASK_SHOWN is a
# margin above that lowest value); re-check after retraining the locator, the prompt weights or the
# grounding decoder. The grounding decoder completes structures the heatmap covers only in part, so
# its right masks agree less with the heatmap than the engine decoder's did: its agreement bar is lower.
OUTLINE_FIT = 0.5
MASK_SHOWN = 0.6

_MODALITY_WORDS = {
    "ct": "CT", "mr": "MR", "mri": "MR", "xr": "XR", "cr": "XR", "dx": "XR", "x-ray": "XR", "xray": "XR",
    "radiograph": "XR",
}
_REGION_WORDS = {"chest": "thorax", "thorax": "thorax", "thoracic": "thorax", "lung": "thorax", "abdomen": "abdomen",
                 "abdominal": "abdomen", "pelvis": "pelvis", "head": "head", "brain": "head", "neck": "neck"}


@dataclass(frozen=True)
class ImageKind:
    """Modality ("CT", "MR", "XR") and body region ("thorax", "abdomen", ...); None = unknown."""

    modality: str | None = None
    region: str | None = None
    source: str = "unknown"  # "metadata", "scene head" or "unknown"
    axial: bool = True  # False: a coronal or sagittal view of a volume (all levels on one image)

    @classmethod
    def parse(cls, text: str | None, source: str = "metadata") -> ImageKind:
        """``"XR chest"``, ``"CT"``, ``"MR abdomen coronal"``, DICOM codes (``"DX"``, ``"CR"``) -> ImageKind."""
        words = (text or "").lower().replace("_", " ").replace("/", " ").replace(",", " ").split()
        modality = next((_MODALITY_WORDS[w] for w in words if w in _MODALITY_WORDS), None)
        regions = {_REGION_WORDS[w] for w in words if w in _REGION_WORDS}
        region = regions.pop() if len(regions) == 1 else None  # "chest abdomen pelvis": no single region
        axial = not {"coronal", "sagittal"} & set(words)
        if modality is None and region is None:
            return cls(axial=axial)
        return cls(modality, region, source, axial)

    @property
    def known(self) -> bool:
        return self.modality is not None or self.region is not None

    def phrase(self) -> str:
        """'a chest radiograph', 'a CT of the abdomen', 'an MR image' ..."""
        place = {"thorax": "chest", "head": "head", "neck": "neck", "abdomen": "abdomen", "pelvis": "pelvis"}.get(
            self.region or "", "")
        if self.modality == "XR":
            return f"a {place} radiograph" if place else "a radiograph"
        if self.modality in ("CT", "MR"):
            noun = "a CT" if self.modality == "CT" else "an MR image"
            return f"{noun} of the {place}" if place else noun
        return f"an image of the {place}" if place else "an image"

    @property
    def many_levels(self) -> bool:
        """A radiograph or a coronal / sagittal view shows many levels at once: it is no axial slice."""
        return self.modality == "XR" or not self.axial

    def allows(self, entry: KnowledgeEntry | None) -> bool:
        """Can a structure with this knowledge-base entry be on this kind of image?"""
        if entry is None:
            return self.modality is None
        if self.modality is not None and self.modality not in entry.modalities:
            return False
        return self.region is None or not entry.regions or self.region in entry.regions


@dataclass
class PromptedObject:
    """One box / click set: the engine's mask is named by the best-fitting allowed vocabulary name."""

    name: str | None  # None: no name fits well enough to be said
    name_score: float  # 0..1 (soft Dice of the name's heatmap and the mask)
    best: str | None = None  # the best-fitting allowed name whatever its score (``name_check`` scores it)

    @property
    def sure(self) -> bool:
        return self.name is not None and self.name_score >= SURE_NAME


@dataclass
class Evidence:
    kind: ImageKind
    presence: dict[str, float]  # allowed vocabulary name -> presence probability
    prompted: list[PromptedObject] = field(default_factory=list)
    excluded: tuple[str, ...] = ()  # vocabulary names this kind of image cannot show
    outline: dict[str, float] = field(default_factory=dict)  # found name -> the decoder's predicted IoU of its mask
    fit: dict[str, float] = field(default_factory=dict)  # found name -> its heatmap's agreement with that mask

    def present(self) -> list[tuple[str, float]]:
        """Structures the locator finds, most confident first."""
        found = [(name, p) for name, p in self.presence.items() if p > PRESENT]
        return sorted(found, key=lambda item: -item[1])

    def is_present(self, name: str) -> bool:
        return self.presence.get(name, 0.0) > PRESENT

    def outlined(self, name: str) -> bool:
        """Whether a found structure's mask is good enough to draw (no quality known: drawn)."""
        return outline_shown(self.outline.get(name), self.fit.get(name))


def outline_shown(score: float | None, fit: float | None) -> bool:
    """The outline gate: predicted IoU ``score`` and heatmap agreement ``fit`` (None: not known, no bar)."""
    return (score is None or score >= MASK_SHOWN) and (fit is None or fit >= OUTLINE_FIT)


def build_evidence(
    knowledge: KnowledgeBase,
    vocabulary: Sequence[str],
    presence: np.ndarray,
    kind: ImageKind,
    region_scores: np.ndarray | None = None,
) -> Evidence:
    """``presence`` (V,) probabilities of ``vocabulary``; ``region_scores`` (N, V) name fit of N prompted objects."""
    allowed = np.array([kind.allows(knowledge.find(name)) for name in vocabulary], dtype=bool)
    allowed &= ~_ruled_out_by_level(vocabulary, presence, allowed, kind)
    found = {name: float(p) for name, p, ok in zip(vocabulary, presence, allowed, strict=True) if ok}
    excluded = tuple(name for name, ok in zip(vocabulary, allowed, strict=True) if not ok)
    prompted = []
    least = SURE_NAME if kind.modality in GUESSES_WITHHELD else MIN_NAME
    for scores in region_scores if region_scores is not None else []:
        scores = np.where(allowed, scores, -1.0)
        best = int(np.argmax(scores)) if len(scores) else -1
        if best < 0 or scores[best] < 0:  # no name allowed on this kind of image
            prompted.append(PromptedObject(None, 0.0))
        else:
            fit = float(scores[best])
            prompted.append(PromptedObject(vocabulary[best] if fit >= least else None, fit, vocabulary[best]))
    return Evidence(kind, found, prompted, excluded)


def _ruled_out_by_level(vocabulary: Sequence[str], presence: np.ndarray, allowed: np.ndarray, kind: ImageKind) -> np.ndarray:
    """(V,) names that cannot share this slice with a structure found below the diaphragm."""
    ruled_out = np.zeros(len(vocabulary), dtype=bool)
    if kind.many_levels:
        return ruled_out
    found = [name for name, p, ok in zip(vocabulary, presence, allowed, strict=True) if p > PRESENT and ok]
    if below_diaphragm_slice(found):
        ruled_out[:] = [above_diaphragm(name) for name in vocabulary]
    return ruled_out


def clicks_inside(points: Sequence[Sequence[float]], labels: Sequence[int] | None, mask: np.ndarray) -> bool:
    """Whether every positive click ``[x, y]`` (original pixels) lies inside ``mask`` (H, W): the clicks
    then point at the structure that mask outlines."""
    labels = list(labels) if labels is not None else [1] * len(points)
    positive = [point for point, label in zip(points, labels, strict=True) if label == 1]
    height, width = mask.shape
    inside = [0 <= int(y) < height and 0 <= int(x) < width and bool(mask[int(y), int(x)]) for x, y in positive]
    return bool(inside) and all(inside)


def groundable(names: Sequence[str], vocabulary: Sequence[str]) -> dict[str, str | None]:
    """Each asked name -> the vocabulary name that grounds it (same structure), or None."""
    from mimo_chat.data.names import same_structure

    return {name: next((v for v in vocabulary if same_structure(v, name)), None) for name in names}
