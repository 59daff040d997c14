"""Prompts in, checked token ids out: the one place where a prompt is encoded and a
request is checked against the engine that will run it.

    processor = engine.input_processor
    prompt = processor.process({"messages": [{"role": "user", "content": "Hi"}]}, SamplingParams())
    engine.add_request("r1", prompt.token_ids, prompt.params, prompt=prompt.text)

A prompt is text, a list of token ids, or a dict with exactly one of `prompt`
(text), `prompt_token_ids` or `messages` (a chat, rendered with the model's
template). Every entry point (LLM, batch jobs, the gRPC servicer) hands its
prompts here in one of these forms; `Engine.add_request` checks through here too.
Whatever cannot be served raises InputError with a message naming the problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.core.shapes import pages_needed
from jaxinfer.errors import InputError

PromptType = str | Sequence[int] | Mapping[str, object]
PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")


@dataclasses.dataclass(frozen=True)
class ProcessedPrompt:
    token_ids: list[int]
    text: str | None  # the prompt as text (a chat: as the template rendered it); None for token ids
    params: SamplingParams
    max_tokens: int  # what the request may generate: params.max_tokens, capped by the context


class InputProcessor:
    """Encodes prompts with the model's tokenizer and checks requests against the engine's
    vocabulary, context length, KV pool and batch size. Plain Python and numpy: safe to call
    from any thread (the gRPC servicer's input threads do)."""

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 page_size: int, num_pages: int, kv_partitions: int = 1, model_name: str = "this model"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.page_size = page_size
        self.num_pages = num_pages  # page 0 is the engine's scratch page: num_pages - 1 hold KV
        # A sequence's pages come from one partition (data-parallel MLA attention); the first lacks page 0.
        self.seq_pages = num_pages // kv_partitions - 1
        self.kv_partitions = kv_partitions
        self.model_name = model_name

    @classmethod
    def for_engine(cls, engine) -> InputProcessor:
        return cls(engine.tokenizer, vocab_size=engine.vocab_size, max_model_len=engine.max_model_len,
                   max_num_seqs=engine.config.max_num_seqs, page_size=engine.config.page_size,
                   num_pages=engine.config.num_pages, kv_partitions=engine.config.kv_partitions,
                   model_name=str(engine.model.source))

    # ---- the whole request ------------------------------------------------------------------

    def process(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """Encode `prompt` and check it with `params`; InputError if it cannot be served."""
        ids, text = self.encode(prompt)
        ids, max_tokens = self.check(ids, params)
        return ProcessedPrompt(ids, text, params, max_tokens)

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, prompt: PromptType) -> tuple[list[int], str | None]:
        """Token ids and text, if any, of a prompt in any accepted form. Ids the caller gave are
        checked here; the whole request is checked by `check`."""
        if isinstance(prompt, str):
            return self.encode_text(prompt), prompt
        if isinstance(prompt, Mapping):
            keys = set(prompt) & set(PROMPT_KEYS)
            if len(keys) != 1:
                raise InputError("a prompt dict needs exactly one of 'prompt', 'prompt_token_ids' "
                                 f"or 'messages', got keys {sorted(prompt)}")
            key = keys.pop()
            if key == "prompt":
                if not isinstance(prompt["prompt"], str):
                    raise InputError("'prompt' must be a string")
                return self.encode_text(prompt["prompt"]), prompt["prompt"]
            if key == "messages":
                return self.encode_chat(prompt["messages"])
            return self.check_prompt(prompt["prompt_token_ids"]), None
        if isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
            return self.check_prompt(prompt), None
        raise InputError(f"a prompt must be text, token ids or a dict, got {type(prompt).__name__}")

    def encode_text(self, text: str) -> list[int]:
        """A text prompt's ids: the tokenizer adds its special tokens (BOS) as the model expects."""
        if not text:
            raise InputError("the prompt is empty")
        return self.need_tokenizer().encode(text)

    def encode_chat(self, messages) -> tuple[list[int], str]:
        """A chat's ids and the text its template renders (with the generation prompt)."""
        text = self.chat_text(messages)
        # The template already holds any BOS/special tokens it wants.
        return self.need_tokenizer().encode(text, add_special_tokens=False), text

    def chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        return self.need_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.model_name} has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    # ---- checks -----------------------------------------------------------------------------

    def check(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], int]:
        """Raise InputError if this prompt and these parameters cannot be served; else the
        prompt ids and the number of tokens the request may generate."""
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        ids = self.check_prompt(prompt_token_ids)
        if len(ids) >= self.max_model_len:
            raise InputError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}, "
                             "leaving no room to generate")
        if params.n > self.max_num_seqs:
            raise InputError(f"n={params.n} is more than the engine runs at once "
                             f"(max_num_seqs={self.max_num_seqs})")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InputError(f"stop_token_ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer, and this model has none")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        need = pages_needed(len(ids) + max_tokens, self.page_size)
        if need > self.seq_pages:
            where = "" if self.kv_partitions == 1 else f" for one sequence (a partition of {self.kv_partitions})"
            raise InputError(f"the request needs {need} KV pages at full length; the cache has "
                             f"{self.seq_pages}{where}")
        return ids, max_tokens

    def check_prompt(self, prompt_token_ids) -> list[int]:
        """The prompt's ids as a list of ints; InputError unless it is a non-empty flat list of
        ids in the vocabulary."""
        if isinstance(prompt_token_ids, (str, bytes)):
            raise InputError("prompt token ids must be a list of integers, not a string")
        try:
            ids = np.asarray(list(prompt_token_ids))
        except TypeError:
            raise InputError("prompt token ids must be a list of integers") from None
        if ids.size == 0:
            raise InputError("the prompt is empty")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InputError("prompt token ids must be a flat list of integers")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise InputError(f"prompt token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        return [int(t) for t in ids]
