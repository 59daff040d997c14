"""Ragged paged-attention inputs for the kernel tests and scripts/check_paged_gpu.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def ragged_paged_inputs(seqs, num_tokens, num_seqs, q_heads, kv_heads, head_dim, page_size,
                        pages_per_seq, dtype=jnp.bfloat16, seed=0):
    """seqs: (q_len, kv_len) per sequence; the rest of the num_seqs rows and of
    the num_tokens tokens are padding. Pages are scattered over a shuffled pool;
    unused page-table entries and unused page slots hold garbage.

    Returns ((q, k_pages, v_pages, kv_lens, page_table, cu_q_lens), max_q_len)."""
    rng = np.random.default_rng(seed)
    num_pages = num_seqs * pages_per_seq + 3
    q_lens = [ql for ql, _ in seqs] + [0] * (num_seqs - len(seqs))
    kv_lens = [kl for _, kl in seqs] + [0] * (num_seqs - len(seqs))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert cu[-1] <= num_tokens and max(-(-k // page_size) for k in kv_lens) <= pages_per_seq
    table = rng.permutation(num_pages)[:num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq)
    shape = (num_pages, page_size, kv_heads, head_dim)
    q, k_pages, v_pages = (jnp.asarray(rng.standard_normal(sh, np.float32), dtype)
                           for sh in ((num_tokens, q_heads, head_dim), shape, shape))
    return (q, k_pages, v_pages, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table, jnp.int32),
            jnp.asarray(cu)), max(1, max(q_lens))
