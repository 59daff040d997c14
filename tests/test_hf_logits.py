"""Logits of tiny random HF checkpoints equal HF transformers' (PyTorch, float32),
for a packed prefill and 16 decode steps through the paged cache.

Fixtures: scripts/make_hf_fixtures.py (run with torch + transformers).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from tests.paged_runs import teacher_forced_logits

MODELS = ["llama_gqa", "llama31_tied", "qwen2_bias", "qwen3_qknorm", "mistral_window", "deepseek_v2", "deepseek_v3",
          "qwen3_moe", "mixtral"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_hf_transformers_through_paged_cache(name, data_dir):
    model_dir = data_dir / "hf_tiny" / name
    loaded = loader.load(model_dir, dtype=jnp.float32, mesh=make_mesh(), progress=False)
    ref = np.load(model_dir / "reference.npz")
    prompts = [ref[f"prompt_{i}"] for i in range(2)]
    continuations = [ref[f"generated_{i}"] for i in range(2)]
    # page_size 4: the 13- and 21-token prompts and their decodes cross many pages
    runner = ModelRunner(loaded.config, loaded.graphdef, loaded.state, make_mesh(),
                         num_pages=32, page_size=4)
    ours = teacher_forced_logits(runner, prompts, continuations)
    for i in range(2):
        expected = ref[f"logits_{i}"][:-1]
        assert ours[i].shape == expected.shape
        np.testing.assert_allclose(ours[i], expected, atol=1e-4, rtol=0)
        # the fixtures' greedy continuations are what our logits pick too
        assert (ours[i][len(prompts[i]) - 1:].argmax(-1) == continuations[i]).all()
