"""Write tests/data/tokenizer_*.json: reference tokenizations from HF transformers.

Run in an environment with torch, transformers, sentencepiece and gguf (not needed in CI):

    python scripts/make_tokenizer_fixtures.py [--gguf PATH]

1. tokenizer_smollm2.json: the default model's GGUF loaded by transformers
   (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`): ids, decoded text and
   chat-template renders for a varied set of strings.
2. tokenizer_spm.json: a tiny SentencePiece BPE model with byte fallback, trained
   here, written as GGUF metadata the way llama.cpp's converter does (pieces,
   scores, token types). The metadata goes into a small llama GGUF that
   transformers loads as the reference; sentencepiece's own ids are kept too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they? You've DONE it, we'd agree.",
    "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass  # tab-indented\n",
    "for (int i = 0; i < n; ++i) {\n        total += a[i];\n}",
    "1234567",
    "3.14159 and 2,000,000 and 007 and 1e-9",
    "  leading spaces",
    "trailing spaces   ",
    " single leading space",
    "\n\nnewlines\n\n\nmore\n",
    "line1\r\nline2\rline3",
    "café naïve résumé façade Straße Ærø",
    "日本語のテキストです。",
    "中文分词测试，以及标点。",
    "한국어 문장입니다",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 end",
    "Привет, мир! Ελληνικά",
    "مرحبا بالعالم",
    "𝐀𝐁𝐂 math bold and ℌ𝔢𝔩𝔩𝔬",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text with <|endoftext|> inside and <|im_end|>at the end",
    "not special: <|im_start <im_end|> < |im_end| >",
    "URL: https://example.com/path?q=1&b=2#frag",
    'JSON: {"key": [1, 2, 3], "ok": true, "nested": {"a": null}}',
    "Mixed CASE and ALLCAPS WORDS and camelCaseIdentifiers",
    "   \n  \t mixed\u00a0whitespace\u3000here",
    "zero\u200bwidth and soft\u00adhyphen",
    "",
    " ",
    "a",
    "<s> and </s> and <unk> as text",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "Write a haiku about tokens."},
      {"role": "assistant", "content": "Bytes merge into words\nsplit again by the decoder\nspaces drift like leaves"}],
     False),
    ([{"role": "user", "content": "¿Qué tal? 😀 日本"}], True),
]

SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}"
                "{{ raise_exception('only user and assistant roles') }}{% endif %}{% endfor %}")

SPM_CORPUS = """The tokenizer splits text into pieces that a language model reads one at a time.
SentencePiece treats the input as a stream of characters and marks spaces with a special symbol.
Byte pair encoding starts from single characters and merges the most frequent neighbouring pair.
When a character was never seen in training, byte fallback writes it as raw UTF-8 bytes instead.
Models like Llama and Mistral ship such vocabularies, and GGUF files embed them as metadata.
Numbers such as 1234 and 56.78 appear, along with code: def main(): return 0
Quick brown foxes jump over lazy dogs while the decoder puts the spaces back where they belong."""


def tokenizer_record(tok, strings, conversations):
    """ids and decoded text for every string, and chat renders, from an HF tokenizer."""
    cases = []
    for s in strings:
        ids = tok.encode(s)
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    chats = []
    for messages, gen in conversations:
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # a template refusing the conversation is a reference too
            chats.append({"messages": messages, "add_generation_prompt": gen, "error": str(e)})
            continue
        chats.append({"messages": messages, "add_generation_prompt": gen, "text": text,
                      "ids": tok.encode(text, add_special_tokens=False)})
    return cases, chats


def smollm2_fixture(gguf_path: pathlib.Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases, chats = tokenizer_record(tok, STRINGS, CONVERSATIONS)
    return {"source": f"transformers AutoTokenizer.from_pretrained(gguf_file={gguf_path.name!r})",
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "cases": cases, "chats": chats}


def train_spm() -> "sentencepiece.SentencePieceProcessor":  # noqa: F821
    import sentencepiece as spm

    lines = SPM_CORPUS.splitlines()
    sentences = [f"{a} {b.lower()}" for a in lines for b in lines]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0,
        user_defined_symbols=["<sep>"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def spm_metadata(sp) -> dict:
    """GGUF tokenizer metadata for a SentencePiece model, as llama.cpp's converter writes it."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 4 if sp.IdToPiece(i) == "<sep>" else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True, "tokenizer.chat_template": SPM_TEMPLATE}


def write_tiny_llama_gguf(path: pathlib.Path, metadata: dict) -> None:
    """A llama GGUF with a 1-layer, 8-wide model: only there so transformers accepts the file."""
    import gguf

    n_vocab, dim = len(metadata["tokenizer.ggml.tokens"]), 8
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64), w.add_embedding_length(dim), w.add_block_count(1)
    w.add_feed_forward_length(16), w.add_head_count(2), w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(dim // 2), w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama"), w.add_tokenizer_pre("default")
    w.add_token_list(metadata["tokenizer.ggml.tokens"]), w.add_token_scores(metadata["tokenizer.ggml.scores"])
    w.add_token_types(metadata["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_add_bos_token(True), w.add_add_space_prefix(True), w.add_chat_template(SPM_TEMPLATE)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, dim), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def spm_fixture() -> dict:
    from transformers import AutoTokenizer

    sp = train_spm()
    metadata = spm_metadata(sp)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_llama_gguf(pathlib.Path(tmp) / "spm.gguf", metadata)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file="spm.gguf")
        cases, chats = tokenizer_record(tok, STRINGS, CONVERSATIONS)
    for case in cases:
        case["sentencepiece_ids"] = [1] + sp.encode(case["text"])
    agree = sum(c["ids"] == c["sentencepiece_ids"] for c in cases)
    print(f"spm: transformers and sentencepiece agree on {agree}/{len(cases)} strings")
    return {"source": "transformers AutoTokenizer on a tiny llama GGUF holding this metadata",
            "metadata": metadata, "cases": cases, "chats": chats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=pathlib.Path, default=None, help="default: the cached default model")
    args = parser.parse_args()
    gguf_path = args.gguf
    if gguf_path is None:  # where checkpoints.default_model caches it (that module needs jaxinfer's env)
        cache = os.environ.get("JAXINFER_CACHE") or pathlib.Path.home() / ".cache" / "jaxinfer"
        gguf_path = pathlib.Path(cache) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    DATA.mkdir(parents=True, exist_ok=True)
    for name, fixture in (("tokenizer_smollm2.json", smollm2_fixture(gguf_path)),
                          ("tokenizer_spm.json", spm_fixture())):
        out = DATA / name
        out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
