"""The engine on a mixture-of-experts family with MLA (DeepSeek-V3's latent cache and experts; Qwen3-MoE
and Mixtral share its MoE block and llama.py's attention, covered by test_hf_logits and test_engine): greedy
output equals HF transformers' greedy continuation, and batching, chunked prefill, prefix caching and
preemption change no request's output."""

import dataclasses

import numpy as np
import pytest

from engine_fixtures import SMALL, random_prompts, run_alone, run_arriving, tiny_model
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.llm import LLM


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens(out):
    return [o.token_ids for o in out.outputs]


@pytest.mark.parametrize("name", ["deepseek_v3"])
def test_the_engine_on_an_moe_family_decodes_as_hf_and_as_single_runs(data_dir, name):
    model = tiny_model(data_dir, name)
    # max_num_batched_tokens 16: the 21-token prompt is prefilled in chunks
    llm = LLM.from_loaded(model, **{**SMALL, "max_num_batched_tokens": 16, "num_pages": 400})
    ref = np.load(data_dir / "hf_tiny" / name / "reference.npz")
    for i in range(2):
        got = run_alone(llm, ref[f"prompt_{i}"].tolist(), greedy(len(ref[f"generated_{i}"])))
        assert tokens(got)[0] == ref[f"generated_{i}"].tolist()

    rng = np.random.default_rng(0)
    system = rng.integers(3, 256, 24).tolist()  # 6 full pages shared by half of the prompts
    prompts = random_prompts(rng, 20, 2, 40)
    prompts = [system + p if i % 2 else p for i, p in enumerate(prompts)]
    params = [greedy(int(rng.integers(4, 20))) for _ in prompts]
    outputs, _ = run_arriving(llm, prompts, params, rng)
    alone = [tokens(run_alone(llm, p, sp)) for p, sp in zip(prompts, params)]
    assert [tokens(outputs[i]) for i in range(len(prompts))] == alone
    assert llm.engine.scheduler.pool.prefix_hit_tokens >= 9 * 24

    # A pool of 29 pages: sequences are preempted and recomputed; no prefix cache to lean on.
    small = LLM.from_loaded(dataclasses.replace(model), **{**SMALL, "num_pages": 30, "enable_prefix_caching": False})
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [tokens(o) for o in got] == alone
    small.close()
    llm.close()
