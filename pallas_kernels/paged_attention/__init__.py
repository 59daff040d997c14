"""Ragged paged attention over a paged KV cache.

`reference.py` is the pure-JAX reference, `tpu.py` the Mosaic TPU kernel and
`gpu.py` the Mosaic GPU (Hopper) kernel. `ragged_paged_attention` picks by the
platform it is lowered for (so `jax.export(..., platforms=['tpu'])` or
`platforms=['cuda']` on a CPU host gets that kernel); each kernel is used only
where its `supports` accepts the inputs, the reference otherwise.
`interpret=` forces a kernel in interpret mode, for tests:
`plgpu.InterpretGPUParams` the GPU kernel, `True` or `pltpu.InterpretParams`
the TPU kernel. `reference` is the reference function itself.
"""

from __future__ import annotations

import jax
from jax import lax

from pallas_kernels.paged_attention import reference as _reference

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
    k_scale: jax.Array | None = None,  # [num_pages, kv_heads, page_size] f32 for int8/fp8 pages
    v_scale: jax.Array | None = None,
    interpret=None,  # None: by platform; plgpu.InterpretGPUParams: GPU kernel; True/pltpu.InterpretParams: TPU
) -> jax.Array:  # [T, q_heads, head_dim], rows of padding tokens are zero
    # The kernels (and Mosaic GPU) are imported when traced, not when this package is.
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.paged_attention import gpu as _gpu
    from pallas_kernels.paged_attention import tpu as _tpu

    options = dict(max_q_len=max_q_len, sm_scale=sm_scale, sliding_window=sliding_window,
                   soft_cap=soft_cap)
    args = (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    scales = () if k_scale is None and v_scale is None else (k_scale, v_scale)
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return _gpu.ragged_paged_attention(*args, k_scale=k_scale, v_scale=v_scale,
                                           interpret=interpret, **options)
    if interpret is not None and interpret is not False:
        return _tpu.ragged_paged_attention(*args, k_scale=k_scale, v_scale=v_scale,
                                           interpret=interpret, **options)

    def with_scales(fn):
        def call(*operands):
            k_s, v_s = operands[6:] if scales else (None, None)
            return fn(*operands[:6], k_scale=k_s, v_scale=v_s, **options)
        return call

    use_gpu = _gpu.supports(q, k_pages, v_pages, k_scale, v_scale) is None
    use_tpu = _tpu.supports(q, k_pages, v_pages, k_scale, v_scale) is None
    return lax.platform_dependent(
        *args, *scales,
        tpu=with_scales(_tpu.ragged_paged_attention if use_tpu else reference),
        cuda=with_scales(_gpu.ragged_paged_attention if use_gpu else reference),
        default=with_scales(reference))


__all__ = ["ragged_paged_attention", "reference"]
