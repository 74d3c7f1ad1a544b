"""The app's "download all": masks (PNG, NIfTI on the source grid), boxes and conversations in one zip.

``session.json`` describes the study on screen and its conversation only; conversations about
studies opened earlier in the session are written beside it as ``earlier_<n>.json``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from mimo_chat.app.render import Layer, mask_png
from mimo_chat.app.session import Session
from mimo_chat.imaging import save_mask_nifti


def write_masks(layers: list[Layer], folder: Path, prefix: str = "mask") -> list[Path | None]:
    """Save each layer's mask as a PNG in ``folder``; None for a phrase without a mask."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path | None] = []
    for index, layer in enumerate(layers):
        if layer.mask is None:
            paths.append(None)
            continue
        slug = "".join(c if c.isalnum() else "_" for c in layer.phrase.lower())[:40].strip("_") or "phrase"
        path = folder / f"{prefix}_{index}_{slug}.png"
        mask_png(np.asarray(layer.mask, dtype=bool), path)
        paths.append(path)
    return paths


def match_source_orientation(mask_path: Path, source: Path | None) -> Path:
    """Re-orient a RAS mask NIfTI to the voxel order of a NIfTI source, so it has the source's affine.

    Other sources (DICOM series) keep the RAS grid of the loaded study, which is the same space.
    """
    if source is None or not source.name.lower().endswith((".nii", ".nii.gz")):
        return mask_path
    import nibabel as nib

    original, mask = nib.load(source), nib.load(mask_path)
    orientation = nib.orientations
    transform = orientation.ornt_transform(orientation.io_orientation(mask.affine),
                                           orientation.io_orientation(original.affine))
    reoriented = mask.as_reoriented(transform)
    if reoriented.shape != original.shape[:3] or not np.allclose(reoriented.affine, original.affine, atol=1e-3):
        return mask_path  # not the same voxel grid (e.g. a 4D source): keep the RAS mask
    image = nib.Nifti1Image(np.asarray(reoriented.dataobj, dtype=np.uint8), original.affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, mask_path)
    return mask_path


def session_record(session: Session, pngs: list[Path | None]) -> dict:
    """The study on screen, its view, prompts, masks and its conversation (no other study's turns)."""
    index = session.slice_index if session.study.is_volume else None
    return {
        "source": session.source_name,
        "modality": session.study.modality,
        "plane": session.plane if session.study.is_volume else None,
        "slice": index,
        "window": session.window,
        "image_size": list(session.image_shape()),
        "boxes": session.boxes,
        "points": session.points,
        "masks": [layer.record(png.name if png else None) for layer, png in zip(session.layers(), pngs)],
        "conversation": [turn.record() for turn in session.turns],
    }


def export_files(session: Session) -> list[str]:
    """Write the masks on screen, ``session.json``, earlier conversations and ``mimo_chat_export.zip``.

    Returns the paths, the zip first (the one-click "download all").
    """
    session.exports += 1
    folder = session.workdir / f"export_{session.exports}"
    layers = session.layers()
    pngs = write_masks(layers, folder)
    files = [p for p in pngs if p is not None]
    if session.study.is_volume:
        files += session.volume_files  # a 3D mask's own NIfTI, not its cross-section with this slice
        for layer, png in zip(layers, pngs):
            if png is not None and not layer.volume:
                nifti = save_mask_nifti(session.study, layer.mask, session.slice_index, session.plane,
                                        png.with_suffix(".nii.gz"))
                files.append(match_source_orientation(nifti, session.source_path))
    json_path = folder / "session.json"
    json_path.write_text(json.dumps(session_record(session, pngs), indent=2))
    files.append(json_path)
    for number, record in enumerate(session.earlier, start=1):
        earlier = folder / f"earlier_{number}.json"
        earlier.write_text(json.dumps(record, indent=2))
        files.append(earlier)
    archive = folder / "mimo_chat_export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in files:
            bundle.write(path, arcname=path.name)
    return [str(archive), *(str(path) for path in files)]
