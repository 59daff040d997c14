"""Per-request sampling: parameter validation, row packing, and the device
sampler against independent numpy references (penalties, cuts, logprobs)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.core.sampling_params import MAX_LOGPROBS, SamplingParams, seed_for
from jaxinfer.errors import InputError
from jaxinfer.runner.sampler import PenaltyState, Row, SamplingArrays, apply_penalties, reset_slot, sample

# One shape for every device test, so each function compiles once.
R, V, B, SLOTS = 64, 32, 4, 4
_sample = jax.jit(sample, static_argnames="full")
_penalize = jax.jit(apply_penalties)
_reset = jax.jit(reset_slot)


def run(rows, logits, state=None, num_rows=R, full=True):
    arrays = SamplingArrays.from_rows(rows, num_rows, B)
    state = PenaltyState.zeros(SLOTS, V) if state is None else state
    out, state = _sample(jnp.asarray(logits, jnp.float32), arrays, state, full=full)
    return jax.tree.map(np.asarray, out), state


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def random_logits(rng, rows=R, scale=3.0):
    return (rng.standard_normal((rows, V)) * scale).astype(np.float32)


# ----------------------------------------------------------------------------
# SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos) == (16, 0, (), (),
                                                                                  False)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.skip_special_tokens and not p.include_stop_str_in_output


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(n=0), "n must"), (dict(n=129), "n must"), (dict(n=2.0), "n must"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens \\(5\\)"),
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=1.0), "seed"),
    (dict(stop=[""]), "stop string"), (dict(stop=["x" * 257]), "stop string"),
    (dict(stop=["a"] * 17), "stop holds 17"), (dict(stop=5), "stop must"),
    (dict(stop=["ok", 1]), "stop string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=list(range(65))),
                                                    "stop_token_ids holds 65"),
    (dict(stop_token_ids=["2"]), "stop_token_ids"), (dict(stop_token_ids=3), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    # Finite, but not what float32 on the device can compute with.
    (dict(temperature=1e308), "temperature"), (dict(repetition_penalty=1e30), "repetition_penalty"),
    (dict(repetition_penalty=1e-30), "repetition_penalty"), (dict(top_k=2**31), "top_k"),
    (dict(ignore_eos="yes"), "ignore_eos"), (dict(skip_special_tokens=1), "skip_special_tokens"),
])
def test_each_invalid_value_is_refused_by_name(kwargs, field):
    with pytest.raises(InputError, match="invalid sampling parameters: .*" + field):
        SamplingParams(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(InputError) as e:
        SamplingParams(temperature=-1, top_p=2, seed="x", stop=[""], logprobs=99)
    for field in ("temperature", "top_p", "seed", "stop string", "logprobs"):
        assert field in str(e.value)


def test_many_problems_give_a_short_message_naming_the_first_and_counting_the_rest():
    with pytest.raises(InputError) as e:
        SamplingParams(stop=["x" * 300] * 200, temperature=-1)
    message = str(e.value)
    assert len(message) < 1000 and "temperature" in message and "and 197 more problems" in message


@pytest.mark.parametrize("field", ["temperature", "top_k", "n", "max_tokens", "min_tokens", "seed",
                                   "logprobs", "presence_penalty", "repetition_penalty"])
def test_bools_are_not_numbers(field):
    with pytest.raises(InputError, match=field):
        SamplingParams(**{field: True})
    with pytest.raises(InputError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[1, True])


def test_lone_surrogate_stop_string_is_refused():
    with pytest.raises(InputError, match="lone surrogate"):
        SamplingParams(stop=["ok", "bad\ud800"])


def test_valid_edges_are_accepted_and_normalized():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    p = SamplingParams(stop_token_ids=[np.int64(7), 2], top_k=np.int32(5))
    assert p.stop_token_ids == (7, 2) and type(p.stop_token_ids[0]) is int and type(p.top_k) is int
    hash(p)  # tuples, so usable as a key
    for kwargs in (dict(seed=-2**63), dict(seed=2**64 - 1), dict(max_tokens=None, min_tokens=50),
                   dict(min_p=1.0, top_p=1.0, temperature=0.0), dict(n=128), dict(logprobs=0),
                   dict(prompt_logprobs=20), dict(presence_penalty=-2, frequency_penalty=2),
                   dict(stop=["x" * 256] * 16, stop_token_ids=list(range(64)))):
        SamplingParams(**kwargs)


def test_from_dict_builds_and_refuses_unknown_keys():
    p = SamplingParams.from_dict({"temperature": 0.5, "stop": ["\n"], "max_tokens": None})
    assert p == SamplingParams(temperature=0.5, stop=("\n",), max_tokens=None)
    with pytest.raises(InputError, match="unknown field.*'best_of'.*known fields: n, temperature"):
        SamplingParams.from_dict({"best_of": 2, "n": 1})
    with pytest.raises(InputError, match="expected an object"):
        SamplingParams.from_dict([("n", 1)])


def test_seed_for_keeps_the_seed_for_sample_zero_and_mixes_the_rest():
    assert seed_for(1234, 0) == 1234
    assert seed_for(-1, 0) == 2**64 - 1
    siblings = [seed_for(1234, i) for i in range(1, 50)]
    assert siblings == [seed_for(1234, i) for i in range(1, 50)]  # deterministic
    assert len(set(siblings + [1234, seed_for(1235, 1)])) == 51
    assert all(0 <= s < 2**64 for s in siblings)


def test_an_unseeded_request_draws_its_seed_once_on_arrival():
    from jaxinfer.core.request import Request
    unseeded = SamplingParams(n=3, temperature=1.0)
    requests = [Request(f"r{i}", [1, 2], unseeded, frozenset(), 4) for i in range(8)]
    assert len({r.seed for r in requests}) == 8 and all(0 <= r.seed < 2**64 for r in requests)
    r = requests[0]
    assert len({seed_for(r.seed, i) for i in range(3)}) == 3  # its samples draw apart
    assert Request("s", [1], SamplingParams(seed=7), frozenset(), 4).seed == 7


# ----------------------------------------------------------------------------
# SamplingArrays.from_rows


def test_from_rows_packs_rows_and_pads_the_rest_greedy():
    p = SamplingParams(temperature=0.5, top_k=7, top_p=0.8, min_p=0.1, presence_penalty=0.2,
                       frequency_penalty=-0.3, repetition_penalty=1.2)
    rows = [Row(p, seed=0x123456789ABCDEF0, position=11, penalty_slot=2, banned=(4, 9), target=3,
                want_top=True),
            None,
            Row(SamplingParams(temperature=1e-7), seed=5, position=2)]
    a = SamplingArrays.from_rows(rows, 5, 3)
    np.testing.assert_allclose(a.temperature, [0.5, 0, 0, 0, 0])  # 1e-7 counts as greedy
    np.testing.assert_array_equal(a.top_k, [7, 0, 0, 0, 0])
    np.testing.assert_allclose(a.top_p, [0.8, 1, 1, 1, 1])
    np.testing.assert_allclose(a.min_p, [0.1, 0, 0, 0, 0])
    np.testing.assert_array_equal(a.seed, [[0x12345678, 0x9ABCDEF0], [0, 0], [0, 5], [0, 0],
                                           [0, 0]])
    np.testing.assert_array_equal(a.position, [11, 0, 2, 0, 0])
    np.testing.assert_allclose(a.presence, [0.2, 0, 0, 0, 0])
    np.testing.assert_allclose(a.frequency, [-0.3, 0, 0, 0, 0])
    np.testing.assert_allclose(a.repetition, [1.2, 1, 1, 1, 1])
    np.testing.assert_array_equal(a.penalty_slot, [2, -1, -1, -1, -1])
    np.testing.assert_array_equal(a.banned, [[4, 9, -1]] + [[-1] * 3] * 4)
    np.testing.assert_array_equal(a.target, [3, -1, -1, -1, -1])
    np.testing.assert_array_equal(a.want_top, [True, False, False, False, False])
    dtypes = {k: v.dtype for k, v in vars(a).items()}
    assert dtypes["seed"] == np.uint32 and a.seed.shape == (5, 2) and dtypes["want_top"] == bool
    assert dtypes["temperature"] == np.float32 and dtypes["banned"] == np.int32
    with pytest.raises(ValueError, match="ban_width"):
        SamplingArrays.from_rows([Row(p, 0, 0, banned=(1, 2, 3, 4))], 5, 3)
    with pytest.raises(ValueError, match="do not fit"):
        SamplingArrays.from_rows([None] * 6, 5, 3)


# ----------------------------------------------------------------------------
# Device: greedy, banned ids, logprobs


def test_all_greedy_batch_takes_the_argmax_and_skips_top_n():
    logits = random_logits(np.random.default_rng(0))
    rows = [Row(SamplingParams(temperature=0.0), seed=i, position=i) for i in range(R - 3)]
    out, _ = run(rows, logits)  # the last 3 rows are padding, also greedy
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    np.testing.assert_allclose(out.logprobs, np_log_softmax(logits).max(-1), rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == out.top_logprobs.shape == (R, MAX_LOGPROBS)
    assert not out.top_ids.any() and not out.top_logprobs.any()


def test_banned_ids_are_never_picked():
    rng = np.random.default_rng(1)
    banned = (5, 6, 20, 31)
    logits = random_logits(rng)
    logits[:, list(banned)] += 10.0  # the banned ids would otherwise win almost always
    seen = set()
    for step in range(8):
        rows = [Row(SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0, top_k=3 * (i % 2)),
                    seed=i, position=step, banned=banned) for i in range(R)]
        out, _ = run(rows, logits)
        seen.update(out.tokens.tolist())
        allowed = np.where(np.isin(np.arange(V), banned), -np.inf, logits)
        np.testing.assert_array_equal(out.tokens[::4], allowed[::4].argmax(-1))
    assert not seen & set(banned) and len(seen) > 10


def test_logprobs_and_top_n_are_the_raw_log_softmax():
    rng = np.random.default_rng(2)
    logits = random_logits(rng)
    hot = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, presence_penalty=1.0)
    rows = [Row(hot if i % 2 else SamplingParams(temperature=0.0), seed=i, position=3,
                penalty_slot=i % SLOTS, banned=(int(logits[i].argmax()),), want_top=i % 3 == 0,
                target=i % V if i % 5 == 0 else -1) for i in range(R)]
    state = _reset(PenaltyState.zeros(SLOTS, V), 1, jnp.arange(8, dtype=jnp.int32),
                   jnp.zeros(8, bool))
    out, _ = run(rows, logits, state)
    reference = np_log_softmax(logits)  # of the unprocessed logits: penalties, bans, T ignored
    scored = np.where(np.arange(R) % 5 == 0, np.arange(R) % V, out.tokens)
    np.testing.assert_allclose(out.logprobs, reference[np.arange(R), scored], rtol=1e-5, atol=1e-5)
    want = np.arange(R) % 3 == 0
    top_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids[want], top_ids[want])
    np.testing.assert_allclose(out.top_logprobs[want],
                               np.take_along_axis(reference, top_ids, -1)[want], rtol=1e-5,
                               atol=1e-5)
    assert not out.top_ids[~want].any() and not out.top_logprobs[~want].any()


# ----------------------------------------------------------------------------
# Device: penalties


def np_penalize(logits, counts, prompt_mask, repetition, frequency, presence):
    """vLLM's penalties, one token at a time."""
    out = np.array(logits, np.float64)
    for t in range(len(out)):
        if counts[t] > 0 or prompt_mask[t]:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        out[t] -= frequency * counts[t]
        if counts[t] > 0:
            out[t] -= presence
    return out


def padded(tokens, length=12):
    return jnp.array(list(tokens) + [-1] * (length - len(tokens)), jnp.int32)


def test_reset_slot_marks_prompt_and_counts_output():
    state = PenaltyState.zeros(SLOTS, V)
    state = _reset(state, 2, padded([3, 5, 5, 1, 9, 9, 9]),
                   jnp.array([0, 0, 0, 1, 1, 1, 1] + [1] * 5, bool))
    counts, prompt = np.asarray(state.counts), np.asarray(state.prompt_mask)
    assert counts[2].tolist() == np.bincount([1, 9, 9, 9], minlength=V).tolist()
    assert np.flatnonzero(prompt[2]).tolist() == [3, 5]
    assert not counts[[0, 1, 3]].any() and not prompt[[0, 1, 3]].any()
    state = _reset(state, 2, padded([4]), jnp.zeros(12, bool))  # a new sequence takes the slot
    assert not np.asarray(state.counts).any()
    assert np.flatnonzero(np.asarray(state.prompt_mask)[2]).tolist() == [4]


def test_penalties_match_the_numpy_reference_across_recorded_steps():
    rng = np.random.default_rng(3)
    prompts = {0: [1, 2, 3], 1: [3, 5, 5, 7, 30], 2: [0, 31, 4]}
    outputs = {0: [], 1: [5, 9, 9], 2: [12, 12, 12, 2]}  # slot 1, 2: back from preemption
    state = PenaltyState.zeros(SLOTS, V)
    np_counts = np.zeros((SLOTS, V), np.int64)
    np_prompt = np.zeros((SLOTS, V), bool)
    for slot in prompts:
        ids = prompts[slot] + outputs[slot]
        state = _reset(state, slot, padded(ids),
                       jnp.array([False] * len(prompts[slot]) + [True] * (12 - len(prompts[slot]))))
        np_prompt[slot, prompts[slot]] = True
        np.add.at(np_counts[slot], outputs[slot], 1)
    settings = [  # (slot, repetition, frequency, presence, temperature, target)
        (0, 1.3, 0.0, 0.0, 0.0, -1), (1, 0.8, 0.5, -0.7, 0.0, -1), (2, 2.0, -1.5, 2.0, 0.0, -1),
        (1, 1.0, 0.0, 0.0, 0.0, 4),  # a scoring row: penalized but never counted
        (2, 1.5, 0.3, 0.3, 1.0, -1), (0, 1.1, 2.0, 1.0, 1.0, -1),
        (-1, 3.0, 2.0, 2.0, 0.0, -1),  # no slot: its penalty settings are ignored
    ]
    # Row order in the batch is shuffled so slot order and row order differ.
    order = [3, 6, 0, 5, 1, 4, 2]
    for step in range(6):
        logits = random_logits(rng, scale=2.0)
        rows = [None] * R
        for where, (slot, rep, freq, pres, temp, target) in zip(order, settings):
            params = SamplingParams(temperature=temp, repetition_penalty=rep,
                                    frequency_penalty=freq, presence_penalty=pres)
            rows[where] = Row(params, seed=where, position=step, penalty_slot=slot, target=target)
        arrays = SamplingArrays.from_rows(rows, R, B)
        got = np.asarray(_penalize(jnp.asarray(logits), arrays, state))
        out, next_state = run(rows, logits, state)
        for where, (slot, rep, freq, pres, temp, target) in zip(order, settings):
            expected = (logits[where] if slot < 0 else
                        np_penalize(logits[where], np_counts[slot], np_prompt[slot], rep, freq,
                                    pres))
            np.testing.assert_allclose(got[where], expected, rtol=1e-5, atol=1e-5)
            if temp == 0:  # greedy picks the best penalized logit
                assert out.tokens[where] == expected.argmax()
        state = next_state
        for where, (slot, _, _, _, _, target) in zip(order, settings):
            if slot >= 0 and target < 0:
                np_counts[slot, out.tokens[where]] += 1
        np.testing.assert_array_equal(np.asarray(state.counts), np_counts)
        np.testing.assert_array_equal(np.asarray(state.prompt_mask), np_prompt)
    assert np_counts.sum() == 3 + 4 + 6 * 5  # the counts did grow


# ----------------------------------------------------------------------------
# Device: temperature, min_p, top_k, top_p


def np_allowed(logits, temperature, top_k, top_p, min_p):
    """vLLM's cuts in order: min_p, top_k, top_p (smallest best set reaching top_p).
    Also returns the distance of the nearest token to a cut, to refuse borderline cases."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np_softmax(z)
    ratio = probs / probs.max()
    keep = ratio >= min_p
    margin = np.abs(ratio - min_p).min() if min_p > 0 else np.inf
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    mass = 0.0
    for rank, t in enumerate(order):
        if not keep[t]:
            continue
        if rank > 0 and mass >= top_p:
            keep[t] = False
        elif top_p < 1:
            margin = min(margin, abs(mass - top_p))
        mass += probs[t]
    return keep, margin


def draw_many(params, logits_row, calls):
    """calls * R draws from one row of logits, one position each."""
    tokens = []
    logits = np.tile(logits_row, (R, 1))
    for c in range(calls):
        rows = [Row(params, seed=seed_for(params.seed, 0), position=c * R + i) for i in range(R)]
        tokens.append(run(rows, logits)[0].tokens)
    return np.concatenate(tokens)


def assert_follows(draws, expected):
    """Chi-square test of the draws against `expected`; cells with < 5 expected are pooled."""
    counts = np.bincount(draws, minlength=V)
    expected = expected * len(draws)
    assert not counts[expected == 0].any(), "drew a token of probability zero"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df) + 5, (chi2, df)  # p far below 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_follows_the_softmax(temperature):
    logits = np.random.default_rng(4).standard_normal(V).astype(np.float32) * 1.5
    draws = draw_many(SamplingParams(temperature=temperature, seed=42), logits, 40)
    assert_follows(draws, np_softmax(logits / temperature))


@pytest.mark.parametrize("cut", [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2),
                                 dict(top_k=12, top_p=0.8, min_p=0.05),
                                 dict(temperature=2.0, top_k=20, top_p=0.6, min_p=0.1)])
def test_cuts_only_draw_allowed_tokens_in_proportion(cut):
    logits = np.random.default_rng(5).standard_normal(V).astype(np.float32) * 1.5
    params = SamplingParams(**{"temperature": 1.0, "seed": 7, **cut})
    keep, margin = np_allowed(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    assert margin > 1e-3, "borderline case: pick other logits"
    assert 2 <= keep.sum() < V
    draws = draw_many(params, logits, 24)
    assert keep[draws].all()
    probs = np.where(keep, np_softmax(logits / params.temperature), 0.0)
    assert_follows(draws, probs / probs.sum())


def test_many_random_cut_settings_never_leave_the_reference_mask():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, scale=2.0)
    settings = []
    while len(settings) < R:
        s = dict(temperature=float(rng.uniform(0.3, 2.0)), top_k=int(rng.integers(0, 12)),
                 top_p=float(rng.choice([1.0, rng.uniform(0.2, 1.0)])),
                 min_p=float(rng.choice([0.0, rng.uniform(0.0, 0.4)])))
        keep, margin = np_allowed(logits[len(settings)], **s)
        if margin > 1e-4:
            settings.append((SamplingParams(**s), keep))
    for step in range(12):
        rows = [Row(p, seed=i, position=step) for i, (p, _) in enumerate(settings)]
        tokens = run(rows, logits)[0].tokens
        assert all(keep[t] for t, (_, keep) in zip(tokens, settings))


# ----------------------------------------------------------------------------
# Device: batch invariance


def test_seeded_rows_do_not_depend_on_row_index_or_batch_mates():
    rng = np.random.default_rng(7)
    plain = SamplingParams(temperature=0.9, seed=11)  # needs no sort, no penalties
    fancy = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.02, seed=-5,
                           repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
    probe_logits = random_logits(rng, rows=2)
    state = _reset(PenaltyState.zeros(SLOTS, V), 2, padded([1, 2, 3, 4, 4]),
                   jnp.array([0, 0, 1, 1, 1] + [0] * 7, bool))
    state = _reset(state, 0, padded([7, 8, 9]), jnp.array([1] * 12, bool))
    mate_params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.2, top_k=3),
                   SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=2.0),
                   SamplingParams(temperature=0.0, frequency_penalty=1.0)]

    def probes(position):
        return (Row(plain, seed_for(plain.seed, 0), position),
                Row(fancy, seed_for(fancy.seed, 0), position, penalty_slot=2, banned=(5,),
                    want_top=True))

    def crowded(position):  # probes at rows 5 and 40, mates with every feature
        logits = random_logits(rng)
        rows = [Row(mate_params[i % 4], seed=i, position=i, penalty_slot=i % 2 - 1 + (i % 4 == 3),
                    banned=(i % V,), want_top=i % 3 == 0) for i in range(R)]
        rows[5], rows[40] = probes(position)
        logits[5], logits[40] = probe_logits
        out, _ = run(rows, logits, state)
        return [(out.tokens[i], out.logprobs[i], out.top_ids[i], out.top_logprobs[i])
                for i in (5, 40)]

    def alone(position, which, num_rows, full):  # one probe, the rest padding, other row index
        rows = [None] * num_rows
        rows[-1] = probes(position)[which]
        logits = np.zeros((num_rows, V), np.float32)
        logits[-1] = probe_logits[which]
        out, _ = run(rows, logits, state, num_rows=num_rows, full=full)
        return out.tokens[-1], out.logprobs[-1], out.top_ids[-1], out.top_logprobs[-1]

    differs = 0
    for position in range(12):
        together = crowded(position)
        for which in (0, 1):
            # The plain probe also alone in the sampler variant its own rows would get.
            for num_rows, full in ((R, True), (8, True)) + (((8, False),) if which == 0 else ()):
                got = alone(position, which, num_rows, full)
                for a, b in zip(together[which], got):
                    np.testing.assert_array_equal(a, b)
        differs += together[0][0] != together[1][0]
    assert differs  # the probes really sample


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, nested ones included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_nothing_branches_on_the_device_and_plain_never_ranks_the_vocabulary():
    # A device-side branch makes the GPU host wait for the whole forward pass.
    arrays = SamplingArrays.from_rows([], R, B)
    for full in (False, True):
        jaxpr = jax.make_jaxpr(lambda *a: sample(*a, full=full))(
            jnp.zeros((R, V)), arrays, PenaltyState.zeros(SLOTS, V)).jaxpr
        used = _primitives(jaxpr)
        assert not used & {"cond", "while"}, used
        assert bool(used & {"sort", "top_k"}) == full, used


def test_needs_full_only_for_a_sampled_cut_or_top_n():
    def needs(**kw):
        want_top = kw.pop("want_top", False)
        return SamplingArrays.from_rows([Row(SamplingParams(**kw), 0, 0, want_top=want_top)], R, B).needs_full()

    assert not needs(temperature=0.8, min_p=0.1, repetition_penalty=1.2)
    assert not needs(temperature=0.0, top_k=5, top_p=0.5)  # a greedy row ignores its cut
    assert needs(temperature=0.8, top_k=5)
    assert needs(temperature=0.8, top_p=0.9)
    assert needs(temperature=0.0, want_top=True)
    assert not SamplingArrays.from_rows([], R, B).needs_full()


def test_plain_variant_equals_full_for_rows_that_need_neither_part():
    rng = np.random.default_rng(3)
    state = _reset(PenaltyState.zeros(SLOTS, V), 1, padded([1, 2, 3, 4, 4]),
                   jnp.array([0, 0, 1, 1, 1] + [0] * 7, bool))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=4),
              SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.7, repetition_penalty=1.5, presence_penalty=0.4)]
    rows = [Row(params[i % 5], seed=i * 7, position=i, penalty_slot=1 if i % 3 == 0 else -1,
                banned=(i % V,), target=i % V if i % 11 == 0 else -1) for i in range(R)]
    assert not SamplingArrays.from_rows(rows, R, B).needs_full()
    logits = random_logits(rng)
    plain, plain_state = run(rows, logits, state, full=False)
    full, full_state = run(rows, logits, state, full=True)
    np.testing.assert_array_equal(plain.tokens, full.tokens)
    np.testing.assert_array_equal(plain.logprobs, full.logprobs)
    np.testing.assert_array_equal(plain_state.counts, full_state.counts)
    assert len(set(plain.tokens.tolist())) > 5  # the rows really differ


def test_first_argmax_is_jnp_argmax_and_the_draw_is_jax_categorical():
    """The sampler's own argmax (two plain reductions) picks what jnp.argmax picks, ties, NaN and all -inf
    included, and its Gumbel draw is jax.random.categorical's, key for key."""
    from jaxinfer.runner.sampler import first_argmax

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((5, 1000)), rng.integers(0, 3, (64, 300)), np.full((2, 7), -np.inf),
             np.array([[1, 3, 3, 2], [np.nan, 1, np.nan, 5], [0, 0, 0, 0], [-np.inf, 2, np.inf, np.inf]])]
    for case in cases:
        x = jnp.asarray(case, jnp.float32)
        np.testing.assert_array_equal(first_argmax(x), jnp.argmax(x, axis=-1))
    logits = jnp.asarray(rng.standard_normal(4000), jnp.float32)
    for seed in range(20):
        key = jax.random.key(seed)
        noise = jax.random.gumbel(key, logits.shape, logits.dtype)
        assert int(first_argmax(logits + noise)) == int(jax.random.categorical(key, logits))
