"""Pure-JAX ragged paged attention: the reference every kernel is checked against.

Queries are a ragged batch: sequence `s` owns query tokens
`cu_q_lens[s]:cu_q_lens[s+1]` (prefill chunks and single decode tokens alike),
which are its last `q_len` positions out of `kv_lens[s]`. Keys and values live
in pages: page `page_table[s, i]` holds positions `i*page_size:(i+1)*page_size`.
The new tokens' K/V must already be written into the pages.

Quantized pages (int8 or fp8) come with per-token, per-KV-head scales
`k_scale`/`v_scale` of shape [num_pages, kv_heads, page_size] float32: the
value is `page value * scale`. Without scales, pages hold the values themselves.

This version gathers each sequence's pages into a dense [S, P*page_size] block,
so it is memory-hungry; it exists to be obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quantization import dequantize


def ragged_paged_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    max_q_len: int,  # static bound on any sequence's q_len
    sm_scale: float,
    sliding_window: int | None = None,  # attend to keys with q_pos - k_pos < window
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
    k_scale: jax.Array | None = None,  # [num_pages, kv_heads, page_size] float32
    v_scale: jax.Array | None = None,
) -> jax.Array:  # [T, q_heads, head_dim], rows of padding tokens are zero
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, pages_per_seq = page_table.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads

    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    j = jnp.arange(max_q_len)
    token = cu_q_lens[:-1, None] + j[None, :]  # [S, Q] index into q
    q_valid = j[None, :] < q_lens[:, None]
    qs = q[jnp.clip(token, 0, num_tokens - 1)]  # [S, Q, H, D]
    qs = qs.reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)

    ctx = pages_per_seq * page_size
    k = dequantize(k_pages, k_scale, q.dtype)[page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)
    v = dequantize(v_pages, v_scale, q.dtype)[page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)

    q_pos = (kv_lens - q_lens)[:, None] + j[None, :]  # [S, Q]
    k_pos = jnp.arange(ctx)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[:, None, None])
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
    mask &= q_valid[:, :, None]  # [S, Q, L]

    scores = jnp.einsum("sqkgd,slkd->skgql", qs, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked rows
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("skgql,slkd->sqkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(num_seqs, max_q_len, num_q_heads, head_dim).astype(q.dtype)

    # Scatter each sequence's rows back to their token slots; invalid rows are dropped.
    target = jnp.where(q_valid, token, num_tokens)
    result = jnp.zeros_like(q)
    return result.at[target.reshape(-1)].set(
        out.reshape(-1, num_q_heads, head_dim), mode="drop")

