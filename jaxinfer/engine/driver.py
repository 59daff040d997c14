"""One way for an entry point to drive the engine: feed it, step it, route its outputs,
and on the way out abort what is left and let the step in flight land.

    with EngineDriver(engine) as driver:
        def feed():
            for i, prompt in enumerate(prompts):
                driver.add(f"r{i}", prompt.token_ids, prompt.params, tag=i)
                yield
        for out, i in driver.run(feed()):
            ...

LLM.generate, LLM.stream and batch jobs use `run`; the server's EngineLoop, which is
fed by a command queue on its own thread, uses `add`, `step`, and `abort_live` then
`Engine.drain` when it fails everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Self

from jaxinfer.errors import JaxinferError
from jaxinfer.engine.outputs import RequestOutput

WINDOW_PER_SEQ = 4  # requests `run` keeps waiting in the engine: this many times max_num_seqs
_END = object()


class EngineDriver:
    """The requests one caller added to an engine, each with a tag of the caller's (an index,
    a sink), from `add` until its final output. Not thread-safe: one thread drives the engine."""

    def __init__(self, engine, window: int | None = None):
        self.engine = engine
        self.window = WINDOW_PER_SEQ * engine.config.max_num_seqs if window is None else window
        self.live: dict[str, object] = {}  # engine request id -> tag, until its final output

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, request_id: str, token_ids, params, tag: object, **kwargs) -> None:
        """Engine.add_request (kwargs: prompt, priority, stream, ...), remembering `tag` (not None)."""
        self.live[request_id] = tag
        try:
            self.engine.add_request(request_id, token_ids, params, **kwargs)
        except JaxinferError:  # refused: the engine changed nothing
            del self.live[request_id]
            raise
        # Any other exception (an interrupt mid-call) leaves the id live: close() aborts it if
        # the engine took it, and aborting an id the engine never saw does nothing.

    def step(self) -> list[tuple[RequestOutput, object]]:
        """One engine step: its outputs, each with its request's tag (None: not this driver's).
        A final output retires its request."""
        routed = []
        for out in self.engine.step():
            tag = self.live.pop(out.request_id, None) if out.finished else self.live.get(out.request_id)
            routed.append((out, tag))
        return routed

    def run(self, feed: Iterator | None = None, stop: Callable[[], bool] | None = None
            ) -> Iterator[tuple[RequestOutput, object]]:
        """Step the engine and yield every output with its tag. Before each step, pull `feed`
        while the engine's waiting queue is shorter than the window: each item pulled is one
        input handled (the feed calls `add`, or refuses the input itself), so a million inputs
        are read as room appears. Ends when the feed is exhausted and the engine is idle, or
        when `stop()` is true between steps (a step's outputs are all yielded first)."""
        engine = self.engine
        exhausted = feed is None
        while stop is None or not stop():
            while not exhausted and engine.num_waiting < self.window and (stop is None or not stop()):
                exhausted = next(feed, _END) is _END
            if (stop is not None and stop()) or (exhausted and not engine.has_unfinished()):
                return
            yield from self.step()

    def abort_live(self) -> dict[str, object]:
        """Abort every request of this driver that has not finished (their final outputs, finish
        reason "abort", come from later steps, untagged); returns their tags by id."""
        live, self.live = self.live, {}
        for request_id in live:
            self.engine.abort(request_id)
        return live

    def close(self) -> None:
        """Abort what is left and let the step in flight land (Engine.drain)."""
        self.abort_live()
        self.engine.drain()
