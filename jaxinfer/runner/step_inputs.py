"""A step's inputs as one value: the Batch and the SamplingArrays packed into a single
int32 buffer, so they reach the device in one transfer (and could be sent as-is to
the other processes of a multi-host run).

The layout (which array sits where) follows from the step's BatchShape and the
ban width alone, both static: the compiled step slices the buffer apart again at
fixed offsets, so unpacking costs nothing at run time. Floats travel as their bit
patterns. The host starts every step from a template that already holds the
padding (empty decode rows, unused blocks, greedy rows with nothing banned) and
writes only the real rows into it: a handful of slice assignments per step,
however many sequences run.

Sampling settings are two row-major matrices, one row per logits row, in the
column order of `jaxinfer.core.seq_table` (FLOAT_COLUMNS, then STEP_INT_COLUMNS),
so the scheduler's gathered rows drop in with one assignment each. They and the
banned ids sit at the buffer's tail, which the forward pass hands on to the
sampler (`sampling_rows`, `unpack_sampling`); with speculation (a shape with
spec_tokens) so do each speculating sequence's first row and drafts
(`unpack_spec`), for the verifying sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runner.batch import Batch
from jaxinfer.core.scheduler import ScheduledStep
from jaxinfer.core.seq_table import FLOAT_COLUMNS, STEP_INT_COLUMNS, F, SI
from jaxinfer.core.shapes import NULL_PAGE, BatchShape, SeqWork
from jaxinfer.runner.sampler import SamplingArrays, needs_full

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each array of a step sits in the buffer: name -> (offset, shape)."""

    shape: BatchShape
    ban_width: int
    fields: dict
    size: int
    template: np.ndarray  # the buffer of an empty step
    page_row_starts: np.ndarray  # i * pages_per_seq for each decode row i: a flat page-table index

    def view(self, buffer, name):
        offset, shp = self.fields[name]
        return buffer[offset:offset + math.prod(shp)].reshape(shp)  # math.prod: np.prod costs µs a call

    def offset(self, name) -> int:
        return self.fields[name][0]


@functools.lru_cache(maxsize=256)
def layout(shape: BatchShape, ban_width: int) -> Layout:
    D, T, S, P = shape.decode_rows, shape.num_tokens, shape.num_seqs, shape.pages_per_seq
    NB, Bq, R = shape.num_blocks, shape.block_q, shape.num_rows
    # The sampler's rows come last: `sampling_rows` hands the sampler the tail alone.
    sizes = [("tokens", (T,)), ("feed_index", (T,)), ("positions", (T,)), ("slots", (T,)),
             ("cu_q_lens", (S + 1,)), ("kv_lens", (S,)), ("page_table", (S, P)), ("block_tokens", (NB, Bq)),
             ("block_seq", (NB,)), ("logits_indices", (R,)), ("floats", (R, len(FLOAT_COLUMNS))),
             ("ints", (R, len(STEP_INT_COLUMNS))), ("banned", (R, ban_width))]
    if shape.spec_tokens:  # per speculating sequence (at most one per decode row): first row, drafts
        sizes += [("spec_first", (D,)), ("spec_num", (D,)), ("spec_drafts", (D, shape.spec_tokens))]
    fields, offset = {}, 0
    for name, shp in sizes:
        fields[name] = (offset, shp)
        offset += math.prod(shp)
    out = Layout(shape, ban_width, fields, offset, np.zeros(offset, np.int32), np.arange(D) * P)
    t = out.template
    out.view(t, "feed_index")[:] = -1
    cu = out.view(t, "cu_q_lens")
    cu[1:D + 1] = np.arange(1, D + 1)
    cu[D + 1:] = D
    out.view(t, "kv_lens")[:D] = 1  # a padding decode row attends to slot 0 of the null page
    out.view(t, "page_table")[:] = NULL_PAGE
    out.view(t, "block_tokens")[:] = T
    out.view(t, "logits_indices")[:D] = np.arange(D)
    if shape.spec_tokens:
        out.view(t, "spec_first")[:] = -1
    _put_sampling(out, t, SamplingArrays.from_rows([], R, ban_width))  # padding rows, as from_rows makes them
    return out


def _put_sampling(lay: Layout, buf: np.ndarray, sampling: SamplingArrays) -> None:
    """Write SamplingArrays (numpy) into their place in `buf`."""
    floats = lay.view(buf, "floats")
    for c in FLOAT_COLUMNS:
        floats[:, F[c]] = np.asarray(getattr(sampling, c), np.float32).view(np.int32)
    ints = lay.view(buf, "ints")
    seed = np.asarray(sampling.seed, np.uint32).view(np.int32)
    ints[:, SI["seed_hi"]], ints[:, SI["seed_lo"]] = seed[:, 0], seed[:, 1]
    for c in ("top_k", "penalty_slot", "position", "target", "want_top", "feed_slot"):
        ints[:, SI[c]] = np.asarray(getattr(sampling, c))
    lay.view(buf, "banned")[:] = np.asarray(sampling.banned)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    buffer: jax.Array  # int32 [N]: every array of the step, back to back
    shape: BatchShape = dataclasses.field(metadata={"static": True})
    ban_width: int = dataclasses.field(metadata={"static": True})

    @classmethod
    def empty(cls, shape: BatchShape, ban_width: int) -> StepInputs:
        """A step of this shape with nothing in it (for compiling ahead of use)."""
        return cls(layout(shape, ban_width).template.copy(), shape, ban_width)

    @classmethod
    def from_step(cls, step: ScheduledStep, ban_width: int, page_size: int) -> StepInputs:
        """Pack the scheduler's decision (a pure function of it)."""
        shape = step.shape
        lay = layout(shape, ban_width)
        region = DecodeRegion(step.decode_tokens, step.decode_feed, step.decode_positions, step.decode_pages)
        buf = _pack_work(lay, region, [i.work for i in step.prefill], page_size)
        D, d = shape.decode_rows, step.num_decode

        def at(name, start, values):
            o = lay.offset(name) + start
            buf[o:o + values.size] = values.ravel()

        rows = step.logits
        k = len(rows)
        for start, lo, hi in ((0, 0, d), (D, d, k)):
            if hi > lo:
                at("floats", start * len(FLOAT_COLUMNS), rows.floats[lo:hi].view(np.int32))
                at("ints", start * len(STEP_INT_COLUMNS), rows.ints[lo:hi])
        if len(step.spec_first):  # speculating sequences: their first decode row, drafts
            n = len(step.spec_first)
            at("spec_first", 0, step.spec_first)
            at("spec_num", 0, step.spec_num)
            lay.view(buf, "spec_drafts")[:n] = step.spec_drafts
        if len(rows.stop_ids):  # some row is banned
            banned = lay.view(buf, "banned")
            which = np.flatnonzero(rows.banned)
            batch_rows = np.where(which < d, which, which - d + D)
            width = min(ban_width, rows.stop_ids.shape[1])
            banned[batch_rows, :width] = rows.stop_ids[which, :width]
        return cls(buf, shape, ban_width)

    @classmethod
    def pack(cls, batch: Batch, sampling: SamplingArrays, shape: BatchShape) -> StepInputs:
        """Pack an already built Batch and SamplingArrays (tests and benchmarks)."""
        ban_width = sampling.banned.shape[1]
        lay = layout(shape, ban_width)
        buf = lay.template.copy()  # no speculating sequence (where the shape has room for them)
        for name in ("tokens", "feed_index", "positions", "slots", "cu_q_lens", "kv_lens", "page_table",
                     "block_tokens", "block_seq", "logits_indices"):
            lay.view(buf, name)[:] = np.asarray(getattr(batch, name))
        _put_sampling(lay, buf, sampling)
        return cls(buf, shape, ban_width)

    def unpack(self) -> tuple[Batch, SamplingArrays]:
        """The Batch and SamplingArrays back (under jit: static slices of the buffer)."""
        lay = layout(self.shape, self.ban_width)
        buf = self.buffer if isinstance(self.buffer, np.ndarray) else jnp.asarray(self.buffer)
        v = {name: lay.view(buf, name) for name in lay.fields}
        batch = Batch(tokens=v["tokens"], feed_index=v["feed_index"], positions=v["positions"],
                      slots=v["slots"], cu_q_lens=v["cu_q_lens"], kv_lens=v["kv_lens"],
                      page_table=v["page_table"], block_tokens=v["block_tokens"], block_seq=v["block_seq"],
                      logits_indices=v["logits_indices"], decode_rows=self.shape.decode_rows,
                      max_q_len=max(1, self.shape.prefill_tokens))
        return batch, unpack_sampling(self.sampling_rows(), self.shape.num_rows, self.ban_width)

    def sampling_rows(self):
        """The part of the buffer the sampler reads (its rows' settings: the layout's tail)."""
        return self.buffer[layout(self.shape, self.ban_width).offset("floats"):]

    def needs_full_sampling(self) -> bool:
        """Whether the step's sampler must rank the vocabulary (see sampler.sample's `full`).
        On the host buffer, before it travels."""
        lay = layout(self.shape, self.ban_width)  # read in place: this runs every step
        floats, ints = lay.view(self.buffer, "floats").view(np.float32), lay.view(self.buffer, "ints")
        return needs_full(floats[:, F["temperature"]], ints[:, SI["top_k"]], floats[:, F["top_p"]],
                          ints[:, SI["want_top"]])

    def speculates(self) -> bool:
        """Whether some sequence of the step verifies drafts (the sampler's verifying variant). On the host
        buffer, before it travels."""
        if not self.shape.spec_tokens:
            return False
        return bool(layout(self.shape, self.ban_width).view(self.buffer, "spec_first")[0] >= 0)

    @property
    def size(self) -> int:
        return int(self.buffer.shape[0])


def unpack_sampling(rows, num_rows: int, ban_width: int) -> SamplingArrays:
    """SamplingArrays from `StepInputs.sampling_rows()`, numpy or (under jit) a device array."""
    host = isinstance(rows, np.ndarray)
    if not host:
        rows = jnp.asarray(rows)
    nf, ni = len(FLOAT_COLUMNS), len(STEP_INT_COLUMNS)
    floats = rows[:num_rows * nf].reshape(num_rows, nf)
    ints = rows[num_rows * nf:num_rows * (nf + ni)].reshape(num_rows, ni)
    banned = rows[num_rows * (nf + ni):num_rows * (nf + ni + ban_width)].reshape(num_rows, ban_width)

    def bits(x, dtype):
        return x.view(dtype) if host else jax.lax.bitcast_convert_type(x, dtype)

    floats = bits(floats, np.float32)
    return SamplingArrays(
        **{c: floats[:, F[c]] for c in FLOAT_COLUMNS},
        top_k=ints[:, SI["top_k"]],
        seed=bits(ints[:, SI["seed_hi"]:SI["seed_lo"] + 1], np.uint32),
        position=ints[:, SI["position"]], penalty_slot=ints[:, SI["penalty_slot"]],
        banned=banned, target=ints[:, SI["target"]], want_top=ints[:, SI["want_top"]] != 0,
        feed_slot=ints[:, SI["feed_slot"]])


def unpack_spec(rows, num_rows: int, ban_width: int, decode_rows: int, spec_tokens: int):
    """(first row [D], drafts [D], draft tokens [D, K]) of the speculating sequences, from
    `StepInputs.sampling_rows()` of a shape with spec_tokens K (a first row of -1: no sequence)."""
    at = num_rows * (len(FLOAT_COLUMNS) + len(STEP_INT_COLUMNS) + ban_width)
    D, K = decode_rows, spec_tokens
    return rows[at:at + D], rows[at + D:at + 2 * D], rows[at + 2 * D:at + 2 * D + D * K].reshape(D, K)


@dataclasses.dataclass(slots=True)  # made every step: slots, not frozen (6 µs a frozen init); never changed
class DecodeRegion:
    """The decode sequences of a step, one entry each (numpy): the token at `positions`
    (ignored where fed), the feed slot whose kept token to feed or -1, and page tables."""

    tokens: np.ndarray
    feed: np.ndarray
    positions: np.ndarray
    pages: np.ndarray  # [d, pages_per_seq]


def build(shape: BatchShape, decode: Sequence[SeqWork], prefill: Sequence[SeqWork],
          page_size: int) -> tuple[Batch, list[list[int]]]:
    """Pack one step from per-sequence work (tests and benchmarks). Returns the numpy-backed
    Batch and, per work item (decode first, then prefill), the logits rows of its
    `logit_offsets`."""
    batch, _ = StepInputs(pack_work(shape, decode, prefill, page_size), shape, 1).unpack()
    rows, r = [], shape.decode_rows
    for w in prefill:
        rows.append(list(range(r, r + len(w.logit_offsets))))
        r += len(w.logit_offsets)
    return batch, [[i] if w.logit_offsets else [] for i, w in enumerate(decode)] + rows


def pack_work(shape: BatchShape, decode: Sequence[SeqWork], prefill: Sequence[SeqWork], page_size: int) -> np.ndarray:
    """The buffer of a step (ban width 1, greedy padding rows) from per-sequence work: one token per decode
    item, chunks for prefill ones."""
    for w in decode:
        if len(w.token_ids) != 1:
            raise ValueError("a decode sequence feeds exactly one token")
        if len(w.pages) > shape.pages_per_seq:
            raise ValueError(f"{len(w.pages)} pages do not fit the page table width {shape.pages_per_seq}")
    pages = np.full((len(decode), shape.pages_per_seq), NULL_PAGE, np.int32)
    for i, w in enumerate(decode):
        pages[i, :len(w.pages)] = w.pages
    region = DecodeRegion(np.array([w.token_ids[0] for w in decode], np.int32),
                          np.array([w.feed_slot for w in decode], np.int32),
                          np.array([w.start for w in decode], np.int32), pages)
    return _pack_work(layout(shape, 1), region, prefill, page_size)


def _pack_work(lay: Layout, decode: DecodeRegion, prefill: Sequence[SeqWork], page_size: int) -> np.ndarray:
    """A buffer holding the step's tokens and their places: the decode region with array
    operations, then the prefill chunks back to back."""
    shape = lay.shape
    D, Bq, T, R, P = shape.decode_rows, shape.block_q, shape.num_tokens, shape.num_rows, shape.pages_per_seq
    d = len(decode.positions)
    if d > D or len(prefill) > shape.prefill_seqs:
        raise ValueError(f"{d} decode / {len(prefill)} prefill sequences do not fit {shape}")
    buf = lay.template.copy()

    def at(name, values):
        o = lay.offset(name)
        buf[o:o + values.size] = values.ravel()

    if d:
        pos = decode.positions
        page_index = pos // page_size
        if int(page_index.max()) >= P:
            raise ValueError(f"position {int(pos.max())} is past the page table width {P}")
        at("tokens", decode.tokens)
        at("feed_index", decode.feed)
        at("positions", pos)
        at("slots", decode.pages.ravel()[lay.page_row_starts[:d] + page_index] * page_size + pos % page_size)
        at("kv_lens", pos + 1)
        at("page_table", decode.pages)
    if not prefill:
        return buf
    tokens, feed, positions, slots = (lay.view(buf, n) for n in ("tokens", "feed_index", "positions", "slots"))
    cu, kv_lens, table = lay.view(buf, "cu_q_lens"), lay.view(buf, "kv_lens"), lay.view(buf, "page_table")
    block_tokens, block_seq = lay.view(buf, "block_tokens"), lay.view(buf, "block_seq")
    logits = lay.view(buf, "logits_indices")
    t, b, r = D, 0, D
    for j, w in enumerate(prefill):
        if len(w.pages) * page_size < w.start + len(w.token_ids) or len(w.pages) > P:
            raise ValueError(f"{len(w.pages)} pages do not cover positions up to "
                             f"{w.start + len(w.token_ids)} (page table width {P})")
        s, n = D + j, len(w.token_ids)
        tokens[t:t + n] = w.token_ids
        if w.feed_slot >= 0:
            feed[t + n - 1] = w.feed_slot
        pos = np.arange(w.start, w.start + n)
        positions[t:t + n] = pos
        kv_lens[s] = w.start + n
        table[s, :len(w.pages)] = w.pages
        slots[t:t + n] = table[s, pos // page_size] * page_size + pos % page_size
        cu[s + 1] = t + n
        for first in range(0, n, Bq):
            size = min(Bq, n - first)
            block_tokens[b, :size] = np.arange(t + first, t + first + size)
            block_seq[b] = s
            b += 1
        k = len(w.logit_offsets)
        logits[r:r + k] = [t + o for o in w.logit_offsets]
        r += k
        t += n
    if t > T or b > shape.num_blocks or r > R:
        raise ValueError(f"prefill work ({t - D} tokens, {b} blocks, {r - D} rows) does not fit {shape}")
    cu[D + len(prefill) + 1:] = t
    return buf
