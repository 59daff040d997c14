"""jaxinfer.tokenizer against HF transformers' tokenizations (fixtures from
scripts/make_tokenizer_fixtures.py) and against its own decode for streaming.

BOS: the SmolLM2 GGUF says add_bos_token = false and transformers prepends nothing
when loading it, so neither do we. The SentencePiece fixture says add_bos_token =
true and transformers prepends <s>; so do we (llama.cpp agrees on both).
"""

import json
import pathlib
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer

DATA = pathlib.Path(__file__).parent / "data"
SMOLLM2 = json.loads((DATA / "tokenizer_smollm2.json").read_text(encoding="utf-8"))
SPM = json.loads((DATA / "tokenizer_spm.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    from checkpoints.default_model import default_model_path

    return Tokenizer.from_gguf_file(default_model_path(progress=False))


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(SPM["metadata"])


def _stream(tok: Tokenizer, ids, skip_special_tokens=False, cuts=None) -> list[str]:
    """Deltas of pushing `ids` one by one, or (with `cuts`) in runs through push_many."""
    decoder = tok.stream_decoder(skip_special_tokens)
    if cuts is None:
        return [decoder.push(i) for i in ids] + [decoder.flush()]
    bounds = sorted({0, len(ids), *(c for c in cuts if c < len(ids))})
    return [decoder.push_many(ids[a:b]) for a, b in zip(bounds, bounds[1:])] + [decoder.flush()]


def _ids_with_partial_utf8(tok: Tokenizer):
    """Random ids, biased towards tokens holding lone UTF-8 bytes (lead and continuation)."""
    byte_ids = [i for i, b in enumerate(tok._token_bytes) if len(b) == 1 and b[0] >= 0x80]
    assert byte_ids
    return st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids)), max_size=24)


# ---- SmolLM2 GGUF (byte-level BPE) vs transformers ---------------------------------------------

@pytest.mark.default_model
@pytest.mark.parametrize("case", SMOLLM2["cases"], ids=lambda c: repr(c["text"])[:30])
def test_smollm2_encode_equals_transformers_ids(smollm2, case):
    assert smollm2.encode(case["text"]) == case["ids"]


@pytest.mark.default_model
@pytest.mark.parametrize("case", SMOLLM2["cases"], ids=lambda c: repr(c["text"])[:30])
def test_smollm2_decode_equals_transformers_text(smollm2, case):
    assert smollm2.decode(case["ids"]) == case["decoded"] == case["text"]
    assert smollm2.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.default_model
@pytest.mark.parametrize("chat", SMOLLM2["chats"], ids=lambda c: str(len(c["messages"])))
def test_smollm2_chat_template_renders_like_transformers(smollm2, chat):
    text = smollm2.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert smollm2.encode(text, add_special_tokens=False) == chat["ids"]


@pytest.mark.default_model
def test_smollm2_special_ids_and_end_of_turn_set(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == smollm2.token_to_id("<|im_start|>") == 1
    assert smollm2.token_to_id("<|im_end|>") in smollm2.eos_token_ids  # chat turns end with it
    assert smollm2.token_to_id("<|endoftext|>") in smollm2.eos_token_ids
    assert smollm2.token_to_id("<|im_start|>") not in smollm2.eos_token_ids
    assert smollm2.id_to_token(216) == "Ġ"


@pytest.mark.default_model
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_smollm2_stream_deltas_concatenate_to_decode(smollm2, data):
    ids = data.draw(_ids_with_partial_utf8(smollm2))
    skip = data.draw(st.booleans())
    deltas = _stream(smollm2, ids, skip)
    assert "".join(deltas) == smollm2.decode(ids, skip_special_tokens=skip)
    cuts = data.draw(st.lists(st.integers(0, 24), max_size=6))
    assert "".join(_stream(smollm2, ids, skip, cuts)) == "".join(deltas)
    # byte-level decoding is lossy UTF-8 in both, so tokenizers' own decoder must agree everywhere
    assert smollm2.decode(ids, skip) == smollm2.backend.decode(ids, skip_special_tokens=skip)


@pytest.mark.default_model
def test_smollm2_stream_never_emits_half_a_character(smollm2):
    ids = smollm2.encode("a😀b 你好")
    deltas = _stream(smollm2, ids)
    assert "".join(deltas) == "a😀b 你好"
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) < len(ids)  # the emoji's byte tokens were held back


@pytest.mark.default_model
def test_smollm2_save_then_from_hf_dir_is_identical(smollm2, tmp_path):
    smollm2.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    _assert_same(smollm2, again, SMOLLM2)


# ---- SentencePiece BPE ("llama") vs transformers -----------------------------------------------

@pytest.mark.parametrize("case", SPM["cases"], ids=lambda c: repr(c["text"])[:30])
def test_spm_encode_equals_transformers_ids(spm, case):
    assert spm.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", SPM["cases"], ids=lambda c: repr(c["text"])[:30])
def test_spm_decode_equals_transformers_text(spm, case):
    assert spm.decode(case["ids"]) == case["decoded"]
    assert spm.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("chat", SPM["chats"], ids=lambda c: str(len(c["messages"])))
def test_spm_chat_template_renders_like_transformers(spm, chat):
    if "error" in chat:  # the template's raise_exception() becomes an InputError naming it
        with pytest.raises(InputError, match=chat["error"]):
            spm.apply_chat_template(chat["messages"], chat["add_generation_prompt"])
        return
    text = spm.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert spm.encode(text, add_special_tokens=False) == chat["ids"]


def test_spm_special_ids_and_end_of_turn_set(spm):
    assert spm.bos_token_id == 1 and spm.eos_token_ids == {2}
    assert spm.encode("hi")[0] == 1 and spm.encode("hi", add_special_tokens=False)[0] != 1
    assert spm.encode("a<sep>b", add_special_tokens=False)[1] == spm.token_to_id("<sep>")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_spm_stream_deltas_concatenate_to_decode(spm, data):
    ids = data.draw(_ids_with_partial_utf8(spm))
    skip = data.draw(st.booleans())
    assert "".join(_stream(spm, ids, skip)) == spm.decode(ids, skip_special_tokens=skip)
    cuts = data.draw(st.lists(st.integers(0, 24), max_size=6))
    assert "".join(_stream(spm, ids, skip, cuts)) == spm.decode(ids, skip_special_tokens=skip)
    text = spm.decode(ids, skip)
    if "\ufffd" not in text:  # tokenizers' ByteFallback writes one U+FFFD per bad byte, Python per bad run
        assert text == spm.backend.decode(ids, skip_special_tokens=skip)


def test_spm_stream_strips_only_the_first_prefix_space(spm):
    ids = spm.encode("the tokenizer splits 😀 text", add_special_tokens=False)
    deltas = _stream(spm, ids)
    assert deltas[0] == "the" and "".join(deltas) == "the tokenizer splits 😀 text"
    assert all("\ufffd" not in d for d in deltas)


def test_spm_save_then_from_hf_dir_is_identical(spm, tmp_path):
    spm.save(tmp_path)
    _assert_same(spm, Tokenizer.from_hf_dir(tmp_path), SPM)


def _assert_same(a: Tokenizer, b: Tokenizer, fixture) -> None:
    assert (a.vocab_size, a.bos_token_id, a.eos_token_id) == (b.vocab_size, b.bos_token_id, b.eos_token_id)
    assert a.eos_token_ids == b.eos_token_ids and a.special_ids == b.special_ids
    assert a.chat_template == b.chat_template and a.add_bos_token == b.add_bos_token
    assert a.backend.to_str() == b.backend.to_str()
    for case in fixture["cases"]:
        assert b.encode(case["text"]) == case["ids"]
        assert b.decode(case["ids"]) == a.decode(case["ids"])
    ids = list(range(0, a.vocab_size, 7))
    assert "".join(_stream(b, ids)) == a.decode(ids)


# ---- byte-level pre-tokenizer families (no model needed) ---------------------------------------

def _byte_vocab_metadata(pre: str) -> dict:
    from jaxinfer.tokenizer import _bytes_to_unicode

    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": list(_bytes_to_unicode().values()) + ["<|eot_id|>"],
            "tokenizer.ggml.token_type": [1] * 256 + [3], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.eos_token_id": 256}


@pytest.mark.parametrize("pre, digits", [
    ("default", ["Ġ1234567"]), ("smollm", ["Ġ", "1", "2", "3", "4", "5", "6", "7"]),
    ("llama-bpe", ["Ġ", "123", "456", "7"]), ("qwen2", ["Ġ", "1", "2", "3", "4", "5", "6", "7"])])
def test_gguf_pre_tokenizer_families_split_digits_like_llama_cpp(pre, digits):
    tok = Tokenizer.from_gguf_metadata(_byte_vocab_metadata(pre))
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 1234567")]
    assert pieces[1:] == digits
    assert tok.decode(tok.encode("héllo<|eot_id|> 1234567")) == "héllo<|eot_id|> 1234567"
    assert tok.eos_token_ids == {256}


def test_gguf_unknown_pre_tokenizer_or_model_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="no-such-pre"):
        Tokenizer.from_gguf_metadata(_byte_vocab_metadata("no-such-pre"))
    with pytest.raises(CheckpointError, match="'rwkv'"):
        Tokenizer.from_gguf_metadata({**_byte_vocab_metadata("default"), "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(CheckpointError, match="tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


# ---- errors and fallbacks ----------------------------------------------------------------------

@pytest.mark.parametrize("messages", [
    "hello", [], [{"role": "user"}], [{"role": "user", "content": 3}], [("user", "hi")],
    [{"content": "hi"}], [{"role": None, "content": "hi"}]])
def test_malformed_messages_are_input_errors(spm, messages):
    with pytest.raises(InputError, match="chat message"):
        spm.apply_chat_template(messages)


def test_missing_tokenizer_json_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_corrupt_tokenizer_files_are_checkpoint_errors_naming_them(spm, tmp_path):
    spm.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_out_of_vocabulary_ids_are_input_errors(spm):
    with pytest.raises(InputError, match="outside the vocabulary"):
        spm.decode([1, spm.vocab_size])
    with pytest.raises(InputError):
        StreamDecoder(spm).push(-1)


def test_model_without_template_falls_back_to_chatml(spm, tmp_path):
    spm.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in CHATML_TEMPLATE


def test_chat_template_gets_hf_helpers(spm):
    spm_with = Tokenizer(spm.backend, bos_token_id=1, eos_token_id=2, chat_template=(
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}\n"  # trim_blocks eats this newline
        "{% if loop.last %}{% break %}{% endif %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ bos_token }}{{ eos_token }}{{ extra }}"))
    text = spm_with.apply_chat_template([{"role": "user", "content": "é\n"}], extra="!")
    assert text == '{"role": "user", "content": "é\\n"}4<s></s>!'


# ---- broken model files (issue 10) -------------------------------------------------------------

@pytest.mark.parametrize("template, reason", [("{% for %}", r"line 1: .+"), ("{{ 1 }}\n{{ x | }}", r"line 2: .+"),
                                              (7, "its type is int, not str")])
def test_a_chat_template_that_does_not_compile_is_reported_at_load_and_refused_per_chat(spm, caplog, template,
                                                                                         reason):
    with caplog.at_level("WARNING", logger="jaxinfer.tokenizer"):
        tok = Tokenizer(spm.backend, bos_token_id=1, eos_token_id=2, chat_template=template)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "chat template does not compile" in caplog.records[0].getMessage()
    assert re.fullmatch(reason, tok.chat_template_error)
    assert tok.encode("still works") == spm.encode("still works")  # text prompts are unaffected
    with pytest.raises(CheckpointError, match=r"this model's chat template does not compile \(" + reason
                       + r"\); send text or token ids instead"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_chat_template_that_compiles_reports_no_error(spm, caplog):
    with caplog.at_level("WARNING", logger="jaxinfer.tokenizer"):
        tok = Tokenizer.from_gguf_metadata(SPM["metadata"])
    assert tok.chat_template_error is None and not caplog.records


# Merges tokenizers cannot build: "q x" makes "qx", not a token (an Exception here; a Rust panic with
# other vocabularies, as in the GGUF file below); "q zz" names "zz", not a token ("Token `zz` out of
# vocabulary"); "qx" has no space (a 1-tuple: TypeError); 7 is no string (AttributeError).
BAD_MERGES = [("q x", "makes 'qx', which is not in tokenizer.ggml.tokens"),
              ("q zz", "names 'zz', which is not in tokenizer.ggml.tokens"),
              ("qx", "is not two tokens separated by a space"), (7, "has type int, not str")]


def _merges_metadata(kind: str, merges: list) -> dict:
    if kind == "llama":
        return {**SPM["metadata"], "tokenizer.ggml.merges": merges}
    metadata = _byte_vocab_metadata("default")
    return {**metadata, "tokenizer.ggml.merges": merges, "tokenizer.ggml.tokens": metadata["tokenizer.ggml.tokens"]
            + ["qq"], "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"] + [1]}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("bad, why", BAD_MERGES, ids=[repr(b) for b, _ in BAD_MERGES])
def test_gguf_merges_tokenizers_cannot_build_are_checkpoint_errors_naming_the_first(kind, bad, why):
    good = "q q" if kind == "gpt2" else "▁ t"
    assert Tokenizer.from_gguf_metadata(_merges_metadata(kind, [good]))
    with pytest.raises(CheckpointError, match=re.escape(f"GGUF tokenizer.ggml.merges[1] = {bad!r} {why} "
                                                        "(2 of 4 merges are bad)")):
        Tokenizer.from_gguf_metadata(_merges_metadata(kind, [good, bad, good, bad]))


def test_gguf_tokens_tokenizers_rejects_are_checkpoint_errors_naming_the_metadata():
    tokens = list(SPM["metadata"]["tokenizer.ggml.tokens"])
    tokens[1] = "<s> x"  # the BOS token cannot be spelled in a TemplateProcessing template
    with pytest.raises(CheckpointError, match="GGUF tokenizer.ggml.bos_token_id/eos_token_id"):
        Tokenizer.from_gguf_metadata({**SPM["metadata"], "tokenizer.ggml.tokens": tokens})


def test_a_tokenizer_json_tokenizers_panics_on_is_a_checkpoint_error_naming_it(tmp_path):
    import tokenizers

    tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])).save(
        str(tmp_path / "tokenizer.json"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    del spec["model"]["vocab"]["ab"]  # the merge "a b" now makes a token outside the vocabulary: a Rust panic
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: not a valid tokenizer.json \(PanicException"):
        Tokenizer.from_hf_dir(tmp_path)


def test_a_panic_building_the_bpe_model_is_a_checkpoint_error_but_interrupts_pass(monkeypatch):
    panic = _panic_exception_type()
    assert not issubclass(panic, Exception)  # why `except Exception` is not enough

    def failing_bpe(*args, **kwargs):
        raise failure

    monkeypatch.setattr("jaxinfer.tokenizer.models.BPE", failing_bpe)
    failure = panic("boom")
    with pytest.raises(CheckpointError, match=r"GGUF tokenizer.ggml.tokens/merges: cannot build the BPE model "
                                              r"\(PanicException: boom\)"):
        Tokenizer.from_gguf_metadata(SPM["metadata"])
    failure = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        Tokenizer.from_gguf_metadata(SPM["metadata"])


def _panic_exception_type() -> type:
    import tokenizers

    try:
        tokenizers.models.BPE({"a": 0, "b": 1}, [("a", "b")])  # "ab" is not in the vocabulary
    except BaseException as e:
        return type(e)
    raise AssertionError("tokenizers no longer panics on a merge outside the vocabulary")


@pytest.fixture(scope="module")
def gguf_with_bad_merge(tmp_path_factory):
    """A small llama GGUF whose weights load but whose merges tokenizers cannot build."""
    import numpy as np
    from test_gguf_loader import hf_weights, write_gguf

    path = tmp_path_factory.mktemp("gguf") / "bad_merges.gguf"
    # write_gguf names the tokens t0..t63; "t1t2" is not one of them
    return write_gguf(path, "llama", hf_weights(np.random.default_rng(0)),
                      extra={"add_tokenizer_model": "gpt2", "add_token_merges": ["t1 t2"]})


BAD_MERGE_MESSAGE = ("GGUF tokenizer.ggml.merges[0] = 't1 t2' makes 't1t2', which is not in tokenizer.ggml.tokens "
                     "(1 of 1 merges are bad)")


def test_a_gguf_file_with_a_bad_merge_fails_to_load_with_a_checkpoint_error(gguf_with_bad_merge):
    import jax.numpy as jnp

    from checkpoints import loader
    from jaxinfer.sharding import make_mesh

    with pytest.raises(CheckpointError, match=re.escape(BAD_MERGE_MESSAGE)):
        loader.load(gguf_with_bad_merge, dtype=jnp.float32, mesh=make_mesh(), progress=False)


def test_the_cli_reports_a_bad_gguf_merge_in_one_error_line(gguf_with_bad_merge, capsys):
    from jaxinfer import cli

    assert cli.main(["generate", "hi", "--model", str(gguf_with_bad_merge), "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("jaxinfer: error:")] == [
        f"jaxinfer: error: {BAD_MERGE_MESSAGE}"]
    assert "Traceback" not in err and "panicked" not in err


# ---- encoding on a worker thread ---------------------------------------------------------------

def test_encoding_a_large_text_lets_other_threads_run(spm):
    """A server encodes on a worker thread; its event loop must keep running meanwhile."""
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 你好 😀 1234567\n" * 8000  # 550 kB
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.02)
    start = time.perf_counter()
    ids = spm.encode(text)
    end = time.perf_counter()
    done.set()
    thread.join()
    assert ids == spm.backend.encode(text).ids  # the same ids as the plain call
    during = [t for t in ticks if start <= t <= end] + [end]
    stall = max(b - a for a, b in zip([start] + during, during))
    assert end - start > 0.1, "the text is too small to measure a stall"
    assert stall < 0.25 * (end - start), f"longest stall {stall:.3f} s of a {end - start:.3f} s encode"
