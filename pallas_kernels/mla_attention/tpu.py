"""MLA over paged latent entries on TPU: pallas_kernels/paged_attention/tpu.py's ragged kernel in its
shared-page mode (`value_dim`). Every query head reads the one latent head, so a query block's rows are
block_q tokens x all heads (a decode token alone fills `heads` rows of the MXU), and each page is fetched
once for both products: the scores against the whole entry, the values from its first value_dim lanes.

Entries are kept at their own width (kv_lora_rank + rope_dim: 576 at DeepSeek's shapes, the format's
minimum of 1,152 bytes a token in bf16): the tile's last dimension is the whole entry, which Mosaic
takes at any width; tpu-inference and sglang-jax pad the rope part to 128 lanes (640 values, 11% more
bytes a token) to keep the lanes aligned.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import tpu as _paged


def supports(q: jax.Array, latent_pages: jax.Array, value_dim: int) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    page_size, width = latent_pages.shape[1], latent_pages.shape[-1]
    if q.shape[-1] != width:
        return f"query width {q.shape[-1]} is not the entries' {width}"
    if value_dim % 128:
        return f"value_dim {value_dim} is not a multiple of 128 lanes"
    if page_size % 8:
        return f"page_size {page_size} is not a multiple of 8"
    return None


def mla_attention(q, latent_pages, kv_lens, page_table, cu_q_lens, *, value_dim: int, max_q_len: int,
                  sm_scale: float, block_q: int | None = None, pages_per_block: int = 1,
                  interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """q [T, heads, L + R] over latent pages [num_pages, page_size, L + R] -> [T, heads, value_dim]."""
    return _paged.ragged_paged_attention(
        q, latent_pages[:, :, None, :], None, kv_lens, page_table, cu_q_lens, max_q_len=max_q_len,
        sm_scale=sm_scale, block_q=block_q, pages_per_block=pages_per_block, interpret=interpret,
        value_dim=value_dim)
