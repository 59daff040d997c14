"""Ragged paged attention over a paged KV cache: a Mosaic GPU (Hopper) kernel.

Same contract as `reference.ragged_paged_attention`, plus quantized pages.

Work items. Queries are regrouped on the host exactly as in `tpu.py`: every
query block belongs to one sequence and holds `block_q = 64 // group` of its
tokens, with rows `token * group + g` for one KV head, so one K/V page load
serves the whole GQA group and the block is one 64-row WGMMA tile (a decode
token fills `group` of its rows; the rest are zero padding that costs tensor
core time, not memory traffic). For each query block the range of KV blocks
holding a visible key (causal, inside kv_len and the sliding window) is
computed beforehand, and split into `num_splits` contiguous chunks
(flash-decoding), so a small batch of long decodes still fills the SMs.

Grid (kv_head, q_block, split), one CTA per work item, warpgroups
`num_compute` (2 by default) compute + 1 memory:
  * the memory warpgroup TMAs Q once, then walks the chunk's KV blocks: for
    each it reads `pages_per_block` page indices from the page table (scalar
    GMEM loads, the next block's issued before waiting on the ring) and issues
    one TMA per page and per K/V, `k_pages.at[page, :, kv_head, :]`, into slot
    `step % num_stages` of an SMEM ring, once that slot has been released;
  * compute warpgroup w takes KV blocks w, w + num_compute, ... (an in-CTA
    KV split: decode has too few query rows to share otherwise, and two
    warpgroups hide each other's latencies). Per block: S = Q K^T with WGMMA
    (Q in SMEM), mask (causal / window) only on blocks that can need it, online
    softmax in registers (base 2), P to SMEM, P V with a second WGMMA
    accumulating in place; the slot is released as soon as its WGMMA is done.
    Slot i always belongs to warpgroup i % num_compute (barrier phases are
    tracked per thread), so num_stages is a multiple of num_compute. At the
    end warpgroup 1 hands (m, l, acc) to warpgroup 0 through SMEM, which
    merges and writes the output tile with one TMA.
  Blocks outside the precomputed range are never loaded nor computed.

Quantized pages (int8 or float8_e4m3fn with per-token, per-KV-head float32
scales `[num_pages, kv_heads, page_size]`): the scales ride on the K/V TMA
barriers. A compute warpgroup converts each K/V tile exactly (int8 -> bf16 by
the prmt/sub trick, fp8 -> f16 by cvt; with fp8 pages Q and P are f16) into a
staging SMEM tile for the WGMMA, and applies the per-key scales on columns:
K's to the scores, V's to the probabilities before P V (the softmax
denominator uses the unscaled probabilities). HBM traffic is the 8-bit bytes.

With `num_splits > 1` every split writes its normalized partial output (f32)
and log2-sum-exp per row, and a small XLA epilogue combines them
(flash-decoding); `default_num_splits` splits only when the grid would
otherwise leave SMs idle (e.g. batch-1 decode).

Limits (the public dispatcher falls back to the reference where they fail):
q is bf16/f16; pages are q's dtype, or int8/float8_e4m3fn with scales;
head_dim a multiple of 64 up to 256 (256 gets one ring slot: slow); page_size
a multiple of 8 dividing the KV block (a multiple of 64 keys); group <= 64.
A decode token fills only `group` of the 64 rows: the rest is tensor-core
and softmax work on padding, not memory traffic. Unused page-table entries and
page slots past kv_len are read but masked, so they must hold finite values
(0 * NaN would poison P V), as with the TPU kernel.

GPU interpret mode (CPU tests) runs WGMMA only on SMEM operands (so P goes
through SMEM), has no `run_state` (so there P V accumulates into a scoped
accumulator and is added, instead of in place), and its race detector does
not see WGMMA operand reads; it does check every barrier phase is observed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.plan import gather_queries, kv_block_ranges, query_blocks, scatter_outputs

ROWS = 64  # query rows per block: one WGMMA M tile
_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running max before any key; finite so exp2(-inf - m) is 0, not NaN
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def supports(q, k_pages, v_pages, k_scale=None, v_scale=None, *, pages_per_block=None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"q dtype {q.dtype} is not bf16/f16"
    if k_pages.dtype != v_pages.dtype:
        return "k_pages and v_pages differ in dtype"
    quantized = jnp.dtype(k_pages.dtype) in QUANTIZED_DTYPES
    if (k_scale is None) != (v_scale is None) or (k_scale is not None) != quantized:
        return "scales must be given exactly for int8/fp8 pages"
    if not quantized and k_pages.dtype != q.dtype:
        return f"pages dtype {k_pages.dtype} differs from q dtype {q.dtype}"
    if head_dim % 64 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 64 up to 256"
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > ROWS:
        return f"group {num_q_heads}/{num_kv_heads} is not an integer up to {ROWS}"
    if quantized and (page_size * 4) % 128:
        # Each page's scales come by TMA into their place in a [block_kv] row of shared
        # memory; TMA destinations must be 128-byte aligned, so a page's scales must be.
        return f"int8/fp8 pages need page_size a multiple of 32, got {page_size}"
    ppb = pages_per_block or default_pages_per_block(page_size)
    if page_size % 8 or (ppb * page_size) % 64:
        return f"page_size {page_size} x {ppb} pages per block is not a multiple of 64 keys"
    if max_stages(head_dim, ppb * page_size, q.dtype, k_pages.dtype, quantized, True, num_compute=1) < 1:
        return f"a KV block of {ppb * page_size} keys x head_dim {head_dim} does not fit in SMEM"
    return None


def default_pages_per_block(page_size: int) -> int:
    """Pages per KV block: 64 keys (at least one page)."""
    return max(1, 64 // page_size)


def default_num_splits(num_work: int, num_kv_blocks: int, num_sms: int = 132) -> int:
    """KV splits per query block: enough CTAs to cover the SMs twice, but
    every split keeps at least 4 KV blocks."""
    want = -(-2 * num_sms // max(num_work, 1))
    return int(max(1, min(want, num_kv_blocks // 4)))


SMEM_BYTES = 220 * 1024  # of Hopper's 227 KiB per CTA, leaving room for barriers and reductions


def max_stages(head_dim, block_kv, q_dtype, kv_dtype, quantized, split, num_compute=2) -> int:
    """Ring slots that fit in SMEM beside the fixed buffers."""
    qb, kvb = jnp.dtype(q_dtype).itemsize, jnp.dtype(kv_dtype).itemsize
    fixed = (ROWS * head_dim * qb + num_compute * ROWS * block_kv * qb  # Q, P per warpgroup
             + ROWS * head_dim * (4 if split else qb) + 4 * ROWS)  # output, lse
    if num_compute > 1:
        fixed += ROWS * head_dim * 4 + 8 * ROWS  # warpgroup 1's partial output and m, l
    if quantized:
        fixed += num_compute * 2 * block_kv * head_dim * qb  # converted K, V tiles
    per_stage = 2 * block_kv * head_dim * kvb + (2 * block_kv * 4 if quantized else 0)
    return (SMEM_BYTES - fixed) // per_stage


def _kv_chunks(lo, hi, num_splits):
    """Per (q block, split): first KV block and how many to take; [B * splits]."""
    n = jnp.maximum(hi - lo + 1, 0)
    chunk = -(-n // num_splits)
    s = jnp.arange(num_splits, dtype=jnp.int32)
    start = lo[:, None] + s[None, :] * chunk[:, None]
    count = jnp.clip(n[:, None] - s[None, :] * chunk[:, None], 0, chunk[:, None])
    return start.reshape(-1).astype(jnp.int32), count.reshape(-1).astype(jnp.int32)


def _tile_transforms(dtype, cols):
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _kernel(seq_ref, first_pos_ref, start_ref, count_ref, pages_ref, q_ref, k_ref, v_ref, *refs,
            q_smem, p_smem, k_smem, v_smem, kd_smem, vd_smem, ks_smem, vs_smem, o_smem, lse_smem,
            part_smem, ml_smem, q_bar, k_full, v_full, k_free, v_free, part_bar, quantized, num_splits,
            num_compute, num_stages, pages_per_block, page_size, pages_per_seq, group, sm_scale,
            sliding_window, soft_cap, acc_in_place):
    if quantized:
        ks_ref, vs_ref, *refs = refs
    o_ref, lse_ref = refs if num_splits > 1 else (refs[0], None)
    block_kv = pages_per_block * page_size
    head_dim = q_smem.shape[-1]
    compute_dtype = q_smem.dtype
    head = lax.axis_index("kv_head")
    blk = lax.axis_index("q_block")
    wg = lax.axis_index("wg")
    work = blk * num_splits + lax.axis_index("split")
    start, count = start_ref[work], count_ref[work]

    # With 3 warpgroups (384 threads, 168 registers each at launch) the memory warpgroup gives
    # its registers to the compute ones, as in JAX's FlashAttention-3 kernel; with 2 there is
    # room enough.
    rebalance = num_compute == 2

    @pl.when(wg == num_compute)
    def _memory():
        if rebalance:
            plgpu.set_max_registers(40, action="decrease")
        plgpu.copy_gmem_to_smem(q_ref.at[head, blk], q_smem, q_bar)
        row = seq_ref[blk] * pages_per_seq

        def page_ids(step):
            first_page = (start + step) * pages_per_block
            return tuple(pages_ref[row + jnp.minimum(first_page + i, pages_per_seq - 1)]
                         for i in range(pages_per_block))

        def step_body(step, pages):
            next_pages = page_ids(jnp.minimum(step + 1, count - 1))  # in flight while we wait
            slot = lax.rem(step, num_stages)
            for src, scale_src, buf, scale_buf, full, free in (
                    (k_ref, ks_ref if quantized else None, k_smem, ks_smem, k_full, k_free),
                    (v_ref, vs_ref if quantized else None, v_smem, vs_smem, v_full, v_free)):
                @pl.when(step >= num_stages)
                def _wait_free():
                    plgpu.barrier_wait(free.at[slot])
                for i, page in enumerate(pages):
                    rows = pl.ds(i * page_size, page_size)
                    plgpu.copy_gmem_to_smem(src.at[page, :, head, :], buf.at[slot, rows], full.at[slot])
                    if quantized:
                        plgpu.copy_gmem_to_smem(scale_src.at[page, head, :], scale_buf.at[slot, rows],
                                                full.at[slot])
            return next_pages

        lax.fori_loop(0, count, step_body, page_ids(0))

        # Observe the last releases too, so every barrier phase is consumed when the CTA ends.
        @pl.loop(jnp.maximum(count - num_stages, 0), count)
        def _drain(step):
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

    @pl.when(wg < num_compute)
    def _compute():
        if rebalance:
            plgpu.set_max_registers(232, action="increase")
        first_pos = first_pos_ref[blk]
        shape = (ROWS, block_kv)
        p_buf = p_smem.at[wg]

        def converted(buf, out_buf, slot):
            """One int8/fp8 K/V tile as exact compute-dtype values in out_buf (scales come later)."""
            out_buf[...] = buf.at[slot][...].astype(compute_dtype)
            return out_buf

        def column(scale_buf, slot):
            scale = scale_buf.at[slot][...]  # [block_kv]
            return lax.broadcast_in_dim(scale, shape, [1])

        def body(step, carry, *, masked):
            acc, m_i, l_i = carry
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(k_full.at[slot])
            if quantized:
                k_tile = converted(k_smem, kd_smem.at[wg], slot)
                k_col = column(ks_smem, slot)
                plgpu.commit_smem()  # (GPU interpret mode counts ring reads as done only here)
                plgpu.barrier_arrive(k_free.at[slot])
            else:
                k_tile = k_smem.at[slot]

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_tile.T)
                return acc_ref[...]
            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            if quantized:
                s = s * k_col
            else:
                plgpu.barrier_arrive(k_free.at[slot])

            # Scores in the log2 domain: exp2(s * log2e) == exp(s).
            if soft_cap is not None:
                s = (soft_cap * _LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
            else:
                s = s * (sm_scale * _LOG2E)
            if masked:
                # Key k_pos is visible to row r (query position first_pos + r // group)
                # iff d = k_pos - first_pos satisfies d * group <= r (causal) and
                # r < (window + d) * group (sliding window).
                row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                d = (start + step) * block_kv + col - first_pos
                mask = d * group <= row  # rows past the block's tokens are discarded later
                if sliding_window is not None:
                    mask &= row < (d + sliding_window) * group
                s = jnp.where(mask, s, -jnp.inf)

            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            plgpu.barrier_wait(v_full.at[slot])
            if quantized:
                v_tile = converted(v_smem, vd_smem.at[wg], slot)
                p = p * column(vs_smem, slot)  # V's per-key scales weight the probabilities
            else:
                v_tile = v_smem.at[slot]
            p_buf[...] = p.astype(compute_dtype)
            plgpu.commit_smem()
            if quantized:
                plgpu.barrier_arrive(v_free.at[slot])

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p_buf, v_tile)
            if acc_in_place:
                acc = pl.run_state(values)(plgpu.ACC.init(acc))
            else:  # GPU interpret mode has no run_state: accumulate P V separately, then add.
                acc = acc + pl.run_scoped(lambda r: (values(r), r[...])[1], plgpu.ACC(acc.shape, jnp.float32))
            if not quantized:
                plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((ROWS,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(q_bar)

        # Compute warpgroup w takes steps w, w + num_compute, ...; each keeps its own softmax state.
        def own_steps(n):
            return lax.div(jnp.maximum(n - wg, 0) + num_compute - 1, num_compute)

        def loop(lo, hi, masked, carry):
            return lax.fori_loop(lo, hi, lambda i, c: body(wg + i * num_compute, c, masked=masked), carry)

        # Blocks whose every key precedes the block's first query need no mask (no window).
        unmasked = 0
        if sliding_window is None:
            unmasked = own_steps(jnp.clip((first_pos + 1) // block_kv - start, 0, count))
        carry = loop(0, unmasked, False, (acc, m_i, l_i))
        acc, m_i, l_i = loop(unmasked, own_steps(count), True, carry)

        if num_compute == 2:
            @pl.when(wg == 1)
            def _publish():
                part_smem[...] = acc
                ml_smem.at[0][...] = m_i
                ml_smem.at[1][...] = l_i
                plgpu.barrier_arrive(part_bar)

        @pl.when(wg == 0)
        def _finish():
            out, m, l = acc, m_i, l_i
            if num_compute == 2:  # merge warpgroup 1's partial softmax state into ours
                plgpu.barrier_wait(part_bar)
                m_1, l_1 = ml_smem.at[0][...], ml_smem.at[1][...]
                m = jnp.maximum(m_i, m_1)
                a_0, a_1 = jnp.exp2(m_i - m), jnp.exp2(m_1 - m)
                l = l_i * a_0 + l_1 * a_1
                out = (out * lax.broadcast_in_dim(a_0, out.shape, [0])
                       + part_smem[...] * lax.broadcast_in_dim(a_1, out.shape, [0]))
            l_safe = jnp.where(l == 0.0, 1.0, l)
            out = out / lax.broadcast_in_dim(l_safe, out.shape, [0])
            o_smem[...] = out.astype(o_smem.dtype)
            if lse_ref is not None:
                # log2-sum-exp2 of the row's scaled scores; very negative for rows that saw no key.
                lse_smem[...] = jnp.where(l == 0.0, _M_INIT, m + jnp.log2(l_safe))
            plgpu.commit_smem()
            if lse_ref is not None:
                split = lax.axis_index("split")
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, head, blk])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, head, blk])
            else:
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[head, blk])
            plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "max_q_len", "sm_scale", "sliding_window", "soft_cap", "pages_per_block", "num_stages",
    "num_splits", "num_compute", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32, cu_q_lens[0] == 0
    *,
    max_q_len: int,  # static bound on any sequence's q_len
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [num_pages, kv_heads, page_size] f32, int8/fp8 pages
    v_scale: jax.Array | None = None,  # [num_pages, kv_heads, page_size] f32
    pages_per_block: int | None = None,  # pages per KV block; 64 keys when None
    num_stages: int = 4,  # KV blocks in flight (SMEM ring slots)
    num_splits: int | None = None,  # KV splits per query block; default_num_splits when None
    num_compute: int = 2,  # compute warpgroups per CTA, taking alternate KV blocks (1 or 2)
    interpret=None,  # None or plgpu.InterpretGPUParams
) -> jax.Array:  # [T, q_heads, head_dim], rows of padding tokens are zero
    if num_compute not in (1, 2):
        raise ValueError(f"num_compute must be 1 or 2, got {num_compute}")
    why = supports(q, k_pages, v_pages, k_scale, v_scale, pages_per_block=pages_per_block)
    if why:
        raise ValueError(f"GPU paged attention does not support these inputs: {why}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    quantized = k_scale is not None
    pages_per_block = pages_per_block or default_pages_per_block(page_size)
    block_kv = pages_per_block * page_size
    block_q = ROWS // group
    num_kv_blocks = -(-pages_per_seq // pages_per_block)
    # Each sequence wastes under one block, and none has more than ceil(max_q_len / block_q).
    num_q_blocks = max(1, min(-(-(num_tokens + num_seqs * (block_q - 1)) // block_q),
                              num_seqs * -(-max_q_len // block_q)))
    if num_splits is None:
        num_splits = default_num_splits(num_kv_heads * num_q_blocks, num_kv_blocks)
    fit = max_stages(head_dim, block_kv, q.dtype, k_pages.dtype, quantized, num_splits > 1, num_compute)
    if fit < num_compute:  # too little SMEM for a ring slot per compute warpgroup
        num_compute = 1
        fit = max_stages(head_dim, block_kv, q.dtype, k_pages.dtype, quantized, num_splits > 1, 1)
    # Ring slot i is always consumed by compute warpgroup i % num_compute (barrier phases are
    # tracked per thread), so the slot count is a multiple of num_compute.
    num_stages = min(num_stages, fit, -(-num_kv_blocks // num_compute) * num_compute)
    num_stages = max(num_compute, num_stages // num_compute * num_compute)

    cu_q_lens, kv_lens = cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32)
    seq, q0, num_valid, first_pos, cu_blocks = query_blocks(cu_q_lens, kv_lens, num_q_blocks, block_q)
    lo, hi = kv_block_ranges(first_pos, num_valid, block_kv, sliding_window)
    start, count = _kv_chunks(lo, hi, num_splits)
    pages = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1).reshape(-1)

    # Regroup queries: block b, row i * group + g is query q0[b] + i of sequence seq[b], head g.
    qb = gather_queries(q, cu_q_lens, seq, q0, num_valid, block_q)
    qb = qb.reshape(num_q_blocks, block_q, num_kv_heads, group, head_dim).transpose(2, 0, 1, 3, 4)
    qb = qb.reshape(num_kv_heads, num_q_blocks, block_q * group, head_dim)
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, ROWS - block_q * group), (0, 0)))  # [K, B, ROWS, D]

    # MMAs run in q's dtype; fp8 pages convert exactly (and cheaply) only to f16, so with
    # them Q and P are f16 as well.
    compute_dtype = jnp.float16 if jnp.dtype(k_pages.dtype) == jnp.float8_e4m3fn else q.dtype
    qb = qb.astype(compute_dtype)
    q_tf = _tile_transforms(compute_dtype, head_dim)
    kv_tf = _tile_transforms(k_pages.dtype, head_dim)
    p_tf = _tile_transforms(compute_dtype, block_kv)
    out_dtype = jnp.float32 if num_splits > 1 else q.dtype
    f32_tf = _tile_transforms(jnp.float32, head_dim)
    ring = (num_stages, block_kv, head_dim)
    copies_per_block = pages_per_block * (2 if quantized else 1)
    converted = plgpu.SMEM((num_compute, block_kv, head_dim), compute_dtype, transforms=q_tf)
    scratch = dict(
        q_smem=plgpu.SMEM((ROWS, head_dim), compute_dtype, transforms=q_tf),
        p_smem=plgpu.SMEM((num_compute, ROWS, block_kv), compute_dtype, transforms=p_tf),
        k_smem=plgpu.SMEM(ring, k_pages.dtype, transforms=kv_tf),
        v_smem=plgpu.SMEM(ring, v_pages.dtype, transforms=kv_tf),
        kd_smem=converted if quantized else None,
        vd_smem=converted if quantized else None,
        ks_smem=plgpu.SMEM((num_stages, block_kv), jnp.float32) if quantized else None,
        vs_smem=plgpu.SMEM((num_stages, block_kv), jnp.float32) if quantized else None,
        o_smem=plgpu.SMEM((ROWS, head_dim), out_dtype, transforms=_tile_transforms(out_dtype, head_dim)),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32) if num_splits > 1 else None,
        part_smem=plgpu.SMEM((ROWS, head_dim), jnp.float32, transforms=f32_tf) if num_compute > 1 else None,
        ml_smem=plgpu.SMEM((2, ROWS), jnp.float32) if num_compute > 1 else None,
        q_bar=plgpu.Barrier(),
        k_full=plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=num_stages),
        v_full=plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=num_stages),
        k_free=plgpu.Barrier(num_barriers=num_stages),
        v_free=plgpu.Barrier(num_barriers=num_stages),
        part_bar=plgpu.Barrier() if num_compute > 1 else None,
    )
    if num_splits > 1:
        out_type = (jax.ShapeDtypeStruct((num_splits, num_kv_heads, num_q_blocks, ROWS, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, num_kv_heads, num_q_blocks, ROWS), jnp.float32))
    else:
        out_type = jax.ShapeDtypeStruct((num_kv_heads, num_q_blocks, ROWS, head_dim), q.dtype)

    kernel = functools.partial(
        _kernel, quantized=quantized, num_splits=num_splits, num_compute=num_compute,
        num_stages=num_stages, acc_in_place=not interpret,
        pages_per_block=pages_per_block, page_size=page_size, pages_per_seq=pages_per_seq,
        group=group, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    scales = (k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)) if quantized else ()
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_kv_heads, num_q_blocks, num_splits),
        grid_names=("kv_head", "q_block", "split"),
        num_threads=num_compute + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(seq, first_pos, start, count, pages, qb, k_pages, v_pages, *scales)

    if num_splits > 1:
        o, lse = out  # [splits, K, B, ROWS, D], [splits, K, B, ROWS] (log2 domain)
        weight = jnp.exp2(lse - jnp.max(lse, axis=0, keepdims=True))
        weight = weight / jnp.sum(weight, axis=0, keepdims=True)
        out = jnp.sum(o * weight[..., None], axis=0).astype(q.dtype)

    # Back to token order (block row i * group + g is query i's head g of its kv head's group).
    out = out[:, :, :block_q * group].reshape(num_kv_heads, num_q_blocks * block_q, group, head_dim)
    out = out.transpose(1, 0, 2, 3).reshape(num_q_blocks * block_q, num_q_heads, head_dim)
    return scatter_outputs(out, cu_q_lens, cu_blocks, block_q, num_tokens).astype(q.dtype)
