"""Plans for serving a 70B dense model and a DeepSeek-V3-sized MoE on TPU v5e-16 and v6e-32 slices:
the mesh, the weights and KV cache per chip as jaxinfer's sharding rules place them, the KV capacity,
and the decode step time the HBM roofline allows. Prints a markdown table (docs/scaling.md holds it).

    python scripts/plan_scaling.py

Nothing is allocated: the models are abstract (jax.ShapeDtypeStruct) on an AbstractMesh, so the byte
counts are those of the real shardings, not a formula beside them. tests/test_scaling_plans.py exports
each plan's whole engine step for TPU under the same abstract mesh.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import params as params_lib  # noqa: E402
from jaxinfer import sharding  # noqa: E402
from jaxinfer.layers.rope import RopeScaling  # noqa: E402
from jaxinfer.models import LlamaConfig  # noqa: E402
from jaxinfer.models.deepseek import DeepseekConfig  # noqa: E402
from jaxinfer.runner import kv_cache  # noqa: E402
from jaxinfer.sharding import MESH_AXES  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str  # as JAX names it
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    chips_per_host: int


V5E = Chip("v5e", "TPU v5 lite", 16 * GiB, 819e9, 4)
V6E = Chip("v6e", "TPU v6 lite", 32 * GiB, 1640e9, 4)

LLAMA_3_70B = LlamaConfig(architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                          rope_theta=500000.0, max_position_embeddings=8192)
DEEPSEEK_V3 = DeepseekConfig(
    architecture="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61,
    num_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, num_shared_experts=1,
    first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
    norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=163840,
    rope_scaling=RopeScaling(kind="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                             mscale_all_dim=1.0))

HBM_USABLE = 0.9  # of a chip's HBM for weights and cache (the rest: activations, compiled steps, XLA scratch)
PAGE_SIZE = 16
CONTEXT = 4096  # tokens of context per sequence in the step-time estimate
BATCHES = (1, 64)


@dataclasses.dataclass(frozen=True)
class Plan:
    model_name: str
    model: object
    chip: Chip
    chips: int
    data: int  # replicas
    tensor: int  # chips per replica
    quantization: str | None = None
    int8_experts: bool = False  # routed experts counted at one byte a weight (not in jaxinfer yet: issue 14)
    note: str = ""

    def abstract_mesh(self) -> jax.sharding.AbstractMesh:
        device = jax.sharding.AbstractDevice(device_kind=self.chip.device_kind, num_cores=1, platform="tpu")
        return jax.sharding.AbstractMesh((self.data, self.tensor), MESH_AXES, (jax.sharding.AxisType.Auto,) * 2,
                                         abstract_device=device)

    def replica_mesh(self) -> jax.sharding.AbstractMesh:
        """One replica's mesh (data=1): the one its engine core's step runs on."""
        return dataclasses.replace(self, data=1).abstract_mesh()


PLANS = [
    Plan("Llama-3-70B", LLAMA_3_70B, V5E, 16, data=2, tensor=8, quantization="int8",
         note="bf16 weights need 17.6 GB a chip at tp 8; at tp 16 the 8 KV heads would be replicated"),
    Plan("Llama-3-70B", LLAMA_3_70B, V6E, 32, data=4, tensor=8),
    Plan("DeepSeek-V3", DEEPSEEK_V3, V6E, 32, data=1, tensor=32, int8_experts=True,
         note="int8 routed experts, bf16 rest; all-bf16 needs 44 GB a chip: 64 chips. jaxinfer cannot "
              "quantize experts yet (issue 14): this row is the plan, not a run"),
    Plan("DeepSeek-V3", DEEPSEEK_V3, V5E, 16, data=1, tensor=16,
         note="does not fit: 256 GiB of HBM against 671 GB (int8) or 336 GB (int4) of weights"),
]


def per_chip_bytes(shape, sharding) -> int:
    """Bytes of one chip's shard of an array of `shape` in `sharding` (a NamedSharding on an abstract mesh)."""
    split = 1
    for axis in sharding.spec:
        for name in (axis if isinstance(axis, tuple) else (axis,)):
            if name is not None:
                split *= sharding.mesh.shape[name]
    return math.prod(shape) // split


def weights(plan: Plan) -> tuple[float, float, float]:
    """(weight bytes a chip holds, of which routed experts, the model's parameter count)."""
    from pallas_kernels.quantized_matmul import parse

    mesh = plan.replica_mesh()
    quant = parse(plan.quantization) if plan.quantization else None
    _, state = params_lib.abstract_model(plan.model, jnp.bfloat16, params_lib.fit_quantization(
        plan.model, jnp.bfloat16, quant))
    shardings = params_lib.param_shardings(state, mesh)
    total = experts = 0
    for path, v in params_lib.flat_params(state).items():
        value = params_lib.value_of(v)
        b = per_chip_bytes(value.shape, shardings[path]) * jnp.dtype(value.dtype).itemsize
        total += b
        if "experts" in path and "shared" not in str(path):
            if plan.int8_experts:
                total -= b - b // value.dtype.itemsize
                b //= value.dtype.itemsize
            experts += b
    return total, experts, params_lib.num_params(state)


def kv_per_token(plan: Plan) -> tuple[float, bool]:
    """(KV bytes a chip holds per token of a sequence it serves, whether pages split by sequence)."""
    mesh = plan.replica_mesh()
    spec = kv_cache.CacheSpec.for_model(plan.model, num_pages=plan.tensor, page_size=PAGE_SIZE, dtype=jnp.bfloat16)
    by_sequence = spec.splits_pages
    total = 0
    for name, entry in spec.entries.items():
        shape = spec.array_shape(name)
        s = sharding.named_sharding(spec.logical_axes(name), shape, mesh)
        b = per_chip_bytes(shape, s) * spec.num_layers * jnp.dtype(spec.dtype).itemsize
        # Split by sequence, a page lives on one chip: its whole size is that chip's, per token it serves.
        total += (b * plan.tensor if by_sequence else b) / (plan.tensor * PAGE_SIZE)
    return total, by_sequence


def plan_row(plan: Plan) -> dict:
    w, experts, n = weights(plan)
    kv, by_sequence = kv_per_token(plan)
    usable = plan.chip.hbm_bytes * HBM_USABLE
    free = usable - w
    fits = free > 0
    tokens_per_chip = max(free, 0) / kv
    # Tokens one replica holds: split by sequence, every chip its own; by heads, every chip a share of each.
    replica_tokens = tokens_per_chip * plan.tensor if by_sequence else tokens_per_chip
    row = {"plan": plan, "params": n, "weights": w, "kv": kv, "fits": fits,
           "tokens": replica_tokens * plan.data, "steps": {}}
    for b in BATCHES:
        seqs_per_replica = max(1, math.ceil(b / plan.data))
        if experts:
            # Uniform routing: the experts some token of the step picks, spread as evenly as they can be; the
            # step waits for the chip with most, so a chip reads at least its even share, and one at batch 1.
            cfg = plan.model
            picked = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** seqs_per_replica)
            mine = cfg.num_experts // plan.tensor
            read = (w - experts) + experts * min(mine, math.ceil(picked / plan.tensor)) / mine
        else:
            read = w
        seqs_per_chip = math.ceil(seqs_per_replica / plan.tensor) if by_sequence else seqs_per_replica
        read += seqs_per_chip * CONTEXT * kv
        row["steps"][b] = read / plan.chip.hbm_bandwidth
    return row


def table(rows) -> str:
    head = ("| model | slice | mesh (data × tensor) | weight type | weights a chip | KV a token a chip | "
            "KV capacity (tokens) | " + " | ".join(f"decode step, batch {b}" for b in BATCHES) + " | note |")
    lines = [head, "|" + "---|" * (8 + len(BATCHES))]
    for r in rows:
        p = r["plan"]
        cap = f"{r['tokens'] / 1e3:,.0f} K" if r["fits"] else "does not fit"
        steps = " | ".join(f"{r['steps'][b] * 1e3:.1f} ms" if r["fits"] else "-" for b in BATCHES)
        kind = p.quantization or ("int8 experts" if p.int8_experts else "bf16")
        hosts = p.chips // p.chip.chips_per_host
        lines.append(f"| {p.model_name} ({r['params'] / 1e9:.0f} B) | {p.chip.name}-{p.chips} ({hosts} hosts) | "
                     f"{p.data} × {p.tensor} | {kind} | {r['weights'] / 1e9:.1f} GB of {p.chip.hbm_bytes / 1e9:.1f} | "
                     f"{r['kv'] / 1024:.1f} KiB | {cap} | {steps} | {p.note} |")
    return "\n".join(lines)


def main() -> None:
    rows = [plan_row(p) for p in PLANS]
    print(table(rows))
    print(f"\nHBM usable {HBM_USABLE:.0%}; step time = bytes the busiest chip reads (its weights; of its routed "
          f"experts, those some token picks; {CONTEXT} tokens of KV per sequence it serves) / HBM bandwidth; "
          "collectives and compute not counted.")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
