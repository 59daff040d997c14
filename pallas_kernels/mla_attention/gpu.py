"""MLA over paged latent entries on CUDA (Hopper): a Mosaic GPU kernel for decode-sized query blocks.

Same contract as `reference.mla_attention`. Every query head reads the one latent head, and DeepSeek's
models have few heads per device (16 for V2-Lite), so a decode token would fill only 16 of wgmma's 64
rows. The kernel turns the products around instead: keys are the 64 rows (M) and the query columns
(block_q tokens x heads, at most 16) are wgmma's N:

    S^T [64 keys, N]        = K [64 keys, L + R]   . Q^T [L + R, N]      (both operands in SMEM)
    O^T [value_dim, N]     += V^T [value_dim, 64]  . P^T [64 keys, N]    (value_dim / 64 wgmmas)

K is the block's whole entries and V^T a transposed view of their first value_dim columns, so each
page is read from HBM once for both products, and no tensor-core work is spent on padding rows. The
online softmax runs down the columns (a reduction across the warpgroup's rows), and O^T stays in
registers: value_dim x N / 128 floats a thread (64 at 512 x 16).

Work items as in pallas_kernels/paged_attention/gpu.py (whose plan it shares): query blocks of one
sequence each, the KV blocks they see split into `num_splits` chunks (flash-decoding), one CTA per
(query block, split) with two warpgroups. The memory warpgroup reads the chunk's page ids from the
page table and TMAs each page [page_size, L + R] into a slot of an SMEM ring; the compute warpgroup
takes the ring's blocks in order. Splits write O^T and the log2-sum-exp per column in float32; a small
XLA epilogue merges them and puts the columns back in token order.

Limits (`supports`; the dispatcher takes XLA's path where they fail): bf16/f16 queries and pages of
the same dtype; L + R and value_dim multiples of 64; heads up to 16 a device (a block's block_q * heads
columns, padded to a multiple of 8 and at least 16); page_size a multiple of 8 dividing 64. Prefill
chunks are better served elsewhere: with few tokens a block every query re-reads the KV blocks it sees,
so the dispatcher sends steps whose max_q_len exceeds `MAX_Q_LEN` to XLA.

GPU interpret mode (on the CPU) cannot hold a wgmma accumulator in place across steps (no run_state):
there each step's P V is accumulated in a scoped accumulator and added.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.gpu import _kv_chunks, _tile_transforms, default_num_splits
from pallas_kernels.paged_attention.plan import gather_queries, kv_block_ranges, query_blocks, scatter_outputs

KEYS = 64  # keys per KV block: one wgmma M tile
MAX_COLUMNS = 16  # query columns (tokens x heads) per block
MAX_Q_LEN = 8  # steps with longer query runs (prefill chunks) take XLA's path
_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running max before any key; finite so exp2(-inf - m) is 0, not NaN
SMEM_BYTES = 220 * 1024


def _columns(heads: int, max_q_len: int) -> tuple[int, int]:
    """(block_q, N): tokens per query block and their columns, padded to a multiple of 8 and to at least 16
    (a 16-bit output row of 32 bytes, the smallest SMEM swizzle)."""
    block_q = max(1, min(max_q_len, MAX_COLUMNS // heads))
    return block_q, max(16, -(-block_q * heads // 8) * 8)


def _smem_bytes(width: int, value_dim: int, columns: int, stages: int, itemsize: int, split: bool) -> int:
    return (columns * width * itemsize + stages * KEYS * width * itemsize + columns * KEYS * itemsize
            + value_dim * columns * (4 if split else itemsize) + 4 * columns)


def supports(q: jax.Array, latent_pages: jax.Array, value_dim: int) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    _, heads, width = q.shape
    page_size = latent_pages.shape[1]
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"q dtype {q.dtype} is not bf16/f16"
    if latent_pages.dtype != q.dtype:
        return f"pages dtype {latent_pages.dtype} differs from q dtype {q.dtype}"
    if latent_pages.shape[-1] != width:
        return f"query width {width} is not the entries' {latent_pages.shape[-1]}"
    if width % 64 or value_dim % 64 or value_dim > width:
        return f"entry width {width} and value_dim {value_dim} must be multiples of 64, value_dim within the entry"
    if heads > MAX_COLUMNS:
        return f"{heads} heads: at most {MAX_COLUMNS} per device"
    if page_size % 8 or KEYS % page_size:
        return f"page_size {page_size} is not a multiple of 8 dividing {KEYS}"
    if _smem_bytes(width, value_dim, MAX_COLUMNS, 2, q.dtype.itemsize, True) > SMEM_BYTES:
        return f"two KV blocks of {KEYS} x {width} do not fit in SMEM"
    return None


def _kernel(seq_ref, first_pos_ref, start_ref, count_ref, pages_ref, q_ref, latent_ref, *refs, q_smem, kv_smem,
            p_smem, o_smem, lse_smem, q_bar, full, free, num_splits, num_stages, pages_per_block, page_size,
            pages_per_seq, heads, value_dim, sm_scale, acc_in_place):
    o_ref, lse_ref = refs if num_splits > 1 else (refs[0], None)
    columns = q_smem.shape[0]
    blk = lax.axis_index("q_block")
    wg = lax.axis_index("wg")
    work = blk * num_splits + lax.axis_index("split")
    start, count = start_ref[work], count_ref[work]

    @pl.when(wg == 1)
    def _memory():
        plgpu.copy_gmem_to_smem(q_ref.at[blk], q_smem, q_bar)
        row = seq_ref[blk] * pages_per_seq

        def page_ids(step):
            first_page = (start + step) * pages_per_block
            return tuple(pages_ref[row + jnp.minimum(first_page + i, pages_per_seq - 1)]
                         for i in range(pages_per_block))

        def step_body(step, pages):
            next_pages = page_ids(jnp.minimum(step + 1, count - 1))  # in flight while we wait
            slot = lax.rem(step, num_stages)

            @pl.when(step >= num_stages)
            def _wait_free():
                plgpu.barrier_wait(free.at[slot])
            for i, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(latent_ref.at[page], kv_smem.at[slot, pl.ds(i * page_size, page_size)],
                                        full.at[slot])
            return next_pages

        lax.fori_loop(0, count, step_body, page_ids(0))

        # Observe the last releases too, so every barrier phase is consumed when the CTA ends.
        @pl.loop(jnp.maximum(count - num_stages, 0), count)
        def _drain(step):
            plgpu.barrier_wait(free.at[lax.rem(step, num_stages)])

    @pl.when(wg == 0)
    def _compute():
        first_pos = first_pos_ref[blk]
        shape = (KEYS, columns)
        chunks = value_dim // 64
        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def body(step, carry, *, masked):
            accs, m_i, l_i = carry
            slot = lax.rem(step, num_stages)
            block = kv_smem.at[slot]
            plgpu.barrier_wait(full.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, block, q_smem.T)
                return acc_ref[...]
            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32)) * (sm_scale * _LOG2E)  # log2 domain
            if masked:
                # Key row k (position (start + step) * KEYS + k) is visible to column c (query c // heads,
                # position first_pos + c // heads) iff its position is not past the query's.
                key = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where((start + step) * KEYS + key - first_pos <= col // heads, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=0))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [1]))
            l_i = l_i * alpha + p.sum(axis=0)
            accs = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [1]) for a in accs)
            p_smem.T[...] = p.astype(p_smem.dtype)  # stored [columns, keys]: P^T is its transposed view
            plgpu.commit_smem()

            def values(acc_refs):
                for c, acc_ref in enumerate(acc_refs):
                    plgpu.wgmma(acc_ref, block.at[:, pl.ds(c * 64, 64)].T, p_smem.T)
            if acc_in_place:
                accs = pl.run_state(values)(tuple(plgpu.ACC.init(a) for a in accs))
            else:  # GPU interpret mode has no run_state: accumulate P V separately, then add.
                def fresh(refs):
                    values(refs)
                    return tuple(r[...] for r in refs)
                new = pl.run_scoped(fresh, tuple(plgpu.ACC((64, columns), jnp.float32) for _ in accs))
                accs = tuple(a + n for a, n in zip(accs, new))
            plgpu.barrier_arrive(free.at[slot])
            return accs, m_new, l_i

        zero = plgpu.layout_cast(jnp.zeros((64, columns), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((columns,), _M_INIT, jnp.float32), col_layout)
        l_i = plgpu.layout_cast(jnp.zeros((columns,), jnp.float32), col_layout)
        plgpu.barrier_wait(q_bar)

        # Blocks whose every key precedes the block's first query need no mask.
        unmasked = jnp.clip((first_pos + 1) // KEYS - start, 0, count)
        carry = lax.fori_loop(0, unmasked, functools.partial(body, masked=False), ((zero,) * chunks, m_i, l_i))
        accs, m_i, l_i = lax.fori_loop(unmasked, count, functools.partial(body, masked=True), carry)

        l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
        for c, acc in enumerate(accs):
            o_smem.at[pl.ds(c * 64, 64)][...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [1])).astype(
                o_smem.dtype)
        if lse_ref is not None:
            # log2-sum-exp2 of the column's scaled scores; very negative for columns that saw no key.
            lse_smem[...] = jnp.where(l_i == 0.0, _M_INIT, m_i + jnp.log2(l_safe))
        plgpu.commit_smem()
        if lse_ref is not None:
            split = lax.axis_index("split")
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, blk])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, blk])
        else:
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[blk])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("value_dim", "max_q_len", "sm_scale", "num_stages", "num_splits",
                                             "interpret"))
def mla_attention(
    q: jax.Array,  # [T, heads, L + R]
    latent_pages: jax.Array,  # [num_pages, page_size, L + R]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    value_dim: int,
    max_q_len: int,
    sm_scale: float,
    num_stages: int = 2,  # KV blocks in flight (SMEM ring slots)
    num_splits: int | None = None,  # KV splits per query block; default_num_splits when None
    interpret=None,  # None or plgpu.InterpretGPUParams
) -> jax.Array:  # [T, heads, value_dim]; rows of padding tokens are zero
    why = supports(q, latent_pages, value_dim)
    if why:
        raise ValueError(f"GPU MLA attention does not support these inputs: {why}")
    num_tokens, heads, width = q.shape
    num_pages, page_size, _ = latent_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    pages_per_block = KEYS // page_size
    block_q, columns = _columns(heads, max_q_len)
    num_kv_blocks = -(-pages_per_seq // pages_per_block)
    num_q_blocks = max(1, min(-(-(num_tokens + num_seqs * (block_q - 1)) // block_q),
                              num_seqs * -(-max_q_len // block_q)))
    if num_splits is None:
        num_splits = default_num_splits(num_q_blocks, num_kv_blocks)
    split = num_splits > 1
    while num_stages > 1 and _smem_bytes(width, value_dim, columns, num_stages, q.dtype.itemsize, split) > SMEM_BYTES:
        num_stages -= 1
    num_stages = max(1, min(num_stages, num_kv_blocks))

    cu_q_lens, kv_lens = cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32)
    seq, q0, num_valid, first_pos, cu_blocks = query_blocks(cu_q_lens, kv_lens, num_q_blocks, block_q)
    lo, hi = kv_block_ranges(first_pos, num_valid, KEYS, None)
    start, count = _kv_chunks(lo, hi, num_splits)
    pages = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1).reshape(-1)

    # Regroup queries: block b, column i * heads + h is query q0[b] + i of sequence seq[b], head h.
    qb = gather_queries(q, cu_q_lens, seq, q0, num_valid, block_q).reshape(num_q_blocks, block_q * heads, width)
    qb = jnp.pad(qb, ((0, 0), (0, columns - block_q * heads), (0, 0)))  # [B, N, L + R]

    out_dtype = jnp.float32 if split else q.dtype
    scratch = dict(
        q_smem=plgpu.SMEM((columns, width), q.dtype, transforms=_tile_transforms(q.dtype, width)),
        kv_smem=plgpu.SMEM((num_stages, KEYS, width), q.dtype, transforms=_tile_transforms(q.dtype, width)),
        p_smem=plgpu.SMEM((columns, KEYS), q.dtype, transforms=_tile_transforms(q.dtype, KEYS)),
        o_smem=plgpu.SMEM((value_dim, columns), out_dtype, transforms=_tile_transforms(out_dtype, columns)),
        lse_smem=plgpu.SMEM((columns,), jnp.float32) if split else None,
        q_bar=plgpu.Barrier(),
        full=plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
        free=plgpu.Barrier(num_barriers=num_stages),
    )
    if split:
        out_type = (jax.ShapeDtypeStruct((num_splits, num_q_blocks, value_dim, columns), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, num_q_blocks, columns), jnp.float32))
    else:
        out_type = jax.ShapeDtypeStruct((num_q_blocks, value_dim, columns), q.dtype)
    kernel = functools.partial(
        _kernel, num_splits=num_splits, num_stages=num_stages, pages_per_block=pages_per_block,
        page_size=page_size, pages_per_seq=pages_per_seq, heads=heads, value_dim=value_dim, sm_scale=sm_scale,
        acc_in_place=not interpret)
    out = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch,
        grid=(num_q_blocks, num_splits), grid_names=("q_block", "split"),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(seq, first_pos, start, count, pages, qb, latent_pages)

    if split:
        o, lse = out  # [splits, B, value_dim, N], [splits, B, N] (log2 domain)
        weight = jnp.exp2(lse - jnp.max(lse, axis=0, keepdims=True))
        weight = weight / jnp.sum(weight, axis=0, keepdims=True)
        out = jnp.sum(o * weight[:, :, None, :], axis=0)

    # Back to token order (block column i * heads + h is query i's head h).
    out = out[:, :, :block_q * heads].reshape(num_q_blocks, value_dim, block_q, heads)
    out = out.transpose(0, 2, 3, 1).reshape(num_q_blocks * block_q, heads, value_dim)
    return scatter_outputs(out, cu_q_lens, cu_blocks, block_q, num_tokens).astype(q.dtype)
