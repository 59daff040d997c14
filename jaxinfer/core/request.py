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
    prompt_logprobs: list = dataclasses.field(default_factory=list)  # entries for prompt tokens 1..
    sequences: list["Sequence"] = dataclasses.field(default_factory=list)
    forked: bool = False  # n > 1: the sequences exist only after the prompt is prefilled

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
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences) and (
            self.forked or self.n == 1)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)


class Sequence:
    """One stream of tokens being generated (one of a request's n samples)."""

    def __init__(self, request: Request, index: int, seed: int):
        self.request = request
        self.index = index
        self.seed = seed
        self.tokens: list[int] = list(request.prompt_token_ids)
        self.pending = 0
        self.pending_row = -1  # row of the pending token in the last step's sampled tokens
        self.num_computed = 0
        self.pages: list[int] = []
        self.hashes: list[bytes] = []  # chained hashes of the full pages of `tokens`
        self.num_registered = 0  # leading pages offered to the prefix cache
        self.penalty_slot = -1
        self.status = Status.WAITING
        self.epoch = 0  # bumped on preemption/finish: outputs of older steps are stale
        # Output, filled as tokens are read back.
        self.text = ""
        self.decoder = None  # the tokenizer's stream decoder, made on first use
        self.logprobs: list[dict] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (*self.request.sort_key, self.index)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + self.pending

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
                f"tokens={len(self.tokens)}+{self.pending}, computed={self.num_computed}, "
                f"pages={len(self.pages)})")
