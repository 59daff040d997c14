"""Helpers that drive a model through the paged cache the way the engine does:
a ragged prefill of several prompts, then teacher-forced decode steps."""

from __future__ import annotations

import numpy as np

from jaxinfer.runner.step_inputs import build
from jaxinfer.core.page_pool import PagePool
from jaxinfer.core.shapes import BatchShape, SeqWork, next_bucket, pages_needed
from jaxinfer.runner.model_runner import ModelRunner


def teacher_forced_logits(runner: ModelRunner, prompts: list[np.ndarray],
                          continuations: list[np.ndarray], block_q: int = 8) -> list[np.ndarray]:
    """Logits at every position of prompt + continuation but the last, per sequence.

    All prompts go through one packed prefill (the prefill region); then each
    continuation token is fed by its own decode step (all sequences together, in
    the decode region), so positions cross pages.
    """
    n, ps = len(prompts), runner.page_size
    pool = PagePool(runner.cache_spec.num_pages, ps, partitions=runner.kv_partitions)
    # Sequences over the partitions in turn (one partition: the plain pool).
    tables = [pool.allocate(pages_needed(len(p) + len(c), ps), i % pool.partitions)
              for i, (p, c) in enumerate(zip(prompts, continuations))]
    width = next_bucket(max(len(t) for t in tables))
    chunks = sum(-(-len(p) // block_q) for p in prompts)
    tokens = max(chunks * block_q, n * block_q)
    shape = BatchShape(decode_rows=1, prefill_tokens=tokens, block_q=block_q, pages_per_seq=width,
                       prompt_logprob_rows=tokens)
    works = [SeqWork(p.tolist(), 0, t, logit_offsets=range(len(p))) for p, t in zip(prompts, tables)]
    batch, rows = build(shape, [], works, ps)
    logits = np.asarray(runner.logits(batch))
    out = [[logits[r]] for r in rows]
    steps = max(len(c) for c in continuations)
    decode_shape = BatchShape(decode_rows=max(2, n), prefill_tokens=0, block_q=block_q,
                              pages_per_seq=width)
    for j in range(steps - 1):  # the last continuation token's logits are not needed
        live = [s for s in range(n) if j < len(continuations[s]) - 1]
        works = [SeqWork([int(continuations[s][j])], len(prompts[s]) + j, tables[s], logit_offsets=[0])
                 for s in live]
        batch, rows = build(decode_shape, works, [], ps)
        step_logits = np.asarray(runner.logits(batch))
        for s, r in zip(live, rows):
            out[s].append(step_logits[r])
    for t in tables:
        pool.release(t)
    return [np.concatenate(o) for o in out]
