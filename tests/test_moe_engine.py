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


def test_data_parallel_mla_attention_in_the_engine_gives_the_single_device_outputs(data_dir):
    """DeepSeek-V3's tiny config on 4 simulated devices: experts split (expert parallelism) and the latent
    pages split by sequence (data-parallel attention: each device holds and attends its own sequences'
    pages, the pool keeping 4 partitions). Greedy outputs of requests spread over the partitions, with
    prefix hits and chunked prefill, equal the single-device engine's; a small pool preempts within a
    partition and still changes nothing."""
    from checkpoints import loader
    from engine_fixtures import byte_tokenizer
    from jaxinfer.sharding import make_mesh

    import jax.numpy as jnp

    mesh = make_mesh(tensor=4)
    sharded = dataclasses.replace(loader.load(data_dir / "hf_tiny" / "deepseek_v3", dtype=jnp.float32, mesh=mesh,
                                              progress=False), tokenizer=byte_tokenizer())
    single = LLM.from_loaded(tiny_model(data_dir, "deepseek_v3"), **{**SMALL, "num_pages": 400})
    rng = np.random.default_rng(1)
    system = rng.integers(3, 256, 24).tolist()
    prompts = [system + p if i % 3 == 0 else p for i, p in enumerate(random_prompts(rng, 12, 2, 20))]
    params = [greedy(int(rng.integers(4, 16))) for _ in prompts]
    want = [tokens(o) for o in single.generate(prompts, params, use_tqdm=False)]
    single.close()
    for num_pages in (400, 64):  # 64: 15 pages a partition (one sequence's most), too few for all at once
        llm = LLM.from_loaded(sharded, mesh, **{**SMALL, "num_pages": num_pages})
        assert llm.engine.config.kv_partitions == 4 and llm.engine.scheduler.pool.partitions == 4
        latent = llm.engine.runner.cache[0]["latent"]
        assert latent.addressable_shards[0].data.shape[0] == num_pages // 4
        ranks = set()
        real_admit = llm.engine.scheduler._admit

        def admit(seq, real_admit=real_admit):
            ok = real_admit(seq)
            ranks.add(seq.rank)
            assert all(p // (num_pages // 4) == seq.rank for p in seq.pages)
            return ok
        llm.engine.scheduler._admit = admit
        got = [tokens(o) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want and len(ranks) == 4, ranks
        if num_pages == 64:
            assert llm.engine.scheduler.num_preemptions > 0
        llm.close()
