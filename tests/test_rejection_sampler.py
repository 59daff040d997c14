"""Speculative verification (jaxinfer/runner/rejection_sampler.py): against the sampler it must
equal token for token (greedy, and any row with no drafts), and in distribution (sampled rows: the
emitted tokens follow the target's processed distribution, whatever the draft)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.runner.rejection_sampler import verify
from jaxinfer.runner.sampler import PenaltyState, Row, SamplingArrays, reset_slot, sample

V, SLOTS, BAN = 16, 4, 2
_verify = jax.jit(verify, static_argnames=("full", "num_top"))
_sample = jax.jit(sample, static_argnames=("full", "num_top"))


def arrays_of(rows):
    return SamplingArrays.from_rows(rows, len(rows), BAN)


def run(logits, rows, drafts, num_drafts, draft_probs=None, state=None):
    state = PenaltyState.zeros(SLOTS, V) if state is None else state
    out, state = _verify(jnp.asarray(logits, jnp.float32), arrays_of(rows), state, jnp.asarray(drafts, jnp.int32),
                         jnp.asarray(num_drafts, jnp.int32),
                         None if draft_probs is None else jnp.asarray(draft_probs, jnp.float32), num_top=3)
    return jax.tree.map(np.asarray, out), state


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def settings(i):
    """A spread of sampling settings, greedy and sampled, with penalties on some."""
    return [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
            SamplingParams(temperature=1.3, top_k=5, top_p=0.8, min_p=0.05),
            SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3),
            SamplingParams(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.7)][i % 5]


def penalty_state(rng):
    state = PenaltyState.zeros(SLOTS, V)
    for slot in range(SLOTS):
        tokens = jnp.asarray(rng.integers(0, V, 8), jnp.int32)
        state = reset_slot(state, slot, tokens, jnp.arange(8) >= 4)
    return state


def test_a_row_without_drafts_is_the_samplers_own_draw():
    rng = np.random.default_rng(0)
    S, K = 10, 3
    logits = (rng.standard_normal((S, K + 1, V)) * 3).astype(np.float32)
    rows = [Row(settings(i), seed=1000 + i, position=7 + i, penalty_slot=i % SLOTS if i % 5 >= 3 else -1,
                banned=(i % V,) if i % 2 else (), want_top=i % 3 == 0) for i in range(S)]
    state = penalty_state(rng)
    got, got_state = run(logits, rows, rng.integers(0, V, (S, K)), np.zeros(S), state=state)
    want, want_state = _sample(jnp.asarray(logits[:, 0]), arrays_of(rows), state, num_top=3)
    np.testing.assert_array_equal(got.num_accepted, 0)
    np.testing.assert_array_equal(got.tokens[:, 0], np.asarray(want.tokens))
    np.testing.assert_array_equal(got.last, np.asarray(want.tokens))
    np.testing.assert_array_equal(got.tokens[:, 1:], -1)
    np.testing.assert_allclose(got.logprobs[:, 0], np.asarray(want.logprobs), rtol=1e-6)
    np.testing.assert_array_equal(got.top_ids[:, 0], np.asarray(want.top_ids))
    np.testing.assert_array_equal(np.asarray(got_state.counts), np.asarray(want_state.counts))


def test_greedy_rows_keep_the_longest_prefix_of_the_targets_argmax():
    rng = np.random.default_rng(1)
    S, K = 12, 4
    logits = (rng.standard_normal((S, K + 1, V)) * 3).astype(np.float32)
    best = logits.argmax(-1)
    wrong_at = np.array([i % (K + 1) for i in range(S)])  # K: every draft right
    drafts = best[:, :K].copy()
    for s, w in enumerate(wrong_at):
        if w < K:
            drafts[s, w] = (best[s, w] + 1 + s) % V
    num_drafts = np.array([K if s % 3 else 2 for s in range(S)])
    rows = [Row(SamplingParams(temperature=0.0), seed=s, position=20) for s in range(S)]
    got, _ = run(logits, rows, drafts, num_drafts)
    accepted = np.minimum(wrong_at, num_drafts)
    np.testing.assert_array_equal(got.num_accepted, accepted)
    for s in range(S):
        a = accepted[s]
        np.testing.assert_array_equal(got.tokens[s, :a + 1], best[s, :a + 1])  # drafts, then the argmax there
        assert (got.tokens[s, a + 1:] == -1).all() and got.last[s] == best[s, a]
        lp = np.log(softmax(logits[s, :a + 1]))[np.arange(a + 1), best[s, :a + 1]]
        np.testing.assert_allclose(got.logprobs[s, :a + 1], lp, atol=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.5),
    SamplingParams(temperature=0.0, frequency_penalty=1.5)])
def test_greedy_with_penalties_equals_sampling_one_token_at_a_time(params):
    """Row j counts the drafts before it as output: with strong penalties the argmax moves as tokens
    repeat, and verification must see what sequential decoding sees."""
    rng = np.random.default_rng(2)
    K = 5
    # Flat logits with a few favourites, so repeating a token soon costs it the argmax.
    base = rng.standard_normal(V).astype(np.float32)
    base[[3, 7]] += 4.0
    logits = np.stack([base + 0.01 * rng.standard_normal(V).astype(np.float32) for _ in range(K + 1)])
    state0 = reset_slot(PenaltyState.zeros(SLOTS, V), 1, jnp.asarray([3, 5, 7, 7], jnp.int32),
                        jnp.asarray([False, False, True, False]))
    state, tokens = state0, []
    for j in range(K + 1):  # one token at a time
        out, state = _sample(jnp.asarray(logits[j:j + 1]), arrays_of([Row(params, 5, 40 + j, penalty_slot=1)]),
                             state, num_top=3)
        tokens.append(int(out.tokens[0]))
    assert len(set(tokens)) > 1  # the penalties really move the argmax
    row = [Row(params, 5, 40, penalty_slot=1)]
    got, got_state = run(logits[None], row, [tokens[:K]], [K], state=state0)
    assert got.num_accepted[0] == K and got.tokens[0].tolist() == tokens
    np.testing.assert_array_equal(np.asarray(got_state.counts), np.asarray(state.counts))
    # A wrong draft at 2: the two before it kept, then the token sequential decoding gives there.
    wrong = list(tokens[:K])
    wrong[2] = (tokens[2] + 1) % V
    got, _ = run(logits[None], row, [wrong], [K], state=state0)
    assert got.num_accepted[0] == 2 and got.tokens[0, :3].tolist() == tokens[:3]


def _empirical(tokens, mask=None):
    tokens = tokens if mask is None else tokens[mask]
    return np.bincount(tokens, minlength=V) / max(len(tokens), 1)


def _tv(p, q):
    return 0.5 * np.abs(p - q).sum()


@pytest.mark.parametrize("proposer", ["draft model", "deterministic"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6)])
def test_sampled_rows_emit_the_targets_distribution_whatever_the_draft(proposer, params):
    """In the style of vLLM's rejection-sampler test: many sequences with one target and one draft
    distribution, each its own seed; the first emitted token must follow the target's processed
    distribution p_0, the second (where the first draft was kept) p_1, and the distance to them must
    shrink as samples grow. The draft is far from the target, so keeping drafts naively would fail."""
    rng = np.random.default_rng(3)
    K = 2
    target = (rng.standard_normal((K + 1, V)) * 1.5).astype(np.float32)
    q = softmax(rng.standard_normal((K, V)) * 1.5)
    scaled = target / params.temperature
    if params.top_k:
        kth = np.sort(scaled, axis=-1)[:, -params.top_k][:, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    p = softmax(scaled)
    assert _tv(p[0], q[0]) > 0.2
    distances = []
    for n in (500, 8000):
        if proposer == "draft model":
            drafts = np.stack([rng.choice(V, size=n, p=q[i]) for i in range(K)], axis=1)
            probs = np.broadcast_to(q, (n, K, V))
        else:  # one fixed guess per position, q one-hot
            drafts, probs = np.tile(p.argmax(-1)[:K], (n, 1)), None
        rows = [Row(params, seed=10_000 * n + s, position=3) for s in range(n)]
        got, _ = run(np.broadcast_to(target, (n, K + 1, V)), rows, drafts, np.full(n, K), probs)
        first = _empirical(got.tokens[:, 0])
        kept = got.num_accepted >= 1
        second = _empirical(got.tokens[:, 1], kept)
        distances.append((_tv(first, p[0]), _tv(second, p[1]), kept.sum()))
    (small0, small1, _), (big0, big1, kept_big) = distances
    assert kept_big > 500  # enough second tokens to judge
    assert big0 < 0.035 and big1 < 0.06, distances
    assert big0 < small0 + 0.01, distances  # more samples, closer (allowing for noise)


def test_seeded_rows_do_not_depend_on_batch_mates_or_row():
    rng = np.random.default_rng(4)
    K = 3
    probe_logits = (rng.standard_normal((K + 1, V)) * 2).astype(np.float32)
    probe_draft = rng.integers(0, V, K)
    probe = Row(SamplingParams(temperature=1.0, seed=77), seed=77, position=11)
    outs = []
    for n, at in ((1, 0), (6, 4), (9, 2)):
        logits = (rng.standard_normal((n, K + 1, V)) * 2).astype(np.float32)
        drafts = rng.integers(0, V, (n, K))
        rows = [Row(settings(i), seed=i, position=i) for i in range(n)]
        logits[at], drafts[at], rows[at] = probe_logits, probe_draft, probe
        got, _ = run(logits, rows, drafts, np.full(n, K))
        outs.append((got.tokens[at].tolist(), got.logprobs[at].tolist()))
    assert outs[0] == outs[1] == outs[2]
