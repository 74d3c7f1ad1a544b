"""What a Study may say about itself, and keeping patient identifiers out of logs and messages.

A Study exposes only the descriptors in SAFE_DESCRIPTORS. Patient identifiers (name, ID,
birth date, accession number, institution, physician names, dates, UIDs) are never copied
out of a file's header: loaders read the few safe fields through ``safe_descriptors``
and never keep the header object. pydicom quotes header values in its warnings and log
records ("Invalid value for VR DA: '19400305'"), so loading runs inside
``quiet_third_party()``, which silences both.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

SAFE_DESCRIPTORS = ("modality", "body_part", "study_description", "series_description", "size", "spacing")
"""The only keys of ``Study.descriptors``."""

_MAX_TEXT = 64
QUIET_LOGGERS = (
    "pydicom",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.utils",
    "nibabel.global",
    "PIL.ImageFile",
    "PIL.PngImagePlugin",
    "PIL.TiffImagePlugin",
)
"""Loggers whose records may quote file contents (filters do not apply to child loggers, so each is named)."""


def _clean_text(value: object) -> str:
    text = " ".join(str(value).split())
    return text[:_MAX_TEXT]


def safe_descriptors(
    modality: str,
    size: Sequence[int],
    spacing: Sequence[float] | None,
    body_part: object = None,
    study_description: object = None,
    series_description: object = None,
) -> dict[str, str]:
    """Build the descriptor dict of a Study from whitelisted values only (empty ones are left out)."""
    values = {
        "modality": modality,
        "body_part": body_part,
        "study_description": study_description,
        "series_description": series_description,
        "size": " x ".join(str(int(side)) for side in size),
        "spacing": " x ".join(f"{float(step):.3g}" for step in spacing) + " mm" if spacing else None,
    }
    cleaned = {key: _clean_text(value) for key, value in values.items() if value not in (None, "")}
    return {key: value for key, value in cleaned.items() if value}


def filter_descriptors(descriptors: dict[str, str]) -> dict[str, str]:
    """Drop every key that is not in SAFE_DESCRIPTORS."""
    return {key: _clean_text(value) for key, value in descriptors.items() if key in SAFE_DESCRIPTORS}


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence warnings and log records of the image libraries while a file is read.

    pydicom logs and warns with header values in the text; nothing from inside a file
    should reach a log. The filter is added to those loggers only for the duration of
    the block and removed afterwards.
    """
    drop = _DropRecords()
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
