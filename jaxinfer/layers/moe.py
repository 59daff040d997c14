"""Mixture of experts: routing on the device in float32, and dropless expert MLPs as grouped matmuls.

Routing (`Router`) covers the families' variants as config switches:

    scoring        "softmax" (Mixtral, Qwen3-MoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3)
    bias           V3's `e_score_correction_bias`: added to the scores for choosing experts only,
                   never to the weights
    groups         group-limited top-k (`n_group`, `topk_group`): experts come only from the
                   `topk_group` best groups, a group scored by its best expert (V2's
                   "group_limited_greedy") or its best two summed (V3's "noaux_tc")
    norm_topk      the chosen weights renormalized to sum to 1 (`norm_topk_prob`)
    scale          `routed_scaling_factor`, applied to the weights last

`experts` computes every token's chosen experts with no capacity limit: one row per (token, expert)
pair through pallas_kernels/grouped_matmul's `grouped_swiglu` (the rows laid out once; on CUDA the
Mosaic kernel that reads each chosen expert once per tile of rows, gate and up in one launch, elsewhere
`jax.lax.ragged_dot` over the rows sorted by expert), then each token's rows weighted and summed.

Expert parallelism: the routed experts' axis maps to the mesh's `tensor` axis (jaxinfer/sharding.py),
so under tensor parallelism each device holds X / tp whole experts. The step's tokens are on every
device already (attention's output is summed across it), so no all-to-all is needed: inside
`shard_map` each device runs its own experts over the rows routed to them (the other rows fall
past its groups, which the grouped matmul leaves at zero) and one psum adds the devices' shares. This runs
wherever psum does, the CPU's simulated devices included. Where tp does not divide X the experts
are replicated and every device computes all of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxinfer.layers.param import param
from pallas_kernels.grouped_matmul import grouped_swiglu

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclasses.dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    norm_topk: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    bias: bool = False  # V3's e_score_correction_bias

    def problems(self) -> list[str]:
        problems = []
        if self.scoring not in SCORINGS:
            problems.append(f"scoring_func {self.scoring!r} is not supported (expected one of {SCORINGS})")
        if self.group_score not in GROUP_SCORES:
            problems.append(f"group scoring {self.group_score!r} is not supported")
        if not 0 < self.top_k <= self.num_experts:
            problems.append(f"num_experts_per_tok ({self.top_k}) must be in 1..{self.num_experts} (the experts)")
        if self.n_group < 1 or self.num_experts % self.n_group:
            problems.append(f"n_group ({self.n_group}) must divide the {self.num_experts} routed experts")
        elif not 0 < self.topk_group <= self.n_group:
            problems.append(f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
        elif self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            problems.append(f"num_experts_per_tok ({self.top_k}) exceeds the experts of the topk_group "
                            f"({self.topk_group}) groups")
        return problems


def route(logits: jax.Array, r: Routing, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] (float32) -> (weights [T, k] float32, expert ids [T, k] int32)."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if r.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32) if bias is not None else scores
    if r.n_group > 1 and r.topk_group < r.n_group:
        t = choice.shape[0]
        grouped = choice.reshape(t, r.n_group, -1)
        if r.group_score == "max":
            group_scores = grouped.max(axis=-1)
        else:
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
        _, best = jax.lax.top_k(group_scores, r.topk_group)
        keep = jnp.zeros((t, r.n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
        # Experts of other groups are never chosen (HF masks them to 0; scores here are >= 0 too, but a
        # negative V3 bias could make 0 win, so -inf).
        choice = jnp.where(jnp.repeat(keep, r.num_experts // r.n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, r.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if r.norm_topk:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + (1e-20 if r.scoring == "sigmoid" else 0.0))
    return weights * r.scale, ids.astype(jnp.int32)


def experts(x: jax.Array, weights: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array,
            down: jax.Array) -> jax.Array:
    """x [T, E] through each token's chosen experts (SwiGLU: gate, up [X, E, I], down [X, I, E]),
    weighted by `weights` [T, k] and summed: [T, E] in x's dtype. Expert-parallel under a tensor mesh
    (see the module docstring)."""
    from jaxinfer.layers.attention import kernel_mesh

    mesh = kernel_mesh()
    tp = mesh.shape.get("tensor", 1) if mesh is not None else 1
    if tp == 1 or gate.shape[0] % tp:
        return _experts(x, weights, ids, gate, up, down)

    def local(x, weights, ids, gate, up, down):
        n = gate.shape[0]  # this device's experts: global ids first .. first + n - 1
        mine = ids - jax.lax.axis_index("tensor") * n
        held = (mine >= 0) & (mine < n)
        y = _experts(x, jnp.where(held, weights, 0.0), jnp.where(held, mine, n), gate, up, down)
        return jax.lax.psum(y.astype(jnp.float32), "tensor").astype(x.dtype)

    split = P("tensor", None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), split, split, split), out_specs=P(),
                         check_vma=False)(x, weights, ids, gate, up, down)


def _experts(x, weights, ids, gate, up, down):
    """`experts` on one device: ids equal to the number of experts held (gate.shape[0]) are rows to skip."""
    t, k = ids.shape
    rows = jnp.repeat(x, k, axis=0)  # one row per (token, slot), token-major
    flat = ids.reshape(-1)
    y = grouped_swiglu(rows, gate, up, down, flat)
    # Each row weighted (in float32), summed per token.
    return (y.astype(jnp.float32).reshape(t, k, -1) * weights[..., None]).sum(axis=1).astype(x.dtype)


class Experts(nnx.Module):
    """The routed experts' stacked weights, in einsum layout (inputs first)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        X, E, I = num_experts, hidden, intermediate  # noqa: E741
        self.gate_proj = param(rngs, (X, E, I), ("expert", "embed", "expert_mlp"), dtype)
        self.up_proj = param(rngs, (X, E, I), ("expert", "embed", "expert_mlp"), dtype)
        self.down_proj = param(rngs, (X, I, E), ("expert", "expert_mlp", "embed"), dtype)

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        return experts(x, weights, ids, self.gate_proj[...], self.up_proj[...], self.down_proj[...])


class Router(nnx.Module):
    """The gate: logits = x W (float32), then `route`."""

    def __init__(self, hidden: int, routing: Routing, *, dtype, rngs: nnx.Rngs):
        del dtype  # the router is float32 whatever the model's dtype (as HF keeps it)
        self.weight = param(rngs, (hidden, routing.num_experts), ("embed", None), jnp.float32)
        if routing.bias:
            self.bias = param(rngs, (routing.num_experts,), (None,), jnp.float32, init="zeros")
        self.routing = routing

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        return route(logits, self.routing, self.bias[...] if self.routing.bias else None)


class MoE(nnx.Module):
    """A mixture-of-experts feed-forward block: routed experts, plus `shared` (an MLP every token goes
    through, DeepSeek's shared experts) where given."""

    def __init__(self, hidden: int, width: int, routing: Routing, *, shared: nnx.Module | None = None, dtype,
                 rngs: nnx.Rngs):
        self.router = Router(hidden, routing, dtype=dtype, rngs=rngs)
        self.experts = Experts(routing.num_experts, hidden, width, dtype=dtype, rngs=rngs)
        if shared is not None:
            self.shared = shared
        self.has_shared = shared is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        weights, ids = self.router(x)
        y = self.experts(x, weights, ids)
        return y + self.shared(x) if self.has_shared else y
