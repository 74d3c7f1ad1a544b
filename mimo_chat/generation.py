"""Our decode loop: a generator of (token, hidden state) with a KV cache, readable in one screen.

Each :class:`Step` carries the chosen token and the last-layer hidden state of the position that
predicted it, so the predictor can stream text and decode a ``<SEG>`` mask in the same pass
(see ``modeling/seg_head.py`` for why that is the ``<SEG>`` hidden state). Greedy by default.
Per step only the last position's logits are computed and greedy decoding takes ``argmax`` of
the raw logits (no full-vocabulary softmax).
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


def choose_token(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> int:
    """Greedy (``temperature == 0``) or sampled token id from (V,) logits."""
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
    follow: Callable[[int], Sequence[int]] | None = None,
    revise: Callable[[int], int] | None = None,
) -> Iterator[Step]:
    """Prefill (1, L, H) prompt embeddings, then yield one :class:`Step` per new token.

    The first steps take ``forced_token_ids`` instead of choosing (an assistant prefix, or teacher
    forcing for scoring); then up to ``max_new_tokens`` are chosen. Stops after a stop token (yielded).
    ``past_key_values``: a cache already holding a prompt prefix (``inputs_embeds`` is the rest);
    it is extended in place. ``embed_token(token_id) -> (1, 1, H)`` embeds each chosen token before
    it is fed back (default: the LM's input embedding; the predictor adds the locator's finding
    to a ``<SEG>``). It is called after the consumer has handled the token's :class:`Step`.
    ``follow(token_id) -> ids`` may force the tokens that come next (e.g. the name a grounded
    phrase must hold); forced tokens do not count against ``max_new_tokens``. ``revise(token_id)``
    may replace a chosen (not forced) token before it is yielded (e.g. a yes / no that must agree
    with the locator).
    """
    cache = DynamicCache() if past_key_values is None else past_key_values
    output = language_model(inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    hidden, logits = output.hidden_states[0, -1], output.logits[0, -1]  # (H,), (V,)
    pending = list(forced_token_ids or [])
    chosen = 0
    while pending or chosen < max_new_tokens:
        if pending:
            token = pending.pop(0)
        else:
            token = choose_token(logits, temperature, generator)
            if revise is not None:
                token = revise(token)
            chosen += 1
        yield Step(token, hidden, logits)
        if token in stop_token_ids:
            return
        if follow is not None:
            pending.extend(follow(token))
        if embed_token is None:
            token_embedding = language_model.embed(torch.tensor([[token]], device=inputs_embeds.device))  # (1, 1, H)
        else:
            token_embedding = embed_token(token)
        output = language_model(token_embedding, past_key_values=cache, use_cache=True, logits_to_keep=1)
        hidden, logits = output.hidden_states[0, -1], output.logits[0, -1]
