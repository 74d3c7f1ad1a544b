"""Constrained free text: inside ``<p>...</p>`` the language model may only spell an allowed name.

A token trie of the allowed names' token ids; :meth:`NameTrie.allowed` gives the ids that may
follow the tokens decoded so far (None outside a phrase: free text), so the decode loop samples
within them. The phrase is closed with ``</p>`` once a whole name is spelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class NameTrie:
    """``with_mask``: the phrase names a prompted object, so ``</p>`` is followed by its ``<SEG>``."""

    def __init__(
        self, names: Sequence[Sequence[int]], start_id: int, end_id: int, seg_id: int, with_mask: bool = False
    ) -> None:
        self.names = [tuple(ids) for ids in names if ids]
        self.start_id, self.end_id, self.seg_id = start_id, end_id, seg_id
        self.with_mask = with_mask

    def next_ids(self, prefix: Sequence[int]) -> list[int] | None:
        """Ids that continue ``prefix`` towards an allowed name (``</p>`` when it is one); None when off the trie."""
        prefix = tuple(prefix)
        options = {name[len(prefix)] for name in self.names if len(name) > len(prefix) and name[: len(prefix)] == prefix}
        if prefix in self.names:
            options.add(self.end_id)
        return sorted(options) if options else None

    def allowed(self, tokens: Sequence[int]) -> list[int] | None:
        """Allowed next ids after ``tokens`` (None = unconstrained: outside a phrase)."""
        opened = max((i for i, t in enumerate(tokens) if t == self.start_id), default=-1)
        closed = max((i for i, t in enumerate(tokens) if t in (self.end_id, self.seg_id)), default=-1)
        if self.with_mask and opened >= 0 and closed == len(tokens) - 1 and tokens[-1] == self.end_id:
            return [self.seg_id]
        if opened < 0 or closed > opened:
            return None
        return self.next_ids(tokens[opened + 1 :])


def phrase_constraint(
    tries: Callable[[int], NameTrie], start_id: int
) -> Callable[[Sequence[int]], list[int] | None]:
    """``allowed(tokens)`` for the decode loop: the k-th phrase (0-based) is spelled from ``tries(k)``."""

    def allowed(tokens: Sequence[int]) -> list[int] | None:
        phrase = sum(1 for t in tokens if t == start_id) - 1
        return tries(max(phrase, 0)).allowed(tokens) if phrase >= 0 else None

    return allowed
