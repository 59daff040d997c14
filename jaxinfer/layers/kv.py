"""What a layer keeps per token in the paged KV cache, and the write into the pages.

A family declares its entries (`cache_entries(cfg)`): a GQA layer has `k` and
`v` ([kv_heads, head_dim] per token); an MLA layer would have one `latent`
([1, kv_lora_rank + rope_dim]). The pools themselves are built from that
declaration in jaxinfer/kv_cache.py.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    shape: tuple[int, ...]  # per token, e.g. (kv_heads, head_dim)
    logical_axes: tuple[str | None, ...]  # e.g. ("kv_heads", "head_dim")
    # The pool's pages axis: "pages" (whole on every device of the tensor axis) or "seq_pages" (split over
    # it, each device holding a partition of the pages: MLA's data-parallel attention, whose one latent head
    # would otherwise be replicated on every device).
    pages_axis: str = "pages"


def write(pages: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """Store `values` [T, ...] at flat slots [T] of `pages` [num_pages, page_size, ...]
    (page * page_size + offset), cast to the pages' dtype; out-of-range slots are dropped."""
    num_pages, page_size = pages.shape[:2]
    flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
    flat = flat.at[slots].set(values.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)
