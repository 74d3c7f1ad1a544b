"""NIfTI (nibabel) and NRRD (pynrrd) volumes, reoriented to RAS canonical voxel order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageLoadError, check_size
from .privacy import safe_descriptors
from .study import Study
from .windows import default_window

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip a volume (voxel -> RAS ``affine``) to the closest RAS canonical order.

    Uses ``nibabel.as_closest_canonical``; the result is a view of ``array`` when possible.
    Returns ``(array (X, Y, Z), affine)``.
    """
    import nibabel as nib

    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageLoadError("This volume has invalid geometry (its voxel axes are degenerate).")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asanyarray(canonical.dataobj), canonical.affine


def guess_modality(pixels: np.ndarray) -> str:
    """Return "CT" when values look like Hounsfield units (a share of air near -1000), else "OT" (unknown)."""
    step = max(1, round((pixels.size / 300_000) ** (1 / pixels.ndim)))
    sample = pixels[(slice(None, None, step),) * pixels.ndim]  # strided view: no copy of the volume
    air = np.count_nonzero((sample >= -1100) & (sample <= -900)) / sample.size
    return "CT" if air >= 0.02 and np.percentile(sample, 99.5) < 4000 else "OT"


def check_finite(pixels: np.ndarray) -> None:
    if not np.isfinite(pixels).all():
        raise ImageLoadError("This image contains invalid values (NaN or infinity) and cannot be shown reliably.")


def make_volume_study(
    pixels: np.ndarray,
    affine: np.ndarray,
    notes: list[str],
    modality: str | None = None,
    finite: bool = False,
    **descriptors: object,
) -> Study:
    """Canonicalise a float32 volume with its voxel -> RAS affine and wrap it in a Study.

    ``finite``: the values are known finite (integer samples with finite scaling), skip the check.
    """
    if not finite:
        check_finite(pixels)
    pixels, affine = to_canonical(pixels, affine)
    spacing = tuple(float(step) for step in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    if modality is None:
        modality = guess_modality(pixels)
        if modality == "CT":
            notes.append("The file does not record the modality; the values look like CT Hounsfield units.")
    return Study(
        pixels=pixels,
        modality=modality,
        spacing=spacing,
        affine=affine,
        descriptors=safe_descriptors(modality, pixels.shape, spacing, **descriptors),
        notes=notes,
        is_volume=True,
        default_window=default_window(modality),
    )


def load_nifti(path: Path) -> Study:
    """NIfTI-1/2 ``.nii`` / ``.nii.gz``: 3D, or the first volume of 4D+ (with a note)."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This NIfTI file could not be read: its header is damaged or incomplete.") from None
    shape = tuple(int(side) for side in image.shape)
    check_size(shape[:3], "volume", plane=shape[:2] if len(shape) >= 2 else None)
    if image.header.get_data_dtype().fields is not None or image.header.get_data_dtype().kind == "c":
        raise ImageLoadError("This NIfTI file stores colour or complex voxels, which are not supported.")
    notes: list[str] = []
    try:
        finite = False
        if len(shape) <= 3 and hasattr(image.dataobj, "get_unscaled"):
            raw = image.dataobj.get_unscaled()
            pixels = raw.astype(np.float32)
            slope, intercept = image.dataobj.slope, image.dataobj.inter
            finite = raw.dtype.kind in "iub" and bool(np.isfinite(slope) and np.isfinite(intercept))
            if slope != 1:
                pixels *= np.float32(slope)
            if intercept != 0:
                pixels += np.float32(intercept)
        else:
            extra = shape[3:]
            if extra and int(np.prod(extra)) > 1:
                notes.append(
                    f"This is a {len(shape)}D file with {int(np.prod(extra))} volumes; showing the first volume."
                )
            pixels = np.asarray(image.dataobj[(slice(None),) * 3 + (0,) * len(extra)], dtype=np.float32)
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This NIfTI file is truncated or corrupt: its image data could not be read.") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.size == 0:
        raise ImageLoadError("This NIfTI file is empty: it contains no voxels.")
    affine = image.affine if image.affine is not None else np.diag([*image.header.get_zooms()[:3], 1.0])
    # The header's free-text fields (descrip, db_name, aux_file) may identify the patient: never read.
    return make_volume_study(pixels, np.asarray(affine, dtype=np.float64), notes, finite=finite)


_SPACE_SIGNS = {  # sign flips from the NRRD space to RAS
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "scanner-xyz": (1, 1, 1),
    "3d-right-handed": (1, 1, 1),
}


def _nrrd_affine(header: dict, spatial_axes: list[int], notes: list[str]) -> np.ndarray:
    directions = header.get("space directions")
    origin = header.get("space origin")
    space = str(header.get("space", "")).lower()
    affine = np.eye(4)
    if directions is not None and space in _SPACE_SIGNS:
        matrix = np.asarray(
            [np.asarray(directions[axis], dtype=np.float64)[:3] for axis in spatial_axes]
        )  # rows = axes
        if len(matrix) == 2:  # a 2D image in 3D space: add a unit normal as the third axis
            normal = np.cross(matrix[0], matrix[1])
            matrix = np.vstack([matrix, normal / max(np.linalg.norm(normal), 1e-12)])
        affine[:3, :3] = matrix.T
        if origin is not None:
            affine[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
        return np.diag([*_SPACE_SIGNS[space], 1.0]) @ affine
    spacings = header.get("spacings")
    steps = [
        float(spacings[axis]) if spacings is not None and np.isfinite(spacings[axis]) else 1.0 for axis in spatial_axes
    ]
    affine[:3, :3] = np.diag(steps + [1.0] * (3 - len(steps)))
    notes.append("The file does not record the patient orientation; the volume is shown as stored.")
    return affine


def load_nrrd(path: Path) -> Study:
    """NRRD ``.nrrd`` / ``.nhdr`` (e.g. pyradiomics' sample data), using space directions and origin."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
        sizes = [int(side) for side in header["sizes"]]
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This NRRD file could not be read: its header is damaged or incomplete.") from None
    check_size(tuple(sizes), "volume")
    directions = header.get("space directions")
    if directions is not None:
        spatial_axes = [axis for axis, row in enumerate(directions) if row is not None and np.all(np.isfinite(row))]
    else:
        spatial_axes = list(range(min(3, len(sizes))))
    if not 2 <= len(spatial_axes) <= 3:
        raise ImageLoadError("This NRRD file is not a 2D image or 3D volume.")
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This NRRD file is truncated or corrupt: its image data could not be read.") from None
    if data.size == 0:
        raise ImageLoadError("This NRRD file is empty: it contains no voxels.")
    notes: list[str] = []
    other_axes = [axis for axis in range(data.ndim) if axis not in spatial_axes]
    if other_axes:
        notes.append("This file has more than one value per voxel; showing the first.")
        index = tuple(slice(None) if axis in spatial_axes else 0 for axis in range(data.ndim))
        data = data[index]
    pixels = np.asarray(data, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return make_volume_study(pixels, _nrrd_affine(header, spatial_axes, notes), notes)
