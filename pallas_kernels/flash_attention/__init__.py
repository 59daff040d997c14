"""Causal prefill flash attention over variable-length sequences packed in one
batch, with GQA.

`reference.py` is the pure-JAX reference, `tpu.py` the Mosaic TPU kernel and
`gpu.py` the Mosaic GPU (Hopper) kernel. `flash_attention` picks by the platform
it is lowered for (so `jax.export(..., platforms=['tpu'])` or
`platforms=['cuda']` on a CPU host gets that kernel); on CUDA the kernel is used
only where `gpu.supports` accepts the inputs (bf16/f16, head_dim a multiple of
64), the reference otherwise. `interpret=` forces a kernel in interpret mode, for
tests: `plgpu.InterpretGPUParams` the GPU kernel, `True` or
`pltpu.InterpretParams` the TPU kernel.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu as _gpu
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
    interpret=None,  # None: by platform; plgpu.InterpretGPUParams: GPU kernel; True/pltpu.InterpretParams: TPU
) -> jax.Array:  # [T, q_heads, head_dim]; padding rows are zero
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return _gpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **options)
    if interpret is not None and interpret is not False:
        return _tpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **options)
    on_cuda = _gpu.flash_attention if _gpu.supports(q, k, v) is None else reference
    return lax.platform_dependent(
        q, k, v, cu_seqlens,
        tpu=functools.partial(_tpu.flash_attention, **options),
        cuda=functools.partial(on_cuda, **options),
        default=functools.partial(reference, **options))


__all__ = ["flash_attention", "reference"]
