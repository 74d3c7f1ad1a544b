"""``load_study(path)``: recognise a file by its content (suffix only as a fallback) and open it."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

from mimo_chat.limits import MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS, MAX_MEMBER_BYTES

from .errors import ImageLoadError
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
        return "dicom-force"  # DICOM without the standard preamble (checked in dicomfile.read_dataset)
    raise ImageLoadError(f"This file type is not supported. {SUPPORTED}")


class _Unpacked:
    """Bytes unpacked so far from one archive or folder, checked against the limits as they are read."""

    def __init__(self) -> None:
        self.total = 0

    def read(self, handle, what: str) -> bytes:
        """All bytes of ``handle``, read in 1 MB steps; ImageLoadError past the member or total limit."""
        parts, size = [], 0
        while chunk := handle.read(1 << 20):
            size += len(chunk)
            self.total += len(chunk)
            if size > MAX_MEMBER_BYTES:
                raise ImageLoadError(f"This {what} holds a file that is too large once unpacked "
                                     f"(more than {MAX_MEMBER_BYTES // 1024**2} MB).")
            if self.total > MAX_ARCHIVE_BYTES:
                raise ImageLoadError(f"This {what} is too large once unpacked "
                                     f"(more than {MAX_ARCHIVE_BYTES // 1024**2} MB).")
            parts.append(chunk)
        return b"".join(parts)


def _check_count(count: int, what: str) -> None:
    if count > MAX_ARCHIVE_MEMBERS:
        raise ImageLoadError(f"This {what} holds too many files ({count:,}; at most {MAX_ARCHIVE_MEMBERS:,}).")


def _folder_members(folder: Path) -> list[tuple[str, object]]:
    files = []
    for root, _, names in os.walk(folder):
        files += [Path(root) / name for name in names if not name.startswith(".")]
        _check_count(len(files), "folder")
    unpacked = _Unpacked()

    def reader(file: Path):
        def read() -> bytes:
            with open(file, "rb") as handle:
                return unpacked.read(handle, "folder")
        return read

    return [(str(file.relative_to(folder)), reader(file)) for file in sorted(files)]


def _zip_members(archive: zipfile.ZipFile) -> list[tuple[str, object]]:
    """(name, read) of the archive's files; sizes are counted while unpacking, not taken from the header."""
    infos = [
        info
        for info in archive.infolist()
        if not info.is_dir() and not Path(info.filename).name.startswith(".") and "__MACOSX" not in info.filename
    ]
    _check_count(len(infos), "archive")
    unpacked = _Unpacked()

    def reader(info: zipfile.ZipInfo):
        def read() -> bytes:
            with archive.open(info) as handle:
                return unpacked.read(handle, "archive")
        return read

    return [(info.filename, reader(info)) for info in infos]


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
            return dicom.load_dicom_series(_zip_members(archive))
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
