"""The whole-volume pass: which slices hold each structure, its 3D mask, volume in mL and NIfTI.

    encodings = SliceEncodings(study, predictor.encode)           # keep per session: one encoding per slice
    result = segment_volume(study, ["liver", "spleen"], predictor, encodings=encodings,
                            progress=lambda done, total, message: ..., cancel=threading.Event())
    save_niftis(result, study, "out", source_grid(path, study))    # DIR/<structure>.nii.gz
    result.to_json()                                              # the CLI's --json object

For each structure (a pair such as "kidneys" is its left and right parts, followed separately):

1. scan: every axial slice is encoded once and the locator says how likely the structure is on it
   (``MimoPredictor.locate(..., masks=False)``: no language model, no decoder);
2. seed: on the slice where the locator is most confident, its box prompt gives the grounded mask
   (``locate(..., masks=True)``);
3. walk: the mask's box prompts the engine on the next slice up and down (``propagate``), reusing
   the cached embeddings; where the locator also finds the structure with an outline the chat would
   draw (``policy.outline_shown``), the better-rated of its mask and the walked one is kept;
4. clean: the largest 3D component (and any other at least a tenth of its size), holes filled.

``walk=False`` gives the 2D answer instead: each slice the locator calls present gets its own
locator mask, with no walk and no clean-up (the anchor the docs compare against).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mimo_chat.data.names import canonical_name
from mimo_chat.evidence.policy import outline_shown
from mimo_chat.imaging import Study
from mimo_chat.segmentation import SegmentationPredictor
from mimo_chat.volume.encodings import SliceEncodings
from mimo_chat.volume.geometry import (
    SourceGrid,
    axial_range,
    extent_mm,
    keep_main_component,
    volume_ml,
    write_mask_nifti,
)
from mimo_chat.volume.propagate import PropagationSettings, VolumeCancelled, propagate

Finder = Callable[[int, Any, Sequence[str], bool], list]  # (slice, context, names, masks) -> list[Located]
Progress = Callable[[int, int, str], None]  # (done, total, message)
PAIRED = {"kidneys": "kidney", "lungs": "lung", "adrenal glands": "adrenal gland"}
PRESENT = 0.5  # locator presence (probability) above which a slice holds the structure


def structure_parts(name: str) -> tuple[str, ...]:
    """The names the locator is asked for: ``"kidneys"`` -> ("right kidney", "left kidney"), else the name."""
    canonical = canonical_name(name)
    if not canonical:
        raise ValueError(f"{name!r} is not a structure name")
    if canonical in PAIRED:
        return (f"right {PAIRED[canonical]}", f"left {PAIRED[canonical]}")
    return (canonical,)


@dataclass
class StructureResult:
    """One requested structure on the study's (X, Y, Z) RAS grid."""

    name: str
    parts: tuple[str, ...]
    mask: np.ndarray  # (X, Y, Z) bool
    volume_ml: float
    slices: list[int] | None  # [first, last] axial slice (0 = most inferior); None when not found
    extent_mm: list[float]  # bounding box along right, anterior, superior
    score: float  # mean decoder-predicted IoU over its slices; the best locator presence when not found
    presence: np.ndarray  # (Z,) the locator's best presence among the parts, per axial slice
    nifti: Path | None = None

    @property
    def found(self) -> bool:
        return self.slices is not None

    def display_mask(self, study: Study, index: int, plane: str = "axial") -> np.ndarray:
        """(H, W) bool mask on ``study.display(index, plane)`` (any plane), for drawing while scrolling."""
        view = Study(pixels=self.mask.view(np.uint8), affine=study.affine, spacing=study.spacing, is_volume=True)
        return view.slice(index, plane) > 0


@dataclass
class VolumeResult:
    structures: dict[str, StructureResult]
    seconds: float
    slices_total: int
    encoded: int  # image encodings made during this pass (0 when every slice was cached)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """``{"structures": {name: {"nifti", "volume_ml", "slices", "extent_mm", "score"}}, "seconds", "slices_total"}``."""
        return {
            "structures": {
                name: {
                    "nifti": str(item.nifti) if item.found and item.nifti is not None else None,
                    "volume_ml": round(item.volume_ml, 2) if item.found else 0,
                    "slices": item.slices,
                    "extent_mm": [round(v, 1) for v in item.extent_mm],
                    "score": round(item.score, 4),
                }
                for name, item in self.structures.items()
            },
            "seconds": round(self.seconds, 2),
            "slices_total": self.slices_total,
        }


def stack_to_volume(stack: np.ndarray) -> np.ndarray:
    """(Z, H, W) axial display masks -> (X, Y, Z) on the study's RAS grid (inverse of ``Study.slice``)."""
    return np.flip(np.asarray(stack, dtype=bool).transpose(2, 1, 0), axis=(0, 1))


def engine_of(predictor) -> SegmentationPredictor:
    """The segmentation engine of a ``MimoPredictor`` (or the engine itself)."""
    return predictor if isinstance(predictor, SegmentationPredictor) else predictor.segmenter


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise VolumeCancelled("The whole-volume pass was cancelled.")


def scan(encodings: SliceEncodings, parts: Sequence[str], finder: Finder, progress: Progress,
         cancel: threading.Event | None) -> np.ndarray:
    """(Z, P) locator presence of each part on each axial slice, encoding each slice once."""
    count = len(encodings)
    presence = np.zeros((count, len(parts)), dtype=np.float32)
    for index in range(count):
        _check_cancel(cancel)
        found = finder(index, encodings.context(index), list(parts), False)
        presence[index] = [item.presence for item in found]
        progress(index + 1, count, "Looking through the slices")
    return presence


def seed_slice(presence: np.ndarray) -> int | None:
    """The most confident slice (ties: the middle one of the tied slices); None below ``PRESENT``."""
    best = float(presence.max()) if presence.size else 0.0
    if best < PRESENT:
        return None
    tied = np.flatnonzero(presence >= best - 1e-6)
    return int(tied[len(tied) // 2])


def follow_part(part: str, presence: np.ndarray, encodings: SliceEncodings, engine: SegmentationPredictor,
                finder: Finder, settings: PropagationSettings, walk: bool,
                cancel: threading.Event | None) -> dict[int, tuple[np.ndarray, float]]:
    """{slice: ((H, W) mask, score)} of one part: seed + walk, or the locator's mask on every present slice."""
    if not walk:
        found = {}
        for index in np.flatnonzero(presence >= PRESENT):
            _check_cancel(cancel)
            item = finder(int(index), encodings.context(int(index)), [part], True)[0]
            if item.mask is not None and item.mask.any():
                found[int(index)] = (item.mask, float(item.score or 0.0))
        return found
    seed = seed_slice(presence)
    if seed is None:
        return {}
    item = finder(seed, encodings.context(seed), [part], True)[0]
    if item.mask is None or not item.mask.any():
        return {}

    def located(index: int) -> tuple[np.ndarray, float] | None:
        """The locator's own mask where it finds the part and its outline is reliable (the chat's gate)."""
        if presence[index] < PRESENT:
            return None
        own = finder(index, encodings.context(index), [part], True)[0]
        if own.mask is None or not own.mask.any() or not outline_shown(own.score or 0.0, own.fit):
            return None
        return own.mask, float(own.score)

    found = propagate(engine, encodings.context, seed, item.mask, presence, settings, cancel, located=located)
    found[seed] = (item.mask, float(item.score or 0.0))
    return found


def segment_volume(
    study: Study,
    structures: Sequence[str],
    predictor,
    *,
    encodings: SliceEncodings | None = None,
    finder: Finder | None = None,
    walk: bool = True,
    settings: PropagationSettings | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> VolumeResult:
    """3D masks, volumes and extents of ``structures`` on a volume study (see the module docstring).

    predictor: a ``MimoPredictor`` (its locator finds the structures), or a ``SegmentationPredictor``
    with ``finder`` (e.g. ``seeds.LabelFinder``). ``encodings``: the session's cache for this study
    (made here when None). ``progress(done, total, message)`` is called after each slice;
    setting ``cancel`` stops the pass with ``VolumeCancelled`` (cached encodings are kept).
    """
    start = time.perf_counter()
    if not study.is_volume:
        raise ValueError("A whole-volume answer needs a volume (NIfTI, NRRD or a DICOM series), not a 2D image.")
    names = list(dict.fromkeys(canonical_name(name) for name in structures if str(name).strip()))
    if not names:
        raise ValueError("Name at least one structure, e.g. liver or spleen.")
    encodings = encodings or SliceEncodings(study, predictor.encode)
    if encodings.study is not study:
        raise ValueError("These slice encodings belong to another study.")
    # The walk keeps the better-rated of the engine's walked mask and the located one: only masks of
    # one decoder have comparable predicted IoU, so the volume pass locates with the engine's decoder.
    finder = finder or (lambda index, context, parts, masks: predictor.locate(context, parts, masks=masks, grounding=False))
    progress = progress or (lambda done, total, message: None)
    settings = settings or PropagationSettings()
    before = encodings.encoded
    parts = [part for name in names for part in structure_parts(name)]
    presence = scan(encodings, parts, finder, progress, cancel)
    engine = engine_of(predictor)
    results = {}
    for name in names:
        stack = np.zeros((len(encodings), *study.display_shape("axial")), dtype=bool)
        scores, part_presence = [], []
        for part in structure_parts(name):
            column = presence[:, parts.index(part)]
            part_presence.append(column)
            progress(len(encodings), len(encodings), f"Following the {part}")
            found = follow_part(part, column, encodings, engine, finder, settings, walk, cancel)
            part_stack = np.zeros_like(stack)
            for index, (mask, score) in found.items():
                part_stack[index] = mask
                scores.append(score)
            stack |= part_stack if not walk else clean_stack(part_stack)
        results[name] = _structure_result(name, study, stack, scores, np.max(part_presence, axis=0))
    notes = [f"{encodings.encoded - before} of {len(encodings)} slices were encoded in this pass."]
    return VolumeResult(results, time.perf_counter() - start, len(encodings), encodings.encoded - before, notes)


def clean_stack(stack: np.ndarray) -> np.ndarray:
    """Clean one part's (Z, H, W) stack in 3D (``keep_main_component``), staying in display order."""
    return keep_main_component(stack.transpose(1, 2, 0)).transpose(2, 0, 1)


def _structure_result(name: str, study: Study, stack: np.ndarray, scores: list[float],
                      presence: np.ndarray) -> StructureResult:
    mask = stack_to_volume(stack)
    slices = axial_range(mask)
    return StructureResult(
        name=name, parts=structure_parts(name), mask=mask,
        volume_ml=volume_ml(mask, study.affine) if slices else 0.0, slices=slices,
        extent_mm=extent_mm(mask, study.spacing),
        score=float(np.mean(scores)) if slices and scores else float(presence.max(initial=0.0)),
        presence=presence,
    )


def nifti_name(structure: str) -> str:
    """File name of a structure's mask: ``left kidney`` -> ``left_kidney.nii.gz``."""
    return "_".join(canonical_name(structure).split()) + ".nii.gz"


def save_niftis(result: VolumeResult, study: Study, out: str | Path, grid: SourceGrid | None = None) -> VolumeResult:
    """Write ``out/<structure>.nii.gz`` for every found structure (on ``grid`` when given) and record the paths."""
    out = Path(out)
    for name, item in result.structures.items():
        if item.found:
            item.nifti = write_mask_nifti(study, item.mask, out / nifti_name(name), grid)
    return result
