"""MimoPredictor: what the app, the CLI and the evaluation call.

    predictor = MimoPredictor.from_pretrained("lite")        # or "tiny", a folder, a hub repo id
    context = predictor.encode(image)                         # (H, W) or (H, W, 3) uint8, once per image
    for event in predictor.stream(context, "Segment the pancreas."):
        ...                                                   # TextDelta, MaskReady, Done
    reply = predictor.ask(context, "Where is the liver?", boxes=[[x0, y0, x1, y1]])
    result = predictor.segment(context, points=[[x, y]], point_labels=[1])   # plain clicks

A reply says only what the image and the knowledge base show (``mimo_chat.evidence``): the
question's intent and the image evidence (the locator's findings, the namer's name for each box /
click, the image kind from ``image_kind`` metadata) plan the raw reply, which is teacher-forced
through the language model's decode loop so that each ``<SEG>`` gets its hidden state and its mask
streams the moment it decodes. The i-th grounded phrase of a reply to boxes or clicks shows the
i-th prompted object. With ``reply_prefix`` the LM continues freely after the prefix, but inside
``<p>...</p>`` it can only spell a name the evidence allows (a token trie).

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

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.evidence.compose import Plan, plan_reply
from mimo_chat.evidence.constrain import NameTrie, phrase_constraint
from mimo_chat.evidence.evidence import gather_evidence, vocabulary_presence
from mimo_chat.evidence.intent import IntentReader
from mimo_chat.evidence.policy import Evidence, clicks_inside
from mimo_chat.generation import decode_steps
from mimo_chat.grounding import GroundedReply, build_reply, parse_grounded_text, render_plain_text
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import load_tokenizer
from mimo_chat.modeling.locator import PRESENCE_THRESHOLD, heatmap_fit, phrase_spans, region_cells, target_fractions
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
    image_kind: str | None = None  # study metadata, e.g. "XR chest", "CT", "MR abdomen"; None = unknown
    presence: torch.Tensor | None = None  # (V,) the locator's vocabulary presence, computed once
    located: dict[str, Located] = field(default_factory=dict)  # found structures' masks, computed once each

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
    fit: float | None = None  # how well the name's heatmap agrees with the mask (soft Dice, 0..1)


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
    evidence: Evidence | None = None
    plan: Plan | None = None  # the planned reply (None: free text after a reply prefix)
    name_scores: list[float | None] = field(default_factory=list)  # per decoded <SEG>


QUANTIZE_CHOICES = ("auto", "none", "int8-weights", "int8")


def default_quantization(choice: str, name_or_path: str | Path, device: str | torch.device) -> str | None:
    """Resolve a ``--quantize`` choice. ``"auto"`` is weight-only int8 on a CPU (a faster decode
    than float32, replies nearly identical; ``python -m mimo_chat.bench chat``) except for the random ``tiny`` preset; float32 elsewhere."""
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
        self.knowledge = load_knowledge_base()
        self._reader: IntentReader | None = None

    @property
    def reader(self) -> IntentReader:
        """The question reader (loads the sentence encoder at first use)."""
        if self._reader is None:
            self._reader = IntentReader(self.knowledge, self.config.locator_vocabulary)
        return self._reader

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

    def encode(self, image: np.ndarray, image_kind: str | None = None) -> MimoContext:
        """(H, W) or (H, W, 3) display image -> context (image embedding computed once).

        ``image_kind``: what the study's metadata says the image is ("XR chest", "CT abdomen", a
        DICOM modality such as "CR"); it decides which structures can be named on it."""
        return MimoContext(self.segmenter.encode(image), image_kind=image_kind)

    @torch.inference_mode()
    def locate(self, ctx: MimoContext, names: Sequence[str], masks: bool = True, grounding: bool = True) -> list[Located]:
        """Where is each of ``names`` on this image? The phrase alone drives the locator (no LM):
        presence from its heatmap peak, and with ``masks`` the heatmap's box as a box prompt of
        the grounding decoder (``grounding`` False: the engine's decoder; structures judged absent
        get no mask)."""
        names = [str(name) for name in names]
        if not names:
            return []
        model = self.model
        features = self._locator_features(ctx)
        ids = [self.processor.tokenizer(name, add_special_tokens=False).input_ids for name in names]
        rows = torch.zeros(len(names), dtype=torch.long, device=self.device)
        phrases = model.phrase_embeddings(ids)  # (N, H)
        presence = model.phrase_presence(features, rows, phrases)  # (N,)
        probabilities = presence.float().sigmoid().tolist()
        if not masks:
            return [Located(name, p, None, None, None) for name, p in zip(names, probabilities, strict=True)]
        heatmaps, low_res, iou = model.ground_phrases(features, rows, phrases, presence, ctx.image.embedding.to(self.device),
                                                      grounding=grounding)
        fractions = target_fractions((low_res[:, 0] > 0).float(), heatmaps.shape[-1])  # (N, E, E)
        fits = heatmap_fit(heatmaps.float().sigmoid(), fractions).diagonal()  # each name against its own mask
        full = self.processor.transform.postprocess_logits(low_res.float(), ctx.original_size)  # (N, 1, H, W)
        found = []
        for n, name in enumerate(names):
            shown = float(presence[n]) > PRESENCE_THRESHOLD
            mask = (full[n, 0] > 0).cpu().numpy() if shown else None
            box = mask_to_box(mask) if mask is not None and mask.any() else None
            found.append(Located(name, probabilities[n], mask, box, float(iou[n]) if shown else None,
                                 float(fits[n]) if shown else None))
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
        image_kind: str | None = None,
    ) -> Iterator[Event]:
        """Yield ``TextDelta`` as text arrives, ``MaskReady`` the moment each ``<SEG>`` is produced,
        then ``Done`` with the whole grounded reply. Prompts are in original image pixels.

        The reply is planned from the evidence (see the module docstring); ``max_new_tokens`` and
        ``temperature`` apply to free text only. ``reply_prefix`` (raw text, tags allowed) forces
        the start of the reply instead of a plan -- an assistant prefill: e.g.
        ``"<p>pancreas</p><SEG>"`` asks for that mask, and the model continues with up to
        ``max_new_tokens`` more tokens. ``image_kind`` overrides the context's. ``on_token(token_id)``
        is called as each token is decoded (timing and logging; it must not block)."""
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
        state.evidence = self.evidence(ctx, state.prompted, image_kind)
        if state.prompted is not None and not boxes and points:
            self._outline_clicked(ctx, state, points, point_labels)
        if reply_prefix:
            forced, free = self.processor.reply_prefix_ids(reply_prefix), max_new_tokens
            free = self.config.max_new_tokens if free is None else free
        else:
            intent = self.reader.read(question, history, prompted=not prompts.empty)
            state.plan = plan_reply(intent, state.evidence, self.knowledge, question)
            forced, free = self.processor.reply_prefix_ids(state.plan.raw_text), 0
        stop_ids = self.processor.stop_token_ids
        steps = decode_steps(
            self.model.language_model,
            inputs_embeds[:, cached_length:],
            free,
            stop_ids,
            temperature,
            forced_token_ids=forced,
            past_key_values=cache,
            embed_token=lambda token: self._embed_token(token, state),
            allowed=phrase_constraint(lambda k: self._phrase_trie(k, state), self.model.token_ids["<p>"]),
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
        sources = state.plan.sources if state.plan is not None else []
        raw = self.processor.decode(state.generated)
        yield Done(build_reply(raw, state.masks, ctx.original_size, state.name_scores, sources))

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
        image_kind: str | None = None,
    ) -> GroundedReply:
        """The whole grounded reply at once (consumes :meth:`stream`)."""
        events = self.stream(
            ctx, question, boxes, points, point_labels, history, max_new_tokens, 0.0, reply_prefix, image_kind=image_kind
        )
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

    def evidence(self, ctx: MimoContext, prompted: SegmentationResult | None, image_kind: str | None) -> Evidence:
        """What the image shows for this question. The vocabulary presence and the masks of the found
        structures (with the decoder's predicted IoU: is the outline worth drawing?) are computed once per image."""
        features = self._locator_features(ctx)
        if ctx.presence is None:
            ctx.presence = vocabulary_presence(self.model, features)
        masks = None
        if prompted is not None and len(prompted.masks):
            masks = torch.stack([self.processor.transform.apply_mask(mask) for mask in prompted.masks])  # (N, S, S)
        evidence = gather_evidence(self.model, features, self.knowledge, image_kind or ctx.image_kind, masks, ctx.presence)
        found = [name for name, _ in evidence.present()]
        missing = [name for name in found if name not in ctx.located]
        ctx.located.update({item.name: item for item in self.locate(ctx, missing)})
        evidence.outline = {name: ctx.located[name].score for name in found if ctx.located[name].score is not None}
        evidence.fit = {name: ctx.located[name].fit for name in found if ctx.located[name].fit is not None}
        return evidence

    @staticmethod
    def _outline_clicked(ctx: MimoContext, state: _StreamState, points, point_labels) -> None:
        """Clicks (no box) on a structure the evidence names and outlines reliably show the whole
        structure: the clicks say which one, its located mask outlines it better than the clicks' mask."""
        named = state.evidence.prompted[0] if state.evidence.prompted else None
        found = ctx.located.get(named.name) if named is not None and named.name else None
        if found is None or found.mask is None or not state.evidence.outlined(found.name):
            return
        if not clicks_inside(points, point_labels, found.mask):
            return
        prompted = state.prompted
        prompted.masks = prompted.masks.copy()
        prompted.scores = prompted.scores.copy()
        prompted.masks[0], prompted.scores[0] = found.mask, found.score

    def _phrase_trie(self, phrase: int, state: _StreamState) -> NameTrie:
        """Names the ``phrase``-th free-text phrase may spell: the prompted object's name, else any allowed name."""
        evidence = state.evidence
        names = list(evidence.presence) if evidence is not None else list(self.config.locator_vocabulary)
        prompted = evidence is not None and phrase < len(evidence.prompted)
        if prompted and evidence.prompted[phrase].name:
            names = [evidence.prompted[phrase].name]
        tokenizer, ids = self.processor.tokenizer, self.model.token_ids
        spelled = [tokenizer(name, add_special_tokens=False).input_ids for name in names]
        return NameTrie(spelled, ids["<p>"], ids["</p>"], self.model.seg_token_id, with_mask=prompted)

    def _embed_token(self, token: int, state: _StreamState) -> torch.Tensor:
        """(1, 1, H) input embedding of the next token; a ``<SEG>`` carries the locator's finding."""
        embedding = self.model.language_model.embed(torch.tensor([[token]], device=self.device))
        if token == self.model.seg_token_id and state.feedback is not None:
            embedding = embedding + state.feedback.to(embedding.dtype)
            state.feedback = None
        return embedding

    def _mask_ready(self, state: _StreamState, ctx: MimoContext, hidden_state: torch.Tensor, embedding: torch.Tensor) -> MaskReady:
        """Locate and decode the phrase of the ``<SEG>`` just produced (its phrase is found by the reply parser).

        A ``<SEG>`` that shows a prompted object gets the engine's mask of that prompt; a planned
        ``<SEG>`` of a found structure the mask its evidence was judged on (``locate``: the phrase's
        heatmap box prompting the decoder); the others go the one ``<SEG>`` -> mask path of
        training (``MimoModel.phrase_presence`` / ``ground_phrases``)."""
        model = self.model
        spans = phrase_spans(state.generated, model.token_ids["<p>"], model.token_ids["</p>"], model.seg_token_id)
        phrase = model.phrase_embeddings([spans[-1][1]])  # (1, H)
        rows = torch.zeros(1, dtype=torch.long, device=embedding.device)
        features = ctx.locator_features
        presence = model.phrase_presence(features, rows, phrase)  # (1,) as in training
        state.feedback = model.feedback(presence)[0]
        seg_index = len(state.masks)
        prompt_index, name_score = self._seg_source(state, seg_index, float(presence[0]))
        planned = state.plan.segs[seg_index].name if state.plan is not None and seg_index < len(state.plan.segs) else None
        found = ctx.located.get(planned) if planned is not None else None
        if prompt_index is not None:
            mask = state.prompted.masks[prompt_index]
            score = float(state.prompted.scores[prompt_index])
        elif found is not None and found.mask is not None:  # the mask the evidence judged (see ``_evidence``)
            mask, score = found.mask, float(found.score)
        else:
            _, low_res, iou = model.ground_phrases(features, rows, phrase, presence, embedding, hidden_state[None].to(phrase.dtype))
            full = self.processor.transform.postprocess_logits(low_res.float(), ctx.original_size)  # (1, 1, H, W)
            mask = (full[0, 0] > 0).cpu().numpy()
            score = float(iou[0])
        state.masks.append((mask, score))
        state.name_scores.append(name_score)
        _, parsed = parse_grounded_text(self.processor.decode(state.generated))
        index = next(i for i, span in enumerate(parsed) if span.seg_index == seg_index)
        return MaskReady(index, parsed[index].phrase, mask, mask_to_box(mask), score, name_score)

    @staticmethod
    def _seg_source(state: _StreamState, seg_index: int, presence: float) -> tuple[int | None, float | None]:
        """Which prompted object the ``seg_index``-th ``<SEG>`` shows (None: located) and how sure its name is."""
        located = 1.0 / (1.0 + float(np.exp(-presence)))
        prompted = state.evidence.prompted if state.evidence is not None else []
        if state.plan is not None:
            if seg_index < len(state.plan.segs):
                planned = state.plan.segs[seg_index]
                return planned.prompt_index, planned.name_score if planned.prompt_index is not None else located
            return None, located
        if state.prompted is not None and seg_index < len(state.prompted.masks):
            return seg_index, prompted[seg_index].name_score if seg_index < len(prompted) else None
        return None, located

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
