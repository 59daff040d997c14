"""Speculative decoding with a draft head (jaxinfer/spec_decode/draft_head.py, EAGLE-3 style), on the tiny
model: output is the non-speculative output token for token whatever the head proposes, through preemption
and forks; a head that does not fit the model is refused by name. A trained head on the default model:
tests/test_speculative_default_model.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from engine_fixtures import run_arriving, tiny_llm, tiny_model
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import ConfigError
from jaxinfer.spec_decode import draft_head
from test_speculative import fixed_costs, mixed_prompts, tokens

@pytest.fixture(scope="module")
def untrained_head(data_dir, tmp_path_factory):
    """A head with random parameters over the tiny model: its drafts are mostly wrong."""
    m = tiny_model(data_dir)
    path = tmp_path_factory.mktemp("head")
    draft_head.save(draft_head.new_head(m.graphdef, m.state, m.config, (0, 1), dtype=jnp.float32), m.config, path)
    return path


def test_output_is_unchanged_with_a_draft_head_greedy_or_seeded(data_dir, untrained_head):
    plain = tiny_llm(data_dir)
    spec = fixed_costs(tiny_llm(data_dir, num_pages=40, speculative_config={
        "method": "eagle3", "model": str(untrained_head), "num_speculative_tokens": 3}))
    rng = np.random.default_rng(20)
    prompts = mixed_prompts(rng, 12)
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=30, ignore_eos=True)
              for i in range(len(prompts))]
    want = [tokens(o) for o in plain.generate(prompts, params, use_tqdm=False)]
    got, _ = run_arriving(spec, prompts, params, np.random.default_rng(21), arrive_prob=0.6)
    assert [tokens(got[i]) for i in range(len(prompts))] == want
    c = spec.engine.core.counters()
    assert c["spec_draft_tokens"] > 20 and spec.engine.scheduler.num_preemptions > 0  # a small pool: preempted
    # n > 1: the forked sequences' features come along with their copied pages.
    p = SamplingParams(temperature=0.0, n=3, max_tokens=20, ignore_eos=True)
    assert tokens(spec.generate([prompts[1]], p, use_tqdm=False)[0]) == tokens(
        plain.generate([prompts[1]], p, use_tqdm=False)[0])


def test_a_head_that_does_not_fit_the_model_is_refused_by_name(data_dir, default_model_path, untrained_head, tmp_path):
    from jaxinfer.llm import LLM

    engine = dict(dtype="float32", progress=False, warmup=False, max_num_seqs=2, max_model_len=256)
    with pytest.raises(ConfigError, match="trained for another model"):
        LLM(str(default_model_path), **engine, speculative_config={"method": "eagle3", "model": str(untrained_head)})
    with pytest.raises(ConfigError, match="not a draft head"):
        tiny_llm(data_dir, warmup=False, speculative_config={"method": "eagle3", "model": str(tmp_path)})
    with pytest.raises(ConfigError, match="needs model"):
        tiny_llm(data_dir, warmup=False, speculative_config={"method": "eagle3"})
