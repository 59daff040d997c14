"""Causal prefill flash attention over packed variable-length sequences: a
Mosaic GPU (Hopper, sm_90a) Pallas kernel.

FlashAttention-3 structure. One CUDA block per (q_head, q tile of
`2 * block_q` rows) runs three warpgroups:

* two compute warpgroups, `block_q` rows each: Q lives in SMEM, S = Q K^T and
  O += P V are `wgmma`s with the accumulators in registers (WGMMA layout),
  online softmax in base 2 with `sm_scale * log2(e)` folded into one FMA;
  a shared "schedule" barrier staggers the two warpgroups by half a step so
  one's softmax overlaps the other's matmuls; the next K block is awaited
  while the P V wgmma runs;
* one memory warpgroup (40 registers) streams K/V blocks of `block_kv` rows of
  KV head `q_head // group` through a `num_stages`-deep SMEM ring with TMA,
  refilling a slot once both compute warpgroups have released it.

Ragged packing lives in per-tile metadata computed with plain JAX before the
kernel. The tile's KV range is `[lo, end)` in KV blocks: from the block of the
first key its first row sees to the block of its last real row. The memory
warpgroup loads exactly that range. Each compute warpgroup splits it into
`skip | masked | full | masked | skip`: blocks none of its rows see (only
barrier bookkeeping), blocks that need the per-element mask, and blocks every
row sees entirely (no mask at all). The mask compares each key against the
row's first visible key (`max(sequence start, row - window + 1)`, TMA'd from
GMEM) and the row itself. Padding rows (at/after `cu_seqlens[-1]`) see no key
and come out zero.

Launch order: the tile axis is the fastest grid axis, so the CUDA blocks in
flight share one KV head (its K/V stays in L2), and within a head tiles run
longest-first (metadata rows are sorted by KV block count), so the short
tiles fill the tail.

Limits: bf16/f16, head_dim a multiple of 64 (256 needs `block_kv=64` to fit
SMEM, chosen by default), `block_q` and `block_kv` multiples of 64,
`q_heads % kv_heads == 0`. SMEM holds Q (2 * block_q rows) and num_stages K and
V blocks: 160 KiB at head_dim 128 with the defaults; H100 allows 227 KiB. The
token axis is zero-padded to a multiple of `lcm(2 * block_q, block_kv)` when it
is not one already (a copy of q/k/v). Needs a Hopper GPU (wgmma).
`interpret=plgpu.InterpretGPUParams()` runs it on the CPU; there P V is a
plain dot, since GPU interpret mode cannot run a wgmma with its A operand in
registers or `pl.run_state` over an accumulator.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

NO_KEY = 2**30  # first visible key of a padding row: beyond every key
COMPUTE_WGS = 2
META = 16  # int32 words per launched tile: tile, lo, end, then (lo, a, b, e) per compute warpgroup
LOG2E = math.log2(math.e)


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """None if this kernel takes these inputs, else why not (callers fall back to
    the reference)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must all be bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] % 64:
        return f"head_dim {q.shape[-1]} must be a multiple of 64"
    if q.shape[1] % k.shape[1]:
        return f"q_heads {q.shape[1]} not a multiple of kv_heads {k.shape[1]}"
    return None


def _tile_metadata(cu_seqlens, num_tokens_padded, block_q, block_kv, sliding_window):
    """Per token its first visible key ([T_pad] int32, NO_KEY for padding), and
    META words per tile ([num_tiles * META] int32), rows in launch order: tiles
    with the most KV blocks first.

    A compute warpgroup's blocks [lo_w, e) split at a <= b: [lo_w, a) and
    [b, e) need the mask, [a, b) is seen whole by every row of the warpgroup.
    """
    total = cu_seqlens[-1]
    t = jnp.arange(num_tokens_padded, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens, t, side="right", method="compare_all")  # no while loop (plan.py)
    seq = jnp.clip(seq - 1, 0, cu_seqlens.shape[0] - 2)
    first_key = cu_seqlens[seq]
    if sliding_window is not None:
        first_key = jnp.maximum(first_key, t - sliding_window + 1)
    first_key = jnp.where(t < total, first_key, NO_KEY).astype(jnp.int32)  # [T_pad]

    row0 = jnp.arange(0, num_tokens_padded, block_q, dtype=jnp.int32)  # [G] warpgroup blocks
    row_last = row0 + block_q - 1
    real = row0 < total
    lo_w = first_key[row0] // block_kv
    e = jnp.where(real, jnp.minimum(row_last, total - 1) // block_kv + 1, 0)
    full_lo = -(-first_key[row_last] // block_kv)  # every row sees keys from here on
    full_hi = (row0 + 1) // block_kv  # ...up to here (exclusive): block ends at or before row0
    a = jnp.clip(full_lo, lo_w, e)
    b = jnp.clip(full_hi, a, e)

    lo_w, a, b, e, real = (x.reshape(-1, COMPUTE_WGS) for x in (lo_w, a, b, e, real))
    tile_lo = jnp.where(real[:, 0], lo_w[:, 0], 0)
    tile_end = jnp.maximum(jnp.max(e, axis=1), tile_lo)
    lo_w, a, b, e = (jnp.where(real, x, tile_end[:, None]) for x in (lo_w, a, b, e))
    per_wg = jnp.stack([lo_w, a, b, e], axis=-1).reshape(-1, 4 * COMPUTE_WGS)
    tile = jnp.arange(tile_lo.shape[0], dtype=jnp.int32)
    meta = jnp.concatenate([tile[:, None], tile_lo[:, None], tile_end[:, None], per_wg], axis=1)
    meta = jnp.pad(meta, ((0, 0), (0, META - meta.shape[1]))).astype(jnp.int32)
    order = jnp.argsort(tile_lo - tile_end, stable=True)
    return first_key, meta[order].reshape(-1)


def _accumulate_pv(acc, p, v_smem, meanwhile, *, on_gpu):
    """acc + p @ v: on the GPU a wgmma seeded with acc, p from registers, with
    `meanwhile()` run while it is in flight.

    GPU interpret mode runs neither `pl.run_state` over a wgmma accumulator nor
    a wgmma whose A operand is in registers, so there it is a plain dot.
    """
    if not on_gpu:
        acc = acc + lax.dot(p, v_smem[...], preferred_element_type=jnp.float32)
        meanwhile()
        return acc

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem)
        meanwhile()

    return pl.run_state(pv)(plgpu.ACC.init(acc))


def _kernel(q_ref, k_ref, v_ref, first_key_ref, meta_ref, out_ref, scoped, *,
            sm_scale, soft_cap, block_q, block_kv, num_stages, group, interpreted):
    (qo_smem2, first_key_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready, first_key_ready), \
        (k_free, v_free), schedule = scoped
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    q_head = lax.axis_index("heads")
    meta = lax.axis_index("tiles") * META
    tile, lo, end = meta_ref[meta], meta_ref[meta + 1], meta_ref[meta + 2]
    wg = lax.axis_index("wg")

    def schedule_rendezvous():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * block_q) + wg * block_q
        wg_meta = meta + 3 + 4 * wg
        lo_w, a, b, e = (meta_ref[wg_meta + i] for i in range(4))

        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, block_q), q_head], qo_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(first_key_ref.at[pl.ds(row0, block_q)], first_key_smem2.at[wg],
                                first_key_ready.at[wg])
        plgpu.barrier_wait(first_key_ready.at[wg])
        row_first_key = plgpu.load(first_key_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(q_ready.at[wg])

        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def slot_of(j):
            return lax.rem(j - lo, jnp.array(num_stages, j.dtype))

        # Every step j in [lo, end) starts with K[j] already awaited: the step
        # before waits for it while its P V wgmma runs.
        def wait_next_k(j):
            pl.when(j + 1 < end)(lambda: plgpu.barrier_wait(k_ready.at[slot_of(j + 1)]))

        def skip_step(j, carry):
            # A block none of this warpgroup's rows sees: keep barrier phases and
            # the schedule rendezvous count in step with the other warpgroup.
            slot = slot_of(j)
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            schedule_rendezvous()
            schedule_rendezvous()
            wait_next_k(j)
            return carry

        def step(j, carry, *, masked):
            acc, m_i, l_i = carry
            slot = slot_of(j)

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_rendezvous()
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])

            # Scores in base-2 units: s = log2(e) * (capped) sm_scale * q.k
            if soft_cap is not None:
                s, scale = (soft_cap * LOG2E) * jnp.tanh(qk * (sm_scale / soft_cap)), None
            else:
                s, scale = qk, sm_scale * LOG2E  # folded into the exp2 FMA below
            scaled = (lambda x: x) if scale is None else (lambda x: x * scale)
            if masked:  # key j*block_kv + c visible to row row0 + r: first_key[r] <= key <= row
                shape, layout = (block_q, block_kv), plgpu.Layout.WGMMA
                r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
                c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
                first = lax.broadcast_in_dim(row_first_key - j * block_kv, shape, [0])
                visible = (c >= first) & (c <= r + (row0 - j * block_kv))
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m_i, scaled(s.max(axis=1)))
            if masked:  # a row with no visible key yet: subtract 0, not -inf (no NaN)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            else:
                m_use = m_new
            alpha = jnp.exp2(m_i - m_use)
            p = jnp.exp2(scaled(s) - lax.broadcast_in_dim(m_use, s.shape, [0]))
            acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)  # the tensor cores are ours

            acc = _accumulate_pv(acc, p16, v_smem.at[slot], functools.partial(wait_next_k, j),
                                 on_gpu=not interpreted)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        masked_step = functools.partial(step, masked=True)
        full_step = functools.partial(step, masked=False)
        pl.when(lo < end)(lambda: plgpu.barrier_wait(k_ready.at[0]))
        pl.when(wg == 1)(schedule_rendezvous)
        carry = (acc, m_i, l_i)
        lax.fori_loop(lo, lo_w, skip_step, None)
        carry = lax.fori_loop(lo_w, a, masked_step, carry)
        carry = lax.fori_loop(a, b, full_step, carry)
        carry = lax.fori_loop(b, e, masked_step, carry)
        lax.fori_loop(e, end, skip_step, None)
        pl.when(wg == 0)(schedule_rendezvous)
        acc, _, l_i = carry

        inv_l = 1.0 / jnp.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: acc is 0
        acc *= lax.broadcast_in_dim(inv_l, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[pl.ds(row0, block_q), q_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

        def load(j, slot):
            rows = (pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        for i in range(num_stages):
            pl.when(lo + i < end)(functools.partial(load, lo + i, i))

        @pl.loop(lo + num_stages, end)
        def _refill(j):
            slot = lax.rem(j - lo, jnp.array(num_stages, j.dtype))
            rows = (pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        @pl.loop(jnp.maximum(lo, end - num_stages), end)
        def _drain(j):  # observe the last releases too: every waiter sees every phase
            slot = lax.rem(j - lo, jnp.array(num_stages, j.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q",
                                             "block_kv", "num_stages", "interpret"))
def flash_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    cu_seqlens: jax.Array,  # [S + 1] int32, cu_seqlens[0] == 0
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int = 64,  # rows per compute warpgroup; a CUDA block takes 2 * block_q
    block_kv: int | None = None,  # None: 128 for head_dim <= 128, else 64 (SMEM)
    num_stages: int = 2,  # K/V SMEM ring depth
    interpret=None,  # plgpu.InterpretGPUParams() to run on the CPU
) -> jax.Array:  # [T, q_heads, head_dim]; padding rows are zero
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (reason := supports(q, k, v)) is not None:
        raise ValueError(reason)
    if block_kv is None:
        block_kv = 128 if head_dim <= 128 else 64
    if block_q % 64 or block_kv % 64:
        raise ValueError(f"block_q {block_q} and block_kv {block_kv} must be multiples of 64")
    if num_stages < 1:
        raise ValueError(f"num_stages {num_stages} must be at least 1")
    group = num_q_heads // num_kv_heads

    tile_rows = COMPUTE_WGS * block_q
    multiple = math.lcm(tile_rows, block_kv)
    padded = -(-num_tokens // multiple) * multiple
    if padded != num_tokens:
        pad = ((0, padded - num_tokens), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    num_tiles = padded // tile_rows
    first_key, meta = _tile_metadata(cu_seqlens.astype(jnp.int32), padded, block_q, block_kv,
                                            sliding_window)

    def entry(q_ref, k_ref, v_ref, first_key_ref, meta_ref, out_ref):
        smem = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
        pl.run_scoped(
            lambda *scoped: _kernel(
                q_ref, k_ref, v_ref, first_key_ref, meta_ref, out_ref, scoped,
                sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, block_kv=block_kv,
                num_stages=num_stages, group=group, interpreted=interpret not in (None, False)),
            (plgpu.SMEM((COMPUTE_WGS, block_q, head_dim), q.dtype, **smem),
             plgpu.SMEM((COMPUTE_WGS, block_q), jnp.int32),  # rows' first visible key
             plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, **smem),
             plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, **smem)),
            (plgpu.Barrier(num_barriers=num_stages),  # K slot loaded
             plgpu.Barrier(num_barriers=num_stages),  # V slot loaded
             plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q loaded
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),  # rows' first keys loaded
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),) * 2,  # K, V slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # schedule
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(num_q_heads, num_tiles),
        grid_names=("heads", "tiles"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, first_key, meta)
    return out[:num_tokens]
