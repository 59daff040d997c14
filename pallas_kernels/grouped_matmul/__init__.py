"""Grouped matmuls: each row of x times the weight of its own group (an MoE's rows by their expert).

`reference.py` defines the operation and the tile plan; `gpu.py` is the Mosaic GPU kernel for decode-sized
groups. `grouped_matmul_many` is the entry point, and `grouped_swiglu` (what jaxinfer/layers/moe.py calls)
runs an expert MLP's three matmuls on one layout of the rows. Both pick by the platform they are lowered
for, as the other kernels do: on CUDA, where the kernel takes the shapes (bf16),
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
    weights = tuple(weights)
    return _dispatch(lambda matmul, rows: matmul(rows, weights), x, group, weights, interpret)


def grouped_swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, group: jax.Array, *,
                   interpret=None) -> jax.Array:
    """Each row through its group's SwiGLU MLP (an MoE's expert): silu(x gate[g]) * (x up[g]), in float32 and
    rounded to x's dtype, times down[g] (gate, up [G, K, I], down [G, I, N]): [R, N] in x's dtype. The rows
    are laid out once (one tile plan on CUDA, one sort elsewhere) for all three matmuls."""
    return _dispatch(_swiglu(gate, up, down), x, group, (gate, up, down), interpret)[0]


def _swiglu(gate, up, down):
    def body(matmul, rows):
        g, u = matmul(rows, (gate, up))
        h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(rows.dtype)
        return matmul(h, (down,))
    return body


def _dispatch(body, x, group, weights, interpret):
    """`body(matmul, rows)` on the rows laid out for the platform, its outputs back in row order: the tiles of
    the GPU kernel on CUDA where it takes every weight, the rows sorted for ragged_dot elsewhere."""
    from pallas_kernels.grouped_matmul import gpu as _gpu

    num_groups = weights[0].shape[0]

    def tiled(x, group):
        p = plan(group, num_groups)

        def matmul(rows, ws):
            return _gpu.grouped_matmul_many(rows, ws, p.tile_group, tile_m=p.tile_m, interpret=interpret)
        return [p.scatter(y) for y in body(matmul, p.gather(x))]

    def ragged(x, group):
        return _on_sorted_rows(body, x, group, num_groups)

    if interpret is not None:
        return tiled(x, group)
    gpu_ok = all(_gpu.supports(x, w) is None for w in weights)
    return jax.lax.platform_dependent(x, group, cuda=tiled if gpu_ok else ragged, default=ragged)


def _on_sorted_rows(body, x, group, num_groups):
    """XLA: `body` on the rows sorted by group, each matmul a `jax.lax.ragged_dot` over every group's run, then
    put back in order. Rows of no group sort last, past every group, where ragged_dot leaves zeros."""
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_groups).astype(jnp.int32)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))

    def matmul(rows, ws):
        return [jax.lax.ragged_dot(rows, w, sizes, preferred_element_type=jnp.float32).astype(rows.dtype)
                for w in ws]
    return [y[back] for y in body(matmul, x[order])]


__all__ = ["Plan", "grouped_matmul_many", "grouped_swiglu", "plan", "reference"]
