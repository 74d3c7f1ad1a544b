"""Training configuration: a dataclass read from YAML or JSON and saved beside the checkpoints.

Stages are cascaded as in MiniGPT-Pancreas (general organs -> pancreas -> tumour): each stage
trains for ``steps`` optimizer steps on the records its filters select, optionally mixing in a
``replay`` fraction of the earlier stages' records so the first skills are not forgotten.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mimo_chat.config_dict import check_keys, config_from_dict


@dataclass(frozen=True)
class StageConfig:
    """One stage of the cascade. Empty filters select everything."""

    name: str
    steps: int
    sources: tuple[str, ...] = ()  # record "source" values
    tasks: tuple[str, ...] = ()  # record "task" values
    kb_keys: tuple[str, ...] = ()  # records about at least one of these knowledge-base entries
    replay: float = 0.0  # share of each batch drawn from the earlier stages' records
    learning_rate: float | None = None  # overrides TrainConfig.learning_rate for this stage

    def selects(self, record: dict) -> bool:
        return ((not self.sources or record["source"] in self.sources)
                and (not self.tasks or record["task"] in self.tasks)
                and (not self.kb_keys or any(key in self.kb_keys for key in record.get("kb_keys", []))))


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``python -m mimo_chat.train`` needs; paths are relative to the working directory."""

    stages: tuple[StageConfig, ...]
    model: str = "lite"  # MimoConfig preset
    model_overrides: dict = field(default_factory=dict)  # MimoConfig fields to change
    init_from: str | None = None  # folder written by save_pretrained to start from
    # folder written by ``python -m mimo_chat.train.locator``: its weights start the locator and its
    # vocabulary becomes ``locator_vocabulary`` (unless model_overrides sets one)
    init_locator: str | None = None
    data: str | None = None  # dataset folder (default: python -m mimo_chat.data.prepare's output)
    embeddings: str | None = None  # embedding cache root (default: cache_dir()/embeddings)
    encode_missing: bool = False  # encode images that are not cached yet (else skip their records)
    output: str = "runs/mimo-lite"
    export: str | None = None  # where the final trained weights go (e.g. checkpoints/mimo-lite)
    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 100  # steps; 0 = only at the end
    eval_samples: int = 48  # dev records scored at each evaluation
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # stop (and save) after this wall-clock time
    threads: int | None = None  # torch CPU threads

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(index, stage) that optimizer step ``step`` (0-based) belongs to."""
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return index, stage
        return len(self.stages) - 1, self.stages[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        check_keys(cls, values, "training config")
        stages = [config_from_dict(StageConfig, raw, "stage") for raw in values.get("stages") or []]
        if not stages:
            raise ValueError("A training config needs at least one stage.")
        return cls(**{**values, "stages": tuple(stages)})


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a ``.yaml``/``.yml`` or ``.json`` training config."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    return TrainConfig.from_dict(values)
