"""The engine with quantized weights (issue 12: "everything else keeps working"): a request's tokens do not
depend on what shares its batch, prefix-cache hits give the same tokens as a cold run, batch jobs equal
LLM.generate, and the gRPC server reports the quantization. One int4 model with zero points (the native CPU
kernel's int4 path where it builds, XLA's otherwise) serves every test."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader
from engine_fixtures import SMALL, byte_tokenizer, random_prompts, run_alone, run_arriving
from jaxinfer.batch_job import run_batch
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.llm import LLM
from jaxinfer.sharding import make_mesh

SCHEME = "int4-g32-zp"


@pytest.fixture(scope="module")
def model(data_dir):
    loaded = loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                         quantization=SCHEME)
    return dataclasses.replace(loaded, tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def llm(model):
    return LLM.from_loaded(model, **{**SMALL, "num_pages": 400, "enable_prefix_caching": True})


def test_the_weights_stay_quantized(model):
    assert model.quantization.name == SCHEME
    values = [v for path, v in _leaves(model.state) if path[-1] == "values"]
    assert values and all(v.dtype == jnp.int4 for v in values)
    assert not [p for p, v in _leaves(model.state) if p[-1] == "weight" and any(k in p for k in ("q_proj", "down_proj"))]


def test_tokens_do_not_depend_on_the_batch(llm):
    """Greedy and seeded requests arriving at random steps give what each gives with the engine to itself."""
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 10)
    params = [SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i)
              for i in range(len(prompts))]
    batched, _ = run_arriving(llm, prompts, params, rng)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        assert batched[i].outputs[0].token_ids == run_alone(llm, prompt, p).outputs[0].token_ids, i


def test_prefix_cache_hits_give_the_tokens_of_a_cold_run(llm, model):
    shared = list(range(40, 90))  # several pages of 4
    prompts = [shared + [7, 8, 9], shared + [11]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    warm = llm.generate(prompts, params, use_tqdm=False)
    assert warm[1].num_cached_tokens >= len(shared) - 4  # the second reused the first's pages
    cold = LLM.from_loaded(model, **{**SMALL, "num_pages": 400, "enable_prefix_caching": False})
    for w, c in zip(warm, cold.generate(prompts, params, use_tqdm=False)):
        assert w.outputs[0].token_ids == c.outputs[0].token_ids


def test_a_batch_job_equals_generate(llm, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"line {i}:", "max_tokens": 3 + i % 4} for i in range(8)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    defaults = {"temperature": 0.0, "ignore_eos": True}
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", defaults, progress=False)
    assert (summary.done, summary.errors) == (8, 0)
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    want = llm.generate([r["prompt"] for r in rows],
                        [SamplingParams(max_tokens=r["max_tokens"], **defaults) for r in rows], use_tqdm=False)
    for row, out in zip(rows, want):
        assert records[row["id"]]["outputs"][0]["token_ids"] == out.outputs[0].token_ids


def test_model_info_reports_the_quantization(model):
    from serving.client import Client
    from serving.server import Server

    srv = Server(LLM.from_loaded(model, **{**SMALL, "num_pages": 100}, warmup=False).engine, warmup=False)
    srv.start()
    try:
        assert srv.wait_ready(60)
        with Client(port=srv.port, timeout=60) as client:
            assert client.model_info().quantization == SCHEME
    finally:
        srv.drain(10)


def _leaves(state):
    from flax import nnx

    return [(tuple(str(k) for k in path), v) for path, v in nnx.to_flat_state(state)]
