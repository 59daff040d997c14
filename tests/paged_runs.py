"""Helpers that drive a model through the paged cache the way the engine does:
a ragged prefill of several prompts, then teacher-forced decode steps."""

from __future__ import annotations

import numpy as np

from jaxinfer.batch import pack_batch
from jaxinfer.kv_cache import PageAllocator, pages_needed
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingArrays, SamplingParams


def teacher_forced_logits(runner: ModelRunner, prompts: list[np.ndarray],
                          continuations: list[np.ndarray]) -> list[np.ndarray]:
    """Logits at every position of prompt + continuation but the last, per sequence.

    All prompts go through one packed prefill; then each continuation token is fed
    by its own decode step (all sequences together), so positions cross pages.
    """
    n = len(prompts)
    allocator = PageAllocator(runner.cache_spec.num_pages)
    tables = [allocator.allocate(pages_needed(len(p) + len(c), runner.page_size))
              for p, c in zip(prompts, continuations)]
    batch = pack_batch(prompts, [0] * n, tables, all_logits=True)
    rows = batch.num_seqs
    greedy = SamplingArrays.from_params([SamplingParams()] * n, [0] * n, batch.num_tokens)
    _, logits = runner.step(batch, greedy, np.zeros(batch.num_tokens, np.int32))
    logits = np.asarray(logits)
    cu = np.asarray(batch.cu_q_lens)
    out = [[logits[cu[s]:cu[s + 1]]] for s in range(n)]
    steps = max(len(c) for c in continuations)
    for j in range(steps - 1):  # the last continuation token's logits are not needed
        live = [s for s in range(n) if j < len(continuations[s]) - 1]
        batch = pack_batch([continuations[s][j:j + 1] for s in live],
                           [len(prompts[s]) + j for s in live], [tables[s] for s in live],
                           min_seqs=rows)
        sampling = SamplingArrays.from_params([SamplingParams()] * len(live), [0] * len(live),
                                              batch.logits_indices.shape[0])
        _, step_logits = runner.step(batch, sampling,
                                     np.zeros(batch.logits_indices.shape[0], np.int32))
        step_logits = np.asarray(step_logits)
        for i, s in enumerate(live):
            out[s].append(step_logits[i:i + 1])
    for t in tables:
        allocator.free(t)
    return [np.concatenate(o) for o in out]
