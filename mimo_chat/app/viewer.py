"""Viewer geometry of the app: zoom and pan, display pixel <-> voxel, orientation labels.

Display pixels are those of ``Study.display(index, plane, square_pixels=True)`` for a volume
(``Study.display()`` for a 2D image): x right, y down, origin at the top-left pixel corner.
Screen pixels are those of the picture sent to the browser: the visible part of the display
image (the crop) enlarged by an integer factor. Volumes are ``(X, Y, Z)`` in RAS order with
the radiological display convention described in :mod:`mimo_chat.imaging.study`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mimo_chat.imaging import Study

ZOOMS = (1, 2, 4, 8)
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the voxel axis a plane's slice index runs along
# (left, right, top, bottom) edge labels of each plane's display slices (radiological convention)
ORIENTATION = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


@dataclass(frozen=True)
class Viewport:
    """The visible part of a ``height`` x ``width`` display image and its screen scale.

    x0, y0: top-left display pixel of the crop; crop_w, crop_h: its size in display pixels;
    scale: screen pixels per display pixel (an integer, so small slices stay crisp).
    """

    x0: int
    y0: int
    crop_w: int
    crop_h: int
    scale: int

    @classmethod
    def make(cls, height: int, width: int, zoom: int, center: tuple[float, float] | None, base_scale: int) -> Viewport:
        """The crop of ``1/zoom`` of the image around ``center`` (x, y; None = the middle), kept inside the image."""
        crop_w, crop_h = max(1, math.ceil(width / zoom)), max(1, math.ceil(height / zoom))
        cx, cy = center if center is not None else (width / 2, height / 2)
        x0 = int(np.clip(round(cx - crop_w / 2), 0, width - crop_w))
        y0 = int(np.clip(round(cy - crop_h / 2), 0, height - crop_h))
        return cls(x0, y0, crop_w, crop_h, base_scale * zoom)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Screen pixel -> display pixel."""
        return self.x0 + x / self.scale, self.y0 + y / self.scale

    def to_screen(self, x: float, y: float) -> tuple[float, float]:
        """Display pixel -> screen pixel."""
        return (x - self.x0) * self.scale, (y - self.y0) * self.scale

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The visible part of an (H, W, ...) array."""
        return array[self.y0 : self.y0 + self.crop_h, self.x0 : self.x0 + self.crop_w]

    def shift_box(self, box: list[float]) -> list[float]:
        """A display-pixel box [x0, y0, x1, y1] in crop pixels (unscaled)."""
        return [box[0] - self.x0, box[1] - self.y0, box[2] - self.x0, box[3] - self.y0]


def display_to_voxel(study: Study, plane: str, index: int, x: float, y: float) -> tuple[int, ...]:
    """The voxel (i, j, k) under display pixel (x, y) of slice ``index`` of ``plane``; (row, col) for 2D.

    Undoes the radiological flips of ``Study.slice`` and the row stretch of square-pixel display.
    """
    if not study.is_volume:
        height, width = study.pixels.shape[:2]
        return int(np.clip(y, 0, height - 1)), int(np.clip(x, 0, width - 1))
    rows, cols = study.display_shape(plane)
    shown_rows, _ = study.display_shape(plane, square_pixels=True)
    row = int(np.clip(math.floor(y * rows / shown_rows), 0, rows - 1))
    col = int(np.clip(math.floor(x), 0, cols - 1))
    size_x, size_y, size_z = study.pixels.shape
    if plane == "axial":
        return size_x - 1 - col, size_y - 1 - row, index
    if plane == "coronal":
        return size_x - 1 - col, index, size_z - 1 - row
    return index, size_y - 1 - col, size_z - 1 - row


def value_at(study: Study, plane: str, index: int, x: float, y: float) -> float | None:
    """The stored value (HU for CT) under display pixel (x, y); None outside the image or for RGB."""
    if study.is_rgb:
        return None
    height, width = study.display_shape(plane, square_pixels=study.is_volume)
    if not (0 <= x < width and 0 <= y < height):
        return None
    return float(study.pixels[display_to_voxel(study, plane, index, x, y)])


def value_text(study: Study, value: float | None) -> str:
    """``"-45 HU"`` for CT, ``"312"`` (signal) otherwise, ``""`` when there is no value."""
    if value is None:
        return ""
    return f"{value:.0f} HU" if study.modality == "CT" else f"{value:.4g}"


def draw_orientation(image: np.ndarray, plane: str) -> np.ndarray:
    """Write the plane's R/L/A/P/S/I letters at the middle of each edge of a screen image (H, W, 3)."""
    left, right, top, bottom = ORIENTATION[plane]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    size = max(10, min(height, width) // 28)
    margin = max(3, size // 3)
    spots = {
        left: (margin, height / 2 - size / 2),
        right: (width - margin - size * 0.6, height / 2 - size / 2),
        top: (width / 2 - size * 0.3, margin),
        bottom: (width / 2 - size * 0.3, height - margin - size),
    }
    for letter, (x, y) in spots.items():
        draw.text((x, y), letter, fill=(255, 255, 0), font_size=size, stroke_width=max(1, size // 10),
                  stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
