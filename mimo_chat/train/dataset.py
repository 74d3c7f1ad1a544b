"""Conversation records -> model tensors, with image embeddings read from the cache.

One :class:`Example` per record: token ids and labels from ``MimoProcessor.encode_conversation``
(only assistant replies are supervised), the question ids for the aligner, the visual prompts in
the model frame, one (S, S) target mask per ``<SEG>`` in the decoder's low-resolution frame, and
the cached (C, E, E) image embedding. :func:`collate` pads a list of examples into a :class:`Batch`.

A ``null`` entry in a record's ``masks`` is a ``<SEG>`` without a mask file: a structure the
answer says is absent (target: an empty mask) or, in an ``observe`` record labelled ``yes``, a
structure known to be present only from an image-level label (``target_known`` False: only the
locator's presence is supervised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimo_chat.data.conversations import read_conversations
from mimo_chat.modeling.locator import region_cells
from mimo_chat.processing import MimoInputs, MimoProcessor, VisualPrompts, pad_prompt_embeddings
from mimo_chat.processing import collate as collate_inputs
from mimo_chat.train.embeddings_cache import EmbeddingCache


@dataclass
class Example:
    record: dict
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE_INDEX outside the replies
    question_ids: torch.Tensor  # (T,)
    prompts: VisualPrompts
    target_masks: torch.Tensor  # (N, S, S) float {0, 1}
    target_known: torch.Tensor  # (N,) bool, False = present without a mask
    region_cells: torch.Tensor  # (E, E) cells of the visual prompt (zeros without one)
    embedding: torch.Tensor  # (C, E, E)


@dataclass
class Batch:
    records: list[dict]
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    labels: torch.Tensor  # (B, L)
    question_ids: torch.Tensor  # (B, T)
    question_mask: torch.Tensor  # (B, T) 1 = real token
    prompts: list[VisualPrompts]
    target_masks: torch.Tensor  # (N, S, S), N = all <SEG> of the batch in row-major order
    target_known: torch.Tensor  # (N,) bool
    region_cells: torch.Tensor  # (B, E, E)
    image_embeddings: torch.Tensor  # (B, C, E, E)

    def to(self, device: torch.device) -> Batch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "attention_mask", "labels", "question_ids", "question_mask", "target_masks",
                  "target_known", "region_cells", "image_embeddings")}
        prompts = [VisualPrompts(
            points=None if p.points is None else (p.points[0].to(device), p.points[1].to(device)),
            boxes=None if p.boxes is None else p.boxes.to(device)) for p in self.prompts]
        return Batch(records=self.records, prompts=prompts, **moved)


class ConversationDataset:
    """Records of one split whose image embedding is cached (others are skipped and counted)."""

    def __init__(self, data: str | Path, split: str, processor: MimoProcessor, cache: EmbeddingCache,
                 low_res_size: int, records: list[dict] | None = None) -> None:
        self.root = Path(data)
        self.processor = processor
        self.cache = cache
        self.low_res_size = low_res_size
        path = self.root / f"{split}.jsonl"
        all_records = records if records is not None else (read_conversations(path) if path.exists() else [])
        self.records = [record for record in all_records if record["image_hash"] in cache]
        self.skipped = len(all_records) - len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def _mask(self, relative: str) -> np.ndarray:
        return np.asarray(Image.open(self.root / relative)) > 0

    def example(self, index: int) -> Example:
        record = self.records[index]
        turns = record["turns"]
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        with Image.open(self.root / record["image"]) as image:
            size = (image.height, image.width)
        prompt = record.get("prompt") or {}
        inputs = self.processor.encode_conversation(
            pairs, size, boxes=prompt.get("box") and [prompt["box"]], points=prompt.get("points"),
            point_labels=prompt.get("labels"))
        empty = torch.zeros(self.low_res_size, self.low_res_size)
        masks = [empty if path is None else self.processor.mask_target(self._mask(path), self.low_res_size)
                 for path in record["masks"]]
        known = [path is not None or record.get("label") != "yes" for path in record["masks"]]
        targets = torch.stack(masks) if masks else torch.zeros(0, self.low_res_size, self.low_res_size)
        embedding = self.cache.load(record["image_hash"])
        cells = region_cells(embedding.shape[-1], self.processor.config.image_size, inputs.prompts.boxes,
                             inputs.prompts.points)
        return Example(record=record, input_ids=inputs.input_ids[0], labels=inputs.labels[0],
                       question_ids=inputs.question_ids[0], prompts=inputs.prompts, target_masks=targets,
                       target_known=torch.tensor(known, dtype=torch.bool), region_cells=cells, embedding=embedding)


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    """Right-pad a list of examples into one batch (token padding by ``mimo_chat.processing.collate``)."""
    tensors = collate_inputs(
        [MimoInputs(input_ids=e.input_ids[None], question_ids=e.question_ids[None], prompts=e.prompts,
                    labels=e.labels[None]) for e in examples], pad_token_id)
    return Batch(
        records=[e.record for e in examples], prompts=[e.prompts for e in examples],
        target_masks=torch.cat([e.target_masks for e in examples]),
        target_known=torch.cat([e.target_known for e in examples]),
        region_cells=torch.stack([e.region_cells for e in examples]),
        image_embeddings=torch.stack([e.embedding for e in examples]), **tensors,
    )


def prompt_embeddings(model, prompts: list[VisualPrompts]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, P, C) padded sparse prompt embeddings and (B, P) mask (True = real), or (None, None) without prompts."""
    rows = [model.embed_visual_prompts(points=p.points, boxes=p.boxes) for p in prompts]  # (1, P_i, C)
    if max(row.shape[1] for row in rows) == 0:
        return None, None
    return pad_prompt_embeddings(rows)
