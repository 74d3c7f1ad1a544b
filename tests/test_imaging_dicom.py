"""DICOM ingestion on real files: pydicom's and pydicom-data's test files, and series built from them."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from mimo_chat.imaging import ImageLoadError, load_study
from mimo_chat.resources import pydicom_test_file


def _raw(name: str) -> tuple[pydicom.Dataset, np.ndarray]:
    dataset = pydicom.dcmread(pydicom_test_file(name))
    return dataset, dataset.pixel_array


def test_ct_small_is_in_hounsfield_units():
    dataset, raw = _raw("CT_small.dcm")
    study = load_study(pydicom_test_file("CT_small.dcm"))
    assert study.modality == "CT" and not study.is_volume and study.default_window == "abdomen"
    assert study.pixels.dtype == np.float32
    expected = raw * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(study.pixels, expected)  # standard axial orientation: shown as stored
    assert study.spacing == pytest.approx((0.661468, 0.661468))
    assert study.display().shape == (128, 128, 3) and study.display().dtype == np.uint8


def test_mr_small_opens_with_the_automatic_window():
    _, raw = _raw("MR_small.dcm")
    study = load_study(pydicom_test_file("MR_small.dcm"))
    assert study.modality == "MR" and study.default_window == "auto"
    np.testing.assert_array_equal(study.pixels, raw.astype(np.float32))
    width, level = study.window_values()
    low, high = np.percentile(raw, [1, 99])
    assert (width, level) == pytest.approx((high - low, (high + low) / 2))


def test_pancreas_ct_slice_is_reoriented_to_radiological_display():
    # explicit_VR-UN.dcm: JPEG 2000 lossless CT whose columns run toward anterior (IOP 1,0,0,0,-1,0)
    dataset, raw = _raw("explicit_VR-UN.dcm")
    assert [float(v) for v in dataset.ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]
    study = load_study(pydicom_test_file("explicit_VR-UN.dcm"))
    assert study.modality == "CT" and study.pixels.shape == (512, 512)
    np.testing.assert_array_equal(study.pixels, np.flipud(raw.astype(np.float32)))
    midline = study.pixels[:, 226:286]  # the spine is the only bone on the midline at pancreas level
    bone_rows = np.nonzero((midline > 300).any(axis=1))[0]
    assert bone_rows.min() > 256  # spine in the bottom half (the stored image has it at the top)
    assert np.median(study.pixels[:20, :20]) == pytest.approx(-1024, abs=30)  # air / outside the scan


def test_radiograph_monochrome1_is_inverted_and_uses_its_voi_window():
    dataset, raw = _raw("RG1_UNCR.dcm")
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    study = load_study(pydicom_test_file("RG1_UNCR.dcm"))
    top = 2 ** int(dataset.BitsStored) - 1
    np.testing.assert_array_equal(study.pixels, top - raw.astype(np.float32))
    assert study.modality == "XR"
    width, level = float(dataset.WindowWidth), float(dataset.WindowCenter)
    assert study.default_window == (width, top - level)
    image = study.display()[:, :, 0].astype(float)
    height, width_px = image.shape
    mediastinum = image[height // 3 : 2 * height // 3, width_px // 2 - 60 : width_px // 2 + 60].mean()
    right_lung = image[height // 3 : 2 * height // 3, width_px // 5 : width_px // 5 + 120].mean()
    assert mediastinum > right_lung  # dense mediastinum brighter than air-filled lung


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 lossless
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless radiograph
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame JPEG 2000
        ("emri_small_RLE.dcm", "emri_small.dcm"),  # multi-frame RLE
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless (process 14), colour
    ],
)
def test_lossless_compressed_files_equal_their_uncompressed_sibling(compressed, reference):
    loaded, expected = load_study(pydicom_test_file(compressed)), load_study(pydicom_test_file(reference))
    assert loaded.is_volume == expected.is_volume
    np.testing.assert_array_equal(loaded.pixels, expected.pixels)


def test_jpeg_ls_near_lossless_and_jpeg_baseline_decode():
    near = load_study(pydicom_test_file("JPEGLSNearLossless_16.dcm"))
    assert near.pixels.shape == (50, 10) and near.pixels.max() > near.pixels.min()
    colour = load_study(pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, YBR -> RGB
    reference = load_study(pydicom_test_file("SC_rgb.dcm"))
    assert colour.pixels.shape == reference.pixels.shape == (100, 100, 3)
    assert np.abs(colour.pixels - reference.pixels).mean() < 8  # lossy JPEG of the same picture


def test_jpeg_extended_12_bit_matches_the_lossless_copy_and_a_broken_stream_is_reported():
    lossy, lossless = load_study(pydicom_test_file("JPGExtended.dcm")), load_study(pydicom_test_file("JPEG-LL.dcm"))
    assert lossy.pixels.shape == lossless.pixels.shape == (1024, 256)
    assert np.abs(lossy.pixels - lossless.pixels).mean() < 0.25 * np.abs(lossless.pixels).mean()
    # JPEG-lossy.dcm has a non-conformant JPEG stream that no installed decoder accepts
    with pytest.raises(ImageLoadError, match=r"could not be decoded \(JPEG Extended"):
        load_study(pydicom_test_file("JPEG-lossy.dcm"))


def test_multi_frame_file_is_a_volume_in_stored_frame_order():
    dataset, raw = _raw("emri_small.dcm")
    study = load_study(pydicom_test_file("emri_small.dcm"))
    assert study.is_volume and study.num_slices("axial") == int(dataset.NumberOfFrames) == 10
    assert any("stored order" in note for note in study.notes)
    for frame in (0, 4, 9):
        np.testing.assert_array_equal(study.slice(frame, "axial"), raw[frame].astype(np.float32))


def test_dicom_without_pixel_data_says_so(tmp_path):
    with pytest.raises(ImageLoadError, match="This DICOM file has no image data"):
        load_study(pydicom_test_file("rtplan.dcm"))
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    del dataset.PixelData
    dataset.save_as(tmp_path / "header_only.dcm")
    with pytest.raises(ImageLoadError, match="This DICOM file has no image data"):
        load_study(tmp_path / "header_only.dcm")


def test_truncated_dicom_is_reported():
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_study(pydicom_test_file("MR_truncated.dcm"))


def test_oversized_dicom_is_refused_from_its_header(tmp_path):
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    dataset.Rows = 9000  # header claims 9000 rows; nothing is decoded
    dataset.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageLoadError, match="too large"):
        load_study(tmp_path / "huge.dcm")


# ---- series built from real slices -------------------------------------------------------------

SERIES_Z = [-75.7 + 5.0 * step for step in range(6)]  # superior = larger z in LPS and RAS


def _write_series(folder: Path, seed: int = 0, uid: str | None = None, count: int = 6) -> None:
    """Write CT_small at ``count`` positions (slice k gets +10*k HU) under shuffled names."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    for position, step in enumerate(order):
        dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        pixels = dataset.pixel_array + 10 * step
        dataset.PixelData = pixels.astype(dataset.pixel_array.dtype).tobytes()
        x, y, _ = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y, SERIES_Z[step]]
        dataset.InstanceNumber = count - position  # misleading on purpose: order must come from positions
        dataset.SeriesInstanceUID = uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(folder / f"img_{random.Random(seed + position).randrange(10**6):06d}.dcm")


def _check_order(study, count: int = 6) -> None:
    single = load_study(pydicom_test_file("CT_small.dcm")).pixels
    assert study.is_volume and study.num_slices("axial") == count
    for index in range(count):  # axial index 0 is the most inferior slice
        np.testing.assert_array_equal(study.slice(index, "axial"), single + 10 * index)
    assert study.affine[2, 3] == pytest.approx(SERIES_Z[0])
    assert study.spacing[2] == pytest.approx(5.0)


def test_series_folder_loads_in_position_order(tmp_path):
    _write_series(tmp_path / "series")
    study = load_study(tmp_path / "series")
    _check_order(study)
    assert study.modality == "CT" and study.default_window == "abdomen"


def test_series_zip_loads_in_position_order(tmp_path):
    _write_series(tmp_path / "series", seed=3)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted((tmp_path / "series").iterdir(), reverse=True):
            bundle.write(file, f"study/{file.name}")
        bundle.writestr("study/README.txt", "not an image")
    _check_order(load_study(archive))


def test_folder_with_two_series_shows_the_larger_one(tmp_path):
    _write_series(tmp_path / "mixed", seed=1)
    _write_series(tmp_path / "mixed" / "scout", seed=2, count=2)
    study = load_study(tmp_path / "mixed")
    assert study.num_slices("axial") == 6
    assert any("2 image series" in note for note in study.notes)


def test_inconsistent_series_are_refused(tmp_path):
    _write_series(tmp_path / "sizes")
    odd = min((tmp_path / "sizes").iterdir())
    dataset = pydicom.dcmread(odd)
    dataset.PixelData = dataset.pixel_array[:64].tobytes()
    dataset.Rows = 64
    dataset.save_as(odd)
    with pytest.raises(ImageLoadError, match="different sizes"):
        load_study(tmp_path / "sizes")

    _write_series(tmp_path / "orientation")
    odd = min((tmp_path / "orientation").iterdir())
    dataset = pydicom.dcmread(odd)
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    dataset.save_as(odd)
    with pytest.raises(ImageLoadError, match="different orientations"):
        load_study(tmp_path / "orientation")


def test_folder_without_dicom_images(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ImageLoadError, match="No DICOM images"):
        load_study(tmp_path)
