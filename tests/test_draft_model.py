"""Speculative decoding with a draft model (jaxinfer/spec_decode/draft_model.py), on the tiny models: output
is the non-speculative output token for token, greedy or seeded, whether the draft is the target itself
(nearly every draft kept) or another model (nearly none kept), through preemption, prefix caching, forks and
aborts; a draft that cannot serve the target is refused by name."""

import numpy as np
import pytest

from engine_fixtures import random_prompts, run_alone, run_arriving, tiny_llm
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import ConfigError
from test_speculative import fixed_costs, mixed_prompts, tokens


def draft_config(data_dir, name="llama_gqa", **extra):
    return {"method": "draft_model", "model": str(data_dir / "hf_tiny" / name), "num_speculative_tokens": 3, **extra}


@pytest.fixture(scope="module")
def plain(data_dir):
    with tiny_llm(data_dir) as llm:
        yield llm


@pytest.fixture(scope="module", params=["itself", "other"])
def spec(data_dir, request):
    """("itself", the target drafting for itself: its drafts are its own greedy tokens), or ("other", another
    family's tiny model as the draft, same vocabulary, other weights: drafts mostly rejected). One at a time:
    pytest finishes the tests of one before it makes the other."""
    draft = draft_config(data_dir, "llama_gqa" if request.param == "itself" else "qwen3_qknorm")
    with tiny_llm(data_dir, speculative_config=draft) as llm:
        yield request.param, fixed_costs(llm)


def counted(llm, run):
    before = llm.engine.core.counters()
    out = run()
    after = llm.engine.core.counters()
    return out, after["spec_draft_tokens"] - before["spec_draft_tokens"], \
        after["spec_accepted_tokens"] - before["spec_accepted_tokens"]


def test_greedy_output_is_token_identical_with_a_draft_model_on_24_prompts_arriving(plain, spec):
    which, spec = spec
    rng = np.random.default_rng(10)
    prompts = mixed_prompts(rng, 24)
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 40)), ignore_eos=bool(i % 3))
              for i in range(len(prompts))]
    want = {i: tokens(run_alone(plain, p, q)) for i, (p, q) in enumerate(zip(prompts, params))}
    (got, _), drafted, kept = counted(spec, lambda: run_arriving(spec, prompts, params, np.random.default_rng(11)))
    assert {i: tokens(o) for i, o in got.items()} == want
    assert drafted > 50
    if which == "itself":
        assert kept > 0.9 * drafted  # its own greedy tokens (rounding may part them at a near tie)
    else:
        assert kept < 0.5 * drafted


def test_seeded_sampled_output_is_the_non_speculative_output_whatever_shares_the_batch(plain, spec):
    """Deterministic drafts are verified against the sampler's own draw at each position, so a seeded request
    gives exactly what it gives without speculation, penalties and top-k/top-p included."""
    which, spec = spec
    rng = np.random.default_rng(12)
    prompts = mixed_prompts(rng, 10)
    params = [SamplingParams(temperature=t, top_p=tp, top_k=tk, repetition_penalty=rp, seed=100 + i,
                             max_tokens=30, ignore_eos=True)
              for i, (t, tp, tk, rp) in enumerate([(1.0, 1.0, 0, 1.0), (0.7, 0.9, 0, 1.0), (1.2, 1.0, 20, 1.1),
                                                    (0.5, 0.8, 5, 1.0), (1.0, 1.0, 0, 1.3)] * 2)]
    want = [tokens(run_alone(plain, p, q)) for p, q in zip(prompts, params)]
    (got, _), drafted, kept = counted(spec, lambda: run_arriving(spec, prompts, params, np.random.default_rng(13)))
    assert [tokens(got[i]) for i in range(len(prompts))] == want
    assert drafted > 20 and (kept > 0 if which == "itself" else True)


def test_preemption_prefix_caching_forks_and_aborts_with_a_draft_model(plain, data_dir):
    rng = np.random.default_rng(14)
    prompts = mixed_prompts(rng, 12)
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)] * len(prompts)
    with tiny_llm(data_dir, num_pages=30, speculative_config=draft_config(data_dir)) as small:
        _preemption_prefix_caching_forks_and_aborts(plain, fixed_costs(small), prompts, params)


def _preemption_prefix_caching_forks_and_aborts(plain, small, prompts, params):
    want = [tokens(run_alone(plain, p, q)) for p, q in zip(prompts, params)]
    got, _ = run_arriving(small, prompts, params, np.random.default_rng(15), arrive_prob=0.6)
    assert [tokens(got[i]) for i in range(len(prompts))] == want
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.core.counters()["spec_accepted_tokens"] > 0
    got, aborted = run_arriving(small, prompts, params, np.random.default_rng(16), arrive_prob=0.6, abort_prob=0.1)
    assert aborted and all(tokens(out) == want[i] for i, out in got.items())
    pool = small.engine.scheduler.pool
    assert pool.num_used_pages == 0
    pool.check()
    # Prefix cache hits (the draft recomputes what it has not seen itself) and n > 1 (forked rows start over).
    prompt = list(b"the cat sat on the mat; the cat sat on the mat; the cat")
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    before = small.engine.core.counters()["prefix_cache_hit_tokens"]
    first, again = tokens(run_alone(small, prompt, p)), tokens(run_alone(small, prompt, p))
    assert first == again == tokens(run_alone(plain, prompt, p))
    assert small.engine.core.counters()["prefix_cache_hit_tokens"] > before
    for q in (SamplingParams(temperature=0.0, n=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=4, n=3, max_tokens=20, ignore_eos=True)):
        assert tokens(run_alone(small, prompt, q)) == tokens(run_alone(plain, prompt, q))


def test_a_long_prompt_is_caught_up_in_chunks(plain, spec):
    """A prompt longer than the largest prefill chunk: the draft reads it over several calls before its
    first drafts, which the target itself then gets right."""
    which, spec = spec
    prompt = random_prompts(np.random.default_rng(17), 1, 100, 101)[0]  # > max_num_batched_tokens (64)
    p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    got, drafted, kept = counted(spec, lambda: tokens(run_alone(spec, prompt, p)))
    assert got == tokens(run_alone(plain, prompt, p))
    assert drafted > 0 and (kept > 0.9 * drafted if which == "itself" else True)


def test_a_quantized_copy_of_the_target_drafts_for_it(plain, data_dir):
    prompts = mixed_prompts(np.random.default_rng(18), 6)
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    with tiny_llm(data_dir, speculative_config=draft_config(data_dir, quantization="int8")) as spec:
        got, drafted, kept = counted(fixed_costs(spec), lambda: [tokens(run_alone(spec, q, p)) for q in prompts])
    assert got == [tokens(run_alone(plain, q, p)) for q in prompts]
    assert drafted > 0 and kept > 0.5 * drafted


@pytest.mark.parametrize("bad,named", [
    ({"method": "draft_model"}, "needs model"),
    ({"method": "ngram", "model": "x"}, "draft model's setting"),
    ({"model": "/nonexistent/draft"}, "no such file"),
    ({"model": "{default}"}, "another vocabulary"),
    ({"model": "{tiny}", "quantization": "int3"}, "quantization"),
])
def test_a_draft_model_that_cannot_serve_is_refused_by_name(data_dir, default_model_path, bad, named):
    bad = {k: v.format(default=default_model_path, tiny=data_dir / "hf_tiny" / "llama_gqa") if isinstance(v, str)
           else v for k, v in bad.items()}
    with pytest.raises(ConfigError, match=named):
        tiny_llm(data_dir, warmup=False, speculative_config=bad)
