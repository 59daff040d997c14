"""Mosaic GPU (Hopper) grouped matmul for decode-sized groups: each tile of `tile_m` rows (reference.plan's
layout) times its group's weight [K, N] (bf16), every weight byte read once per tile.

In decode an expert sees a few rows (1 to a few dozen), so the weight is the operand that streams and the
rows are the small one. As in pallas_kernels/quantized_matmul/gpu.py the kernel computes y^T = W^T x^T:
the weight tile is wgmma's left operand (M = 64 outputs; the [tile_k, 64] block of the stored [K, N]
weight, read transposed from SMEM) and the tile's rows its right one (N = tile_m, 8 to 128). XLA's
`ragged_dot` on the GPU instead pads every group to its own large row tile.

One CUDA block per (64 outputs, tile): it reads the tile's group from GMEM, skips the tile when that is G
(a tile past the routing's), and otherwise runs a pipeline of `stages` TMA loads (x tile [tile_m, tile_k],
weight tile [tile_k, 64] of w[group]) feeding one warpgroup, then stores its [tile_m, 64] of y.
`grouped_matmul_many` puts several weights that read the same rows (an expert's gate and up) on one grid.

`interpret=plgpu.InterpretGPUParams()` runs it on the CPU, with a plain dot into SMEM in place of the
wgmma (as the quantized kernel's interpret path does); the pipeline, the tiles' indices and the skipping
are the kernel's own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_N = 64  # outputs per block: one wgmma M


@dataclasses.dataclass(frozen=True)
class Config:
    tile_k: int  # input channels per pipeline step
    stages: int  # steps in flight


def supports(x: jax.Array, w: jax.Array) -> str | None:
    """None when the kernel takes x [rows, K] and w [G, K, N], else why not."""
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return f"dtypes {x.dtype} x {w.dtype} (bf16 only)"
    k, n = w.shape[1:]
    if n % TILE_N:
        return f"N = {n} is not a multiple of {TILE_N}"
    if k % 64:
        return f"K = {k} is not a multiple of 64"
    return None


def default_config(tile_m: int, k: int, num_tiles: int) -> Config:
    """64-channel K steps; 4 in flight while there are few tiles (one token: 6), else 2, so more blocks fit an
    SM. From the H200 sweep (scripts/probe_moe_layer.py, V2-Lite experts): at T = 1 gate+up 17.6 us with
    (64, 4) against 20.1 with (64, 2); at T = 64 174.0 us with (64, 2) against 178.4 with (128, 4); at T = 256
    187.8 against 197.6 (64, 4) and 197.1 (128, 2)."""
    tile_k = next(t for t in (64, 128) if k % t == 0)
    return Config(tile_k, 4 if num_tiles <= 16 else 2)


def _transforms(cols: int):
    swizzle = min(128, cols * 2)
    return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("tile_m", "config", "interpret"))
def grouped_matmul_many(x_tiles: jax.Array, weights, tile_group: jax.Array, *, tile_m: int,
                        config: Config | None = None, interpret=None) -> list[jax.Array]:
    """x_tiles [W * tile_m, K] (bf16) times each weight of `weights` ([G, K, N_i], bf16), tile t by
    weight[tile_group[t]]: [[W * tile_m, N_i] bf16, ...]. Tiles of group G are skipped: their rows of y
    are left unwritten (whatever the buffer held), so the caller reads only its plan's slots."""
    rows, k = x_tiles.shape
    num_tiles = tile_group.shape[0]
    if rows != num_tiles * tile_m or tile_m % 8 or not 8 <= tile_m <= 256:
        raise ValueError(f"grouped_matmul GPU kernel: {rows} rows are not {num_tiles} tiles of {tile_m} "
                         "(a multiple of 8 up to 256)")
    num_groups = weights[0].shape[0]
    ns = [w.shape[2] for w in weights]
    for w in weights:
        why = supports(x_tiles, w)
        if why is not None:
            raise ValueError(f"grouped_matmul GPU kernel: {why}")
        if w.shape[:2] != (num_groups, k):
            raise ValueError(f"grouped_matmul GPU kernel: weight {w.shape} does not take [{num_groups}, {k}, N]")
    config = config or default_config(tile_m, k, num_tiles)
    tile_k = config.tile_k
    if k % tile_k:
        raise ValueError(f"grouped_matmul GPU kernel: tile_k {tile_k} does not divide K = {k}")
    on_gpu = interpret in (None, False)
    bounds = [0]
    for n in ns:
        bounds.append(bounds[-1] + n // TILE_N)  # the weights' output tiles, one after another on the grid
    n_out = len(weights)

    def kernel(group_gmem, x_gmem, *rest):
        w_gmems, out_gmems, (out_smem,) = rest[:n_out], rest[n_out:2 * n_out], rest[2 * n_out:]
        global_tile, t = lax.axis_index("n"), lax.axis_index("tile")
        group = group_gmem[t]

        def one_weight(w_gmem, out_gmem, tile):
            x_spec = plgpu.BlockSpec((tile_m, tile_k), lambda kk: (t, kk), transforms=_transforms(tile_k))
            w_spec = plgpu.BlockSpec((tile_k, TILE_N), lambda kk: (kk, tile), transforms=_transforms(TILE_N))

            def step(_, x_smem, w_smem, acc):
                if on_gpu:
                    plgpu.wgmma(acc, w_smem.T, x_smem.T)
                    plgpu.wgmma_wait(0)  # the slot is refilled once this step returns
                else:
                    acc[...] += lax.dot_general(w_smem[...], x_smem[...], (((0,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32)

            def scope(acc):
                if not on_gpu:
                    acc[...] = jnp.zeros_like(acc)
                plgpu.emit_pipeline(functools.partial(step, acc=acc), grid=(k // tile_k,), in_specs=[x_spec, w_spec],
                                    max_concurrent_steps=config.stages)(x_gmem, w_gmem.at[group])
                out_smem.T[...] = acc[...].astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(t * tile_m, tile_m), pl.ds(tile * TILE_N, TILE_N)])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(scope, plgpu.ACC((TILE_N, tile_m), jnp.float32) if on_gpu
                          else plgpu.SMEM((TILE_N, tile_m), jnp.float32))

        @pl.when(group < num_groups)
        def _():
            if n_out == 1:
                one_weight(w_gmems[0], out_gmems[0], global_tile)
            for i in range(n_out if n_out > 1 else 0):
                pl.when((global_tile >= bounds[i]) & (global_tile < bounds[i + 1]))(
                    functools.partial(one_weight, w_gmems[i], out_gmems[i], global_tile - bounds[i]))

    return plgpu.kernel(
        kernel, out_type=[jax.ShapeDtypeStruct((rows, n), x_tiles.dtype) for n in ns],
        grid=(bounds[-1], num_tiles), grid_names=("n", "tile"),
        scratch_types=[plgpu.SMEM((tile_m, TILE_N), x_tiles.dtype)],
        compiler_params=plgpu.CompilerParams(), interpret=interpret,
    )(tile_group.astype(jnp.int32), x_tiles, *weights)
