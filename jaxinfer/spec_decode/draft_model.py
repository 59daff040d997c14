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
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.core.shapes import NULL_PAGE, BatchShape, SeqWork, next_bucket
from jaxinfer.runner.batch import Batch
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.runner.step_inputs import StepInputs, layout, pack_work
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
        self._carry = runner._put(self._new_carry())  # from catch-up to extend: each query's first draft, ...
        self._drafts_out: dict[int, jax.Array] = {}  # per query bucket: the drafts, written in place
        self._held: dict[tuple, jax.Array] = {}  # per executable: its input buffer (GPU)

    def forget(self, row: int) -> None:
        self.computed[row] = 0

    # ---- proposing ----------------------------------------------------------------------------

    def propose(self, queries: list[DraftQuery]) -> list[np.ndarray]:
        if len(queries) > self.max_queries:  # the scheduler never asks for more (disable_by_batch_size)
            raise ValueError(f"{len(queries)} sequences to draft for, at most {self.max_queries}")
        short, long = [], []
        for i, q in enumerate(queries):
            start = int(self.computed[q.row])
            if start >= len(q.tokens):  # nothing seen is newer (it cannot be: the last token is new)
                start = len(q.tokens) - 1
            (short if len(q.tokens) - start <= self.k + 1 else long).append((i, q, start))
        if short:
            self._catch_up_rows(short)
        while long:
            long = self._catch_up_chunks(long)
        S = next(b for b in self.query_buckets if b >= len(queries))
        positions = np.zeros(S, np.int32)
        pages = np.full((S, self.pages_per_seq), NULL_PAGE, np.int32)
        for i, q in enumerate(queries):
            positions[i] = len(q.tokens)
            pages[i, :len(q.pages)] = q.pages
            self.computed[q.row] = len(q.tokens)
        key = ("extend", S)
        out = self._drafts_out.pop(S, None)
        if out is None:
            out = self.runner._put(np.zeros((S, self.k), np.int32))
        out = self._call(key, self._extend_fn, self._carry,
                         self._stage(key, np.concatenate([positions, pages.ravel()])), out)
        self._drafts_out[S] = out
        drafts = np.asarray(out)
        return [drafts[i, :q.k] for i, q in enumerate(queries)]

    def _catch_up_rows(self, work) -> None:
        """Short catch-ups as decode rows, one token a row."""
        rows, ends = [], np.zeros(self.max_queries, np.int32)
        last = np.zeros(self.max_queries, np.int32)
        for i, q, start in work:
            for p in range(start, len(q.tokens)):
                rows.append(SeqWork([int(q.tokens[p])], p, q.pages))
            last[i], ends[i] = len(rows) - 1, 1
        D = next(b for b in self.row_buckets if b >= len(rows))
        self._catch_up(self._shape(D, 0), rows, [], last, ends)

    def _catch_up_chunks(self, work) -> list:
        """Long catch-ups as prefill chunks, as many as the largest chunk size holds; returns the work left
        for another call."""
        top = self.prefill_buckets[-1]
        most_seqs = top // self.block_q  # a step of T prefill tokens holds T / block_q chunks
        chunks, left, used = [], [], 0
        ends = np.zeros(self.max_queries, np.int32)
        last = np.zeros(self.max_queries, np.int32)
        for i, q, start in work:
            room = min(top - used, len(q.tokens) - start)
            if room <= 0 or len(chunks) == most_seqs:
                left.append((i, q, start))
                continue
            chunks.append(SeqWork(q.tokens[start:start + room], start, q.pages))
            if start + room < len(q.tokens):
                left.append((i, q, start + room))
            else:
                last[i], ends[i] = self.min_rows + used + room - 1, 1
            used += room
        T = next(t for t in self.prefill_buckets if t >= used and t // self.block_q >= len(chunks))
        self._catch_up(self._shape(self.min_rows, T), [], chunks, last, ends)
        return left

    def _catch_up(self, shape: BatchShape, rows, chunks, last, ends) -> None:
        """One catch-up call: its work packed as a step's buffer, then each query's last row and whether it
        ends here."""
        buf = pack_work(shape, rows, chunks, self.page_size)
        key = ("catch_up", shape)
        self._carry = self._call(key, functools.partial(self._catch_up_fn, shape=shape), self._carry,
                                 self._stage(key, np.concatenate([buf, last, ends])), *self._inputs())

    def _shape(self, decode_rows: int, prefill_tokens: int) -> BatchShape:
        return BatchShape(decode_rows, prefill_tokens, self.block_q, self.pages_per_seq)

    # ---- on the device ------------------------------------------------------------------------
    #
    # A subclass with another kind of draft (draft_head.py) changes these: what catch-up hands to extend
    # (`_new_carry`), what else catch-up reads (`_inputs`), and the two functions.

    def _new_carry(self):
        """Catch-up's result that extend starts from (host zeros): each query's first draft."""
        return np.zeros(self.max_queries, np.int32)

    def _inputs(self) -> tuple:
        """Device arrays catch-up reads besides its buffer (none here)."""
        return ()

    def _catch_up_fn(self, state, cache, first, buf, *, shape: BatchShape):
        """The draft over the step in `buf` (its K/V written); the argmax at each query's last token where
        it ends in this step, `first` elsewhere."""
        n, Q = layout(shape, 1).size, self.max_queries
        batch, _ = StepInputs(buf[:n], shape, 1).unpack()
        batch = dataclasses.replace(batch, logits_indices=buf[n:n + Q])
        logits, cache = self.runner._forward(state, cache, batch)
        return jnp.where(buf[n + Q:] != 0, jnp.argmax(logits, -1).astype(jnp.int32), first), cache

    def _extend_fn(self, state, cache, first, buf, out):
        """k - 1 more greedy steps from each query's first draft (`buf`: positions [S], then page tables
        [S, P]; padding queries write the null page): the drafts [S, k], written over `out`."""
        S, ps = out.shape[0], self.page_size
        positions, pages = buf[:S], buf[S:].reshape(S, self.pages_per_seq)
        token = first[:S]  # catch-up's carry: each query's first draft
        drafts = [token]
        for i in range(self.k - 1):
            batch = one_row_batch(token, positions + i, pages, ps, self.block_q)
            logits, cache = self.runner._forward(state, cache, batch)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            drafts.append(token)
        return jax.lax.dynamic_update_slice(out, jnp.stack(drafts, axis=1), (0, 0)), cache

    # ---- executables and their buffers ----------------------------------------------------------
    #
    # As for the target's steps (ModelRunner.stage): on the GPU every buffer a call touches keeps its
    # device address from call to call (inputs copied into a buffer held per executable, outputs written
    # over donated ones), or XLA records its CUDA graph again before each run.

    def _stage(self, key, host: np.ndarray) -> jax.Array:
        runner = self.runner
        fresh = runner._put(host)
        if runner.mesh.devices.flat[0].platform != "gpu":
            return fresh
        held = self._held.get(key)
        self._held[key] = fresh if held is None else runner._refill(held, fresh)
        return self._held[key]

    def _call(self, key, fn, *args):
        """`fn(state, cache, *args)` compiled (the cache donated, and catch-up's carry or extend's output);
        the cache is updated in place."""
        runner = self.runner
        out, runner.cache = self._compiled(key, fn, args)(runner.state, runner.cache, *args)
        return out

    def _compiled(self, key, fn, args):
        runner = self.runner
        spec = runner.spec_of
        specs = (jax.tree.map(spec, runner.state), jax.tree.map(spec, runner.cache), *jax.tree.map(spec, args))
        catch_up = key[0] == "catch_up"
        out_tree = jax.tree.structure((self._carry if catch_up else 0, runner.cache))
        donate = (1, 2) if catch_up else (1, 4)  # catch-up: the carry; extend: its output
        return runner.executable(("draft", *key, self.k), fn, specs, out_tree, donate)

    def prepare(self) -> int:
        """Make (load or compile) every executable a proposal may need, without running any (safe beside
        running steps, as ModelRunner.prepare); returns how many."""
        def like(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.runner.replicated)

        carry, inputs = jax.tree.map(self.runner.spec_of, (self._carry, self._inputs()))
        made = 0
        for D, T in [(d, 0) for d in self.row_buckets] + [(self.min_rows, t) for t in self.prefill_buckets]:
            shape = self._shape(D, T)
            self._compiled(("catch_up", shape), functools.partial(self._catch_up_fn, shape=shape),
                           (carry, like(layout(shape, 1).size + 2 * self.max_queries), *inputs))
            made += 1
        for S in self.query_buckets:
            self._compiled(("extend", S), self._extend_fn, (carry, like(S * (1 + self.pages_per_seq)), like(S, self.k)))
            made += 1
        return made


def one_row_batch(tokens: jax.Array, positions: jax.Array, pages: jax.Array, page_size: int, block_q: int) -> Batch:
    """A decode-only Batch built on the device: one row per sequence, feeding `tokens` at `positions`."""
    S = tokens.shape[0]
    return Batch(tokens=tokens, feed_index=jnp.full(S, -1, jnp.int32), positions=positions,
                 slots=pages[jnp.arange(S), positions // page_size] * page_size + positions % page_size,
                 cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32), kv_lens=positions + 1, page_table=pages,
                 block_tokens=jnp.zeros((0, block_q), jnp.int32), block_seq=jnp.zeros(0, jnp.int32),
                 logits_indices=jnp.arange(S, dtype=jnp.int32), decode_rows=S, max_q_len=1)


def _powers_of_two(low: int, high: int) -> list[int]:
    out, n = [], low
    while n < high:
        out.append(n)
        n *= 2
    return out + [next_bucket(high, low)]
