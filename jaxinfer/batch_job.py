"""Offline batch jobs: a JSONL file of requests in, a JSONL file of results out.

    summary = run_batch(llm, "prompts.jsonl", "results.jsonl", {"max_tokens": 64})

Input, one JSON object per line:

    {"id": "q1", "prompt": "The capital of France is", "max_tokens": 8}
    {"id": 2, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "n": 2}
    {"id": "t3", "token_ids": [1, 4093, 338], "priority": -1, "logprobs": 2}

`id` (string or integer) is required and unique; exactly one of `prompt`,
`messages` or `token_ids`; optional `priority`; any SamplingParams field (vLLM's
names) overrides the job's defaults for that line.

Output, one JSON object per request, appended and flushed as it finishes
(completion order, not input order):

    {"id": "q1", "outputs": [{"index": 0, "text": ..., "token_ids": [...],
     "finish_reason": "length", "stop_reason": null, "cumulative_logprob": -3.2}],
     "prompt_tokens": 6, "cached_tokens": 0, "metrics": {...}}

A line that cannot be served becomes `{"id": ..., "line": N, "error": "..."}`
(id null where unknown) and is reported on stderr; the job goes on.

The job can be stopped at any time (Ctrl-C, SIGTERM, a kill): the output only
ever holds complete lines (a torn last line is cut off on the next run), and
running the same job again skips every line already answered.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.engine.driver import WINDOW_PER_SEQ, EngineDriver
from jaxinfer.errors import InputError
from jaxinfer.engine.outputs import PositionLogprobs, RequestOutput

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "messages", "token_ids")
REQUEST_KEYS = ("id", *PROMPT_KEYS, "priority")
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@dataclasses.dataclass
class BatchSummary:
    lines: int = 0  # input lines read in this run (blank lines included)
    done: int = 0  # requests answered and written in this run
    errors: int = 0  # bad lines written as error records in this run
    skipped: int = 0  # lines already answered in the output (resumed)
    prompt_tokens: int = 0
    output_tokens: int = 0  # over all n samples
    seconds: float = 0.0
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" if the job was stopped early
    in_output: int = 0  # records in the output file at the end (complete lines)

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"{self.done} requests done, {self.errors} errors, {self.skipped} skipped "
                f"(already in the output); {self.prompt_tokens} prompt and {self.output_tokens} "
                f"generated tokens in {self.seconds:.1f}s ({self.tokens_per_second:.1f} tok/s)")
        if self.interrupted:
            text += (f"; interrupted by {self.interrupted}: {self.in_output} results are in the "
                     "output, and running the same command again resumes")
        return text


# ---- the output file ------------------------------------------------------------------------


def _id_key(request_id) -> str:
    return json.dumps(request_id)


@dataclasses.dataclass
class _Answered:
    """What an existing output file already holds."""
    ids: set[str]  # ids (as _id_key) with a result
    bad_lines: set[tuple[int, str]]  # (line, _id_key(id or None)) of error records
    records: int


def _repair_and_scan(path: str) -> _Answered:
    """Cut a torn last line off `path` (a run killed mid-write), then collect what it answers."""
    answered = _Answered(set(), set(), 0)
    if not os.path.exists(path):
        return answered
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = _end_of_last_line(f, size)
        if keep < size:
            log.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run",
                        path, size - keep)
            f.truncate(keep)
        f.seek(0)
        for n, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("%s:%d is not JSON; ignored", path, n)
                continue
            if not isinstance(record, dict) or "id" not in record:
                continue
            answered.records += 1
            if "error" in record:
                answered.bad_lines.add((record.get("line"), _id_key(record["id"])))
            else:
                answered.ids.add(_id_key(record["id"]))
    return answered


def _end_of_last_line(f, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last newline of the file (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        i = f.read(end - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


class _Writer:
    """Appends whole JSON lines, each flushed to the OS as soon as it is written. If a write is
    interrupted (an exception mid-line), close() cuts the file back to its last whole line."""

    def __init__(self, path: str):
        self._f = open(path, "ab", buffering=0)
        self._committed = self._f.seek(0, os.SEEK_END)
        self.records = 0

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[self._f.write(view):]
        self._committed += len(data)
        self.records += 1

    def close(self) -> None:
        if self._f.closed:
            return
        if self._f.seek(0, os.SEEK_END) != self._committed:
            self._f.truncate(self._committed)
        os.fsync(self._f.fileno())
        self._f.close()


# ---- input lines ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Line:
    number: int
    request_id: object = None  # the line's id, once known to be valid
    prompt: object = None  # what InputProcessor.encode takes
    params: SamplingParams | None = None
    priority: int = 0
    error: str | None = None


def _count_lines(path: str, chunk: int = 1 << 20) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(chunk):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _parse(number: int, raw: bytes, defaults: Mapping) -> _Line:
    """One input line -> a request, or an error naming what is wrong with it."""
    line = _Line(number)
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        line.error = "the line is not valid UTF-8"
        return line
    except ValueError as e:
        line.error = f"not valid JSON: {e}"
        return line
    if not isinstance(obj, dict):
        line.error = f"expected a JSON object, got {type(obj).__name__}"
        return line
    if "id" not in obj:
        line.error = "missing 'id'"
        return line
    request_id = obj["id"]
    if (isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or request_id == ""
            or not _valid_unicode(request_id)):
        line.error = f"'id' must be a non-empty string or an integer, got {_short(request_id)}"
        return line
    line.request_id = request_id
    if not _valid_unicode(obj):  # a \ud800-style escape decodes to a lone surrogate
        line.error = "the line holds a lone surrogate escape (\\ud800-\\udfff): not valid Unicode"
        return line
    unknown = [k for k in obj if k not in REQUEST_KEYS and k not in SAMPLING_KEYS]
    if unknown:
        line.error = (f"unknown field(s) {', '.join(map(repr, unknown))}; a line holds id, one of "
                      f"prompt/messages/token_ids, priority, and sampling fields "
                      f"({', '.join(SAMPLING_KEYS)})")
        return line
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        line.error = (f"a line needs exactly one of 'prompt', 'messages' or 'token_ids', got "
                      f"{' and '.join(map(repr, given)) or 'none'}")
        return line
    key = given[0]
    value = obj[key]
    if key == "prompt":
        if not isinstance(value, str):
            line.error = f"'prompt' must be a string, got {type(value).__name__}"
            return line
        line.prompt = {"prompt": value}
    elif key == "messages":
        line.prompt = {"messages": value}
    else:
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in value):
            line.error = f"'token_ids' must be a list of integers, got {_short(value)}"
            return line
        line.prompt = {"prompt_token_ids": value}
    priority = obj.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        line.error = f"'priority' must be an integer, got {_short(priority)}"
        return line
    line.priority = priority
    try:
        line.params = SamplingParams.from_dict({**defaults, **{k: v for k, v in obj.items()
                                                              if k in SAMPLING_KEYS}})
    except InputError as e:
        line.error = str(e)
    return line


def _valid_unicode(obj) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(x) -> str:
    text = json.dumps(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, raw


# ---- results as JSON --------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    """JSON has no infinities or NaN: those become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _position(entry: PositionLogprobs | None) -> list[dict] | None:
    if entry is None:
        return None
    return [{"token_id": t, "logprob": _num(lp.logprob), "rank": lp.rank, "text": lp.decoded_token}
            for t, lp in entry.items()]


def result_record(request_id, out: RequestOutput, params: SamplingParams) -> dict:
    """The output line of one finished request."""
    outputs = []
    for o in out.outputs:
        sample = {"index": o.index, "text": o.text, "token_ids": list(o.token_ids),
                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                  "cumulative_logprob": _num(o.cumulative_logprob)}
        if params.logprobs is not None:
            sample["logprobs"] = [_position(e) for e in o.logprobs or []]
        outputs.append(sample)
    record = {"id": request_id, "outputs": outputs, "prompt_tokens": len(out.prompt_token_ids),
              "cached_tokens": out.num_cached_tokens}
    if params.prompt_logprobs is not None:
        record["prompt_logprobs"] = [_position(e) for e in out.prompt_logprobs or []]
    m = out.metrics
    e2e = None if m.finished_time is None else m.finished_time - m.arrival_time
    record["metrics"] = {"queue_time": _num(m.queue_time), "time_to_first_token": _num(m.time_to_first_token),
                         "time_per_output_token": _num(out.time_per_output_token), "e2e": _num(e2e),
                         "preemptions": m.num_preemptions}
    return record


# ---- the job --------------------------------------------------------------------------------


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM set `received` instead of raising, so
    the job stops between engine steps, never in the middle of a write. A second signal raises
    KeyboardInterrupt for an impatient user; the cleanup still leaves only whole lines."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNAL_NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_paths(input_path: str, output_path: str) -> None:
    """Raise InputError unless the input can be read and the output written (before any work)."""
    if not os.path.isfile(input_path):
        raise InputError(f"input file {input_path}: no such file")
    if os.path.isdir(output_path):
        raise InputError(f"output {output_path} is a directory")
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise InputError(f"output directory {parent}: no such directory")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise InputError("the output file must not be the input file")


def run_batch(llm, input_path: str, output_path: str, defaults: Mapping | None = None, *,
              progress: bool = True, on_record: Callable[[dict], None] | None = None) -> BatchSummary:
    """Answer every request of the JSONL file `input_path`, appending results to `output_path`.

    `defaults` are SamplingParams fields for every line (a line's own fields win); fields in
    neither keep SamplingParams' defaults. Lines already answered in `output_path` are skipped.
    `on_record(record)` is called after each record is written. Stops early (and says so in
    `interrupted`) on SIGINT/SIGTERM or KeyboardInterrupt; other exceptions propagate, after the
    engine is drained and the file closed with whole lines only."""
    from tqdm.auto import tqdm

    defaults = dict(defaults or {})
    SamplingParams.from_dict(defaults)  # bad defaults are the caller's error, not every line's
    check_paths(input_path, output_path)
    summary = BatchSummary()
    start = time.monotonic()
    answered = _repair_and_scan(output_path)
    total = _count_lines(input_path)
    engine = llm.engine
    processor = engine.input_processor
    # Each request the driver runs is tagged (the line's id, its params).
    driver = EngineDriver(engine, window=WINDOW_PER_SEQ * engine.config.max_num_seqs)
    seen: set[str] = set()
    writer = _Writer(output_path)
    bar = tqdm(total=total, desc="batch", unit="line", disable=not progress, dynamic_ncols=True)

    def emit(record: dict) -> None:
        writer.write(record)
        bar.update(1)
        if on_record is not None:
            on_record(record)

    def bad_line(line: _Line) -> None:
        summary.errors += 1
        tqdm.write(f"{input_path}:{line.number}: {line.error}", file=sys.stderr)
        emit({"id": line.request_id, "line": line.number, "error": line.error})

    def feed(number: int, raw: bytes) -> None:
        summary.lines += 1
        if not raw.strip():
            bar.update(1)
            return
        line = _parse(number, raw, defaults)
        key = _id_key(line.request_id)
        if (line.request_id is not None and key in answered.ids) or (number, key) in answered.bad_lines:
            seen.add(key)
            summary.skipped += 1
            bar.update(1)
            return
        if line.error is None and key in seen:
            line.error = f"duplicate id {_short(line.request_id)}"
        if line.request_id is not None:
            seen.add(key)
        if line.error is None:
            try:
                prompt = processor.process(line.prompt, line.params)
                driver.add(f"batch-{number}", prompt.token_ids, prompt.params, (line.request_id, line.params),
                           prompt=prompt.text, priority=line.priority)
            except InputError as e:
                line.error = str(e)
            else:
                return
        bad_line(line)

    pending = _lines(input_path)

    def fed() -> Iterator[None]:
        for number, raw in pending:
            feed(number, raw)
            yield

    try:
        with _StopSignals() as signals:
            try:
                for out, tag in driver.run(fed(), stop=lambda: signals.received is not None):
                    if tag is None or not out.finished:
                        continue
                    request_id, params = tag
                    summary.done += 1
                    summary.prompt_tokens += len(out.prompt_token_ids)
                    summary.output_tokens += sum(len(o.token_ids) for o in out.outputs)
                    emit(result_record(request_id, out, params))
                    bar.set_postfix(done=summary.done, errors=summary.errors,
                                    out_tok=summary.output_tokens, refresh=False)
                if signals.received is not None:
                    summary.interrupted = _SIGNAL_NAMES[signals.received]
            except KeyboardInterrupt:
                summary.interrupted = "SIGINT"
            finally:
                driver.close()  # abort this job's unfinished requests and let the step in flight land
    finally:
        pending.close()
        bar.close()
        writer.close()
        summary.seconds = time.monotonic() - start
        summary.in_output = answered.records + writer.records
    return summary


__all__ = ["BatchSummary", "check_paths", "result_record", "run_batch"]
