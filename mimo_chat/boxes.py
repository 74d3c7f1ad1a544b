"""Mask -> box, the one convention every layer uses.

A box is ``[x0, y0, x1, y1]`` in pixels of the mask: x right, y down, origin at the top-left
corner of the top-left pixel, so pixel (row r, col c) covers [c, c+1) x [r, r+1) and x1/y1
are exclusive (a one-pixel mask at (r, c) has the box ``[c, r, c + 1, r + 1]``). An empty
mask has the box ``[0, 0, 0, 0]``, which the benchmarks read as "absent".

Only numpy is imported here, so the model, data, training, evaluation and app layers can all
import it.
"""

from __future__ import annotations

import numpy as np


def mask_to_box(mask: np.ndarray) -> list[float]:
    """(H, W) mask (non-zero = inside) -> tight ``[x0, y0, x1, y1]``, x1/y1 exclusive; zeros when empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) float32 boxes, each one as :func:`mask_to_box` gives it.

    Unlike ``torchvision.ops.masks_to_boxes`` (x1/y1 inclusive), x1/y1 are exclusive here.
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)  # (N, 4)
    for index, mask in enumerate(masks):
        boxes[index] = mask_to_box(mask)
    return boxes
