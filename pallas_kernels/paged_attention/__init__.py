"""Ragged paged attention over a paged KV cache.

`reference.py` is the pure-JAX reference, `tpu.py` the Mosaic TPU kernel; a GPU
kernel comes beside them as `gpu.py`. `ragged_paged_attention` picks by the
platform it is lowered for (so `jax.export(..., platforms=['tpu'])` on a CPU
host gets the TPU kernel); `interpret=` forces the TPU kernel in interpret
mode, for tests. `reference` is the reference function itself.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from pallas_kernels.paged_attention import reference as _reference
from pallas_kernels.paged_attention import tpu as _tpu

reference = _reference.ragged_paged_attention


def ragged_paged_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    max_q_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret=None,  # None: by platform; True or pltpu.InterpretParams: TPU kernel, interpreted
) -> jax.Array:  # [T, q_heads, head_dim], rows of padding tokens are zero
    options = dict(max_q_len=max_q_len, sm_scale=sm_scale, sliding_window=sliding_window,
                   soft_cap=soft_cap)
    if interpret is not None and interpret is not False:
        return _tpu.ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                           interpret=interpret, **options)
    # No GPU kernel yet: GPU and CPU take the reference.
    return lax.platform_dependent(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
        tpu=functools.partial(_tpu.ragged_paged_attention, **options),
        default=functools.partial(reference, **options))


__all__ = ["ragged_paged_attention", "reference"]
