"""MimoModel: segmentation engine + aligner + grounding LM + locator, one forward for training and inference.

Tensors only (strings, images and prompts are converted by ``mimo_chat.processing``). The image
encoder is frozen and run outside ``forward`` (``encode_images``) so training can cache embeddings.
Masks are in the segmentation engine's low-resolution model frame ``(4E, 4E)`` (256 x 256 for
LiteMedSAM); ``SamTransform`` maps them to the original image.

From ``<SEG>`` to mask (see ``modeling/locator.py``): the phrase that the ``<SEG>`` closes and
the ``<SEG>`` hidden state give a heatmap over the image-embedding grid; its peak logit says
whether the structure is shown, its extent gives a box, and the box is an ordinary box prompt
of the SAM mask decoder (LiteMedSAM's best prompt). The language model sees what the locator
found: the ``<SEG>`` token's input embedding gets ``presence_feedback(p)``, p = the phrase's
presence probability, so the words after a ``<SEG>`` ("yes, it is on this slice" / "no, ...")
can follow the image. With a user box or clicks, the aligner also gets ``region evidence``:
the locator's scores of every vocabulary name inside the prompted region, as a softmax-weighted
mix of those names' token embeddings, added to the last image token.

The hidden state that belongs to a ``<SEG>`` (as LISA) is the last-layer state of the position that
*predicted* it: ``hidden[t - 1]`` for ``input_ids[t] == <SEG>`` in the teacher-forced ``forward``, and
the state the decode loop already holds when it picks ``<SEG>`` (so a streamed mask needs no extra
LM step). :meth:`MimoModel.phrase_presence` and :meth:`MimoModel.ground_phrases` are the one path
from a ``<SEG>`` to its mask, used by ``forward`` (training) and by the predictor (inference).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from mimo_chat.modeling.aligner import MultimodalAligner
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import (
    IMAGE_TOKEN,
    PHRASE_END,
    PHRASE_START,
    SEG_TOKEN,
    GroundingLanguageModel,
    build_language_model,
    load_tokenizer,
)
from mimo_chat.modeling.locator import (
    PRESENCE_THRESHOLD,
    StructureLocator,
    heatmap_box,
    heatmap_fit,
    locator_loss,
    phrase_embeddings,
    phrase_spans,
    presence_logits,
    target_fractions,
)
from mimo_chat.modeling.sam import (
    LiteMedSam,
    SamConfig,
    build_mask_decoder,
    build_sam,
    load_decoder_weights,
    load_lite_medsam_weights,
    load_prompt_weights,
)

# checkpoints/ of the repository: where ``config.sam_checkpoint`` (the engine's prompt weights) and
# ``config.grounding_checkpoint`` live
REPOSITORY_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MimoOutput:
    """Output of :meth:`MimoModel.forward`. N = number of ``<SEG>`` tokens in the batch."""

    loss: torch.Tensor | None  # weighted sum of the losses below that could be computed
    lm_loss: torch.Tensor | None
    heatmap_loss: torch.Tensor | None  # locator: per-cell BCE + soft Dice (+ presence, below)
    presence_loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V)
    hidden_states: torch.Tensor  # (B, L, H) last layer
    seg_hidden_states: torch.Tensor  # (N, H)
    seg_index: torch.Tensor  # (N, 2) (batch, position that predicted <SEG>)
    heatmaps: torch.Tensor  # (N, E, E) locator logits
    presence: torch.Tensor  # (N,) presence logits of the phrases (what the LM was told)
    low_res_masks: torch.Tensor | None  # (N, 1, 4E, 4E) logits in the model frame
    iou_scores: torch.Tensor | None  # (N,) decoder-predicted IoU


class MimoModel(nn.Module):
    """The MIMO model. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(
        self,
        *,
        config: MimoConfig,
        sam: LiteMedSam,
        language_model: GroundingLanguageModel,
        aligner: MultimodalAligner,
        locator: StructureLocator,
        token_ids: dict[str, int],
        vocabulary_ids: list[list[int]] | None = None,
        grounding_decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.sam = sam
        # decodes the locator's boxes (by-name masks); None: the engine's decoder does
        self.grounding_decoder = grounding_decoder
        self.language_model = language_model
        self.aligner = aligner
        self.locator = locator
        hidden = language_model.hidden_size
        self.presence_feedback = nn.Linear(1, hidden)
        nn.init.zeros_(self.presence_feedback.weight)
        nn.init.zeros_(self.presence_feedback.bias)
        self.evidence_scale = nn.Parameter(torch.ones(()))
        self.vocabulary_ids = [list(ids) for ids in vocabulary_ids or []]  # token ids of the locator's names
        self.token_ids = dict(token_ids)
        for parameter in self.sam.parameters():
            parameter.requires_grad_(False)
        for parameter in grounding_decoder.parameters() if grounding_decoder is not None else ():
            parameter.requires_grad_(False)
        # what we train, fixed at construction (a training stage may freeze some of it for a while)
        self.trained_parameter_names = tuple(name for name, p in self.named_parameters() if p.requires_grad)

    @property
    def seg_token_id(self) -> int:
        return self.token_ids[SEG_TOKEN]

    @property
    def image_token_id(self) -> int:
        return self.token_ids[IMAGE_TOKEN]

    @property
    def device(self) -> torch.device:
        return self.aligner.queries.device

    # ----- building and weights -------------------------------------------------------------

    @classmethod
    def build(cls, config: MimoConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> MimoModel:
        """Assemble the model only (as ``build_sam``): the engine is randomly initialised, the LM comes
        with its base weights (``build_language_model``), new modules are seeded by ``config.seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            sam = build_sam(SamConfig.preset(config.sam))
            language_model, tokenizer = build_language_model(config, tokenizer)
            aligner = MultimodalAligner(
                num_queries=config.num_queries,
                width=config.aligner_width,
                depth=config.aligner_depth,
                heads=config.aligner_heads,
                image_channels=sam.config.embed_dim,
                prompt_channels=sam.config.embed_dim,
                text_hidden=language_model.hidden_size,
                lm_hidden=language_model.hidden_size,
                grid=config.image_token_grid,
            )
            locator = StructureLocator(
                image_channels=sam.config.embed_dim, text_hidden=language_model.hidden_size, width=config.locator_width,
                num_image_kinds=len(config.image_kinds),
            )
            grounding_decoder = build_mask_decoder(sam.config) if config.grounding_checkpoint else None
        names = (PHRASE_START, PHRASE_END, SEG_TOKEN, IMAGE_TOKEN)
        token_ids = dict(zip(names, tokenizer.convert_tokens_to_ids(list(names)), strict=True))
        vocabulary_ids = [tokenizer(name, add_special_tokens=False).input_ids for name in config.locator_vocabulary]
        return cls(
            config=config, sam=sam, language_model=language_model, aligner=aligner, locator=locator,
            token_ids=token_ids, vocabulary_ids=vocabulary_ids, grounding_decoder=grounding_decoder,
        )

    def load_engine_weights(self, checkpoints: Path = REPOSITORY_CHECKPOINTS) -> MimoModel:
        """The trailing load step of the frozen engine: LiteMedSAM from its registry package, then our
        prompt-encoder / mask-decoder weights ``checkpoints / config.sam_checkpoint`` when present,
        then the grounding decoder ``checkpoints / config.grounding_checkpoint`` (required when named)."""
        if self.config.sam == "lite":
            load_lite_medsam_weights(self.sam)
        folder = checkpoints / self.config.sam_checkpoint if self.config.sam_checkpoint else None
        if folder is not None and (folder / WEIGHTS_NAME).is_file():
            load_prompt_weights(self.sam, folder)
        if self.grounding_decoder is not None:
            folder = checkpoints / self.config.grounding_checkpoint
            if not (folder / WEIGHTS_NAME).is_file():
                raise FileNotFoundError(f"the config names the grounding decoder {folder}, which has no {WEIGHTS_NAME}")
            load_decoder_weights(self.grounding_decoder, self.sam.config, folder)
        return self

    @classmethod
    def from_config(cls, config: MimoConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> MimoModel:
        """:meth:`build`, then :meth:`load_engine_weights` (the untrained MIMO model on the real engine)."""
        return cls.build(config, tokenizer).load_engine_weights()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the parameters we train: aligner, locator, feedback, LoRA, new-token rows (even if frozen now)."""
        parameters = dict(self.named_parameters())
        return {name: parameters[name].detach().cpu().contiguous() for name in self.trained_parameter_names}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (trained parameters only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_file(self.trainable_state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> MimoModel:
        """Rebuild from a folder (or a hub repo id) written by :meth:`save_pretrained`: build, then load
        the engine's weights, then the trained ones."""
        directory = resolve_pretrained_dir(name_or_path)
        model = cls.build(MimoConfig.load(directory / CONFIG_NAME), tokenizer).load_engine_weights()
        model.load_trained_weights(directory / WEIGHTS_NAME)
        return model

    def load_trained_weights(self, path: str | Path) -> None:
        """Load a ``model.safetensors`` whose keys must be exactly the trainable parameters."""
        state = load_file(str(path))
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = True) -> str:
        """Upload ``config.json`` + ``model.safetensors`` to a Hugging Face model repo (needs an account)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
        return repo_id

    # ----- computation ----------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, C, E, E) frozen image embeddings."""
        return self.sam.encode_image(images)

    def embed_visual_prompts(
        self, points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sparse SAM prompt embeddings of ONE sample's prompts -> (1, P, C); P = 0 without prompts.

        Args:
            points: ``(coords (1, K, 2), labels (1, K))`` in the model frame, one object of K clicks.
            boxes: (N, 4) XYXY in the model frame; each box adds its two corner tokens.
        """
        channels = self.sam.config.embed_dim
        parts = [torch.zeros(1, 0, channels, device=self.device)]
        if points is not None:
            parts.append(self.sam.embed_prompts(points=points)[0])  # (1, K + 1, C) incl. SAM's pad point
        if boxes is not None:
            parts.append(self.sam.embed_prompts(boxes=boxes)[0].reshape(1, -1, channels))  # (1, 2N, C)
        return torch.cat(parts, dim=1)

    def phrase_embeddings(self, phrases: list[list[int]]) -> torch.Tensor:
        """(N, H) mean input embedding of each phrase's token ids (zeros for an empty phrase)."""
        return phrase_embeddings(self.language_model.embed, phrases, self.language_model.hidden_size, self.device)

    def seg_phrases(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """Every ``<SEG>`` of (B, L) ids in row-major order: (N, 2) (row, position) and its phrase ids."""
        index, phrases = [], []
        for row, ids in enumerate(input_ids.tolist()):
            for position, phrase in phrase_spans(
                ids, self.token_ids[PHRASE_START], self.token_ids[PHRASE_END], self.seg_token_id
            ):
                index.append((row, position))
                phrases.append(phrase)
        return torch.tensor(index, dtype=torch.long, device=self.device).reshape(-1, 2), phrases

    def feedback(self, presence: torch.Tensor) -> torch.Tensor:
        """(N,) presence logits -> (N, H) additions to the ``<SEG>`` input embeddings."""
        return self.presence_feedback(presence.detach().sigmoid().unsqueeze(-1).to(self.presence_feedback.weight.dtype))

    def region_evidence(self, features: torch.Tensor, region_cells: torch.Tensor) -> torch.Tensor:
        """(B, H): the vocabulary names the locator finds inside each row's prompted cells (B, E, E)
        as a softmax-weighted mix of the names' embeddings; zero for rows without a region."""
        batch = features.shape[0]
        hidden = self.language_model.hidden_size
        if not self.vocabulary_ids or not bool(region_cells.any()):
            return features.new_zeros(batch, hidden)
        names = self.phrase_embeddings(self.vocabulary_ids)  # (V, H)
        count = len(self.vocabulary_ids)
        rows = torch.arange(batch, device=features.device).repeat_interleave(count)
        heatmaps = self.locator(features, rows, names.repeat(batch, 1)).reshape(batch, count, -1)  # (B, V, E*E)
        cells = region_cells.flatten(1).to(heatmaps.dtype)  # (B, E*E)
        inside = (heatmaps * cells[:, None]).sum(-1) / cells.sum(-1, keepdim=True).clamp(min=1)  # (B, V)
        weights = inside.softmax(dim=-1)
        has_region = (cells.sum(-1, keepdim=True) > 0).to(weights.dtype)
        return (weights @ names) * has_region

    def region_name_scores(self, features: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """How well each vocabulary name fits each of N regions of one image (e.g. the engine's masks
        of a user's boxes): soft Dice (the locator's own training objective) between the region and
        the name's heatmap. ``features``: (1, W, E, E); ``fractions``: (N, E, E) share of each cell
        the region covers. Returns (N, V) in [0, 1] (V = 0 without a vocabulary)."""
        count, names = fractions.shape[0], len(self.vocabulary_ids)
        if not names or not count:
            return fractions.new_zeros(count, names)
        embeddings = self.phrase_embeddings(self.vocabulary_ids)  # (V, H)
        rows = torch.zeros(names, dtype=torch.long, device=features.device)
        return heatmap_fit(self.locator(features, rows, embeddings).sigmoid(), fractions)

    def name_regions(self, features: torch.Tensor, fractions: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """The best vocabulary name of each region (see :meth:`region_name_scores`): its index in
        ``vocabulary_ids`` and that Dice (N,) per region (empty without a vocabulary)."""
        scores = self.region_name_scores(features, fractions)
        if not scores.shape[1]:
            return [], scores.new_zeros(scores.shape[0])
        best, index = scores.max(dim=1)
        return index.tolist(), best

    # ----- from a <SEG> to its mask: the one path of training and inference -------------------

    def phrase_presence(self, features: torch.Tensor, rows: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        """(N,) presence logits of N phrase embeddings (N, H) on rows ``rows`` (N,) of ``features``,
        from the phrase alone: what the LM is told at each ``<SEG>`` and what decides "absent"."""
        return presence_logits(self.locator(features, rows, phrases))

    def ground_phrases(
        self,
        features: torch.Tensor,
        rows: torch.Tensor,
        phrases: torch.Tensor,
        presence: torch.Tensor,
        image_embeddings: torch.Tensor,
        seg_hidden: torch.Tensor | None = None,
        decode: bool = True,
        grounding: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Heatmaps (N, E, E) of N phrases (with their ``<SEG>`` hidden states (N, H) when given) and,
        with ``decode``, their masks through :meth:`decode_masks` (``grounding`` False: the engine's
        decoder instead of the grounding decoder): low-res logits (N, 1, 4E, 4E), IoU (N,)."""
        heatmaps = self.locator(features, rows, phrases, seg_hidden)
        if not decode:
            return heatmaps, None, None
        low_res, iou = self.decode_masks(heatmaps, presence, rows, image_embeddings, grounding)
        return heatmaps, low_res, iou

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        region_cells: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids with ``num_queries`` ``<image>`` placeholders per row -> (B, L, H) LM input embeddings.

        ``features``: the locator's image features (computed here when needed and not given);
        ``region_cells``: (B, E, E) cells of each row's box / clicks, for the region evidence."""
        is_image = input_ids == self.image_token_id  # (B, L)
        counts = is_image.sum(dim=1)
        expected = self.aligner.num_queries
        if bool((counts != expected).any()):
            raise ValueError(
                f"Each sequence needs exactly {expected} {IMAGE_TOKEN} placeholder tokens (num_queries); "
                f"got {counts.tolist()}."
            )
        embeddings = self.language_model.embed(input_ids)  # (B, L, H)
        question_embeddings = self.language_model.embed(question_ids)  # (B, T, H)
        image_features = self.aligner(
            image_embeddings, question_embeddings, question_mask, prompt_embeddings, prompt_mask
        )  # (B, Q, H)
        if region_cells is not None and self.vocabulary_ids and bool(region_cells.any()):
            if features is None:
                features = self.locator.image_features(image_embeddings)
            evidence = self.region_evidence(features, region_cells)  # (B, H)
            image_features = torch.cat(
                [image_features[:, :-1], image_features[:, -1:] + self.evidence_scale * evidence[:, None]], dim=1
            )
        return embeddings.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeddings.dtype))

    def decode_masks(
        self, heatmaps: torch.Tensor, presence: torch.Tensor, batch_index: torch.Tensor, image_embeddings: torch.Tensor,
        grounding: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of N located phrases: heatmaps (N, E, E), presence logits (N,) of rows ``batch_index``.

        A phrase whose presence logit is not above ``PRESENCE_THRESHOLD`` gets an empty mask and
        score 0; the others get the box around their heatmap as a box prompt of the grounding
        decoder (trained on boxes as the heatmaps give them; the engine's decoder when the config
        has none, or with ``grounding`` False), one batched call per image. Returns low-res logits
        (N, 1, 4E, 4E) and IoU (N,)."""
        size = self.sam.config.low_res_size
        count = heatmaps.shape[0]
        logits = heatmaps.new_full((count, 1, size, size), -20.0)
        scores = heatmaps.new_zeros(count)
        cell = self.sam.config.image_size / heatmaps.shape[-1] if count else 1.0
        boxes = [
            heatmap_box(heatmaps[n].detach().float().cpu().numpy(), cell) if float(presence[n].detach()) > PRESENCE_THRESHOLD
            else None
            for n in range(count)
        ]
        for row in batch_index.unique(sorted=True).tolist():
            chosen = [n for n in range(count) if int(batch_index[n]) == row and boxes[n] is not None]
            if not chosen:
                continue
            box_tensor = torch.tensor([boxes[n] for n in chosen], dtype=torch.float32, device=self.device)
            sparse, dense = self.sam.embed_prompts(boxes=box_tensor)
            row_logits, row_iou = self.sam.decode(image_embeddings[row : row + 1], sparse, dense,
                                                  decoder=self.grounding_decoder if grounding else None)
            logits[chosen] = row_logits.to(logits.dtype)
            scores[chosen] = row_iou[:, 0].to(scores.dtype)
        return logits, scores

    def forward(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor,
        question_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        region_cells: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_masks: torch.Tensor | None = None,
        target_known: torch.Tensor | None = None,
        decode_masks: bool = True,
    ) -> MimoOutput:
        """Teacher-forced pass: LM loss on ``labels`` (B, L; -100 = ignore) and locator losses on
        ``target_masks`` (N, 4E, 4E) in {0, 1}, one per ``<SEG>`` in row-major order (all zero =
        absent); ``target_known`` (N,) False marks present structures without a mask."""
        features = self.locator.image_features(image_embeddings)
        inputs_embeds = self.embed_inputs(
            input_ids, image_embeddings, question_ids, question_mask, prompt_embeddings, prompt_mask,
            features=features, region_cells=region_cells,
        )
        seg_index, phrases = self.seg_phrases(input_ids)  # (N, 2) positions of the <SEG> tokens
        rows, positions = seg_index[:, 0], seg_index[:, 1]
        phrase_embeddings = self.phrase_embeddings(phrases)
        presence = self.phrase_presence(features, rows, phrase_embeddings)  # (N,) what the LM is told
        inputs_embeds = inputs_embeds.index_put(
            (rows, positions), self.feedback(presence).to(inputs_embeds.dtype), accumulate=True
        )
        output = self.language_model(inputs_embeds, attention_mask=attention_mask)
        seg_hidden = output.hidden_states[rows, (positions - 1).clamp(min=0)]  # (N, H): states that predicted each <SEG>
        heatmaps, low_res, iou = self.ground_phrases(
            features, rows, phrase_embeddings, presence, image_embeddings, seg_hidden, decode_masks
        )
        lm_loss = heat = presence_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                output.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        if target_masks is not None:
            if target_masks.shape[0] != heatmaps.shape[0]:
                raise ValueError(f"{target_masks.shape[0]} target masks for {heatmaps.shape[0]} {SEG_TOKEN} tokens")
            if heatmaps.shape[0] > 0:
                known = torch.ones(heatmaps.shape[0], dtype=torch.bool, device=heatmaps.device)
                if target_known is not None:
                    known = target_known.to(heatmaps.device).bool()
                targets = target_fractions(target_masks, heatmaps.shape[-1]).to(heatmaps.dtype)
                terms = locator_loss(heatmaps.float(), targets.float(), known)
                heat, presence_loss = terms["loss"], terms.get("presence")
        weighted = [(self.config.lm_loss_weight, lm_loss), (self.config.locator_loss_weight, heat)]
        terms = [weight * value for weight, value in weighted if value is not None]
        return MimoOutput(
            loss=sum(terms) if terms else None,
            lm_loss=lm_loss,
            heatmap_loss=heat,
            presence_loss=presence_loss,
            logits=output.logits,
            hidden_states=output.hidden_states,
            seg_hidden_states=seg_hidden,
            seg_index=seg_index,
            heatmaps=heatmaps,
            presence=presence,
            low_res_masks=low_res,
            iou_scores=iou,
        )


def resolve_pretrained_dir(name_or_path: str | Path) -> Path:
    """A local folder with ``config.json``, or a hub repo id fetched with ``huggingface_hub``."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; expected a folder written by save_pretrained")
        return path
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"No model folder at {text!r} (and it is not a hub repo id 'owner/name')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))


def read_config(directory: str | Path) -> MimoConfig:
    return MimoConfig.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))


__all__ = ["MimoModel", "MimoOutput", "load_tokenizer", "read_config", "resolve_pretrained_dir"]
