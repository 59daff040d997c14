"""Host-side request state: a Request and the Sequences that generate for it.

A request with `n` samples starts as one sequence that prefills the prompt up
to its last token; it then forks into `n` sequences that share the prompt's
pages (copy-on-write) and each sample on their own. With n == 1 there is no
fork: the one sequence prefills the whole prompt and samples.

Token bookkeeping of a sequence, seen from the scheduler:
    tokens         ids known on the host (prompt, then generated)
    pending        tokens sampled by a step that is dispatched but not yet read (0 or 1)
    num_computed   positions whose K/V is written, or will be by a dispatched step
A step feeds positions [num_computed, num_tokens) (or a chunk of them) and, when
it reaches the end, samples the next token.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxinfer.core.sampling_params import SamplingParams, request_seed


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # params.max_tokens, cut to what the context leaves
    prompt: str | None = None
    priority: int = 0  # lower runs first, as in vLLM
    arrival: int = 0  # arrival order, the tie-break after priority
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    seed: int | None = None  # None: request_seed(params), drawn once here
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_prompt_scored: int = 0  # prompt positions whose logprobs a step has been given to compute
    prompt_logprobs: list = dataclasses.field(default_factory=list)  # entries for prompt tokens 1..
    sequences: list["Sequence"] = dataclasses.field(default_factory=list)
    forked: bool = False  # n > 1: the sequences exist only after the prompt is prefilled
    aborted: bool = False
    first_seq_id: int = 0  # sequence i is known to the frontend as first_seq_id + i

    def __post_init__(self):
        if self.seed is None:
            self.seed = request_seed(self.params)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)


class Sequence:
    """One stream of tokens being generated (one of a request's n samples).

    While it runs, its tokens and counters live in a row of the scheduler's SeqTable
    (`table`, `row`); while it waits, its known tokens are kept here. Output state
    (text, logprobs) belongs to the output processor."""

    def __init__(self, request: Request, index: int, seed: int):
        self.request = request
        self.index = index
        self.seed = seed
        self._tokens: list[int] = list(request.prompt_token_ids)  # while not running
        self.table = None  # SeqTable, while running
        self.row = -1
        self.pages: list[int] = []
        self.rank = 0  # the page pool's partition its pages come from (data-parallel MLA attention)
        self.hashes: list[bytes] = []  # chained hashes of the full pages of `tokens`
        self.num_registered = 0  # leading pages offered to the prefix cache
        self.penalty_slot = -1
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.output = None  # the output processor's state for this sequence

    @property
    def running(self) -> bool:
        return self.row >= 0

    @property
    def tokens(self) -> list[int]:
        """Known token ids: the prompt, then what was generated and read back."""
        if self.row >= 0:
            return self.table.tokens(self.row).tolist()
        return self._tokens

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (*self.request.sort_key, self.index)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def pending(self) -> int:
        return int(self.table.pending[self.row]) if self.row >= 0 else 0

    @property
    def num_computed(self) -> int:
        return int(self.table.num_computed[self.row]) if self.row >= 0 else 0

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the pending one."""
        if self.row >= 0:
            return int(self.table.num_tokens[self.row] + self.table.pending[self.row])
        return len(self._tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def is_unforked_parent(self) -> bool:
        return self.request.n > 1 and not self.request.forked

    @property
    def target_len(self) -> int:
        """Positions to compute before the next sample (or, unforked, before the fork)."""
        return self.prompt_len - 1 if self.is_unforked_parent else self.num_tokens

    @property
    def remaining(self) -> int:
        return self.target_len - self.num_computed

    @property
    def uses_penalties(self) -> bool:
        p = self.request.params
        return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed}, pages={len(self.pages)})")
