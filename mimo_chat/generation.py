"""Our decode loop: prefill, step, sample -- a generator of (token, hidden state) with a KV cache.

Each :class:`Step` carries the chosen token and the last-layer hidden state of the position that
predicted it, so the predictor can stream text and decode a ``<SEG>`` mask in the same pass (that
is the ``<SEG>`` hidden state, see ``modeling/mimo.py``). The loop knows no policy: what a reply may
say is planned in ``mimo_chat.evidence`` and reaches the loop only as teacher-forced tokens and, for
free text, an optional set of allowed next tokens. Greedy decoding takes ``argmax`` of the last
position's raw logits (no full-vocabulary softmax).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from mimo_chat.modeling.language_model import GroundingLanguageModel


@dataclass
class Step:
    token_id: int
    hidden_state: torch.Tensor  # (H,) last layer, position that predicted ``token_id``
    logits: torch.Tensor  # (V,) the logits ``token_id`` was chosen from


def prefill(
    language_model: GroundingLanguageModel, inputs_embeds: torch.Tensor, cache: DynamicCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run (1, L, H) embeddings through the LM, extending ``cache``; the last position's (H,) hidden state and (V,) logits."""
    output = language_model(inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return output.hidden_states[0, -1], output.logits[0, -1]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    allowed: Sequence[int] | None = None,
) -> int:
    """Greedy (``temperature == 0``) or sampled token id from (V,) logits, restricted to ``allowed`` ids when given."""
    if allowed is not None:
        keep = torch.tensor(list(allowed), dtype=torch.long, device=logits.device)
        restricted = torch.full_like(logits, float("-inf"))
        restricted[keep] = logits[keep]
        logits = restricted
    if temperature <= 0:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def decode_steps(
    language_model: GroundingLanguageModel,
    inputs_embeds: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    forced_token_ids: Sequence[int] | None = None,
    past_key_values: DynamicCache | None = None,
    embed_token: Callable[[int], torch.Tensor] | None = None,
    allowed: Callable[[Sequence[int]], Sequence[int] | None] | None = None,
) -> Iterator[Step]:
    """Prefill (1, L, H) prompt embeddings, then yield one :class:`Step` per new token.

    The first steps take ``forced_token_ids`` (teacher forcing: a planned reply or an assistant
    prefix); then up to ``max_new_tokens`` are sampled. Stops after a stop token (yielded).
    ``past_key_values``: a cache already holding a prompt prefix (``inputs_embeds`` is the rest);
    it is extended in place. ``embed_token(token_id) -> (1, 1, H)`` embeds each token before it is
    fed back (default: the LM's input embedding); it is called after the consumer has handled the
    token's :class:`Step`. ``allowed(tokens so far) -> ids or None`` restricts what may be sampled
    next (None = anything).
    """
    cache = DynamicCache() if past_key_values is None else past_key_values
    hidden, logits = prefill(language_model, inputs_embeds, cache)  # (H,), (V,)
    forced = list(forced_token_ids or [])
    tokens: list[int] = []
    while len(tokens) < len(forced) + max_new_tokens:
        if len(tokens) < len(forced):
            token = forced[len(tokens)]
        else:
            token = sample(logits, temperature, generator, None if allowed is None else allowed(tokens))
        tokens.append(token)
        yield Step(token, hidden, logits)
        if token in stop_token_ids:
            return
        if embed_token is None:
            token_embedding = language_model.embed(torch.tensor([[token]], device=inputs_embeds.device))  # (1, 1, H)
        else:
            token_embedding = embed_token(token)
        hidden, logits = prefill(language_model, token_embedding, cache)
