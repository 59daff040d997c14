"""Mixture-of-experts pieces against plain numpy: routing (softmax / sigmoid, bias, groups, renormalizing),
the dropless grouped expert MLP, expert tensors stacked from either checkpoint layout, and configs refused
by the field at fault."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.layers.moe import Routing, experts, route
from jaxinfer.models import config_from_hf
from jaxinfer.models.moe_names import stack_experts


def numpy_route(logits, r: Routing, bias=None):
    """The routing written out per token, with plain loops."""
    weights, ids = [], []
    for row in logits.astype(np.float64):
        scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if r.scoring == "softmax" \
            else 1 / (1 + np.exp(-row))
        choice = scores + (bias if bias is not None else 0)
        allowed = np.ones(r.num_experts, bool)
        if r.n_group > 1:
            groups = choice.reshape(r.n_group, -1)
            group_scores = groups.max(1) if r.group_score == "max" else np.sort(groups, 1)[:, -2:].sum(1)
            best = np.argsort(-group_scores, kind="stable")[:r.topk_group]
            allowed = np.repeat(np.isin(np.arange(r.n_group), best), r.num_experts // r.n_group)
        chosen = [e for e in np.argsort(-np.where(allowed, choice, -np.inf), kind="stable")[:r.top_k]]
        w = scores[chosen]
        if r.norm_topk:
            w = w / w.sum()
        weights.append(w * r.scale)
        ids.append(chosen)
    return np.array(weights), np.array(ids)


@pytest.mark.parametrize("r, with_bias", [
    (Routing(8, 2), False),
    (Routing(8, 3, norm_topk=True, scale=1.5), False),
    (Routing(16, 3, n_group=4, topk_group=2, group_score="max", scale=2.0), False),  # V2 group-limited
    (Routing(16, 4, scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", norm_topk=True,
             scale=2.5, bias=True), True),  # V3
])
def test_routing_matches_the_written_out_rule(r, with_bias):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, r.num_experts)).astype(np.float32)
    bias = (rng.standard_normal(r.num_experts) * 0.5).astype(np.float32) if with_bias else None
    weights, ids = route(jnp.asarray(logits), r, None if bias is None else jnp.asarray(bias))
    want_w, want_ids = numpy_route(logits, r, bias)
    # top_k's order within a token may differ: compare as sets, weights matched by expert
    for t in range(len(logits)):
        got = dict(zip(np.asarray(ids[t]).tolist(), np.asarray(weights[t]).tolist()))
        want = dict(zip(want_ids[t].tolist(), want_w[t].tolist()))
        assert got.keys() == want.keys(), t
        np.testing.assert_allclose([got[e] for e in want], [want[e] for e in want], rtol=1e-5)


def test_experts_equal_a_dense_loop_over_tokens():
    rng = np.random.default_rng(1)
    t, e, i, x_, k = 19, 16, 12, 6, 2
    x = rng.standard_normal((t, e)).astype(np.float32)
    gate, up = (rng.standard_normal((x_, e, i)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((x_, i, e)).astype(np.float32) * 0.3
    ids = np.stack([rng.choice(x_, k, replace=False) for _ in range(t)]).astype(np.int32)
    ids[:5] = [0, 1]  # a popular pair; expert 5 chosen by few
    weights = rng.random((t, k)).astype(np.float32)
    got = np.asarray(jax.jit(experts)(x, weights, ids, gate, up, down))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    want = np.stack([sum(w * ((silu(x[n] @ gate[j]) * (x[n] @ up[j])) @ down[j]) for j, w in zip(ids[n], weights[n]))
                     for n in range(t)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_tensors_stack_from_either_layout_and_a_missing_one_is_named():
    per = [(f"m.layers.0.mlp.experts.{e}.{p}.weight", np.full((3, 2), e, np.float32))
           for e in range(4) for p in ("gate_proj", "up_proj")]
    out = dict(stack_experts(per + [("other", np.zeros(1))], 4))
    assert out["m.layers.0.mlp.experts.gate_proj"].shape == (4, 3, 2)
    assert out["m.layers.0.mlp.experts.up_proj"][:, 0, 0].tolist() == [0, 1, 2, 3] and "other" in out
    fused = dict(stack_experts([("m.layers.0.mlp.experts.gate_up_proj", np.arange(4 * 6 * 2).reshape(4, 6, 2))], 4))
    assert fused["m.layers.0.mlp.experts.gate_proj"].shape == (4, 3, 2)
    assert (fused["m.layers.0.mlp.experts.up_proj"][1, 0] == [18, 19]).all()
    with pytest.raises(CheckpointError, match=r"lacks m\.layers\.0\.mlp\.experts\.\{3\}\.gate_proj"):
        list(stack_experts(per[:-2], 4))
    # Mixtral's names
    mixtral = dict(stack_experts([(f"b.experts.{e}.w1.weight", np.zeros((3, 2))) for e in range(2)], 2))
    assert "b.experts.gate_proj" in mixtral


@pytest.mark.parametrize("field, value, named", [
    ("topk_method", "sinkhorn", "topk_method 'sinkhorn'"),
    ("scoring_func", "softplus", "scoring_func 'softplus'"),
    ("n_group", 3, "n_group"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
])
def test_an_unsupported_moe_config_is_refused_naming_the_field(data_dir, field, value, named):
    hf = json.loads((data_dir / "hf_tiny" / "deepseek_v3" / "config.json").read_text())
    hf[field] = value
    with pytest.raises(ConfigError, match=named):
        config_from_hf(hf)


def test_quantizing_an_moe_model_says_its_routed_experts_stay_in_float(caplog):
    import logging

    from flax import nnx

    from jaxinfer import params
    from jaxinfer.layers.linear import QuantizedLinear
    from jaxinfer.layers.moe import Experts
    from pallas_kernels.quantized_matmul import parse
    from tests.test_tpu_lowering import SMALL_DEEPSEEK

    with caplog.at_level(logging.WARNING, logger="jaxinfer.layers.linear"):
        graphdef, state = params.abstract_model(SMALL_DEEPSEEK, jnp.bfloat16, parse("int8-ch"))
    assert "routed experts of 1 layers stay in bfloat16" in caplog.text
    model = nnx.merge(graphdef, state)
    assert any(isinstance(m, QuantizedLinear) for _, m in nnx.iter_modules(model))
    experts = [m for _, m in nnx.iter_modules(model) if isinstance(m, Experts)]
    assert experts and all(m.gate_proj.get_value().dtype == jnp.bfloat16 for m in experts)
