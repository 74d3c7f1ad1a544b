"""Medical image ingestion: ``load_study(path) -> Study`` for images, DICOM, NIfTI and NRRD.

See ``study.py`` for the coordinate frames and display convention.
"""

from mimo_chat.limits import MAX_DECODED_BYTES, MAX_SIDE

from .errors import ImageLoadError
from .loader import load_study
from .privacy import SAFE_DESCRIPTORS
from .study import PLANES, Study, mask_to_volume, save_mask_nifti
from .windows import AUTO, WINDOW_PRESETS, apply_window, auto_window, default_window, resolve_window

__all__ = [
    "AUTO",
    "MAX_DECODED_BYTES",
    "MAX_SIDE",
    "PLANES",
    "SAFE_DESCRIPTORS",
    "WINDOW_PRESETS",
    "ImageLoadError",
    "Study",
    "apply_window",
    "auto_window",
    "default_window",
    "load_study",
    "mask_to_volume",
    "resolve_window",
    "save_mask_nifti",
]
