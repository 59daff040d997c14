"""Quantized weights: the format against its definition, the matmul entry point against the
pure-JAX reference, and a quantized model loaded, served and saved like a float one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader, orbax_io
from engine_fixtures import SMALL, byte_tokenizer, random_prompts, run_alone
from jaxinfer import params as params_lib
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.layers.linear import QuantizedWeight, einsum
from jaxinfer.llm import LLM
from jaxinfer.sharding import make_mesh
from pallas_kernels.quantized_matmul import QuantScheme, dequantize, parse, quantize, quantized_matmul, reference

SCHEMES = [parse(s) for s in ("int8", "int8-ch", "int8-g64", "fp8", "int4-g32", "int4-g64", "int4-g128", "int4-g128-zp",
                              "int4-ch", "int8-g16", "int8-g32-zp")]  # the last two: GGUF Q6_K and Q5_K


def test_parse_reads_back_every_scheme_name_and_refuses_unknown_ones():
    for scheme in SCHEMES:
        assert parse(scheme.name) == scheme
    assert parse("int4") == QuantScheme("int4", 128)
    assert parse("int8") == QuantScheme("int8", 128) and parse("int8-ch") == QuantScheme("int8", None)
    assert parse("int8-g16") == QuantScheme("int8", 16) and parse("int8-g32-zp") == QuantScheme("int8", 32, True)
    for bad in ("int3", "int4-g48", "int4-g8", "fp8-zp", "fp8-x"):
        with pytest.raises(ValueError):
            parse(bad)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_dequantized_weights_are_within_half_a_level_and_numpy_equals_jax(scheme):
    rng = np.random.default_rng(0)
    k, n = 256, 40
    w = (rng.standard_normal((k, n)) * np.linspace(0.01, 2.0, n)).astype(np.float32)  # channels of many sizes
    host = quantize(w, scheme)
    device = quantize(jnp.asarray(w), scheme)
    assert set(host) == set(device) == set(scheme.shapes(k, n))
    for name, (shape, dtype) in scheme.shapes(k, n).items():
        assert host[name].shape == shape and host[name].dtype == dtype, name
        a, b = np.asarray(device[name]).astype(np.float32), host[name].astype(np.float32)
        if name == "values":  # XLA may divide by a reciprocal: a value on a rounding edge may move a level
            assert np.mean(a != b) < 0.002, name
        else:
            # zeros - 8 (int8: - 128, where XLA's reciprocal leaves a few ulps of 128)
            zero_tol = 2e-4 if scheme.method == "int8" else 1e-5
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=zero_tol if name == "zeros" else 0, err_msg=name)
    back = np.asarray(dequantize(host["values"], host["scales"], host.get("zeros"), scheme))
    g = scheme.group(k)
    step = np.repeat(host["scales"], g, axis=0)  # one level, per element
    if scheme.method == "fp8":  # 3 mantissa bits: a relative step of 2^-3 at most
        assert np.all(np.abs(back - w) <= np.abs(w) * 2.0 ** -4 + step * 2.0 ** -9)
    else:
        assert np.all(np.abs(back - w) <= step * 0.5 + 1e-6)
    assert np.abs(back - w).max() > 0  # it did quantize


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_quantized_matmul_equals_the_reference_on_ragged_shapes(scheme, m):
    rng = np.random.default_rng(m)
    k, n = 384, 24 + m  # odd output widths too
    parts = quantize(rng.standard_normal((k, n)).astype(np.float32), scheme)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    got = quantized_matmul(x, parts["values"], parts["scales"], parts.get("zeros"), scheme)
    want = reference(x, parts["values"], parts["scales"], parts.get("zeros"), scheme)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    dense = x @ dequantize(parts["values"], parts["scales"], parts.get("zeros"), scheme)
    np.testing.assert_allclose(np.asarray(want), np.asarray(dense), rtol=2e-5, atol=2e-5)


def test_einsum_takes_a_quantized_weight_for_every_projection_shape():
    rng = np.random.default_rng(1)
    scheme = parse("int4-g32")
    for equation, x_shape, w_shape in (("te,ehd->thd", (5, 64), (64, 4, 16)),
                                       ("thd,hde->te", (5, 4, 16), (4, 16, 64)),
                                       ("tm,me->te", (5, 96), (96, 32))):
        w = rng.standard_normal(w_shape).astype(np.float32)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        nk = len(x_shape) - 1
        k = int(np.prod(w_shape[:nk]))
        parts = quantize(w.reshape(k, -1), scheme)
        qw = QuantizedWeight(jnp.asarray(parts["values"]), jnp.asarray(parts["scales"]), None, scheme, w_shape[nk:])
        dense = np.asarray(dequantize(parts["values"], parts["scales"], None, scheme)).reshape(w_shape)
        np.testing.assert_allclose(np.asarray(einsum(equation, x, qw)),
                                   np.asarray(jnp.einsum(equation, x, dense)), rtol=2e-5, atol=2e-5)


def test_a_weight_the_scheme_cannot_hold_is_refused_by_name(data_dir):
    with pytest.raises(ValueError, match="does not divide"):
        QuantScheme("int4", 64).check(96, 8, "w")
    with pytest.raises(ValueError, match="odd"):
        QuantScheme("int4", None).check(7, 8, "w")
    # The tiny model's 64-wide projections take no group of 128: the loader names the tensor.
    with pytest.raises(CheckpointError, match=r"q_proj.*does not divide"):
        loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                    quantization="int4-g128")
    with pytest.raises(InputError, match="unknown quantization"):
        LLM("unused", quantization="int5")
    # Plain "int4" asks for no group: it takes the largest that divides every projection.
    fitted = loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                         quantization="int4")
    assert fitted.quantization == QuantScheme("int4", 32) and fitted.quantization.name == "int4-g32"  # 96-wide MLP


@pytest.fixture(scope="module")
def int8_model(data_dir):
    model = loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                        quantization="int8")
    return dataclasses.replace(model, tokenizer=byte_tokenizer())


def test_a_model_loads_quantized_and_its_logits_stay_near_the_float_ones(data_dir, int8_model):
    flat = params_lib.flat_params(int8_model.state)
    names = {".".join(map(str, p)) for p in flat}
    assert "layers.0.attn.q_proj.values" in names and "layers.0.attn.q_proj.weight" not in names
    assert params_lib.value_of(flat[("layers", 0, "mlp", "down_proj", "values")]).dtype == jnp.int8
    assert not any(n.startswith("lm_head") and n.endswith("values") for n in names)  # the head stays float

    float_model = loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(),
                              progress=False)
    prompt = np.random.default_rng(2).integers(3, 256, 24).tolist()
    logits = []
    for model in (float_model, int8_model):
        llm = LLM.from_loaded(model, **{**SMALL, "num_pages": 100}, warmup=False)
        out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0,
                                                    ignore_eos=True), use_tqdm=False)[0]
        logits.append(np.array([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]))
    # The prompt tokens' log-probabilities under int8 weights: close to the float model's.
    assert np.abs(logits[1] - logits[0]).max() < 0.05 * np.abs(logits[0]).max()
    assert np.abs(logits[1] - logits[0]).max() > 0


def test_quantized_outputs_do_not_depend_on_batch_mates(int8_model):
    llm = LLM.from_loaded(int8_model, **{**SMALL, "num_pages": 200})
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 10)
    params = [SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=0.0, ignore_eos=True) for _ in prompts]
    batched = llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 4, 9):
        assert batched[i].outputs[0].token_ids == run_alone(llm, prompts[i], params[i]).outputs[0].token_ids


@pytest.mark.parametrize("spec", ["int8", "int4-g32-zp"])
def test_convert_saves_and_restores_quantized_weights(tmp_path, data_dir, int8_model, spec):
    model = int8_model if spec == "int8" else loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32,
                                                          mesh=make_mesh(), progress=False, quantization=spec)
    orbax_io.save(tmp_path / "q", model)
    restored = loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False)
    assert restored.quantization == model.quantization
    for (p, a), (q, b) in zip(params_lib.flat_params(model.state).items(),
                              params_lib.flat_params(restored.state).items()):
        assert p == q
        a, b = params_lib.value_of(a), params_lib.value_of(b)
        assert a.dtype == b.dtype, p
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    with pytest.raises(CheckpointError, match=f"holds {model.quantization.name} weights"):
        loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False, quantization="fp8")


def test_random_quantized_weights_for_benchmarks_have_their_declared_types():
    from jaxinfer.models import LlamaConfig

    cfg = LlamaConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64)
    for spec in ("int8", "int4-g32-zp", "fp8"):
        scheme = parse(spec)
        _, state = params_lib.dummy_params(cfg, jnp.float32, make_mesh(), quantization=scheme)
        flat = params_lib.flat_params(state)
        values = params_lib.value_of(flat[("layers", 0, "mlp", "up_proj", "values")])
        assert values.dtype == scheme.shapes(64, 128)["values"][1]
        assert float(jnp.abs(values.astype(jnp.float32)).max()) > 0  # random levels, not zeros


TPU_CASES = [("int8", 1, 256, 40), ("int8-g64", 5, 1024, 130), ("fp8", 17, 384, 24), ("int4-g32", 3, 256, 40),
             ("int4-g128", 5, 1024, 130), ("int4-g128-zp", 17, 384, 24), ("int4-ch", 1, 1024, 256),
             ("int8-g16", 3, 256, 40), ("int8-g32-zp", 5, 1024, 130)]


@pytest.mark.parametrize("spec,m,k,n", TPU_CASES)
def test_the_tpu_kernel_matches_the_reference_in_interpret_mode_with_race_detection(spec, m, k, n):
    from jax.experimental.pallas import tpu as pltpu

    scheme = parse(spec)
    rng = np.random.default_rng(k + n)
    parts = {name: jnp.asarray(a) for name, a in quantize(rng.standard_normal((k, n)).astype(np.float32),
                                                           scheme).items()}
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        want = reference(x.astype(jnp.float32), parts["values"], parts["scales"], parts.get("zeros"), scheme)
        got = quantized_matmul(x, parts["values"], parts["scales"], parts.get("zeros"), scheme,
                               out_dtype=jnp.float32, interpret=pltpu.InterpretParams(detect_races=True))
        assert got.shape == (m, n)
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=tol)


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_the_entry_point_lowers_to_the_mosaic_kernel_for_tpu(device_kind):
    from jax import export

    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    for spec in ("int8", "int4-g128", "int4-g128-zp", "fp8", "int8-g16", "int8-g32-zp"):
        scheme = parse(spec)
        k, n = 4096, 14336
        shapes = scheme.shapes(k, n)
        args = [jax.ShapeDtypeStruct((16, k), jnp.bfloat16)] + [jax.ShapeDtypeStruct(*shapes[name])
                                                                 for name in ("values", "scales", "zeros")
                                                                 if name in shapes]

        def matmul(x, values, scales, *zeros, scheme=scheme):
            return quantized_matmul(x, values, scales, zeros[0] if zeros else None, scheme)

        with jax.sharding.use_abstract_mesh(mesh):
            exported = export.export(jax.jit(matmul), platforms=["tpu"])(*args)
        assert "tpu_custom_call" in exported.mlir_module(), spec


# GPU kernel: ragged M (1..128, padded to 8 inside), every grouping, int4 zero points, K split in
# several blocks; widths are multiples of 64 (others take the XLA path, checked below).
GPU_CASES = [("int8", 1, 512, 128, None), ("int8-g32", 5, 256, 64, None), ("int8-ch", 17, 384, 128, None),
             ("int4-g32-zp", 3, 256, 64, None), ("int4-g64", 64, 512, 64, (128, 2, 2)),
             ("int4-g128", 9, 1024, 192, (256, 3, 2)), ("int4-ch-zp", 33, 256, 64, None), ("fp8", 128, 256, 64, None),
             ("fp8-g64", 7, 256, 128, (64, 2, 4)), ("int8-g32-zp", 5, 512, 128, (128, 2, 2))]


@pytest.mark.parametrize("spec,m,k,n,config", GPU_CASES)
def test_the_gpu_kernel_matches_the_reference_in_gpu_interpret_mode(spec, m, k, n, config):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.quantized_matmul import gpu

    scheme = parse(spec)
    rng = np.random.default_rng(k + n + m)
    parts = {name: jnp.asarray(a) for name, a in quantize(rng.standard_normal((k, n)).astype(np.float32),
                                                           scheme).items()}
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    want = reference(x.astype(jnp.float32), parts["values"], parts["scales"], parts.get("zeros"), scheme)
    got = gpu.quantized_matmul(x, parts["values"], parts["scales"], parts.get("zeros"), scheme,
                               out_dtype=jnp.float32, config=None if config is None else gpu.Config(*config),
                               interpret=plgpu.InterpretGPUParams())
    assert got.shape == (m, n)
    scale = float(jnp.abs(want).max())
    # The weight is rounded to bf16 once dequantized, as it is for the wgmma.
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-2)


def test_the_gpu_kernel_says_which_shapes_it_does_not_take():
    from pallas_kernels.quantized_matmul import gpu

    scheme, values = parse("int4-g128"), jnp.zeros((128, 256), jnp.int4)
    assert gpu.supports(jnp.zeros((4, 256), jnp.bfloat16), values, scheme) is None
    assert "bf16" in gpu.supports(jnp.zeros((4, 256), jnp.float32), values, scheme)
    assert "M = 129" in gpu.supports(jnp.zeros((129, 256), jnp.bfloat16), values, scheme)
    assert "N = 96" in gpu.supports(jnp.zeros((4, 256), jnp.bfloat16), values[:96], scheme)
    # GGUF Q6_K's groups of 16 and Q5_K's int8 zero points are taken (checked on an H200: check_quantized_gpu.py).
    assert gpu.supports(jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((128, 256), jnp.int8), parse("int8-g16")) is None
    assert gpu.supports(jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((128, 256), jnp.int8), parse("int8-g32-zp")) is None
    with pytest.raises(ValueError, match="does not tile K"):
        gpu.quantized_matmul(jnp.zeros((4, 256), jnp.bfloat16), values, jnp.ones((2, 128)), None, scheme,
                             config=gpu.Config(128, 2, 3))


@pytest.mark.parametrize("spec", ["int8", "int4-g128", "int4-g128-zp", "fp8", "int8-g32-zp"])
def test_the_entry_point_lowers_to_the_mosaic_gpu_kernel_for_cuda_at_decode_sizes_only(spec):
    """Llama-3-8B's projections at decode batch 1 and 64 take the kernel; a prefill-sized M (256)
    and a width the kernel does not take dequantize in XLA."""
    from jax import export

    scheme = parse(spec)
    for m, k, n, kernel in ((1, 4096, 14336, True), (64, 14336, 4096, True), (64, 4096, 6144, True),
                            (256, 4096, 6144, False), (8, 4096, 4136, False)):
        shapes = scheme.shapes(k, n)
        args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16)] + [jax.ShapeDtypeStruct(*shapes[name])
                                                                for name in ("values", "scales", "zeros")
                                                                if name in shapes]

        def matmul(x, values, scales, *zeros, scheme=scheme):
            return quantized_matmul(x, values, scales, zeros[0] if zeros else None, scheme)

        exported = export.export(jax.jit(matmul), platforms=["cuda"])(*args)
        assert ("custom_call @mosaic_gpu" in exported.mlir_module()) == kernel, (spec, m, k, n)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_the_gpu_kernel_lowers_for_cuda_for_each_output_dtype_and_tiny_batch(out_dtype):
    """y written by the kernel itself (bf16, one block per tile), or float32 partials summed after; M below 8
    rows reaches the kernel unpadded."""
    from jax import export

    from pallas_kernels.quantized_matmul import gpu

    for spec, m, config in (("int8", 1, None), ("int4-g32-zp", 5, None), ("int4-ch", 3, None),
                            ("fp8", 12, None), ("int8-g64", 2, (256, 2, 2)),
                            ("int4-g64", 3, (512, 2, 1, True))):  # every group's wgmma issued, then one wait
        scheme = parse(spec)
        k, n = 1024, 256
        shapes = scheme.shapes(k, n)
        args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16)] + [jax.ShapeDtypeStruct(*shapes[name])
                                                                for name in ("values", "scales", "zeros")
                                                                if name in shapes]

        def matmul(x, values, scales, *zeros, scheme=scheme, config=config):
            return gpu.quantized_matmul(x, values, scales, zeros[0] if zeros else None, scheme, out_dtype=out_dtype,
                                        config=None if config is None else gpu.Config(*config))

        exported = export.export(jax.jit(matmul), platforms=["cuda"])(*args)
        assert "custom_call @mosaic_gpu" in exported.mlir_module(), spec
        assert exported.out_avals[0].shape == (m, n) and exported.out_avals[0].dtype == out_dtype


@pytest.mark.parametrize("recorded,message", [
    ("int4-g32", "quantized tensor layers.0.attn.k_proj.values is int8\\[16, 64\\]; the recorded config for "
                 "int4-g32 declares int4"),  # another bit width: orbax would cast the levels
    ("int8-ch", "quantized tensor layers.0.attn.k_proj.scales is float32\\[2, 16\\].*declares float32\\[1, 16\\]"),
    ("int8-g64", "records int8-g64 weights, which this model cannot hold: layers.0.mlp.down_proj: group size 64 "
                 "does not divide its 96 input channels"),
    ("int3", "jaxinfer.json is malformed: unknown quantization 'int3'"),
])
def test_an_inconsistent_quantized_checkpoint_is_refused_naming_the_tensor(tmp_path, data_dir, recorded, message):
    import json

    model = loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                        quantization="int8-g32")
    orbax_io.save(tmp_path / "q", model)
    marker = tmp_path / "q" / "jaxinfer.json"
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), quantization=recorded)))
    with pytest.raises(CheckpointError, match=message):
        loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False)


@pytest.mark.parametrize("spec,m,config", [("int4-g32-zp", 3, None), ("int8", 9, (256, 2, 2)), ("fp8", 1, None),
                                           ("int4-ch", 16, None)])
def test_one_gpu_launch_for_several_weights_matches_each_reference(spec, m, config):
    """q, k and v (or gate and up) through one launch: widths 192, 64 and 128 share the grid."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.quantized_matmul import gpu

    scheme, k = parse(spec), 512
    rng = np.random.default_rng(m)
    weights = []
    for n in (192, 64, 128):
        parts = {name: jnp.asarray(a) for name, a in quantize(rng.standard_normal((k, n)).astype(np.float32),
                                                               scheme).items()}
        weights.append((parts["values"], parts["scales"], parts.get("zeros")))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for out_dtype in (jnp.bfloat16, jnp.float32):
        got = gpu.quantized_matmul_many(x, tuple(weights), scheme, out_dtype=out_dtype,
                                        config=None if config is None else gpu.Config(*config),
                                        interpret=plgpu.InterpretGPUParams())
        for y, w in zip(got, weights):
            want = reference(x.astype(jnp.float32), *w, scheme)
            assert y.shape == want.shape and y.dtype == out_dtype
            scale = float(jnp.abs(want).max())
            np.testing.assert_allclose(np.asarray(y, np.float32) / scale, np.asarray(want) / scale, atol=1e-2)


@pytest.mark.parametrize("spec", ["int8-g32", "int4-g32-zp"])
def test_the_fused_projections_lower_to_one_mosaic_gpu_launch_per_group_for_cuda(spec):
    """A quantized Llama layer's decode step on CUDA: q, k, v in one launch, gate and up in one, o and down
    alone: 4 kernel calls a layer (7 before), and the engine's float path untouched."""
    import re

    from jax import export

    from jaxinfer.layers.linear import QuantizedLinear, project

    scheme = parse(spec)
    rngs = __import__("flax").nnx.Rngs(0)
    e, h, kv, d, f = 256, 4, 2, 64, 512
    q = QuantizedLinear("te,ehd->thd", (e, h, d), ("embed", "heads", "head_dim"), scheme=scheme, dtype=jnp.bfloat16,
                        rngs=rngs)
    k = QuantizedLinear("te,ehd->thd", (e, kv, d), ("embed", "kv_heads", "head_dim"), scheme=scheme,
                        dtype=jnp.bfloat16, rngs=rngs)
    gate = QuantizedLinear("te,em->tm", (e, f), ("embed", "mlp"), scheme=scheme, dtype=jnp.bfloat16, rngs=rngs)
    x = jnp.ones((2, e), jnp.bfloat16)
    ys = project(x, q, k, k)
    assert [y.shape for y in ys] == [(2, h, d), (2, kv, d), (2, kv, d)]
    alone = [lin(x) for lin in (q, k, k)]  # on this CPU both are XLA's path: the same numbers
    for y, a in zip(ys, alone):
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(a, np.float32))
    exported = export.export(jax.jit(lambda x: (project(x, q, k, k), project(x, gate, gate))), platforms=["cuda"])(x)
    assert len(re.findall(r"custom_call @mosaic_gpu", exported.mlir_module())) == 2


def test_the_native_cpu_kernel_leaves_groups_of_16_to_xla():
    """Its blocks are 32 wide: GGUF Q6_K's groups of 16 go to XLA's dequantize."""
    from pallas_kernels.quantized_matmul import cpu

    x, values = jnp.zeros((2, 256), jnp.float32), jnp.zeros((8, 256), jnp.int8)
    assert cpu.supports(x, values, parse("int8-g32")) and not cpu.supports(x, values, parse("int8-g16"))
