"""Study: one opened image or volume, in physical units, and its display slices.

Coordinate frames
- 2D study: ``pixels`` is ``(H, W)`` or ``(H, W, 3)``, row 0 at the top, as it is displayed.
- Volume: ``pixels`` is ``(X, Y, Z)`` in RAS canonical voxel order: index ``i`` grows toward the
  patient's Right, ``j`` toward Anterior, ``k`` toward Superior; ``affine`` maps voxel
  indices to RAS millimetres.
- Display slices follow the radiological convention:
  axial    (fixed k): patient's right on the image's left, anterior at the top;
  coronal  (fixed j): patient's right on the image's left, superior at the top;
  sagittal (fixed i): anterior on the image's left, superior at the top.
  Slice index 0 is the most inferior (axial), posterior (coronal) or left (sagittal) one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .privacy import filter_descriptors
from .windows import Window, apply_window, auto_window, resolve_window

PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_FLIP = slice(None, None, -1)


def _plane_name(plane: str) -> str:
    name = str(plane).strip().lower()
    if name not in _PLANE_AXIS:
        raise ValueError(f"Unknown plane {plane!r}; use one of {', '.join(PLANES)}.")
    return name


def _slicer(plane: str, index: int) -> tuple:
    """Index tuple into an (X, Y, Z) RAS volume; the selected 2D view, transposed, is the display slice."""
    if plane == "axial":
        return (_FLIP, _FLIP, index)  # (X, Y) -> .T -> rows: anterior first, columns: right first
    if plane == "coronal":
        return (_FLIP, index, _FLIP)  # (X, Z) -> .T -> rows: superior first, columns: right first
    return (index, _FLIP, _FLIP)  # sagittal (Y, Z) -> .T -> rows: superior first, columns: anterior first


@dataclass(eq=False, repr=False)
class Study:
    """An opened image: pixels in physical units plus geometry and a few safe descriptors.

    pixels: float32. 2D: (H, W) or (H, W, 3); volume: (X, Y, Z) in RAS canonical order.
    spacing: mm per pixel, (row, column) for 2D and (X, Y, Z) for volumes (1.0 when unknown).
    affine: 4x4 voxel -> RAS mm for volumes, None for 2D images.
    default_window: the window ``display`` uses when none is given.
    """

    pixels: np.ndarray
    modality: str = "OT"
    spacing: tuple[float, ...] = (1.0, 1.0)
    affine: np.ndarray | None = None
    descriptors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    is_volume: bool = False
    default_window: Window = "auto"
    _auto: tuple[float, float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.descriptors = filter_descriptors(self.descriptors)
        expected = 3 if self.is_volume else (2, 3)
        if self.is_volume and self.pixels.ndim != expected:
            raise ValueError(f"A volume needs (X, Y, Z) pixels, got shape {self.pixels.shape}.")
        if not self.is_volume and (
            self.pixels.ndim not in expected or (self.pixels.ndim == 3 and self.pixels.shape[2] != 3)
        ):
            raise ValueError(f"A 2D study needs (H, W) or (H, W, 3) pixels, got shape {self.pixels.shape}.")

    @property
    def kind_hint(self) -> str | None:
        """What the file says the image is, for the evidence policy ("CT", "XR CHEST", "MR ABDOMEN"):
        the modality and the body part / descriptions that survived the privacy filter; None when
        the file records neither."""
        words = [self.modality if self.modality != "OT" else ""]
        words += [self.descriptors.get(key, "") for key in ("body_part", "study_description", "series_description")]
        hint = " ".join(word for word in words if word).strip()
        return hint or None

    def __repr__(self) -> str:
        kind = "volume" if self.is_volume else "image"
        spacing = tuple(round(float(step), 4) for step in self.spacing)
        return f"Study({kind}, modality={self.modality!r}, shape={tuple(self.pixels.shape)}, spacing={spacing})"

    @property
    def is_rgb(self) -> bool:
        return not self.is_volume and self.pixels.ndim == 3

    def num_slices(self, plane: str = "axial") -> int:
        """Number of slices along ``plane`` (1 for a 2D image)."""
        if not self.is_volume:
            return 1
        return int(self.pixels.shape[_PLANE_AXIS[_plane_name(plane)]])

    def middle_index(self, plane: str = "axial") -> int:
        return self.num_slices(plane) // 2

    def slice(self, index: int | None = None, plane: str = "axial") -> np.ndarray:
        """The display slice, float32 ``(H, W)`` (or ``(H, W, 3)`` for an RGB image), radiological orientation.

        ``index`` None means the middle slice. A 2D image has one slice (index 0 or None).
        """
        plane = _plane_name(plane)
        index = self._check_index(index, plane)
        if not self.is_volume:
            return self.pixels
        return self.pixels[_slicer(plane, index)].T

    def slice_spacing(self, plane: str = "axial") -> tuple[float, float]:
        """(row, column) spacing in mm of the display slices of ``plane``."""
        if not self.is_volume:
            return float(self.spacing[0]), float(self.spacing[1])
        x, y, z = (float(step) for step in self.spacing)
        return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[_plane_name(plane)]

    def window_values(self, window: Window | None = None) -> tuple[float, float]:
        """``(width, level)`` for ``window``; None -> the study's default; "auto" -> percentiles of the whole study."""
        window = self.default_window if window is None else window
        if isinstance(window, str) and window.strip().lower() == "auto":
            if self._auto is None:
                self._auto = auto_window(self.pixels)
            return self._auto
        return resolve_window(window)

    def display_shape(self, plane: str = "axial", square_pixels: bool = False) -> tuple[int, int]:
        """(H, W) of ``display(..., square_pixels=...)`` for ``plane``."""
        height, width = self.slice(None, plane).shape[:2]
        if not square_pixels:
            return height, width
        row_mm, column_mm = self.slice_spacing(plane)
        return max(1, round(height * row_mm / column_mm)), width

    def display(
        self,
        index: int | None = None,
        plane: str = "axial",
        window: Window | None = None,
        square_pixels: bool = False,
    ) -> np.ndarray:
        """The windowed display slice as (H, W, 3) uint8; ``index`` None is the middle slice.

        ``square_pixels``: stretch the rows so one pixel covers as many mm down as across
        (coronal/sagittal views of thick-slice volumes); ``mask_to_volume`` accepts masks of
        either shape.
        """
        values = self.slice(index, plane)
        gray = apply_window(values, self.window_values(window))
        shape = self.display_shape(plane, square_pixels)
        if shape != gray.shape[:2]:
            from PIL import Image

            gray = np.asarray(Image.fromarray(gray).resize(shape[::-1], Image.Resampling.BILINEAR))
        if gray.ndim == 2:
            gray = np.repeat(gray[:, :, None], 3, axis=2)
        return np.ascontiguousarray(gray)

    def _check_index(self, index: int | None, plane: str) -> int:
        count = self.num_slices(plane)
        if index is None:
            return count // 2
        index = int(index)
        if not 0 <= index < count:
            raise ValueError(f"Slice {index} is outside this study's {count} {plane} slices (0..{count - 1}).")
        return index


def mask_to_volume(study: Study, mask2d: np.ndarray, index: int | None = None, plane: str = "axial") -> np.ndarray:
    """Place a mask drawn on a display slice back into the study's voxel grid.

    mask2d: (H, W), the shape of ``study.slice(index, plane)`` or of the square-pixel display;
    non-zero = inside. Returns uint8 (X, Y, Z) for a volume (zeros outside the slice) or (H, W)
    for a 2D image.
    """
    plane = _plane_name(plane)
    binary = (np.asarray(mask2d) != 0).astype(np.uint8)
    expected = study.display_shape(plane)
    if binary.shape != expected:
        if binary.shape != study.display_shape(plane, square_pixels=True):
            raise ValueError(f"The mask is {binary.shape} but the {plane} slice is {expected}.")
        from PIL import Image

        binary = np.asarray(Image.fromarray(binary).resize(expected[::-1], Image.Resampling.NEAREST))
    if not study.is_volume:
        return binary
    volume = np.zeros(study.pixels.shape, dtype=np.uint8)
    volume[_slicer(plane, study._check_index(index, plane))] = binary.T
    return volume


def save_mask_nifti(study: Study, mask2d: np.ndarray, index: int | None, plane: str, path: str | Path) -> Path:
    """Write a display-slice mask as NIfTI aligned with the study (volume: the study's affine).

    Only geometry is written: no descriptors, names or dates go into the header.
    """
    import nibabel as nib

    volume = mask_to_volume(study, mask2d, index, plane)
    if study.is_volume and study.affine is not None:
        affine = np.asarray(study.affine, dtype=np.float64)
    else:
        affine = np.diag([*(float(step) for step in study.spacing[:2]), 1.0, 1.0])
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    nib.save(image, path)
    return path
