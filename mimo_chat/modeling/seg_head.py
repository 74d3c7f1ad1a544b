"""Which hidden state belongs to a ``<SEG>`` token: the one selection rule (the locator reads it).

Convention (as LISA): the hidden state used for a ``<SEG>`` token is the last-layer hidden state
of the position that *predicted* it. In teacher-forced training that is ``hidden[:, t - 1]`` for
``input_ids[:, t] == <SEG>``; in step decoding it is the hidden state the loop already holds when
it picks ``<SEG>`` – so the mask can be decoded at once, without another LM step.
:func:`select_seg_hidden_states` implements the rule for both (a test proves they agree).
"""

from __future__ import annotations

import torch


def select_seg_hidden_states(
    hidden_states: torch.Tensor, next_token_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states whose next token is ``<SEG>``.

    Args:
        hidden_states: (B, L, H) hidden state at each position.
        next_token_ids: (B, L) the token that follows each position (predicted or teacher-forced).
        seg_token_id: id of ``<SEG>``.

    Returns:
        (N, H) selected hidden states in row-major order (batch, then position) and their (N, 2)
        ``(batch, position)`` indices into ``hidden_states``.
    """
    is_seg = next_token_ids == seg_token_id  # (B, L)
    index = is_seg.nonzero()  # (N, 2), row-major
    return hidden_states[is_seg], index


def teacher_forced_seg_hidden_states(
    hidden_states: torch.Tensor, input_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training form: the next token of position t is ``input_ids[:, t + 1]``."""
    return select_seg_hidden_states(hidden_states[:, :-1], input_ids[:, 1:], seg_token_id)
