"""Multi-head latent attention over paged latent entries: the TPU kernel (interpret mode, with race
detection), the GPU kernel (GPU interpret mode, with race detection) and the XLA path match the pure-JAX
reference on ragged batches of decode tokens and prefill chunks; the reference matches MLA written out the
long way (per-head keys and values expanded from the latent, as HF computes it); the TPU kernel lowers
for TPU v5e and v6e, the GPU one for CUDA, where the model's attention picks it for decode-sized steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_attention import gpu, reference, tpu
from tests.paged_inputs import ragged_paged_inputs

L, R = 128, 64  # kv_lora_rank, rope width (DeepSeek: 512, 64)


def inputs(seqs, t, s, heads, page_size, pages_per_seq, dtype, seed=0):
    (q, pages, _, kv_lens, table, cu), max_q_len = ragged_paged_inputs(
        seqs, t, s, heads, 1, L + R, page_size, pages_per_seq, dtype, seed=seed)
    return (q, pages[:, :, 0], kv_lens, table, cu), max_q_len


CASES = {
    # seqs (q_len, kv_len), tokens, seq rows, heads, page_size, pages per seq, dtype, block_q, pages_per_block
    "decode_only_f32": ([(1, 5), (1, 16), (1, 1), (1, 9)], 4, 4, 8, 8, 2, jnp.float32, None, 1),
    "prefill_chunks_and_decode_f32": ([(1, 9), (7, 20), (1, 1), (8, 16), (3, 3)], 24, 7, 4, 8, 3, jnp.float32, 4, 2),
    "long_prefill_bf16": ([(1, 3), (30, 45), (1, 12)], 36, 4, 16, 8, 6, jnp.bfloat16, 8, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_tpu_kernel_matches_the_reference_in_interpret_mode(name):
    seqs, t, s, heads, ps, p, dtype, bq, ppb = CASES[name]
    args, max_q_len = inputs(seqs, t, s, heads, ps, p, dtype)
    scale = (L + R) ** -0.5 * 0.5
    want = reference(*args, value_dim=L, max_q_len=max_q_len, sm_scale=scale)
    got = tpu.mla_attention(*args, value_dim=L, max_q_len=max_q_len, sm_scale=scale, block_q=bq,
                            pages_per_block=ppb, interpret=pltpu.InterpretParams())
    assert got.shape == (t, heads, L)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    assert not np.any(np.asarray(got[int(args[-1][-1]):], np.float32)), "padding rows must be zero"


def test_the_kernel_has_no_races():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    args, max_q_len = inputs([(1, 7), (5, 12), (1, 4)], 8, 4, 4, 8, 2, jnp.float32, seed=1)
    want = reference(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1)
    got = tpu.mla_attention(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1, pages_per_block=2,
                            interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert not interpret_pallas_call.races.races_found


def test_the_reference_is_mla_written_out_with_expanded_heads():
    # Absorbed: scores q_lat . c + q_pe . k_pe, values c, then W_UV. Expanded (as HF): per-head keys
    # [W_UK c, k_pe] against [q_nope, q_pe], per-head values W_UV c. Same numbers.
    rng = np.random.default_rng(3)
    heads, n, v = 4, 16, 12
    (q_abs, pages, kv_lens, table, cu), max_q_len = inputs([(3, 10), (1, 6)], 4, 2, heads, 8, 2, jnp.float32)
    w_uk = rng.standard_normal((heads, n, L)).astype(np.float32) * 0.1
    w_uv = rng.standard_normal((heads, v, L)).astype(np.float32) * 0.1
    q_nope = rng.standard_normal((4, heads, n)).astype(np.float32)
    q_pe = np.asarray(q_abs[..., L:])
    q = jnp.concatenate([jnp.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], axis=-1)
    out = reference(q, pages, kv_lens, table, cu, value_dim=L, max_q_len=max_q_len, sm_scale=0.3)
    got = np.einsum("thl,hvl->thv", np.asarray(out), w_uv)
    entries = np.asarray(pages)[np.asarray(table)].reshape(2, -1, L + R)
    want = []
    for s, (start, q_len, kv_len) in enumerate([(0, 3, 10), (3, 1, 6)]):
        c, k_pe = entries[s, :kv_len, :L], entries[s, :kv_len, L:]
        for i in range(q_len):
            pos = kv_len - q_len + i
            keys = np.concatenate([np.einsum("hnl,cl->hcn", w_uk, c), np.broadcast_to(k_pe, (heads, kv_len, R))], -1)
            query = np.concatenate([q_nope[start + i], q_pe[start + i]], -1)  # [H, n + R]
            scores = np.einsum("hd,hcd->hc", query, keys)[:, :pos + 1] * 0.3
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            want.append(np.einsum("hc,hvc->hv", p, np.einsum("hvl,cl->hvc", w_uv, c[:pos + 1])))
    np.testing.assert_allclose(got, np.stack(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_the_kernel_lowers_for_tpu_at_deepseeks_width(device_kind):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    tokens, seqs, heads, page_size, pages_per_seq = 128, 16, 16, 16, 32

    def attend(q, pages, kv_lens, page_table, cu_q_lens):
        return tpu.mla_attention(q, pages, kv_lens, page_table, cu_q_lens, value_dim=512, max_q_len=64,
                                 sm_scale=0.1)

    args = [jax.ShapeDtypeStruct((tokens, heads, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((seqs * pages_per_seq, page_size, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((seqs,), jnp.int32), jax.ShapeDtypeStruct((seqs, pages_per_seq), jnp.int32),
            jax.ShapeDtypeStruct((seqs + 1,), jnp.int32)]
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(attend), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("tpu_custom_call") >= 1


# seqs (q_len, kv_len), tokens, seq rows, heads, page_size, pages per seq, KV splits. Keys come 64 to a block:
# contexts cross blocks and end inside them; q_len 2 and 3 with 8 heads put two tokens in a block (causal
# mask inside it); 16 heads (V2-Lite's) one token a block.
GPU_CASES = {
    "decode_16_heads_one_split": ([(1, 5), (1, 70), (1, 1), (1, 130)], 4, 4, 16, 16, 10, 1),
    "decode_and_short_runs_two_splits": ([(1, 9), (3, 80), (1, 1), (2, 16)], 8, 5, 8, 8, 12, 2),
    "spec_decode_4_heads_pages_of_32": ([(4, 100), (1, 33), (5, 64)], 12, 3, 4, 32, 4, 3),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_the_gpu_kernel_matches_the_reference_in_gpu_interpret_mode_without_races(name):
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu as plgpu

    seqs, t, s, heads, ps, p, splits = GPU_CASES[name]
    args, max_q_len = inputs(seqs, t, s, heads, ps, p, jnp.bfloat16, seed=len(seqs))
    want = reference(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1)
    got = gpu.mla_attention(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1, num_splits=splits,
                            interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert got.shape == (t, heads, L)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)
    assert not np.any(np.asarray(got[int(args[-1][-1]):], np.float32)), "padding rows must be zero"
    assert not interpret_pallas_call.get_races().races_found


def test_the_gpu_kernel_says_what_it_cannot_take():
    q, pages = jnp.zeros((4, 16, 576), jnp.bfloat16), jnp.zeros((8, 16, 576), jnp.bfloat16)
    assert gpu.supports(q, pages, 512) is None
    assert "heads" in gpu.supports(jnp.zeros((4, 32, 576), jnp.bfloat16), pages, 512)
    assert "bf16" in gpu.supports(q.astype(jnp.float32), pages, 512)
    assert "page_size" in gpu.supports(q, jnp.zeros((8, 24, 576), jnp.bfloat16), 512)
    with pytest.raises(ValueError, match="heads"):
        gpu.mla_attention(jnp.zeros((4, 32, 576), jnp.bfloat16), pages, jnp.ones(4, jnp.int32),
                          jnp.zeros((4, 1), jnp.int32), jnp.arange(5, dtype=jnp.int32), value_dim=512, max_q_len=1,
                          sm_scale=0.1)


@pytest.mark.parametrize("max_q_len,kernel", [(1, True), (5, True), (64, False)])
def test_the_models_attention_takes_the_gpu_kernel_for_decode_sized_steps_on_cuda(max_q_len, kernel):
    """DeepSeek-V2-Lite's width, 16 heads, bf16: decode and speculative steps lower to the Mosaic GPU kernel;
    a step with prefill chunks takes XLA's path."""
    from jaxinfer.layers import attention
    from jaxinfer.runner.batch import Batch

    tokens, seqs, pages_per_seq = 64, 16, 8
    i32 = jnp.int32

    def attend(q, pages, kv_lens, page_table, cu_q_lens):
        zeros = jnp.zeros(tokens, i32)
        batch = Batch(tokens=zeros, feed_index=zeros, positions=zeros, slots=zeros, cu_q_lens=cu_q_lens,
                      kv_lens=kv_lens, page_table=page_table, block_tokens=jnp.zeros((1, tokens - seqs), i32),
                      block_seq=jnp.zeros(1, i32), logits_indices=jnp.zeros(1, i32), decode_rows=seqs,
                      max_q_len=max_q_len)
        with attention.implementation("auto"):
            return attention.mla_attention(q, pages, batch, value_dim=512, sm_scale=0.1)

    args = [jax.ShapeDtypeStruct((tokens, 16, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((seqs * pages_per_seq, 16, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((seqs,), i32), jax.ShapeDtypeStruct((seqs, pages_per_seq), i32),
            jax.ShapeDtypeStruct((seqs + 1,), i32)]
    exported = export.export(jax.jit(attend), platforms=["cuda"])(*args)
    assert ("custom_call @mosaic_gpu" in exported.mlir_module()) == kernel
    assert exported.out_avals[0].shape == (tokens, 16, 512)
