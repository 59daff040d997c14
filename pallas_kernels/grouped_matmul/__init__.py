"""Grouped matmuls: each row of x times the weight of its own group (an MoE's rows by their expert).

`reference.py` defines the operation and the tile plan; `gpu.py` is the Mosaic GPU kernel for decode-sized
groups. `grouped_matmul_many` is the entry point, and `grouped_swiglu` (what jaxinfer/layers/moe.py calls)
runs an expert MLP's three matmuls on one layout of the rows. Both pick by the platform they are lowered
for, as the other kernels do: on CUDA, where the kernel takes the shapes (bf16),
the rows are laid out in tiles (`reference.plan`), run through the kernel and read back; elsewhere (CPU,
TPU, float32 weights) they are sorted by group for `jax.lax.ragged_dot` and put back in order.
`interpret=plgpu.InterpretGPUParams()` forces the GPU kernel in interpret mode, for tests.

`dense_matmul_many` is the same kernel with one group, for a decode step's small dense projections: at most
DENSE_MAX_M rows and DENSE_MAX_BYTES of weights per launch, where cuBLAS is latency-bound. On an H200
(scripts/check_dense_gpu.py, docs/benchmarks.md) DeepSeek-V2-Lite's q + kv_a, o and shared-expert projections
(8 to 23 MB) take 2 to 3.7 times less time through it; Llama-3-8B's (34 MB and up) ran as fast through cuBLAS,
whose float32 head also stays (the kernel's float32 output takes partials that XLA sums). Its K splits fill
the SMs; a projection whose K does not split enough stays with cuBLAS.
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


DENSE_MAX_M = 64  # rows up to which dense projections take the kernel on CUDA (cuBLAS above)
DENSE_MAX_BYTES = 32 << 20  # weight bytes per launch below which they do


def dense_matmul_many(x: jax.Array, weights, *, out_dtype=None, interpret=None) -> list[jax.Array]:
    """x [M, K] times each weight of `weights` ([K, N_i]) : [[M, N_i], ...] in `out_dtype` (x's by default),
    accumulated in float32, as `jnp.dot(x, w, preferred_element_type=out_dtype)` gives. On CUDA, for bf16 of
    at most DENSE_MAX_M rows and widths the kernel tiles, the weights share one launch of the grouped kernel
    (see the module docstring); elsewhere each is XLA's dot."""
    from pallas_kernels.grouped_matmul import gpu as _gpu

    weights = tuple(weights)
    m = x.shape[0]

    def xla(x):
        return [jnp.dot(x, w, preferred_element_type=out_dtype) for w in weights]

    def kernel(x):
        tile_m = max(8, -(-m // 8) * 8)
        rows = jnp.pad(x, ((0, tile_m - m), (0, 0))) if tile_m != m else x
        n_tiles = sum(w.shape[1] for w in weights) // _gpu.TILE_N
        config = _gpu.dense_config(tile_m, x.shape[1], n_tiles)
        ys = _gpu.grouped_matmul_many(rows, tuple(w[None] for w in weights), jnp.zeros((1,), jnp.int32),
                                      tile_m=tile_m, config=config, out_dtype=out_dtype, interpret=interpret)
        return [y[:m] if tile_m != m else y for y in ys]

    if interpret is not None:
        return kernel(x)
    if not _dense_takes_kernel(x, weights, out_dtype):
        return xla(x)
    return jax.lax.platform_dependent(x, cuda=kernel, default=xla)


def _dense_takes_kernel(x, weights, out_dtype) -> bool:
    from pallas_kernels.grouped_matmul import gpu as _gpu

    if x.shape[0] > DENSE_MAX_M or jnp.dtype(out_dtype or x.dtype) != x.dtype:
        return False
    if any(_gpu.supports(x, w[None]) is not None for w in weights):
        return False
    if sum(w.size * w.dtype.itemsize for w in weights) >= DENSE_MAX_BYTES:
        return False
    n_tiles = sum(w.shape[1] for w in weights) // _gpu.TILE_N
    return n_tiles * _gpu.dense_config(8, x.shape[1], n_tiles).splits >= _gpu.MIN_BLOCKS


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


__all__ = ["DENSE_MAX_BYTES", "DENSE_MAX_M", "Plan", "dense_matmul_many", "grouped_matmul_many", "grouped_swiglu",
           "plan", "reference"]
