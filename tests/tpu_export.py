"""The whole engine step (forward with its paged cache writes, then the sampler with penalties and
logprobs) exported for TPU from the CPU under an abstract mesh: tests/test_tpu_lowering.py over small
models, tests/test_scaling_plans.py over the full-size plans of docs/scaling.md."""

import jax
import jax.numpy as jnp
from jax import export

from jaxinfer.core.config import EngineConfig
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.core.shapes import SeqWork
from jaxinfer.runner.sampler import Row, SamplingArrays
from jaxinfer.runner.step_inputs import StepInputs, build


def abstract_tpu_mesh(device_kind: str, data: int, tensor: int) -> jax.sharding.AbstractMesh:
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    return jax.sharding.AbstractMesh((data, tensor), ("data", "tensor"), (jax.sharding.AxisType.Auto,) * 2,
                                     abstract_device=device)


def mixed_step(cfg: EngineConfig):
    """A step of one decode row beside two prefill chunks (one starting mid-sequence), every row sampled with
    top-p, a penalty and top-n logprobs: (its shape, its packed StepInputs)."""
    shape = cfg.shape(2, 32)
    decode = [SeqWork([0], 7, [3], feed_slot=0, logit_offsets=[0])]
    prefill = [SeqWork(list(range(9)), 0, [1], logit_offsets=[8]), SeqWork([4, 5], 16, [2, 5], logit_offsets=[1])]
    batch, rows = build(shape, decode, prefill, cfg.page_size)
    params = SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5, logprobs=3)
    sampling = SamplingArrays.from_rows([Row(params, 1, 8, penalty_slot=0, want_top=True, feed_slot=0)] * 4,
                                        shape.num_rows, 8)
    assert sampling.needs_full()
    return shape, StepInputs.pack(batch, sampling, shape)


def export_whole_step(runner, shape, inputs, mesh: jax.sharding.AbstractMesh, spec: bool = False):
    """The runner's forward then sampler, as one function, exported for TPU under `mesh`."""
    vocab = runner.cfg.vocab_size

    def whole_step(state, cache, penalty, feed_tokens, inputs):
        logits_out = jnp.zeros((shape.num_rows, vocab), jnp.float32)
        rows_out = jnp.zeros(inputs.sampling_rows().shape, jnp.int32)
        logits, cache, rows = runner._forward_step_fn(state, cache, feed_tokens, inputs, logits_out, rows_out)
        out, penalty, feed_tokens = runner._sample_fn(logits, penalty, feed_tokens, rows, full=True, ban_width=8,
                                                      spec=(shape.decode_rows, shape.spec_tokens) if spec else None)
        return out, cache, penalty, feed_tokens

    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(jax.jit(whole_step), platforms=["tpu"])(
            runner.state, runner.cache, runner.penalty, runner.feed_tokens, inputs)
