"""The running sequences as columns: one numpy row per running sequence.

Per-step work (which sequences decode, their next token and position, their
pages, their sampling settings, appending the sampled tokens, checking stop ids
and lengths) is array arithmetic over these columns, never a Python object per
sequence. A sequence gets a row when it starts running and gives it back when
it is preempted or finishes; while it runs, its tokens and counters live here
and nowhere else.

`occupancy[row]` names who holds the row: a number drawn afresh at every
assignment (-1 when free). A step remembers the occupancies of the rows it
sampled for, so a token read back after its sequence was preempted, finished or
replaced is recognized as stale by one comparison.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxinfer.core.sampling_params import GREEDY_TEMPERATURE, SamplingParams

# Sampling settings per sequence, in the layout of a step's logits rows (a step packs them
# as they are): a decode row is its sequence's row with `position` filled in.
FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
# feed_slot: the slot the row's sampled token is kept in for the next step to feed (the
# sequence's row here; -1: not kept, as for prompt-scoring rows).
STEP_INT_COLUMNS = ("top_k", "seed_hi", "seed_lo", "penalty_slot", "position", "target", "want_top", "feed_slot")
F = {name: i for i, name in enumerate(FLOAT_COLUMNS)}
SI = {name: i for i, name in enumerate(STEP_INT_COLUMNS)}


class SeqTable:
    def __init__(self, capacity: int, max_model_len: int, pages_per_seq: int, stop_width: int):
        self.capacity = capacity
        self.max_model_len = max_model_len
        width = min(max_model_len, 1024) + 2  # grows by doubling up to max_model_len (+ 2)
        self.token_ids = np.zeros((capacity, width), np.int32)
        self.num_tokens = np.zeros(capacity, np.int32)  # tokens known on the host
        # Tokens sampled by dispatched steps, not yet read back. The latest is kept in the
        # row's feed slot, so a step can feed it before it is read back.
        self.pending = np.zeros(capacity, np.int32)
        self.num_computed = np.zeros(capacity, np.int32)  # positions whose K/V is (being) written
        self.page_table = np.zeros((capacity, pages_per_seq), np.int32)
        self.num_pages = np.zeros(capacity, np.int32)
        self.prompt_len = np.zeros(capacity, np.int32)
        self.max_len = np.zeros(capacity, np.int32)  # finish ("length") at this many tokens
        self.min_len = np.zeros(capacity, np.int32)  # stop ids are banned below this many tokens
        self.target_cut = np.zeros(capacity, np.int32)  # 1: an unforked n > 1 parent stops a token short
        self.stop_ids = np.full((capacity, stop_width), -1, np.int32)  # EOS (unless ignored) + stop_token_ids
        self.stop_cols = 1  # columns of stop_ids any row has used (a step compares only those)
        self.float_cols = np.zeros((capacity, len(FLOAT_COLUMNS)), np.float32)
        self.int_cols = np.zeros((capacity, len(STEP_INT_COLUMNS)), np.int32)
        self.num_parents = 0  # rows with target_cut set
        self.occupancy = np.full(capacity, -1, np.int64)
        self.seqs = np.empty(capacity, object)  # the Sequence in each row, None if free
        self.seq_ids = np.full(capacity, -1, np.int64)  # its id for the frontend (Request.first_seq_id + index)
        self._free = list(range(capacity - 1, -1, -1))
        self._occupants = itertools.count()

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    def assign(self, seq, tokens, params: SamplingParams, seed: int, eos_ids, max_len: int) -> int:
        """Give `seq` a row holding `tokens` and its settings; returns the row."""
        row = self._free.pop()
        n = len(tokens)
        self._ensure_width(n + 2)
        self.token_ids[row, :n] = tokens
        self.num_tokens[row] = n
        self.pending[row] = 0
        self.num_computed[row] = 0
        self.num_pages[row] = 0
        plen = seq.prompt_len
        self.prompt_len[row] = plen
        self.max_len[row] = max_len
        self.min_len[row] = plen + params.min_tokens
        self.target_cut[row] = 1 if seq.is_unforked_parent else 0
        self.num_parents += int(self.target_cut[row])
        stops = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(eos_ids))
        self.stop_ids[row] = -1
        self.stop_ids[row, :len(stops)] = stops
        self.stop_cols = max(self.stop_cols, len(stops))
        greedy = params.temperature < GREEDY_TEMPERATURE
        self.float_cols[row] = (0.0 if greedy else params.temperature, params.top_p, params.min_p,
                                params.presence_penalty, params.frequency_penalty, params.repetition_penalty)
        self.int_cols[row] = (min(params.top_k, 2**31 - 1), _i32(seed >> 32), _i32(seed), -1, 0, -1,
                              1 if params.logprobs else 0, row)
        self.occupancy[row] = next(self._occupants)
        self.seqs[row] = seq
        self.seq_ids[row] = seq.request.first_seq_id + seq.index
        return row

    def renew(self, row: int) -> None:
        """The row's occupant stays, but what dispatched steps sampled for it is void (read back as stale)."""
        self.occupancy[row] = next(self._occupants)

    def release(self, row: int) -> None:
        self.clear_cut(row)
        self.occupancy[row] = -1
        self.seqs[row] = None
        self._free.append(row)

    def copy_row(self, src: int, seq, seed: int) -> int:
        """A new row for `seq`, a fork of the sequence in `src`: same tokens, counters and
        settings, its own seed and pages (the caller sets them)."""
        row = self._free.pop()
        for column in (self.token_ids, self.num_tokens, self.pending, self.num_computed,
                       self.prompt_len, self.max_len, self.min_len, self.stop_ids, self.float_cols,
                       self.int_cols):
            column[row] = column[src]
        self.target_cut[row] = 0
        self.num_pages[row] = 0
        self.int_cols[row, SI["seed_hi"]] = _i32(seed >> 32)
        self.int_cols[row, SI["seed_lo"]] = _i32(seed)
        self.int_cols[row, SI["penalty_slot"]] = -1
        self.int_cols[row, SI["feed_slot"]] = row
        self.occupancy[row] = next(self._occupants)
        self.seqs[row] = seq
        self.seq_ids[row] = seq.request.first_seq_id + seq.index
        return row

    def clear_cut(self, row: int) -> None:
        """The row's parent has forked (or left): it is an ordinary sequence now."""
        if self.target_cut[row]:
            self.target_cut[row] = 0
            self.num_parents -= 1

    def tokens(self, row: int) -> np.ndarray:
        return self.token_ids[row, :self.num_tokens[row]]

    def set_pages(self, row: int, pages) -> None:
        self.page_table[row, :len(pages)] = pages
        self.num_pages[row] = len(pages)

    def append(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append one token to each of `rows` (distinct); returns their new lengths."""
        at = self.num_tokens[rows]
        if at.size and int(at.max()) + 2 > self.token_ids.shape[1]:
            self._ensure_width(int(at.max()) + 2)  # room for the pending one after it, too
        self.token_ids[rows, at] = tokens
        self.num_tokens[rows] = n = at + 1
        return n

    def _ensure_width(self, n: int) -> None:
        width = self.token_ids.shape[1]
        if n <= width:
            return
        while width < n:
            width *= 2
        grown = np.zeros((self.capacity, min(max(width, n), self.max_model_len + 2)), np.int32)
        grown[:, :self.token_ids.shape[1]] = self.token_ids
        self.token_ids = grown


def _i32(x: int) -> int:
    """The low 32 bits of x as a signed int32 (seeds travel as int32 bit patterns)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x
