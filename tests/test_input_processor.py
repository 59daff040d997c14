"""The input processor: every prompt form encodes as the tokenizer itself would, and every
request that cannot be served is refused by name, before it reaches the engine."""

import numpy as np
import pytest

from engine_fixtures import SMALL, byte_tokenizer, tiny_llm
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.engine.input_processor import InputProcessor
from jaxinfer.tokenizer import Tokenizer

VOCAB, CONTEXT, PAGE, PAGES = 256, 128, 4, 20  # 19 usable pages: 76 tokens at full length


def processor(tokenizer="bytes", **limits) -> InputProcessor:
    tok = byte_tokenizer() if tokenizer == "bytes" else tokenizer
    return InputProcessor(tok, **{"vocab_size": VOCAB, "max_model_len": CONTEXT, "max_num_seqs": 4,
                                  "page_size": PAGE, "num_pages": PAGES, "model_name": "tiny", **limits})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


@pytest.mark.parametrize("form", ["text", "dict"])
def test_text_prompts_encode_as_the_tokenizer_does_and_keep_their_text(tok, form):
    text = "héllo, world"
    ids, got_text = processor().encode(text if form == "text" else {"prompt": text})
    assert ids == tok.encode(text) and got_text == text
    assert ids == list(text.encode("utf-8"))  # the byte tokenizer: one id per byte


@pytest.mark.parametrize("ids", [[5, 6, 7], (5, 6, 7), {"prompt_token_ids": [5, 6, 7]},
                                 {"prompt_token_ids": np.array([5, 6, 7])}])
def test_token_id_prompts_come_back_as_a_list_of_ints_without_text(ids):
    got, text = processor().encode(ids)
    assert got == [5, 6, 7] and all(type(t) is int for t in got) and text is None


def test_a_chat_is_rendered_by_the_template_and_encoded_without_extra_special_tokens(tok):
    messages = [{"role": "user", "content": "hi"}]
    ids, text = processor().encode({"messages": messages})
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML, with the generation prompt
    assert ids == tok.encode(text, add_special_tokens=False)
    assert processor().encode_chat(messages) == (ids, text)


def test_process_caps_max_tokens_at_the_room_left_in_the_context():
    p = processor()
    prompt = p.process([5] * 60, SamplingParams(max_tokens=8))
    assert (prompt.token_ids, prompt.text, prompt.max_tokens) == ([5] * 60, None, 8)
    roomy = processor(num_pages=100)
    assert roomy.process([5] * 100, SamplingParams(max_tokens=None)).max_tokens == CONTEXT - 100
    assert roomy.process([5] * 100, SamplingParams(max_tokens=50)).max_tokens == CONTEXT - 100


@pytest.mark.parametrize("prompt,message", [
    ({"prompt": "a", "prompt_token_ids": [5]}, "exactly one of 'prompt', 'prompt_token_ids' or 'messages'"),
    ({"text": "a"}, "exactly one of"),
    ({"prompt": [5]}, "'prompt' must be a string"),
    (3.5, "a prompt must be text, token ids or a dict, got float"),
    (b"abc", "got bytes"),
    ("", "the prompt is empty"),
    ({"prompt": ""}, "the prompt is empty"),
    ([], "the prompt is empty"),
    ({"prompt_token_ids": "abc"}, "not a string"),
    ([[5, 6]], "flat list of integers"),
    ([1.5, 2], "flat list of integers"),
    ([5, None], "flat list of integers"),
    ([5, 256], "prompt token id 256 is outside the vocabulary \\[0, 256\\)"),
    ([5, -1], "prompt token id -1 is outside the vocabulary"),
    ({"messages": []}, "chat messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "chat message 0 needs a string 'content'"),
])
def test_bad_prompts_are_refused_by_name(prompt, message):
    with pytest.raises(InputError, match=message):
        processor().encode(prompt)
    with pytest.raises(InputError, match=message):
        processor().process(prompt, SamplingParams())


@pytest.mark.parametrize("prompt", ["hello", {"prompt": "hello"}, {"messages": [{"role": "user", "content": "hi"}]}])
def test_text_and_chats_need_a_tokenizer_but_token_ids_do_not(prompt):
    with pytest.raises(InputError, match="tiny has no tokenizer: pass token ids instead of text"):
        processor(tokenizer=None).encode(prompt)
    assert processor(tokenizer=None).encode([5, 6]) == ([5, 6], None)


def test_a_chat_template_that_does_not_compile_is_a_checkpoint_error_not_an_input_error():
    from engine_fixtures import byte_level_backend
    broken = Tokenizer(byte_level_backend(), eos_token_id=2, chat_template="{% for m in messages %}")
    with pytest.raises(CheckpointError, match="chat template does not compile"):
        processor(tokenizer=broken).encode({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("ids,params,message", [
    ([5], {"temperature": 1.0}, "sampling parameters must be SamplingParams, got dict"),
    ([5] * CONTEXT, SamplingParams(), f"the prompt has {CONTEXT} tokens; the context holds {CONTEXT}"),
    ([5], SamplingParams(n=5), "n=5 is more than the engine runs at once \\(max_num_seqs=4\\)"),
    ([5], SamplingParams(stop_token_ids=[7, 300]), "stop_token_ids \\[300\\] are outside the vocabulary"),
    ([5] * 70, SamplingParams(max_tokens=10), "the request needs 20 KV pages at full length; the cache has 19"),
    ([5, 999], SamplingParams(), "prompt token id 999 is outside the vocabulary"),
])
def test_requests_the_engine_cannot_serve_are_refused_by_name(ids, params, message):
    with pytest.raises(InputError, match=message):
        processor().check(ids, params)


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        processor(tokenizer=None).check([5], SamplingParams(stop=["x"]))
    assert processor().check([5], SamplingParams(stop=["x"], max_tokens=3)) == ([5], 3)


def test_the_engine_checks_every_request_through_its_processor(data_dir):
    engine = tiny_llm(data_dir, warmup=False).engine
    p = engine.input_processor
    assert (p.vocab_size, p.max_model_len, p.max_num_seqs) == (VOCAB, SMALL["max_model_len"], SMALL["max_num_seqs"])
    assert (p.page_size, p.num_pages) == (engine.config.page_size, engine.config.num_pages)
    assert p.tokenizer is engine.tokenizer
    with pytest.raises(InputError, match="n=17 is more than the engine runs at once"):
        engine.add_request("r", [5], SamplingParams(n=17))
    with pytest.raises(InputError, match="the context holds 128"):
        engine.add_request("r", [5] * 128, SamplingParams())
    assert not engine.has_unfinished() and engine.metrics.rejected == 2


def test_a_partitioned_pool_holds_a_request_only_if_one_partition_can():
    """Data-parallel MLA attention keeps each sequence's pages in one partition (here 4 of 5 pages, the
    first without page 0): a request is refused past what one partition holds, not the whole pool."""
    p = processor(kv_partitions=4)
    assert p.check([5] * 10, SamplingParams(max_tokens=6))[1] == 6  # 4 pages
    with pytest.raises(InputError, match="needs 5 KV pages at full length; the cache has 4 for one sequence"):
        p.check([5] * 14, SamplingParams(max_tokens=6))
