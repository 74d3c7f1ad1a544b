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
import re
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


# Words a study / series / protocol description is made of. Free text in these fields can carry
# names ("CT ABDOMEN Dr Smith"), so a description is shown only when every word is one of these,
# a short code (two letters or fewer) or a small number, and it repeats no identifier of its header.
_WORDS = """
abd abdomen abdominal acq acquisition adc adrenal air ang angio angiography ankle aorta aortic ap arm
arterial artery ax axial axl bh bilat bilateral biliary bladder blood body bone bones bowel brain breast
breath bw cap cardiac carotid cerebral cervical chest cholangio cine circle colon contrast cor coronal
coronary cranial cspine cta ctu cystic delayed dental diffusion dixon dose dual dwi dyn dynamic echo
echocardiogram ecg elbow endo enhanced enterography eq equilibrium exam extremity face fat fatsat femur
fibroma fiesta flair flow fluoro foot forearm fs fse gad gado gallbladder gre hand head heart hepatic hip
hips ihe image images inferior infusion inner iv kidney kidneys knee kub lat lateral left leg limb liver
localiser localizer lower lspine lumbar lung lungs lut mammo mammogram mask max med mediastinum mip mod
modality mono monochrome mpr mprage mra mrcp mri mrv ms msk neck neuro non oblique obl orbit orbits
ossifying oral pancreas pancreatic pa pelvis pelvic perfusion pet phase plain portal post pre prostate
protocol pulmonary quad range recon reconstruction rectum renal report resp right routine sag sagittal
scan scout screening se segmentation sella series sharp shoulder signed sinus sinuses skull slab slice
slices slope smooth soft spect spine spleen splenic ssfp standard stir stomach study superior supine
swi t1 t2 t1w t2w tc test thick thin thoracic thorax thyroid tibia tissue tof topogram tra trans
transesophageal transverse tse upper upright urogram uterus vascular vein venous vibe view voi volume
vrt w wb whole with without wo wrist year distal proximal mid the and for
"""
DESCRIPTION_WORDS = frozenset(_WORDS.split())
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StationName", "StudyID", "StudyDate", "SeriesDate",
)
"""Header fields whose words a shown description must not repeat."""
_MAX_NUMBER_DIGITS = 4  # slice thickness, matrix size; IDs and dates are longer
_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")


def _identifier_words(identifiers: Sequence[object]) -> set[str]:
    words = set()
    for value in identifiers:
        words.update(word.lower() for word in re.findall(r"[^\W_]+", str(value)) if len(word) >= 2)
    return words


def screen_description(text: object, identifiers: Sequence[object] = ()) -> str | None:
    """``text`` when it passes the privacy filter, else None (the description is not shown).

    A description passes when every word is in ``DESCRIPTION_WORDS`` or is a code of at most two
    letters or a number of at most four digits, it holds no date, and none of its words is part of
    ``identifiers`` (the header's names, IDs, institution...; compared in memory, never kept).
    """
    if text in (None, ""):
        return None
    cleaned = _clean_text(text)
    if _DATE.search(cleaned):
        return None
    blocked = _identifier_words(identifiers)
    for word in re.findall(r"[^\W\d_]+|\d+", cleaned.lower()):
        if word in blocked:
            return None
        if word.isdigit():
            if len(word) > _MAX_NUMBER_DIGITS:
                return None
        elif len(word) > 2 and word not in DESCRIPTION_WORDS:
            return None
    return cleaned


def safe_descriptors(
    modality: str,
    size: Sequence[int],
    spacing: Sequence[float] | None,
    body_part: object = None,
    study_description: object = None,
    series_description: object = None,
    identifiers: Sequence[object] = (),
) -> dict[str, str]:
    """Build the descriptor dict of a Study from whitelisted values only (empty ones are left out).

    The free-text fields (body part, descriptions) go through :func:`screen_description`.
    """
    values = {
        "modality": modality,
        "body_part": screen_description(body_part, identifiers),
        "study_description": screen_description(study_description, identifiers),
        "series_description": screen_description(series_description, identifiers),
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
