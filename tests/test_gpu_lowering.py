"""The whole engine step of a DeepSeek model (MLA over latent pages, routed experts) lowers for CUDA with its
Mosaic GPU kernels, checked on the CPU with jax.export: a decode step takes the MLA decode kernel and the
experts' grouped matmul, on one GPU and with both per device over two; a step with a prefill chunk keeps
XLA's MLA path (the kernel is for decode-sized query runs) and still the grouped matmul. And importing jaxinfer
lets XLA's CUDA graphs hold while loops."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxinfer import params as params_lib
from jaxinfer.core.config import EngineConfig
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.core.shapes import SeqWork
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.runner.sampler import Row, SamplingArrays
from jaxinfer.runner.step_inputs import StepInputs, build
from jaxinfer.sharding import make_mesh
from tests.test_tpu_lowering import SMALL_DEEPSEEK


@pytest.mark.parametrize("tp,prefill", [(1, False), (2, False), (1, True)])
def test_the_deepseek_step_lowers_for_cuda_with_the_mla_and_grouped_matmul_kernels(tp, prefill):
    model = SMALL_DEEPSEEK
    mesh = make_mesh(tensor=tp)
    graphdef, state = params_lib.dummy_params(model, jnp.bfloat16, mesh)
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=16, num_pages=16,
                       block_q=16)
    runner = ModelRunner(model, graphdef, state, mesh, num_pages=16, page_size=16, penalty_slots=4, max_model_len=64)
    decode = [SeqWork([0], 7, [3], feed_slot=0, logit_offsets=[0]), SeqWork([3], 20, [2, 6], logit_offsets=[0])]
    prefill_work = [SeqWork(list(range(9)), 0, [1], logit_offsets=[8])] if prefill else []
    shape = cfg.shape(2, 16 if prefill else 0)
    batch, _ = build(shape, decode, prefill_work, 16)
    sampling = SamplingArrays.from_rows([Row(SamplingParams(temperature=0.7), 1, 8)] * shape.num_rows,
                                        shape.num_rows, 8)

    def forward(state, cache, feed_tokens, inputs):
        logits_out = jnp.zeros((shape.num_rows, model.vocab_size), jnp.float32)
        rows_out = jnp.zeros(inputs.sampling_rows().shape, jnp.int32)
        logits, cache, _ = runner._forward_step_fn(state, cache, feed_tokens, inputs, logits_out, rows_out)
        return logits, cache

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=1, platform="cuda")
    abstract = jax.sharding.AbstractMesh((1, tp), ("data", "tensor"), (jax.sharding.AxisType.Auto,) * 2,
                                         abstract_device=device)
    with jax.sharding.use_abstract_mesh(abstract):
        exported = export.export(jax.jit(forward), platforms=["cuda"])(
            runner.state, runner.cache, runner.feed_tokens, StepInputs.pack(batch, sampling, shape))
    text = exported.mlir_module()
    kernels = set(re.findall(r"func.func private @(mla_attention|ragged_paged_attention|grouped_matmul_many)\b",
                             text))
    assert text.count("custom_call @mosaic_gpu") == 3  # (each jitted kernel function once, called per layer)
    # Decode: the MLA kernel, and the experts' gate+up and down. With a prefill chunk MLA takes the paged path,
    # where the Mosaic GPU paged kernel takes this small width (192 <= 256) as one KV head (DeepSeek's 576
    # goes to XLA).
    assert kernels == {"ragged_paged_attention" if prefill else "mla_attention", "grouped_matmul_many"}, kernels
    if tp > 1:
        assert "sdy.manual_computation" in text


def test_importing_jaxinfer_lets_cuda_graphs_hold_loops_unless_the_user_set_the_flag():
    """MLA's XLA attention loop would otherwise end a CUDA graph per layer (docs/benchmarks.md: B = 1 DeepSeek-V2-Lite
    6.73 -> 4.22 ms); a user's own --xla_gpu_enable_command_buffer is left as it is."""
    import os
    import subprocess
    import sys

    def flags(env_flags):
        env = {**os.environ, "XLA_FLAGS": env_flags, "JAX_PLATFORMS": "cpu"}
        code = "import os, jaxinfer; print(os.environ['XLA_FLAGS'])"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert flags("--xla_force_host_platform_device_count=2") == (
        "--xla_force_host_platform_device_count=2 --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL")
    assert flags("--xla_gpu_enable_command_buffer=FUSION") == "--xla_gpu_enable_command_buffer=FUSION"
