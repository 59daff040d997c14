"""Generation semantics: batching, stopping, sampling, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader
from jaxinfer.errors import InputError
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample
from jaxinfer.sharding import make_mesh
from jaxinfer.text_generation import TextGenerator


@pytest.fixture(scope="module")
def tg(data_dir):
    mesh = make_mesh()
    model = loader.load(data_dir / "hf_tiny" / "qwen3_qknorm", dtype=jnp.float32, mesh=mesh,
                        progress=False)
    return TextGenerator(model, mesh, page_size=4)


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(1, 40))).tolist() for _ in range(n)]


def test_batched_greedy_outputs_equal_single_request_runs(tg):
    ps = prompts(6)
    lengths = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (1, 5, 17, 9, 30, 2)]
    batched = tg.generate_ids(ps, lengths)
    for p, sp, got in zip(ps, lengths, batched):
        alone = tg.generate_ids([p], sp)[0]
        assert got.token_ids == alone.token_ids
        assert len(got.token_ids) == sp.max_tokens and got.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_batch_mates(tg):
    target = prompts(1, seed=3)[0]
    sp = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, top_k=40, seed=1234)
    alone = tg.generate_ids([target], sp)[0].token_ids
    others = prompts(4, seed=9)
    mixed = tg.generate_ids(others[:2] + [target] + others[2:],
                            [SamplingParams(max_tokens=7, temperature=1.0, seed=5)] * 2 + [sp]
                            + [SamplingParams(max_tokens=25)] * 2)
    assert mixed[2].token_ids == alone
    different_seed = tg.generate_ids([target], SamplingParams(
        max_tokens=20, temperature=0.8, top_p=0.95, top_k=40, seed=99))[0].token_ids
    assert different_seed != alone


def test_generation_stops_at_an_end_token_and_frees_its_pages(tg):
    p = prompts(1, seed=5)[0]
    free_before = tg.generator_for([p], [SamplingParams(max_tokens=20)]).allocator.num_free
    greedy = tg.generate_ids([p], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    stop_at = greedy[6]
    first = greedy.index(stop_at)
    result = tg.generate_ids([p], SamplingParams(max_tokens=20, stop_token_ids=(stop_at,)))[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == greedy[:first + 1]
    assert tg._generator.allocator.num_free == free_before


@pytest.mark.parametrize("bad,message", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2, 256]], "outside the vocabulary"),
    ([[-1]], "outside the vocabulary"),
    ([[1] * 256], "the context holds 256"),
])
def test_invalid_prompts_are_refused_with_a_clear_error(tg, bad, message):
    with pytest.raises(InputError, match=message):
        tg.generate_ids(bad, SamplingParams(max_tokens=4))


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=float("nan")),
                                    dict(top_k=-1), dict(max_tokens=0), dict(seed=-3)])
def test_invalid_sampling_parameters_are_refused(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def sample_many(logits_row, n, **kw):
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32)[None], (n, 1))
    params = SamplingArrays.from_params([SamplingParams(**kw)] * n, list(range(n)), n)
    return np.asarray(jax.jit(sample)(logits, params, jnp.zeros(n, jnp.int32)))


def test_temperature_sampling_follows_the_softmax():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    draws = sample_many(logits, 4000, temperature=1.0, seed=0)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    hot = np.bincount(sample_many(logits, 4000, temperature=2.0), minlength=4) / 4000
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(hot, expected, atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert set(sample_many(logits, 2000, temperature=1.0, top_k=2)) == {0, 1}
    assert set(sample_many(logits, 2000, temperature=1.0, top_p=0.65)) == {0, 1}
    assert set(sample_many(logits, 2000, temperature=1.0, top_p=0.75)) == {0, 1, 2}
    assert set(sample_many(logits, 500, temperature=1.0, top_k=1)) == {0}
    assert set(sample_many(logits, 500, temperature=0.0)) == {0}
