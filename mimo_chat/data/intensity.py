"""Bring the stored 8-bit images of each labelled set to the look the app shows for that modality.

The sets were stored with different intensity mappings (an abdomen window, HU clipped to 0..255,
a per-slice rescale, a wide window, raw 8-bit MR or radiographs). A model trained on them as
stored could tell the sets apart by brightness alone and learn "this look means liver". Each
image is therefore mapped to what the app displays when a study of that modality is opened
(:func:`mimo_chat.imaging.windows.default_window`): CT in the abdomen window, MR and radiographs
in the automatic 1..99-percentile window. What cannot be recovered (HU below 0 in clipped data,
the exact mapping of a per-slice rescale) is estimated as described per function.

All functions take a (H, W) uint8 image and return a (H, W) uint8 display image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mimo_chat.imaging import apply_window

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0  # typical of muscle, liver and spleen at portal-venous contrast


def _check(stored: np.ndarray) -> np.ndarray:
    image = np.asarray(stored)
    if image.ndim != 2:
        raise ValueError(f"Expected a (H, W) grey image, got shape {image.shape}.")
    return image


def abdomen_as_is(stored: np.ndarray) -> np.ndarray:
    """An image already stored in the abdomen window (W400/L50) is kept."""
    return _check(stored).astype(np.uint8, copy=True)


def auto_window(stored: np.ndarray) -> np.ndarray:
    """MR and radiographs: the app's automatic window (1st..99th percentile of this image)."""
    return apply_window(_check(stored).astype(np.float32), "auto")


def clipped_hu(stored: np.ndarray) -> np.ndarray:
    """HU clipped to 0..255 -> abdomen window, estimating the lost HU < 0 pixels.

    Stored values <= 3 (0 plus JPEG ringing) are fat (-100 HU) inside the body's silhouette
    (:func:`body_silhouette`) and air (-1000 HU) outside it; fat texture is therefore flat in
    these images, and gas inside the body (bowel, lung bases) is shown as fat too.
    """
    hu = _check(stored).astype(np.float32)
    lost = hu <= 3
    hu[lost] = FAT_HU
    hu[lost & ~body_silhouette(~lost)] = AIR_HU
    return apply_window(hu, "abdomen")


BODY_GAP = 24  # px: gaps in the skin and the abdominal wall narrower than twice this are bridged


def body_silhouette(tissue: np.ndarray, gap: int = BODY_GAP) -> np.ndarray:
    """(H, W) bool: the patient's cross-section on an axial slice whose ``tissue`` (H, W) bool is known.

    Where fat was lost with the air (HU clipped at 0), the skin is a broken one-pixel line and the
    abdominal wall has gaps, so the fat inside is connected to the air outside and a flood fill
    from the border would call all of it air. The silhouette is instead the largest region that
    the tissue encloses once gaps up to ``2 * gap`` px are bridged (a closing with a disk);
    tissue touching the image border (the table, the field-of-view edge) is left out first.
    """
    labels, _ = ndimage.label(tissue, structure=np.ones((3, 3), bool))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    body = tissue & ~np.isin(labels, edge[edge > 0])
    if not body.any():
        return np.zeros_like(tissue, dtype=bool)
    padded = np.pad(body, gap + 1)  # the closing by a disk, as two distance thresholds
    grown = ndimage.distance_transform_edt(~padded) <= gap
    closed = (ndimage.distance_transform_edt(grown) > gap)[gap + 1:-gap - 1, gap + 1:-gap - 1]
    filled = ndimage.binary_fill_holes(closed)
    labels, count = ndimage.label(filled)
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1) if count else filled


def tissue_anchors(stored: np.ndarray) -> tuple[float, float]:
    """(air grey, soft-tissue grey) of a CT slice stored with an unknown linear mapping.

    Air is the grey level at the 2nd percentile (outside the body). The body is every pixel
    above 15 % of the way from air to the 99.5th percentile; its 80th percentile is taken as
    soft tissue (40 HU). Checked on the liver masks of the rescaled sets: the liver then lands
    at 30..95 HU, as in portal-venous CT.
    """
    values = _check(stored).astype(np.float32)
    air = float(np.percentile(values, 2))
    high = float(np.percentile(values, 99.5))
    body = values[values > air + 0.15 * (high - air)]
    tissue = float(np.percentile(body, 80)) if body.size else high
    return air, max(tissue, air + 1.0)


def rescaled_ct(stored: np.ndarray) -> np.ndarray:
    """CT stored with a per-slice rescale or a wide window -> abdomen window.

    The linear map back to HU is fitted per image on two anchors (:func:`tissue_anchors`):
    air at -1000 HU and soft tissue at 40 HU.
    """
    air, tissue = tissue_anchors(stored)
    scale = (SOFT_TISSUE_HU - AIR_HU) / (tissue - air)
    hu = AIR_HU + (_check(stored).astype(np.float32) - air) * scale
    return apply_window(hu, "abdomen")
