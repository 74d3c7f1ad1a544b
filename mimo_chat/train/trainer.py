"""The one training loop: optimizer steps, clipping, resumable checkpoints, validation, progress, limits.

As in minGPT's ``Trainer``, the loop knows nothing of what it trains: a :class:`TrainingTask` gives
it the model, the optimizer, each step's batch and loss, a validation and what to export. Three
tasks use it: MIMO (:mod:`mimo_chat.train.mimo_task`), the structure locator
(:mod:`mimo_chat.train.locator`) and the segmenter's prompt weights
(:mod:`mimo_chat.train.segmenter_prompts`).

A run folder holds ``log.jsonl`` (one JSON object per event: ``start``, ``train``, ``eval``) and
``last/``, the checkpoint a run with the same folder resumes from: ``trainable.safetensors`` (the
task's trained tensors), ``state.json`` (step, seconds, the task's config, notes) and
``optimizer.pt`` (optimizer state and every random generator, so a resumed run draws the batches
and dropout masks the uninterrupted run would have drawn). The learning rate of each parameter
group is set before every step from the group's base rate and the step, so the schedule needs no
state of its own. Under ``accelerate launch`` each process draws its own batches (MIMO).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from tqdm import tqdm

LAST = "last"
WEIGHTS = "trainable.safetensors"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"


@dataclass(frozen=True)
class TrainSettings:
    """How the loop runs one task; the task's own config decides what it trains."""

    output: str | Path  # the run folder: last/ and log.jsonl
    total_steps: int  # optimizer steps of the whole schedule
    max_minutes: float | None = None  # stop (and save) after this wall-clock time
    max_grad_norm: float | None = 1.0  # clip the gradients' total norm; None or 0: no clipping
    gradient_accumulation: int = 1
    log_every: int = 1  # steps between "train" lines of log.jsonl
    eval_every: int = 0  # steps between validations; 0: only at the end
    export_every: int = 0  # steps between exports; 0: only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0: by checkpoint_minutes and at the end
    checkpoint_minutes: float | None = None
    progress: bool = True
    cpu: bool = False  # stay on the CPU even where accelerate sees a GPU


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training wall-clock time over all sessions


class TrainingTask:
    """One training, as the loop sees it. Subclasses set ``name`` and ``model`` and implement the
    methods that raise; the others are optional."""

    name = "training"
    model: nn.Module  # every parameter the run trains is in it
    options: argparse.Namespace | None = None  # the task's command line, saved in state.json
    rng: random.Random | None = None  # a generator of the task's own for its batches, restored on resume

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """Called once, after a resumed run's weights are loaded; each group's ``lr`` is its base rate."""
        raise NotImplementedError

    def learning_rate(self, base: float, step: int) -> float:
        """The rate of a group with base rate ``base`` at optimizer step ``step`` (0-based)."""
        return base

    def next_batch(self, step: int, micro: int) -> Any:
        """Micro-batch ``micro`` of optimizer step ``step``, on the model's device."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor | float]:
        """``{"loss": the tensor to minimise, other named parts...}``. ``model`` is the prepared
        model (wrapped for data parallelism under ``accelerate launch``)."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict:
        """Metrics on held-out data; called in eval mode without gradients."""
        return {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps (what the run changes)."""
        raise NotImplementedError

    def load_trainable_state(self, path: Path) -> None:
        """Load a ``trainable.safetensors`` written from :meth:`trainable_state`."""
        raise NotImplementedError

    def export(self, step: int, metrics: dict) -> None:
        """Write the trained artefact (main process only)."""

    def refresh_data(self) -> None:
        """Called after each export: pick up data cached since the run started."""

    def describe(self) -> dict:
        """What the run trains on, for the ``start`` line of the log."""
        return {}

    def log_fields(self, step: int) -> dict:
        """Extra fields of the ``train`` line for step ``step`` (0-based), e.g. the stage."""
        return {}

    def config_dict(self) -> dict:
        """The task's settings, saved in ``state.json``."""
        return vars(self.options) if self.options is not None else {}

    def sampler_state(self) -> Any:
        return self.rng.getstate() if self.rng is not None else None

    def load_sampler_state(self, state: Any) -> None:
        if self.rng is not None and state is not None:
            self.rng.setstate(state)


def add_run_arguments(parser: argparse.ArgumentParser, threads: int) -> None:
    """The flags of every training command about the run rather than the task."""
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads (set before the task is built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")


def random_states() -> dict:
    return {"torch_rng": torch.get_rng_state(),
            "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python_rng": list(random.getstate()[1])}


def restore_random_states(saved: dict) -> None:
    torch.set_rng_state(saved["torch_rng"])
    np.random.set_state(("MT19937", saved["numpy_rng"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(saved["python_rng"]), None))


class Trainer:
    """Runs a :class:`TrainingTask` to ``settings.total_steps``, resuming from ``OUTPUT/last/``."""

    def __init__(self, task: TrainingTask, settings: TrainSettings) -> None:
        self.task = task
        self.settings = settings
        self.output = Path(settings.output)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)  # e.g. a MIMO batch without <SEG>
        self.accelerator = Accelerator(gradient_accumulation_steps=settings.gradient_accumulation,
                                       kwargs_handlers=[ddp], cpu=settings.cpu)
        self.state = TrainState()
        checkpoint = self.output / LAST
        self.resumed = (checkpoint / STATE).is_file()
        if self.resumed:  # before configure_optimizer: a task may derive data from its weights
            task.load_trainable_state(checkpoint / WEIGHTS)
        self.model, self.optimizer = self.accelerator.prepare(task.model, task.configure_optimizer())
        if self.resumed:
            saved = torch.load(checkpoint / OPTIMIZER, weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            restore_random_states(saved)
            task.load_sampler_state(saved.get("sampler"))
            state = json.loads((checkpoint / STATE).read_text())
            self.state = TrainState(step=int(state["step"]), seconds=float(state["seconds"]))
        for group in self.optimizer.param_groups:  # a checkpoint of a LambdaLR schedule names it initial_lr
            group.setdefault("base_lr", group.get("initial_lr", group["lr"]))

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]

    # ----- one step and validation -----------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (``gradient_accumulation`` micro-batches); the mean of each loss part."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.task.learning_rate(group["base_lr"], step))
        parts: dict[str, list[float]] = defaultdict(list)
        for micro in range(self.settings.gradient_accumulation):
            batch = self.task.next_batch(step, micro)
            with self.accelerator.accumulate(self.model):
                losses = self.task.loss(self.model, batch)
                self.accelerator.backward(losses["loss"])
                if self.accelerator.sync_gradients and self.settings.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            for name, value in losses.items():
                parts[name].append(float(value.detach()) if isinstance(value, torch.Tensor) else float(value))
        return {name: float(np.mean(values)) for name, values in parts.items()}

    def evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.validate(self.model)
        self.log({"event": "eval", "step": self.state.step, **metrics})
        scalars = {name: value for name, value in metrics.items() if isinstance(value, float)}
        if self.settings.progress and self.is_main_process and scalars:
            tqdm.write(f"step {self.state.step} " + " ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        return metrics

    # ----- checkpoints, export, log ----------------------------------------------------------

    def save_checkpoint(self, metrics: dict) -> None:
        """Write ``last/`` whole or not at all (a new folder, then a rename)."""
        if not self.is_main_process:
            return
        folder, partial = self.output / LAST, self.output / f"{LAST}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({name: value.detach().cpu().contiguous() for name, value in self.task.trainable_state().items()},
                  partial / WEIGHTS)
        torch.save({"optimizer": self.optimizer.state_dict(), "sampler": self.task.sampler_state(), **random_states()},
                   partial / OPTIMIZER)
        state = {"task": self.task.name, "step": self.state.step, "seconds": self.state.seconds,
                 "config": self.task.config_dict(), "notes": {"metrics": metrics}}
        (partial / STATE).write_text(json.dumps(state, indent=2, default=str))
        if folder.exists():
            old = self.output / f"{LAST}.old"
            folder.rename(old)
            partial.rename(folder)
            for path in old.iterdir():
                path.unlink()
            old.rmdir()
        else:
            partial.rename(folder)

    def export(self, metrics: dict) -> None:
        if self.is_main_process:
            self.task.export(self.state.step, metrics)
        self.task.refresh_data()

    def log(self, entry: dict) -> None:
        if self.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")

    # ----- the loop --------------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0

    def run(self, max_steps: int | None = None) -> dict:
        """Train to ``total_steps`` (or ``max_steps`` in all, or ``max_minutes``); return the last validation."""
        settings = self.settings
        total = settings.total_steps if max_steps is None else min(max_steps, settings.total_steps)
        start = {"event": "start", "step": self.state.step, "resumed": self.resumed, **self.task.describe()}
        self.log(start)
        if settings.progress and self.is_main_process:
            tqdm.write(json.dumps(start, default=str))
        started = last_save = time.time()
        bar = tqdm(total=total, initial=self.state.step, desc=self.task.name,
                   disable=not settings.progress or not self.is_main_process)
        metrics: dict = {}
        evaluated = exported = None  # the steps of the last validation and export
        while self.state.step < total:
            step_start = time.time()
            losses = self.train_step(self.state.step)
            fields = self.task.log_fields(self.state.step)
            self.state.step += 1
            self.state.seconds += time.time() - step_start
            bar.update(1)
            bar.set_postfix(**fields, **{name: f"{value:.3f}" for name, value in losses.items()})
            if self._due(settings.log_every):
                self.log({"event": "train", "step": self.state.step, **fields, "lr": self.optimizer.param_groups[0]["lr"],
                          "seconds": round(self.state.seconds, 1), **losses})
            if self._due(settings.eval_every):
                metrics, evaluated = self.evaluate(), self.state.step
            if self._due(settings.export_every):
                self.export(metrics)
                exported = self.state.step
            out_of_time = settings.max_minutes is not None and (time.time() - started) / 60 >= settings.max_minutes
            by_time = settings.checkpoint_minutes is not None and (time.time() - last_save) / 60 >= settings.checkpoint_minutes
            if self._due(settings.checkpoint_every) or by_time or out_of_time:
                self.save_checkpoint(metrics)
                last_save = time.time()
            if out_of_time:
                break
        bar.close()
        final_validation = evaluated != self.state.step
        if final_validation:
            metrics = self.evaluate()
        self.save_checkpoint(metrics)
        if exported != self.state.step or final_validation:  # the export carries the last validation
            self.export(metrics)
        return {"step": self.state.step, **metrics}
