"""The engine core in a process of its own (vLLM's engine-core process).

In one process the output processor's Python (a RequestOutput per streamed request per
step, text, stop strings) shares the GIL with the core's step loop, and on a small host
the step loop slows with every stream. Here the core runs in a child process with its
own interpreter: it steps whenever it has work, between steps takes the commands the
frontend sent, and sends each CoreStep back as it is read. The frontend (Engine) keeps
its input and output processing and its consumers; it never waits for the core, and the
core never waits for it.

    frontend ── CoreRequest, abort, stop ─▶ child: EngineCore.step() in a loop
             ◀──── CoreStep, gauges ─────────┘

The child builds its core from a picklable `factory` (a module-level callable returning
an EngineCore), so it loads the model itself; the frontend gets the model's config and
tokenizer from it once the core is ready.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import queue
import struct
import threading
import time
import traceback
from collections.abc import Callable

from jaxinfer.engine.engine_core import CoreRequest, CoreStep
from jaxinfer.engine.metrics import EngineMetrics

START_TIMEOUT_S = 600.0  # model load, compile and warm-up in the child
POLL_S = 0.05  # how often a waiting frontend checks the child is alive


@dataclasses.dataclass
class CoreInfo:
    """What the frontend needs from the core, sent once it is ready."""

    config: object  # the resolved EngineConfig
    model_config: object
    tokenizer: object
    source: str
    dtype: object
    max_model_len: int
    eos_token_ids: frozenset[int]
    ban_width: int


class CoreProcessClient:
    """The EngineCore interface the frontend uses, over a child process."""

    def __init__(self, factory: Callable, *, warmup: bool = True, background: bool = False, progress: bool = False):
        ctx = multiprocessing.get_context("spawn")  # jax and fork do not mix
        self._to_core = ctx.Queue()
        self._from_core, writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_core_main, args=(factory, warmup, background, progress,
                                                             self._to_core, writer),
                                    name="jaxinfer-core", daemon=True)
        self._process.start()
        self._closed = False
        writer.close()  # the child's end
        self.metrics = EngineMetrics()  # the core's counters, as last reported
        self._gauges: dict = {}
        self._counters: dict = {}
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[CoreStep] = []  # steps that arrived while waiting for a reply
        try:
            got = self._get(START_TIMEOUT_S)
        except RuntimeError as e:
            self._process.kill()
            raise RuntimeError(f"the engine core did not start: {e}") from None
        if got is None or got[0] != "ready":
            self._process.kill()
            raise RuntimeError(f"the engine core did not start within {START_TIMEOUT_S:.0f} s")
        payload = got[1]
        self.info: CoreInfo = payload
        self.config = payload.config
        self.max_model_len = payload.max_model_len
        self.eos_token_ids = payload.eos_token_ids
        self.ban_width = payload.ban_width

    # ---- commands -----------------------------------------------------------------------------

    def add_request(self, request: CoreRequest) -> None:
        self._to_core.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._to_core.put(("abort", request_id))

    def finish_stop(self, request_id: str, index: int, stop_reason: str) -> None:
        self._to_core.put(("stop", (request_id, index, stop_reason)))

    def set_prefix_caching(self, enabled: bool) -> None:
        self._call("prefix_caching", enabled)

    def wait_for_warmup(self) -> None:
        self._call("wait_for_warmup", None)

    def stop_warmup(self) -> None:
        self._call("stop_warmup", None)

    def warmup(self, progress: bool = False, background: bool = False) -> int:
        return self._call("warmup", (progress, background))

    # ---- what comes back ----------------------------------------------------------------------

    def step(self, wait: bool = True) -> tuple[list[CoreStep], bool]:
        """The CoreSteps that arrived (waiting a little for the first when `wait`). Never
        says the core is busy: the frontend has nothing else to do meanwhile."""
        records, self._pending = self._pending, []
        timeout = POLL_S if wait and not records else 0.0
        while True:
            got = self._get(timeout, block=timeout > 0)
            if got is None:
                return records, False
            kind, payload = got
            if kind == "step":
                records.append(payload)
                timeout = 0.0
            elif kind == "reply":
                self._replies.put(payload)

    def has_work(self) -> bool:
        return False  # the frontend's own requests say whether anything is left

    def gauges(self) -> dict:
        return dict(self._gauges)

    def counters(self) -> dict:
        return dict(self._counters)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._to_core.put(("shutdown", None))
        except (ValueError, OSError):
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)

    def _call(self, kind: str, payload):
        self._to_core.put((kind, payload))
        while True:
            try:
                ok, value = self._replies.get_nowait()
                break
            except queue.Empty:
                pass
            got = self._get(POLL_S)
            if got is None:
                continue
            k, p = got
            if k == "reply":
                ok, value = p
                break
            if k == "step":  # a step of requests still being made: keep it for step()
                self._pending.append(p)
        if not ok:
            raise RuntimeError(value)
        return value

    def _get(self, timeout: float, block: bool = True):
        """The next message (gauges and counters are taken in as they pass); None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(POLL_S, max(deadline - time.monotonic(), 0.0)) if block else 0.0
            try:
                ready = self._from_core.poll(wait)
                data = self._from_core.recv_bytes() if ready else None
            except (EOFError, OSError):
                data, ready = None, False
            if not ready:
                if not self._process.is_alive():
                    raise RuntimeError(f"the engine core process exited (code {self._process.exitcode})")
                if not block or time.monotonic() >= deadline:
                    return None
                continue
            tag = data[:1]
            if tag in (b"S", b"I"):  # a step, or the core going idle: both bring its stats
                self._gauges, self._counters, self.metrics.computed_tokens = _unpack_stats(data)
                self.metrics.steps = self._counters["steps"]
                if tag == b"I":
                    continue
                return "step", CoreStep.decode(memoryview(data)[1 + _STATS.size:])
            kind, payload = pickle.loads(memoryview(data)[1:])
            if kind == "error":
                raise RuntimeError(f"the engine core failed:\n{payload}")
            return kind, payload


def _core_main(factory, warmup: bool, background: bool, progress: bool, commands, writer) -> None:
    """The child: build the core, then step it whenever it has work, taking in the frontend's
    commands between steps (and waiting for them when idle)."""
    results = _Sender(writer)
    try:
        _serve(factory, warmup, background, progress, commands, results)
    finally:
        results.close()  # what is sent gets there before the process ends


def _serve(factory, warmup: bool, background: bool, progress: bool, commands, results: _Sender) -> None:
    try:
        core = factory()
        if warmup:
            core.warmup(progress=progress, background=background)
        m = core.model
        info = CoreInfo(core.config, m.config, m.tokenizer, m.source, m.dtype, core.max_model_len,
                        core.eos_token_ids, core.ban_width)
        results.put(("ready", info))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    calls = {  # commands the frontend waits on: each gets a reply
        "prefix_caching": core.set_prefix_caching,
        "wait_for_warmup": lambda _: core.wait_for_warmup(),
        "stop_warmup": lambda _: core.stop_warmup(),
        "warmup": lambda args: core.warmup(progress=args[0], background=args[1]),
    }

    def apply(kind: str, payload) -> bool:
        if kind == "shutdown":
            core.stop_warmup()
            return False
        if kind == "add":
            core.add_request(payload)
        elif kind == "abort":
            core.abort(payload)
        elif kind == "stop":
            core.finish_stop(*payload)
        else:
            try:
                results.put(("reply", (True, calls[kind](payload))))
            except Exception as e:
                results.put(("reply", (False, f"{type(e).__name__}: {e}")))
        return True

    # A thread takes the frontend's commands off their pipe, so the step loop looks for them
    # in a queue of this process: a look at the pipe itself costs two system calls (about
    # 70 µs a step on a small VM).
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_take_commands, args=(commands, inbox), name="jaxinfer-core-commands",
                     daemon=True).start()
    busy = False
    try:
        while True:
            if not core.has_work():
                if busy:
                    results.put_idle(core)
                    busy = False
                try:
                    if not apply(*inbox.get(timeout=1.0)):
                        return
                except queue.Empty:
                    continue
            while True:  # whatever else arrived, without waiting
                try:
                    command = inbox.get_nowait()
                except queue.Empty:
                    break
                if not apply(*command):
                    return
            if core.has_work():
                busy = True
                records, _ = core.step()
                for record in records:
                    results.put_step(record, core)
    except BaseException:
        results.put(("error", traceback.format_exc()))


def _take_commands(commands, inbox: queue.SimpleQueue) -> None:
    while True:
        command = commands.get()
        inbox.put(command)
        if command[0] == "shutdown":
            return


class _Sender:
    """Messages to the frontend: pickled on the caller's thread (a message that cannot be sent
    raises there, where the core reports it), written by a thread of their own, so the step
    loop never waits on a full pipe and spends no time in writes."""

    def __init__(self, conn):
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name="jaxinfer-core-sender", daemon=True)
        self.thread.start()

    def put(self, message) -> None:
        self.queue.put(b"P" + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def put_step(self, record: CoreStep, core) -> None:
        """A step, encoded (CoreStep.encode), with the core's gauges and counters."""
        self.queue.put(b"S" + _pack_stats(core) + record.encode())

    def put_idle(self, core) -> None:
        """The core has nothing left to do: its gauges and counters as they end."""
        self.queue.put(b"I" + _pack_stats(core))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _write(self) -> None:
        while (data := self.queue.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:  # the frontend is gone
                return


_SPEC_POSITIONS = 16  # SpeculativeConfig's most drafts
_STATS = struct.Struct(f"<qqdqdqqqqqqqqq{2 * _SPEC_POSITIONS}q")


def _pack_stats(core) -> bytes:
    g, c = core.gauges(), core.counters()

    def positions(name):
        return (c[name] + [0] * _SPEC_POSITIONS)[:_SPEC_POSITIONS]
    return _STATS.pack(g["running"], g["waiting"], g["kv_usage"], g["kv_pages"], g["prefix_cache_hit_rate"],
                       g["preemptions"], c["prefix_cache_queried_tokens"], c["prefix_cache_hit_tokens"], c["steps"],
                       c["compilations"], core.metrics.computed_tokens, g["spec_k"], c["spec_draft_tokens"],
                       c["spec_accepted_tokens"], *positions("spec_drafted_per_position"),
                       *positions("spec_accepted_per_position"))


def _unpack_stats(data) -> tuple[dict, dict, int]:
    """(gauges, counters, computed tokens), as EngineCore.gauges() and counters() gave them."""
    (running, waiting, kv_usage, kv_pages, hit_rate, preemptions, queried, hits, steps, compilations,
     computed, spec_k, drafted, accepted, *positions) = _STATS.unpack_from(data, 1)
    k = _SPEC_POSITIONS
    return ({"running": running, "waiting": waiting, "kv_usage": kv_usage, "kv_pages": kv_pages,
             "prefix_cache_hit_rate": hit_rate, "preemptions": preemptions, "spec_k": spec_k},
            {"prefix_cache_queried_tokens": queried, "prefix_cache_hit_tokens": hits, "steps": steps,
             "compilations": compilations, "spec_draft_tokens": drafted, "spec_accepted_tokens": accepted,
             "spec_drafted_per_position": positions[:k], "spec_accepted_per_position": positions[k:]},
            computed)
