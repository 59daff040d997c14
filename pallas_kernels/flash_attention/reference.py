"""Pure-JAX causal prefill attention over packed variable-length sequences.

Sequence `s` owns tokens `cu_seqlens[s]:cu_seqlens[s+1]` of the packed batch and
attends causally within itself only; tokens at or past `cu_seqlens[-1]` are
padding and come out as zeros. Keys and values are grouped (GQA): query head `h`
reads KV head `h // (q_heads // kv_heads)`.

Dense [T, T] masking: exists to be obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flash_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    cu_seqlens: jax.Array,  # [S + 1] int32, cu_seqlens[0] == 0
    *,
    sm_scale: float,
    sliding_window: int | None = None,  # attend to keys with q_pos - k_pos < window
    soft_cap: float | None = None,  # scores -> soft_cap * tanh(scores / soft_cap)
) -> jax.Array:  # [T, q_heads, head_dim]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens, t, side="right") - 1  # [T]
    valid = t < cu_seqlens[-1]
    mask = (seq[:, None] == seq[None, :]) & (t[None, :] <= t[:, None]) & valid[:, None]
    if sliding_window is not None:
        mask &= t[:, None] - t[None, :] < sliding_window  # [Tq, Tk]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("qkgd,lkd->kgql", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # padding rows
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("kgql,lkd->qkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
