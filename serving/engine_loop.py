"""The engine on its own thread, fed by the server's event loop.

The engine is not thread-safe; only this thread touches it. Other threads
`submit` and `abort` through a command queue that the loop drains between
steps, and get outputs back through per-request callbacks (the server's
callbacks hop onto its asyncio loop). When nothing is queued or running the
thread sleeps on a condition variable instead of spinning.

`submit` names each request itself: outputs are routed by that id, which no
client chooses, so a client reusing another's request id can never receive its
output (a client's own id is only a label the server keeps beside it).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.distributed import ProcessLost
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.driver import EngineDriver
from jaxinfer.errors import JaxinferError
from jaxinfer.engine.outputs import RequestOutput

log = logging.getLogger(__name__)

_SPEC_COUNTERS = ("spec_draft_tokens", "spec_accepted_tokens", "spec_accepted_per_position")

Sink = Callable[[RequestOutput | BaseException], None]


class EngineLoop:
    def __init__(self, engine: Engine, on_finished: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self.on_finished = on_finished
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._driver = EngineDriver(engine)  # tags each request with its sink
        self._ids = itertools.count(1)
        self._stop = False
        self.lost: ProcessLost | None = None  # a process of a multi-process run is gone: nothing steps
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self.snapshot: dict = self._snapshot()  # read by other threads; replaced, never mutated

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, token_ids: list[int], params: SamplingParams, sink: Sink, *,
               prompt: str | None = None, priority: int = 0) -> str:
        """Queue a request; its outputs (or the exception that refused it) go to `sink`.
        Returns the engine's id for it, unique for the life of this loop."""
        with self._cond:
            request_id = f"req-{next(self._ids)}"
            self._commands.append(("add", request_id, token_ids, params, sink, prompt, priority))
            self._cond.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request by the id `submit` returned; its last output still reaches its sink."""
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    @property
    def num_requests(self) -> int:
        return len(self._driver.live)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stop and (
                        self.lost is not None or not engine.has_unfinished()):
                    self._cond.wait()
                if self._stop:
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if self.lost is not None:
                continue
            try:
                outputs = self._driver.step()
            except ProcessLost as e:  # no step can run any more: fail what runs and whatever comes
                log.error("engine step failed: %s", e)
                self.lost = e
                for sink in self._driver.abort_live().values():
                    sink(e)
                continue
            except Exception as e:  # a bug: fail every request in flight rather than hang them
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out, sink in outputs:
                if out.finished and self.on_finished is not None:
                    self.on_finished(out)
                if sink is not None:
                    sink(out)
            self.snapshot = self._snapshot()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return
        _, request_id, token_ids, params, sink, prompt, priority = command
        if self.lost is not None:
            sink(self.lost)
            return
        try:
            self._driver.add(request_id, token_ids, params, sink, prompt=prompt, priority=priority, stream=True)
        except JaxinferError as e:
            sink(e)

    def _fail_all(self, error: BaseException) -> None:
        for sink in self._driver.abort_live().values():
            sink(error)
        try:
            self.engine.drain()
        except Exception:
            log.exception("engine could not drain after a failure")

    def _snapshot(self) -> dict:
        spec = {}
        if self.engine.config.speculative_config is not None:  # speculation's counters, for Prometheus
            counters = self.engine.core.counters()
            spec = {k: counters[k] for k in _SPEC_COUNTERS}
        return {**self.engine.gauges(), **spec, "time": time.monotonic()}
