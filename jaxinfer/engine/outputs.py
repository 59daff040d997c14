"""What a request gives back: vLLM's RequestOutput / CompletionOutput shapes, plus timings."""

from __future__ import annotations

import collections.abc
import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token; None where not computed
    decoded_token: str | None = None


# One position's logprobs: the scored token and the top-n, by token id.
PositionLogprobs = dict[int, Logprob]


class Prefix(collections.abc.Sequence):
    """The first `n` items of an append-only list, read-only and fixed at `n`: what a streamed
    output holds instead of a copy, so streaming a long generation costs O(1) per step, not
    O(length). (The list only ever grows, so the first n items never change.) A finished
    output holds plain lists."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int | None = None):
        self._items, self._n = items, len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._items[:self._n][i]
        if not -self._n <= i < self._n:
            raise IndexError("index out of range")
        return self._items[i % self._n]

    def __iter__(self):
        return iter(self._items[:self._n])

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, Prefix)) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclasses.dataclass(slots=True)  # one is made per streamed request per step
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int] | Prefix  # a Prefix while streaming, a list once finished
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None  # per generated token, when asked for
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched


@dataclasses.dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled step."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None  # first entry None, as in vLLM
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first, over the request's samples."""
        m = self.metrics
        n = max((len(o.token_ids) for o in self.outputs), default=0)
        if m.first_token_time is None or m.finished_time is None or n < 2:
            return None
        return (m.finished_time - m.first_token_time) / (n - 1)
