"""The Mosaic GPU ragged paged-attention kernel matches the pure-JAX reference in
GPU interpret mode (on the CPU) over mixed decode / prefill batches, ragged edge
cases and quantized pages, without data races; and it lowers for CUDA at the
benchmark shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import kv_quantization
from pallas_kernels.paged_attention import gpu as pa_gpu
from pallas_kernels.paged_attention import ragged_paged_attention
from pallas_kernels.paged_attention import reference as _reference
from tests.paged_inputs import ragged_paged_inputs

# Jitted: eager op-by-op dispatch of the reference costs seconds on the CPU.
reference = jax.jit(_reference, static_argnames=("max_q_len", "sm_scale", "sliding_window", "soft_cap"))


def _check(got, want, num_real_tokens, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    assert not np.any(got[num_real_tokens:]), "padding rows must be zero"


# Keys per KV block are 64 (page_size * pages_per_block); head_dim 64 keeps interpret mode quick.
# Interpret mode costs ~0.5 s per CTA (kv_heads x query blocks x splits): keep few of each.
CASES = {
    # name: (seqs, T, S, q_heads, kv_heads, page_size, P, kernel options, attention options)
    "mixed_batch_decode_edges_prefill_chunks_empty_slots_padding":
        # kv_len 1, one page, one KV block, one past it; a prefill chunk mid-context; an empty
        # slot in the middle and one at the end; one long prefill over two query blocks.
        ([(1, 1), (1, 16), (1, 64), (1, 65), (0, 0), (7, 20), (20, 100)], 32, 8, 4, 1, 16, 7, {}, {}),
    "gqa8_pages_of_8_one_compute_warpgroup":
        ([(1, 9), (12, 40), (1, 64)], 16, 3, 16, 2, 8, 8, dict(num_compute=1), {}),
    "sliding_window_soft_cap_skips_early_blocks_gqa":
        ([(1, 150), (9, 140), (1, 6)], 12, 3, 4, 2, 16, 10, dict(num_stages=3),
         dict(sliding_window=20, soft_cap=5.0)),
    "split_kv_decode_combines_partials":
        ([(1, 200), (2, 130)], 4, 2, 8, 1, 16, 13, dict(num_splits=2, num_stages=2), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_in_gpu_interpret_mode(name):
    seqs, t, s, hq, hkv, ps, p, kernel_options, options = CASES[name]
    args, max_q_len = ragged_paged_inputs(seqs, t, s, hq, hkv, 64, ps, p)
    want = reference(*args, max_q_len=max_q_len, sm_scale=0.125, **options)
    got = pa_gpu.ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=0.125,
                                        interpret=plgpu.InterpretGPUParams(), **kernel_options, **options)
    _check(got, want, int(args[-1][-1]))


@pytest.mark.parametrize("kv_dtype,kv_len,detect_races", [
    # Pages of 32 (quantized pages need it). 6 KV blocks split in 2, each through 2 ring
    # slots: slots are reused within a split.
    (jnp.int8, 380, True),
    (jnp.float8_e4m3fn, 70, False),
])
def test_quantized_pages_match_reference_with_scales_without_races(kv_dtype, kv_len, detect_races):
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    args, max_q_len = ragged_paged_inputs([(6, kv_len)], 8, 1, 4, 2, 64, 32, -(-kv_len // 32), seed=2)
    q, k_pages, v_pages, *rest = args
    (kq, ks), (vq, vs) = kv_quantization.quantize(k_pages, kv_dtype), kv_quantization.quantize(v_pages, kv_dtype)
    want = reference(q, kq, vq, *rest, max_q_len=max_q_len, sm_scale=0.125, k_scale=ks, v_scale=vs)
    got = pa_gpu.ragged_paged_attention(q, kq, vq, *rest, max_q_len=max_q_len, sm_scale=0.125,
                                        k_scale=ks, v_scale=vs, num_splits=2, num_stages=2,
                                        interpret=plgpu.InterpretGPUParams(detect_races=detect_races))
    _check(got, want, int(rest[-1][-1]))
    assert not (detect_races and interpret_pallas_call.get_races().races_found)


def test_public_gpu_interpret_override_runs_the_kernel_without_races():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    # 5 KV blocks through a ring of 4 slots: the memory warpgroup waits for freed slots.
    args, max_q_len = ragged_paged_inputs([(5, 300), (1, 4)], 8, 2, 4, 2, 64, 16, 19, seed=1)
    want = reference(*args, max_q_len=max_q_len, sm_scale=0.2)
    got = ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=0.2,
                                 interpret=plgpu.InterpretGPUParams(detect_races=True))
    _check(got, want, int(args[-1][-1]))
    assert not interpret_pallas_call.get_races().races_found


def test_kv_chunks_split_each_block_range_contiguously():
    lo, hi = jnp.array([0, 2, 0], jnp.int32), jnp.array([6, 2, -1], jnp.int32)
    start, count = pa_gpu._kv_chunks(lo, hi, 3)
    # 7 blocks -> 3 + 3 + 1; 1 block -> 1 + 0 + 0; none -> 0 + 0 + 0.
    assert count.tolist() == [3, 3, 1, 1, 0, 0, 0, 0, 0]
    assert start.tolist()[:4] == [0, 3, 6, 2]


def test_support_check_names_what_the_kernel_cannot_take():
    q = jnp.zeros((4, 8, 128), jnp.bfloat16)
    pages = jnp.zeros((8, 16, 2, 128), jnp.bfloat16)
    assert pa_gpu.supports(q, pages, pages) is None
    assert "q dtype" in pa_gpu.supports(q.astype(jnp.float32), pages, pages)
    assert "head_dim" in pa_gpu.supports(q[..., :96], pages[..., :96], pages[..., :96])
    assert "scales" in pa_gpu.supports(q, pages.astype(jnp.int8), pages.astype(jnp.int8))
    scale = jnp.ones((pages.shape[0], pages.shape[2], pages.shape[1]), jnp.float32)
    if pages.shape[1] % 32:
        assert "page_size" in pa_gpu.supports(q, pages.astype(jnp.int8), pages.astype(jnp.int8), scale, scale)


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("max_q_len", [1, 128])
def test_public_function_lowers_to_mosaic_gpu_for_cuda(kv_dtype, max_q_len):
    """Benchmark shape: batch 64 decode over 4096 tokens, 32/8 heads, head_dim 128, pages of 16
    (max_q_len 1), and a mixed batch (max_q_len 128)."""
    quantized = kv_dtype != jnp.bfloat16
    page_size = 32 if quantized else 16
    tokens, seqs, q_heads, kv_heads, head_dim, pages_per_seq = 64, 64, 32, 8, 128, 4096 // page_size

    def attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, *scales):
        kw = dict(k_scale=scales[0], v_scale=scales[1]) if quantized else {}
        return ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                      max_q_len=max_q_len, sm_scale=head_dim ** -0.5, **kw)

    num_pages = seqs * pages_per_seq
    pages = jax.ShapeDtypeStruct((num_pages, page_size, kv_heads, head_dim), kv_dtype)
    args = [jax.ShapeDtypeStruct((tokens * max_q_len, q_heads, head_dim), jnp.bfloat16), pages, pages,
            jax.ShapeDtypeStruct((seqs,), jnp.int32), jax.ShapeDtypeStruct((seqs, pages_per_seq), jnp.int32),
            jax.ShapeDtypeStruct((seqs + 1,), jnp.int32)]
    if quantized:
        args += [jax.ShapeDtypeStruct((num_pages, kv_heads, page_size), jnp.float32)] * 2
    exported = export.export(jax.jit(attend), platforms=["cuda"])(*args)
    assert exported.platforms == ("cuda",)
    assert "custom_call @mosaic_gpu" in exported.mlir_module()  # the kernel call, not a name
