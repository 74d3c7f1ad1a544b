"""MimoPredictor: what the app, the CLI and the evaluation call.

    predictor = MimoPredictor.from_pretrained("lite")        # or "tiny", a folder, a hub repo id
    context = predictor.encode(image)                         # (H, W) or (H, W, 3) uint8, once per image
    for event in predictor.stream(context, "Segment the pancreas."):
        ...                                                   # TextDelta, MaskReady, Done
    reply = predictor.ask(context, "Where is the liver?", boxes=[[x0, y0, x1, y1]])
    result = predictor.segment(context, points=[[x, y]], point_labels=[1])   # plain clicks

In a reply to boxes or clicks, the i-th grounded phrase names the i-th prompted object: the
engine segments the prompt, the locator names that mask (``MimoModel.name_regions``) and those
name tokens are forced into the phrase the LM opens; a yes / no the LM writes right after
``<SEG>:`` (a grounded presence answer) is the locator's verdict on that phrase. The LM writes
everything else.

The image embedding in the context is shared by the MIMO mask decoding and plain ``segment``
calls (one image encoder). The context is a plain object kept by the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from mimo_chat.generation import decode_steps
from mimo_chat.grounding import GroundedReply, build_reply, mask_to_box, parse_grounded_text, render_plain_text
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import load_tokenizer
from mimo_chat.modeling.locator import (
    PRESENCE_THRESHOLD,
    phrase_spans,
    presence_logits,
    region_cells,
    target_fractions,
)
from mimo_chat.modeling.mimo import CONFIG_NAME, WEIGHTS_NAME, MimoModel, resolve_pretrained_dir
from mimo_chat.modeling.sam import fuse_for_inference
from mimo_chat.processing import MimoProcessor
from mimo_chat.segmentation import ImageContext, SegmentationPredictor, SegmentationResult

LITE_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-lite"


@dataclass
class MimoContext:
    """One encoded image."""

    image: ImageContext  # (1, C, E, E) embedding, original and input sizes
    locator_features: torch.Tensor | None = None  # (1, W, E, E), computed at the first question

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image.original_size


@dataclass
class TextDelta:
    text: str  # new plain display text (grounding tags and boxes are not shown)


@dataclass
class MaskReady:
    index: int  # index of the phrase in the final ``GroundedReply.phrases``
    phrase: str
    mask: np.ndarray  # (H, W) bool at the original resolution
    box: list[float]  # tight [x0, y0, x1, y1], x1/y1 exclusive ([0, 0, 0, 0] for an empty mask)
    score: float  # decoder-predicted IoU
    name_score: float | None = None  # how sure the locator / namer is of the name (0..1)


@dataclass
class Located:
    """The locator's finding for one name on one image (no language model involved)."""

    name: str
    presence: float  # probability 0..1 that the structure is on the image
    mask: np.ndarray | None  # (H, W) bool at the original resolution; None when absent or not asked
    box: list[float] | None  # tight [x0, y0, x1, y1] of the mask, x1/y1 exclusive
    score: float | None  # decoder-predicted IoU of the mask


@dataclass
class Done:
    reply: GroundedReply


Event = TextDelta | MaskReady | Done


@dataclass
class _StreamState:
    generated: list[int] = field(default_factory=list)
    masks: list[tuple[np.ndarray, float]] = field(default_factory=list)
    shown: str = ""
    prompted: SegmentationResult | None = None  # the user's boxes / clicks, segmented by the engine
    feedback: torch.Tensor | None = None  # (H,) what the locator found, added to the next <SEG> input
    prompt_names: list[list[int]] = field(default_factory=list)  # token ids naming each prompted object
    presence: float | None = None  # the locator's presence logit for the last <SEG>


QUANTIZE_CHOICES = ("auto", "none", "int8-weights", "int8")
MIN_NAME_DICE = 0.05  # a prompted object whose best name matches less than this is named by the LM alone


def default_quantization(choice: str, name_or_path: str | Path, device: str | torch.device) -> str | None:
    """Resolve a ``--quantize`` choice. ``"auto"`` is weight-only int8 on a CPU (about 2.5x the float32
    decode rate, replies nearly identical) except for the random ``tiny`` preset; float32 elsewhere."""
    if choice != "auto":
        return None if choice == "none" else choice
    on_cpu = torch.device(device).type == "cpu"
    has_kernel = hasattr(torch, "_weight_int8pack_mm")
    return "int8-weights" if on_cpu and has_kernel and str(name_or_path) != "tiny" else None


class MimoPredictor:
    """Streaming, grounded chat about one image at a time (per-user state lives in the context)."""

    def __init__(
        self, model: MimoModel, processor: MimoProcessor, trained: bool = False, notes: list[str] | None = None
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.segmenter = SegmentationPredictor(model.sam, processor.transform)
        self.trained = trained  # False: aligner / <SEG> head / LoRA are untrained
        self.notes = list(notes or [])
        self.use_prefix_cache = True
        self._prefix_caches: dict[tuple[int, ...], DynamicCache] = {}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "lite",
        device: str | torch.device = "cpu",
        merge_lora: bool = True,
        quantize: str | None = None,
        fuse: bool = True,
    ) -> MimoPredictor:
        """``"tiny"`` (random), ``"lite"`` (registry weights + ``checkpoints/mimo-lite`` when present),
        or a folder / hub repo id written by ``MimoModel.save_pretrained``.

        ``quantize``: ``"int8"`` (dynamic int8, fastest) or ``"int8-weights"`` (weight-only int8,
        text nearly identical to float32) language-model linears for faster CPU decoding (inference only).
        ``fuse``: the frozen LiteMedSAM prepared for inference (``modeling.sam.fuse_for_inference``:
        batch norms folded, channels-last, the decoder's image-side products in bfloat16 where the CPU has native bf16)."""
        notes: list[str] = []
        source = str(name_or_path)
        if source == "lite" and (LITE_CHECKPOINT / WEIGHTS_NAME).is_file():
            source = str(LITE_CHECKPOINT)
        if source in ("tiny", "lite"):
            config = MimoConfig.preset(source)
            tokenizer = load_tokenizer(config)
            model = MimoModel.from_config(config, tokenizer)
            trained = False
            where = "random test weights" if source == "tiny" else f"no {LITE_CHECKPOINT / WEIGHTS_NAME}"
            notes.append(
                f"The '{source}' preset has no trained MIMO weights ({where}): "
                "the aligner, <SEG> head and LoRA are random, so replies and masks are not meaningful."
            )
        else:
            directory = resolve_pretrained_dir(source)
            config = MimoConfig.load(directory / CONFIG_NAME)
            tokenizer = load_tokenizer(config)
            model = MimoModel.from_pretrained(directory, tokenizer)
            trained = True
        model = model.to(device).eval()
        if fuse:
            fuse_for_inference(model.sam)
        if merge_lora or quantize:
            model.language_model.merge_lora()
        if quantize is not None:
            model.language_model.quantize(quantize)
            notes.append(f"The language model runs with {quantize} linear layers (faster on CPU; text can differ).")
        return cls(model, MimoProcessor(config, tokenizer), trained=trained, notes=notes)

    @property
    def config(self) -> MimoConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, image: np.ndarray) -> MimoContext:
        """(H, W) or (H, W, 3) display image -> context (image embedding computed once)."""
        return MimoContext(self.segmenter.encode(image))

    @torch.inference_mode()
    def locate(self, ctx: MimoContext, names: Sequence[str], masks: bool = True) -> list[Located]:
        """Where is each of ``names`` on this image? The phrase alone drives the locator (no LM):
        presence from its heatmap peak, and with ``masks`` the heatmap's box as a box prompt of
        the mask decoder (structures judged absent get no mask)."""
        names = [str(name) for name in names]
        if not names:
            return []
        model = self.model
        features = self._locator_features(ctx)
        ids = [self.processor.tokenizer(name, add_special_tokens=False).input_ids for name in names]
        rows = torch.zeros(len(names), dtype=torch.long, device=self.device)
        heatmaps = model.locator(features, rows, model.phrase_embeddings(ids))  # (N, E, E)
        presence = presence_logits(heatmaps)  # (N,)
        probabilities = presence.float().sigmoid().tolist()
        if not masks:
            return [Located(name, p, None, None, None) for name, p in zip(names, probabilities, strict=True)]
        low_res, iou = model.decode_masks(heatmaps, presence, rows, ctx.image.embedding.to(self.device))
        full = self.processor.transform.postprocess_logits(low_res.float(), ctx.original_size)  # (N, 1, H, W)
        found = []
        for n, name in enumerate(names):
            shown = float(presence[n]) > PRESENCE_THRESHOLD
            mask = (full[n, 0] > 0).cpu().numpy() if shown else None
            box = mask_to_box(mask) if mask is not None and mask.any() else None
            found.append(Located(name, probabilities[n], mask, box, float(iou[n]) if shown else None))
        return found

    def segment(self, ctx: MimoContext, boxes=None, points=None, point_labels=None) -> SegmentationResult:
        """Plain promptable segmentation (no language model), see ``SegmentationPredictor.segment``."""
        return self.segmenter.segment(ctx.image, boxes=boxes, points=points, point_labels=point_labels)

    @torch.inference_mode()
    def stream(
        self,
        ctx: MimoContext,
        question: str,
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        history: list[tuple[str, str]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        reply_prefix: str | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Iterator[Event]:
        """Yield ``TextDelta`` as text arrives, ``MaskReady`` the moment each ``<SEG>`` is produced,
        then ``Done`` with the whole grounded reply. Prompts are in original image pixels.

        ``reply_prefix`` (raw text, tags allowed) forces the start of the reply – an assistant
        prefill: e.g. ``"<p>pancreas</p><SEG>"`` asks for that mask, and the model continues with up
        to ``max_new_tokens`` more tokens. ``on_token(token_id)`` is called as each token is
        decoded (timing and logging; it must not block)."""
        inputs = self.processor.encode(question, ctx.original_size, boxes, points, point_labels, history)
        device = self.device
        prompts = inputs.prompts
        points_tensor = None if prompts.points is None else tuple(t.to(device) for t in prompts.points)
        boxes_tensor = None if prompts.boxes is None else prompts.boxes.to(device)
        prompt_embeddings = self.model.embed_visual_prompts(points_tensor, boxes_tensor)  # (1, P, C)
        embedding = ctx.image.embedding.to(device)
        self._locator_features(ctx)
        cells = region_cells(embedding.shape[-1], self.config.image_size, boxes_tensor, points_tensor)
        inputs_embeds = self.model.embed_inputs(
            inputs.input_ids.to(device), embedding, inputs.question_ids.to(device), None, prompt_embeddings, None,
            features=ctx.locator_features, region_cells=cells[None].to(device),
        )  # (1, L, H)
        cache, cached_length = self._prefix_cache(inputs.input_ids)
        state = _StreamState()
        if not prompts.empty:
            state.prompted = self.segmenter.segment(ctx.image, boxes=boxes, points=points, point_labels=point_labels)
            state.prompt_names = self._prompt_names(state.prompted, ctx)
        stop_ids = self.processor.stop_token_ids
        steps = decode_steps(
            self.model.language_model,
            inputs_embeds[:, cached_length:],
            self.config.max_new_tokens if max_new_tokens is None else max_new_tokens,
            stop_ids,
            temperature,
            forced_token_ids=self.processor.reply_prefix_ids(reply_prefix) if reply_prefix else None,
            past_key_values=cache,
            embed_token=lambda token: self._embed_token(token, state),
            follow=lambda token: self._follow(token, state),
            revise=lambda token: self._revise(token, state),
        )
        for step in steps:
            if on_token is not None:
                on_token(step.token_id)
            if step.token_id in stop_ids:
                break
            state.generated.append(step.token_id)
            delta = self._text_delta(state, partial=True)
            if delta:
                yield delta
            if step.token_id == self.model.seg_token_id:
                yield self._mask_ready(state, ctx, step.hidden_state, embedding)
        final = self._text_delta(state, partial=False)
        if final:
            yield final
        yield Done(build_reply(self.processor.decode(state.generated), state.masks, ctx.original_size))

    def ask(
        self,
        ctx: MimoContext,
        question: str,
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        history: list[tuple[str, str]] | None = None,
        max_new_tokens: int | None = None,
        reply_prefix: str | None = None,
    ) -> GroundedReply:
        """The whole grounded reply at once (consumes :meth:`stream`)."""
        events = self.stream(ctx, question, boxes, points, point_labels, history, max_new_tokens, 0.0, reply_prefix)
        for event in events:
            if isinstance(event, Done):
                return event.reply
        raise RuntimeError("stream ended without a Done event")

    def _prefix_cache(self, input_ids: torch.Tensor) -> tuple[DynamicCache | None, int]:
        """A copy of the KV cache of the fixed prompt start (system turn + user header), computed once.

        The start is everything before the first ``<image>`` placeholder; it is the same for every
        question, so prefilling it once cuts the time to first token."""
        if not self.use_prefix_cache:
            return None, 0
        ids = input_ids[0].tolist()
        if self.model.image_token_id not in ids:
            return None, 0
        prefix = tuple(ids[: ids.index(self.model.image_token_id)])
        if prefix not in self._prefix_caches:
            cache = DynamicCache()
            language_model = self.model.language_model
            prefix_ids = torch.tensor([prefix], device=self.device)
            language_model(language_model.embed(prefix_ids), past_key_values=cache, use_cache=True, logits_to_keep=-1)
            self._prefix_caches = {prefix: cache}  # keep one (replaced, never mutated: requests copy it)
        return copy.deepcopy(self._prefix_caches[prefix]), len(prefix)

    def _text_delta(self, state: _StreamState, partial: bool) -> TextDelta | None:
        text = render_plain_text(self.processor.decode(state.generated), partial=partial)
        if partial:  # hold back what may still change: trailing spaces, half of a multi-byte character
            text = text.rstrip().rstrip("\ufffd")
        if len(text) <= len(state.shown) or not text.startswith(state.shown):
            return None
        delta, state.shown = text[len(state.shown) :], text
        return TextDelta(delta)

    def _locator_features(self, ctx: MimoContext) -> torch.Tensor:
        """The locator's (1, W, E, E) features of the context's image, computed once per image."""
        if ctx.locator_features is None:
            ctx.locator_features = self.model.locator.image_features(ctx.image.embedding.to(self.device))
        return ctx.locator_features

    @torch.inference_mode()
    def _prompt_names(self, prompted: SegmentationResult, ctx: MimoContext) -> list[list[int]]:
        """Token ids of the name of each prompted object (the engine's mask of each box / click set,
        named by the locator: ``MimoModel.name_regions``); [] for an object no name matches."""
        if not self.model.vocabulary_ids or not len(prompted.masks):
            return []
        features = self._locator_features(ctx)
        frames = torch.stack([self.processor.transform.apply_mask(mask) for mask in prompted.masks])  # (N, S, S)
        index, dice = self.model.name_regions(features, target_fractions(frames.to(self.device), features.shape[-1]))
        return [list(self.model.vocabulary_ids[i]) if float(d) >= MIN_NAME_DICE else [] for i, d in zip(index, dice, strict=True)]

    def _follow(self, token: int, state: _StreamState) -> list[int]:
        """Tokens forced after ``token``: a phrase opened for the i-th prompted object holds its name."""
        model = self.model
        if token != model.token_ids["<p>"]:
            return []
        phrase = state.generated.count(token) - 1
        if phrase >= len(state.prompt_names) or not state.prompt_names[phrase]:
            return []
        return [*state.prompt_names[phrase], model.token_ids["</p>"], model.seg_token_id]

    def _revise(self, token: int, state: _StreamState) -> int:
        """A yes / no chosen right after ``<SEG>:`` (a grounded presence answer) is the locator's verdict."""
        yes, no = self.processor.verdict_ids
        if token not in (yes, no) or state.presence is None or state.generated[-2:] != self.processor.verdict_slot:
            return token
        return yes if state.presence > PRESENCE_THRESHOLD else no

    def _embed_token(self, token: int, state: _StreamState) -> torch.Tensor:
        """(1, 1, H) input embedding of the next token; a ``<SEG>`` carries the locator's finding."""
        embedding = self.model.language_model.embed(torch.tensor([[token]], device=self.device))
        if token == self.model.seg_token_id and state.feedback is not None:
            embedding = embedding + state.feedback.to(embedding.dtype)
            state.feedback = None
        return embedding

    def _mask_ready(self, state: _StreamState, ctx: MimoContext, hidden_state: torch.Tensor, embedding: torch.Tensor) -> MaskReady:
        """Locate and decode the phrase of the ``<SEG>`` just produced (its phrase is found by the reply parser).

        The first ``<SEG>`` s of a reply to a box or clicks show the prompted objects (the engine's
        masks, in prompt order); the others show where the locator finds their phrase."""
        model = self.model
        spans = phrase_spans(state.generated, model.token_ids["<p>"], model.token_ids["</p>"], model.seg_token_id)
        phrase = model.phrase_embeddings([spans[-1][1]])  # (1, H)
        rows = torch.zeros(1, dtype=torch.long, device=embedding.device)
        features = ctx.locator_features
        presence = presence_logits(model.locator(features, rows, phrase))  # (1,) as in training
        state.feedback = model.feedback(presence)[0]
        state.presence = float(presence[0])
        seg_index = len(state.masks)
        if state.prompted is not None and seg_index < len(state.prompted.masks):
            mask = state.prompted.masks[seg_index]
            score = float(state.prompted.scores[seg_index])
        else:
            heatmaps = model.locator(features, rows, phrase, hidden_state[None].to(phrase.dtype))
            low_res, iou = model.decode_masks(heatmaps, presence, rows, embedding)
            full = self.processor.transform.postprocess_logits(low_res.float(), ctx.original_size)  # (1, 1, H, W)
            mask = (full[0, 0] > 0).cpu().numpy()
            score = float(iou[0])
        state.masks.append((mask, score))
        _, parsed = parse_grounded_text(self.processor.decode(state.generated))
        index = next(i for i, span in enumerate(parsed) if span.seg_index == seg_index)
        return MaskReady(index=index, phrase=parsed[index].phrase, mask=mask, box=mask_to_box(mask), score=score)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Trained parameters + config (LoRA is unmerged for saving and merged back)."""
        if self.model.language_model.quantized:
            raise ValueError("This predictor's language model is quantized for inference; save from an unquantized one")
        language_model = self.model.language_model
        merged = language_model.lora_merged
        language_model.unmerge_lora()
        try:
            return self.model.save_pretrained(directory)
        finally:
            if merged:
                language_model.merge_lora()

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = True) -> str:
        """Upload the trained parameters + config to a Hugging Face model repo (needs an account)."""
        if self.model.language_model.quantized:
            raise ValueError("This predictor's language model is quantized for inference; push an unquantized one")
        language_model = self.model.language_model
        merged = language_model.lora_merged
        language_model.unmerge_lora()
        try:
            return self.model.push_to_hub(repo_id, token=token, private=private)
        finally:
            if merged:
                language_model.merge_lora()
