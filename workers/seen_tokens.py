"""The tokens a sequence has seen, as the penalties read them: its distinct tokens (prompt and output) and how
often each appeared in its output, kept in CPU tensors and brought up to date one new token at a time.

Rebuilding them from the token lists at every step cost Python work in proportion to the sequence's length,
for every penalised row of every step: 32 rows with 8,000-token answers took 72 ms a step (477 ms at 32,000),
paid by every sequence of the batch. Kept here, a step costs the new tokens, then copies in C.
"""
from __future__ import annotations

from typing import Sequence

import torch


class SeenTokens:
    def __init__(self, prompt_token_ids: Sequence[int]):
        distinct = torch.tensor(list(prompt_token_ids), dtype=torch.long).unique()
        self._slot: dict[int, int] = {t: i for i, t in enumerate(distinct.tolist())}
        capacity = max(16, 2 * len(self._slot))
        self._ids = torch.empty(capacity, dtype=torch.long)
        self._ids[:len(self._slot)] = distinct
        self._counts = torch.zeros(capacity, dtype=torch.long)   # output occurrences (0: seen in the prompt only)
        self._absorbed = 0   # output tokens taken into account

    def update(self, output_token_ids: Sequence[int]) -> "SeenTokens":
        """Take in the output tokens added since the last call (the output only ever grows)."""
        for token in output_token_ids[self._absorbed:]:
            slot = self._slot.get(token)
            if slot is None:
                slot = self._slot[token] = len(self._slot)
                if slot == len(self._ids):
                    self._grow()
                self._ids[slot] = token
            self._counts[slot] += 1
        self._absorbed = len(output_token_ids)
        return self

    @property
    def ids(self) -> torch.Tensor:
        """The distinct tokens of prompt and output (a view: valid until the next update)."""
        return self._ids[:len(self._slot)]

    @property
    def output_counts(self) -> torch.Tensor:
        """How often each of `ids` appeared in the output (a view: valid until the next update)."""
        return self._counts[:len(self._slot)]

    def _grow(self) -> None:
        n = len(self._ids)
        ids, counts = torch.empty(2 * n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)
        ids[:n], counts[:n] = self._ids, self._counts
        self._ids, self._counts = ids, counts
