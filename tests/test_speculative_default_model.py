"""Speculative decoding on the default model (SmolLM2-135M), with each proposer: prompt lookup, the model
drafting for itself, its own 4-bit GGUF weights drafting for the float model (and, in
test_draft_head_default_model.py, a draft head trained on the model's own text). On 24 prompts of mixed kinds
(passages to repeat, code and text to edit, open questions, as chats), greedy output with speculation is the
output without it, token for token, and every proposer has drafts kept.
scripts/bench_spec_decode.py reports the acceptance lengths (docs/benchmarks.md)."""

import pytest

from jaxinfer.core.sampling_params import SamplingParams
from test_speculative import fixed_costs

PASSAGE = ("The printing press spread quickly across Europe. Within fifty years of its invention, presses were at "
           "work in more than two hundred cities, and millions of books had been printed.")
NOTE = "Our team meets every Monday at nine. We review last week's work and agree on the plan for the week."
CODE = "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
PROMPTS = [
    f"Repeat this passage exactly, word for word:\n\n{PASSAGE}", f"Copy the following text:\n\n{NOTE}",
    f"Write this out again, unchanged:\n{PASSAGE}", f"Echo the text below.\n\n{NOTE}",
    f"Rename the function to `average` and return the code:\n\n{CODE}",
    f"Add a docstring to this function and return the whole code:\n\n{CODE}",
    f"Change `total` to `acc` everywhere in this code:\n\n{CODE}",
    f"Replace 'Monday' with 'Tuesday' in this text and return it: {NOTE}",
    f"Put this paragraph in the past tense:\n\n{NOTE}", f"Summarize in one sentence: {PASSAGE}",
    "Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
    "What are three tips for learning a new language?", "Describe the water cycle for a child.",
    "Write a Python function that reverses a string.", "What is the capital of Australia?",
    "Give me a recipe for pancakes.", "List the planets of the solar system in order.",
    "Write a haiku about autumn.", "How do I sort a list of dictionaries by a key in Python?",
    "Translate 'good morning' into French, Spanish and German.", "What is 17 times 23? Show your steps.",
    "Write a SQL query that counts the orders per customer.", "Hi! Can you tell me a joke about computers?",
]
ENGINE = dict(dtype="float32", progress=False, warmup=False, max_num_seqs=8, max_num_batched_tokens=256,
              max_model_len=512, decode_sizes=(8, 32))


CHATS = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24)


def plain_outputs(default_model_path) -> list[list[int]]:
    """The 24 chats' greedy tokens without speculation."""
    from jaxinfer.llm import LLM

    with LLM(str(default_model_path), **ENGINE) as llm:
        return [list(o.outputs[0].token_ids) for o in llm.generate(CHATS, PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def want(default_model_path):
    return plain_outputs(default_model_path)


@pytest.mark.parametrize("proposer", ["ngram", "itself", "gguf 4-bit"])
def test_greedy_output_is_token_identical_with_each_proposer_on_24_prompts(default_model_path, want, proposer):
    check_identity(default_model_path, want, proposer)


def check_identity(default_model_path, want, proposer, head=None):
    """The 24 chats with speculation (`head`: the trained head's directory) give `want`, and drafts are kept."""
    from jaxinfer.llm import LLM

    spec = {"num_speculative_tokens": 3}
    if proposer == "ngram":
        spec.update(method="ngram", prompt_lookup_min=2, prompt_lookup_max=4)
    elif proposer == "trained head":
        spec.update(method="eagle3", model=str(head))
    else:
        spec.update(method="draft_model", model=str(default_model_path),
                    quantization="gguf" if proposer == "gguf 4-bit" else None)
    with LLM(str(default_model_path), **ENGINE, speculative_config=spec) as llm:
        got = [list(o.outputs[0].token_ids) for o in fixed_costs(llm).generate(CHATS, PARAMS, use_tqdm=False)]
        stats = llm.engine.core.counters()
    assert got == want
    kept = 0.02 if proposer == "trained head" else 0.2  # a head trained for a minute keeps few (4% measured)
    # (Prompt lookup runs a step ahead: drafts of a step voided by a rejection before it are never verified
    # and not counted; 90 were, in 24 x 24 tokens.)
    assert stats["spec_draft_tokens"] > 60 and stats["spec_accepted_tokens"] > kept * stats["spec_draft_tokens"]
