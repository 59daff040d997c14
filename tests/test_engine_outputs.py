"""What a request gets back: stops (strings, token ids, end of text), min and max
tokens, logprobs of sampled and prompt tokens, n > 1, the prompt forms of the
offline API, and streaming. Tiny model, byte tokenizer (one token per byte)."""

import math

import numpy as np
import pytest

from engine_fixtures import random_prompts, tiny_llm
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import InputError


@pytest.fixture(scope="module")
def llm(data_dir):
    return tiny_llm(data_dir)


def greedy(**kw):
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, **kw})


def one(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_max_tokens_and_the_context_end_cut_with_reason_length(llm):
    out = one(llm, [5, 6, 7], greedy(max_tokens=9)).outputs[0]
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    long = one(llm, list(range(3, 123)), greedy(max_tokens=None)).outputs[0]  # context is 128
    assert len(long.token_ids) == 8 and long.finish_reason == "length"


def test_a_stop_token_ends_the_output_and_is_reported(llm):
    base = one(llm, [9, 10, 11], greedy()).outputs[0].token_ids
    stop = base[5]
    out = one(llm, [9, 10, 11], greedy(stop_token_ids=[stop])).outputs[0]
    assert out.token_ids == base[:base.index(stop) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_the_end_of_text_token_stops_unless_ignored(llm):
    prompt = [40, 41, 42]
    base = one(llm, prompt, greedy(max_tokens=40)).outputs[0].token_ids
    eos = base[3]
    llm.engine.eos_token_ids = frozenset({eos})  # as if this were the model's end token
    try:
        out = one(llm, prompt, greedy(max_tokens=40, ignore_eos=False)).outputs[0]
    finally:
        llm.engine.eos_token_ids = frozenset({2})
    assert out.token_ids == base[:base.index(eos) + 1] and out.finish_reason == "stop"
    assert out.stop_reason is None


def test_min_tokens_holds_back_stop_tokens(llm):
    prompt = [9, 10, 11]
    base = one(llm, prompt, greedy()).outputs[0].token_ids
    stop = base[0]
    out = one(llm, prompt, greedy(stop_token_ids=[stop], min_tokens=4)).outputs[0]
    assert len(out.token_ids) >= 5
    assert stop not in out.token_ids[:4]


def test_a_stop_string_cuts_the_text_before_it(llm):
    prompt = "The quick brown fox"
    full = one(llm, prompt, greedy(max_tokens=30)).outputs[0]
    assert len(full.token_ids) == 30
    # The byte tokenizer gives one character per token for ASCII; pick a span of the output.
    ascii_at = [i for i in range(3, 30) if 32 <= full.token_ids[i] < 127]
    if not ascii_at:
        pytest.skip("the tiny model produced no printable byte")
    i = ascii_at[0]
    stop = chr(full.token_ids[i])
    first = full.text.index(stop)
    out = one(llm, prompt, greedy(max_tokens=30, stop=[stop, "never-there"])).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:first]
    kept = one(llm, prompt, greedy(max_tokens=30, stop=[stop], include_stop_str_in_output=True)).outputs[0]
    assert kept.text == full.text[:first + 1]


def test_logprobs_of_sampled_tokens_are_consistent_with_the_prompt_logprobs_of_the_same_text(llm):
    prompt = [20, 21, 22, 23, 24]
    gen = one(llm, prompt, greedy(max_tokens=10, logprobs=3)).outputs[0]
    assert len(gen.logprobs) == 10
    for token, entry in zip(gen.token_ids, gen.logprobs):
        top1 = min(entry.values(), key=lambda lp: lp.rank or 99)
        assert top1.rank == 1 and entry[token].logprob == pytest.approx(top1.logprob)  # greedy
        assert all(lp.logprob <= 0 for lp in entry.values())
        assert sum(math.exp(lp.logprob) for lp in entry.values() if lp.rank) <= 1 + 1e-5
    assert gen.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(gen.token_ids, gen.logprobs)),
                                                   abs=1e-4)
    # Scoring prompt + generation as a prompt (prefill logits) gives the decode-time logprobs.
    scored = one(llm, prompt + gen.token_ids, greedy(max_tokens=1, prompt_logprobs=2))
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(prompt) + 10
    for j, token in enumerate(gen.token_ids):
        entry = scored.prompt_logprobs[len(prompt) + j]
        assert entry[token].logprob == pytest.approx(gen.logprobs[j][token].logprob, abs=1e-4)


def test_prompt_logprobs_cover_a_prompt_longer_than_one_step(llm):
    prompt = random_prompts(np.random.default_rng(0), 1, 100, 101)[0]  # > 32 rows per step
    out = one(llm, prompt, greedy(max_tokens=2, prompt_logprobs=0))
    assert len(out.prompt_logprobs) == 100
    assert all(set(e) == {prompt[i]} for i, e in enumerate(out.prompt_logprobs) if i)


def test_n_greedy_samples_agree_and_seeded_samples_repeat(llm):
    out = one(llm, [7, 8, 9, 10, 11], greedy(n=3, max_tokens=8))
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    sampled = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    a, b = one(llm, [7, 8, 9, 10, 11], sampled), one(llm, [7, 8, 9, 10, 11], sampled)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_prompts_may_be_text_token_ids_dicts_or_chats(llm):
    p = greedy(max_tokens=4)
    ids = llm.tokenizer.encode("hello")
    outs = llm.generate(["hello", ids, {"prompt": "hello"}, {"prompt_token_ids": ids}], p, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].prompt == "hello" and outs[0].prompt_token_ids == ids
    chat = llm.chat([{"role": "user", "content": "hi"}], p, use_tqdm=False)[0]
    assert "<|im_start|>user\nhi<|im_end|>" in chat.prompt
    assert llm.generate([], p, use_tqdm=False) == []


def test_a_bad_prompt_in_a_list_is_named_and_nothing_runs(llm):
    steps = llm.engine.metrics.steps
    with pytest.raises(InputError, match="prompt 1: .*empty"):
        llm.generate(["fine", "", "also fine"], greedy(), use_tqdm=False)
    with pytest.raises(InputError, match="prompt 0: .*outside the vocabulary"):
        llm.generate([[1, 999]], greedy(), use_tqdm=False)
    with pytest.raises(InputError, match="2 prompts but 1"):
        llm.generate(["a", "b"], [greedy()], use_tqdm=False)
    assert llm.engine.metrics.steps == steps


def test_streaming_yields_growing_text_that_ends_in_the_full_output(llm):
    p = greedy(max_tokens=12)
    texts = [o.outputs[0].text for o in llm.stream("stream me", p)]
    assert len(texts) >= 2 and all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == one(llm, "stream me", p).outputs[0].text
    assert not llm.engine.has_unfinished()


def test_stream_interval_streams_every_n_tokens_and_always_the_first_and_the_last(llm):
    p = greedy(max_tokens=13)
    every = [len(o.outputs[0].token_ids) for o in llm.stream("stream me", p)]
    assert every == list(range(1, 14))
    llm.engine.outputs.stream_interval = 4  # as EngineConfig(stream_interval=4) sets it
    try:
        outs = list(llm.stream("stream me", p))
        pair = list(llm.stream("stream me", greedy(max_tokens=13, n=2, temperature=0.8, seed=3)))
    finally:
        llm.engine.outputs.stream_interval = 1
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5, 9, 13]
    assert outs[-1].finished and outs[-1].outputs[0].text == one(llm, "stream me", p).outputs[0].text
    assert 2 <= len(pair) <= 13 // 4 + 3 and pair[-1].finished  # n > 1: fewer outputs too
    assert all(len(o.token_ids) == 13 for o in pair[-1].outputs)


def test_stream_interval_is_validated():
    from jaxinfer.core.config import EngineConfig
    from jaxinfer.errors import ConfigError

    with pytest.raises(ConfigError, match="stream_interval"):
        EngineConfig(stream_interval=0)
