"""Tensor parallelism on 8 simulated CPU devices gives the single-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader
from jaxinfer import params as params_lib
from jaxinfer.engine.engine import EngineConfig
from jaxinfer.errors import ConfigError
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from tests.paged_runs import teacher_forced_logits


def run(model_dir, mesh, attention_impl=None, quantization=None):
    loaded = loader.load(model_dir, dtype=jnp.float32, mesh=mesh, progress=False, quantization=quantization)
    ref = np.load(model_dir / "reference.npz")
    runner = ModelRunner(loaded.config, loaded.graphdef, loaded.state, mesh, num_pages=64, page_size=4,
                         attention_impl=attention_impl)
    out = teacher_forced_logits(runner, [ref["prompt_0"], ref["prompt_1"]],
                                [ref["generated_0"][:4], ref["generated_1"][:4]])
    return loaded, runner, out


@pytest.mark.parametrize("name,tp", [("llama_gqa", 2), ("llama_gqa", 4), ("llama_gqa", 8),
                                     ("qwen3_qknorm", 2), ("qwen3_qknorm", 4)])
def test_tensor_parallel_logits_equal_single_device(name, tp, data_dir):
    assert len(jax.devices()) >= 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
    model_dir = data_dir / "hf_tiny" / name
    _, _, single = run(model_dir, make_mesh())
    loaded, runner, sharded = run(model_dir, make_mesh(tensor=tp))
    # the weights really are split: q_proj's heads axis lives on tp devices
    q_proj = params_lib.flat_params(loaded.state)[("layers", 0, "attn", "q_proj", "weight")]
    value = params_lib.value_of(q_proj)
    assert len(value.sharding.device_set) == tp
    assert value.addressable_shards[0].data.shape[1] == loaded.config.num_heads // tp
    assert len(runner.cache[0]["k"].sharding.device_set) == tp
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,tp", [("deepseek_v3", 2), ("deepseek_v2", 4), ("deepseek_v3", 8), ("mixtral", 2)])
def test_moe_and_mla_families_under_tensor_parallelism_give_the_single_device_logits(name, tp, data_dir):
    # The routed experts split over the tensor axis (expert parallelism: whole experts per device, their
    # outputs summed across it). MLA's latent pages split too, by sequence (data-parallel attention: each
    # device attends its own sequences with every head; the two sequences here lie in partitions 0 and 1).
    model_dir = data_dir / "hf_tiny" / name
    _, _, single = run(model_dir, make_mesh())
    loaded, runner, sharded = run(model_dir, make_mesh(tensor=tp))
    gate = params_lib.value_of(params_lib.flat_params(loaded.state)[("layers", 1, "mlp", "experts", "gate_proj")])
    assert gate.addressable_shards[0].data.shape == (gate.shape[0] // tp, *gate.shape[1:])
    if name.startswith("deepseek"):
        latent = runner.cache[0]["latent"]
        assert runner.kv_partitions == tp and latent.addressable_shards[0].data.shape[0] == latent.shape[0] // tp
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantization,tp", [("int8", 2), ("int4-g32", 2), ("int4-g32-zp", 4), ("fp8", 4)])
def test_quantized_weights_under_tensor_parallelism_give_the_single_device_logits(quantization, tp, data_dir):
    model_dir = data_dir / "hf_tiny" / "llama_gqa"
    _, _, single = run(model_dir, make_mesh(), quantization=quantization)
    loaded, _, sharded = run(model_dir, make_mesh(tensor=tp), quantization=quantization)
    flat = params_lib.flat_params(loaded.state)
    for name in ("q_proj", "o_proj"):  # column- and row-parallel: the values are split either way
        value = params_lib.value_of(flat[("layers", 0, "attn", name, "values")])
        assert value.addressable_shards[0].data.size * tp == value.size, name
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_kernels_run_per_device_under_tensor_parallelism(data_dir, monkeypatch):
    # A Pallas kernel cannot be split by XLA: under a tensor axis the dispatch wraps
    # it in shard_map, each device attending over its own heads. (On the CPU the
    # "kernels" implementation is the reference, through the same shard_map.)
    model_dir = data_dir / "hf_tiny" / "llama_gqa"
    _, _, single = run(model_dir, make_mesh())
    wrapped = []
    real = jax.shard_map
    monkeypatch.setattr(jax, "shard_map", lambda f, **kw: wrapped.append(kw["in_specs"]) or real(f, **kw))
    _, runner, sharded = run(model_dir, make_mesh(tensor=2), attention_impl="kernels")
    assert runner.attention_impl == "kernels" and wrapped, "the kernel must run under shard_map"
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="unknown attention"):
        ModelRunner(runner.cfg, runner.graphdef, runner.state, runner.mesh, num_pages=4,
                    attention_impl="nope")
    with pytest.raises(ConfigError, match="attention must be one of"):
        EngineConfig(attention="nope").validate()


@pytest.mark.parametrize("spec", ["int8-g32", "int4-g32-zp", "fp8"])
def test_quantized_projections_run_per_device_under_a_tensor_mesh(spec):
    """Traced under a tensor-parallel mesh, a quantized projection is one shard_map: column-parallel weights
    (q, gate) each device on its outputs, row-parallel ones (o, down) each on its inputs, partial sums added;
    the result is the single-device one. A split that would cut scale groups is left to XLA, named."""
    from flax import nnx

    from jaxinfer.layers import attention
    from jaxinfer.layers.linear import QuantizedLinear, project
    from pallas_kernels.quantized_matmul import parse

    scheme, rngs = parse(spec), nnx.Rngs(0)
    up = QuantizedLinear("te,em->tm", (128, 256), ("embed", "mlp"), scheme=scheme, dtype=jnp.float32, rngs=rngs)
    down = QuantizedLinear("tm,me->te", (256, 128), ("mlp", "embed"), scheme=scheme, dtype=jnp.float32, rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (3, 128), jnp.float32)

    def make_mlp():  # a new function per trace: the mesh is read when traced, not part of jit's cache key
        def mlp(x):
            (h,) = project(x, up)
            return down(jax.nn.relu(h))
        return mlp

    alone = jax.jit(make_mlp())(x)
    mesh = make_mesh(tensor=2)
    with attention.on_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(make_mlp())(x))
        sharded = jax.jit(make_mlp())(x)
    assert jaxpr.count("shard_map") == 2 and "psum" in jaxpr
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(alone), rtol=1e-5, atol=1e-5)
