"""The nine labelled sets of ../shared/data read through mimo_chat.data.sources (real files)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from mimo_chat import resources
from mimo_chat.data import intensity
from mimo_chat.data.names import canonical_name, names_structure
from mimo_chat.data.sources import ALL_SOURCES, LABELLED_SETS, iter_source, split_of

pytestmark = pytest.mark.skipif(resources.shared_data_dir() is None, reason="../shared/data is not available")

EXPECTED_NAMES = {
    "jsrt_scr_cxr": {"heart", "left lung", "right lung", "left clavicle", "right clavicle"},
    "shenzhen_cxr": {"left lung", "right lung"},
    "curvas_ct": {"liver", "pancreas", "left kidney", "right kidney"},
    "msd_spleen_ct": {"spleen"},
    "kits19_ct": {"left kidney", "right kidney", "kidney tumour"},
    "panther_mr": {"pancreas", "pancreatic tumour"},
    "uwm_gitract_mr": {"stomach", "small bowel", "large bowel"},
    "ircad_liver_ct": {"liver"},
    "chaos_liver_ct": {"liver"},
}


@pytest.fixture(scope="module")
def slices() -> dict[str, list]:
    """Every slice of every set (a few hundred 512 x 512 images)."""
    return {name: list(iter_source(name)) for name in LABELLED_SETS}


def test_every_set_is_a_source_with_its_plain_english_names(slices) -> None:
    assert set(LABELLED_SETS) <= set(ALL_SOURCES)
    for name, items in slices.items():
        assert items, name
        labelled = {structure for item in items for structure in item.labelled}
        present = {structure for item in items for structure in item.masks}
        assert labelled == EXPECTED_NAMES[name], name
        assert present == EXPECTED_NAMES[name], name
        assert {item.modality for item in items} == {LABELLED_SETS[name].modality}


def test_no_patient_is_in_both_splits_and_every_set_has_dev_and_train_patients(slices) -> None:
    for name, items in slices.items():
        splits = defaultdict(set)
        for item in items:
            assert item.split == split_of(name, item.patient)
            splits[item.split].add(item.patient)
        assert splits["dev"] and splits["train"], name
        assert not splits["dev"] & splits["train"], name
        dev_names = {s for item in items if item.split == "dev" for s in item.masks}
        assert dev_names == EXPECTED_NAMES[name], f"{name}: a structure has no dev slice"


def test_split_argument_keeps_only_that_split() -> None:
    dev = list(iter_source("kits19_ct", split="dev"))
    train = list(iter_source("kits19_ct", split="train"))
    assert dev and train
    assert {item.split for item in dev} == {"dev"} and {item.split for item in train} == {"train"}
    assert not {item.patient for item in dev} & {item.patient for item in train}


def test_masks_are_non_empty_and_images_rgb_in_radiological_display(slices) -> None:
    for items in slices.values():
        for item in items[:5]:
            assert item.image.dtype == np.uint8 and item.image.ndim == 3 and item.image.shape[2] == 3
            for mask in item.masks.values():
                assert mask.dtype == bool and mask.shape == item.image.shape[:2] and mask.any()
    # Radiological display: the patient's left lung is on the image's right.
    jsrt = slices["jsrt_scr_cxr"][0]
    columns = lambda mask: np.nonzero(mask)[1].mean()
    assert columns(jsrt.masks["left lung"]) > columns(jsrt.masks["right lung"])


def test_ct_liver_has_the_same_look_in_every_set(slices) -> None:
    """After the per-set intensity mapping, the liver's median grey is similar across CT sets
    (stored, the per-slice rescaled and wide-window sets differ from the abdomen window)."""
    medians = {}
    for name in ("curvas_ct", "ircad_liver_ct", "chaos_liver_ct"):
        values = [np.median(item.image[..., 0][item.masks["liver"]]) for item in slices[name] if "liver" in item.masks]
        medians[name] = float(np.median(values))
    assert max(medians.values()) - min(medians.values()) < 60, medians
    assert all(80 < value < 180 for value in medians.values()), medians


def test_clipped_ct_shows_the_fat_inside_the_body_as_fat_not_air() -> None:
    """KiTS and MSD store HU clipped at 0: the lost fat reaches the air outside through gaps in the
    skin, yet inside the body it must look like fat (dark grey), never like lung or gas (black)."""
    fat = round((intensity.FAT_HU + 150) / 400 * 255)
    for name in ("kits19_ct", "msd_spleen_ct"):
        for path in sorted((resources.shared_data_dir() / name / "cases").glob("*.npz")):
            with np.load(path) as archive:
                stored = archive["image"]
                organs = np.any([archive[key] > 0 for key in archive.files if key.startswith("mask_")], axis=0)
            grey = intensity.clipped_hu(stored)
            body = intensity.body_silhouette(stored > 3)
            assert body[organs].all(), path.stem  # the labelled organs lie inside
            assert grey[0, 0] == 0 and not body[0, 0], path.stem  # the corner is air
            assert (grey[body] == 0).mean() < 0.01, path.stem
            assert (grey[body] == fat).mean() > 0.05, path.stem


def test_rescaled_ct_anchors_air_and_soft_tissue() -> None:
    """A synthetic slice with known air and tissue greys is mapped back to the abdomen window."""
    image = np.zeros((64, 64), np.uint8)
    image[8:56, 8:56] = 100  # soft tissue
    air, tissue = intensity.tissue_anchors(image)
    assert air == 0 and tissue == 100
    shown = intensity.rescaled_ct(image)
    assert shown[0, 0] == 0 and abs(int(shown[32, 32]) - round((40 + 150) / 400 * 255)) <= 1


def test_new_names_are_recognised() -> None:
    assert names_structure("the renal mass", "kidney tumour")
    assert names_structure("a pancreatic tumour", "tumour")
    assert canonical_name("large bowel") == canonical_name("colon")
    assert not names_structure("the left lung", "right lung")


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="Unknown source"):
        list(iter_source("no_such_set"))
    with pytest.raises(ValueError, match="grey image"):
        intensity.auto_window(np.zeros((4, 4, 3), np.uint8))
