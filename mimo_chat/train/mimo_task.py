"""MIMO's training task: cached embeddings, LoRA + aligner + locator, cascaded stages.

:func:`build_trainer` configures :class:`mimo_chat.train.trainer.Trainer` with a :class:`MimoTask`
from a :class:`TrainConfig`. Batches are drawn by a generator seeded with ``(seed, step, micro,
rank)``, so a resumed run draws exactly the batches the interrupted run would have drawn; each
process of ``accelerate launch`` draws its own. Validation: teacher-forced metrics on a fixed,
seeded sample of dev-split records (:mod:`mimo_chat.evaluation.teacher_forced`). The export is
``save_pretrained`` into ``config.export``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from safetensors.torch import load_file

from mimo_chat.data.prepare import default_out
from mimo_chat.evaluation.teacher_forced import evaluate_batch_metrics, summarise
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import NEW_TOKENS
from mimo_chat.modeling.mimo import MimoModel, load_tokenizer
from mimo_chat.processing import MimoProcessor
from mimo_chat.train.config import TrainConfig
from mimo_chat.train.dataset import Batch, ConversationDataset, collate, prompt_embeddings
from mimo_chat.train.embeddings_cache import EmbeddingCache, fill_cache
from mimo_chat.train.trainer import Trainer, TrainingTask, TrainSettings

LOSS_PARTS = ("loss", "lm_loss", "heatmap_loss", "presence_loss")


def mimo_config_of(config: TrainConfig) -> MimoConfig:
    """The preset (or ``init_from``'s saved config), the locator's width and vocabulary from
    ``init_locator``, then ``model_overrides``."""
    if config.init_from:
        values = MimoConfig.load(Path(config.init_from).expanduser() / "config.json").to_dict()
    else:
        values = MimoConfig.preset(config.model).to_dict()
    if config.init_locator:
        path = Path(config.init_locator).expanduser() / "locator.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run python -m mimo_chat.train.locator --out "
                                    f"{config.init_locator} first (init_locator in the training config)")
        meta = json.loads(path.read_text())
        values.update(locator_width=meta["width"], locator_vocabulary=tuple(meta["vocabulary"]))
    values.update(config.model_overrides)
    mimo_config = MimoConfig.from_dict(values)
    markup = [token for token in NEW_TOKENS if token in mimo_config.system_prompt]
    if markup:  # they would become real <SEG>/<image> tokens and break the mask targets
        raise ValueError(f"The system prompt must not contain the special tokens {markup}.")
    return mimo_config


def load_locator(model: MimoModel, path: Path) -> None:
    """Start the locator from ``python -m mimo_chat.train.locator``'s weights (every tensor must match)."""
    state = load_file(str(path))
    expected = {name for name in model.state_dict() if name.startswith("locator.")}
    if set(state) != expected:
        raise ValueError(f"{path} does not match this model's locator: {sorted(set(state) ^ expected)[:5]}")
    model.load_state_dict(state, strict=False)


class MimoTask(TrainingTask):
    """The model, data and sampling of one MIMO run (built from a :class:`TrainConfig`)."""

    name = "training"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        if config.threads:  # first: the thread count is part of the numerics
            torch.set_num_threads(config.threads)
        process = PartialState()
        self.device, self.process_index = process.device, process.process_index
        self.data = Path(config.data).expanduser() if config.data else default_out()
        self.mimo_config = mimo_config_of(config)
        torch.manual_seed(config.seed)
        tokenizer = load_tokenizer(self.mimo_config)
        model = MimoModel.from_config(self.mimo_config, tokenizer)
        if config.init_from:
            model.load_trained_weights(Path(config.init_from).expanduser() / "model.safetensors")
        if config.init_locator:  # with init_from too: that model with this locator
            load_locator(model, Path(config.init_locator).expanduser() / "locator.safetensors")
        self.model = model
        self.processor = MimoProcessor(self.mimo_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.processor.stop_token_ids[0]
        cache = EmbeddingCache(config.embeddings, self.mimo_config)
        low_res = model.sam.config.low_res_size
        if config.encode_missing and process.is_main_process:
            fill_cache(self.data, self.mimo_config, root=config.embeddings, progress=False)
        process.wait_for_everyone()
        self.train_set = ConversationDataset(self.data, "train", self.processor, cache, low_res)
        self.dev_set = ConversationDataset(self.data, "dev", self.processor, cache, low_res)
        if len(self.train_set) == 0:
            raise ValueError(f"No training records with cached embeddings in {self.data}; run the embeddings cache first.")
        self.pools = [np.array([i for i, r in enumerate(self.train_set.records) if stage.selects(r)], dtype=np.int64)
                      for stage in config.stages]
        for stage, pool in zip(config.stages, self.pools):
            if len(pool) == 0:
                raise ValueError(f"Stage {stage.name!r} selects no cached training record.")

    # ----- what the loop asks --------------------------------------------------------------------

    def configure_optimizer(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def learning_rate(self, base: float, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % over all steps; per-stage rates scale it."""
        config = self.config
        _, stage = config.stage_at(step)
        scale = (stage.learning_rate / config.learning_rate) if stage.learning_rate else 1.0
        if step < config.warmup_steps:
            return base * (scale * (step + 1) / config.warmup_steps)
        progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
        return base * (scale * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))))

    def next_batch(self, step: int, micro: int) -> Batch:
        return self.make_batch(self.train_set, self.batch_indices(step, micro))

    def loss(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.forward(model, batch)
        return {name: getattr(output, name) for name in LOSS_PARTS if getattr(output, name) is not None}

    def validate(self, model: torch.nn.Module) -> dict:
        """Teacher-forced metrics on a fixed, seeded sample of dev-split records."""
        if len(self.dev_set) == 0:
            return {}
        rng = np.random.default_rng(self.config.seed)
        count = min(self.config.eval_samples, len(self.dev_set))
        indices = sorted(rng.choice(len(self.dev_set), size=count, replace=False).tolist())
        rows = []
        for start in range(0, len(indices), self.config.batch_size):
            batch = self.make_batch(self.dev_set, indices[start : start + self.config.batch_size])
            rows += evaluate_batch_metrics(batch, self.forward(model, batch), self.processor.tokenizer)
        return summarise(rows)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def load_trainable_state(self, path: Path) -> None:
        self.model.load_trained_weights(path)

    def export(self, step: int, metrics: dict) -> None:
        """``config.json`` + ``model.safetensors`` with only the trained parameters, into ``config.export``."""
        if self.config.export:
            self.model.save_pretrained(self.config.export)

    def describe(self) -> dict:
        return {"train_records": len(self.train_set), "dev_records": len(self.dev_set),
                "skipped_uncached": self.train_set.skipped,
                "pools": {stage.name: len(pool) for stage, pool in zip(self.config.stages, self.pools)}}

    def log_fields(self, step: int) -> dict:
        return {"stage": self.config.stage_at(step)[1].name}

    def config_dict(self) -> dict:
        return self.config.to_dict()

    # ----- sampling and the forward pass ---------------------------------------------------------

    def batch_indices(self, step: int, micro: int = 0) -> list[int]:
        """Training record indices of micro-batch ``micro`` of optimizer step ``step`` on this process."""
        rng = np.random.default_rng([self.config.seed, step, micro, self.process_index])
        index, stage = self.config.stage_at(step)
        pool = self.pools[index]
        earlier = np.unique(np.concatenate(self.pools[:index])) if index > 0 else np.zeros(0, dtype=np.int64)
        chosen = []
        for _ in range(self.config.batch_size):
            source = earlier if len(earlier) and rng.random() < stage.replay else pool
            chosen.append(int(source[rng.integers(len(source))]))
        return chosen

    def make_batch(self, dataset: ConversationDataset, indices: list[int]) -> Batch:
        return collate([dataset.example(i) for i in indices], self.pad_id).to(self.device)

    def forward(self, model: torch.nn.Module, batch: Batch):
        """``model`` is ``self.model`` or its data-parallel wrapper."""
        prompts, prompt_mask = prompt_embeddings(self.model, batch.prompts)
        return model(
            input_ids=batch.input_ids, image_embeddings=batch.image_embeddings, question_ids=batch.question_ids,
            attention_mask=batch.attention_mask, question_mask=batch.question_mask, prompt_embeddings=prompts,
            prompt_mask=prompt_mask, region_cells=batch.region_cells, labels=batch.labels,
            target_masks=batch.target_masks, target_known=batch.target_known,
            decode_masks=not self.model.training)  # masks go through a box: not differentiable


def settings_of(config: TrainConfig, progress: bool = True) -> TrainSettings:
    return TrainSettings(
        output=config.output, total_steps=config.total_steps, max_minutes=config.max_minutes,
        max_grad_norm=config.max_grad_norm, gradient_accumulation=config.gradient_accumulation,
        log_every=config.log_every, eval_every=config.eval_every, checkpoint_minutes=config.checkpoint_minutes,
        progress=progress)


def build_trainer(config: TrainConfig, progress: bool = True) -> Trainer:
    """The loop configured for MIMO."""
    return Trainer(MimoTask(config), settings_of(config, progress))
