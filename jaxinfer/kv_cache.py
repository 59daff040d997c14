"""Paged KV cache: the device page pools (the host side is `jaxinfer.core.page_pool`).

Each layer owns one array per cache entry, shaped [num_pages, page_size, *entry].
A GQA layer has entries `k` and `v` ([kv_heads, head_dim] per token); an MLA
layer would have one `latent` entry ([1, kv_lora_rank + rope_dim]). The model
family declares its entries (`cache_entries`) and the cache is built from that
declaration, so allocation, sharding and writing work for any attention type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer import sharding

KVCache = list[dict[str, jax.Array]]  # per layer: entry name -> [num_pages, page_size, ...]


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    shape: tuple[int, ...]  # per token, e.g. (kv_heads, head_dim)
    logical_axes: tuple[str | None, ...]  # e.g. ("kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    entries: Mapping[str, CacheEntry]
    dtype: jnp.dtype

    def array_shape(self, name: str) -> tuple[int, ...]:
        return (self.num_pages, self.page_size, *self.entries[name].shape)

    def logical_axes(self, name: str) -> tuple[str | None, ...]:
        return ("pages", "page", *self.entries[name].logical_axes)

    @property
    def bytes_per_page(self) -> int:
        per_token = sum(math.prod(e.shape) for e in self.entries.values())
        return per_token * self.page_size * self.num_layers * jnp.dtype(self.dtype).itemsize


def allocate(spec: CacheSpec, mesh: Mesh | None = None) -> KVCache:
    """Zeroed page pools for every layer, sharded by their logical axes (one small program
    makes them all, straight into their shardings)."""
    shapes = {name: spec.array_shape(name) for name in spec.entries}

    def zeros():
        return [{name: jnp.zeros(shape, spec.dtype) for name, shape in shapes.items()}
                for _ in range(spec.num_layers)]
    if mesh is None:
        return jax.jit(zeros)()
    targets = {name: sharding.named_sharding(spec.logical_axes(name), shape, mesh) for name, shape in shapes.items()}
    return jax.jit(zeros, out_shardings=[dict(targets) for _ in range(spec.num_layers)])()


def write(pages: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """Store `values` [T, ...] at flat slots [T] of `pages` [num_pages, page_size, ...]."""
    num_pages, page_size = pages.shape[:2]
    flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
    flat = flat.at[slots].set(values.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)
