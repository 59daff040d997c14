"""Pure-JAX multi-head latent attention over paged latent entries: the reference the kernels are checked
against. Dense and obviously right, not fast.

Each token's cache entry is one vector [kv_lora_rank + rope_dim]: its normalized compressed KV (the first
`value_dim` = kv_lora_rank values) and its roped key part. In the absorbed form every query head h brings
one query of the same width (q_nope . W_UK of head h, then its roped part), scores every entry with a dot
product, and reads back the softmax-weighted sum of the entries' first value_dim values (W_UV comes after,
outside). Queries are a ragged batch as in pallas_kernels/paged_attention: sequence s owns query tokens
cu_q_lens[s]:cu_q_lens[s+1], its last q_len positions of kv_lens[s]; page page_table[s, i] holds its
positions i * page_size ... (i + 1) * page_size - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_attention(
    q: jax.Array,  # [T, heads, kv_lora_rank + rope_dim]
    latent_pages: jax.Array,  # [num_pages, page_size, kv_lora_rank + rope_dim]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    value_dim: int,  # kv_lora_rank
    max_q_len: int,
    sm_scale: float,
) -> jax.Array:  # [T, heads, value_dim]; rows of padding tokens are zero
    num_tokens = q.shape[0]
    num_seqs, pages_per_seq = page_table.shape
    page_size = latent_pages.shape[1]
    ctx = pages_per_seq * page_size
    entries = latent_pages[page_table].reshape(num_seqs, ctx, -1).astype(jnp.float32)  # [S, ctx, L + R]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, num_seqs - 1)
    real = t < cu_q_lens[-1]
    pos = kv_lens[seq] - q_lens[seq] + (t - cu_q_lens[seq])  # each query token's position
    keys = entries[seq]  # [T, ctx, L + R]
    scores = jnp.einsum("thd,tcd->thc", q.astype(jnp.float32), keys,
                        precision=jax.lax.Precision.HIGHEST) * sm_scale
    visible = (jnp.arange(ctx)[None, :] <= pos[:, None]) & real[:, None]  # [T, ctx]
    scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    probs = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("thc,tcv->thv", probs, keys[..., :value_dim], precision=jax.lax.Precision.HIGHEST)
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)
