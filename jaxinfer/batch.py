"""The device batch: one step's worth of work, packed into a fixed, bucketed shape.

A step mixes two kinds of work, each in its own region of the packed tokens:

    tokens [0, D)        decode region: one token per decode sequence (row i is
                         sequence i); rows past the real ones are padding
    tokens [D, D + Tp)   prefill region: chunks of prompts packed back to back

Sequences follow the same order: `D` decode sequences, then up to `M` prefill
sequences. Every array is ragged in the usual way: sequence `s` owns tokens
`cu_q_lens[s]:cu_q_lens[s+1]`, its last `q_len` positions out of `kv_lens[s]`.
Padding decode rows own one token with kv_len 1 over the null page; padding
prefill sequences own nothing. Padding tokens write their K/V into page 0,
which the page allocator never hands out.

For attention without a kernel, the prefill region is also cut into query
blocks of `block_q` tokens that each belong to one sequence (`block_tokens`,
`block_seq`), so a short prompt next to a long one does not pay for the long
one's query length.

Logits are computed only at `logits_indices` (R rows): one per decode row,
then the prefill rows (a completed prompt's last token, and prompt tokens whose
logprobs were asked for). A token may also be fed from the previous step's
sampled tokens on the device (`feed_index`), so the host can schedule step N+1
before it has read step N's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer.core.shapes import NULL_PAGE, BatchShape, SeqWork


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: jax.Array  # [T] int32 token ids (where feed_index < 0)
    feed_index: jax.Array  # [T] int32 row of the previous step's sampled tokens to feed, or -1
    positions: jax.Array  # [T] int32 absolute position of each token in its sequence
    slots: jax.Array  # [T] int32 flat cache slot (page * page_size + offset) for the token's K/V
    cu_q_lens: jax.Array  # [S + 1] int32 start of each sequence's tokens
    kv_lens: jax.Array  # [S] int32 context length of each sequence including this step
    page_table: jax.Array  # [S, P] int32 page ids of each sequence, in order
    block_tokens: jax.Array  # [NB, Bq] int32 prefill token index of each query-block slot, T = none
    block_seq: jax.Array  # [NB] int32 sequence of each query block (a padding block: any)
    logits_indices: jax.Array  # [R] int32 tokens whose logits are wanted
    decode_rows: int = dataclasses.field(metadata=dict(static=True))  # D
    max_q_len: int = dataclasses.field(metadata=dict(static=True))  # bound on any q_len

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.shape[0]


def build(shape: BatchShape, decode: Sequence[SeqWork], prefill: Sequence[SeqWork],
          page_size: int) -> tuple[Batch, list[list[int]]]:
    """Pack one step. Returns the numpy-backed Batch and, per work item (decode
    first, then prefill), the logits rows of its `logit_offsets`."""
    D, Tp, Bq, P = shape.decode_rows, shape.prefill_tokens, shape.block_q, shape.pages_per_seq
    T, S, NB, R = shape.num_tokens, shape.num_seqs, shape.num_blocks, shape.num_rows
    if len(decode) > D or len(prefill) > shape.prefill_seqs:
        raise ValueError(f"{len(decode)} decode / {len(prefill)} prefill sequences do not fit {shape}")
    tokens = np.zeros(T, np.int32)
    feed = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    cu = np.zeros(S + 1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    table = np.full((S, P), NULL_PAGE, np.int32)
    block_tokens = np.full((NB, Bq), T, np.int32)
    block_seq = np.zeros(NB, np.int32)
    logits = np.zeros(R, np.int32)
    rows: list[list[int]] = []
    for w in (*decode, *prefill):
        if len(w.pages) * page_size < w.start + len(w.token_ids) or len(w.pages) > P:
            raise ValueError(f"{len(w.pages)} pages do not cover positions up to "
                             f"{w.start + len(w.token_ids)} (page table width {P})")

    # Decode region: every row owns one token; padding rows attend to slot 0 of the null page.
    cu[1:D + 1] = np.arange(1, D + 1)
    kv_lens[:D] = 1
    logits[:D] = np.arange(D)
    for i, w in enumerate(decode):
        if len(w.token_ids) != 1:
            raise ValueError("a decode sequence feeds exactly one token")
        tokens[i] = w.token_ids[0]
        feed[i] = w.feed_row
        positions[i] = w.start
        kv_lens[i] = w.start + 1
        table[i, :len(w.pages)] = w.pages
        rows.append([i] if w.logit_offsets else [])

    # Prefill region.
    t, b, r = D, 0, D
    for j, w in enumerate(prefill):
        s = D + j
        n = len(w.token_ids)
        tokens[t:t + n] = w.token_ids
        if w.feed_row >= 0:
            feed[t + n - 1] = w.feed_row
        positions[t:t + n] = np.arange(w.start, w.start + n)
        kv_lens[s] = w.start + n
        table[s, :len(w.pages)] = w.pages
        cu[s + 1] = t + n
        for first in range(0, n, Bq):
            size = min(Bq, n - first)
            block_tokens[b, :size] = np.arange(t + first, t + first + size)
            block_seq[b] = s
            b += 1
        seq_rows = list(range(r, r + len(w.logit_offsets)))
        logits[r:r + len(w.logit_offsets)] = [t + o for o in w.logit_offsets]
        r += len(w.logit_offsets)
        rows.append(seq_rows)
        t += n
    if t > T or b > NB or r > R:
        raise ValueError(f"prefill work ({t - D} tokens, {b} blocks, {r - D} rows) does not fit {shape}")
    cu[D + len(prefill) + 1:] = t

    # Slots: padding tokens (and the padding decode rows) write into the null page.
    slots = np.zeros(T, np.int32)
    for s in range(len(decode)):
        slots[s] = table[s, positions[s] // page_size] * page_size + positions[s] % page_size
    for j in range(len(prefill)):
        s = D + j
        lo, hi = cu[s], cu[s + 1]
        pos = positions[lo:hi]
        slots[lo:hi] = table[s, pos // page_size] * page_size + pos % page_size

    batch = Batch(tokens=tokens, feed_index=feed, positions=positions, slots=slots, cu_q_lens=cu,
                  kv_lens=kv_lens, page_table=table, block_tokens=block_tokens, block_seq=block_seq,
                  logits_indices=logits, decode_rows=D, max_q_len=max(1, Tp))
    return batch, rows
