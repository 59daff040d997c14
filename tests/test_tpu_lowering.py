"""The whole engine step (model, paged cache writes, attention, sampling with
penalties and logprobs) lowers for TPU, checked on the CPU with jax.export."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from checkpoints import loader
from jaxinfer.batch import SeqWork, build
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import Row, SamplingArrays, SamplingParams
from jaxinfer.scheduler import SchedulerConfig
from jaxinfer.sharding import make_mesh


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_engine_step_lowers_for_tpu(dtype, data_dir):
    mesh = make_mesh()
    model = loader.load(data_dir / "hf_tiny" / "qwen3_qknorm", dtype=dtype, mesh=mesh, progress=False)
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=16,
                          num_pages=16, block_q=16)
    runner = ModelRunner(model.config, model.graphdef, model.state, mesh, num_pages=16, page_size=16,
                         penalty_slots=4, max_model_len=64)
    shape = cfg.shape(2, 32)
    decode = [SeqWork([0], 7, [3], feed_row=0, logit_offsets=[0])]
    prefill = [SeqWork(list(range(9)), 0, [1], logit_offsets=[8]), SeqWork([4, 5], 16, [2, 5], logit_offsets=[1])]
    batch, rows = build(shape, decode, prefill, 16)
    params = SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5, logprobs=3)
    sampling = SamplingArrays.from_rows([Row(params, 1, 8, penalty_slot=0, want_top=True)] * 4,
                                        shape.num_rows, 8)
    exported = export.export(jax.jit(runner._step_fn), platforms=["tpu"])(
        runner.state, runner.cache, runner.penalty, runner.sampled, batch, sampling)
    assert exported.platforms == ("tpu",)
    assert "stablehlo" in exported.mlir_module()
