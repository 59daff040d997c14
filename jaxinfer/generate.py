"""Generation for a batch of prompts: one packed prefill, then decode steps.

This is the simple static-batch loop: every prompt is admitted at once and
rows that finish early idle until the last one is done. Pages come from the
runner's pool and go back when the call returns. The decode loop keeps the
sampled tokens on the device and feeds them straight into the next step, so
the host reads step N's tokens (for streaming and stop checks) while step N+1
already runs.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxinfer.batch import Batch, next_bucket, pack_batch
from jaxinfer.errors import InputError
from jaxinfer.kv_cache import PageAllocator, pages_needed
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingArrays, SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-generation token) or "length" (max_tokens)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclasses.dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    pages: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class Generator:
    def __init__(self, runner: ModelRunner, eos_token_ids: Sequence[int] = (),
                 max_context: int | None = None):
        self.runner = runner
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context or runner.cfg.max_position_embeddings
        self.allocator = PageAllocator(runner.cache_spec.num_pages)

    def validate_prompt(self, prompt: Sequence[int], index: int = 0) -> list[int]:
        vocab = self.runner.cfg.vocab_size
        if len(prompt) == 0:
            raise InputError(f"prompt {index} is empty")
        ids = np.asarray(prompt)
        if ids.dtype.kind not in "iu":
            raise InputError(f"prompt {index} must be a list of integer token ids")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise InputError(f"prompt {index} has token id {int(bad[0])} outside the vocabulary "
                             f"[0, {vocab})")
        if len(ids) >= self.max_context:
            raise InputError(f"prompt {index} has {len(ids)} tokens; the context holds "
                             f"{self.max_context}, leaving no room to generate")
        return [int(t) for t in ids]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Generate for every prompt. `on_token(row, token_id)` is called as tokens arrive."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        if not prompts:
            return []
        checked = [self.validate_prompt(p, i) for i, p in enumerate(prompts)]
        ps = self.runner.page_size
        rows: list[_Row] = []
        try:
            for prompt, p in zip(checked, params):
                max_tokens = min(p.max_tokens, self.max_context - len(prompt))
                if max_tokens < p.max_tokens:
                    log.warning("max_tokens cut from %d to %d to fit the context of %d",
                                p.max_tokens, max_tokens, self.max_context)
                pages = self.allocator.allocate(pages_needed(len(prompt) + max_tokens, ps))
                rows.append(_Row(prompt, p, max_tokens, pages))
            return self._run(rows, on_token)
        finally:
            for row in rows:
                self.allocator.free(row.pages)

    def _run(self, rows: list[_Row], on_token) -> list[GenerationResult]:
        n = len(rows)
        seeds = [r.params.seed if r.params.seed is not None else secrets.randbits(63) for r in rows]
        # At least 2 rows: a lone decode row ran its step at 16 ms on an H100 where 2 rows
        # took 7 ms (Llama-3-8B shape, JAX 0.11.2; scripts/probe_decode_rows.py); a padding
        # row costs nothing.
        num_rows = next_bucket(n, minimum=2)
        sampling = SamplingArrays.from_params([r.params for r in rows], seeds, num_rows)
        tables = [r.pages for r in rows]

        t0 = time.perf_counter()
        batch = pack_batch([np.array(r.prompt) for r in rows], [0] * n, tables, min_seqs=num_rows)
        lengths = np.zeros(num_rows, np.int32)  # tokens already in the cache per row
        lengths[:n] = [len(r.prompt) for r in rows]
        tokens, _ = self.runner.step(batch, sampling, lengths.copy())
        tokens.block_until_ready()
        t1 = time.perf_counter()

        # Decode. Generated token j of row r sits at position len(prompt) + j; `fed[r]`
        # counts the generated tokens already written to the cache. The host reads a
        # step's tokens only after dispatching the next, so it learns of a finished row
        # one step late; that row's extra output is dropped, and a finished row idles by
        # re-writing its last slot (inside its own pages).
        width = next_bucket(max(len(t) for t in tables))
        page_table = np.zeros((num_rows, width), np.int32)
        for r, t in enumerate(tables):
            page_table[r, :len(t)] = t
        cu = np.minimum(np.arange(num_rows + 1), n).astype(np.int32)
        # What stays fixed across decode steps goes to the device once.
        sampling, page_table, cu = jax.device_put((sampling, page_table, cu), self.runner.replicated)
        prompt_lens = lengths.copy()
        fed = np.zeros(num_rows, np.int32)
        previous = tokens  # device: the newest generated token of every row
        while any(r.finish_reason is None for r in rows):
            for r, row in enumerate(rows):
                if row.finish_reason is None:
                    fed[r] += 1
            positions = np.maximum(prompt_lens + fed - 1, 0).astype(np.int32)
            decode = Batch(tokens=previous, positions=positions, cu_q_lens=cu,
                           kv_lens=np.where(np.arange(num_rows) < n, positions + 1, 0).astype(np.int32),
                           page_table=page_table, logits_indices=np.arange(num_rows, dtype=np.int32),
                           max_q_len=1)
            newest, _ = self.runner.step(decode, sampling, positions + 1)
            self._take(rows, np.asarray(previous), on_token)
            previous = newest
        t2 = time.perf_counter()
        return [GenerationResult(r.prompt, r.tokens, r.finish_reason, t1 - t0, t2 - t1)
                for r in rows]

    def _take(self, rows: list[_Row], sampled: np.ndarray, on_token) -> None:
        for r, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            token = int(sampled[r])
            row.tokens.append(token)
            if on_token is not None:
                on_token(r, token)
            stops = row.params.stop_token_ids
            if (token in stops) or (not row.params.ignore_eos and token in self.eos_token_ids):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
