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


def gather_queries(q, cu_q_lens, seq, q0, num_valid, block_q):
    """q [T, H, D] regrouped by query block: [num_blocks, block_q, H, D], row i of block b being query
    q0[b] + i of sequence seq[b] (zeros past the block's num_valid tokens)."""
    num_tokens = q.shape[0]
    i = jnp.arange(block_q, dtype=jnp.int32)
    token = (cu_q_lens[seq][:, None] + q0[:, None] + i[None, :]).reshape(-1)
    valid = (i[None, :] < num_valid[:, None]).reshape(-1)
    out = jnp.where(valid[:, None, None], q[jnp.clip(token, 0, num_tokens - 1)], 0)
    return out.reshape(seq.shape[0], block_q, *q.shape[1:])


def scatter_outputs(out, cu_q_lens, cu_blocks, block_q, num_tokens):
    """The inverse of `gather_queries`: out [num_blocks * block_q, H, D] back in token order, [T, H, D]; token
    t of sequence s is row j % block_q of block cu_blocks[s] + j // block_q (j = t - cu_q_lens[s]). Tokens
    of no sequence (padding) are zero."""
    num_seqs = cu_blocks.shape[0] - 1
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tseq = jnp.searchsorted(cu_q_lens, t, side="right", method="compare_all")  # no while loop (see above)
    tseq = jnp.clip(tseq - 1, 0, num_seqs - 1)
    slot = cu_blocks[tseq] * block_q + t - cu_q_lens[tseq]
    real = t < cu_q_lens[-1]
    return jnp.where(real[:, None, None], out[jnp.clip(slot, 0, out.shape[0] - 1)], 0)
