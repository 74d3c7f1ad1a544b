"""``load_study(path)``: recognise a file by its content (suffix only as a fallback) and open it."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

from .errors import MAX_DECODED_BYTES, ImageLoadError
from .privacy import quiet_third_party
from .study import Study

SUPPORTED = (
    "Supported: PNG, JPEG, TIFF or BMP images, a DICOM file, a folder or .zip of DICOM files, "
    "a NIfTI volume (.nii, .nii.gz) or an NRRD volume (.nrrd)."
)
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _is_nifti_header(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def _kind(path: Path) -> str:
    """'folder', 'raster', 'dicom', 'dicom-force', 'nifti', 'nrrd' or 'zip'."""
    if path.is_dir():
        return "folder"
    with open(path, "rb") as handle:
        head = handle.read(544)
    if not head:
        raise ImageLoadError("This file is empty.")
    name = path.name.lower()
    if head[128:132] == b"DICM":  # before the raster check: a DICOM preamble may look like a TIFF header
        return "dicom"
    if head.startswith(_RASTER_MAGIC):
        return "raster"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as handle:
                inner = handle.read(544)
        except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
            raise ImageLoadError("This compressed file is truncated or corrupt.") from None
        if _is_nifti_header(inner):
            return "nifti"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom-force"  # DICOM without the standard preamble
    raise ImageLoadError(f"This file type is not supported. {SUPPORTED}")


def _folder_members(folder: Path) -> list[tuple[str, object]]:
    files = sorted(
        Path(root) / name for root, dirs, names in os.walk(folder) for name in names if not name.startswith(".")
    )
    total = sum(file.stat().st_size for file in files)
    if total > MAX_DECODED_BYTES:
        raise ImageLoadError("This folder is too large to open (more than 2 GB of files).")
    return [(str(file.relative_to(folder)), file.read_bytes) for file in files]


def _zip_members(path: Path, archive: zipfile.ZipFile) -> list[tuple[str, object]]:
    infos = [
        info
        for info in archive.infolist()
        if not info.is_dir() and not Path(info.filename).name.startswith(".") and "__MACOSX" not in info.filename
    ]
    if sum(info.file_size for info in infos) > MAX_DECODED_BYTES:
        raise ImageLoadError("This archive is too large to open (more than 2 GB unpacked).")
    return [(info.filename, lambda info=info: archive.read(info)) for info in infos]


def _load(path: Path) -> Study:
    from . import dicom, raster, volume

    kind = _kind(path)
    if kind == "raster":
        return raster.load_raster(path)
    if kind in ("dicom", "dicom-force"):
        return dicom.load_dicom_file(str(path), force=kind == "dicom-force")
    if kind == "nifti":
        return volume.load_nifti(path)
    if kind == "nrrd":
        return volume.load_nrrd(path)
    if kind == "folder":
        return dicom.load_dicom_series(_folder_members(path))
    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This .zip archive is truncated or corrupt.") from None
    with archive:
        try:
            return dicom.load_dicom_series(_zip_members(path, archive))
        except zipfile.BadZipFile:
            raise ImageLoadError("This .zip archive is truncated or corrupt.") from None


def load_study(path: str | os.PathLike) -> Study:
    """Open an image file, DICOM file/series (folder or .zip) or volume as a Study.

    Raises ImageLoadError (a ValueError) with a message for a clinician for anything that
    cannot be shown; no other exception type leaves this function for bad input.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError("The file could not be found.")
    with quiet_third_party():
        try:
            return _load(path)
        except ImageLoadError:
            raise
        except MemoryError:
            raise ImageLoadError("This image is too large to open on this computer.") from None
        except PermissionError:
            raise ImageLoadError("This file cannot be opened: permission denied.") from None
        except Exception as error:  # noqa: BLE001 - a damaged file must never give a raw traceback
            raise ImageLoadError(
                f"This file could not be read; it may be truncated or corrupt ({type(error).__name__})."
            ) from None
