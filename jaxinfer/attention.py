"""The one attention function models call; it picks an implementation.

Every attention type is paged. For now the pure-JAX reference serves every
platform; the Pallas kernels (pallas_kernels/) plug in here behind the same
signature.
"""

from __future__ import annotations

import jax

from jaxinfer.batch import Batch
from pallas_kernels.paged_attention import reference


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: Batch, *,
                    sm_scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> jax.Array:
    """q: [T, H, D] over pages [num_pages, page_size, K, D] -> [T, H, D]."""
    return reference(q, k_pages, v_pages, batch.kv_lens, batch.page_table, batch.cu_q_lens,
                     max_q_len=batch.max_q_len, sm_scale=sm_scale,
                     sliding_window=sliding_window, soft_cap=soft_cap)
