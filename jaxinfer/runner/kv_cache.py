"""Paged KV cache: the device page pools (the host side is `jaxinfer.core.page_pool`).

Each layer owns one array per cache entry, shaped [num_pages, page_size, *entry].
The model family declares its entries (`cache_entries`, see jaxinfer/layers/kv.py,
which also holds the write into the pages) and the cache is built from that
declaration, so allocation and sharding work for any attention type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer import sharding
from jaxinfer.layers.kv import CacheEntry
from jaxinfer.models import ModelConfig, family

KVCache = list[dict[str, jax.Array]]  # per layer: entry name -> [num_pages, page_size, ...]


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    entries: Mapping[str, CacheEntry]
    dtype: jnp.dtype

    @classmethod
    def for_model(cls, cfg: ModelConfig, *, num_pages: int, page_size: int, dtype) -> CacheSpec:
        """The pools for `cfg`'s family: its entries, one set per layer, in `dtype` (the
        model's compute dtype unless a cache dtype is configured: LoadedModel.kv_cache_dtype)."""
        return cls(num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
                   entries=family(cfg).cache_entries(cfg), dtype=jnp.dtype(dtype))

    def array_shape(self, name: str) -> tuple[int, ...]:
        return (self.num_pages, self.page_size, *self.entries[name].shape)

    def logical_axes(self, name: str) -> tuple[str | None, ...]:
        return (self.entries[name].pages_axis, "page", *self.entries[name].logical_axes)

    @property
    def splits_pages(self) -> bool:
        """Whether an entry's pages are split over the tensor axis by sequence ("seq_pages")."""
        return any(e.pages_axis == "seq_pages" for e in self.entries.values())

    def partitions(self, mesh: Mesh | None) -> int:
        """How many partitions the host's page pool keeps (core/page_pool.py): the tensor axis's size where
        the pages are split over it and it divides them, else 1."""
        tp = mesh.shape.get("tensor", 1) if mesh is not None else 1
        return tp if self.splits_pages and tp > 1 and self.num_pages % tp == 0 else 1

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



def abstract(spec: CacheSpec, mesh) -> KVCache:
    """The pools as abstract values (jax.ShapeDtypeStruct in their shardings), for exporting a step for a
    mesh that is not here (a TPU pod's, from the CPU: an AbstractMesh)."""
    return [{name: jax.ShapeDtypeStruct(spec.array_shape(name), spec.dtype, sharding=sharding.named_sharding(
        spec.logical_axes(name), spec.array_shape(name), mesh)) for name in spec.entries}
            for _ in range(spec.num_layers)]
