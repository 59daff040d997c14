"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers
loading the same GGUF: teacher-forced top-1 agreement and greedy continuations.

Fixture: scripts/make_default_model_fixtures.py.
"""

import json

import numpy as np
import pytest

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.llm import LLM
from jaxinfer.runner.model_runner import ModelRunner
from tests.paged_runs import teacher_forced_logits

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def reference(data_dir):
    return json.loads((data_dir / "default_model_reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def smollm(default_model_path):
    return LLM(str(default_model_path), dtype="float32", progress=False, warmup=False,
               max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, num_pages=256)


def test_prompts_tokenize_as_hf_does(smollm, reference):
    for case in reference:
        if case["kind"] == "chat":
            ours, _ = smollm.encode({"messages": case["messages"]})
        else:
            ours, _ = smollm.encode(case["text"])
        assert ours == case["ids"][:case["prompt_len"]], case["text"]


def test_teacher_forced_top1_agrees_with_hf_transformers(smollm, reference):
    prompts = [np.array(c["ids"][:c["prompt_len"]]) for c in reference]
    continuations = [np.array(c["ids"][c["prompt_len"]:]) for c in reference]
    m = smollm.model
    runner = ModelRunner(m.config, m.graphdef, m.state, smollm.engine.runner.mesh, num_pages=128)
    logits = teacher_forced_logits(runner, prompts, continuations)
    agree = total = 0
    for case, ours in zip(reference, logits):
        hf = np.array(case["argmax"])
        assert ours.shape[0] == hf.shape[0]
        agree += int((ours.argmax(-1) == hf).sum())
        total += hf.shape[0]
    assert total >= 300
    print(f"teacher-forced top-1 agreement: {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.995


def test_greedy_continuations_equal_hf_for_most_prompts(smollm, reference):
    prompts = [c["ids"][:c["prompt_len"]] for c in reference]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    results = smollm.generate(prompts, params, use_tqdm=False)
    same = sum(r.outputs[0].token_ids == c["ids"][c["prompt_len"]:] for r, c in zip(results, reference))
    print(f"identical greedy continuations: {same}/{len(reference)}")
    assert same >= 0.75 * len(reference)


def test_the_default_model_kept_quantized_agrees_with_hf_transformers(default_model_path, reference):
    """quantization="gguf": the Q4_1 projections run from their own 4-bit levels (int4-g32-zp), never
    dequantized on load, and still agree with HF transformers' dequantized model token for token."""
    llm = LLM(str(default_model_path), dtype="float32", quantization="gguf", progress=False, warmup=False,
              max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, num_pages=64)
    m = llm.model
    assert m.quantization.name == "gguf (int4-g32-zp, int8-g32)"  # Q4_1 projections, the tied Q8_0 token_embd
    assert m.quantization.scheme_for("embed").name == "int8-g32"
    prompts = [np.array(c["ids"][:c["prompt_len"]]) for c in reference]
    continuations = [np.array(c["ids"][c["prompt_len"]:]) for c in reference]
    runner = ModelRunner(m.config, m.graphdef, m.state, llm.engine.runner.mesh, num_pages=128)
    logits = teacher_forced_logits(runner, prompts, continuations)
    agree = sum(int((ours.argmax(-1) == np.array(c["argmax"])).sum()) for c, ours in zip(reference, logits))
    total = sum(len(c["argmax"]) for c in reference)
    print(f"teacher-forced top-1 agreement, kept quantized: {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.995
