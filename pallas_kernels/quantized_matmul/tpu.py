"""Mosaic TPU kernel: x [M, K] (bf16 or float32) times a quantized weight [K, N] (int8, int4 or
fp8 values [N, K] with scales per group of input channels), dequantized tile by tile in VMEM.

Grid (M blocks, N blocks, K blocks), K innermost with a float32 accumulator in VMEM. Each K tile
holds whole scale groups (or lies inside one, per channel). Per group, the kernel contracts the
activations with the group's raw levels (a [N, K] tile contracted on its minor axis, as the MXU
takes a transposed operand), subtracts the zero level times the activations' sum, and scales
the product's columns, so neither a scale nor a zero has to be spread over rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul.reference import QuantScheme


def _tile_k(k: int, g: int) -> int:
    """A K tile that holds whole groups (or lies inside one): the largest of 512, 256, 128 that
    divides K and is a multiple of g or divides g; K itself when none does."""
    for bk in (512, 256, 128):
        if k % bk == 0 and (bk % g == 0 or g % bk == 0):
            return bk
    return k


def supports(x: jax.Array, values: jax.Array, scheme: QuantScheme) -> bool:
    k = x.shape[1]
    return k % scheme.group(k) == 0 and x.dtype in (jnp.bfloat16, jnp.float32)


@functools.partial(jax.jit, static_argnames=("scheme", "out_dtype", "block_m", "block_n", "interpret"))
def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None, block_m: int = 256, block_n: int = 256,
                     interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    m, k = x.shape
    n = values.shape[0]
    g = scheme.group(k)
    bk = _tile_k(k, g)
    # Pad M to the sublane tile and N to the block (zero levels and unit scales: zero columns).
    bm = min(block_m, -(-m // 16) * 16)
    mp = -(-m // bm) * bm
    bn = block_n if n > block_n else -(-n // 128) * 128
    np_ = -(-n // bn) * bn
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    pad_n = ((0, 0), (0, np_ - n))
    values = jnp.pad(values, ((0, np_ - n), (0, 0)))
    scales = jnp.pad(scales, pad_n, constant_values=1.0)
    rows = scales.shape[0]
    operands = [x, values, scales]
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
                pl.BlockSpec((rows, bn), lambda i, j, kk: (0, j))]
    if zeros is not None:
        operands.append(jnp.pad(zeros, pad_n))
        in_specs.append(pl.BlockSpec((rows, bn), lambda i, j, kk: (0, j)))
    groups = max(bk // g, 1)  # scale groups in a K tile
    width = bk // groups  # input channels of one group within the tile

    def kernel(x_ref, v_ref, s_ref, *rest):
        z_ref = rest[0] if zeros is not None else None
        o_ref, acc_ref = rest[-2], rest[-1]
        kk = pl.program_id(2)

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        xt = x_ref[...]
        levels = v_ref[...]  # [bn, bk]
        first_row = kk * bk // g  # the tile's first scale group
        acc = acc_ref[...]
        for j in range(groups):
            row = first_row + j
            s = s_ref[pl.ds(row, 1), :]  # [1, bn]
            cols = slice(j * width, (j + 1) * width)
            xg = xt[:, cols]
            part = jax.lax.dot_general(xg, levels[:, cols].astype(xt.dtype), (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            if z_ref is not None:  # sum_k x_k (q_k - z) = x . q - z sum_k x_k: no zero spread over rows
                part = part - jnp.sum(xg.astype(jnp.float32), axis=1, keepdims=True) * z_ref[pl.ds(row, 1), :]
            acc = acc + part * s
        acc_ref[...] = acc

        @pl.when(kk == pl.num_programs(2) - 1)
        def _():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn, k // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype or x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*operands)
    return out[:m, :n]
