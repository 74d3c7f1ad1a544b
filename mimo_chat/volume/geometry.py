"""3D masks on a study's voxel grid: clean-up, size, and NIfTI files that open aligned with the input.

A volume ``Study`` holds its voxels in RAS canonical order (``imaging.volume.to_canonical``). A
mask computed on that grid is written back on the grid of the file the user opened: for a NIfTI
input, the same voxel order, shape, qform and sform as the file (so viewers that read either
transform overlay it exactly); for a DICOM series (no file grid) or NRRD, the study's grid and affine.
Only geometry goes into the header: no description, names or dates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)  # nibabel orientation of the study's grid


@dataclass(frozen=True)
class SourceGrid:
    """The voxel grid of the file a volume study was loaded from."""

    shape: tuple[int, int, int]
    transform: np.ndarray  # (3, 2) nibabel orientation transform: study (RAS) voxel order -> file voxel order
    qform: np.ndarray  # (4, 4)
    qform_code: int
    sform: np.ndarray  # (4, 4)
    sform_code: int


def source_grid(path: str | Path, study) -> SourceGrid | None:
    """The grid of the NIfTI file ``study`` was loaded from; None for other inputs or a grid that does not match.

    Only the header is read (nibabel loads the voxels lazily).
    """
    import nibabel as nib
    from nibabel import orientations

    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    image = nib.load(str(path))
    shape = tuple(int(side) for side in image.shape[:3])
    if len(shape) < 3:
        shape = (*shape, 1)[:3]
    file_orientation = orientations.io_orientation(image.affine)
    transform = orientations.ornt_transform(RAS, file_orientation)
    canonical_shape = tuple(int(side) for side in study.pixels.shape)
    back = orientations.inv_ornt_aff(transform, canonical_shape)
    if not np.allclose(study.affine @ back, image.affine, atol=1e-3):
        return None
    qform, qform_code = image.get_qform(coded=True)
    sform, sform_code = image.get_sform(coded=True)
    return SourceGrid(
        shape=shape, transform=transform,
        qform=np.asarray(qform if qform is not None else image.affine, dtype=np.float64), qform_code=int(qform_code),
        sform=np.asarray(sform if sform is not None else image.affine, dtype=np.float64), sform_code=int(sform_code),
    )


def to_source_order(mask: np.ndarray, grid: SourceGrid) -> np.ndarray:
    """(X, Y, Z) mask in the study's RAS order -> the file's voxel order and shape."""
    from nibabel import orientations

    reordered = orientations.apply_orientation(mask, grid.transform)
    if reordered.shape != grid.shape:
        raise ValueError(f"mask reoriented to {reordered.shape}, but the file grid is {grid.shape}")
    return np.ascontiguousarray(reordered)


def write_mask_nifti(study, mask: np.ndarray, path: str | Path, grid: SourceGrid | None = None) -> Path:
    """Write an (X, Y, Z) bool mask on the study's grid as uint8 NIfTI (1 = inside).

    With ``grid`` (from :func:`source_grid`) the file has the input file's voxel order, shape and
    transforms; otherwise the study's RAS grid and affine (scanner coordinates).
    """
    import nibabel as nib

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != study.pixels.shape:
        raise ValueError(f"mask {mask.shape} is not on the study's grid {study.pixels.shape}")
    header = nib.Nifti1Header()
    if grid is None:
        data, affine = mask.astype(np.uint8), np.asarray(study.affine, dtype=np.float64)
        image = nib.Nifti1Image(data, affine, header)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    else:
        data = to_source_order(mask, grid).astype(np.uint8)
        image = nib.Nifti1Image(data, grid.sform if grid.sform_code else grid.qform, header)
        image.set_qform(grid.qform, code=grid.qform_code)
        image.set_sform(grid.sform, code=grid.sform_code)
    image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def keep_main_component(mask: np.ndarray, min_fraction: float = 0.1) -> np.ndarray:
    """(X, Y, Z) bool -> the largest 26-connected component plus any other at least ``min_fraction`` of its size.

    Organs are one piece; small islands are leaks of the 2D decoder onto neighbouring tissue. Holes
    inside each axial slice are filled (vessels inside the liver belong to its volume).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    cleaned = np.isin(labels, keep)
    for k in np.flatnonzero(cleaned.any(axis=(0, 1))):
        cleaned[:, :, k] = ndimage.binary_fill_holes(cleaned[:, :, k])
    return cleaned


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Volume of an (X, Y, Z) mask in millilitres (voxel volume from the affine, oblique grids included)."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    return float(np.count_nonzero(mask)) * voxel_mm3 / 1000.0


def extent_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> list[float]:
    """[x, y, z] size in mm of the mask's bounding box along the study's voxel axes (right, anterior, superior)."""
    if not np.any(mask):
        return [0.0, 0.0, 0.0]
    sizes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        sizes.append(float((present[-1] - present[0] + 1) * spacing[axis]))
    return sizes


def axial_range(mask: np.ndarray) -> list[int] | None:
    """[first, last] axial slice indices (0 = most inferior) holding the mask; None when empty."""
    present = np.flatnonzero(np.any(mask, axis=(0, 1)))
    return [int(present[0]), int(present[-1])] if present.size else None
