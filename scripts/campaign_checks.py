"""The verdicts of scripts/serving_campaign.py: plain functions over what the campaign saw.

Nothing here talks to a server, so tests/test_serving_campaign.py can feed each check a
fabricated failure and watch it fire. Every check returns a problem (a short string) or
None; a phase fails when any check in it returns a problem.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

# What a hostile request may be answered with; UNKNOWN, INTERNAL, UNAVAILABLE (while not
# draining), DEADLINE_EXCEEDED (a hang) and the rest are failures.
PROPER = frozenset({"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
                    "FAILED_PRECONDITION"})
# Refusals the server counts as jaxinfer_requests_total{status="rejected"}.
REFUSALS = PROPER - {"OK"}
MAX_STATUS_MESSAGE_BYTES = 2048
# gRPC's own words when a message or its trailers outgrow a limit: the reply broke in
# transport instead of the server answering with a status of its own.
_TRANSPORT = re.compile(r"message larger than max|metadata size exceeds|RST_STREAM", re.IGNORECASE)
# FinishReason enum numbers of the proto -> the names batch records use.
FINISH_NAMES = {0: None, 1: "stop", 2: "length", 3: "abort"}


# ---- status codes -----------------------------------------------------------------------------


def status_problem(code: str, details: str, *, expected=PROPER, request_bytes: int = 0,
                   max_message_bytes: int = 4 << 20, draining: bool = False) -> str | None:
    """Why this answer to a hostile request is wrong, or None.

    `expected`: the codes this request may get (PROPER unless the case pins it down).
    A RESOURCE_EXHAUSTED in gRPC's own words is a transport failure unless the request
    itself was over `max_message_bytes` (then the server's transport refusing it is the
    answer)."""
    size = len(details.encode("utf-8", "replace"))
    if size > MAX_STATUS_MESSAGE_BYTES:
        return f"{code} with a {size}-byte status message (over {MAX_STATUS_MESSAGE_BYTES})"
    if code == "UNAVAILABLE" and draining:
        return None
    if code != "OK" and _TRANSPORT.search(details):
        if not (code == "RESOURCE_EXHAUSTED" and request_bytes > max_message_bytes):
            return f"transport error {code}: {details[:160]}"
    if code not in expected:
        want = "/".join(sorted(expected))
        return f"{code} (expected {want}): {details[:160]}"
    return None


# ---- completions --------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish: str | None = None  # "stop", "length", "abort" or None (never finished)
    stop: object = None  # the stop string or stop token id that matched


@dataclasses.dataclass
class Completion:
    """One request's output as a client saw it (or as a batch record holds it)."""
    samples: dict[int, Sample] = dataclasses.field(default_factory=dict)
    prompt_tokens: int | None = None
    finished: bool = False

    @classmethod
    def from_responses(cls, responses) -> "Completion":
        """From the GenerateResponse messages of one stream."""
        c = cls()
        for r in responses:
            for o in r.outputs:
                s = c.samples.setdefault(o.index, Sample())
                s.tokens.extend(o.token_ids)
                s.text += o.text
                if o.finish_reason:
                    s.finish = FINISH_NAMES.get(o.finish_reason, str(o.finish_reason))
                    kind = o.WhichOneof("stop_reason")
                    s.stop = getattr(o, kind) if kind else None
            if r.finished:
                c.finished = True
                c.prompt_tokens = r.usage.prompt_tokens
        return c

    @classmethod
    def from_record(cls, record: dict) -> "Completion":
        """From a `jaxinfer batch` result record."""
        c = cls(prompt_tokens=record.get("prompt_tokens"), finished=True)
        for o in record.get("outputs", []):
            c.samples[o["index"]] = Sample(list(o["token_ids"]), o["text"], o["finish_reason"],
                                           o.get("stop_reason"))
        return c

    def tokens(self, index: int = 0) -> list[int]:
        return self.samples[index].tokens if index in self.samples else []

    def finish(self, index: int = 0) -> str | None:
        return self.samples[index].finish if index in self.samples else None


def compare(got: Completion, want: Completion, *, prompt_tokens: bool = True) -> str | None:
    """The first difference between two outputs of the same request, or None."""
    if not got.finished:
        return "the stream ended without a finished message"
    if sorted(got.samples) != sorted(want.samples):
        return f"samples {sorted(got.samples)} instead of {sorted(want.samples)}"
    for i in sorted(want.samples):
        g, w = got.samples[i], want.samples[i]
        if g.tokens != w.tokens:
            at = next((k for k, (a, b) in enumerate(zip(g.tokens, w.tokens)) if a != b),
                      min(len(g.tokens), len(w.tokens)))
            return (f"sample {i}: tokens differ at {at} ({len(g.tokens)} vs {len(w.tokens)} tokens; "
                    f"got {g.tokens[at:at + 4]}, want {w.tokens[at:at + 4]})")
        if g.text != w.text:
            return f"sample {i}: text {g.text[:40]!r} instead of {w.text[:40]!r}"
        if g.finish != w.finish:
            return f"sample {i}: finish {g.finish} instead of {w.finish}"
        if g.stop != w.stop:
            return f"sample {i}: stop reason {g.stop!r} instead of {w.stop!r}"
    if prompt_tokens and got.prompt_tokens != want.prompt_tokens:
        return f"usage.prompt_tokens {got.prompt_tokens} instead of {want.prompt_tokens}"
    return None


def cross_delivery(b: Completion, *, a_solo: Completion, a_prompt_tokens: int, b_solo: Completion,
                   b_aborted_by_someone: bool) -> str | None:
    """Evidence that client B's stream carried client A's request (same request id, another
    client), or None. A and B are chosen so that their prompt sizes and first greedy tokens
    differ; an ABORT finish counts only when nobody had a right to abort B."""
    evidence = []
    if b.prompt_tokens is not None and b.prompt_tokens == a_prompt_tokens != b_solo.prompt_tokens:
        evidence.append(f"usage.prompt_tokens {b.prompt_tokens} is A's prompt size")
    got, a, own = b.tokens(), a_solo.tokens(), b_solo.tokens()
    if got and got == a[:len(got)] and got != own[:len(got)]:
        evidence.append(f"its {len(got)} tokens are A's")
    if b.finish() == "abort" and b_solo.finish() != "abort" and not b_aborted_by_someone:
        evidence.append("it ended with A's finish reason (abort)")
    return "; ".join(evidence) or None


# ---- gauges and counters ------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value} (labels as written)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


REJECTED = 'jaxinfer_requests_total{status="rejected"}'


def idle_problems(info: dict, metrics: dict[str, float], idle_kv: float) -> list[str]:
    """What is not back to idle: `info` from GetServerInfo (running, queued, active_streams,
    kv_cache_usage), `metrics` parsed from /metrics; `idle_kv` is the KV use the idle server
    reported before the phase."""
    problems = []
    for key in ("running", "queued", "active_streams"):
        if info.get(key, 0) != 0:
            problems.append(f"GetServerInfo {key}={info[key]}")
    if abs(info.get("kv_cache_usage", idle_kv) - idle_kv) > 1e-9:
        problems.append(f"GetServerInfo kv_cache_usage={info['kv_cache_usage']:.4f} (idle {idle_kv:.4f})")
    for name in ("jaxinfer_num_requests_running", "jaxinfer_num_requests_waiting"):
        if name not in metrics:
            problems.append(f"{name} missing from /metrics")
        elif metrics[name] != 0:
            problems.append(f"{name}={metrics[name]:g}")
    kv = metrics.get("jaxinfer_kv_cache_usage_ratio")
    if kv is None:
        problems.append("jaxinfer_kv_cache_usage_ratio missing from /metrics")
    elif abs(kv - idle_kv) > 1e-9:
        problems.append(f"jaxinfer_kv_cache_usage_ratio={kv:.4f} (idle {idle_kv:.4f})")
    return problems


def rejected_problem(delta: float, seen: int) -> str | None:
    """The rejected counter must rise by exactly the refusals the clients saw."""
    if delta != seen:
        return f'requests_total{{status="rejected"}} rose by {delta:g}; clients saw {seen} refusals'
    return None


# ---- batch output -------------------------------------------------------------------------------


def check_batch_output(data: bytes, ids: list, malformed_line: int | None,
                       reference: dict) -> tuple[list[str], int, int]:
    """(problems, results compared, results that differ) of a finished batch output file.

    `ids`: the input's ids in order; `malformed_line`: the 1-based number of the line that
    must come back as an error record; `reference`: id -> Completion of an independent run."""
    problems = []
    if data and not data.endswith(b"\n"):
        problems.append("the output's last line is torn (no newline)")
    results: collections.Counter = collections.Counter()
    errors = []
    compared = mismatched = 0
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(raw)
        except ValueError:
            problems.append(f"output line {n} is not JSON (torn?): {raw[:60]!r}")
            continue
        if "error" in record:
            errors.append(record)
            continue
        key = json.dumps(record.get("id"))
        results[key] += 1
        if results[key] > 1:
            continue
        if record.get("id") in reference:
            compared += 1
            problem = compare(Completion.from_record(record), reference[record["id"]])
            if problem:
                mismatched += 1
                problems.append(f"id {record['id']!r}: {problem}")
    for key, count in results.items():
        if count > 1:
            problems.append(f"id {key} appears {count} times")
    missing = [i for i in ids if results[json.dumps(i)] == 0]
    if missing:
        problems.append(f"{len(missing)} ids have no result (first: {missing[:3]})")
    extra = [k for k in results if json.loads(k) not in ids]
    if extra:
        problems.append(f"results for ids not in the input: {extra[:3]}")
    if malformed_line is not None:
        hits = [e for e in errors if e.get("line") == malformed_line]
        if len(hits) != 1:
            problems.append(f"the malformed line {malformed_line} has {len(hits)} error records (want 1)")
    others = [e for e in errors if e.get("line") != malformed_line]
    if others:
        problems.append(f"{len(others)} unexpected error records (first: {others[0]})")
    return problems, compared, mismatched


# ---- the server's log ---------------------------------------------------------------------------


@dataclasses.dataclass
class LogCounts:
    lines: int = 0
    not_json: int = 0
    tracebacks: int = 0
    errors: int = 0  # level ERROR or CRITICAL
    first_not_json: str = ""
    first_traceback: str = ""


def check_log(data: bytes) -> LogCounts:
    """Every line of the server's stderr must be one JSON object without a traceback. A
    carriage return splits lines too: a progress bar redrawn in place is not JSON."""
    counts = LogCounts()
    for raw in re.split(rb"\r\n|\r|\n", data):
        if not raw.strip():
            continue
        counts.lines += 1
        text = raw.decode("utf-8", "replace")
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            counts.not_json += 1
            counts.first_not_json = counts.first_not_json or text[:100]
            continue
        if "exc" in entry or "Traceback" in text:
            counts.tracebacks += 1
            last = (str(entry.get("exc", "")).strip().splitlines() or [""])[-1]
            counts.first_traceback = counts.first_traceback or f"{str(entry.get('msg', ''))[:100]!r}: {last[:100]}"
        if entry.get("level") in ("ERROR", "CRITICAL"):
            counts.errors += 1
    return counts


def log_problems(counts: LogCounts) -> list[tuple[str, str]]:
    """(problem, first example) for each kind of bad line."""
    problems = []
    if counts.not_json:
        problems.append((f"{counts.not_json} log lines are not JSON", counts.first_not_json))
    if counts.tracebacks:
        problems.append((f"{counts.tracebacks} log lines hold a traceback", counts.first_traceback))
    return problems


# ---- the report ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    """One row of the campaign's table. None in a column: does not apply to this phase."""
    name: str
    sent: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    leaks: int | None = None
    mismatches: int | None = None
    cross_client: int | None = None
    rejected_delta: float | None = None
    refusals_seen: int | None = None
    seconds: float = 0.0
    problems: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def fail(self, kind: str, example: str = "") -> None:
        """Record one failure of `kind`; the first example of each kind is kept."""
        self.problems[kind] += 1
        self.examples.setdefault(kind, example)

    @property
    def failed(self) -> bool:
        return bool(self.problems)


_SHORT = {"OK": "ok", "INVALID_ARGUMENT": "inv", "RESOURCE_EXHAUSTED": "exh", "ALREADY_EXISTS": "dup",
          "FAILED_PRECONDITION": "pre", "NOT_FOUND": "nf", "CANCELLED": "cnc", "DEADLINE_EXCEEDED": "ddl",
          "UNKNOWN": "UNK", "INTERNAL": "INT", "UNAVAILABLE": "UNA"}
LEGEND = ("statuses: ok OK, inv INVALID_ARGUMENT, exh RESOURCE_EXHAUSTED, dup ALREADY_EXISTS, "
          "pre FAILED_PRECONDITION, nf NOT_FOUND, cnc cancelled by the client, ddl DEADLINE_EXCEEDED, "
          "UNK/INT/UNA UNKNOWN/INTERNAL/UNAVAILABLE")


def _statuses(counter: collections.Counter) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "-"


def render(phases: list[Phase]) -> str:
    """The table, the failures under it, and the verdict line (last)."""
    def cell(x):
        return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

    header = ["phase", "sent", "statuses", "leaks", "mismatches", "cross-client", "rejected Δ (seen)",
              "seconds", "result"]
    rows = [[p.name, str(p.sent), _statuses(p.statuses), cell(p.leaks), cell(p.mismatches),
             cell(p.cross_client),
             "-" if p.rejected_delta is None else f"{p.rejected_delta:g} ({cell(p.refusals_seen)})",
             f"{p.seconds:.1f}", "FAIL" if p.failed else "ok"] for p in phases]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append(LEGEND)
    for p in phases:
        for note in p.notes:
            lines.append(f"  {p.name}: {note}")
    failures = [(p.name, kind, n, p.examples[kind]) for p in phases for kind, n in p.problems.items()]
    for name, kind, n, example in failures:
        lines.append(f"  FAIL {name}: {kind} x{n}" + (f" (e.g. {example})" if example else ""))
    total = sum(n for _, _, n, _ in failures)
    lines.append("PASS" if not failures else f"FAIL: {total} failures in "
                 f"{len({f[0] for f in failures})} of {len(phases)} phases")
    return "\n".join(lines)


def passed(phases: list[Phase]) -> bool:
    return not any(p.failed for p in phases)
