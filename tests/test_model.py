"""MimoModel on the tiny preset: forward/backward, placeholders, <SEG> selection, KV cache, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mimo_chat.generation import decode_steps
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import load_tokenizer
from mimo_chat.modeling.locator import region_cells
from mimo_chat.modeling.mimo import WEIGHTS_NAME, MimoModel
from mimo_chat.predictor import MaskReady, MimoPredictor
from mimo_chat.processing import IGNORE_INDEX, MimoProcessor

ANSWER = "The <p>pancreas</p><SEG> is next to the <p>left kidney</p><SEG>."


@pytest.fixture(scope="module")
def ct_image(ct_small_gray) -> np.ndarray:
    return ct_small_gray


@pytest.fixture(scope="module")
def tiny() -> tuple[MimoModel, MimoProcessor]:
    config = MimoConfig.tiny()
    tokenizer = load_tokenizer(config)
    return MimoModel.from_config(config, tokenizer).eval(), MimoProcessor(config, tokenizer)


def training_batch(model: MimoModel, processor: MimoProcessor, image: np.ndarray) -> dict:
    size = image.shape[:2]
    example = processor.encode_conversation([("Segment the pancreas and the kidney.", ANSWER)], size, boxes=[[20, 30, 90, 100]])
    prompts = example.prompts
    image_embeddings = model.encode_images(processor.preprocess_image(image))
    targets = torch.stack(
        [processor.mask_target(image > threshold, model.sam.config.low_res_size) for threshold in (100, 150)]
    )
    return {
        "input_ids": example.input_ids,
        "image_embeddings": image_embeddings,
        "question_ids": example.question_ids,
        "prompt_embeddings": model.embed_visual_prompts(prompts.points, prompts.boxes),
        "region_cells": region_cells(image_embeddings.shape[-1], processor.config.image_size, prompts.boxes)[None],
        "labels": example.labels,
        "target_masks": targets,
    }


def test_forward_backward_shapes_and_trainable_parameters(tiny, ct_image) -> None:
    model, processor = tiny
    batch = training_batch(model, processor, ct_image)
    output = model(**batch)
    length = batch["input_ids"].shape[1]
    size = model.sam.config.low_res_size
    assert output.logits.shape == (1, length, len(processor.tokenizer))
    assert output.hidden_states.shape == (1, length, 32)
    assert output.seg_hidden_states.shape == (2, 32)
    assert output.low_res_masks.shape == (2, 1, size, size)
    assert output.iou_scores.shape == (2,)
    assert output.heatmaps.shape == (2, *image_shape(batch)) and output.presence.shape == (2,)
    assert all(torch.isfinite(t) for t in (output.loss, output.lm_loss, output.heatmap_loss, output.presence_loss))
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_state_dict())
    assert any(name.startswith("aligner.") for name in trainable) and any(name.startswith("locator.") for name in trainable)
    assert {"presence_feedback.weight", "evidence_scale"} <= trainable
    assert "language_model.new_input_embeddings" in trainable and "language_model.new_output_embeddings" in trainable
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name  # SAM and the base LM stay frozen
    assert not any(p.requires_grad for p in model.sam.parameters())
    model.zero_grad(set_to_none=True)


def test_labels_supervise_only_the_answer(tiny) -> None:
    _, processor = tiny
    example = processor.encode_conversation([("hi", "<p>liver</p><SEG>"), ("and?", ANSWER)], (64, 64))
    ids, labels = example.input_ids[0], example.labels[0]
    supervised = processor.tokenizer.decode(ids[labels != IGNORE_INDEX].tolist())
    assert supervised == f"<p>liver</p><SEG><|im_end|>\n{ANSWER}<|im_end|>\n"
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == processor.config.num_queries


def test_placeholder_count_mismatch_raises(tiny, ct_image) -> None:
    model, processor = tiny
    batch = training_batch(model, processor, ct_image)
    ids = batch["input_ids"].clone()
    first = int((ids[0] == model.image_token_id).nonzero()[0, 0])
    ids[0, first] = processor.tokenizer.convert_tokens_to_ids("<p>")
    with pytest.raises(ValueError, match="placeholder"):
        model(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="target masks"):
        model(**{**batch, "target_masks": batch["target_masks"][:1]})


def image_shape(batch: dict) -> tuple[int, int]:
    return tuple(batch["image_embeddings"].shape[-2:])


@torch.no_grad()
def test_teacher_forcing_and_streaming_agree_on_seg_states_feedback_and_masks(tiny, ct_image) -> None:
    """The training forward and the streaming predictor see the same <SEG> hidden states (with the
    locator's feedback on each <SEG> input) and decode the same masks."""
    model, processor = tiny
    question = "Segment the pancreas and the kidney."
    example = processor.encode_conversation([(question, ANSWER)], ct_image.shape)
    image_embeddings = model.encode_images(processor.preprocess_image(ct_image))
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        model.presence_feedback.weight.normal_()  # a feedback that changes what follows each <SEG>
        model.presence_feedback.bias.normal_()
        model.locator.phrase_mlp[-1].bias[-1] += 6.0  # every phrase "present": masks are decoded
        forward = model(example.input_ids, image_embeddings, example.question_ids)
        assert forward.seg_hidden_states.shape[0] == 2 and bool((forward.presence > 0).all())
        prompt = processor.encode(question, ct_image.shape)
        answer_ids = processor.reply_prefix_ids(ANSWER) + processor.stop_token_ids
        assert example.input_ids[0, -len(answer_ids) - 1 : -1].tolist() == answer_ids
        embeds = model.embed_inputs(prompt.input_ids, image_embeddings, prompt.question_ids)
        feedback = iter(model.feedback(forward.presence))

        def embed_token(token: int) -> torch.Tensor:
            embedding = model.language_model.embed(torch.tensor([[token]]))
            return embedding + next(feedback) if token == model.seg_token_id else embedding

        steps = list(decode_steps(model.language_model, embeds, 0, forced_token_ids=answer_ids, embed_token=embed_token))
        # a step holds the state of the position that predicted its token: for <SEG>, the <SEG> state
        stepped = torch.stack([step.hidden_state for step in steps if step.token_id == model.seg_token_id])
        torch.testing.assert_close(stepped, forward.seg_hidden_states, atol=1e-5, rtol=1e-4)
        # the predictor's streamed masks are the forward's masks
        predictor = MimoPredictor(model, processor)
        context = predictor.encode(ct_image)
        events = list(predictor.stream(context, question, reply_prefix=ANSWER, max_new_tokens=0))
        streamed = [event.mask for event in events if isinstance(event, MaskReady)]
        full = processor.transform.postprocess_logits(forward.low_res_masks.float(), ct_image.shape[:2])[:, 0] > 0
        assert len(streamed) == 2 and any(mask.any() for mask in streamed)
        for mask, expected in zip(streamed, full.numpy(), strict=True):
            assert np.array_equal(mask, expected)
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(saved[name])


@torch.no_grad()
def test_kv_cache_step_decoding_matches_full_forward(tiny, ct_image) -> None:
    model, processor = tiny
    image_embeddings = model.encode_images(processor.preprocess_image(ct_image))
    prompt = processor.encode("What is in this image?", ct_image.shape)
    embeds = model.embed_inputs(prompt.input_ids, image_embeddings, prompt.question_ids)
    steps = list(decode_steps(model.language_model, embeds, 8))
    generated = torch.tensor([[step.token_id for step in steps]])
    full_ids = torch.cat([prompt.input_ids, generated], dim=1)
    full = model(full_ids, image_embeddings, prompt.question_ids, decode_masks=False)
    start = prompt.input_ids.shape[1] - 1
    expected = full.logits[0, start : start + len(steps)]  # logits that chose each generated token
    torch.testing.assert_close(torch.stack([step.logits for step in steps]), expected, atol=1e-4, rtol=1e-4)
    assert generated[0].tolist() == expected.argmax(-1).tolist()


def test_save_load_round_trip_is_exact(tiny, ct_image, tmp_path) -> None:
    model, processor = tiny
    with torch.no_grad():  # move every trained tensor away from its seeded initial value
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    for parameter in model.aligner.parameters():  # a training stage that freezes the aligner for a while
        parameter.requires_grad_(False)
    model.save_pretrained(tmp_path)
    for parameter in model.aligner.parameters():
        parameter.requires_grad_(True)
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(stored) == set(model.trainable_state_dict()) == set(model.trained_parameter_names)
    assert any(name.startswith("aligner.") for name in stored)
    assert sum(t.numel() for t in stored.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    loaded = MimoModel.from_pretrained(tmp_path, processor.tokenizer).eval()
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    batch = training_batch(model, processor, ct_image)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    stored.pop(next(iter(stored)))
    from safetensors.torch import save_file

    save_file(stored, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing"):
        MimoModel.from_pretrained(tmp_path, processor.tokenizer)


@torch.no_grad()
def test_padded_batch_matches_single_examples(tiny, ct_image) -> None:
    """collate + pad_prompt_embeddings: padding changes nothing for the real tokens, prompts and masks."""
    from mimo_chat.processing import collate, pad_prompt_embeddings

    model, processor = tiny
    size = ct_image.shape
    examples = [
        processor.encode_conversation([("Segment the pancreas.", "<p>pancreas</p><SEG>")], size, boxes=[[20, 30, 90, 100]]),
        processor.encode_conversation([("Where are the kidneys in this slice?", ANSWER)], size, points=[[60, 60]]),
    ]
    image_embeddings = model.encode_images(processor.preprocess_image(ct_image))
    prompts = [model.embed_visual_prompts(e.prompts.points, e.prompts.boxes) for e in examples]
    batch = collate(examples, pad_token_id=processor.stop_token_ids[0])
    prompt_embeddings, prompt_mask = pad_prompt_embeddings(prompts)
    together = model(
        **batch, image_embeddings=image_embeddings.expand(2, -1, -1, -1),
        prompt_embeddings=prompt_embeddings, prompt_mask=prompt_mask,
    )
    singles = [
        model(e.input_ids, image_embeddings, e.question_ids, prompt_embeddings=p, labels=e.labels)
        for e, p in zip(examples, prompts, strict=True)
    ]
    assert together.seg_hidden_states.shape[0] == 3
    torch.testing.assert_close(
        together.seg_hidden_states, torch.cat([s.seg_hidden_states for s in singles]), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        together.low_res_masks, torch.cat([s.low_res_masks for s in singles]), atol=1e-3, rtol=1e-3
    )
