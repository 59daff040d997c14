"""The scheduler: which sequences run in the next step, and how much of each.

Plain Python and numpy; it never touches device arrays. Each step:

  1. every running sequence with one token left to compute decodes: one token
     each, found and advanced with array arithmetic over the SeqTable (no
     Python object per sequence); a decode that needs a new page takes a free
     one, and when none is free the newest running sequence is preempted;
  2. running sequences with more than one token left (prompts, recomputation
     after preemption) get prefill chunks in priority order (lower `priority`,
     then earlier arrival, first) under the token budget: chunked prefill, so
     a long prompt never blocks running decodes;
  3. waiting requests are admitted in the same order while rows, pages and
     budget remain.

With speculative decoding (EngineConfig.speculative_config), step 1 also asks
the proposer for drafts: a decoding sequence whose last token the host knows
may carry up to k drafted tokens, each one more decode row at the next
position, as many as pay for their rows (`_rows_worth_drafting`). `update()`
then appends the tokens verification kept and moves the sequence's computed
positions back past the rest.

Preemption is by recompute: a preempted sequence gives back its pages (its
full pages stay in the prefix cache) and waits to be recomputed, so the oldest
request always keeps its progress. An n > 1 request prefills its prompt once,
then forks.

`schedule()` returns the decision as a ScheduledStep; `update()` takes the
tokens a step sampled, appends them, and finishes sequences that hit a stop id
or their length. The step's shape is picked from a small fixed set of buckets
(decode rows x prefill tokens), all compiled at warm-up.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

import numpy as np

from jaxinfer.core.config import EngineConfig
from jaxinfer.core.page_pool import PagePool, chain_hashes
from jaxinfer.core.request import Request, Sequence, Status
from jaxinfer.core.sampling_params import seed_for
from jaxinfer.core.seq_table import SI, SeqTable
from jaxinfer.core.shapes import BatchShape, SeqWork, pages_needed
from jaxinfer.spec_decode.ngram import NgramProposer
from jaxinfer.spec_decode.proposer import DraftQuery, Proposer


@dataclasses.dataclass
class ScheduledItem:
    """A prefill chunk: one sequence's several tokens in the prefill region."""

    seq: Sequence
    work: SeqWork
    samples: bool  # the chunk ends the sequence's known tokens: a token is sampled
    prompt_positions: range  # positions whose logits score prompt token position + 1


@dataclasses.dataclass(slots=True)  # made every step: slots, not frozen (a frozen init costs µs); never changed
class LogitsRows:
    """What each logits row of a step is for; [n] each. The first `num_decode` are the
    decode rows 0..d-1 of the batch, the rest the prefill rows from D on."""

    floats: np.ndarray  # [n, len(FLOAT_COLUMNS)] float32 sampling settings
    ints: np.ndarray  # [n, len(STEP_INT_COLUMNS)] int32 (position, target and want_top included)
    banned: np.ndarray  # bool: ban the sequence's stop ids (min_tokens not reached)
    stop_ids: np.ndarray  # [n, stop_width] the ids `banned` bans (only read where banned; [0] when none is)

    def __len__(self) -> int:
        return len(self.ints)

    @property
    def want_top(self) -> np.ndarray:
        """bool: rows that return top-n logprobs."""
        return self.ints[:, SI["want_top"]] > 0


def _none():
    return dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


@dataclasses.dataclass(slots=True)  # made every step: slots, not frozen (a frozen init costs µs); never changed
class ScheduledStep:
    """One step, decided: a value that nothing changes after `schedule()` returns."""

    shape: BatchShape
    # Decode region, one entry per decode sequence, in batch order.
    decode_seq_rows: np.ndarray  # SeqTable rows
    decode_tokens: np.ndarray  # token at `position` (ignored where fed)
    decode_feed: np.ndarray  # feed slot (the sequence's own table row) whose kept token to feed, or -1
    decode_positions: np.ndarray
    decode_pages: np.ndarray  # [d, pages_per_seq] page tables
    decode_seqs: np.ndarray  # object: the Sequences
    prefill: list[ScheduledItem]
    logits: LogitsRows
    # Rows that sample a token: batch logits row, SeqTable row, and its occupancy then.
    sample_rows: np.ndarray
    sample_seq_rows: np.ndarray
    sample_occupancy: np.ndarray
    # Prompt-logprob rows: (request, first position, batch logits rows).
    prompt_scores: list[tuple[Request, int, list[int]]]
    page_copies: list[tuple[int, int]]  # (src, dst) device page copies to run first (forks)
    slot_resets: list[tuple[int, list[int], int]]  # (penalty slot, tokens, prompt length)
    num_tokens: int
    # Speculating sequences, [s] each: batch row of the first of their 1 + num decode rows (their last
    # known token, then the drafts), drafts, drafts padded to spec_tokens; the sample row of such a
    # sequence is its first row, and the verification writes its emitted tokens from there on.
    spec_first: np.ndarray = _none()
    spec_num: np.ndarray = _none()
    spec_drafts: np.ndarray = _none()

    @property
    def num_decode(self) -> int:
        return len(self.decode_seq_rows)

    @property
    def seqs(self) -> list[Sequence]:
        """The step's sequences: decodes, then prefills."""
        return [*self.decode_seqs.tolist(), *(i.seq for i in self.prefill)]


@dataclasses.dataclass(slots=True)  # made every step: slots, not frozen (a frozen init costs µs); never changed
class StepUpdate:
    """What `update` did with one step's samples: per accepted sample (arrays of [k])."""

    seqs: np.ndarray  # object: the Sequence
    seq_ids: np.ndarray  # int64: each Sequence's id for the frontend
    tokens: np.ndarray
    sample_rows: np.ndarray  # batch logits row it was sampled at
    finished: np.ndarray  # bool: this token finished the sequence (stop id or length)


class Scheduler:
    def __init__(self, cfg: EngineConfig, stop_width: int = 72, proposer: Proposer | None = None):
        """`cfg` resolved (max_model_len and num_pages set); `stop_width`: most stop ids
        (EOS included) a sequence can have; `proposer`: speculation's (jaxinfer/spec_decode/), where
        cfg.speculative_config asks for one (an n-gram one is made here when none is given)."""
        if cfg.max_model_len is None or cfg.num_pages is None:
            raise ValueError("the scheduler needs max_model_len and num_pages resolved")
        self.cfg = cfg
        self.stop_width = stop_width
        self.pool = PagePool(cfg.num_pages, cfg.page_size, cfg.enable_prefix_caching, partitions=cfg.kv_partitions)
        self.table = SeqTable(cfg.max_num_seqs, cfg.max_model_len, cfg.pages_per_seq, stop_width)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.free_slots = list(range(cfg.max_num_seqs - 1, -1, -1))  # penalty-state rows
        self.num_preemptions = 0
        self._first_scheduled: list[Request] = []  # since take_first_scheduled()
        self._preempted_seqs: list[Sequence] = []  # since take_preempted()
        self._prefill_shapes = cfg.prefill_buckets()
        self._decode_shapes = cfg.decode_buckets()
        self._mixed_decode_shapes = cfg.mixed_decode_buckets()
        self._max_decode_rows = self._decode_shapes[-1]
        # The decode-only shape for each number of decodes (looked up every step).
        self._decode_shape_for = [cfg.shape(next(d for d in self._decode_shapes if d >= max(n, 1)), 0)
                                  for n in range(self._max_decode_rows + 1)]
        self._running_rows: np.ndarray | None = None  # rows of `running`, in order (cached)
        # While a background warm-up runs: the shapes already compiled. Steps are fitted to
        # them where the work allows (shorter prefill chunks, more decode rows than needed);
        # None: every shape is ready.
        self.ready_shapes: frozenset[BatchShape] | None = None
        self._in_step = np.zeros(cfg.max_num_seqs, bool)  # decode rows of the step being scheduled
        spec = cfg.speculative_config
        if spec is not None and proposer is None:
            if spec.method != "ngram":
                raise ValueError(f"speculative method {spec.method!r} needs its proposer (the engine core makes it)")
            proposer = NgramProposer(spec.num_speculative_tokens, *spec.lookup)
        self.proposer = proposer if spec is not None else None
        self.spec_batch_limit = spec.batch_limit if spec else 0
        self._drafts: dict[int, np.ndarray] = {}  # SeqTable row -> its drafts in the step being scheduled
        self.num_drafted = 0  # drafted tokens verified so far, and how many of them were kept
        self.num_accepted = 0
        k = cfg.num_speculative_tokens
        self.drafted_per_position = np.zeros(k, np.int64)  # drafts at place i of their sequence's run
        self.accepted_per_position = np.zeros(k, np.int64)  # ... and those kept
        # Back-off per SeqTable row: a sequence whose lookup found nothing, or whose drafts were all rejected,
        # waits 2, 4, ... 32 steps before it tries again, and while every running sequence waits, the engine
        # keeps its one-step-ahead loop (reading a step back before the next costs the host's time per step).
        self._spec_wait = np.zeros(cfg.max_num_seqs, np.int32)
        self._spec_misses = np.zeros(cfg.max_num_seqs, np.int32)
        self._spec_allowed = np.zeros(cfg.max_num_seqs, bool)  # the request did not opt out (speculate=False)
        self._spec_kept = np.zeros(cfg.max_num_seqs, np.float64)  # drafts kept and rejected, decayed
        self._spec_rejected = np.zeros(cfg.max_num_seqs, np.float64)
        # Steps ahead of the read-back (`pipelined`): per row, the drafts of dispatched steps not yet read back
        # (taken as kept until then), and the drafts of the step last dispatched (what a proposal ahead of its
        # read-back builds on).
        self._ahead = np.zeros(cfg.max_num_seqs, np.int32)
        self._last_drafts: dict[int, np.ndarray] = {}
        self.num_rolled_back = 0  # sequences' steps ahead found void at the read-back of the step before
        self.bucket_seconds: dict[int, float] = {}  # decode rows -> measured seconds of a step (engine core)
        self.propose_seconds = 0.0  # what a proposal costs (engine core, from last_propose_seconds)
        self.last_propose_seconds: float | None = None

    # ---- requests -----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        seq = Sequence(request, 0, seed_for(request.seed, 0))
        request.sequences.append(seq)
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence, reason: str | None = None, stop_reason=None) -> None:
        """Take a finished (or aborted) sequence out and give back what it holds."""
        if seq.status is Status.FINISHED:
            return
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status is Status.RUNNING:
            self._register_full_pages(seq)
            self._take_out(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def take_first_scheduled(self) -> list[Request]:
        """Requests scheduled for the first time since the last call."""
        out, self._first_scheduled = self._first_scheduled, []
        return out

    def take_preempted(self) -> list[Sequence]:
        """Sequences preempted since the last call (one entry per preemption)."""
        out, self._preempted_seqs = self._preempted_seqs, []
        return out

    @property
    def num_running_weight(self) -> int:
        """Sequences running, counting an unforked request as the n it will become."""
        return sum(s.request.n if s.is_unforked_parent else 1 for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        cfg, t = self.cfg, self.table
        self._budget = cfg.max_num_batched_tokens
        self._prefill: list[ScheduledItem] = []
        self._prefill_tokens = 0
        self._prompt_rows = 0
        self._copies: list[tuple[int, int]] = []
        self._resets: list[tuple[int, list[int], int]] = []
        self._preempted = False
        self._extra_decodes: list[int] = []

        # Forks first: a parent whose prompt is in becomes its n sequences.
        rows = self._rows()
        if t.num_parents:
            ready = rows[(t.target_cut[rows] == 1) & (t.num_computed[rows] == t.prompt_len[rows] - 1)]
            for seq in t.seqs[ready].tolist():
                if seq.status is Status.RUNNING:
                    self._fork(seq)

        decode = self._schedule_decodes()
        self._budget -= len(decode)
        self._drafts = {}
        if self.proposer is not None and len(decode):
            self._propose(decode)
        self._limit = self._prefill_limit(len(decode) + self._num_drafts)

        # Prefill chunks of running sequences, in priority order (none when all of them decode).
        rows = self._rows()
        if len(decode) < len(rows):
            known = t.num_tokens[rows] + t.pending[rows] + self._ahead[rows]
            left = np.where(t.target_cut[rows] == 1, t.prompt_len[rows] - 1, known) - t.num_computed[rows]
            prefilling = np.flatnonzero(left > 1).tolist()
        else:
            prefilling = []
        for i in prefilling:
            if self._budget <= 0 or not self._limit:
                break
            seq = self.running[i] if i < len(self.running) else None
            if seq is None or seq.status is not Status.RUNNING or seq.row != rows[i]:
                continue  # preempted by an earlier one this step
            self._schedule_prefill(seq, may_preempt=True)

        # Admit waiting sequences in order; never past one that does not fit (first come, first served).
        while self.waiting and not self._preempted and self._budget > 0 and self._limit:
            seq = self.waiting[0]
            weight = seq.request.n if seq.is_unforked_parent else 1
            if self.num_running_weight + weight > cfg.max_num_seqs:
                break
            if seq.uses_penalties and not self.free_slots:
                break
            if not self._admit(seq):
                break

        # Decodes preempted by a later prefill (from the back) leave the step.
        if self._extra_decodes:
            decode = np.concatenate([decode, np.array(self._extra_decodes, np.int64)])
        decode = decode[self._in_step[decode]]
        self._in_step[:] = False
        if not len(decode) and not self._prefill:
            return None
        return self._finalize(decode)

    def _schedule_decodes(self) -> np.ndarray:
        """Give every running sequence with one token left that token; returns their rows."""
        t, ps = self.table, self.cfg.page_size
        rows = self._rows()
        if not len(rows):
            return rows
        target = t.num_tokens[rows] + t.pending[rows] + self._ahead[rows]
        if t.num_parents:
            target = np.where(t.target_cut[rows] == 1, t.prompt_len[rows] - 1, target)
        decode = rows[target - t.num_computed[rows] == 1]
        need = decode[t.num_computed[decode] >= t.num_pages[decode] * ps]
        if len(need) > self.pool.num_free_pages or (self.pool.partitions > 1 and len(need)):
            decode = self._decode_pages_preempting(decode, need)  # a page per row, from its partition
        elif len(need):
            pages = self.pool.allocate(len(need))
            t.page_table[need, t.num_pages[need]] = pages
            t.num_pages[need] += 1
            seqs = t.seqs[need]
            for seq, page in zip(seqs, pages):
                seq.pages.append(page)
        self._in_step[decode] = True
        t.num_computed[decode] += 1
        return decode

    @property
    def spec_k(self) -> int:
        """The most drafts a sequence may carry in the next step (0: speculation off or faded out)."""
        return self.proposer.k if self.may_speculate() else 0

    def may_speculate(self) -> bool:
        """Whether the next step may carry drafts: speculation is configured, the load is low enough and some
        running sequence is not backing off. Unless `pipelined`, the engine then reads each step back before
        scheduling the next, as drafts follow the last token."""
        if self.proposer is None or not 0 < len(self.running) <= self.spec_batch_limit:
            return False
        rows = self._rows()
        return bool(((self._spec_wait[rows] == 0) & self._spec_allowed[rows]).any())

    @property
    def pipelined(self) -> bool:
        """Whether steps with drafts may run one ahead of the read-back, as plain decoding does: the proposer
        reads nothing but the tokens it is given (it writes no pages of its own) and no running sequence has
        penalties (a void step would count its tokens in the device's penalty state).

        The step ahead takes the drafts in flight as kept and feeds the pending token from the device; its
        own drafts follow the proposer's guess at that token. Where the read-back then shows a draft rejected
        or the guess wrong, the step ahead is void for that sequence: its row is renewed (so the step's tokens
        read back as stale), its computed positions move back to what is known, and the next step goes on
        from there. Its K/V lands past what is known and is written over before anything reads it."""
        if self.proposer is None or self.proposer.writes_pages:
            return False
        rows = self._rows()
        return bool((self.table.int_cols[rows, SI["penalty_slot"]] < 0).all())

    @property
    def _num_drafts(self) -> int:
        """Drafted tokens (decode rows beyond one per sequence) in the step being scheduled."""
        return sum(len(d) for d in self._drafts.values())

    def _start_spec(self, row: int, params) -> None:
        """A sequence takes `row`: its speculation state starts afresh."""
        self._spec_wait[row] = self._spec_misses[row] = self._ahead[row] = 0
        self._spec_kept[row] = self._spec_rejected[row] = 0.0
        self._spec_allowed[row] = params.speculate
        if self.proposer is not None:
            self.proposer.forget(row)

    def _spec_missed(self, row: int) -> None:
        self._spec_misses[row] += 1
        self._spec_wait[row] = min(1 << int(self._spec_misses[row]), 32)

    def _propose(self, decode: np.ndarray) -> None:
        """Drafts for decoding sequences whose last token the host knows, as many as pay for their rows
        (`_rows_worth_drafting`), while budget and free pages last (drafts never preempt). Each drafted token
        is one more decode row and one more computed position, rolled back in `update` where verification
        rejects it."""
        rows = self._rows()
        self._spec_wait[rows] = np.maximum(self._spec_wait[rows] - 1, 0)
        if not self.may_speculate():
            return
        t = self.table
        ahead = self.pipelined
        most = {}
        for row in decode.tolist():
            if (t.pending[row] and not ahead) or t.target_cut[row] or self._spec_wait[row] \
                    or not self._spec_allowed[row]:
                continue
            # Tokens up to the one this step feeds (the pending one and the drafts before it counted in).
            k = min(self.proposer.k, int(t.max_len[row]) - int(t.num_computed[row]) - 1)
            if k > 0:
                most[row] = k
        # Which sequences' drafts would pay for their rows and for the proposal, decided before any is made:
        # a draft model's proposal costs device time of its own.
        queries, guessing = [], []
        for row, k in self._rows_worth_drafting(len(decode), most).items():
            n_tokens = int(t.num_tokens[row])
            tokens = t.token_ids[row, :n_tokens]
            if t.pending[row]:
                # Ahead of the read-back: the drafts in flight taken as kept, then one more token proposed, a
                # guess at the pending one (which the step feeds from the device), dropped. Where the guess
                # is wrong the drafts after it are merely unlikely to be kept: the verification reads the
                # token fed, not the guess.
                tokens = np.concatenate([tokens, self._last_drafts.get(row, tokens[:0])])
                guessing.append(row)
                k += 1
            if self.proposer.writes_pages:
                # Every position a draft may take gets its page first (the proposer writes its own K/V
                # there); where free pages run short, fewer drafts.
                k = min(k, self._pages_for(row, n_tokens + k) - n_tokens)
            if k > 0:
                queries.append(DraftQuery(row, tokens, k, t.page_table[row, :t.num_pages[row]]))
        if not queries:
            return
        started = time.perf_counter()
        proposals = self.proposer.propose(queries)
        self.last_propose_seconds = time.perf_counter() - started
        guessing = set(guessing)
        for q, drafts in zip(queries, proposals):
            k = q.k
            if q.row in guessing:
                drafts, k = drafts[1:], k - 1
            if not len(drafts):
                self._spec_missed(q.row)
                continue
            drafts = np.asarray(drafts[:max(0, min(k, self._budget))], np.int32)
            n, first = len(drafts), int(t.num_computed[q.row])  # the first draft's position
            if not n or self._pages_for(q.row, first + n) < first + n:
                continue
            t.num_computed[q.row] += n
            self._drafts[q.row] = drafts
            self._budget -= n

    def _pages_for(self, row: int, positions: int) -> int:
        """Give sequence `row` pages for `positions` positions while free pages last (never preempting);
        returns how many positions its pages then cover."""
        t, ps = self.table, self.cfg.page_size
        seq = t.seqs[row]
        need = min(pages_needed(positions, ps) - int(t.num_pages[row]), self.pool.free_pages(seq.rank))
        if need > 0:
            seq.pages += self.pool.allocate(need, seq.rank)
            t.set_pages(row, seq.pages)
        return int(t.num_pages[row]) * ps

    def _rows_worth_drafting(self, num_decode: int, most: dict[int, int]) -> dict[int, int]:
        """How many drafts each sequence carries (at most `most[row]`): the load-adaptive part.

        Draft j of a sequence whose drafts are each kept with probability a (its own running estimate)
        adds a^j expected tokens and one decode row. For every decode bucket the drafts can fill, the most
        valuable drafts are counted in, and the bucket that gives the most expected tokens per second of
        step (`bucket_seconds`, measured by the engine, plus `propose_seconds` where it carries drafts)
        wins; a bucket not yet measured is taken to cost what the next smaller measured one does, so it
        gets tried once. More running sequences leave fewer rows to fill, so speculation fades as the batch
        fills."""
        if not most:
            return {}
        values = sorted(((self._acceptance(row) ** j, row) for row, k in most.items()
                         for j in range(1, k + 1)), key=lambda v: -v[0])
        best, best_rate = 0, -1.0
        known = 0.0
        for bucket in self._decode_shapes:
            if bucket < num_decode:
                continue
            known = self.bucket_seconds.get(bucket, known)
            extra = min(bucket - num_decode, len(values))
            tokens = num_decode + sum(v for v, _ in values[:extra])
            cost = known + (self.propose_seconds if extra else 0.0)
            rate = tokens / cost if cost > 0 else tokens
            if rate > best_rate + 1e-12:
                best, best_rate = extra, rate
        keep: dict[int, int] = {}
        for _, row in values[:best]:
            keep[row] = keep.get(row, 0) + 1
        return keep

    def _acceptance(self, row: int) -> float:
        """The chance that a draft of this sequence is kept: its kept and rejected drafts so far (decayed),
        from an even prior."""
        return (self._spec_kept[row] + 1.0) / (self._spec_kept[row] + self._spec_rejected[row] + 2.0)

    def _decode_pages_preempting(self, decode: np.ndarray, need: np.ndarray) -> np.ndarray:
        """Pages for the decodes in `need` (in priority order), preempting from the back."""
        t = self.table
        for row in need.tolist():
            seq = t.seqs[row]
            if seq is None or t.occupancy[row] < 0:
                continue  # preempted for an earlier one
            while self.pool.free_pages(seq.rank) < 1:
                victim = self._last_running(seq.rank)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            (page,) = self.pool.allocate(1, seq.rank)
            seq.pages.append(page)
            t.page_table[row, t.num_pages[row]] = page
            t.num_pages[row] += 1
        return decode[t.occupancy[decode] >= 0]

    def _finalize(self, decode: np.ndarray) -> ScheduledStep:
        t = self.table
        drafts = {r: self._drafts[r] for r in decode.tolist() if r in self._drafts} if self._drafts else {}
        positions = t.num_computed[decode] - 1
        # A pending one is fed: whatever is there is ignored (and a step ahead may be past the known tokens).
        tokens = t.token_ids[decode, np.minimum(positions, t.token_ids.shape[1] - 1)]
        feed = np.where(t.pending[decode] > 0, decode, -1)  # a pending token is fed from its slot
        seqs = decode  # decode sequences (SeqTable rows), one entry each
        first = np.arange(len(decode), dtype=np.int32)  # each one's first decode row
        spec = None
        if drafts:  # a speculating sequence: its last token, then its drafts, on consecutive rows
            num = np.array([len(drafts.get(r, ())) for r in decode.tolist()], np.int32)
            reps = 1 + num
            first = (np.cumsum(reps) - reps).astype(np.int32)
            base = positions - num  # its last known token's position
            within = np.arange(int(reps.sum())) - np.repeat(first, reps)
            decode, positions = np.repeat(decode, reps), np.repeat(base, reps) + within
            tokens, feed = np.repeat(tokens, reps), np.where(within == 0, np.repeat(feed, reps), -1)
            tokens[within == 0] = t.token_ids[seqs, np.minimum(base, t.token_ids.shape[1] - 1)]
            K = self.cfg.num_speculative_tokens
            which = np.flatnonzero(num)
            padded = np.zeros((len(which), K), np.int32)
            for i, s_i in enumerate(which.tolist()):
                d = drafts[int(seqs[s_i])]
                tokens[first[s_i] + 1:first[s_i] + 1 + len(d)] = d
                padded[i, :len(d)] = d
            spec = (first[which], num[which], padded)
            self._ahead[seqs[which]] += num[which]
        self._last_drafts = drafts
        shape = self._pick_shape(len(decode))

        # Logits rows: one per decode row, then the prefill items' rows.
        if not self._prefill and not t.num_parents:
            seq_row, position = decode, positions + 1
            sample_rows = first
            sample_seq_rows = seqs
            prompt_scores = []
            ints = t.int_cols[seq_row]
            ints[:, SI["position"]] = position
            banned = position < t.min_len[seq_row]
        else:
            seq_row, position, target, sample_rows, sample_seq_rows, prompt_scores = self._prefill_rows(
                decode, positions, seqs, first, t.target_cut[seqs] == 1, shape.decode_rows)
            ints = t.int_cols[seq_row]
            ints[:, SI["position"]] = position
            ints[:, SI["target"]] = target
            # A row that scores a prompt token, or an unforked parent's row short of its cut,
            # samples nothing: it neither counts for penalties nor keeps a token to feed.
            scoring = np.flatnonzero(target >= 0)
            if len(scoring):
                ints[scoring, SI["want_top"]] = [bool(t.seqs[r].request.params.prompt_logprobs)
                                                 for r in seq_row[scoring].tolist()]
            parents = first[t.target_cut[seqs] == 1]  # decode rows come first (a parent has one)
            idle = np.concatenate([scoring, parents])
            if len(idle):
                ints[idle, SI["penalty_slot"]] = -1
                ints[idle, SI["feed_slot"]] = -1
            banned = (target < 0) & (position < t.min_len[seq_row])
        logits = LogitsRows(t.float_cols[seq_row], ints, banned,
                            t.stop_ids[seq_row] if banned.any() else t.stop_ids[:0])
        t.pending[sample_seq_rows] += 1
        step = ScheduledStep(
            shape, decode, tokens, feed, positions, t.page_table[decode], t.seqs[decode], self._prefill, logits,
            sample_rows, sample_seq_rows, t.occupancy[sample_seq_rows], prompt_scores,
            self._copies, self._resets, len(decode) + self._prefill_tokens)
        if spec is not None:
            step.spec_first, step.spec_num, step.spec_drafts = spec
        return step

    def _prefill_rows(self, decode, positions, seqs, first, parent, D):
        """Logits rows of a step with prefill chunks: the decode rows, then per chunk its
        prompt-scoring rows and its sampling row."""
        seq_row, position = [decode], [positions + 1]
        target = [np.full(len(decode), -1, np.int32)]
        sample_rows, sample_seq_rows = [first[~parent]], [seqs[~parent]]
        prompt_scores = []
        r = D
        for item in self._prefill:
            seq, w, scored = item.seq, item.work, item.prompt_positions
            req = seq.request
            if len(scored):
                prompt_scores.append((req, scored.start, list(range(r, r + len(scored)))))
                seq_row.append(np.full(len(scored), seq.row))
                position.append(np.asarray(scored))
                target.append(np.asarray(req.prompt_token_ids[scored.start + 1:scored.stop + 1]))
                r += len(scored)
            if item.samples:
                seq_row.append(np.array([seq.row]))
                position.append(np.array([w.start + len(w.token_ids)]))
                target.append(np.array([-1]))
                sample_rows.append(np.array([r]))
                sample_seq_rows.append(np.array([seq.row]))
                r += 1

        def cat(parts):
            return np.concatenate(parts).astype(np.int32)
        return (cat(seq_row), cat(position), cat(target), cat(sample_rows), cat(sample_seq_rows),
                prompt_scores)

    def update(self, step: ScheduledStep, tokens: np.ndarray) -> StepUpdate:
        """Take the tokens `step` sampled (tokens[row] per logits row): append them to their
        sequences, unless stale, and finish those that hit a stop id or their length."""
        t = self.table
        fresh = t.occupancy[step.sample_seq_rows] == step.sample_occupancy
        tokens = np.asarray(tokens)
        spec = np.isin(step.sample_rows, step.spec_first) if len(step.spec_first) else None
        plain = fresh if spec is None else fresh & ~spec
        rows, at = step.sample_seq_rows[plain], step.sample_rows[plain]
        t.pending[rows] -= 1
        update = self._append(rows, tokens[at], at)
        if spec is not None and (fresh & spec).any():
            update = self._append_verified(step, tokens, fresh & spec, update)
        return update

    def _append(self, rows: np.ndarray, new: np.ndarray, at: np.ndarray) -> StepUpdate:
        """Append one token to each of `rows` (distinct), finishing those that stop or reach their length."""
        t = self.table
        n = t.append(rows, new)
        stop = (t.stop_ids[rows, :t.stop_cols] == new[:, None]).any(axis=1) & (n > t.min_len[rows])
        done = stop | (n >= t.max_len[rows])
        seqs = t.seqs[rows]
        for i in np.flatnonzero(done).tolist() if done.any() else ():
            seq, token = seqs[i], int(new[i])
            req = seq.request
            if stop[i]:
                eos = not req.params.ignore_eos and token in req.eos_token_ids
                self.finish(seq, "stop", None if eos else token)
            else:
                self.finish(seq, "length")
        return StepUpdate(seqs, t.seq_ids[rows], new, at, done)

    def _append_verified(self, step: ScheduledStep, tokens: np.ndarray, which: np.ndarray,
                         update: StepUpdate) -> StepUpdate:
        """The speculating sequences' emitted tokens (their kept drafts, then one more), one at a time, with
        their computed positions moved back past the rejected drafts (whose K/V later steps overwrite).
        A token that finishes the sequence drops the rest."""
        t = self.table
        parts = [update]
        num = dict(zip(step.spec_first.tolist(), step.spec_num.tolist()))
        for i in np.flatnonzero(which).tolist():
            row, first = int(step.sample_seq_rows[i]), int(step.sample_rows[i])
            drafted = num[first]
            emitted = tokens[first:first + drafted + 1]
            emitted = emitted[:int(np.argmin(emitted >= 0)) if (emitted < 0).any() else len(emitted)]
            kept = len(emitted) - 1
            self._ahead[row] -= drafted
            if kept < drafted and t.pending[row] > 1:  # a step ahead took the rejected drafts as kept
                self._void_step_ahead(row)
                t.num_computed[row] = t.num_tokens[row] + kept
            else:
                t.num_computed[row] -= drafted - kept
            t.pending[row] -= 1
            self.num_drafted += drafted
            self.num_accepted += kept
            self.drafted_per_position[:drafted] += 1
            self.accepted_per_position[:kept] += 1
            self._spec_kept[row] = 0.8 * self._spec_kept[row] + kept
            self._spec_rejected[row] = 0.8 * self._spec_rejected[row] + (kept < drafted)
            if kept:
                self._spec_misses[row] = 0
            else:
                self._spec_missed(row)
            for j, token in enumerate(emitted.tolist()):
                u = self._append(np.array([row]), np.array([token], np.int32), np.array([first + j], np.int32))
                parts.append(u)
                if u.finished[0]:
                    break
        return StepUpdate(*(np.concatenate([getattr(p, f.name) for p in parts])
                            for f in dataclasses.fields(StepUpdate)))

    def _void_step_ahead(self, row: int) -> None:
        """The step dispatched ahead of this one's read-back (`pipelined`) took drafts as kept that this one
        rejected: its positions are wrong, and it is void for this sequence. The row is renewed, so that
        step's tokens read back as stale; its pending token and drafts are dropped (the caller moves the
        computed positions back to what is known)."""
        t = self.table
        t.renew(row)
        t.pending[row] -= 1
        self._ahead[row] = 0
        self.num_rolled_back += 1

    # ---- admission and prefill ----------------------------------------------------------------

    def _admit(self, seq: Sequence) -> bool:
        cfg, req = self.cfg, seq.request
        hits: list[int] = []
        tokens = seq.tokens
        if cfg.enable_prefix_caching and req.params.prompt_logprobs is None:
            # Leave at least one token to compute: its logits give the first sample.
            usable = seq.target_len - (0 if seq.is_unforked_parent else 1)
            chain_hashes(tokens[:usable - usable % cfg.page_size], cfg.page_size, seq.hashes)
            seq.rank = self._partition_for(seq.hashes[:usable // cfg.page_size])
            hits = self.pool.lookup(seq.hashes[:usable // cfg.page_size], seq.rank)
            self.pool.record_lookup(max(usable, 0), len(hits) * cfg.page_size)
        else:
            seq.rank = self._partition_for([])
        self.pool.acquire(hits)
        self._put_in(seq, tokens)
        seq.pages = list(hits)
        self.table.set_pages(seq.row, hits)
        self.table.num_computed[seq.row] = len(hits) * cfg.page_size
        seq.num_registered = len(hits)
        if seq.uses_penalties:
            self._take_slot(seq)
        if seq.is_unforked_parent and seq.remaining == 0:
            if not self._fork(seq, may_preempt=False):
                self._unadmit(seq)
                return False
            self._schedule_admitted_decode(seq)  # the forked ones stay admitted regardless
        elif seq.remaining == 1:
            if not self._schedule_admitted_decode(seq):
                self._unadmit(seq)
                return False
        elif not self._schedule_prefill(seq, may_preempt=False):
            self._unadmit(seq)
            return False
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
            req.num_cached_tokens = len(hits) * cfg.page_size
            self._first_scheduled.append(req)
        self.waiting.remove(seq)
        return True

    def _schedule_admitted_decode(self, seq: Sequence) -> bool:
        """A just-admitted sequence with one token left (a prefix hit up to its last token)."""
        t, row = self.table, seq.row
        if int(self._in_step.sum()) + self._num_drafts >= self._max_decode_rows or self._budget < 1:
            return False
        if t.num_computed[row] >= t.num_pages[row] * self.cfg.page_size:
            page = self.pool.allocate(1, seq.rank)
            if page is None:
                return False
            seq.pages += page
            t.set_pages(row, seq.pages)
        t.num_computed[row] += 1
        self._in_step[row] = True
        self._budget -= 1
        self._extra_decodes.append(row)
        return True

    def _unadmit(self, seq: Sequence) -> None:
        self._take_out(seq)
        seq.status = Status.WAITING

    def _schedule_prefill(self, seq: Sequence, may_preempt: bool) -> bool:
        """Give `seq` a prefill chunk this step. False when nothing fits (or it was preempted)."""
        cfg, t, row = self.cfg, self.table, seq.row
        remaining = seq.remaining
        if remaining <= 1:
            return False
        if len(self._prefill) >= self._limit // cfg.block_q:
            return False
        chunk = min(remaining, self._budget, self._limit - self._prefill_tokens)
        chunk = self._limit_for_prompt_logprobs(seq, chunk)
        if chunk <= 0:
            return False
        start = int(t.num_computed[row])
        need = pages_needed(start + chunk, cfg.page_size) - len(seq.pages)
        if need > 0:
            if not self._make_room(need, seq, may_preempt):
                return False
            seq.pages += self.pool.allocate(need, seq.rank)
            t.set_pages(row, seq.pages)
        samples = not seq.is_unforked_parent and start + chunk == seq.num_tokens
        req = seq.request
        prompt_positions = range(0)
        if req.params.prompt_logprobs is not None and seq.index == 0:
            lo = max(start, req.num_prompt_scored)
            prompt_positions = range(lo, max(lo, min(start + chunk, seq.prompt_len - 1)))
            req.num_prompt_scored = max(req.num_prompt_scored, prompt_positions.stop)
        # No token is pending here: a sequence that sampled has one token left, a decode.
        work = SeqWork(t.token_ids[row, start:start + chunk].tolist(), start, list(seq.pages))
        work.logit_offsets = [p - start for p in prompt_positions] + ([chunk - 1] if samples else [])
        self._prefill.append(ScheduledItem(seq, work, samples, prompt_positions))
        self._prefill_tokens += chunk
        self._prompt_rows += len(prompt_positions)
        self._budget -= chunk
        t.num_computed[row] = start + chunk
        self._register_full_pages(seq)
        return True

    def _limit_for_prompt_logprobs(self, seq: Sequence, chunk: int) -> int:
        req = seq.request
        if req.params.prompt_logprobs is None or seq.index != 0:
            return chunk
        left = min(self.cfg.prompt_logprob_rows, self.cfg.max_prefill_tokens) - self._prompt_rows
        lo = max(seq.num_computed, req.num_prompt_scored)
        if lo >= seq.prompt_len - 1:
            return chunk
        return min(chunk, lo - seq.num_computed + left)

    def _prefill_limit(self, num_decode: int) -> int:
        """Most prefill tokens in a step beside `num_decode` decodes: the largest bucket, or
        while warming up the largest ready shape that also holds the decodes (a long prompt
        then takes more, shorter chunks; with no such shape yet, prefills wait a step rather
        than the step waiting for a compile)."""
        ready = self.ready_shapes
        if ready is None:
            return self.cfg.max_prefill_tokens
        return max((s.prefill_tokens for s in ready if s.decode_rows >= num_decode), default=0)

    def _pick_shape(self, num_decode: int) -> BatchShape:
        if self.ready_shapes is not None:  # warming up: the smallest ready shape the work fits
            rows = sum(len(i.work.logit_offsets) for i in self._prefill)
            fits = [s for s in self.ready_shapes
                    if s.decode_rows >= num_decode and s.prefill_tokens >= self._prefill_tokens
                    and s.prefill_seqs >= len(self._prefill) and s.prefill_rows >= rows]
            if fits:
                return min(fits, key=lambda s: (s.num_tokens, s.decode_rows))
        cfg = self.cfg
        if not self._prefill:
            return self._decode_shape_for[num_decode]
        decode_rows = next(d for d in self._mixed_decode_shapes if d >= num_decode)
        rows = sum(len(i.work.logit_offsets) for i in self._prefill)
        for tokens in self._prefill_shapes[1:]:
            shape = cfg.shape(decode_rows, tokens)
            if (tokens >= self._prefill_tokens and shape.prefill_seqs >= len(self._prefill)
                    and shape.prefill_rows >= rows):
                return shape
        raise AssertionError("scheduled prefill work fits no bucket")

    # ---- rows, pages, forks, preemption -------------------------------------------------------

    def _rows(self) -> np.ndarray:
        if self._running_rows is None:
            self._running_rows = np.array([s.row for s in self.running], np.int64)
        return self._running_rows

    def _put_in(self, seq: Sequence, tokens: list[int]) -> None:
        req = seq.request
        max_len = min(req.prompt_len + req.max_tokens, self.cfg.max_model_len)
        seq.table = self.table
        seq.row = self.table.assign(seq, tokens, req.params, seq.seed, req.eos_token_ids, max_len)
        self._start_spec(seq.row, req.params)
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)
        self._running_rows = None

    def _take_out(self, seq: Sequence) -> None:
        """Out of the running set: pages, penalty slot and row go back; known tokens are kept."""
        seq._tokens = seq.tokens
        self.running.remove(seq)
        self._running_rows = None
        self.pool.release(seq.pages)
        seq.pages = []
        seq.num_registered = 0
        if seq.penalty_slot >= 0:
            self.free_slots.append(seq.penalty_slot)
            seq.penalty_slot = -1
        self._in_step[seq.row] = False
        self.table.release(seq.row)
        seq.row = -1

    def _make_room(self, pages: int, seq: Sequence, may_preempt: bool) -> bool:
        """Free pages until `pages` are available, preempting from the back of the running
        list. False when `seq` itself is the one to go (it is then preempted) or when
        preemption is not allowed."""
        while self.pool.free_pages(seq.rank) < pages:
            if not may_preempt:
                return False
            victim = self._last_running(seq.rank)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _fork(self, parent: Sequence, may_preempt: bool = True) -> bool:
        """Split a prefilled n > 1 request into its n sequences, sharing the prompt's pages."""
        cfg, req, t = self.cfg, parent.request, self.table
        partial = parent.num_computed % cfg.page_size != 0
        if not self._make_room((req.n - 1) if partial else 0, parent, may_preempt):
            return False
        for index in range(1, req.n):
            pages, copy = self.pool.fork(parent.pages, parent.num_computed)
            child = Sequence(req, index, seed_for(req.seed, index))
            child.table = t
            child.row = t.copy_row(parent.row, child, child.seed)
            self._start_spec(child.row, req.params)
            child.pages, child.rank = pages, parent.rank
            t.set_pages(child.row, pages)
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
        t.clear_cut(parent.row)
        self._running_rows = None
        return True

    def _partition_for(self, hashes: list[bytes]) -> int:
        """The pool partition a sequence being admitted takes its pages from: the one caching most of its
        prefix, then the one with most free pages (one partition: 0)."""
        if self.pool.partitions == 1:
            return 0
        return max(range(self.pool.partitions),
                   key=lambda r: (len(self.pool.lookup(hashes, r)), self.pool.free_pages(r), -r))

    def _last_running(self, rank: int) -> Sequence:
        """The lowest-priority running sequence whose pages are in partition `rank` (freeing pages elsewhere
        would not help)."""
        if self.pool.partitions == 1:
            return self.running[-1]
        return next(s for s in reversed(self.running) if s.rank == rank)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: give back pages and slot; known tokens are kept."""
        t = self.table
        if self._in_step[seq.row]:  # its decode (and drafts) leave this step: those positions are not written
            t.num_computed[seq.row] -= 1 + len(self._drafts.pop(seq.row, ()))
        t.num_computed[seq.row] = min(t.num_computed[seq.row], t.num_tokens[seq.row])
        self._register_full_pages(seq)
        self._take_out(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_seqs.append(seq)
        self._preempted = True
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _take_slot(self, seq: Sequence) -> None:
        seq.penalty_slot = self.free_slots.pop()
        self.table.int_cols[seq.row, SI["penalty_slot"]] = seq.penalty_slot
        self._resets.append((seq.penalty_slot, seq.tokens, seq.prompt_len))

    def _register_full_pages(self, seq: Sequence) -> None:
        """Offer pages whose tokens are all known and whose K/V is (being) written to the cache.

        Called as prompts are prefilled (where other requests share prefixes) and when a
        sequence leaves (finished or preempted); the pages its decodes fill in between are
        offered then, so a decode step never hashes."""
        if not self.cfg.enable_prefix_caching:
            return
        ps, t = self.cfg.page_size, self.table
        full = min(int(t.num_computed[seq.row]), int(t.num_tokens[seq.row])) // ps
        if full <= seq.num_registered:
            return
        chain_hashes(t.token_ids[seq.row, :full * ps], ps, seq.hashes)
        for i in range(seq.num_registered, full):
            self.pool.register(seq.pages[i], seq.hashes[i])
        seq.num_registered = full
