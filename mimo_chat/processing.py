"""MimoProcessor: the only place where strings, images and pixel prompts become tensors (and back).

* Images: (H, W) or (H, W, 3) arrays -> the (3, S, S) model frame via ``SamTransform``.
* Prompts: chat-template text with history; the first user turn starts with ``num_queries``
  ``<image>`` placeholders. The question alone is tokenized again for the aligner.
* Visual prompts: boxes ``[[x0, y0, x1, y1], ...]`` and points ``[[x, y], ...]`` with labels
  (1 foreground, 0 background) in original pixels -> model-frame tensors.
* Training conversations: ids plus labels that supervise only the assistant replies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mimo_chat.limits import MAX_PROMPT_TOKENS, check_prompts, check_question, check_token_counts
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import IMAGE_TOKEN, NEW_TOKENS, SEG_TOKEN, load_tokenizer
from mimo_chat.modeling.transforms import SamTransform

IGNORE_INDEX = -100


@dataclass
class VisualPrompts:
    """User prompts of one image in the model frame (see ``SamTransform``)."""

    points: tuple[torch.Tensor, torch.Tensor] | None  # ((1, K, 2) float, (1, K) long)
    boxes: torch.Tensor | None  # (N, 4) XYXY

    @property
    def empty(self) -> bool:
        return self.points is None and self.boxes is None


@dataclass
class MimoInputs:
    """Tensors for one question about one image."""

    input_ids: torch.Tensor  # (1, L) chat prompt ending with the assistant header
    question_ids: torch.Tensor  # (1, T) the question alone, for the aligner
    prompts: VisualPrompts
    labels: torch.Tensor | None = None  # (1, L) for training examples, IGNORE_INDEX outside replies


def strip_model_tags(text: str) -> str:
    """Remove ``<p>``, ``</p>``, ``<SEG>`` and ``<image>`` from user text (they are model tokens)."""
    for tag in NEW_TOKENS:
        text = text.replace(tag, " ")
    return " ".join(text.split(" ")).strip() if text.strip() else text.strip()


class MimoProcessor:
    """Strings/images/prompts <-> tensors for :class:`~mimo_chat.modeling.mimo.MimoModel`."""

    def __init__(self, config: MimoConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.transform = SamTransform(config.image_size)
        ends = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.stop_token_ids = sorted({i for i in ends if isinstance(i, int) and i != tokenizer.unk_token_id})
        # a grounded presence answer, "<p>x</p><SEG>: yes, ...": the "<SEG>:" slot and the yes / no ids in it
        yes_slot, no_slot = self._ids(f"{SEG_TOKEN}: yes"), self._ids(f"{SEG_TOKEN}: no")
        self.verdict_slot: list[int] = yes_slot[:-1]
        self.verdict_ids: tuple[int, int] = (yes_slot[-1], no_slot[-1])

    @classmethod
    def from_config(cls, config: MimoConfig) -> MimoProcessor:
        return cls(config, load_tokenizer(config))

    # ----- images and visual prompts --------------------------------------------------------

    def preprocess_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) array -> (1, 3, S, S) float in [0, 1]."""
        return self.transform.apply_image(image)[None]

    def visual_prompts(
        self,
        original_size: tuple[int, int],
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
    ) -> VisualPrompts:
        """Pixel prompts of one image -> model frame.

        Values are checked by :func:`mimo_chat.limits.check_prompts` (the rules the segmentation engine
        and the app use too): a ``PromptError`` (a ValueError) names the faulty box or point; a box partly
        outside the image is clipped to it.
        """
        boxes = None if boxes is None or len(boxes) == 0 else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        points = None if points is None or len(points) == 0 else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = None if points is None else (
            np.ones(len(points), dtype=np.int64) if point_labels is None else np.asarray(point_labels).reshape(-1))
        check_prompts(original_size, boxes, points, None if labels is None else labels.tolist())
        model_boxes = None
        if boxes is not None:
            height, width = original_size
            array = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
            model_boxes = torch.from_numpy(self.transform.apply_boxes(array, original_size)).float()  # (N, 4)
        model_points = None
        if points is not None:
            array = points.astype(np.float32)
            coords = torch.from_numpy(self.transform.apply_points(array, original_size)).float()[None]  # (1, K, 2)
            model_points = (coords, torch.from_numpy(labels.astype(np.int64))[None])  # (1, K)
        return VisualPrompts(points=model_points, boxes=model_boxes)

    def mask_target(self, mask: np.ndarray, low_res_size: int) -> torch.Tensor:
        """(H, W) binary mask -> (low_res_size, low_res_size) float target in the decoder frame."""
        return (self.transform.apply_mask(np.asarray(mask).astype(np.float32), size=low_res_size) > 0.5).float()

    # ----- text -----------------------------------------------------------------------------

    def _messages(self, question: str, history: list[tuple[str, str]] | None) -> list[dict[str, str]]:
        """System message, the history turns and the new question; the image opens the first user turn.

        Users' questions are plain text: any grounding or image tag typed in them is removed."""
        question = strip_model_tags(question)
        history = [(strip_model_tags(asked), answered) for asked, answered in history or []]
        placeholders = IMAGE_TOKEN * self.config.num_queries
        messages = [{"role": "system", "content": self.config.system_prompt}]
        for index, (asked, answered) in enumerate(history or []):
            content = f"{placeholders}\n{asked}" if index == 0 else asked
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answered}]
        content = f"{placeholders}\n{question}" if not history else question
        return messages + [{"role": "user", "content": content}]

    def prompt_text(self, question: str, history: list[tuple[str, str]] | None = None) -> str:
        """The chat-template prompt, ending with the assistant header."""
        return self.tokenizer.apply_chat_template(
            self._messages(question, history), tokenize=False, add_generation_prompt=True
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_length(self) -> int:
        """Tokens the language model can attend to (the tokenizer's ``model_max_length`` when it is set)."""
        length = getattr(self.tokenizer, "model_max_length", None)
        return int(length) if isinstance(length, int) and 0 < length < 1_000_000 else MAX_PROMPT_TOKENS * 4

    def check_question(self, question: str) -> None:
        """``InputError`` when the question is over the character or token limit (see ``mimo_chat.limits``)."""
        question = check_question(question)
        tokens = len(self._ids(strip_model_tags(question)))
        check_token_counts(tokens, 0, self.config.max_new_tokens, self.context_length())

    def question_ids(self, question: str) -> torch.Tensor:
        """(1, T) ids of the question alone (at most ``max_question_tokens``; at least one token)."""
        ids = self._ids(strip_model_tags(question))[: self.config.max_question_tokens] or [self.stop_token_ids[0]]
        return torch.tensor([ids], dtype=torch.long)

    def encode(
        self,
        question: str,
        original_size: tuple[int, int],
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        history: list[tuple[str, str]] | None = None,
    ) -> MimoInputs:
        """One question (with its history and visual prompts) -> generation inputs.

        The limits of ``mimo_chat.limits`` are checked before anything is tokenized for the model: the
        question's length, and the whole prompt plus ``max_new_tokens`` within the context
        (``InputError`` with a readable message otherwise)."""
        self.check_question(question)
        ids = self._ids(self.prompt_text(question, history))
        check_token_counts(0, len(ids), self.config.max_new_tokens, self.context_length())
        input_ids = torch.tensor([ids], dtype=torch.long)
        return MimoInputs(
            input_ids=input_ids,
            question_ids=self.question_ids(question),
            prompts=self.visual_prompts(original_size, boxes, points, point_labels),
        )

    def encode_conversation(
        self,
        turns: list[tuple[str, str]],
        original_size: tuple[int, int],
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
    ) -> MimoInputs:
        """Training example: ``turns`` of (question, raw answer); labels supervise every answer and
        its end-of-turn token. The aligner reads the LAST question."""
        ids: list[int] = []
        labels: list[int] = []
        for index in range(len(turns)):
            question, answer = turns[index]
            prefix = self._ids(self.prompt_text(question, turns[:index]))
            full = self._ids(
                self.tokenizer.apply_chat_template(
                    self._messages(question, turns[:index]) + [{"role": "assistant", "content": answer}],
                    tokenize=False,
                )
            )
            if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                raise ValueError("the chat template does not tokenize turn by turn; cannot mask the prompt")
            labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + full[len(prefix) :]
            ids = full
        last_question = turns[-1][0]
        return MimoInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            question_ids=self.question_ids(last_question),
            prompts=self.visual_prompts(original_size, boxes, points, point_labels),
            labels=torch.tensor([labels], dtype=torch.long),
        )

    def reply_prefix_ids(self, prefix: str) -> list[int]:
        """Ids of a forced start of the assistant reply (grounding tags become their tokens)."""
        return self._ids(prefix)

    def decode(self, token_ids: list[int]) -> str:
        """Generated ids -> raw reply text (grounding tags kept, stop tokens dropped)."""
        kept = [i for i in token_ids if i not in self.stop_token_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=False)


def collate(examples: list[MimoInputs], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of single examples into a batch for ``MimoModel.forward``.

    Returns ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels`` (B, L) (when every example
    has labels; -100 on padding), ``question_ids`` (B, T) and ``question_mask`` (B, T).
    """

    def pad(rows: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(row.shape[-1] for row in rows)
        batch = torch.full((len(rows), length), value, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            batch[index, : row.shape[-1]] = row.reshape(-1)
            mask[index, : row.shape[-1]] = 1
        return batch, mask

    input_ids, attention_mask = pad([e.input_ids for e in examples], pad_token_id)
    question_ids, question_mask = pad([e.question_ids for e in examples], pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "question_ids": question_ids,
        "question_mask": question_mask,
    }
    if all(e.labels is not None for e in examples):
        batch["labels"] = pad([e.labels for e in examples], IGNORE_INDEX)[0]
    return batch


def pad_prompt_embeddings(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (1, P_i, C) visual-prompt embeddings -> (B, P, C) zero-padded and a (B, P) bool mask."""
    channels = prompts[0].shape[-1]
    length = max(p.shape[1] for p in prompts)
    batch = prompts[0].new_zeros(len(prompts), length, channels)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool, device=prompts[0].device)
    for index, prompt in enumerate(prompts):
        batch[index, : prompt.shape[1]] = prompt[0]
        mask[index, : prompt.shape[1]] = True
    return batch, mask
