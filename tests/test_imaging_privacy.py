"""Patient identifiers in real DICOM headers never reach a Study, a message, a log or an output file."""

from __future__ import annotations

import logging
import warnings
import zipfile

import pydicom
import pytest
from pydicom.uid import generate_uid

from mimo_chat.imaging import SAFE_DESCRIPTORS, ImageLoadError, load_study, save_mask_nifti
from mimo_chat.resources import pydicom_test_file

IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StationName",
)
FILES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "explicit_VR-UN.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtdose.dcm"]


def _identifiers(dataset: pydicom.Dataset) -> set[str]:
    """Identifier strings of a header (and the name parts), at least 4 characters long."""
    found = set()
    for keyword in IDENTIFYING:
        value = dataset.get(keyword)
        if value in (None, ""):
            continue
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        for item in values:
            text = str(item)
            found.add(text)
            found.update(text.split("^"))
    return {text for text in found if len(text.strip()) >= 4}


def _assert_absent(identifiers: set[str], *texts: str) -> None:
    joined = "\n".join(texts).lower()
    leaked = sorted(value for value in identifiers if value.lower() in joined)
    assert not leaked, f"identifiers leaked: {leaked}"


@pytest.mark.parametrize("name", FILES)
def test_study_exposes_only_whitelisted_descriptors(name, caplog):
    dataset = pydicom.dcmread(pydicom_test_file(name))
    identifiers = _identifiers(dataset)
    assert identifiers, "the test file should carry identifiers"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = load_study(pydicom_test_file(name))
    assert set(study.descriptors) <= set(SAFE_DESCRIPTORS)
    texts = [repr(study), str(study), str(study.descriptors), *study.notes, caplog.text]
    texts += [str(warning.message) for warning in caught]
    _assert_absent(identifiers, *texts)


def test_errors_and_warnings_never_quote_the_header(tmp_path, caplog):
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    dataset.PatientBirthDate = "19AB0305"  # invalid DA: pydicom warns quoting the value
    dataset.PatientName = "Doe^Jonathan"
    del dataset.PixelData
    dataset.save_as(tmp_path / "no_image.dcm")
    identifiers = _identifiers(dataset) | {"19AB0305", "Jonathan"}
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # writing the invalid date above was logged by pydicom itself; only loading counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError) as error:
            load_study(tmp_path / "no_image.dcm")
        with pytest.raises(ImageLoadError) as truncated:
            load_study(pydicom_test_file("MR_truncated.dcm"))
        with pytest.raises(ImageLoadError) as no_image:
            load_study(pydicom_test_file("rtplan.dcm"))
    assert str(error.value) == "This DICOM file has no image data."
    identifiers |= _identifiers(pydicom.dcmread(pydicom_test_file("MR_truncated.dcm")))
    identifiers |= _identifiers(pydicom.dcmread(pydicom_test_file("rtplan.dcm")))
    texts = [str(error.value), repr(error.value), str(truncated.value), str(no_image.value), caplog.text]
    texts += [str(warning.message) for warning in caught]
    _assert_absent(identifiers, *texts)
    assert truncated.value.__cause__ is None and truncated.value.__suppress_context__  # no third-party text chained


def test_series_and_exported_masks_carry_no_identifiers(tmp_path):
    identifiers = set()
    uid = generate_uid()
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for step in range(3):
            dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
            x, y, z = (float(v) for v in dataset.ImagePositionPatient)
            dataset.ImagePositionPatient = [x, y, z + 5 * step]
            dataset.SeriesInstanceUID = uid
            dataset.SOPInstanceUID = generate_uid()
            identifiers |= _identifiers(dataset)
            path = tmp_path / f"{step}.dcm"
            dataset.save_as(path)
            bundle.write(path, path.name)
    study = load_study(archive)
    assert study.is_volume
    _assert_absent(identifiers, repr(study), str(study.descriptors), *study.notes)
    mask = study.slice(1) > 0
    written = save_mask_nifti(study, mask, 1, "axial", tmp_path / "mask.nii")
    payload = written.read_bytes().decode("latin-1")
    _assert_absent(identifiers, payload)
