"""Paged attention in plain JAX, for platforms without a Pallas kernel.

Works on the step `Batch` region by region (see jaxinfer/batch.py):

    decode region    one query token per row; row i reads sequence i's pages
    prefill region   query blocks of `block_q` tokens, each in one sequence

Both go through one routine, `_attend_groups`: a group (a decode row or a
query block) holds a few query tokens of one sequence, and the routine walks
that sequence's pages a key block (a whole number of pages) at a time with a
flash-style online softmax. The loop's trip count is traced: it covers only the
key blocks that the longest group actually needs (causal, sliding window), not
the page-table width, and nothing of size [groups, context] is ever built.
The GQA group rides in the query rows, so each KV head's keys are gathered once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.runner.batch import Batch

DEFAULT_BLOCK_KV = 256  # key-block size in tokens, rounded down to whole pages (at least one)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: Batch, *,
                    sm_scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, block_kv: int = DEFAULT_BLOCK_KV,
                    decode_attention=None) -> jax.Array:
    """q: [T, H, Dh] over pages [N, page_size, K, Dh] -> [T, H, Dh] in q's dtype.

    The new tokens' K/V must already be in the pages. Tokens owned by no
    sequence (prefill padding) come out zero. `decode_attention(q [D, H, Dh],
    k_pages, v_pages, kv_lens [D], page_table [D, P], positions [D])`, where
    given, takes the decode region instead (the CPU's native kernel).
    """
    T, H, Dh = q.shape
    page_size, K = k_pages.shape[1], k_pages.shape[2]
    if H % K:
        raise ValueError(f"{H} query heads do not divide into {K} KV heads")
    D = batch.decode_rows
    pages_per_block = max(1, block_kv // page_size)

    def attend(q_groups, q_pos, page_rows, kv_lens):  # [G, Q, H, Dh] -> [G, Q, H, Dh]
        G, Q = q_pos.shape
        out = _attend_groups(q_groups.reshape(G, Q, K, H // K, Dh), q_pos, k_pages, v_pages,
                             page_rows, kv_lens, pages_per_block=pages_per_block,
                             sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        return out.reshape(G, Q, H, Dh)

    # Decode region: group i is token i of sequence i.
    if decode_attention is not None and D:
        out = decode_attention(q[:D], k_pages, v_pages, batch.kv_lens[:D], batch.page_table[:D], batch.positions[:D])
    else:
        out = attend(q[:D, None], batch.positions[:D, None], batch.page_table[:D], batch.kv_lens[:D])[:, 0]
    result = jnp.zeros_like(q).at[:D].set(out)

    # Prefill region: group b is query block b; empty slots (index T) get position -1 and are dropped.
    if batch.block_tokens.shape[0]:
        tokens = batch.block_tokens  # [NB, Bq]
        valid = tokens < T
        safe = jnp.where(valid, tokens, 0)
        q_pos = jnp.where(valid, batch.positions[safe], -1)
        out = attend(q[safe], q_pos, batch.page_table[batch.block_seq], batch.kv_lens[batch.block_seq])
        result = result.at[tokens.reshape(-1)].set(out.reshape(-1, H, Dh), mode="drop")
    return result


def _attend_groups(
    q: jax.Array,  # [G, Q, K, R, Dh]: Q query tokens per group, R = H // K query heads per KV head
    q_pos: jax.Array,  # [G, Q] int32 position of each query token, -1 for an empty slot
    k_pages: jax.Array,  # [N, page_size, K, Dh]
    v_pages: jax.Array,  # [N, page_size, K, Dh]
    page_rows: jax.Array,  # [G, P] int32 the group's sequence's page table
    kv_lens: jax.Array,  # [G] int32 the group's sequence's context length
    *,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:  # [G, Q, K, R, Dh] in q's dtype; rows with no key to attend to are zero
    G, Q, K, R, Dh = q.shape
    page_size = k_pages.shape[1]
    P = page_rows.shape[1]
    block = pages_per_block * page_size

    # Key blocks each group needs: [first, end). Keys run up to the last query (causal) and kv_len;
    # with a window they start at the first query's window. Empty groups need none.
    valid = q_pos >= 0
    last_key = jnp.minimum(kv_lens, jnp.max(q_pos, axis=1) + 1)  # [G] one past
    end = (last_key + block - 1) // block
    if sliding_window is None:
        first = jnp.zeros_like(end)
    else:
        first_q = jnp.min(jnp.where(valid, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
        first = jnp.maximum(first_q - sliding_window + 1, 0) // block
    num_blocks = jnp.maximum(end - first, 0)

    page_offsets = jnp.arange(pages_per_block, dtype=jnp.int32)
    key_offsets = jnp.arange(block, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry  # [G, K, Q, R], [G, K, Q, R], [G, K, Q, R, Dh]
        kb = first + i  # [G]
        # Pages past the table (only past kv_len too) are clamped; their keys are masked below.
        page_idx = jnp.minimum(kb[:, None] * pages_per_block + page_offsets, P - 1)
        pages = jnp.take_along_axis(page_rows, page_idx, axis=1)  # [G, pages_per_block]
        k = k_pages[pages].reshape(G, block, K, Dh)
        v = v_pages[pages].reshape(G, block, K, Dh)
        k_pos = kb[:, None] * block + key_offsets  # [G, L]

        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos < kv_lens[:, None])[:, None, :]
        if sliding_window is not None:
            mask &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
        s = jnp.einsum("gqkrd,glkd->gkqrl", q, k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, :, None, :], s, -jnp.inf)

        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen no key yet
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("gkqrl,glkd->gkqrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, alpha[..., None] * acc + pv

    init = (jnp.full((G, K, Q, R), -jnp.inf, jnp.float32), jnp.zeros((G, K, Q, R), jnp.float32),
            jnp.zeros((G, K, Q, R, Dh), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jnp.max(num_blocks), body, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.transpose(0, 2, 1, 3, 4).astype(q.dtype)
