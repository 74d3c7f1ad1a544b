"""Reading one DICOM file's header with pydicom, bounded in time and memory.

pydicom parses a damaged header element by element: a run of zero bytes is read as thousands of
empty elements (about a second per megabyte), and a deflated data set is inflated whole before it is
parsed. So a file is read through a counter of parser reads shared by every file of one study, a
header-less file must start like a DICOM data set, and a deflated one is inflated in bounded steps
first. A header that stops before its image data is reported as corrupt, not as "no image data".
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

from mimo_chat.limits import MAX_DICOM_READS, MAX_MEMBER_BYTES

from .errors import ImageLoadError

CORRUPT = "This DICOM file is truncated or corrupt and could not be read."
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"
_LIKELY_FIRST_GROUPS = (0x0002, 0x0008)  # file meta, identifying group: how header-less files start


class ReadBudget:
    """Parser reads left for the headers of one study (see ``MAX_DICOM_READS``)."""

    def __init__(self, reads: int = MAX_DICOM_READS) -> None:
        self.left = reads

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _BudgetSpent


class _BudgetSpent(Exception):
    """Raised inside pydicom's parser; turned into an ImageLoadError outside it."""


class _CountedFile:
    """A binary file whose ``read`` calls spend a :class:`ReadBudget` (everything else is delegated)."""

    def __init__(self, handle, budget: ReadBudget) -> None:
        self._handle = handle
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        self._budget.spend()
        return self._handle.read(size)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def _open(source) -> io.IOBase:
    if isinstance(source, (str, os.PathLike)):
        return open(Path(source), "rb")
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    return source


def _looks_like_dataset(head: bytes) -> bool:
    """A header-less file starts with a group number DICOM files begin with (either byte order)."""
    if len(head) < 8:
        return False
    little, big = int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big")
    return little in _LIKELY_FIRST_GROUPS or big in _LIKELY_FIRST_GROUPS


def _check_inflated_size(handle) -> None:
    """Inflate a deflated data set in bounded steps, refusing it once it passes ``MAX_MEMBER_BYTES``."""
    import pydicom

    start = handle.tell()
    pydicom.filereader.read_preamble(handle, False)
    pydicom.filereader._read_file_meta_info(handle)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while chunk := handle.read(1 << 20):
        while chunk:
            total += len(inflater.decompress(chunk, 1 << 24))
            chunk = inflater.unconsumed_tail
            if total > MAX_MEMBER_BYTES:
                raise ImageLoadError(f"This DICOM file is too large to open once unpacked "
                                     f"(more than {MAX_MEMBER_BYTES // 1024**2} MB).")
    handle.seek(start)


def read_dataset(source, force: bool = False, budget: ReadBudget | None = None):
    """pydicom Dataset (pixel data still encoded) of a path, bytes or binary file, or ImageLoadError.

    ``force``: the file has no DICOM preamble. ``budget``: shared by all files of one study.
    """
    import pydicom

    budget = budget if budget is not None else ReadBudget()
    with _open(source) as handle:
        head = handle.read(1024)
        handle.seek(0, io.SEEK_END)
        size = handle.tell()
        handle.seek(0)
        if force and not _looks_like_dataset(head):
            raise ImageLoadError(CORRUPT)
        try:
            if DEFLATED_SYNTAX in head:
                _check_inflated_size(handle)
            dataset = pydicom.dcmread(_CountedFile(handle, budget), force=force)
        except ImageLoadError:
            raise
        except _BudgetSpent:
            raise ImageLoadError("This DICOM study is corrupt or too complex to read: its headers hold "
                                 "far more elements than image files do.") from None
        except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
            raise ImageLoadError(CORRUPT) from None
        stopped_early = handle.tell() < size
    if not has_pixels(dataset) and (stopped_early or _swallowed(dataset, size)):
        raise ImageLoadError("This DICOM file is corrupt: its header is damaged before the image data.")
    return dataset


def _swallowed(dataset, size: int) -> bool:
    """True when one header element holds most of the file: a damaged length took in the image data."""
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset would convert every element
        value = dataset.get_item(tag).value
        if isinstance(value, (bytes, str)) and len(value) > max(16_384, size // 2):
            return True
    return False


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def has_pixels(dataset) -> bool:
    return any(keyword in dataset for keyword in PIXEL_KEYWORDS)
