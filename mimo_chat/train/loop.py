"""The training loop: cached embeddings, LoRA + aligner + <SEG> head, cascaded stages, resumable.

Runs on one CPU process or on many GPUs with ``accelerate launch`` (the loop uses
``accelerate.Accelerator``; each process draws its own batches). Batches are drawn by a
generator seeded with ``(seed, step, rank)``, so a resumed run draws exactly the batches the
interrupted run would have drawn; dropout RNG, optimizer and scheduler state are checkpointed
in ``OUTPUT/last/`` every ``checkpoint_minutes`` and at the end. Losses go to ``OUTPUT/log.jsonl``
(one JSON object per step), validation metrics on dev-split patients too (``"event": "eval"``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mimo_chat.data.prepare import default_out
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import NEW_TOKENS
from mimo_chat.modeling.mimo import MimoModel, load_tokenizer
from mimo_chat.processing import MimoProcessor
from mimo_chat.train.config import TrainConfig
from mimo_chat.train.dataset import Batch, ConversationDataset, collate, prompt_embeddings
from mimo_chat.train.embeddings_cache import EmbeddingCache, build_encoder
from mimo_chat.train.evaluation import evaluate_batch_metrics, summarise

LAST = "last"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training wall-clock time over all sessions


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


def encode_missing(dataset_root: Path, records: list[dict], mimo_config: MimoConfig, cache: EmbeddingCache) -> int:
    """Encode images of ``records`` that are not cached (used with small data and the tiny preset)."""
    from PIL import Image

    from mimo_chat.modeling.transforms import SamTransform

    missing = sorted({(r["image_hash"], r["image"]) for r in records if r["image_hash"] not in cache})
    if not missing:
        return 0
    encoder, transform = build_encoder(mimo_config), SamTransform(mimo_config.image_size)
    with torch.inference_mode():
        for key, image in missing:
            pixels = np.asarray(Image.open(dataset_root / image))
            cache.save(key, encoder.encode_image(transform.apply_image(pixels)[None])[0])
    return len(missing)


def load_locator(model: MimoModel, path: Path) -> None:
    """Start the locator from ``python -m mimo_chat.train.locator``'s weights (every tensor must match)."""
    state = load_file(str(path))
    expected = {name for name in model.state_dict() if name.startswith("locator.")}
    if set(state) != expected:
        raise ValueError(f"{path} does not match this model's locator: {sorted(set(state) ^ expected)[:5]}")
    model.load_state_dict(state, strict=False)


class Trainer:
    """Holds the model, data and optimizer of one run (built from a :class:`TrainConfig`)."""

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        if config.threads:
            torch.set_num_threads(config.threads)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)  # a batch may have no <SEG>
        self.accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation, kwargs_handlers=[ddp])
        self.output = Path(config.output)
        self.data = Path(config.data).expanduser() if config.data else default_out()
        self.mimo_config = mimo_config_of(config)
        torch.manual_seed(config.seed)
        tokenizer = load_tokenizer(self.mimo_config)
        model = MimoModel.from_config(self.mimo_config, tokenizer)
        if config.init_from:
            model.load_trained_weights(Path(config.init_from).expanduser() / "model.safetensors")
        if config.init_locator:  # with init_from too: that model with this locator
            load_locator(model, Path(config.init_locator).expanduser() / "locator.safetensors")
        self.processor = MimoProcessor(self.mimo_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.processor.stop_token_ids[0]
        cache = EmbeddingCache(config.embeddings, self.mimo_config)
        low_res = model.sam.config.low_res_size
        if config.encode_missing and self.accelerator.is_main_process:
            from mimo_chat.data.conversations import read_conversations

            for split in ("train", "dev"):
                if (self.data / f"{split}.jsonl").exists():
                    encode_missing(self.data, read_conversations(self.data / f"{split}.jsonl"), self.mimo_config, cache)
        self.accelerator.wait_for_everyone()
        self.train_set = ConversationDataset(self.data, "train", self.processor, cache, low_res)
        self.dev_set = ConversationDataset(self.data, "dev", self.processor, cache, low_res)
        if len(self.train_set) == 0:
            raise ValueError(f"No training records with cached embeddings in {self.data}; run the embeddings cache first.")
        self.pools = [np.array([i for i, r in enumerate(self.train_set.records) if stage.selects(r)], dtype=np.int64)
                      for stage in config.stages]
        for stage, pool in zip(config.stages, self.pools):
            if len(pool) == 0:
                raise ValueError(f"Stage {stage.name!r} selects no cached training record.")
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.state = TrainState()

    # ----- schedule and sampling -------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % over all steps; per-stage rates scale it."""
        _, stage = self.config.stage_at(step)
        scale = (stage.learning_rate / self.config.learning_rate) if stage.learning_rate else 1.0
        if step < self.config.warmup_steps:
            return scale * (step + 1) / self.config.warmup_steps
        progress = (step - self.config.warmup_steps) / max(1, self.config.total_steps - self.config.warmup_steps)
        return scale * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def batch_indices(self, step: int, micro: int = 0) -> list[int]:
        """Training record indices of micro-batch ``micro`` of optimizer step ``step`` on this process."""
        rng = np.random.default_rng([self.config.seed, step, micro, self.accelerator.process_index])
        index, stage = self.config.stage_at(step)
        pool = self.pools[index]
        earlier = np.unique(np.concatenate(self.pools[:index])) if index > 0 else np.zeros(0, dtype=np.int64)
        chosen = []
        for _ in range(self.config.batch_size):
            source = earlier if len(earlier) and rng.random() < stage.replay else pool
            chosen.append(int(source[rng.integers(len(source))]))
        return chosen

    def make_batch(self, dataset: ConversationDataset, indices: list[int]) -> Batch:
        return collate([dataset.example(i) for i in indices], self.pad_id).to(self.accelerator.device)

    # ----- one step and evaluation -----------------------------------------------------------

    def forward(self, batch: Batch):
        unwrapped = self.accelerator.unwrap_model(self.model)
        prompts, prompt_mask = prompt_embeddings(unwrapped, batch.prompts)
        return self.model(
            input_ids=batch.input_ids, image_embeddings=batch.image_embeddings, question_ids=batch.question_ids,
            attention_mask=batch.attention_mask, question_mask=batch.question_mask, prompt_embeddings=prompts,
            prompt_mask=prompt_mask, region_cells=batch.region_cells, labels=batch.labels,
            target_masks=batch.target_masks, target_known=batch.target_known,
            decode_masks=not unwrapped.training)  # masks go through a box: not differentiable

    def train_step(self, step: int) -> dict:
        self.model.train()
        losses = {}
        for micro in range(self.config.gradient_accumulation):
            batch = self.make_batch(self.train_set, self.batch_indices(step, micro))
            with self.accelerator.accumulate(self.model):
                output = self.forward(batch)
                self.accelerator.backward(output.loss)
                if self.accelerator.sync_gradients and self.config.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            for name in ("loss", "lm_loss", "heatmap_loss", "presence_loss"):
                value = getattr(output, name)
                if value is not None:
                    losses.setdefault(name, []).append(float(value.detach()))
        return {name: float(np.mean(values)) for name, values in losses.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Teacher-forced metrics on a fixed, seeded sample of dev-split records."""
        if len(self.dev_set) == 0:
            return {}
        self.model.eval()
        rng = np.random.default_rng(self.config.seed)
        count = min(self.config.eval_samples, len(self.dev_set))
        indices = sorted(rng.choice(len(self.dev_set), size=count, replace=False).tolist())
        rows = []
        for start in range(0, len(indices), self.config.batch_size):
            batch = self.make_batch(self.dev_set, indices[start : start + self.config.batch_size])
            output = self.forward(batch)
            rows += evaluate_batch_metrics(batch, output, self.processor.tokenizer)
        return summarise(rows)

    # ----- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        folder = self.output / LAST
        partial = self.output / f"{LAST}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model)
        save_file(unwrapped.trainable_state_dict(), partial / "trainable.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                    "python_rng": list(random.getstate()[1])}, partial / "optimizer.pt")
        (partial / "state.json").write_text(json.dumps({"step": self.state.step, "seconds": self.state.seconds,
                                                         "config": self.config.to_dict()}, indent=2))
        if folder.exists():
            old = self.output / f"{LAST}.old"
            folder.rename(old)
            partial.rename(folder)
            for path in old.iterdir():
                path.unlink()
            old.rmdir()
        else:
            partial.rename(folder)

    def load_checkpoint(self) -> bool:
        folder = self.output / LAST
        if not (folder / "state.json").is_file():
            return False
        state = json.loads((folder / "state.json").read_text())
        self.accelerator.unwrap_model(self.model).load_trained_weights(folder / "trainable.safetensors")
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(("MT19937", saved["numpy_rng"].numpy().astype(np.uint32), 624, 0, 0.0))
        random.setstate((3, tuple(saved["python_rng"]), None))
        self.state = TrainState(step=int(state["step"]), seconds=float(state["seconds"]))
        return True

    def export(self, folder: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` with only the trained parameters."""
        return self.accelerator.unwrap_model(self.model).save_pretrained(folder)

    # ----- the loop --------------------------------------------------------------------------

    def log(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def run(self, max_steps: int | None = None) -> dict:
        """Train until all stages are done (or ``max_steps`` total, or ``max_minutes``); return the last eval."""
        resumed = self.load_checkpoint()
        total = self.config.total_steps if max_steps is None else min(max_steps, self.config.total_steps)
        self.log({"event": "start", "step": self.state.step, "resumed": resumed, "train_records": len(self.train_set),
                  "dev_records": len(self.dev_set), "skipped_uncached": self.train_set.skipped,
                  "pools": {s.name: len(p) for s, p in zip(self.config.stages, self.pools)}})
        started, last_save = time.time(), time.time()
        bar = tqdm(total=total, initial=self.state.step, desc="training", disable=not self.progress
                   or not self.accelerator.is_main_process)
        metrics: dict = {}
        while self.state.step < total:
            step_start = time.time()
            losses = self.train_step(self.state.step)
            self.state.step += 1
            self.state.seconds += time.time() - step_start
            stage = self.config.stage_at(self.state.step - 1)[1].name
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{losses.get('loss', float('nan')):.3f}")
            if self.state.step % self.config.log_every == 0:
                self.log({"event": "train", "step": self.state.step, "stage": stage,
                          "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.state.seconds, 1), **losses})
            if self.config.eval_every and self.state.step % self.config.eval_every == 0:
                metrics = self.evaluate()
                self.log({"event": "eval", "step": self.state.step, **metrics})
            out_of_time = self.config.max_minutes is not None and (time.time() - started) / 60 >= self.config.max_minutes
            if (time.time() - last_save) / 60 >= self.config.checkpoint_minutes or out_of_time:
                self.save_checkpoint()
                last_save = time.time()
            if out_of_time:
                break
        bar.close()
        self.save_checkpoint()
        if not metrics or self.config.eval_every == 0 or self.state.step % self.config.eval_every:
            metrics = self.evaluate()
            self.log({"event": "eval", "step": self.state.step, **metrics})
        if self.config.export and self.accelerator.is_main_process:
            self.export(self.config.export)
        return {"step": self.state.step, **metrics}
