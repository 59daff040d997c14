"""The scheduler: which sequences run in the next step, and how much of each.

Plain Python; it never touches device arrays. Each step it walks the running
sequences in priority order (lower `priority`, then earlier arrival, first),
gives each decode one token and each prefill a chunk under the token budget
(chunked prefill: a long prompt never blocks running decodes), then admits
waiting requests while pages, rows and budget remain. When a running sequence
needs a page and none is free, the newest running sequence is preempted: its
pages go back (its full pages stay in the prefix cache) and it waits to be
recomputed, so the oldest request always keeps its progress.

The step's shape is picked from a small fixed set of buckets (decode rows x
prefill tokens), all compiled at warm-up.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Iterator

from jaxinfer.core.page_pool import PagePool, chain_hashes
from jaxinfer.core.request import Request, Sequence, Status
from jaxinfer.core.sampling_params import seed_for
from jaxinfer.core.shapes import BatchShape, SeqWork, next_bucket, pages_needed


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once (decode rows of a step)
    max_num_batched_tokens: int = 512  # tokens per step, decode and prefill together
    max_model_len: int = 2048  # longest sequence, prompt and output
    page_size: int = 16
    num_pages: int = 1024  # KV pages in the pool, page 0 (scratch) included
    block_q: int = 64  # query block of the prefill region
    prompt_logprob_rows: int = 32  # logits rows per step for prompt logprobs
    enable_prefix_caching: bool = True
    # Compiled step sizes; empty: powers of two (decode rows) and block_q * 4^k (prefill tokens).
    decode_sizes: tuple[int, ...] = ()
    prefill_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.block_q < 1 or self.block_q & (self.block_q - 1):
            raise ValueError("block_q must be a power of two")
        if self.decode_sizes and (sorted(self.decode_sizes) != list(self.decode_sizes)
                                  or self.decode_sizes[0] < 1 or self.decode_sizes[-1] < self.max_num_seqs):
            raise ValueError("decode_sizes must be increasing and reach max_num_seqs")
        if self.prefill_sizes and (sorted(self.prefill_sizes) != list(self.prefill_sizes)
                                   or any(t <= 0 or t % self.block_q for t in self.prefill_sizes)):
            raise ValueError("prefill_sizes must be increasing multiples of block_q")

    @property
    def pages_per_seq(self) -> int:
        return pages_needed(self.max_model_len, self.page_size)

    @property
    def max_decode_rows(self) -> int:
        return self.decode_buckets()[-1]

    @property
    def max_prefill_tokens(self) -> int:
        if self.prefill_sizes:
            return self.prefill_sizes[-1]
        return -(-self.max_num_batched_tokens // self.block_q) * self.block_q

    def decode_buckets(self) -> list[int]:
        if self.decode_sizes:
            return list(self.decode_sizes)
        out, d, top = [], 2, next_bucket(self.max_num_seqs, 2)
        while d < top:
            out.append(d)
            d *= 2
        return out + [top]

    def prefill_buckets(self) -> list[int]:
        """0, then block_q * 4^k, then the largest (or the configured sizes)."""
        if self.prefill_sizes:
            return [0, *self.prefill_sizes]
        out, t = [0], self.block_q
        while t < self.max_prefill_tokens:
            out.append(t)
            t *= 4
        return out + [self.max_prefill_tokens]

    def shape(self, decode_rows: int, prefill_tokens: int) -> BatchShape:
        return BatchShape(decode_rows, prefill_tokens, self.block_q, self.pages_per_seq,
                          self.prompt_logprob_rows)

    def all_shapes(self) -> list[BatchShape]:
        return [self.shape(d, t) for d in self.decode_buckets() for t in self.prefill_buckets()]


@dataclasses.dataclass
class ScheduledItem:
    seq: Sequence
    epoch: int
    work: SeqWork
    samples: bool  # the chunk ends the sequence's known tokens: a token is sampled
    prompt_positions: range  # positions whose logits score prompt token position + 1


@dataclasses.dataclass
class ScheduledStep:
    shape: BatchShape
    decode: list[ScheduledItem]
    prefill: list[ScheduledItem]
    page_copies: list[tuple[int, int]]  # (src, dst) device page copies to run first (forks)
    slot_resets: list[tuple[int, list[int], int]]  # (penalty slot, tokens, prompt length)

    @property
    def items(self) -> Iterator[ScheduledItem]:
        yield from self.decode
        yield from self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(len(i.work.token_ids) for i in self.items)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.pool = PagePool(cfg.num_pages, cfg.page_size, cfg.enable_prefix_caching)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.free_slots = list(range(cfg.max_num_seqs - 1, -1, -1))  # penalty-state rows
        self.num_preemptions = 0
        self._prefill_shapes = cfg.prefill_buckets()
        self._decode_shapes = cfg.decode_buckets()

    # ---- requests -----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        seq = Sequence(request, 0, seed_for(request.seed, 0))
        request.sequences.append(seq)
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and give back what it holds."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._register_full_pages(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    @property
    def num_running_weight(self) -> int:
        """Sequences running, counting an unforked request as the n it will become."""
        return sum(s.request.n if s.is_unforked_parent else 1 for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        cfg = self.cfg
        self._budget = cfg.max_num_batched_tokens
        self._decode: list[ScheduledItem] = []
        self._prefill: list[ScheduledItem] = []
        self._prefill_tokens = 0
        self._prompt_rows = 0
        self._copies: list[tuple[int, int]] = []
        self._resets: list[tuple[int, list[int], int]] = []
        preempted = False

        i = 0
        while i < len(self.running) and self._budget > 0:
            seq = self.running[i]
            if seq.is_unforked_parent and seq.remaining == 0:
                if not self._fork(seq):
                    preempted = True
                    break  # seq itself was preempted: it was the last one running
            before = self.num_preemptions
            if self._schedule_seq(seq, may_preempt=True) is None:
                break  # preempted itself
            preempted |= self.num_preemptions != before
            i += 1

        # Admit waiting sequences in order; never past one that does not fit (first come, first served).
        while self.waiting and not preempted and self._budget > 0:
            seq = self.waiting[0]
            weight = seq.request.n if seq.is_unforked_parent else 1
            if self.num_running_weight + weight > cfg.max_num_seqs:
                break
            if seq.uses_penalties and not self.free_slots:
                break
            if not self._admit(seq):
                break

        if not self._decode and not self._prefill:
            return None
        shape = self._pick_shape()
        return ScheduledStep(shape, self._decode, self._prefill, self._copies, self._resets)

    def _admit(self, seq: Sequence) -> bool:
        cfg, req = self.cfg, seq.request
        hits: list[int] = []
        if cfg.enable_prefix_caching and req.params.prompt_logprobs is None:
            # Leave at least one token to compute: its logits give the first sample.
            usable = seq.target_len - (0 if seq.is_unforked_parent else 1)
            chain_hashes(seq.tokens[:usable - usable % cfg.page_size], cfg.page_size, seq.hashes)
            hits = self.pool.lookup(seq.hashes[:usable // cfg.page_size])
            self.pool.record_lookup(max(usable, 0), len(hits) * cfg.page_size)
        self.pool.acquire(hits)
        seq.pages = list(hits)
        seq.num_computed = len(hits) * cfg.page_size
        seq.num_registered = len(hits)
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)
        if seq.uses_penalties:
            self._take_slot(seq)
        if seq.is_unforked_parent and seq.remaining == 0:
            if not self._fork(seq, may_preempt=False):
                self._unadmit(seq)
                return False
            self._schedule_seq(seq, may_preempt=False)  # the forked ones stay admitted regardless
        elif not self._schedule_seq(seq, may_preempt=False):
            self._unadmit(seq)
            return False
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
            req.num_cached_tokens = len(hits) * cfg.page_size
        self.waiting.remove(seq)
        return True

    def _unadmit(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING

    def _schedule_seq(self, seq: Sequence, may_preempt: bool) -> ScheduledItem | bool | None:
        """Give `seq` its share of this step. Returns the item, False when nothing fits this
        step, or None when `seq` had to be preempted (or could not be admitted)."""
        cfg = self.cfg
        remaining = seq.remaining
        if remaining <= 0:
            return False
        decode = remaining == 1
        if decode:
            if len(self._decode) >= cfg.max_decode_rows:
                return False
            chunk = 1
        else:
            if len(self._prefill) >= cfg.max_prefill_tokens // cfg.block_q:
                return False
            chunk = min(remaining, self._budget, cfg.max_prefill_tokens - self._prefill_tokens)
            chunk = self._limit_for_prompt_logprobs(seq, chunk)
            if chunk <= 0:
                return False
        need = pages_needed(seq.num_computed + chunk, cfg.page_size) - len(seq.pages)
        if need > 0:
            if not self._make_room(need, seq, may_preempt):
                return None
            seq.pages += self.pool.allocate(need)

        start = seq.num_computed
        samples = not seq.is_unforked_parent and start + chunk == seq.num_tokens
        req = seq.request
        prompt_positions = range(0)
        if req.params.prompt_logprobs is not None and seq.index == 0:
            lo = max(start, len(req.prompt_logprobs))
            prompt_positions = range(lo, max(lo, min(start + chunk, seq.prompt_len - 1)))
        if seq.pending:
            work = SeqWork([0], start, seq.pages, feed_row=seq.pending_row)
        else:
            work = SeqWork(seq.tokens[start:start + chunk], start, seq.pages)
        offsets = [p - start for p in prompt_positions] + ([chunk - 1] if samples else [])
        work.logit_offsets = offsets
        item = ScheduledItem(seq, seq.epoch, work, samples, prompt_positions)
        (self._decode if decode else self._prefill).append(item)
        if not decode:
            self._prefill_tokens += chunk
            self._prompt_rows += len(prompt_positions)
        self._budget -= chunk
        seq.num_computed += chunk
        self._register_full_pages(seq)
        return item

    def _limit_for_prompt_logprobs(self, seq: Sequence, chunk: int) -> int:
        req = seq.request
        if req.params.prompt_logprobs is None or seq.index != 0:
            return chunk
        left = min(self.cfg.prompt_logprob_rows, self.cfg.max_prefill_tokens) - self._prompt_rows
        lo = max(seq.num_computed, len(req.prompt_logprobs))
        if lo >= seq.prompt_len - 1:
            return chunk
        return min(chunk, lo - seq.num_computed + left)

    def _pick_shape(self) -> BatchShape:
        cfg = self.cfg
        decode_rows = next(d for d in self._decode_shapes if d >= len(self._decode))
        prefill_tokens = 0
        if self._prefill:
            for t in self._prefill_shapes[1:]:
                shape = cfg.shape(decode_rows, t)
                rows = sum(len(i.work.logit_offsets) for i in self._prefill)
                if (t >= self._prefill_tokens and shape.prefill_seqs >= len(self._prefill)
                        and shape.prefill_rows >= rows):
                    prefill_tokens = t
                    break
            else:
                raise AssertionError("scheduled prefill work fits no bucket")
        return cfg.shape(decode_rows, prefill_tokens)

    # ---- pages, forks, preemption -------------------------------------------------------------

    def _make_room(self, pages: int, seq: Sequence, may_preempt: bool) -> bool:
        """Free pages until `pages` are available, preempting from the back of the running
        list. False when `seq` itself is the one to go (it is then preempted) or when
        preemption is not allowed."""
        while self.pool.num_free_pages < pages:
            if not may_preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _fork(self, parent: Sequence, may_preempt: bool = True) -> bool:
        """Split a prefilled n > 1 request into its n sequences, sharing the prompt's pages."""
        cfg, req = self.cfg, parent.request
        partial = parent.num_computed % cfg.page_size != 0
        if not self._make_room((req.n - 1) if partial else 0, parent, may_preempt):
            return False
        for index in range(1, req.n):
            pages, copy = self.pool.fork(parent.pages, parent.num_computed)
            child = Sequence(req, index, seed_for(req.seed, index))
            child.pages = pages
            child.num_computed = parent.num_computed
            child.hashes = list(parent.hashes)
            child.num_registered = min(parent.num_registered, parent.num_computed // cfg.page_size)
            child.status = Status.RUNNING
            if copy is not None:
                self._copies.append(copy)
            if child.uses_penalties:
                self._take_slot(child)
            req.sequences.append(child)
            bisect.insort(self.running, child, key=lambda s: s.sort_key)
        req.forked = True
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: give back pages and slot; known tokens are kept."""
        self.running.remove(seq)
        self._register_full_pages(seq)
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.pending = 0
        seq.epoch += 1
        if seq.penalty_slot >= 0:
            self.free_slots.append(seq.penalty_slot)
            seq.penalty_slot = -1

    def _take_slot(self, seq: Sequence) -> None:
        seq.penalty_slot = self.free_slots.pop()
        self._resets.append((seq.penalty_slot, list(seq.tokens), seq.prompt_len))

    def _register_full_pages(self, seq: Sequence) -> None:
        """Offer pages whose tokens are all known and whose K/V is (being) written to the cache."""
        if not self.cfg.enable_prefix_caching:
            return
        ps = self.cfg.page_size
        full = min(seq.num_computed, len(seq.tokens)) // ps
        if full <= seq.num_registered:
            return
        chain_hashes(seq.tokens[:full * ps], ps, seq.hashes)
        for i in range(seq.num_registered, full):
            self.pool.register(seq.pages[i], seq.hashes[i])
        seq.num_registered = full
