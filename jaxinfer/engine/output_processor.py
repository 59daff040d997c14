"""The output processor: the engine core's CoreSteps in, RequestOutputs out, on its own thread.

The core only appends tokens and checks stop ids and lengths (array work in the
scheduler) and hands over plain arrays keyed by sequence ids. Everything per token
that is Python-heavy happens here, while the device runs the next steps: incremental
detokenization, stop strings, logprobs entries, and building the outputs of finished
and streamed requests. Its state is its own (RequestState, SeqOutput): it shares no
object with the core.

Records arrive in step order through a queue, so each request's outputs come out
in order. A stop string is found here, after the core has already scheduled a
step or two more for that sequence: its text and tokens are cut at the match
(exactly as if it had stopped at once), the extra tokens are dropped, and the
core is told to free the sequence (`take_stops`).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time


from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.engine.engine_core import CoreStep
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.outputs import CompletionOutput, Logprob, Prefix, RequestMetrics, RequestOutput

YIELD_EVERY = 64  # rows processed between voluntary GIL releases (the step thread comes first)


@dataclasses.dataclass
class AbortRecord:
    request: RequestState
    time: float


class SeqOutput:
    """What one sequence has produced so far, as its consumer sees it."""

    __slots__ = ("request", "index", "token_ids", "text", "decoded", "decoder", "logprobs", "cumulative_logprob",
                 "done", "finish_reason", "stop_reason", "streamed", "num_preemptions")

    def __init__(self, request: RequestState, index: int):
        self.request = request
        self.index = index  # which of the request's n samples
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
        self.num_preemptions = 0


class RequestState:
    """The frontend's side of a request: what its outputs are made from."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "stream", "arrival_time",
                 "first_scheduled_time", "first_token_time", "finished_time", "num_cached_tokens",
                 "prompt_logprobs", "seqs", "first_seq_id", "aborted")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 stream: bool, arrival_time: float, first_seq_id: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stream = stream
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs: list = []  # entries for prompt tokens 1..
        self.first_seq_id = first_seq_id
        self.seqs = [SeqOutput(self, i) for i in range(params.n)]
        self.aborted = False

    @property
    def n(self) -> int:
        return self.params.n


class OutputProcessor:
    def __init__(self, tokenizer, requests: dict[str, RequestState], metrics: EngineMetrics,
                 stream_interval: int = 1):
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval  # EngineConfig.stream_interval
        self.requests = requests  # the frontend's: a request leaves it when its final output is made
        self.seqs: dict[int, SeqOutput] = {}  # by sequence id, while the request is in `requests`
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: collections.deque[RequestOutput] = collections.deque()
        self._stops: collections.deque[tuple[str, int, str]] = collections.deque()
        self._busy = 0  # records submitted and not yet processed
        self._idle = threading.Condition()
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0  # spent processing, on this thread
        self._thread = threading.Thread(target=self._run, name="jaxinfer-output", daemon=True)
        self._thread.start()

    def add(self, state: RequestState) -> None:
        """A new request (before the core sees it)."""
        self.requests[state.request_id] = state
        for s in state.seqs:
            self.seqs[state.first_seq_id + s.index] = s

    # ---- the step thread's side ---------------------------------------------------------------

    def submit(self, record: CoreStep | AbortRecord) -> None:
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

    def take_stops(self) -> list[tuple[str, int, str]]:
        """(request id, sample index, stop string) of the sequences that met a stop string since
        the last call: the core frees them."""
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

    def _step(self, record: CoreStep) -> None:
        requests, seqs = self.requests, self.seqs
        for request_id, when, cached in record.scheduled:
            req = requests.get(request_id)
            if req is not None:
                req.first_scheduled_time, req.num_cached_tokens = when, cached
        for seq_id in record.preempted:
            out = seqs.get(seq_id)
            if out is not None:
                out.num_preemptions += 1
        touched: dict[str, RequestState] = {}  # requests to emit after the loop (n > 1, prompt scores)
        for request_id, first, logprobs, top_ids, top_lps in record.prompt_scores:
            req = requests.get(request_id)
            if req is not None:
                self._score_prompt(req, first, logprobs, top_ids, top_lps)
                touched[request_id] = req
        now, append, emit, interval = record.time, self._append, self._emit, self.stream_interval
        finish = record.finish
        kept = 0
        # The hot loop of streaming: one pass per sampled row, its request emitted in the same pass
        # when it has one sequence (the common case).
        ids = record.seq_ids.tolist()
        last = len(ids) - 1
        for i, (seq_id, token, logprob, finished) in enumerate(zip(
                ids, record.tokens.tolist(), record.logprobs.tolist(), record.finished.tolist())):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                time.sleep(0)
            out = seqs.get(seq_id)
            if out is None or out.done:
                continue  # its request is over, or past a stop string: the core has not freed it yet
            req = out.request
            if req.first_token_time is None:
                req.first_token_time = now
            append(out, token, logprob, i, record, finish.get(seq_id) if finished else None)
            kept += 1
            if req.params.n > 1 or req.request_id in touched:
                touched[req.request_id] = req
            elif out.done:
                emit(req, now)
            elif i < last and ids[i + 1] == seq_id:
                continue  # more of its tokens follow in this step (speculation): one streamed output for them all
            elif req.stream and (not out.streamed or len(out.token_ids) - out.streamed >= interval):
                out.streamed = len(out.token_ids)
                self._catch_up(out, req.params)
                self._outputs.append(_streamed_output(req, out))
        self.metrics.generation_tokens += kept
        for req in touched.values():
            emit(req, now)

    def _append(self, out: SeqOutput, token: int, logprob: float, i: int, record: CoreStep,
                finished: tuple[str, int | None] | None) -> None:
        req = out.request
        p = req.params
        out.token_ids.append(token)
        out.cumulative_logprob += logprob
        if p.logprobs is not None:
            out.logprobs.append(self._entry(token, logprob, record.top_ids, record.top_logprobs, i, p.logprobs))
        if p.stop and self.tokenizer is not None:  # stop strings need the text as it grows
            before = len(out.text)
            self._catch_up(out, p)
            if len(out.token_ids) >= p.min_tokens and self._match_stop(out, p, before):
                out.done, out.finish_reason = True, "stop"
                self._stops.append((req.request_id, out.index, out.stop_reason))
                return
        if finished is not None:
            self._finish_text(out, p)
            out.done = True
            out.finish_reason, out.stop_reason = finished

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

    def _score_prompt(self, req: RequestState, first: int, logprobs, top_ids, top_lps) -> None:
        k, targets = req.params.prompt_logprobs or 0, req.prompt_token_ids
        for j, position in enumerate(range(first, first + len(logprobs))):
            if position == len(req.prompt_logprobs):
                req.prompt_logprobs.append(self._entry(int(targets[position + 1]), float(logprobs[j]),
                                                       top_ids, top_lps, j, k))

    def _entry(self, token: int, logprob: float, top_ids, top_lps, i: int, k: int) -> dict[int, Logprob]:
        entry = {}
        if k and top_ids is not None:
            for rank, (t, lp) in enumerate(zip(top_ids[i, :k].tolist(), top_lps[i, :k].tolist()), 1):
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
        if self.requests.get(req.request_id) is not req:
            return  # its final output is out already
        for out in req.seqs:
            if not out.done:
                self._finish_text(out, req.params)
                out.done, out.finish_reason = True, "abort"
        self._emit(req, record.time, aborted=True)

    def _emit(self, req: RequestState, now: float, aborted: bool = False) -> None:
        seqs = req.seqs
        done = aborted or all(o.done for o in seqs)
        if done:
            req.finished_time = now
            output = self._output(req, finished=True)
            self.metrics.observe_request(output)
            self.requests.pop(req.request_id, None)
            for o in seqs:
                self.seqs.pop(req.first_seq_id + o.index, None)
            self._outputs.append(output)
        elif req.stream and (self.stream_interval == 1 or self._stream_due(seqs)):
            for o in seqs:
                o.streamed = len(o.token_ids)
                self._catch_up(o, req.params)
            self._outputs.append(self._output(req, finished=False))

    def _stream_due(self, seqs: list[SeqOutput]) -> bool:
        """A sequence has its first token or `stream_interval` new ones since the last output."""
        for o in seqs:
            if o.token_ids and (not o.streamed or len(o.token_ids) - o.streamed >= self.stream_interval):
                return True
        return False

    @staticmethod
    def _output(req: RequestState, finished: bool) -> RequestOutput:
        if not finished and req.n == 1:
            return _streamed_output(req, req.seqs[0])
        outs = []
        for o in req.seqs:
            snapshot = list if finished else Prefix  # streaming: O(1), not a copy per step
            outs.append(CompletionOutput(
                index=o.index, text=o.text, token_ids=snapshot(o.token_ids),
                cumulative_logprob=o.cumulative_logprob,
                logprobs=snapshot(o.logprobs) if req.params.logprobs is not None else None,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + list(req.prompt_logprobs)
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 req.finished_time, sum(o.num_preemptions for o in req.seqs))
        # The prompt's ids are shared, not copied: nothing changes them.
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_logprobs,
                             outs, finished, metrics, req.num_cached_tokens)


def _streamed_output(req: RequestState, o: SeqOutput) -> RequestOutput:
    """A running single-sequence request's output: `OutputProcessor._output` for the case
    made once per streamed request per step, without its general loops."""
    params = req.params
    out = CompletionOutput(o.index, o.text, Prefix(o.token_ids), o.cumulative_logprob,
                           Prefix(o.logprobs) if params.logprobs is not None else None,
                           o.finish_reason, o.stop_reason)
    prompt_logprobs = None if params.prompt_logprobs is None else [None] + list(req.prompt_logprobs)
    metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                             req.finished_time, o.num_preemptions)
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_logprobs,
                         [out], False, metrics, req.num_cached_tokens)
