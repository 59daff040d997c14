"""The whole engine step (model, paged cache writes, attention, sampling) lowers
for TPU, checked on the CPU with jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from checkpoints import loader
from jaxinfer.batch import pack_batch
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingArrays, SamplingParams
from jaxinfer.sharding import make_mesh


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_engine_step_lowers_for_tpu(dtype, data_dir):
    mesh = make_mesh()
    model = loader.load(data_dir / "hf_tiny" / "qwen3_qknorm", dtype=dtype, mesh=mesh, progress=False)
    runner = ModelRunner(model.config, model.graphdef, model.state, mesh, num_pages=16, page_size=16)
    batch = pack_batch([np.arange(5), np.arange(9)], [0, 0], [[1], [2]])
    sampling = SamplingArrays.from_params([SamplingParams(temperature=0.7, top_p=0.9)] * 2, [0, 1], 2)
    exported = export.export(jax.jit(runner._step_fn), platforms=["tpu"])(
        runner.state, runner.cache, batch, sampling, np.zeros(2, np.int32))
    assert exported.platforms == ("tpu",)
    assert "stablehlo" in exported.mlir_module()
