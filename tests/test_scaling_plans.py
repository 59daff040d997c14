"""docs/scaling.md's plans (scripts/plan_scaling.py): each replica's whole engine step, at the plan's full
model size, exports for its TPU slice under the plan's abstract mesh; and the plans' byte counts are
those of the sharding rules."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxinfer import params as params_lib
from jaxinfer.core.config import EngineConfig
from jaxinfer.runner.model_runner import ModelRunner
from tests.tpu_export import export_whole_step, mixed_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plan_scaling  # noqa: E402


@pytest.mark.parametrize("plan", plan_scaling.PLANS, ids=lambda p: f"{p.model_name}-{p.chip.name}-{p.chips}")
def test_a_plans_engine_step_exports_for_its_slice(plan):
    from pallas_kernels.quantized_matmul import parse

    if not plan_scaling.plan_row(plan)["fits"]:
        pytest.skip("the plan says this model does not fit this slice")

    mesh = plan.replica_mesh()  # each replica's engine core steps on its own row of the data axis
    quant = parse(plan.quantization) if plan.quantization else None
    graphdef, state = params_lib.abstract_model(plan.model, jnp.bfloat16,
                                                params_lib.fit_quantization(plan.model, jnp.bfloat16, quant))
    shardings = params_lib.param_shardings(state, mesh)
    flat = params_lib.flat_params(state)
    state = params_lib._with_values(state, {
        path: jax.ShapeDtypeStruct(params_lib.value_of(v).shape, params_lib.value_of(v).dtype,
                                   sharding=shardings[path]) for path, v in flat.items()})
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=16,
                       num_pages=4 * plan.tensor, block_q=16)
    runner = ModelRunner(plan.model, graphdef, state, mesh, num_pages=cfg.num_pages, page_size=16,
                         penalty_slots=4, max_model_len=64)
    assert runner.abstract
    shape, inputs = mixed_step(cfg)
    exported = export_whole_step(runner, shape, inputs, mesh)
    assert exported.platforms == ("tpu",)
    assert exported.nr_devices == plan.tensor
    text = exported.mlir_module()
    assert "tpu_custom_call" in text  # the Mosaic TPU attention kernel
    assert "sdy.manual_computation" in text  # per-device kernels (and, for MoE, the experts) under shard_map
    if plan.model is plan_scaling.DEEPSEEK_V3:
        assert runner.kv_partitions == plan.tensor  # MLA's latent pages split by sequence over the chips
    if plan.quantization is None and not plan.int8_experts:
        # The plan's weights a chip holds: its shard of every parameter; all but the norms split, so within 1% of
        # the bf16 model over the tensor axis.
        even = params_lib.num_params(state) * 2 / plan.tensor
        assert abs(plan_scaling.weights(plan)[0] - even) < 0.01 * even
