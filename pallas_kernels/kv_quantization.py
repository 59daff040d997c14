"""Quantized KV pages: int8 or fp8 values with one float32 scale per token and
KV head, stored [num_pages, kv_heads, page_size] so one page of one head has
its scales contiguous (one small DMA beside the page)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize(pages: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """Quantized pages [N, page_size, K, D] with scales [N, K, page_size] -> dtype."""
    if scale is None:
        return pages
    return (pages.astype(jnp.float32) * scale.transpose(0, 2, 1)[..., None]).astype(dtype)


def quantize(values: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Pages [N, page_size, K, D] -> (int8 or fp8 pages, scales [N, K, page_size]):
    one absmax scale per token and KV head."""
    dtype = jnp.dtype(dtype)
    top = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(values.astype(jnp.float32)), axis=-1)  # [N, ps, K]
    scale = jnp.where(amax == 0, 1.0, amax / top)
    q = values.astype(jnp.float32) / scale[..., None]
    q = jnp.round(q).astype(dtype) if dtype == jnp.int8 else q.astype(dtype)
    return q, scale.transpose(0, 2, 1)
