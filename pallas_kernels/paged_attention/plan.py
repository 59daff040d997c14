"""The query-block plan both paged-attention kernels (TPU and GPU) run on:
queries regrouped so every block belongs to one sequence, and per block the
range of KV blocks holding any key one of its queries sees."""

from __future__ import annotations

import jax.numpy as jnp


def query_blocks(cu_q_lens, kv_lens, num_blocks, block_q):
    """Per q block: its sequence, the position of its first query, how many of
    its tokens are real, and the first slot of every sequence's blocks."""
    num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    seq_blocks = -(-q_lens // block_q)
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_blocks)]).astype(jnp.int32)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all, not the default scan: a scan is an XLA while loop, which splits the step's CUDA graph
    # and is driven from the host; the few sequences make the comparison matrix small.
    seq = jnp.searchsorted(cu_blocks, b, side="right", method="compare_all")
    seq = jnp.clip(seq - 1, 0, num_seqs - 1).astype(jnp.int32)
    used = b < cu_blocks[-1]
    q0 = (b - cu_blocks[seq]) * block_q  # index of the block's first query within its sequence
    num_valid = jnp.where(used, jnp.clip(q_lens[seq] - q0, 0, block_q), 0).astype(jnp.int32)
    first_pos = (kv_lens[seq] - q_lens[seq] + q0).astype(jnp.int32)
    return seq, q0, num_valid, first_pos, cu_blocks


def kv_block_ranges(first_pos, num_valid, block_kv, sliding_window):
    """First and last KV block (inclusive) holding a key some query of the block
    sees; (0, -1) for blocks without queries."""
    last_pos = first_pos + num_valid - 1
    lo_pos = jnp.zeros_like(first_pos)
    if sliding_window is not None:
        lo_pos = jnp.maximum(first_pos - sliding_window + 1, 0)
    empty = (num_valid == 0) | (last_pos < 0)
    lo = jnp.where(empty, 0, lo_pos // block_kv).astype(jnp.int32)
    hi = jnp.where(empty, -1, last_pos // block_kv).astype(jnp.int32)
    return lo, hi
