"""Follow one structure from its most confident slice to its neighbours, slice by slice.

As in MedSAM-style 3D inference, the mask found on one axial slice becomes the box prompt of the
next slice (its tight box, widened a little because organs grow and shrink between slices), and
the engine segments that box on the next slice's own image embedding. The walk stops where the
structure ends: the mask vanishes, it no longer overlaps the previous slice's mask (the box drifted
onto another organ), or the locator is sure the structure is not on that slice.

A box taken from one slice's mask cannot grow faster than its margin, so an organ that widens
quickly (the liver towards its dome) would be followed too small. Where the locator also finds the
structure on a slice (``located``), its own mask is taken instead when the decoder rates it higher
and it passes the same checks, so the walk re-anchors on what the image shows.

All masks here are display slices (H, W) of the axial plane; a (Z, H, W) stack holds a 3D mask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mimo_chat.boxes import mask_to_box
from mimo_chat.segmentation import ImageContext, SegmentationPredictor


class VolumeCancelled(RuntimeError):
    """The caller set the cancel event; encodings made so far stay in the cache."""


@dataclass(frozen=True)
class PropagationSettings:
    """When to keep following a structure to the next slice (pixels are display pixels)."""

    margin: float = 0.05  # box widened by this share of its size on each side ...
    margin_px: float = 3.0  # ... plus this many pixels
    min_area_px: int = 20  # a smaller mask means the structure has ended
    min_overlap: float = 0.5  # share of the new mask that must lie inside the previous mask's box
    stop_presence: float = 0.1  # the locator's presence below which a slice is known not to hold it
    max_growth: float = 2.0  # a mask more than this times the previous area leaked onto a neighbour


def image_context(context: Any) -> ImageContext:
    """The engine's context inside a ``MimoContext`` (or the ``ImageContext`` itself)."""
    return context if isinstance(context, ImageContext) else context.image


def widened_box(mask: np.ndarray, settings: PropagationSettings) -> list[float]:
    """Tight box of an (H, W) mask, widened by ``settings.margin`` and ``margin_px``, clipped to the image."""
    x0, y0, x1, y1 = mask_to_box(mask)
    pad_x = settings.margin * (x1 - x0) + settings.margin_px
    pad_y = settings.margin * (y1 - y0) + settings.margin_px
    height, width = mask.shape
    return [max(0.0, x0 - pad_x), max(0.0, y0 - pad_y), min(float(width), x1 + pad_x), min(float(height), y1 + pad_y)]


def _inside_box_share(mask: np.ndarray, box: list[float]) -> float:
    x0, y0, x1, y1 = (round(v) for v in box)
    area = int(np.count_nonzero(mask))
    return int(np.count_nonzero(mask[y0:y1, x0:x1])) / area if area else 0.0


def propagate(
    engine: SegmentationPredictor,
    context_of: Callable[[int], Any],
    seed_index: int,
    seed_mask: np.ndarray,
    presence: np.ndarray,
    settings: PropagationSettings = PropagationSettings(),
    cancel: threading.Event | None = None,
    on_slice: Callable[[], None] | None = None,
    located: Callable[[int], tuple[np.ndarray, float] | None] | None = None,
) -> dict[int, tuple[np.ndarray, float]]:
    """Masks of one structure on the slices around ``seed_index``: {slice: ((H, W) bool, decoder IoU)}.

    ``context_of(index)`` returns the encoded context of an axial slice; ``presence`` (Z,) is the
    locator's presence per slice in [0, 1]; ``seed_mask`` (H, W) is the structure on ``seed_index``;
    ``located(index)``: the locator's own (mask, decoder IoU) on that slice, or None where it does not find it.
    """
    found: dict[int, tuple[np.ndarray, float]] = {seed_index: (np.asarray(seed_mask, dtype=bool), 1.0)}
    count = len(presence)
    for step in (1, -1):
        previous = found[seed_index][0]
        index = seed_index + step
        while 0 <= index < count and presence[index] >= settings.stop_presence:
            if cancel is not None and cancel.is_set():
                raise VolumeCancelled("The whole-volume pass was cancelled.")
            box = widened_box(previous, settings)
            result = engine.segment(image_context(context_of(index)), boxes=[box])
            if on_slice is not None:
                on_slice()
            candidates = [(result.masks[0], float(result.scores[0]))]
            own = located(index) if located is not None else None
            if own is not None:
                candidates.append(own)
            accepted = [c for c in candidates if _follows(c[0], previous, settings)]
            if not accepted:
                break
            found[index] = max(accepted, key=lambda candidate: candidate[1])
            previous = found[index][0]
            index += step
    return found


def _follows(mask: np.ndarray, previous: np.ndarray, settings: PropagationSettings) -> bool:
    """Whether ``mask`` continues ``previous`` on the next slice: big enough, not leaked, overlapping its box."""
    area = int(np.count_nonzero(mask))
    if area < settings.min_area_px or area > settings.max_growth * max(np.count_nonzero(previous), 1):
        return False
    tight = widened_box(previous, PropagationSettings(margin=0.0, margin_px=0.0))
    return _inside_box_share(mask, tight) >= settings.min_overlap
