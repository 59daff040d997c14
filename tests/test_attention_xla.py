"""jaxinfer.layers.attention_xla (blockwise paged attention over the step Batch) agrees
with the dense reference on every shape of work a step can hold, stays finite
on padding, never builds a [groups, context] array, and lowers for TPU."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxinfer.runner.step_inputs import build
from jaxinfer.core.shapes import BatchShape, SeqWork
from jaxinfer.layers import attention, attention_xla
from pallas_kernels.paged_attention import reference

_STATIC = ("sm_scale", "sliding_window", "soft_cap")


@functools.partial(jax.jit, static_argnames=_STATIC + ("block_kv",))
def _xla(q, k_pages, v_pages, batch, *, sm_scale, sliding_window=None, soft_cap=None, block_kv=8):
    return attention_xla.paged_attention(q, k_pages, v_pages, batch, sm_scale=sm_scale,
                                         sliding_window=sliding_window, soft_cap=soft_cap,
                                         block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _reference(q, k_pages, v_pages, batch, *, sm_scale, sliding_window=None, soft_cap=None):
    """The dense reference on the Batch's ragged view (cu_q_lens, kv_lens, page_table)."""
    return reference(q, k_pages, v_pages, batch.kv_lens, batch.page_table, batch.cu_q_lens,
                     max_q_len=batch.max_q_len, sm_scale=sm_scale,
                     sliding_window=sliding_window, soft_cap=soft_cap)


# Most tests share one compiled shape (and so one compilation): page size 4, 4 decode rows,
# 32 prefill tokens in query blocks of 8, contexts up to 64, GQA with 8 query and 2 KV heads.
STANDARD = dict(page_size=4, decode_rows=4, prefill_tokens=32, block_q=8, pages_per_seq=16,
                num_pages=64)


def make_step(seed, *, page_size, decode_ctx=(), prefill=(), decode_rows=None, prefill_tokens=0,
              block_q=8, pages_per_seq=None, num_pages=None, heads=(8, 2), head_dim=16, dtype=jnp.float32,
              q_scale=1.0):
    """Random q and K/V pages and a Batch. decode_ctx: context length of each decode sequence
    (its last token is the query); prefill: (start, num_tokens) of each prefill chunk. Pages
    come in random order from a shuffled pool."""
    rng = np.random.default_rng(seed)
    H, K = heads
    needs = [-(-n // page_size) for n in decode_ctx] + [-(-(s + n) // page_size) for s, n in prefill]
    num_pages = num_pages or 1 + sum(needs) + 3  # page 0 is the null page
    pool = list(rng.permutation(np.arange(1, num_pages)))
    pages = [[int(pool.pop()) for _ in range(n)] for n in needs]
    decode = [SeqWork(token_ids=[1], start=n - 1, pages=p) for n, p in zip(decode_ctx, pages)]
    chunks = [SeqWork(token_ids=[1] * n, start=s, pages=p)
              for (s, n), p in zip(prefill, pages[len(decode_ctx):])]
    shape = BatchShape(decode_rows=decode_rows or max(1, len(decode)), prefill_tokens=prefill_tokens,
                       block_q=block_q, pages_per_seq=pages_per_seq or max(needs, default=1))
    batch, _ = build(shape, decode, chunks, page_size)
    q = rng.normal(size=(shape.num_tokens, H, head_dim)) * q_scale
    k = rng.normal(size=(num_pages, page_size, K, head_dim))
    v = rng.normal(size=(num_pages, page_size, K, head_dim))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), batch


def check(q, k, v, batch, *, atol=1e-5, block_kv=8, **options):
    options.setdefault("sm_scale", 0.25)
    want = _reference(q, k, v, batch, **options)
    got = _xla(q, k, v, batch, block_kv=block_kv, **options)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert np.isfinite(np.asarray(got, np.float32)).all()
    # Tokens owned by no sequence (prefill padding) come out zero.
    np.testing.assert_array_equal(np.asarray(got[int(batch.cu_q_lens[-1]):], np.float32), 0)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=atol)
    return got


def test_decode_only_matches_reference():
    check(*make_step(0, page_size=4, decode_ctx=[1, 5, 17, 40, 3], decode_rows=8))


def test_prefill_only_matches_reference():
    check(*make_step(1, prefill=[(0, 13), (0, 3)], **STANDARD))


def test_mixed_decode_and_prefill_matches_reference():
    check(*make_step(2, decode_ctx=[9, 2, 33], prefill=[(0, 11), (7, 6), (0, 1)], **STANDARD))


def test_prefill_chunk_of_one_token_matches_reference():
    check(*make_step(3, decode_ctx=[6], prefill=[(9, 1), (0, 1)], **STANDARD))


def test_chunked_prefill_continuation_ending_on_page_boundary():
    # Starts mid-page at 6, ends exactly at 16 = 4 pages; query blocks straddle pages.
    q, k, v, batch = make_step(4, prefill=[(6, 10), (21, 11)], **STANDARD)
    assert list(batch.kv_lens[4:6]) == [16, 32]
    check(q, k, v, batch)


def test_context_a_whole_number_of_pages():
    check(*make_step(5, decode_ctx=[4, 16, 64], prefill=[(16, 16), (0, 8)], **STANDARD))


def test_many_short_sequences_and_one_long():
    check(*make_step(6, decode_ctx=[2, 64, 1, 3], prefill=[(0, 2), (50, 9), (0, 3)], **STANDARD))


def test_page_table_much_wider_than_contexts():
    check(*make_step(7, decode_ctx=[3, 1], prefill=[(2, 5)], **STANDARD))


def test_padding_rows_and_blocks_are_finite_and_do_not_reach_real_rows():
    # 1 of 4 decode rows real, one 5-token prompt in the 32-token region: most blocks are empty.
    q, k, v, batch = make_step(8, decode_ctx=[7], prefill=[(3, 5)], **STANDARD)
    assert (np.asarray(batch.block_tokens) == q.shape[0]).all(axis=1).sum() >= 6
    got = check(q, k, v, batch)
    real = np.r_[0:1, 4:9]
    noisy = _xla(q.at[np.r_[1:4, 9:q.shape[0]]].set(1e4), k, v, batch, sm_scale=0.25, block_kv=8)
    np.testing.assert_allclose(noisy[real], got[real], atol=1e-6)


def test_multi_query_attention():
    check(*make_step(9, decode_ctx=[5, 23], prefill=[(4, 9), (0, 6)], heads=(4, 1), **STANDARD))


@pytest.mark.parametrize("window", [1, 6, 1000])
def test_sliding_window(window):
    check(*make_step(10, decode_ctx=[3, 20, 45], prefill=[(30, 12), (0, 9)], **STANDARD),
          sliding_window=window)


def test_soft_cap():
    q, k, v, batch = make_step(11, decode_ctx=[9, 30], prefill=[(5, 10)], q_scale=4.0, **STANDARD)
    capped = check(q, k, v, batch, soft_cap=2.0)
    assert not np.allclose(capped, _xla(q, k, v, batch, sm_scale=0.25, block_kv=8), atol=1e-3)


def test_soft_cap_with_sliding_window_in_bfloat16():
    check(*make_step(12, decode_ctx=[40, 3], prefill=[(17, 14), (0, 5)], q_scale=3.0,
                     dtype=jnp.bfloat16, **STANDARD),
          soft_cap=5.0, sliding_window=7, atol=3e-2)


@pytest.mark.parametrize("page_size,block_kv", [(1, 4), (4, 4), (4, 12), (16, 16), (16, 64)])
def test_page_and_key_block_sizes(page_size, block_kv):
    check(*make_step(13, page_size=page_size, decode_ctx=[1, 16, 37], decode_rows=4,
                     prefill=[(0, 17), (20, 12)], prefill_tokens=32), block_kv=block_kv)


def test_one_compilation_serves_batches_of_one_shape():
    first = make_step(15, decode_ctx=[3, 8], prefill=[(0, 5)], **STANDARD)
    second = make_step(16, decode_ctx=[30, 1, 64], prefill=[(40, 7), (2, 3)], **STANDARD)
    traces = []

    @jax.jit
    def f(q, k, v, batch):
        traces.append(1)
        return attention_xla.paged_attention(q, k, v, batch, sm_scale=0.25, block_kv=8)

    for q, k, v, batch in (first, second):
        np.testing.assert_allclose(f(q, k, v, batch), _reference(q, k, v, batch, sm_scale=0.25),
                                   atol=1e-5)
    assert len(traces) == 1


def _largest_intermediate(closed_jaxpr):
    """(most elements, longest axis) over every value computed inside the jaxpr, sub-jaxprs too."""
    most, longest = 0, 0

    def visit(jaxpr):
        nonlocal most, longest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                most = max(most, int(np.prod(shape)))
                longest = max(longest, max(shape, default=0))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        visit(sub)

    visit(closed_jaxpr.jaxpr)
    return most, longest


def test_never_materializes_a_full_context_array():
    # Short contexts under a 64K-token page table: nothing may grow with the table's reach.
    q, k, v, batch = make_step(17, page_size=16, decode_ctx=[20, 5], decode_rows=8,
                               prefill=[(0, 16)], prefill_tokens=32, pages_per_seq=4096,
                               heads=(4, 1), head_dim=8)
    S, P = batch.page_table.shape
    ctx = P * 16

    def largest(f):
        return _largest_intermediate(jax.make_jaxpr(functools.partial(f, sm_scale=0.25))(
            q, k, v, batch))

    assert largest(_reference.__wrapped__)[1] >= ctx  # the checker does see a dense [S, ctx] gather
    most, longest = largest(attention_xla.paged_attention)
    assert longest < ctx // 4 and most < S * ctx // 4, (most, longest)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(dtype):
    q, k, v, batch = make_step(18, page_size=16, decode_ctx=[20, 5], decode_rows=8,
                               prefill=[(0, 16)], prefill_tokens=32, heads=(8, 2), head_dim=128,
                               dtype=dtype)
    f = functools.partial(attention_xla.paged_attention, sm_scale=0.1, sliding_window=64,
                          soft_cap=30.0)
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (q, k, v, batch))
    exported = export.export(jax.jit(f), platforms=["tpu"])(*specs)
    assert exported.platforms == ("tpu",)
    assert "stablehlo.while" in exported.mlir_module()


def test_dispatch_defaults_to_auto_which_is_xla_on_cpu_and_can_force_reference():
    q, k, v, batch = make_step(19, decode_ctx=[7], prefill=[(2, 6)], **STANDARD)

    def lowered():
        return jax.jit(functools.partial(attention.paged_attention, sm_scale=0.25)).lower(
            q, k, v, batch).as_text()

    if "JAXINFER_ATTENTION" not in os.environ:
        assert attention.get_implementation() == "auto"
    with attention.implementation("auto"):
        assert "while" in lowered()  # the blockwise loop of `xla`
        with attention.implementation("reference"):
            assert attention.get_implementation() == "reference"
            assert "while" not in lowered()
        assert attention.get_implementation() == "auto"
    with pytest.raises(ValueError, match="unknown attention"):
        attention.set_implementation("nope")
