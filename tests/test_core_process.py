"""The engine core in a process of its own gives what the in-process core gives: the
same tokens, text, logprobs and finish reasons, streamed or not, with aborts, stop
strings, n > 1 and bad requests; and a core that dies is named, not waited on."""

import functools

import numpy as np
import pytest

from engine_fixtures import random_prompts, tiny_core, tiny_llm
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.engine.driver import EngineDriver
from jaxinfer.engine.engine import Engine
from jaxinfer.errors import InputError


@pytest.fixture(scope="module")
def local(data_dir):
    return tiny_llm(data_dir).engine


@pytest.fixture(scope="module")
def remote(data_dir):
    engine = Engine.with_core_process(functools.partial(tiny_core, str(data_dir)))
    yield engine
    engine.close()


def workload():
    rng = np.random.default_rng(7)
    prompts = random_prompts(rng, 24, 1, 50)
    params = []
    for i, _ in enumerate(prompts):
        kind = i % 6
        params.append(SamplingParams(
            max_tokens=int(rng.integers(1, 20)), temperature=0.0 if kind < 2 else 0.8, seed=i, ignore_eos=True,
            n=2 if kind == 2 else 1, logprobs=2 if kind == 3 else None, prompt_logprobs=1 if kind == 4 else None,
            stop=["a"] if kind == 5 else None))
    return prompts, params


def run(engine, prompts, params, stream=False):
    finals, streamed = {}, {}
    with EngineDriver(engine) as driver:
        def feed():
            for i, (p, sp) in enumerate(zip(prompts, params)):
                driver.add(f"w{i}", p, sp, tag=i, stream=stream)
                yield
        for out, i in driver.run(feed()):
            if out.finished:
                finals[i] = out
            else:
                streamed.setdefault(i, []).append(out)
    return finals, streamed


def summary(out):
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason,
             None if o.logprobs is None else [sorted(e) for e in o.logprobs]) for o in out.outputs]


def test_a_core_process_gives_what_the_in_process_core_gives(local, remote):
    prompts, params = workload()
    expected, _ = run(local, prompts, params)
    got, streamed = run(remote, prompts, params, stream=True)
    assert sorted(got) == sorted(expected) == list(range(len(prompts)))
    for i in expected:
        assert summary(got[i]) == summary(expected[i]), f"request {i}"
        if params[i].prompt_logprobs is not None:
            assert [None if e is None else sorted(e) for e in got[i].prompt_logprobs] == \
                   [None if e is None else sorted(e) for e in expected[i].prompt_logprobs]
        for out in streamed.get(i, []):  # each streamed output is a prefix of the final one
            for o, final in zip(out.outputs, got[i].outputs):
                assert list(o.token_ids) == final.token_ids[:len(o.token_ids)]
    assert not remote.has_unfinished()


def test_aborts_and_bad_requests_leave_the_others_whole(local, remote):
    prompts, params = workload()
    expected, _ = run(local, prompts[:6], params[:6])
    with pytest.raises(InputError, match="vocabulary"):
        remote.add_request("bad", [10**6], params[0])
    remote.add_request("gone", prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    assert remote.abort("gone")
    got, _ = run(remote, prompts[:6], params[:6])
    for i in expected:
        assert summary(got[i]) == summary(expected[i]), f"request {i}"
    assert not remote.has_unfinished() and not remote.requests


def test_a_core_that_cannot_start_is_named():
    with pytest.raises(RuntimeError, match="did not start|core failed"):
        Engine.with_core_process(functools.partial(tiny_core, "/nonexistent"))


def test_a_core_step_crosses_as_bytes_unchanged():
    from jaxinfer.engine.engine_core import CoreStep

    rng = np.random.default_rng(3)
    k = 5
    plain = CoreStep(np.arange(k, dtype=np.int64) * 7, rng.integers(0, 100, k).astype(np.int32),
                     rng.standard_normal(k).astype(np.float32), np.array([0, 1, 0, 0, 1], bool), {7: ("stop", 3)},
                     None, None, [], [("r1", 1.5, 16)], [14], 123.25)
    top = CoreStep(plain.seq_ids, plain.tokens, plain.logprobs, np.zeros(k, bool), {},
                   rng.integers(0, 9, (k, 3)).astype(np.int32), rng.standard_normal((k, 3)).astype(np.float32),
                   [("r2", 4, np.array([-1.0, -2.0], np.float32), None, None)], [], [], 9.0)
    bare = CoreStep(plain.seq_ids[:0], plain.tokens[:0], plain.logprobs[:0], plain.finished[:0], {}, None, None,
                    [], [], [], 1.0)
    for step in (plain, top, bare):
        back = CoreStep.decode(step.encode())
        for name in ("seq_ids", "tokens", "logprobs", "finished", "top_ids", "top_logprobs"):
            a, b = getattr(step, name), getattr(back, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), name
        assert (back.finish, back.scheduled, back.preempted, back.time) == \
               (step.finish, step.scheduled, step.preempted, step.time)
        assert [(r, f, list(lp)) for r, f, lp, *_ in back.prompt_scores] == \
               [(r, f, list(lp)) for r, f, lp, *_ in step.prompt_scores]


def test_llm_with_a_core_process_generates_what_the_in_process_llm_does(data_dir, local):
    from engine_fixtures import SMALL
    from jaxinfer.llm import LLM

    prompts = random_prompts(np.random.default_rng(5), 6, 1, 40)
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=11, ignore_eos=True)
    llm = LLM(str(data_dir / "hf_tiny" / "llama_gqa"), dtype="float32", core_process=True, progress=False,
              **{**SMALL, "num_pages": 400})
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.close()
    expected = []
    for p in prompts:
        local.add_request(f"x{len(expected)}", p, params)
        while local.has_unfinished():
            expected += [o.outputs[0].token_ids for o in local.step() if o.finished]
    assert got == expected
