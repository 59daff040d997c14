"""What a step is made of, before any array exists: the compiled shapes (buckets) a step
can take, and each sequence's share of a step (`SeqWork`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

NULL_PAGE = 0  # scratch page for padding writes; never allocated to a sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


@dataclasses.dataclass(frozen=True, order=True)
class BatchShape:
    """One compiled shape. Every array size of a Batch follows from these numbers."""

    decode_rows: int  # D >= 1
    prefill_tokens: int  # Tp: 0 (decode only) or a multiple of block_q
    block_q: int  # prefill query block
    pages_per_seq: int  # P: page-table width, fixed by the longest context
    prompt_logprob_rows: int = 0  # most prefill logit rows beyond one per completed prompt
    # Speculation: most drafted tokens per sequence (0: none). A speculating sequence takes 1 + drafts decode
    # rows (its last token, then each draft, at consecutive positions); its drafts and first row travel
    # beside the sampling rows for the verification (step_inputs.py).
    spec_tokens: int = 0

    def __post_init__(self):
        if self.decode_rows < 1 or self.prefill_tokens < 0 or self.prefill_tokens % self.block_q:
            raise ValueError(f"bad batch shape {self}: decode_rows >= 1 and prefill_tokens a "
                             "multiple of block_q are required")

    @property
    def prefill_seqs(self) -> int:  # M: most prefill sequences in one step
        return self.prefill_tokens // self.block_q

    @property
    def num_blocks(self) -> int:  # M sequences of Tp tokens fit in Tp/Bq + M blocks
        return 2 * self.prefill_seqs

    @property
    def num_tokens(self) -> int:
        return self.decode_rows + self.prefill_tokens

    @property
    def num_seqs(self) -> int:
        return self.decode_rows + self.prefill_seqs

    @property
    def prefill_rows(self) -> int:
        if not self.prefill_tokens:
            return 0
        return self.prefill_seqs + min(self.prefill_tokens, self.prompt_logprob_rows)

    @property
    def num_rows(self) -> int:
        return self.decode_rows + self.prefill_rows


@dataclasses.dataclass
class SeqWork:
    """One sequence's part of a step: tokens for positions start, start+1, ..."""

    token_ids: Sequence[int]  # host-known ids; the last is ignored where fed (`feed_slot`)
    start: int  # position of token_ids[0]
    pages: Sequence[int]  # the sequence's page table (covering start + len(token_ids) positions)
    feed_slot: int = -1  # >= 0: the last token is the one kept on the device in this feed slot
    logit_offsets: Sequence[int] = ()  # offsets into token_ids whose logits are wanted, in order


def next_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()
