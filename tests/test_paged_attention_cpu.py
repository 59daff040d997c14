"""The CPU's native decode attention (pallas_kernels/paged_attention/cpu.cc) against the dense reference, on
ragged decode rows, GQA, windows, soft caps, bf16 pages and steps that mix decode and prefill; and `auto`
attention on the CPU taking it for the decode rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.layers import attention, attention_xla
from pallas_kernels import native_cpu
from pallas_kernels.paged_attention import cpu as paged_cpu
from tests.test_attention_xla import _reference, make_step

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernel")
_STATIC = ("sm_scale", "sliding_window", "soft_cap")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native_cpu.load():
        pytest.skip(f"the native kernels could not be built here: {native_cpu._state.get('error')}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _native(q, k_pages, v_pages, batch, *, sm_scale, sliding_window=None, soft_cap=None):
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    decode = functools.partial(paged_cpu.decode_attention, **options)
    return attention_xla.paged_attention(q, k_pages, v_pages, batch, decode_attention=decode, block_kv=8, **options)


def check(q, k, v, batch, atol=1e-5, **options):
    options.setdefault("sm_scale", 0.25)
    want = _reference(q, k, v, batch, **options)
    got = _native(q, k, v, batch, **options)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=atol)
    return got


@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"soft_cap": 2.0},
                                     {"sliding_window": 3, "soft_cap": 1.5}])
def test_decode_rows_match_the_reference(options):
    # Contexts across page boundaries, a one-token context, and a padding row (the fifth: the null page).
    q, k, v, batch = make_step(0, page_size=4, decode_ctx=(1, 4, 9, 37), decode_rows=5)
    check(q, k, v, batch, **options)


def test_a_step_mixing_decode_and_prefill_matches_the_reference():
    q, k, v, batch = make_step(1, page_size=4, decode_ctx=(6, 17), prefill=((0, 11), (5, 7)), prefill_tokens=24,
                               block_q=8)
    check(q, k, v, batch, sliding_window=6)


def test_bf16_pages_and_query():
    q, k, v, batch = make_step(2, page_size=8, decode_ctx=(3, 30, 64), dtype=jnp.bfloat16, head_dim=64,
                               heads=(9, 3))
    check(q, k, v, batch, atol=2e-2)


def test_auto_attention_on_the_cpu_calls_the_kernel_for_decode_rows():
    q, k, v, batch = make_step(3, page_size=4, decode_ctx=(5, 12))

    def run(q, k, v, batch):
        return attention.paged_attention(q, k, v, batch, sm_scale=0.25)

    with attention.implementation("auto"):
        text = jax.jit(run).lower(q, k, v, batch).as_text()
        got = jax.jit(run)(q, k, v, batch)
    assert paged_cpu.TARGET in text
    want = _reference(q, k, v, batch, sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_the_kernel_refuses_what_it_does_not_take():
    q, k, v, _ = make_step(4, page_size=4, decode_ctx=(5,))
    assert paged_cpu.supports(q, k, v)
    assert not paged_cpu.supports(q, k, v.astype(jnp.bfloat16))  # pages alike
    assert not paged_cpu.supports(q[:, :7], k, v)  # 7 query heads over 2 KV heads
