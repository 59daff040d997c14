"""Ragged paged attention over a paged KV cache: a Mosaic TPU Pallas kernel.

Queries are regrouped on the way in so that every query block belongs to one
sequence: sequence `s` gets `ceil(q_len / block_q)` blocks of `block_q` tokens
(its last block padded), decode tokens and prefill chunks alike. Within a block,
rows are `token * group + g` for one KV head, so the GQA group shares each K/V
page it loads and a decode token still fills `group` rows of the MXU.

Grid (kv_head, q_block, kv_block), kv innermost. A KV block is
`pages_per_block` pages; each page is its own BlockSpec whose index map reads
the scalar-prefetched page table, so the pipeline DMAs exactly the pages a
(sequence, query block) needs, double-buffered. Per q block, the range of KV
blocks holding any visible key (causal, inside kv_len and the sliding window)
is computed beforehand and scalar-prefetched: blocks outside it skip compute,
and their index maps clamp into the range so nothing new is fetched. Online
softmax keeps a running max, denominator and accumulator in VMEM.

The cache is read as `[num_pages, page_size, kv_heads * head_dim]` (a free
reshape) so a page of one head is a `[page_size, head_dim]` tile.

MLA (pallas_kernels/mla_attention): with `value_dim`, one page array holds each token's key and its
value is the key's first `value_dim` lanes (the compressed latent, whose key adds the rope part), so
each page is fetched once and serves both products.

Quantized pages (int8/fp8) bring scales [num_pages, kv_heads, page_size]; they
are read as [num_pages, kv_heads, page_size, 1] (a free reshape), so one page's
scales arrive as a [page_size, 1] column beside the page itself, through the
same index map, and the page is dequantized in VMEM before the MXU.
TODO(speed): decode-only steps waste `block_q - 1` tokens of every block; a
layout packing several decode sequences into one block would not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.online_softmax import MASK_VALUE
from pallas_kernels.paged_attention.plan import kv_block_ranges, query_blocks


def _kernel(seq_ref, lo_ref, hi_ref, first_pos_ref, num_valid_ref, pages_ref, q_ref, *refs,
            pages_per_block, page_size, group, sm_scale, sliding_window, soft_cap, quantized, value_dim):
    n = pages_per_block
    shared = value_dim is not None  # MLA: the values are the keys' first value_dim lanes
    k_refs, v_refs = refs[:n], (None if shared else refs[n:2 * n])
    ks_refs, vs_refs = (refs[2 * n:3 * n], refs[3 * n:4 * n]) if quantized else ((None,) * n,) * 2
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]  # the output, then the scratch
    b, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        online_softmax.init(m_ref, l_ref, acc_ref)

    @pl.when((j >= lo_ref[b]) & (j <= hi_ref[b]))
    def _step():
        def load(refs, scale_refs):
            tiles = [_dequantize(r, sr, q_ref.dtype) for r, sr in zip(refs, scale_refs)]
            return jnp.concatenate(tiles, axis=0) if len(tiles) > 1 else tiles[0]

        k = load(k_refs, ks_refs)
        v = k[:, :value_dim] if shared else load(v_refs, vs_refs)
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [rows, block_kv]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        token = lax.div(lax.broadcasted_iota(jnp.int32, s.shape, 0), group)
        q_pos = first_pos_ref[b] + token
        k_pos = j * (pages_per_block * page_size) + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (k_pos <= q_pos) & (token < num_valid_ref[b])
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        s = jnp.where(mask, s, MASK_VALUE)

        online_softmax.update(m_ref, l_ref, acc_ref, s, mask, v)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        online_softmax.finish(o_ref, l_ref, acc_ref)


def _dequantize(page_ref, scale_ref, dtype):
    if scale_ref is None:
        return page_ref[...]
    return (page_ref[...].astype(jnp.float32) * scale_ref[...]).astype(dtype)


def supports(q, k_pages, v_pages, k_scale=None, v_scale=None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can. One KV head
    of a page must be whole 128-lane vregs in the [pages, page_size,
    kv_heads * head_dim] view (or the only head), pages whole sublanes."""
    _, page_size, kv_heads, head_dim = k_pages.shape
    if head_dim % 128 and kv_heads > 1:
        return f"head_dim {head_dim} is not a multiple of 128 (with {kv_heads} KV heads)"
    if page_size % 8:
        return f"page_size {page_size} is not a multiple of 8"
    if (k_scale is None) != (v_scale is None):
        return "k_scale and v_scale come together"
    return None


def default_block_q(max_q_len: int, group: int) -> int:
    """Query tokens per block: enough rows (`block_q * group`) to fill 16
    sublanes, at most 128 rows, no more than the longest query needs."""
    least = -(-16 // group)
    return min(max(max_q_len, least), max(least, 128 // group))


@functools.partial(jax.jit, static_argnames=("max_q_len", "sm_scale", "sliding_window", "soft_cap",
                                             "block_q", "pages_per_block", "interpret", "value_dim"))
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
    block_q: int | None = None,  # query tokens per block; default_block_q when None
    pages_per_block: int = 1,  # KV pages per grid step
    interpret: bool | pltpu.InterpretParams = False,
    k_scale: jax.Array | None = None,  # [num_pages, kv_heads, page_size] float32 for int8/fp8 pages
    v_scale: jax.Array | None = None,
    value_dim: int | None = None,  # MLA: values are the keys' first value_dim lanes (v_pages: None)
) -> jax.Array:  # [T, q_heads, head_dim or value_dim], rows of padding tokens are zero
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    if value_dim is not None and (k_scale is not None or num_kv_heads != 1 or not 0 < value_dim <= head_dim):
        raise ValueError(f"value_dim (MLA) takes one KV head of float pages and value_dim <= head_dim ({head_dim})")
    out_dim = value_dim or head_dim
    num_seqs, pages_per_seq = page_table.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q_heads {num_q_heads} not a multiple of kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    quantized = k_scale is not None
    if quantized != (v_scale is not None):
        raise ValueError("k_scale and v_scale come together")
    block_q = block_q or default_block_q(max_q_len, group)
    rows = block_q * group
    block_kv = pages_per_block * page_size
    num_kv_blocks = -(-pages_per_seq // pages_per_block)
    # Each sequence wastes under one block, and none has more than ceil(max_q_len / block_q).
    num_q_blocks = max(1, min(-(-(num_tokens + num_seqs * (block_q - 1)) // block_q),
                              num_seqs * -(-max_q_len // block_q)))

    cu_q_lens, kv_lens = cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32)
    seq, q0, num_valid, first_pos, cu_blocks = query_blocks(cu_q_lens, kv_lens, num_q_blocks, block_q)
    lo, hi = kv_block_ranges(first_pos, num_valid, block_kv, sliding_window)
    pages = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1).reshape(-1)

    # Regroup queries: slot b * block_q + i holds query q0[b] + i of sequence seq[b].
    i = jnp.arange(block_q, dtype=jnp.int32)
    token = (cu_q_lens[seq][:, None] + q0[:, None] + i[None, :]).reshape(-1)
    slot_valid = (i[None, :] < num_valid[:, None]).reshape(-1)
    qb = jnp.where(slot_valid[:, None, None], q[jnp.clip(token, 0, num_tokens - 1)], 0)
    qb = qb.reshape(num_q_blocks * block_q, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qb = qb.reshape(num_kv_heads, num_q_blocks * rows, head_dim)  # [K, blocks * rows, D]
    kf = k_pages.reshape(num_pages, page_size, num_kv_heads * head_dim)
    vf = None if value_dim is not None else v_pages.reshape(num_pages, page_size, num_kv_heads * head_dim)

    def page_index(n):
        def index(h, b, j, seq, lo, hi, first_pos, num_valid, pages):
            jj = jnp.clip(j, lo[b], jnp.maximum(hi[b], lo[b]))
            page = jnp.minimum(jj * pages_per_block + n, pages_per_seq - 1)
            return pages[seq[b] * pages_per_seq + page], 0, h
        return pl.BlockSpec((None, page_size, head_dim), index)

    q_spec = pl.BlockSpec((None, rows, head_dim), lambda h, b, j, *_: (h, b, 0))
    o_spec = pl.BlockSpec((None, rows, out_dim), lambda h, b, j, *_: (h, b, 0))
    def scale_index(n):
        page = page_index(n).index_map
        def index(*args):
            p, _, h = page(*args)
            return p, h, 0, 0
        return pl.BlockSpec((None, None, page_size, 1), index)

    page_specs = [page_index(n) for n in range(pages_per_block)]
    if value_dim is not None:  # MLA: each page once, for the keys and the values both
        kv_specs, kv_inputs = page_specs, [kf] * pages_per_block
    else:
        kv_specs, kv_inputs = page_specs * 2, [kf] * pages_per_block + [vf] * pages_per_block
    if quantized:
        scale_shape = (num_pages, num_kv_heads, page_size, 1)
        kv_specs += [scale_index(n) for n in range(pages_per_block)] * 2
        kv_inputs += ([k_scale.astype(jnp.float32).reshape(scale_shape)] * pages_per_block
                      + [v_scale.astype(jnp.float32).reshape(scale_shape)] * pages_per_block)
    kernel = functools.partial(_kernel, pages_per_block=pages_per_block, page_size=page_size,
                               group=group, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, quantized=quantized, value_dim=value_dim)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(num_kv_heads, num_q_blocks, num_kv_blocks),
            in_specs=[q_spec] + kv_specs,
            out_specs=o_spec,
            scratch_shapes=[
                pltpu.VMEM((rows, 1), jnp.float32),  # running max
                pltpu.VMEM((rows, 1), jnp.float32),  # running denominator
                pltpu.VMEM((rows, out_dim), jnp.float32),  # accumulator
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((*qb.shape[:2], out_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(seq, lo, hi, first_pos, num_valid, pages, qb, *kv_inputs)

    # Back to token order: token t of sequence s sits at slot cu_blocks[s] * block_q + (t - cu_q_lens[s]).
    out = out.reshape(num_kv_heads, num_q_blocks * block_q, group, out_dim).transpose(1, 0, 2, 3)
    out = out.reshape(num_q_blocks * block_q, num_q_heads, out_dim)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tseq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, num_seqs - 1)
    slot = cu_blocks[tseq] * block_q + t - cu_q_lens[tseq]
    real = t < cu_q_lens[-1]
    return jnp.where(real[:, None, None], out[jnp.clip(slot, 0, num_q_blocks * block_q - 1)], 0).astype(q.dtype)
