"""Whole-volume answers: 3D masks, organ volumes in mL and NIfTI files on the source grid.

    from mimo_chat.volume import SliceEncodings, segment_volume, save_niftis, source_grid
    study = load_study(path)
    encodings = SliceEncodings(study, predictor.encode)      # one per study and session
    result = segment_volume(study, ["liver", "spleen"], predictor, encodings=encodings)
    save_niftis(result, study, out_dir, source_grid(path, study))

``python -m mimo_chat.volume INPUT --structures liver,spleen --out DIR [--json]`` does the same.
"""

from mimo_chat.volume.encodings import SliceEncodings
from mimo_chat.volume.geometry import SourceGrid, source_grid, volume_ml, write_mask_nifti
from mimo_chat.volume.pipeline import (
    StructureResult,
    VolumeResult,
    nifti_name,
    save_niftis,
    segment_volume,
    stack_to_volume,
    structure_parts,
)
from mimo_chat.volume.propagate import PropagationSettings, VolumeCancelled

__all__ = [
    "PropagationSettings",
    "SliceEncodings",
    "SourceGrid",
    "StructureResult",
    "VolumeCancelled",
    "VolumeResult",
    "nifti_name",
    "save_niftis",
    "segment_volume",
    "source_grid",
    "stack_to_volume",
    "structure_parts",
    "volume_ml",
    "write_mask_nifti",
]
