"""Data parallelism (jaxinfer/engine/data_parallel.py) on simulated CPU devices: replicas give the
one-replica outputs request by request, and the router keeps shared prefixes together."""

import jax
import numpy as np
import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.engine.data_parallel import DataParallelCore
from jaxinfer.engine.router import PrefixAffinityRouter
from tests.multi_process_llm import ENGINE, PARAMS, PROMPTS


@pytest.fixture(scope="module")
def model_dir(data_dir):
    return data_dir / "hf_tiny" / "llama_gqa"


def outputs(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[list(o.token_ids) for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("dp,tp", [(2, 1), (2, 2)])
def test_replicas_give_the_single_replica_outputs(model_dir, dp, tp):
    # Greedy, seeded, top-k/top-p and n=2 requests, many at once so that both replicas run and queue.
    prompts = PROMPTS * 4
    params = PARAMS * 4
    with LLM(str(model_dir), tensor_parallel_size=tp, **ENGINE) as one:
        want = outputs(one, prompts, params)
    with LLM(str(model_dir), tensor_parallel_size=tp, data_parallel_size=dp, **ENGINE) as many:
        core = many.engine.core
        assert isinstance(core, DataParallelCore) and core.data_parallel_size == dp
        # Each replica on devices of its own, its weights on them (not copies elsewhere).
        devices = [set(r.runner.mesh.devices.flat) for r in core.replicas]
        assert not devices[0] & devices[1] and all(len(d) == tp for d in devices)
        leaf = jax.tree.leaves(core.replicas[1].runner.state)[0]
        assert leaf.sharding.device_set == devices[1]
        got = outputs(many, prompts, params)
        routed = many.engine.stats()["replica_requests"]
    assert got == want
    assert min(routed) >= len(prompts) // 4, routed  # the load spread over the replicas


def test_the_router_keeps_shared_prefixes_where_they_live(model_dir):
    # Eight groups of requests, each sharing a 24-token prefix (6 pages) and differing after it, arriving
    # interleaved. The replicas' prefix caches together must hit >= 90% of what one replica's cache hits.
    rng = np.random.default_rng(0)
    groups = [rng.integers(3, 250, 24).tolist() for _ in range(8)]
    prompts = [groups[i % 8] + rng.integers(3, 250, 5).tolist() for i in range(48)]
    params = SamplingParams(max_tokens=4, temperature=0)
    hits = {}
    for dp in (1, 2):
        with LLM(str(model_dir), data_parallel_size=dp, **{**ENGINE, "num_pages": 256}) as llm:
            llm.generate(prompts, params, use_tqdm=False)
            stats = llm.engine.stats()
            hits[dp] = stats["prefix_cache_hit_tokens"]
            if dp == 2:
                routed = stats["replica_requests"]
    assert hits[1] > 0 and hits[2] >= 0.9 * hits[1], hits
    assert min(routed) >= 12, routed  # and still balanced


def test_load_overrules_affinity():
    router = PrefixAffinityRouter(2, page_size=4, max_imbalance=3)
    prompt = list(range(1, 17))
    assert router.route(prompt, [0, 0]) == 0
    assert router.route(prompt + [99], [3, 0]) == 0  # its prefix lives on 0, and 0 is not too busy
    assert router.route(prompt + [98], [4, 0]) == 1  # 0 is too busy: the least loaded takes it
    assert router.route(prompt + [97], [0, 2]) == 1  # the prefix now lives where it was sent last
    assert (router.affine, router.overruled) == (2, 1)
