"""A draft model proposes: a second model with the target's vocabulary (smaller, quantized, or the target
itself) runs k greedy steps ahead of each speculating sequence, and the target verifies them.

Its K/V lives in a page pool of its own with the target's page ids: page p of the draft's pool holds the
draft's K/V for the same positions as page p of the target's. So the draft needs no page table or
allocator of its own, and a sequence's pages (the scheduler allocates them for every position a draft
may write) serve both models. Each SeqTable row remembers how many of its sequence's positions the draft
has written (`computed`); a row with a new occupant starts from nothing (`forget`): the draft then
recomputes the whole prompt once, cached prefix or not, and K/V it writes over a shared page equals what
is there.

One `propose()` is a few device calls and one read-back:

  1. catch-up: every query's positions the draft has not seen (`computed` .. the last known token): a
     short run as decode rows (one row per token, as verification's rows are), a long one (a prompt,
     first time round) as prefill chunks; the logits at each query's last token give its first draft;
  2. extend: k - 1 more one-row steps per query, each feeding the previous draft (unrolled in one
     executable, the drafts staying on the device);
  3. the drafts [S, k] come back to the host.

The drafts are the draft model's argmax whatever the request's sampling: a deterministic proposal, which
the rejection sampler verifies exactly (its q is one-hot), so sampled output keeps the target's
distribution. K/V the draft wrote past the kept tokens is written over by the next catch-up.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.core.shapes import NULL_PAGE, BatchShape, SeqWork, next_bucket
from jaxinfer.runner.batch import Batch
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.runner.step_inputs import build
from jaxinfer.spec_decode.proposer import DraftQuery


class DraftModelProposer:
    writes_pages = True

    def __init__(self, runner: ModelRunner, *, k: int, rows: int, max_queries: int, prefill_buckets: list[int],
                 block_q: int, pages_per_seq: int, min_rows: int = 1):
        """`runner`: the draft model's (its own params and page pool, as many pages as the target's);
        rows: SeqTable rows; max_queries: most sequences speculating at once; prefill_buckets: token
        counts of catch-up chunks (the engine's prefill sizes); min_rows: fewest rows of a step."""
        self.runner, self.k = runner, k
        self.page_size, self.block_q, self.pages_per_seq = runner.page_size, block_q, pages_per_seq
        self.computed = np.zeros(rows, np.int64)  # per row: positions whose draft K/V is written
        self.query_buckets = _powers_of_two(min_rows, max_queries)
        self.row_buckets = _powers_of_two(min_rows, max_queries * (k + 1))  # catch-up rows (a run <= k + 1)
        self.prefill_buckets = [t for t in prefill_buckets if t > 0]
        self.min_rows = min_rows
        self.max_queries = self.query_buckets[-1]  # catch-up gives a first draft in this many places

    def forget(self, row: int) -> None:
        self.computed[row] = 0

    # ---- proposing ----------------------------------------------------------------------------

    def propose(self, queries: list[DraftQuery]) -> list[np.ndarray]:
        if len(queries) > self.max_queries:  # the scheduler never asks for more (disable_by_batch_size)
            raise ValueError(f"{len(queries)} sequences to draft for, at most {self.max_queries}")
        runner = self.runner
        first = runner._put(np.zeros(self.max_queries, np.int32))
        short, long = [], []
        for i, q in enumerate(queries):
            start = int(self.computed[q.row])
            if start >= len(q.tokens):  # nothing seen is newer (it cannot be: the last token is new)
                start = len(q.tokens) - 1
            (short if len(q.tokens) - start <= self.k + 1 else long).append((i, q, start))
        if short:
            first = self._catch_up_rows(short, first)
        while long:
            first, long = self._catch_up_chunks(long, first)
        S = next(b for b in self.query_buckets if b >= len(queries))
        positions = np.zeros(S, np.int32)
        pages = np.full((S, self.pages_per_seq), NULL_PAGE, np.int32)
        for i, q in enumerate(queries):
            positions[i] = len(q.tokens)
            pages[i, :len(q.pages)] = q.pages
            self.computed[q.row] = len(q.tokens)
        drafts = np.asarray(self._run("extend", S, self._extend_fn, first, *runner._put((positions, pages))))
        return [drafts[i, :q.k] for i, q in enumerate(queries)]

    def _catch_up_rows(self, work, first):
        """Short catch-ups as decode rows, one token a row."""
        rows, ends = [], np.zeros(self.max_queries, bool)
        last = np.zeros(self.max_queries, np.int32)
        for i, q, start in work:
            for p in range(start, len(q.tokens)):
                rows.append(SeqWork([int(q.tokens[p])], p, q.pages, logit_offsets=(0,)))
            last[i], ends[i] = len(rows) - 1, True
        D = next(b for b in self.row_buckets if b >= len(rows))
        batch, _ = build(self._shape(D, 0), rows, [], self.page_size)
        batch = dataclasses.replace(batch, logits_indices=last)
        return self._run("catch_up", (D, 0), self._catch_up_fn, first, *self.runner._put((batch, ends)))

    def _catch_up_chunks(self, work, first):
        """Long catch-ups as prefill chunks, as many as the largest chunk size holds; returns the first
        drafts and the work left for another call."""
        top = self.prefill_buckets[-1]
        most_seqs = top // self.block_q  # a step of T prefill tokens holds T / block_q chunks
        chunks, left, used = [], [], 0
        ends = np.zeros(self.max_queries, bool)
        last = np.zeros(self.max_queries, np.int32)
        for i, q, start in work:
            room = min(top - used, len(q.tokens) - start)
            if room <= 0 or len(chunks) == most_seqs:
                left.append((i, q, start))
                continue
            chunks.append(SeqWork(q.tokens[start:start + room], start, q.pages, logit_offsets=(room - 1,)))
            if start + room < len(q.tokens):
                left.append((i, q, start + room))
            else:
                last[i], ends[i] = self.min_rows + used + room - 1, True
            used += room
        T = next(t for t in self.prefill_buckets if t >= used and t // self.block_q >= len(chunks))
        batch, _ = build(self._shape(self.min_rows, T), [], chunks, self.page_size)
        batch = dataclasses.replace(batch, logits_indices=last)
        first = self._run("catch_up", (self.min_rows, T), self._catch_up_fn, first, *self.runner._put((batch, ends)))
        return first, left

    def _shape(self, decode_rows: int, prefill_tokens: int) -> BatchShape:
        return BatchShape(decode_rows, prefill_tokens, self.block_q, self.pages_per_seq)

    # ---- on the device ------------------------------------------------------------------------

    def _catch_up_fn(self, state, cache, first, batch: Batch, ends):
        """The draft over `batch` (its K/V written); the argmax at each query's last token where `ends`."""
        logits, cache = self.runner._forward(state, cache, batch)
        return jnp.where(ends, jnp.argmax(logits, -1).astype(jnp.int32), first), cache

    def _extend_fn(self, state, cache, first, positions, pages):
        """k - 1 more greedy steps from each query's first draft at `positions` (padding queries write the
        null page): the drafts [S, k]."""
        S, ps = positions.shape[0], self.page_size
        token = first[:S]
        drafts = [token]
        for i in range(self.k - 1):
            pos = positions + i
            batch = Batch(tokens=token, feed_index=jnp.full(S, -1, jnp.int32), positions=pos,
                          slots=pages[jnp.arange(S), pos // ps] * ps + pos % ps,
                          cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32), kv_lens=pos + 1, page_table=pages,
                          block_tokens=jnp.zeros((0, self.block_q), jnp.int32), block_seq=jnp.zeros(0, jnp.int32),
                          logits_indices=jnp.arange(S, dtype=jnp.int32), decode_rows=S, max_q_len=1)
            logits, cache = self.runner._forward(state, cache, batch)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            drafts.append(token)
        return jnp.stack(drafts, axis=1), cache

    def _run(self, name: str, size, fn, *args):
        """Call `fn(state, cache, *args)` compiled; the cache is updated in place."""
        runner = self.runner
        out, runner.cache = self._compiled(name, size, fn, args)(runner.state, runner.cache, *args)
        return out

    def _compiled(self, name: str, size, fn, args):
        """`fn` compiled for arguments like `args` (once per name and size; the cache donated)."""
        runner = self.runner
        spec = runner.spec_of
        specs = (jax.tree.map(spec, runner.state), jax.tree.map(spec, runner.cache), *jax.tree.map(spec, args))
        out_tree = jax.tree.structure((0, runner.cache))
        return runner.executable(("draft", name, size, self.k), fn, specs, out_tree, (1,))

    def prepare(self) -> int:
        """Make (load or compile) every executable a proposal may need, without running any (safe beside
        running steps, as ModelRunner.prepare); returns how many."""
        def like(shape, dtype=jnp.int32):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.runner.replicated)

        first, ends = like((self.max_queries,)), like((self.max_queries,), jnp.bool_)
        made = 0
        for D, T in [(d, 0) for d in self.row_buckets] + [(self.min_rows, t) for t in self.prefill_buckets]:
            batch, _ = build(self._shape(D, T), [], [], self.page_size)
            batch = dataclasses.replace(batch, logits_indices=np.zeros(self.max_queries, np.int32))
            self._compiled("catch_up", (D, T), self._catch_up_fn, (first, jax.tree.map(lambda x: like(x.shape), batch),
                                                                     ends))
            made += 1
        for S in self.query_buckets:
            self._compiled("extend", S, self._extend_fn, (first, like((S,)), like((S, self.pages_per_seq))))
            made += 1
        return made


def _powers_of_two(low: int, high: int) -> list[int]:
    out, n = [], low
    while n < high:
        out.append(n)
        n *= 2
    return out + [next_bucket(high, low)]
