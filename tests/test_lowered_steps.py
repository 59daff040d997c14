"""Step shapes are kept lowered on disk (compilations.load_or_compile): a second engine of the
same configuration traces nothing at warm-up and generates the same tokens; a damaged file is
traced again, with a warning."""

import logging

from engine_fixtures import tiny_llm
from jaxinfer.runner import compilations
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.runner.model_runner import ModelRunner

CONFIG = dict(decode_sizes=(8,), prefill_sizes=(16,), max_num_seqs=8)  # 2 shapes, unlike other tests'
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def traced_steps(monkeypatch) -> list:
    """Names of the step functions traced: the forward pass per shape, the sampler per variant."""
    calls = []
    for name in ("_forward_step_fn", "_sample_fn"):
        real = getattr(ModelRunner, name)

        def counting(self, *args, real=real, name=name, **kwargs):
            calls.append(name)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(ModelRunner, name, counting)
    return calls


def test_a_second_engine_loads_its_steps_instead_of_tracing_them(data_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(compilations, "_lowered_dir", lambda: tmp_path)
    calls = traced_steps(monkeypatch)
    first = tiny_llm(data_dir, **CONFIG)
    want = first.generate([[5, 6, 7], [9] * 20], GREEDY, use_tqdm=False)
    # Traced and kept once each: the forward pass per shape, the sampler in both variants per row count.
    assert calls.count("_forward_step_fn") == 2 and calls.count("_sample_fn") % 2 == 0
    assert len(list(tmp_path.glob("*.bin"))) == len(calls)
    calls.clear()
    second = tiny_llm(data_dir, **CONFIG)
    assert calls == []  # both shapes came from disk
    got = second.generate([[5, 6, 7], [9] * 20], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_a_damaged_lowered_step_is_traced_again(data_dir, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(compilations, "_lowered_dir", lambda: tmp_path)
    want = tiny_llm(data_dir, **CONFIG).generate([[3, 4]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for path in tmp_path.glob("*.bin"):
        path.write_bytes(b"not a lowered step")
    calls = traced_steps(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="jaxinfer.runner.compilations"):
        llm = tiny_llm(data_dir, **CONFIG)
    assert calls and "tracing it again" in caplog.text
    assert llm.generate([[3, 4]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
