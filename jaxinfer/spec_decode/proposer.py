"""What every proposer is to the scheduler: given the sequences that may speculate this step, up to k
drafted tokens each. One call per step for all of them, so a proposer that runs a model on the device
(a draft model, a trained head, DeepSeek's MTP layer) batches its work into a few device calls.

A proposer with device state of its own (a draft model's KV cache) keys it by the sequence's SeqTable
row and writes its K/V at the target's page ids (`DraftQuery.pages`): the scheduler allocates pages for
every position a draft may write before asking, and tells the proposer when a row changes occupant
(`forget`), so nothing of a previous sequence is ever read as this one's.

Host-side (numpy): the scheduler imports this, and jaxinfer.core must not load jax.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class DraftQuery:
    row: int  # the sequence's SeqTable row: where a stateful proposer keeps what it knows of it
    tokens: np.ndarray  # every known token of the sequence (prompt and output), the last one included
    k: int  # most tokens to propose (>= 1)
    pages: np.ndarray  # its page ids, covering every position up to len(tokens) + k - 1


class Proposer(Protocol):
    k: int  # most drafts it proposes for a sequence (num_speculative_tokens)

    def propose(self, queries: list[DraftQuery]) -> list[np.ndarray]:
        """Up to `query.k` tokens that may follow each query's tokens (int32, possibly none)."""

    def forget(self, row: int) -> None:
        """`row` has a new occupant: whatever was kept for the old one is void."""

    @property
    def writes_pages(self) -> bool:
        """Whether it writes K/V of its own at the queries' pages (the scheduler then allocates them first)."""
