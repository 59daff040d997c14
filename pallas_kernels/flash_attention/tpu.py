"""Causal prefill flash attention over packed variable-length sequences: a
Mosaic TPU Pallas kernel.

Grid (q_head, q_block, kv_block), kv innermost. Each q block keeps a running
max, denominator and accumulator in VMEM (online softmax) while it walks the KV
blocks. Which KV blocks a q block can see at all is computed on the host side of
the call and scalar-prefetched: `kv_lo[i]..kv_hi[i]` (inclusive) is the range
that holds any key in the same sequence as, and not after, some query of block
`i` (and inside the sliding window). Blocks outside it skip compute, and their
index map clamps into the range so the pipeline does not fetch them either.
GQA lives in the index maps: query head `h` reads KV head `h // group`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.online_softmax import MASK_VALUE

NO_SEQ = 2**30  # sequence start given to padding queries: they see no key


def _block_ranges(cu_seqlens, num_q_blocks, block_q, block_kv, sliding_window):
    """Per q block: the first and last KV block (inclusive) it can see, and
    per token the start of its sequence (NO_SEQ for padding tokens)."""
    total = cu_seqlens[-1]
    t = jnp.arange(num_q_blocks * block_q, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_seqlens, t, side="right") - 1, 0, cu_seqlens.shape[0] - 2)
    seq_start = jnp.where(t < total, cu_seqlens[seq], NO_SEQ).astype(jnp.int32)  # [T_pad]

    first = jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q
    last = jnp.minimum(first + block_q - 1, total - 1)
    lo_tok = seq_start[first]
    if sliding_window is not None:
        lo_tok = jnp.maximum(lo_tok, first - sliding_window + 1)
    empty = first >= total
    kv_lo = jnp.where(empty, 0, lo_tok // block_kv).astype(jnp.int32)
    kv_hi = jnp.where(empty, -1, last // block_kv).astype(jnp.int32)
    return kv_lo, kv_hi, seq_start


def _kernel(kv_lo_ref, kv_hi_ref, seq_start_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
            sm_scale, sliding_window, soft_cap, block_q, block_kv):
    qi, ki = pl.program_id(1), pl.program_id(2)

    @pl.when(ki == 0)
    def _init():
        online_softmax.init(m_ref, l_ref, acc_ref)

    @pl.when((ki >= kv_lo_ref[qi]) & (ki <= kv_hi_ref[qi]))
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [bq, bk]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_pos = ki * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (k_pos <= q_pos) & (k_pos >= seq_start_ref[...])  # [bq, 1] broadcasts
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        s = jnp.where(mask, s, MASK_VALUE)

        online_softmax.update(m_ref, l_ref, acc_ref, s, mask, v_ref[...])

    @pl.when(ki == pl.num_programs(2) - 1)
    def _finish():
        online_softmax.finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q",
                                             "block_kv", "interpret"))
def flash_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    cu_seqlens: jax.Array,  # [S + 1] int32, cu_seqlens[0] == 0
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int = 128,
    block_kv: int = 128,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:  # [T, q_heads, head_dim]; padding rows are zero
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q_heads {num_q_heads} not a multiple of kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads

    padded = -(-num_tokens // math.lcm(block_q, block_kv)) * math.lcm(block_q, block_kv)
    num_q_blocks, num_kv_blocks = padded // block_q, padded // block_kv
    pad = ((0, 0), (0, padded - num_tokens), (0, 0))
    qt = jnp.pad(q.transpose(1, 0, 2), pad)  # [H, T_pad, D]
    kt = jnp.pad(k.transpose(1, 0, 2), pad)  # [K, T_pad, D]
    vt = jnp.pad(v.transpose(1, 0, 2), pad)
    cu_seqlens = cu_seqlens.astype(jnp.int32)
    kv_lo, kv_hi, seq_start = _block_ranges(cu_seqlens, num_q_blocks, block_q, block_kv, sliding_window)

    def kv_index(h, i, j, kv_lo, kv_hi):
        return lax.div(h, group), jnp.clip(j, kv_lo[i], jnp.maximum(kv_hi[i], kv_lo[i])), 0

    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, block_q=block_q, block_kv=block_kv)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_q_heads, num_q_blocks, num_kv_blocks),
            in_specs=[
                pl.BlockSpec((block_q, 1), lambda h, i, j, *_: (i, 0)),
                pl.BlockSpec((None, block_q, head_dim), lambda h, i, j, *_: (h, i, 0)),
                pl.BlockSpec((None, block_kv, head_dim), kv_index),
                pl.BlockSpec((None, block_kv, head_dim), kv_index),
            ],
            out_specs=pl.BlockSpec((None, block_q, head_dim), lambda h, i, j, *_: (h, i, 0)),
            scratch_shapes=[
                pltpu.VMEM((block_q, 1), jnp.float32),  # running max
                pltpu.VMEM((block_q, 1), jnp.float32),  # running denominator
                pltpu.VMEM((block_q, head_dim), jnp.float32),  # accumulator
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(kv_lo, kv_hi, seq_start[:, None], qt, kt, vt)
    return out[:, :num_tokens].transpose(1, 0, 2)
