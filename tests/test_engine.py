"""The engine against single-request runs: batching, prefix caching, preemption,
aborts and seeded sampling never change a request's output; nothing compiles
after warm-up; bad requests are refused without disturbing the rest."""

import logging
import time

import jax
import numpy as np
import pytest

from engine_fixtures import random_prompts, run_alone, run_arriving, tiny_llm
from jaxinfer.runner import compilations
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import InputError


@pytest.fixture(scope="module")
def llm(data_dir):
    return tiny_llm(data_dir)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def tokens(out):
    return [o.token_ids for o in out.outputs]


def test_greedy_outputs_of_64_requests_arriving_at_random_steps_equal_single_runs(llm):
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 64)
    params = [greedy(int(rng.integers(1, 25))) for _ in prompts]
    outputs, _ = run_arriving(llm, prompts, params, rng)
    assert len(outputs) == 64
    for i, (p, sp) in enumerate(zip(prompts, params)):
        alone = run_alone(llm, p, sp)
        assert tokens(outputs[i]) == tokens(alone), f"request {i}"
        assert len(outputs[i].outputs[0].token_ids) == sp.max_tokens
        assert outputs[i].outputs[0].finish_reason == "length"
    assert llm.engine.scheduler.pool.num_used_pages == 0


def test_on_the_cpu_a_lone_sequence_decodes_in_one_row_steps_with_the_two_row_steps_tokens(llm, data_dir):
    # EngineConfig.min_decode_rows: resolved per platform by the engine (one row on the CPU, two on a GPU).
    assert llm.engine.config.min_decode_rows == 1
    assert llm.engine.config.decode_buckets()[0] == 1
    two = tiny_llm(data_dir, min_decode_rows=2)
    assert two.engine.config.decode_buckets()[0] == 2
    rng = np.random.default_rng(3)
    for p in random_prompts(rng, 3):
        assert tokens(run_alone(llm, p, greedy(12))) == tokens(run_alone(two, p, greedy(12)))


def test_seeded_sampling_does_not_depend_on_batch_mates(llm):
    rng = np.random.default_rng(1)
    target = random_prompts(rng, 1)[0]
    sp = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, top_k=40, seed=1234, n=2,
                        ignore_eos=True)
    alone = tokens(run_alone(llm, target, sp))
    others = random_prompts(rng, 12)
    other_params = [SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=1.0,
                                   seed=int(rng.integers(100)), presence_penalty=0.5,
                                   ignore_eos=True) for _ in others]
    outs = llm.generate(others[:5] + [target] + others[5:], other_params[:5] + [sp] + other_params[5:],
                        use_tqdm=False)
    assert tokens(outs[5]) == alone
    assert alone[0] != alone[1]  # the two samples draw differently
    other_seed = tokens(run_alone(llm, target, SamplingParams(**{**sp.__dict__, "seed": 99})))
    assert other_seed != alone


def test_prefix_cache_prefills_a_shared_system_prompt_once_and_changes_no_output(llm, data_dir):
    rng = np.random.default_rng(2)
    system = rng.integers(3, 256, 48).tolist()  # 12 full pages
    prompts = [system + s for s in random_prompts(rng, 16, 1, 10)]
    params = [greedy(int(rng.integers(1, 12))) for _ in prompts]
    pool = llm.engine.scheduler.pool
    hits_before = pool.prefix_hit_tokens
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # the first prefills the system prompt
    cached = llm.generate(prompts, params, use_tqdm=False)
    hit = pool.prefix_hit_tokens - hits_before
    assert hit >= 16 * 48  # every request found the 12 pages already there
    assert all(out.num_cached_tokens >= 48 for out in cached)

    plain = tiny_llm(data_dir, enable_prefix_caching=False)
    uncached = plain.generate(prompts, params, use_tqdm=False)
    assert [tokens(o) for o in cached] == [tokens(o) for o in uncached]
    assert plain.engine.scheduler.pool.prefix_hit_tokens == 0


def test_a_small_kv_pool_preempts_yet_every_output_is_unchanged_and_every_page_comes_back(llm, data_dir):
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 24, 10, 40)
    params = [greedy(int(rng.integers(10, 40)), **({"repetition_penalty": 1.3} if i % 3 == 0 else {}))
              for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=30, temperature=0.9, seed=7, n=3, ignore_eos=True)
    expected = llm.generate(prompts, params, use_tqdm=False)

    small = tiny_llm(data_dir, num_pages=30)  # 29 pages of 4 tokens: a few requests at a time
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [tokens(o) for o in got] == [tokens(o) for o in expected]
    pool = small.engine.scheduler.pool
    assert pool.num_used_pages == 0 and pool.num_free_pages == pool.num_pages - 1
    pool.check()

    # Aborts at random points: the rest are unharmed, every page comes back.
    outputs, aborted = run_arriving(small, prompts, params, rng, arrive_prob=0.5, abort_prob=0.05)
    assert aborted and len(outputs) + len(aborted) >= len(prompts) - 0
    for i, out in outputs.items():
        assert tokens(out) == tokens(expected[i]), f"request {i}"
    assert pool.num_used_pages == 0
    assert len(small.engine.scheduler.free_slots) == small.engine.config.max_num_seqs
    assert not small.engine.requests


def test_the_launch_thread_changes_no_output_and_a_failed_launch_raises_from_the_next_step(llm, data_dir):
    # GPUs launch each step from a thread of its own; here on the CPU it is switched on by hand.
    rng = np.random.default_rng(8)
    prompts = random_prompts(rng, 20, 10, 40)
    params = [greedy(int(rng.integers(5, 30)), **({"repetition_penalty": 1.3} if i % 3 == 0 else {}))
              for i in range(len(prompts))]
    params[2] = SamplingParams(max_tokens=25, temperature=0.9, seed=5, n=3, ignore_eos=True)  # page copies
    inline = tiny_llm(data_dir, num_pages=40)  # small: preemptions too
    assert not inline.engine.core.launch_thread
    expected = inline.generate(prompts, params, use_tqdm=False)

    threaded = tiny_llm(data_dir, num_pages=40)
    threaded.engine.core.launch_thread = True
    got = threaded.generate(prompts, params, use_tqdm=False)
    assert threaded.engine.core._launcher is not None  # the steps went through it
    assert threaded.engine.scheduler.num_preemptions > 0
    assert [tokens(o) for o in got] == [tokens(o) for o in expected]

    runner = threaded.engine.runner
    real_step = runner.step

    def failing(inputs):
        raise RuntimeError("device lost")

    threaded.engine.add_request("doomed", prompts[0], greedy(5))
    runner.step = failing
    try:
        threaded.engine.step()  # launched on the thread: the failure surfaces when read back
        with pytest.raises(RuntimeError, match="device lost"):
            threaded.engine.step()
    finally:
        runner.step = real_step


def test_nothing_compiles_after_warm_up_across_a_randomized_workload(llm, caplog):
    rng = np.random.default_rng(4)
    before = compilations.count()
    prompts = random_prompts(rng, 40, 1, 100)
    params = []
    for _ in prompts:
        kind = rng.integers(6)
        params.append(SamplingParams(
            max_tokens=int(rng.integers(1, 30)), temperature=[0.0, 0.7, 1.2][int(rng.integers(3))],
            top_k=int(rng.integers(0, 50)), top_p=float(rng.uniform(0.5, 1.0)),
            min_p=float(rng.uniform(0, 0.1)), seed=int(rng.integers(1000)),
            n=int(rng.integers(1, 4)), min_tokens=int(rng.integers(0, 3)),
            presence_penalty=0.5 if kind == 1 else 0.0, frequency_penalty=0.3 if kind == 2 else 0.0,
            repetition_penalty=1.2 if kind == 3 else 1.0,
            logprobs=int(rng.integers(0, 5)) if kind == 4 else None,
            prompt_logprobs=int(rng.integers(0, 3)) if kind == 5 else None,
            stop=["ab"] if kind == 0 else None, stop_token_ids=[5, 6]))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        outputs, _ = run_arriving(llm, prompts, params, rng, abort_prob=0.02)
    assert len(outputs) > 30
    compiled = [r.getMessage()[:200] for r in caplog.records if "ompil" in r.getMessage()]
    assert compilations.count() == before, compiled  # names what compiled, if anything did


def test_bad_requests_are_refused_by_name_and_the_others_keep_running(llm):
    engine = llm.engine
    rng = np.random.default_rng(5)
    good = random_prompts(rng, 6)
    params = greedy(12)
    expected = [tokens(run_alone(llm, p, params)) for p in good]
    for i, p in enumerate(good[:3]):
        engine.add_request(f"g{i}", p, params)
    engine.step()
    bad = [
        ([1] * 200, params, "context holds 128"),  # longer than the context
        ([5, 300], params, "token id 300 is outside the vocabulary"),
        ([5, -1], params, "outside the vocabulary"),
        ([], params, "empty"),
        ("text", params, "not a string"),
        ([1.5, 2], params, "integers"),
        ([5], {"temperature": 1}, "SamplingParams"),
        ([5], SamplingParams(stop_token_ids=[999]), "stop_token_ids"),
        ([5], SamplingParams(n=100), "max_num_seqs"),
    ]
    for i, (prompt, p, message) in enumerate(bad):
        with pytest.raises(InputError, match=message):
            engine.add_request(f"b{i}", prompt, p)
        engine.step()
    with pytest.raises(InputError, match="already in use"):
        engine.add_request("g0", good[0], params)
    for i, p in enumerate(good[3:], 3):
        engine.add_request(f"g{i}", p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    assert sorted(done) == [f"g{i}" for i in range(6)]
    assert [tokens(done[f"g{i}"]) for i in range(6)] == expected


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(n=0), dict(max_tokens=0),
    dict(stop=["x"] * 17), dict(stop=[""]), dict(stop_token_ids=list(range(65))), dict(min_p=2.0),
    dict(logprobs=21), dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
])
def test_invalid_sampling_parameters_are_refused(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_metrics_record_latencies_cache_hits_and_utilization(llm):
    m = llm.engine.metrics
    before = len(m.ttft)
    rng = np.random.default_rng(6)
    shared = rng.integers(3, 256, 16).tolist()
    llm.generate([shared + [7]], greedy(2), use_tqdm=False)
    started = time.monotonic()
    llm.generate([shared + p for p in random_prompts(rng, 5)], greedy(5), use_tqdm=False)
    wall = time.monotonic() - started
    assert len(m.ttft) == before + 6 and len(m.queue_time) >= 5 and len(m.tpot) >= 5
    assert all(0 < t <= wall for t in list(m.ttft)[-5:])  # each first token came within the call
    assert m.requests["length"] >= 5 and m.generation_tokens >= 25
    assert llm.engine.kv_usage == 0  # idle: cached pages are evictable, none is held
    stats = llm.engine.stats()
    assert stats["time_to_first_token"]["p50"] > 0 and stats["running"] == 0
    assert stats["prefix_cache_hit_tokens"] > 0 and 0 < stats["prefix_cache_hit_rate"] <= 1
    assert stats["preemptions"] == 0 and stats["requests"]["length"] >= 5


def test_a_background_warm_up_serves_at_once_and_changes_no_output(data_dir, llm):
    warming = tiny_llm(data_dir, warmup=False)
    warming.engine.warmup(background=True)  # one shape made; the rest on a thread
    rng = np.random.default_rng(9)
    prompts = random_prompts(rng, 6, 1, 100)
    got = warming.generate(prompts, greedy(8), use_tqdm=False)
    want = llm.generate(prompts, greedy(8), use_tqdm=False)
    assert [tokens(o) for o in got] == [tokens(o) for o in want]
    warming.engine.wait_for_warmup()
    assert warming.engine.scheduler.ready_shapes is None  # every shape made: full sizes again
    before = compilations.count()
    warming.generate(prompts, greedy(8), use_tqdm=False)
    assert compilations.count() == before


def test_a_closed_engine_lets_go_of_its_device_state_and_refuses_new_requests(data_dir):
    """close() (or leaving `with LLM(...)`) frees the weights, the KV cache and the compiled steps at once,
    and a request after it is refused by name."""
    import gc
    import weakref

    with tiny_llm(data_dir, max_num_seqs=2, max_num_batched_tokens=16) as closing:
        assert tokens(run_alone(closing, [5, 6, 7], greedy(3)))
        runner = closing.engine.core.runner
        held = [weakref.ref(x) for x in jax.tree.leaves(runner.cache)]
        assert runner._executables
    assert runner._executables == {} and runner.cache is None and runner.state is None
    gc.collect()
    assert all(ref() is None for ref in held)
    with pytest.raises(RuntimeError, match="closed"):
        closing.generate([[5, 6, 7]], greedy(3), use_tqdm=False)
