"""layers/ and the model registry: every projection goes through the one matmul entry
point, parameters carry their declaration, and architecture names find their family."""

import pathlib
import re
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer import models
from jaxinfer import params as params_lib
from jaxinfer.errors import ConfigError
from jaxinfer.layers import linear
from jaxinfer.models import LlamaConfig
from jaxinfer.sharding import make_mesh

TINY = LlamaConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, qk_norm=True)


def test_model_files_call_no_matmul_but_the_layers_entry_point():
    # A quantized weight type plugs into layers/linear.py; a model calling jnp.einsum or
    # jnp.dot itself would bypass it.
    for path in pathlib.Path(models.__file__).parent.glob("*.py"):
        source = path.read_text()
        found = re.findall(r"\bjnp\.(?:einsum|dot|matmul|tensordot)\b|\blax\.dot_general\b|[\w\]\)] @ ", source)
        assert not found, f"{path.name} calls {found} directly"


def test_every_projection_is_a_linear_or_the_embedding():
    model = nnx.eval_shape(lambda: models.family(TINY).Model(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    modules = [type(m).__name__ for _, m in nnx.iter_modules(model)]
    # per layer q, k, v, o, gate, up, down; plus the untied lm_head; and the embedding
    assert modules.count("Linear") == 7 * TINY.num_layers + 1 and modules.count("Embed") == 1
    weights = [p for p in params_lib.flat_params(nnx.state(model)) if p[-1] == "weight"]
    assert len(weights) == 7 * TINY.num_layers + 2  # no matrix outside those modules


def test_a_linear_multiplies_through_the_entry_point_and_adds_its_bias():
    counted = []
    real = linear.einsum

    def counting(equation, x, weight, **kw):
        counted.append(equation)
        return real(equation, x, weight, **kw)

    proj = linear.Linear("te,ehd->thd", (32, 4, 8), ("embed", "heads", "head_dim"), dtype=jnp.float32,
                         rngs=nnx.Rngs(0), bias=True)
    assert proj.bias[...].shape == (4, 8)  # the bias covers the weight's output axes
    with unittest.mock.patch.object(linear, "einsum", counting):
        out = proj(jnp.ones((3, 32)))
    assert counted == ["te,ehd->thd"] and out.shape == (3, 4, 8)


def test_matmul_refuses_a_weight_type_it_does_not_know():
    with pytest.raises(TypeError, match="no matmul for a weight of type dict"):
        linear.einsum("te,ev->tv", jnp.ones((2, 4)), {"values": jnp.ones((4, 3))})


def test_dummy_params_follow_each_declaration():
    _, state = params_lib.dummy_params(TINY, jnp.bfloat16, make_mesh())
    flat = params_lib.flat_params(state)
    for path, v in flat.items():
        value = np.asarray(params_lib.value_of(v).astype(jnp.float32))
        init = v.get_metadata()["init"]
        assert params_lib.value_of(v).dtype == jnp.bfloat16, path
        if path[-1] == "scale":
            assert init == "ones" and (value == 1).all(), path
        elif path[-1] == "bias":
            assert init == "zeros" and (value == 0).all(), path
        else:
            assert init == "normal" and 0.01 < value.std() < 0.03, path


def test_loading_casts_each_tensor_to_its_own_declared_dtype(monkeypatch):
    # Norm scales declared float32 in a bfloat16 model: loading follows each declaration,
    # not one dtype for every weight.
    from jaxinfer.models import llama

    class Float32Norm(llama.RMSNorm):
        def __init__(self, dim, eps, axis_name, *, dtype, rngs):
            super().__init__(dim, eps, axis_name, dtype=jnp.float32, rngs=rngs)

    monkeypatch.setattr(llama, "RMSNorm", Float32Norm)
    _, abstract = params_lib.abstract_model(TINY, jnp.bfloat16)
    tensors = [(p, np.full(params_lib.value_of(v).shape, 1 / 3, np.float64))
               for p, v in params_lib.flat_params(abstract).items()]
    _, state = params_lib.place_params(TINY, jnp.bfloat16, make_mesh(), tensors)
    for path, v in params_lib.flat_params(state).items():
        value = params_lib.value_of(v)
        assert value.dtype == (jnp.float32 if path[-1] == "scale" else jnp.bfloat16), path
        assert np.asarray(value[(0,) * value.ndim], np.float32) == np.float32(value.dtype.type(1 / 3)), path


@pytest.mark.parametrize("hf,architecture", [
    ({"architectures": ["MistralForCausalLM"]}, "mistral"),
    ({"model_type": "qwen3"}, "qwen3"),
    ({"architectures": ["Unknown", "LlamaForCausalLM"], "model_type": "qwen2"}, "llama"),
])
def test_registry_finds_the_family_from_hf_names(hf, architecture):
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = models.config_from_hf({**base, **hf})
    assert cfg.architecture == architecture and models.family(cfg).Config is LlamaConfig
    assert models.config_from_dict(cfg.to_dict()) == cfg


def test_unknown_architectures_are_config_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'gpt2'"):
        models.family("gpt2")
    with pytest.raises(ConfigError, match="unknown architecture \\['GPT2LMHeadModel'\\]"):
        models.config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="num_heads \\(4\\) must be a multiple of num_kv_heads \\(3\\)"):
        TINY.__class__(**{**TINY.to_dict(), "num_kv_heads": 3})


def test_kv_cache_dtype_is_the_compute_dtype_not_a_parameters():
    from checkpoints.loader import LoadedModel
    graphdef, state = params_lib.dummy_params(TINY, jnp.float32, make_mesh())
    loaded = LoadedModel(TINY, graphdef, state, None, "tiny", dtype=jnp.bfloat16)
    assert loaded.kv_cache_dtype == jnp.bfloat16
    assert jax.tree.leaves(state)[0].dtype == jnp.float32
