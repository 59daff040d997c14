"""The output processor: sampled tokens in, RequestOutputs out, on its own thread.

The engine's step thread only appends tokens and checks stop ids and lengths (array
work in the scheduler); everything per token that is Python-heavy happens here,
while the device runs the next steps: incremental detokenization, stop strings,
logprobs entries, and building the outputs of finished and streamed requests.

Records arrive in step order through a queue, so each request's outputs come out
in order. A stop string is found here, after the engine has already scheduled a
step or two more for that sequence: its text and tokens are cut at the match
(exactly as if it had stopped at once), the extra tokens are dropped, and the
engine is told to free the sequence (`take_stops`).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

import numpy as np

from jaxinfer.core.request import Request, Sequence
from jaxinfer.core.scheduler import StepUpdate
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.outputs import CompletionOutput, Logprob, Prefix, RequestMetrics, RequestOutput

YIELD_EVERY = 64  # rows processed between voluntary GIL releases (the step thread comes first)


@dataclasses.dataclass
class StepRecord:
    update: StepUpdate
    logprobs: np.ndarray  # [R] raw logprob of each row's sampled (or scored) token
    top_ids: np.ndarray | None  # [R, num_top], when some row asked
    top_logprobs: np.ndarray | None
    prompt_scores: list  # (request, first position, rows) from the ScheduledStep
    time: float


@dataclasses.dataclass
class AbortRecord:
    request: Request
    time: float


class SeqOutput:
    """What one sequence has produced so far, as its consumer sees it."""

    __slots__ = ("token_ids", "text", "decoded", "decoder", "logprobs", "cumulative_logprob", "done",
                 "finish_reason", "stop_reason", "streamed")

    def __init__(self):
        self.token_ids: list[int] = []
        self.text = ""
        self.decoded = 0  # tokens whose text is in `text` (the rest is decoded when next needed)
        self.decoder = None
        self.logprobs: list[dict] = []
        self.cumulative_logprob = 0.0
        self.done = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.streamed = 0  # tokens in the last streamed output


class OutputProcessor:
    def __init__(self, tokenizer, requests: dict[str, Request], streamed: set[str], metrics: EngineMetrics,
                 stream_interval: int = 1):
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval  # EngineConfig.stream_interval
        self.requests = requests  # the engine's: a request leaves it when its final output is made
        self.streamed = streamed
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: collections.deque[RequestOutput] = collections.deque()
        self._stops: collections.deque[Sequence] = collections.deque()
        self._busy = 0  # records submitted and not yet processed
        self._idle = threading.Condition()
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0  # spent processing, on this thread
        self._thread = threading.Thread(target=self._run, name="jaxinfer-output", daemon=True)
        self._thread.start()

    # ---- the step thread's side ---------------------------------------------------------------

    def submit(self, record: StepRecord | AbortRecord) -> None:
        with self._idle:
            self._busy += 1
        self._inbox.put(record)

    def take_outputs(self) -> list[RequestOutput]:
        """Outputs made since the last call."""
        self._raise_error()
        out = []
        while self._outputs:
            out.append(self._outputs.popleft())
        return out

    def take_stops(self) -> list[Sequence]:
        """Sequences that met a stop string since the last call: the engine frees them."""
        out = []
        while self._stops:
            out.append(self._stops.popleft())
        return out

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def wait(self, timeout: float | None = None) -> None:
        """Until every submitted record is processed (or `timeout`)."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0 or self._error is not None, timeout)
        self._raise_error()

    def close(self) -> None:
        self._inbox.put(None)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("the output processor failed") from self._error

    # ---- its own thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            record = self._inbox.get()
            if record is None:
                return
            started = time.thread_time()
            try:
                if isinstance(record, AbortRecord):
                    self._abort(record)
                else:
                    self._step(record)
            except BaseException as e:  # a bug: surface it on the step thread
                self._error = e
            self.cpu_seconds += time.thread_time() - started
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _step(self, record: StepRecord) -> None:
        touched: dict[str, Request] = {}  # requests to emit after the loop (n > 1, prompt scores)
        for req, first, rows in record.prompt_scores:
            self._score_prompt(req, first, rows, record)
            touched[req.request_id] = req
        u = record.update
        logprobs = record.logprobs[u.sample_rows].tolist()
        now, append, emit, streamed, interval = record.time, self._append, self._emit, self.streamed, \
            self.stream_interval
        kept = 0
        # The hot loop of streaming: one pass per sampled row, its request emitted in the same pass
        # when it has one sequence (the common case).
        for i, (seq, token, row, logprob, finished) in enumerate(zip(
                u.seqs.tolist(), u.tokens.tolist(), u.sample_rows.tolist(), logprobs, u.finished.tolist())):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                time.sleep(0)
            out = seq.output
            if out is None:
                out = seq.output = SeqOutput()
            elif out.done:
                continue  # past a stop string: the engine has not freed it yet
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            append(seq, out, token, logprob, row, record, finished)
            kept += 1
            if req.params.n > 1 or req.request_id in touched:
                touched[req.request_id] = req
            elif out.done:
                emit(req, now)
            elif req.request_id in streamed and (not out.streamed or len(out.token_ids) - out.streamed >= interval):
                out.streamed = len(out.token_ids)
                self._catch_up(out, req.params)
                self._outputs.append(_streamed_output(req, seq, out))
        self.metrics.generation_tokens += kept
        for req in touched.values():
            emit(req, now)

    def _append(self, seq: Sequence, out: SeqOutput, token: int, logprob: float, row: int,
                record: StepRecord, finished: bool) -> None:
        p = seq.request.params
        out.token_ids.append(token)
        out.cumulative_logprob += logprob
        if p.logprobs is not None:
            out.logprobs.append(self._entry(token, logprob, record, row, p.logprobs))
        if p.stop and self.tokenizer is not None:  # stop strings need the text as it grows
            before = len(out.text)
            self._catch_up(out, p)
            if len(out.token_ids) >= p.min_tokens and self._match_stop(out, p, before):
                out.done, out.finish_reason = True, "stop"
                self._stops.append(seq)
                return
        if finished:
            self._finish_text(out, p)
            out.done = True
            out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason

    @staticmethod
    def _match_stop(out: SeqOutput, p, before: int) -> bool:
        """Find the earliest stop string that the new text completes; cut the text there."""
        longest = max(len(s) for s in p.stop)
        lo = max(0, before - longest + 1)
        best = None
        for s in p.stop:
            i = out.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        out.text = out.text[:i + len(s)] if p.include_stop_str_in_output else out.text[:i]
        out.stop_reason = s
        return True

    def _score_prompt(self, req: Request, first: int, rows: list[int], record: StepRecord) -> None:
        k, targets = req.params.prompt_logprobs or 0, req.prompt_token_ids
        for position, row in zip(range(first, first + len(rows)), rows):
            if position == len(req.prompt_logprobs):
                req.prompt_logprobs.append(self._entry(int(targets[position + 1]), float(record.logprobs[row]),
                                                       record, row, k))

    def _entry(self, token: int, logprob: float, record: StepRecord, row: int, k: int) -> dict[int, Logprob]:
        entry = {}
        if k and record.top_ids is not None:
            for rank, (t, lp) in enumerate(zip(record.top_ids[row, :k].tolist(),
                                               record.top_logprobs[row, :k].tolist()), 1):
                entry[t] = Logprob(lp, rank, self._token_text(t))
        if token not in entry:
            entry = {token: Logprob(logprob, None, self._token_text(token)), **entry}
        return entry

    def _catch_up(self, out: SeqOutput, p) -> None:
        """Decode the tokens appended since the text was last needed (text is made when an
        output is, or at once for stop strings: not once per token)."""
        if out.decoded < len(out.token_ids) and self.tokenizer is not None:
            if out.decoder is None:
                out.decoder = self.tokenizer.stream_decoder(skip_special_tokens=p.skip_special_tokens)
            out.text += out.decoder.push_many(out.token_ids[out.decoded:])
            out.decoded = len(out.token_ids)

    def _finish_text(self, out: SeqOutput, p) -> None:
        self._catch_up(out, p)
        if out.decoder is not None:
            out.text += out.decoder.flush()

    def _token_text(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _abort(self, record: AbortRecord) -> None:
        req = record.request
        if req.request_id not in self.requests or self.requests[req.request_id] is not req:
            return  # its final output is out already
        for seq in list(req.sequences):
            out = seq.output
            if out is None:
                out = seq.output = SeqOutput()
            if not out.done:
                self._finish_text(out, req.params)
                out.done, out.finish_reason = True, "abort"
        self._emit(req, record.time, aborted=True)

    def _emit(self, req: Request, now: float, aborted: bool = False) -> None:
        seqs = req.sequences if req.n == 1 else list(req.sequences)  # n > 1: forks append on the step thread
        if req.n == 1:
            out = seqs[0].output
            done = aborted or (out is not None and out.done)
        else:
            done = aborted or (req.forked and all(s.output is not None and s.output.done for s in seqs))
        if done:
            req.finished_time = now
            output = self._output(req, seqs, finished=True)
            self.metrics.observe_request(output)
            self.streamed.discard(req.request_id)
            self.requests.pop(req.request_id, None)
            self._outputs.append(output)
        elif req.request_id in self.streamed and (self.stream_interval == 1 or self._stream_due(seqs)):
            for s in seqs:
                if s.output is not None:
                    s.output.streamed = len(s.output.token_ids)
                    self._catch_up(s.output, req.params)
            self._outputs.append(self._output(req, seqs, finished=False))

    def _stream_due(self, seqs: list[Sequence]) -> bool:
        """A sequence has its first token or `stream_interval` new ones since the last output."""
        for s in seqs:
            o = s.output
            if o is not None and o.token_ids and (
                    not o.streamed or len(o.token_ids) - o.streamed >= self.stream_interval):
                return True
        return False

    @staticmethod
    def _output(req: Request, seqs: list[Sequence], finished: bool) -> RequestOutput:
        if not finished and len(seqs) == 1 and seqs[0].output is not None:
            return _streamed_output(req, seqs[0], seqs[0].output)
        outs = []
        for seq in seqs:
            o = seq.output or SeqOutput()
            snapshot = list if finished else Prefix  # streaming: O(1), not a copy per step
            outs.append(CompletionOutput(
                index=seq.index, text=o.text, token_ids=snapshot(o.token_ids),
                cumulative_logprob=o.cumulative_logprob,
                logprobs=snapshot(o.logprobs) if req.params.logprobs is not None else None,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + list(req.prompt_logprobs)
        preemptions = seqs[0].num_preemptions if len(seqs) == 1 else sum(s.num_preemptions for s in seqs)
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 req.finished_time, preemptions)
        # The prompt's ids are shared, not copied: nothing changes them.
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_logprobs,
                             outs, finished, metrics, req.num_cached_tokens)


def _streamed_output(req: Request, seq: Sequence, o: SeqOutput) -> RequestOutput:
    """A running single-sequence request's output: `OutputProcessor._output` for the case
    made once per streamed request per step, without its general loops."""
    params = req.params
    out = CompletionOutput(seq.index, o.text, Prefix(o.token_ids), o.cumulative_logprob,
                           Prefix(o.logprobs) if params.logprobs is not None else None,
                           o.finish_reason, o.stop_reason)
    prompt_logprobs = None if params.prompt_logprobs is None else [None] + list(req.prompt_logprobs)
    metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                             req.finished_time, seq.num_preemptions)
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_logprobs,
                         [out], False, metrics, req.num_cached_tokens)
