"""The Mosaic GPU flash-attention kernel matches the pure-JAX reference in GPU
interpret mode (on the CPU) across ragged packings, without data races, and
lowers for CUDA at the benchmark shape and a ragged one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import flash_attention, reference
from pallas_kernels.flash_attention import gpu as fa_gpu

reference = jax.jit(reference, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


def _inputs(cu_seqlens, num_tokens, q_heads, kv_heads, head_dim, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (num_tokens, q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (num_tokens, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (num_tokens, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, jnp.asarray(cu_seqlens, jnp.int32)


def _check(got, want, num_real_tokens, tol=3e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    assert not np.any(got[num_real_tokens:]), "padding rows must be zero"


# head_dim 64 keeps interpret mode quick; a CUDA block takes 2 x 64 query rows.
CASES = {
    # name: (cu_seqlens, T, q_heads, kv_heads, kernel options, attention options)
    "empty_short_and_block_edge_sequences_gqa4_3_stages":
        ([0, 0, 1, 2, 3, 5, 64, 128], 128, 4, 1, dict(block_kv=64, num_stages=3), {}),
    "window_softcap_skips_early_blocks_unaligned_tokens_f16":
        ([0, 3, 64, 150, 190], 190, 2, 1, dict(block_kv=64, dtype=jnp.float16),
         dict(sliding_window=40, soft_cap=5.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_in_gpu_interpret_mode(name):
    cu, num_tokens, hq, hkv, kernel_options, options = CASES[name]
    kernel_options = dict(kernel_options)
    dtype = kernel_options.pop("dtype", jnp.bfloat16)
    q, k, v, cu = _inputs(cu, num_tokens, hq, hkv, 64, dtype)
    want = reference(q, k, v, cu, sm_scale=0.125, **options)
    got = fa_gpu.flash_attention(q, k, v, cu, sm_scale=0.125, interpret=plgpu.InterpretGPUParams(),
                                 **kernel_options, **options)
    _check(got, want, int(cu[-1]))


def test_public_interpret_override_runs_gpu_kernel_without_races():
    # Length-1 sequence, a sequence across both warpgroups and KV blocks of 128, padding tail.
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    q, k, v, cu = _inputs([0, 1, 100, 200], 256, 2, 1, 64, seed=1)
    want = reference(q, k, v, cu, sm_scale=0.125)
    got = flash_attention(q, k, v, cu, sm_scale=0.125, interpret=plgpu.InterpretGPUParams(detect_races=True))
    _check(got, want, 200)
    assert not interpret_pallas_call.get_races().races_found


def test_tile_metadata_splits_blocks_into_skip_masked_full():
    tile_metadata = jax.jit(fa_gpu._tile_metadata, static_argnums=(1, 2, 3, 4))

    def by_tile(meta):  # tile -> [lo, end, (lo, a, b, e) per warpgroup]; and the launch order
        rows = meta.reshape(-1, fa_gpu.META)[:, :11].tolist()
        return {row[0]: row[1:] for row in rows}, [row[0] for row in rows]

    # Warpgroups of 4 rows, tiles of 8, KV blocks of 4; sequences [0, 2), [2, 13), then padding.
    first_key, meta = tile_metadata(jnp.array([0, 2, 13], jnp.int32), 16, 4, 4, None)
    assert first_key.tolist() == [0, 0] + [2] * 11 + [fa_gpu.NO_KEY] * 3
    meta, order = by_tile(meta)
    # Tile 0: KV blocks [0, 2). Rows 0..3 see block 0, masked (two sequences); rows 4..7
    # (sequence from 2) see blocks 0 and 1, both masked (sequence start, causal diagonal).
    assert meta[0] == [0, 2, 0, 1, 1, 1, 0, 1, 1, 2]
    # Tile 1: rows 8..11 see blocks 0 masked (keys from 2), 1 full, 2 masked; rows 12..15
    # (12 real) the same to block 3; padding rows make their whole range masked.
    assert meta[1] == [0, 4, 0, 1, 2, 3, 0, 4, 4, 4]
    assert order == [1, 0]  # more KV blocks first
    meta, _ = by_tile(tile_metadata(jnp.array([0, 16], jnp.int32), 16, 4, 4, 3)[1])
    # Window 3: rows 8..11 see keys 6..11: block 0 skipped, blocks 1 and 2 masked.
    assert meta[1][:5] == [1, 4, 1, 3, 3]


def test_unsupported_inputs_are_rejected_with_reason():
    q, k, v, cu = _inputs([0, 8], 8, 2, 1, 32)
    with pytest.raises(ValueError, match="head_dim 32"):
        fa_gpu.flash_attention(q, k, v, cu, sm_scale=1.0)
    assert "float32" in fa_gpu.supports(q.astype(jnp.float32), k, v)


def _export_for_cuda(tokens, num_seqs, q_heads, kv_heads, head_dim, **options):
    def attend(q, k, v, cu):
        return flash_attention(q, k, v, cu, sm_scale=head_dim ** -0.5, **options)

    args = [jax.ShapeDtypeStruct((tokens, h, head_dim), jnp.bfloat16) for h in (q_heads, kv_heads, kv_heads)]
    args.append(jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32))
    return export.export(jax.jit(attend), platforms=["cuda"])(*args)


@pytest.mark.parametrize("shape, options", [
    ((8 * 4096, 8, 32, 8, 128), {}),  # the benchmark: 8 x 4096 tokens, GQA 4, bf16
    ((1000, 5, 8, 2, 64), dict(sliding_window=256, soft_cap=30.0)),  # unaligned tokens
    ((512, 3, 4, 4, 256), {}),  # head_dim 256: block_kv 64
])
def test_public_function_lowers_to_mosaic_gpu_for_cuda(shape, options):
    exported = _export_for_cuda(*shape, **options)
    assert exported.platforms == ("cuda",)
    assert "custom_call @mosaic_gpu" in exported.mlir_module()  # the kernel call, not a name
