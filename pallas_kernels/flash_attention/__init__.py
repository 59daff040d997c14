"""Causal prefill flash attention over variable-length sequences packed in one
batch, with GQA.

`reference.py` is the pure-JAX reference, `tpu.py` the Mosaic TPU kernel; a GPU
kernel comes beside them as `gpu.py`. `flash_attention` picks by the platform it
is lowered for (so `jax.export(..., platforms=['tpu'])` on a CPU host gets the
TPU kernel); `interpret=` forces the TPU kernel in interpret mode, for tests.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from pallas_kernels.flash_attention import reference as _reference
from pallas_kernels.flash_attention import tpu as _tpu

reference = _reference.flash_attention


def flash_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    cu_seqlens: jax.Array,  # [S + 1] int32, cu_seqlens[0] == 0
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret=None,  # None: by platform; True or pltpu.InterpretParams: TPU kernel, interpreted
) -> jax.Array:  # [T, q_heads, head_dim]; padding rows are zero
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if interpret is not None and interpret is not False:
        return _tpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **options)
    # No GPU kernel yet: GPU and CPU take the reference.
    return lax.platform_dependent(
        q, k, v, cu_seqlens,
        tpu=functools.partial(_tpu.flash_attention, **options),
        default=functools.partial(reference, **options))


__all__ = ["flash_attention", "reference"]
