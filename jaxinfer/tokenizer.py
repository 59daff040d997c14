"""Text <-> token ids: a `tokenizers.Tokenizer` plus the metadata around it.

Built from an HF directory (`tokenizer.json` + `tokenizer_config.json`) or from
the vocabulary a GGUF embeds: byte-level BPE (`tokenizer.ggml.model = "gpt2"`)
or SentencePiece-style BPE with byte fallback (`"llama"`). Encoding runs in the
`tokenizers` library. Decoding maps every id to its bytes and decodes UTF-8
once, so that `StreamDecoder` can emit text incrementally and still agree
exactly with `decode`. Chat templates compile here, at load, and render in
`jaxinfer.chat_template`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jaxinfer.chat_template import TemplateCompileError, compile_template, render
from jaxinfer.errors import CheckpointError, InputError, JaxinferError

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's `llama_token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn; llama.cpp stops on these besides the eos id.
END_OF_TURN_MARKERS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "</s>", "<EOT>", "_<EOT>", "<|return|>", "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
})

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> (split regexes applied in turn, ignore_merges), after llama.cpp's families.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: ((_GPT2_SPLIT,), False) for name in ("default", "gpt2", "gpt-2", "phi-2", "olmo")},
    **{name: ((r"\p{N}", _GPT2_SPLIT), False) for name in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: ((_LLAMA3_SPLIT,), True) for name in (
        "llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe", "pixtral")},
    **{name: ((_QWEN2_SPLIT,), False) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    **{name: ((_GPT4O_SPLIT,), False) for name in ("gpt-4o", "llama4")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map to U+0100 upward."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b], extra = chr(256 + extra), extra + 1
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Encodes text, decodes ids, renders chat templates; see the module docstring."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, extra_eos_ids: Sequence[int] = (),
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.chat_template, self.add_bos_token, self.add_eos_token = chat_template, add_bos_token, add_eos_token
        self._extra_eos = frozenset(extra_eos_ids)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        markers = {i for i in self.special_ids if backend.id_to_token(i) in END_OF_TURN_MARKERS}
        self.eos_token_ids = frozenset({eos_token_id} - {None} | self._extra_eos | markers)
        self._scheme, self._strip_leading_space, byte_fallback = _decode_scheme(backend)
        self._token_bytes = None
        if self._scheme != "generic":
            to_bytes = _byte_level_bytes if self._scheme == "byte_level" else (
                lambda t: _sentencepiece_bytes(t, byte_fallback))
            self._token_bytes = [to_bytes(backend.id_to_token(i) or "") for i in range(self.vocab_size)]
            # Most tokens are ASCII: their text needs no UTF-8 decoder (StreamDecoder's fast path).
            self._token_ascii = [b.decode("ascii") if b.isascii() else None for b in self._token_bytes]
        # Compiled now so that a broken template shows at load; the model still serves text and ids.
        self._compiled_template, self.chat_template_error = None, None
        try:
            self._compiled_template = compile_template(chat_template or CHATML_TEMPLATE)
        except TemplateCompileError as e:
            self.chat_template_error = str(e)
            log.warning("the model's chat template does not compile (%s): chat requests will be refused; "
                        "text and token-id prompts work", e)

    def __getstate__(self) -> dict:
        # The compiled template holds jinja's functions, which do not pickle: a process that
        # gets this tokenizer (the frontend of a core process) compiles it again.
        return {**self.__dict__, "_compiled_template": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.chat_template_error is None:
            self._compiled_template = compile_template(self.chat_template or CHATML_TEMPLATE)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and, where present, the eos ids of
        `special_tokens_map.json` and `generation_config.json`. The `tokenizer.json`
        post-processor decides whether BOS is added."""
        root = pathlib.Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer.json not found")
        with _tokenizers_errors(f"{file}: not a valid tokenizer.json"):
            backend = tokenizers.Tokenizer.from_file(str(file))
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        generation = _read_json(root / "generation_config.json")
        template = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)

        def token_id(key: str) -> int | None:
            token = config.get(key, special_map.get(key))
            token = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(token) if isinstance(token, str) else None

        eos_ids = generation.get("eos_token_id", [])
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        eos_ids += config.get("jaxinfer_eos_token_ids", [])
        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   extra_eos_ids=[i for i in eos_ids if isinstance(i, int)], chat_template=template,
                   add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, object]) -> Tokenizer:
        """Build from a GGUF's `tokenizer.*` metadata (plain values, as gguf-py's `contents()`)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise CheckpointError("GGUF metadata has no tokenizer.ggml.tokens")
        types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise CheckpointError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        if kind == "gpt2":
            backend = _byte_level_bpe(metadata, tokens)
        elif kind == "llama":
            backend = _sentencepiece_bpe(metadata, tokens, types)
        else:
            raise CheckpointError(f"GGUF tokenizer.ggml.model {kind!r} is not supported "
                                  "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
        with _tokenizers_errors("GGUF tokenizer.ggml.tokens: cannot add its control and user-defined tokens"):
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
            backend.add_tokens([AddedToken(t, special=False, normalized=False)
                                for t, ty in zip(tokens, types) if ty == USER_DEFINED])

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is not None and not 0 <= int(value) < len(tokens):
                raise CheckpointError(f"GGUF tokenizer.ggml.{key} = {value} is outside the vocabulary")
            return None if value is None else int(value)

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise; so does transformers.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        template = [(tokens[bos], bos)] if add_bos and bos is not None else []
        template_end = [(tokens[eos], eos)] if add_eos and eos is not None else []
        if template or template_end:
            single = " ".join([t for t, _ in template] + ["$A"] + [t for t, _ in template_end])
            with _tokenizers_errors("GGUF tokenizer.ggml.bos_token_id/eos_token_id: cannot add them to the text"):
                backend.post_processor = processors.TemplateProcessing(
                    single=single, pair=f"{single} {single.replace('$A', '$B')}",
                    special_tokens=sorted(set(template + template_end)))
        return cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos_token=add_bos, add_eos_token=add_eos,
                   chat_template=metadata.get("tokenizer.chat_template"))

    @classmethod
    def from_gguf_file(cls, path: str | pathlib.Path) -> Tokenizer:
        """Read the tokenizer metadata of a GGUF file and build from it."""
        from checkpoints.gguf_loader import open_gguf  # raises CheckpointError naming the file

        metadata = open_gguf(path).metadata
        return cls.from_gguf_metadata({k: v for k, v in metadata.items() if k.startswith("tokenizer.")})

    def save(self, path: str | pathlib.Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`; `from_hf_dir` reads them back."""
        root = pathlib.Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.chat_template,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "bos_token": self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None,
                  "eos_token": self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None,
                  "jaxinfer_eos_token_ids": sorted(self._extra_eos)}
        config = {k: v for k, v in config.items() if v is not None}
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, got {type(text).__name__}")
        # encode_batch releases the GIL while it works (encode holds it: seconds for megabytes)
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        ids = self._check_ids(ids)
        if self._token_bytes is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        skip = self.special_ids if skip_special_tokens else ()
        text = b"".join(self._token_bytes[i] for i in ids if i not in skip).decode("utf-8", "replace")
        return text[1:] if self._strip_leading_space and text.startswith(" ") else text

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (as the tokenizer spells it, e.g. `Ġthe`, `▁the`)."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return ids

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's jinja template, as HF does.

        Models without a template get ChatML. Extra keyword arguments reach the template.
        CheckpointError when the template does not compile; InputError when it rejects the
        messages or crosses the size or time bound of `jaxinfer.chat_template`."""
        if self.chat_template_error is not None:
            raise CheckpointError(f"this model's chat template does not compile ({self.chat_template_error}); "
                                  "send text or token ids instead")
        _check_messages(messages)
        names = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
        names = {k: self.id_to_token(v) if v is not None else "" for k, v in names.items()}
        return render(self._compiled_template, messages=[dict(m) for m in messages],
                      add_generation_prompt=add_generation_prompt, **names, **kwargs)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns new text, `flush()` the rest.

    A character split across tokens is held back until complete; the deltas of
    all pushes plus `flush()` concatenate to `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer._strip_leading_space
        self._ids: list[int] = []  # only for tokenizers without a byte table
        self._emitted = ""
        self._pending = False  # the UTF-8 decoder holds part of a character

    def push(self, token_id: int) -> str:
        tok = self._tok
        if not isinstance(token_id, int) or not 0 <= token_id < tok.vocab_size:
            (token_id,) = tok._check_ids([token_id])
        if tok._token_bytes is None:
            self._ids.append(token_id)
            text = tok.decode(self._ids, self._skip)
            return "" if text.endswith("\ufffd") else self._advance(text)
        if self._skip and token_id in tok.special_ids:
            return ""
        if not self._pending:
            text = tok._token_ascii[token_id]
            if text is not None:
                return self._leading(text) if self._strip else text
        text = self._utf8.decode(tok._token_bytes[token_id])
        self._pending = bool(self._utf8.getstate()[0])
        return self._leading(text)

    def push_many(self, ids: Sequence[int]) -> str:
        """`push` of each id in turn, at once: the same text as their deltas joined."""
        tok = self._tok
        if tok._token_bytes is None or len(ids) < 2:
            return "".join([self.push(i) for i in ids])
        ids = tok._check_ids(ids) if min(ids) < 0 or max(ids) >= tok.vocab_size else ids
        if self._skip:
            ids = [i for i in ids if i not in tok.special_ids]
        text = self._utf8.decode(b"".join([tok._token_bytes[i] for i in ids]))
        self._pending = bool(self._utf8.getstate()[0])
        return self._leading(text)

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD)."""
        if self._tok._token_bytes is None:
            return self._advance(self._tok.decode(self._ids, self._skip))
        self._pending = False
        return self._leading(self._utf8.decode(b"", final=True))

    def _leading(self, text: str) -> str:
        if self._strip and text:  # SentencePiece: drop the prefix space of the first word only
            self._strip = False
            return text[1:] if text.startswith(" ") else text
        return text

    def _advance(self, text: str) -> str:
        # Fallback path: re-decode everything; a decoder that rewrites earlier text cannot be streamed exactly.
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text if text.startswith(self._emitted) else self._emitted
        return delta


# ---- helpers ----------------------------------------------------------------------------------

def _byte_level_bpe(metadata: Mapping[str, object], tokens: list[str]) -> tokenizers.Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer "
                              f"(known: {', '.join(sorted(_PRE_TOKENIZERS))})")
    splits, ignore_merges = _PRE_TOKENIZERS[pre]
    vocab = _first_ids(tokens)
    merges = _gguf_merges(metadata.get("tokenizer.ggml.merges") or [], vocab)
    with _tokenizers_errors("GGUF tokenizer.ggml.tokens/merges: cannot build the BPE model"):
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    with _tokenizers_errors(f"GGUF tokenizer.ggml.pre {pre!r}: cannot build the pre-tokenizer"):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
                                        use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(metadata: Mapping[str, object], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    scores, vocab = metadata.get("tokenizer.ggml.scores"), _first_ids(tokens)
    if metadata.get("tokenizer.ggml.merges"):
        merges = _gguf_merges(metadata["tokenizer.ggml.merges"], vocab)
    elif scores is not None and len(scores) == len(tokens):
        merges = _merges_from_scores(tokens, scores, types)
    else:
        raise CheckpointError("GGUF SentencePiece tokenizer has neither merges nor one score per token")
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else ("<unk>" if "<unk>" in vocab else None)
    with _tokenizers_errors("GGUF tokenizer.ggml.tokens/merges: cannot build the BPE model"):
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # "first": only text at the very start gets the prefix space, as transformers does (llama.cpp also
    # adds one after every special token).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _gguf_merges(merges: Sequence[object], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` ("left right" strings) as pairs, checked the way tokenizers' BPE
    would fail on them: a missing part raises, a merged token missing from the vocabulary panics.
    Split at the first space after the first character, as llama.cpp does."""
    parts = [(m[:i], m[i + 1:]) if isinstance(m, str) and (i := m.find(" ", 1)) > 0 else () for m in merges]
    bad = [i for i, p in enumerate(parts)
           if len(p) != 2 or p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab]
    if not bad:
        return [(left, right) for left, right in parts]
    merge, first = merges[bad[0]], parts[bad[0]]
    if not isinstance(merge, str):
        why = f"has type {type(merge).__name__}, not str"
    elif len(first) != 2:
        why = "is not two tokens separated by a space"
    else:
        missing = [p for p in first if p not in vocab]
        why = f"names {missing[0]!r}, which" if missing else f"makes {first[0] + first[1]!r}, which"
        why += " is not in tokenizer.ggml.tokens"
    raise CheckpointError(f"GGUF tokenizer.ggml.merges[{bad[0]}] = {merge!r:.200} {why} "
                          f"({len(bad)} of {len(merges)} merges are bad)")


@contextlib.contextmanager
def _tokenizers_errors(problem: str):
    """Any failure of the tokenizers calls inside becomes CheckpointError(f"{problem} (...)").

    tokenizers raises plain Exception on bad input, and pyo3's PanicException, a BaseException
    that `except Exception` misses, where Rust panics."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, JaxinferError):
        raise
    except BaseException as e:
        raise CheckpointError(f"{problem} ({type(e).__name__}: {str(e)[:300]})") from e


def _merges_from_scores(tokens: list[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a token made of two tokens is a merge
    ranked by its score (higher first), the way SentencePiece picks the best-scoring pair."""
    ids = _first_ids(tokens, [ty in (NORMAL, USER_DEFINED) for ty in types])
    found = []
    for token, i in ids.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ids and right in ids:
                found.append((-scores[i], -len(left), -len(right), left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _first_ids(tokens: list[str], keep: Sequence[bool] | None = None) -> dict[str, int]:
    """token -> id; a token listed twice keeps its first id."""
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if keep is None or keep[i]:
            ids.setdefault(t, i)
    return ids


def _decode_scheme(backend: tokenizers.Tokenizer) -> tuple[str, bool, bool]:
    """(scheme, strip one leading space, byte fallback) read off the decoder's configuration."""
    spec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    parts = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if "ByteLevel" in kinds:
        return "byte_level", False, False
    if "Metaspace" in kinds:
        meta = parts[kinds.index("Metaspace")]
        return "sentencepiece", meta.get("prepend_scheme", "always") != "never", "ByteFallback" in kinds
    if any(p.get("type") == "Replace" and p.get("pattern", {}).get("String") == "▁" for p in parts):
        strip = any(p.get("type") == "Strip" and p.get("content") == " " and p.get("start", 0) >= 1 for p in parts)
        return "sentencepiece", strip, "ByteFallback" in kinds
    return "generic", False, False


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:  # a token outside the byte alphabet (an added token) is its own UTF-8
        return token.encode("utf-8")


def _sentencepiece_bytes(token: str, byte_fallback: bool) -> bytes:
    if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8")


def _read_json(file: pathlib.Path) -> dict:
    """The JSON object in `file`, {} when it is absent; CheckpointError when it is corrupt."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_messages(messages: object) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("chat messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat message {n} must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"chat message {n} needs a string {key!r}, got {message.get(key)!r:.80}")
