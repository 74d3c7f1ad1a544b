"""MimoModel: segmentation engine + aligner + grounding LM + <SEG> head, one forward for training and inference.

Tensors only (strings, images and prompts are converted by ``mimo_chat.processing``). The image
encoder is frozen and run outside ``forward`` (``encode_images``) so training can cache embeddings.
Masks are in the segmentation engine's low-resolution model frame ``(4E, 4E)`` (256 x 256 for
LiteMedSAM); ``SamTransform`` maps them to the original image.
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
from mimo_chat.modeling.sam import LiteMedSam, SamConfig, build_sam, load_lite_medsam_weights
from mimo_chat.modeling.seg_head import SegHead, teacher_forced_seg_hidden_states
from mimo_chat.segmentation import CHECKPOINT_DIR, load_prompt_weights

SEGMENTER_CHECKPOINTS = CHECKPOINT_DIR.parent  # checkpoints/ of the repository

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MimoOutput:
    """Output of :meth:`MimoModel.forward`. N = number of ``<SEG>`` tokens in the batch."""

    loss: torch.Tensor | None  # weighted sum of the losses below that could be computed
    lm_loss: torch.Tensor | None
    mask_bce_loss: torch.Tensor | None
    mask_dice_loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V)
    hidden_states: torch.Tensor  # (B, L, H) last layer
    seg_hidden_states: torch.Tensor  # (N, H)
    seg_index: torch.Tensor  # (N, 2) (batch, position that predicted <SEG>)
    low_res_masks: torch.Tensor | None  # (N, 1, 4E, 4E) logits in the model frame
    iou_scores: torch.Tensor | None  # (N,) decoder-predicted IoU


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean soft Dice loss over N masks; logits and targets (N, S, S)."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = (probabilities * targets).sum(1)
    return (1 - (2 * overlap + eps) / (probabilities.sum(1) + targets.sum(1) + eps)).mean()


class MimoModel(nn.Module):
    """The MIMO model. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(
        self,
        *,
        config: MimoConfig,
        sam: LiteMedSam,
        language_model: GroundingLanguageModel,
        aligner: MultimodalAligner,
        seg_head: SegHead,
        token_ids: dict[str, int],
    ) -> None:
        super().__init__()
        self.config = config
        self.sam = sam
        self.language_model = language_model
        self.aligner = aligner
        self.seg_head = seg_head
        self.token_ids = dict(token_ids)
        for parameter in self.sam.parameters():
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
    def from_config(cls, config: MimoConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> MimoModel:
        """Assemble the model; base weights come from the registry packages, new modules are seeded."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            sam = build_sam(SamConfig.lite() if config.sam == "lite" else SamConfig.tiny())
            if config.sam == "lite":
                load_lite_medsam_weights(sam)
            segmenter_weights = SEGMENTER_CHECKPOINTS / config.sam_checkpoint if config.sam_checkpoint else None
            if segmenter_weights is not None and (segmenter_weights / WEIGHTS_NAME).is_file():
                load_prompt_weights(sam, segmenter_weights)
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
            seg_head = SegHead(
                hidden_size=language_model.hidden_size,
                hidden_dim=config.seg_head_hidden,
                prompt_dim=sam.config.embed_dim,
                num_tokens=config.seg_prompt_tokens,
            )
        names = (PHRASE_START, PHRASE_END, SEG_TOKEN, IMAGE_TOKEN)
        token_ids = dict(zip(names, tokenizer.convert_tokens_to_ids(list(names)), strict=True))
        return cls(
            config=config, sam=sam, language_model=language_model, aligner=aligner, seg_head=seg_head, token_ids=token_ids
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the parameters we train: aligner, seg head, LoRA, new-token rows (even if frozen now)."""
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
        """Rebuild from a folder (or a hub repo id) written by :meth:`save_pretrained`."""
        directory = resolve_pretrained_dir(name_or_path)
        model = cls.from_config(MimoConfig.load(directory / CONFIG_NAME), tokenizer)
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

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids with ``num_queries`` ``<image>`` placeholders per row -> (B, L, H) LM input embeddings."""
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
        return embeddings.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeddings.dtype))

    def decode_masks(
        self,
        seg_hidden_states: torch.Tensor,
        batch_index: torch.Tensor,
        image_embeddings: torch.Tensor,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N ``<SEG>`` hidden states (N, H) of batch rows ``batch_index`` (N,).

        Each ``<SEG>`` gives K prompt tokens, concatenated with that row's user prompt tokens; the
        dense prompt is the no-mask embedding. Returns low-res logits (N, 1, 4E, 4E) and IoU (N,).
        """
        seg_tokens = self.seg_head(seg_hidden_states)  # (N, K, C)
        _, dense = self.sam.embed_prompts()  # (1, C, E, E) no-mask embedding
        logits, scores = [], []
        for row in batch_index.unique(sorted=True).tolist():
            selected = (batch_index == row).nonzero().squeeze(1)
            sparse = seg_tokens[selected]  # (n, K, C)
            if prompt_embeddings is not None and prompt_embeddings.shape[1] > 0:
                user = prompt_embeddings[row]  # (P, C)
                if prompt_mask is not None:
                    user = user[prompt_mask[row].bool()]
                sparse = torch.cat([sparse, user.unsqueeze(0).expand(len(selected), -1, -1)], dim=1)
            row_logits, row_iou = self.sam.decode(
                image_embeddings[row : row + 1], sparse, dense.expand(len(selected), -1, -1, -1)
            )
            logits.append(row_logits)
            scores.append(row_iou[:, 0])
        if not logits:
            size = self.sam.config.low_res_size
            return seg_hidden_states.new_zeros(0, 1, size, size), seg_hidden_states.new_zeros(0)
        return torch.cat(logits), torch.cat(scores)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor,
        question_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_masks: torch.Tensor | None = None,
        decode_masks: bool = True,
    ) -> MimoOutput:
        """Teacher-forced pass: LM loss on ``labels`` (B, L; -100 = ignore) and BCE + Dice on
        ``target_masks`` (N, 4E, 4E) in {0, 1}, one per ``<SEG>`` in row-major order."""
        inputs_embeds = self.embed_inputs(
            input_ids, image_embeddings, question_ids, question_mask, prompt_embeddings, prompt_mask
        )
        output = self.language_model(inputs_embeds, attention_mask=attention_mask)
        seg_hidden, seg_index = teacher_forced_seg_hidden_states(output.hidden_states, input_ids, self.seg_token_id)
        low_res, iou = None, None
        if decode_masks:
            low_res, iou = self.decode_masks(seg_hidden, seg_index[:, 0], image_embeddings, prompt_embeddings, prompt_mask)
        lm_loss = bce = dice = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                output.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        if target_masks is not None and low_res is not None:
            if target_masks.shape[0] != low_res.shape[0]:
                raise ValueError(f"{target_masks.shape[0]} target masks for {low_res.shape[0]} {SEG_TOKEN} tokens")
            if low_res.shape[0] > 0:
                predicted = low_res[:, 0].float()  # (N, S, S)
                targets = target_masks.to(predicted.dtype)
                bce = F.binary_cross_entropy_with_logits(predicted, targets)
                dice = dice_loss(predicted, targets)
        weighted = [
            (self.config.lm_loss_weight, lm_loss),
            (self.config.bce_loss_weight, bce),
            (self.config.dice_loss_weight, dice),
        ]
        terms = [weight * value for weight, value in weighted if value is not None]
        return MimoOutput(
            loss=sum(terms) if terms else None,
            lm_loss=lm_loss,
            mask_bce_loss=bce,
            mask_dice_loss=dice,
            logits=output.logits,
            hidden_states=output.hidden_states,
            seg_hidden_states=seg_hidden,
            seg_index=seg_index,
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


__all__ = ["MimoModel", "MimoOutput", "dice_loss", "load_tokenizer", "read_config", "resolve_pretrained_dir"]
