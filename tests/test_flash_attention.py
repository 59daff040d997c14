"""The Mosaic TPU flash-attention kernel matches the pure-JAX reference in
interpret mode across ragged packings, and lowers for TPU (v5e, v6e)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import flash_attention, reference
from pallas_kernels.flash_attention import tpu as fa_tpu


def _inputs(cu_seqlens, num_tokens, q_heads, kv_heads, head_dim, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (num_tokens, q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (num_tokens, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (num_tokens, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, jnp.asarray(cu_seqlens, jnp.int32)


CASES = {
    # name: (cu_seqlens, T, q_heads, kv_heads, head_dim, dtype, block_q, block_kv, options)
    "len1_block_edge_padding_gqa_f32": ([0, 1, 17, 33, 37], 40, 4, 2, 64, jnp.float32, 16, 16, {}),
    "many_short_one_long_empty_gqa8x2_bf16": ([0, 1, 2, 2, 5, 8, 44], 48, 8, 2, 128, jnp.bfloat16, 16, 16, {}),
    "mqa_window_softcap_f32": ([0, 3, 29], 32, 4, 1, 64, jnp.float32, 16, 8,
                               dict(sliding_window=5, soft_cap=3.0)),
    "one_full_sequence_no_padding_bf16": ([0, 32], 32, 2, 2, 64, jnp.bfloat16, 8, 16, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_in_interpret_mode(name):
    cu, num_tokens, hq, hkv, d, dtype, bq, bk, options = CASES[name]
    q, k, v, cu = _inputs(cu, num_tokens, hq, hkv, d, dtype)
    scale = d ** -0.5
    want = reference(q, k, v, cu, sm_scale=scale, **options)
    got = fa_tpu.flash_attention(q, k, v, cu, sm_scale=scale, block_q=bq, block_kv=bk,
                                 interpret=pltpu.InterpretParams(), **options)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    assert not np.any(np.asarray(got[int(cu[-1]):], np.float32)), "padding rows must be zero"


def test_kernel_has_no_races_and_public_interpret_override_uses_it():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    q, k, v, cu = _inputs([0, 1, 130, 200], 256, 4, 2, 64, jnp.float32, seed=1)
    want = reference(q, k, v, cu, sm_scale=0.125)
    got = flash_attention(q, k, v, cu, sm_scale=0.125, interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert not interpret_pallas_call.races.races_found


def test_block_ranges_skip_other_sequences_and_future_blocks():
    # Blocks of 4: sequence [0, 6) then [6, 16). Causal: q block 0 sees kv block 0 only;
    # q block 2 (tokens 8..11, sequence from 6) sees kv blocks 1..2; padding block 3 sees none.
    cu = jnp.array([0, 6, 12], jnp.int32)
    lo, hi, start = fa_tpu._block_ranges(cu, 4, 4, 4, None)
    assert lo.tolist() == [0, 0, 1, 0] and hi.tolist() == [0, 1, 2, -1]
    assert start.tolist()[:12] == [0] * 6 + [6] * 6 and min(start.tolist()[12:]) >= 2**30
    lo, hi, _ = fa_tpu._block_ranges(cu, 4, 4, 4, 2)  # window 2: q block 2 needs keys from 7
    assert lo.tolist()[:3] == [0, 0, 1] and hi.tolist()[:3] == [0, 1, 2]
    lo, _, _ = fa_tpu._block_ranges(jnp.array([0, 16], jnp.int32), 4, 4, 4, 3)
    assert lo.tolist() == [0, 0, 1, 2]  # window 3: q block i needs keys from 4i - 2


def test_reference_is_plain_causal_softmax_per_sequence():
    q, k, v, cu = _inputs([0, 3, 7], 8, 2, 1, 16, jnp.float32)
    got = reference(q, k, v, cu, sm_scale=0.25)
    for s, e in [(0, 3), (3, 7)]:
        scores = jnp.einsum("qhd,lhd->hql", q[s:e], jnp.repeat(k[s:e], 2, axis=1)) * 0.25
        scores = jnp.where(jnp.tril(jnp.ones((e - s, e - s), bool)), scores, -jnp.inf)
        want = jnp.einsum("hql,lhd->qhd", jax.nn.softmax(scores, axis=-1), jnp.repeat(v[s:e], 2, axis=1))
        np.testing.assert_allclose(np.asarray(got[s:e]), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(got[7:]))


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_public_function_lowers_to_mosaic_for_tpu(device_kind):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    tokens, q_heads, kv_heads, head_dim = 512, 8, 2, 128

    def attend(q, k, v, cu):
        return flash_attention(q, k, v, cu, sm_scale=head_dim ** -0.5, sliding_window=256, soft_cap=30.0)

    args = [jax.ShapeDtypeStruct((tokens, h, head_dim), jnp.bfloat16) for h in (q_heads, kv_heads, kv_heads)]
    args.append(jax.ShapeDtypeStruct((9,), jnp.int32))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(attend), platforms=["tpu"])(*args)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()
