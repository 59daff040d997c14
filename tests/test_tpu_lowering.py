"""The whole engine step (model, paged cache writes, the Pallas ragged paged
attention kernel, sampling with penalties and logprobs) lowers for TPU v5e and
v6e, checked on the CPU with jax.export under an abstract TPU mesh; so do the
speculative proposers' device calls (a draft model's, a draft head's)."""

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxinfer import params as params_lib
from jaxinfer.runner.step_inputs import layout
from jaxinfer.core.config import EngineConfig
from jaxinfer.layers import attention
from jaxinfer.layers.rope import RopeScaling
from jaxinfer.models import LlamaConfig
from jaxinfer.models.deepseek import DeepseekConfig
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from tests.tpu_export import abstract_tpu_mesh, export_whole_step, mixed_step

# Small, but with head_dim 128 so the Mosaic TPU attention kernel takes it.
SMALL_128 = LlamaConfig(architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=256)


# DeepSeek-V3's shape in small: MLA with a q LoRA (latent 128 + rope 64), sigmoid routing over groups,
# a shared expert, a dense first layer, YaRN.
SMALL_DEEPSEEK = DeepseekConfig(
    architecture="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, q_lora_rank=96, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=128, num_shared_experts=1, first_k_dense_replace=1,
    scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
    routed_scaling_factor=2.5, max_position_embeddings=256,
    rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0,
                             mscale_all_dim=1.0))


@pytest.mark.parametrize("dtype,device_kind,quantization,tp,spec,model", [
    (jnp.float32, "TPU v5 lite", None, 1, False, SMALL_128), (jnp.bfloat16, "TPU v6 lite", None, 1, False, SMALL_128),
    # Speculative decoding: the sampler's verifying variant (rejection sampling) in the step.
    (jnp.bfloat16, "TPU v6 lite", None, 1, True, SMALL_128),
    (jnp.bfloat16, "TPU v5 lite", "int8", 1, False, SMALL_128),
    (jnp.bfloat16, "TPU v6 lite", "int4-g128-zp", 1, False, SMALL_128),
    # Tensor parallel over two chips: attention and the quantized matmuls run per device in shard_map.
    (jnp.bfloat16, "TPU v6 lite", "int4-g128-zp", 2, False, SMALL_128),
    # MLA's latent pages and the experts' grouped matmuls, on one chip and over two.
    (jnp.bfloat16, "TPU v6 lite", None, 1, False, SMALL_DEEPSEEK),
    (jnp.bfloat16, "TPU v5 lite", None, 2, False, SMALL_DEEPSEEK)])
def test_engine_step_lowers_for_tpu(dtype, device_kind, quantization, tp, spec, model):
    from pallas_kernels.quantized_matmul import parse

    mesh = make_mesh(tensor=tp)
    graphdef, state = params_lib.dummy_params(model, dtype, mesh, quantization=parse(quantization))
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=16,
                       num_pages=16, block_q=16, speculative_config={"num_speculative_tokens": 3} if spec else None)
    runner = ModelRunner(model, graphdef, state, mesh, num_pages=16, page_size=16,
                         penalty_slots=4, max_model_len=64)
    # MLA over two chips: its latent pages split by sequence (data-parallel attention, in the step below).
    assert runner.kv_partitions == (tp if model is SMALL_DEEPSEEK else 1)
    shape, inputs = mixed_step(cfg)
    exported = export_whole_step(runner, shape, inputs, abstract_tpu_mesh(device_kind, 1, tp), spec=spec)
    assert exported.platforms == ("tpu",)
    # The default attention ("auto") is the Mosaic TPU kernel there.
    assert attention.get_implementation() == "auto" or "JAXINFER_ATTENTION" in os.environ
    calls = exported.mlir_module().count("tpu_custom_call")
    # One kernel body per distinct call: attention, and with quantized weights the matmul at each of
    # the 3 projection shapes ([256, 512] q/gate/up, [256, 256] k/v, [512, 256] o/down).
    if model is SMALL_128:
        assert calls >= (4 if quantization and tp == 1 else 3 if quantization else 1), calls
    if tp > 1:  # per-device kernels, and (quantized) the row-parallel projections' partial sums added across chips
        text = exported.mlir_module()
        assert "sdy.manual_computation" in text and ("all_reduce" in text or not quantization)


@pytest.mark.parametrize("draft", ["draft model", "draft head"])
def test_a_proposers_device_calls_lower_for_tpu(draft):
    """Speculation's proposers on the device: a draft model's catch-up (decode rows and a prefill chunk) and its
    k - 1 unrolled steps, and a draft head's, which also read the target's hidden states from their pool; and
    the target's step that keeps those hidden states."""
    from flax import nnx

    from jaxinfer.spec_decode.draft_head import DraftHeadProposer, head_config, new_head
    from jaxinfer.spec_decode.draft_model import DraftModelProposer

    mesh = make_mesh()
    graphdef, state = params_lib.dummy_params(SMALL_128, jnp.bfloat16, mesh)
    settings = dict(k=3, rows=4, max_queries=2, prefill_buckets=[0, 32], block_q=16, pages_per_seq=4, min_rows=2)
    if draft == "draft model":
        runner = ModelRunner(SMALL_128, graphdef, state, mesh, num_pages=16, page_size=16, max_model_len=64)
        proposer = DraftModelProposer(runner, **settings)
        inputs = ()
    else:
        target = ModelRunner(SMALL_128, graphdef, state, mesh, num_pages=16, page_size=16, max_model_len=64,
                             feature_layers=(0, 1))
        hg, hs = nnx.split(new_head(graphdef, state, SMALL_128, (0, 1), dtype=jnp.bfloat16))
        runner = ModelRunner(head_config(SMALL_128), hg, hs, mesh, num_pages=16, page_size=16, max_model_len=64)
        proposer = DraftHeadProposer(runner, lambda: target.features, **settings)
        inputs = (target.features,)
        assert target.features.shape == (16, 16, 2 * SMALL_128.hidden_size)
    device = jax.sharding.AbstractDevice(device_kind="TPU v6 lite", num_cores=1, platform="tpu")
    abstract = jax.sharding.AbstractMesh((1, 1), ("data", "tensor"), (jax.sharding.AxisType.Auto,) * 2,
                                         abstract_device=device)
    calls = 0
    with jax.sharding.use_abstract_mesh(abstract):
        for shape in (proposer._shape(8, 0), proposer._shape(2, 32)):  # catch-up: decode rows, a prefill chunk
            buf = jnp.zeros(layout(shape, 1).size + 2 * proposer.max_queries, jnp.int32)
            fn = functools.partial(proposer._catch_up_fn, shape=shape)
            exported = export.export(jax.jit(fn), platforms=["tpu"])(runner.state, runner.cache, proposer._carry,
                                                                      buf, *inputs)
            calls += exported.mlir_module().count("tpu_custom_call")
        S = 2
        exported = export.export(jax.jit(proposer._extend_fn), platforms=["tpu"])(
            runner.state, runner.cache, proposer._carry, jnp.zeros(S * 5, jnp.int32), jnp.zeros((S, 3), jnp.int32))
        calls += exported.mlir_module().count("tpu_custom_call")
    assert calls >= 3  # the Mosaic TPU attention kernel in each
