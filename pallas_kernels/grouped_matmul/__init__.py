"""Grouped matmuls: each row of x times the weight of its own group (an MoE's rows by their expert).

`reference.py` defines the operation and the tile plan; `gpu.py` is the Mosaic GPU kernel for decode-sized
groups. `grouped_matmul_many` is the one entry point (jaxinfer/layers/moe.py calls it). It picks by the
platform it is lowered for, as the other kernels do: on CUDA, where the kernel takes the shapes (bf16),
the rows are laid out in tiles (`reference.plan`), run through the kernel and read back; elsewhere (CPU,
TPU, float32 weights) they are sorted by group for `jax.lax.ragged_dot` and put back in order.
`interpret=plgpu.InterpretGPUParams()` forces the GPU kernel in interpret mode, for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import reference as _reference
from pallas_kernels.grouped_matmul.reference import Plan, plan

reference = _reference.grouped_matmul  # the pure-JAX matmul the kernels are checked against


def grouped_matmul_many(x: jax.Array, weights, group: jax.Array, *, interpret=None) -> list[jax.Array]:
    """x [R, K] times each weight of `weights` ([G, K, N_i], the same G and K), row r by w[group[r]]
    (group [R] int32 in 0..G, G for a row of no group, which gives zeros): [[R, N_i], ...] in x's dtype,
    accumulated in float32. Rows need not be sorted."""
    from pallas_kernels.grouped_matmul import gpu as _gpu

    weights = tuple(weights)
    num_groups = weights[0].shape[0]

    def kernel(x, group, *weights):
        p = plan(group, num_groups)
        outs = _gpu.grouped_matmul_many(p.gather(x), weights, p.tile_group, tile_m=p.tile_m, interpret=interpret)
        return [p.scatter(y) for y in outs]

    if interpret is not None:
        return kernel(x, group, *weights)
    gpu_ok = all(_gpu.supports(x, w) is None for w in weights)
    return jax.lax.platform_dependent(x, group, *weights, cuda=kernel if gpu_ok else _ragged, default=_ragged)


def _ragged(x, group, *weights):
    """XLA: rows sorted by group, `jax.lax.ragged_dot` over each group's run, then put back in order. Rows of
    no group sort last, past every group, where ragged_dot leaves zeros."""
    num_groups = weights[0].shape[0]
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_groups).astype(jnp.int32)
    rows = x[order]
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return [jax.lax.ragged_dot(rows, w, sizes, preferred_element_type=jnp.float32)[back].astype(x.dtype)
            for w in weights]


__all__ = ["Plan", "grouped_matmul_many", "plan", "reference"]
