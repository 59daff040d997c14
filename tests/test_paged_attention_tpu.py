"""The Mosaic TPU ragged paged-attention kernel matches the pure-JAX reference in
interpret mode over mixed decode / prefill batches and ragged edge cases, and
the public function lowers for TPU (v5e, v6e)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import ragged_paged_attention, reference
from pallas_kernels.paged_attention import plan as pa_plan
from pallas_kernels.paged_attention import tpu as pa_tpu
from pallas_kernels import kv_quantization
from tests.paged_inputs import ragged_paged_inputs


CASES = {
    # name: (seqs, T, S, q_heads, kv_heads, head_dim, page_size, P, dtype, block_q, pages_per_block, options)
    "decode_only_gqa_exact_page_edges_f32":
        ([(1, 5), (1, 16), (1, 1), (1, 8)], 4, 4, 8, 2, 32, 8, 2, jnp.float32, None, 1, {}),
    "prefill_mid_context_len1_empty_rows_bf16":
        ([(1, 9), (7, 20), (1, 1), (8, 16), (3, 3)], 24, 7, 4, 2, 32, 4, 6, jnp.bfloat16, 4, 2, {}),
    "many_short_one_long_mqa_f32":
        ([(1, 3), (2, 2), (1, 9), (1, 4), (30, 45)], 40, 5, 4, 1, 32, 8, 6, jnp.float32, 8, 2, {}),
    "window_softcap_mixed_gqa_f32":
        ([(1, 17), (9, 23), (1, 6)], 12, 4, 4, 2, 32, 4, 6, jnp.float32, 4, 1,
         dict(sliding_window=6, soft_cap=5.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_in_interpret_mode(name):
    seqs, t, s, hq, hkv, d, ps, p, dtype, bq, ppb, options = CASES[name]
    args, max_q_len = ragged_paged_inputs(seqs, t, s, hq, hkv, d, ps, p, dtype)
    scale = d ** -0.5
    want = reference(*args, max_q_len=max_q_len, sm_scale=scale, **options)
    got = pa_tpu.ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=scale, block_q=bq,
                                        pages_per_block=ppb, interpret=pltpu.InterpretParams(),
                                        **options)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    assert not np.any(np.asarray(got[int(args[-1][-1]):], np.float32)), "padding rows must be zero"


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_quantized_pages_match_reference_on_the_same_pages(kv_dtype):
    args, max_q_len = ragged_paged_inputs([(1, 9), (6, 14), (1, 4)], 10, 4, 4, 2, 32, 4, 4, jnp.bfloat16, seed=2)
    q, k_pages, v_pages, *rest = args
    (kq, ks), (vq, vs) = kv_quantization.quantize(k_pages, kv_dtype), kv_quantization.quantize(v_pages, kv_dtype)
    want = reference(q, kq, vq, *rest, max_q_len=max_q_len, sm_scale=0.2, k_scale=ks, v_scale=vs)
    got = pa_tpu.ragged_paged_attention(q, kq, vq, *rest, max_q_len=max_q_len, sm_scale=0.2,
                                        k_scale=ks, v_scale=vs, pages_per_block=2,
                                        interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
    # Quantization itself costs little: int8 within ~1%, fp8 e4m3 within ~7% of the bf16 result.
    exact = reference(*args, max_q_len=max_q_len, sm_scale=0.2)
    err = np.max(np.abs(np.asarray(want, np.float32) - np.asarray(exact, np.float32)))
    assert err < (0.05 if kv_dtype == jnp.int8 else 0.25), err
    assert err > 0, "quantized pages must differ from the bf16 ones"


def test_kernel_has_no_races_and_public_interpret_override_uses_it():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    args, max_q_len = ragged_paged_inputs([(1, 7), (5, 12), (1, 4)], 8, 4, 4, 2, 32, 4, 4, jnp.float32, seed=1)
    want = reference(*args, max_q_len=max_q_len, sm_scale=0.2)
    got = ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=0.2,
                                 interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert not interpret_pallas_call.races.races_found


def test_query_blocks_keep_one_sequence_per_block_and_skip_invisible_pages():
    # q_lens 1, 5, 0, 2 with blocks of 2 tokens: sequence 1 takes blocks 1..3, sequence 3 block 4.
    cu = jnp.array([0, 1, 6, 6, 8], jnp.int32)
    kv_lens = jnp.array([3, 9, 0, 2], jnp.int32)
    seq, q0, num_valid, first_pos, cu_blocks = pa_plan.query_blocks(cu, kv_lens, 6, 2)
    assert seq.tolist()[:5] == [0, 1, 1, 1, 3] and q0.tolist()[:5] == [0, 0, 2, 4, 0]
    assert num_valid.tolist() == [1, 2, 2, 1, 2, 0] and cu_blocks.tolist() == [0, 1, 4, 4, 5]
    assert first_pos.tolist()[:5] == [2, 4, 6, 8, 0]
    lo, hi = pa_plan.kv_block_ranges(first_pos, num_valid, 4, None)
    assert lo.tolist() == [0] * 5 + [0] and hi.tolist() == [0, 1, 1, 2, 0, -1]
    lo, _ = pa_plan.kv_block_ranges(first_pos, num_valid, 4, 3)  # window 3: keys from first_pos - 2
    assert lo.tolist()[:5] == [0, 0, 1, 1, 0]


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_public_function_lowers_to_mosaic_for_tpu(device_kind):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    tokens, seqs, q_heads, kv_heads, head_dim, page_size, pages_per_seq = 256, 16, 8, 2, 128, 16, 32

    def attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens):
        return ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                      max_q_len=128, sm_scale=head_dim ** -0.5,
                                      sliding_window=256, soft_cap=30.0)

    pages = jax.ShapeDtypeStruct((seqs * pages_per_seq, page_size, kv_heads, head_dim), jnp.bfloat16)
    args = [jax.ShapeDtypeStruct((tokens, q_heads, head_dim), jnp.bfloat16), pages, pages,
            jax.ShapeDtypeStruct((seqs,), jnp.int32), jax.ShapeDtypeStruct((seqs, pages_per_seq), jnp.int32),
            jax.ShapeDtypeStruct((seqs + 1,), jnp.int32)]
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(attend), platforms=["tpu"])(*args)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()

    def attend_int8(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, k_scale, v_scale):
        return pa_tpu.ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                             max_q_len=128, sm_scale=head_dim ** -0.5,
                                             k_scale=k_scale, v_scale=v_scale)

    pages8 = jax.ShapeDtypeStruct(pages.shape, jnp.int8)
    scales = jax.ShapeDtypeStruct((seqs * pages_per_seq, kv_heads, page_size), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(attend_int8), platforms=["tpu"])(
            args[0], pages8, pages8, *args[3:], scales, scales)
    assert "tpu_custom_call" in exported.mlir_module()
