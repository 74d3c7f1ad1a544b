"""Findings read from a reference label map instead of the locator (evaluation and tests).

``LabelFinder`` answers the same question as ``MimoPredictor.locate`` — is each name on this slice,
and where — from a label volume on the study's grid. It isolates what the whole-volume pass adds
(propagation, 3D clean-up, NIfTI, volumes) from what the locator gets right:

- ``extent=True``: presence is known on every slice (1 where labelled, 0 elsewhere), so only the
  masks come from the engine;
- ``extent=False``: only the seed is known (the largest labelled slice); every other slice reads
  as "unknown" (presence 0.5), so the walk must find the structure's ends by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mimo_chat.boxes import mask_to_box
from mimo_chat.imaging import Study
from mimo_chat.predictor import Located

UNKNOWN = 0.5


class LabelFinder:
    """``finder(index, context, names, masks)`` -> list[Located] from a label volume.

    labels: a volume study of integer labels on the image study's grid; ``ids`` maps each
    structure name to its label values.
    """

    def __init__(self, labels: Study, ids: Mapping[str, Sequence[int]], extent: bool = True) -> None:
        self.labels = labels
        self.ids = {name: tuple(int(v) for v in values) for name, values in ids.items()}
        self.extent = extent
        values = np.rint(labels.pixels).astype(np.int32)
        self._areas = {  # (Z,) labelled voxels of each name per axial slice
            name: np.count_nonzero(np.isin(values, ids), axis=(0, 1)) for name, ids in self.ids.items()
        }

    def mask(self, index: int, name: str) -> np.ndarray:
        """(H, W) bool display-slice mask of ``name`` on axial slice ``index``."""
        return np.isin(np.rint(self.labels.slice(index, "axial")).astype(np.int32), self.ids[name])

    def presence(self, index: int, name: str) -> float:
        areas = self._areas[name]
        if self.extent:
            return 1.0 if areas[index] > 0 else 0.0
        return 1.0 if areas.max() > 0 and index == int(np.argmax(areas)) else UNKNOWN

    def __call__(self, index: int, context, names: Sequence[str], masks: bool = True) -> list[Located]:
        found = []
        for name in names:
            if name not in self.ids:
                raise KeyError(f"No label values given for {name!r}")
            presence = self.presence(index, name)
            mask = self.mask(index, name) if masks and presence > UNKNOWN else None
            box = mask_to_box(mask) if mask is not None and mask.any() else None
            found.append(Located(name, presence, mask, box, 1.0 if mask is not None else None))
        return found
