"""A campaign against a real `jaxinfer serve`: the runs that found the serving defects, kept.

    python scripts/serving_campaign.py --hostile 1200 --cancels 360 --races 1000 --streams 1024 \\
        --concurrency 64 --kills 3                      # the full campaign (the default model)
    python scripts/serving_campaign.py --quick --model DIR --max-num-seqs 16 --max-num-batched-tokens 64 \\
        --max-model-len 128 --page-size 4               # tests/test_serving_campaign.py: ~65 s on 2 cores

It starts `python -m jaxinfer.cli serve --port 0 --metrics-port 0` (the engine flags passed
through) with its stderr in --log, and runs these phases, each with bounded counts:

1. hostile: boundary and fuzzed requests from a seeded random.Random (garbage bytes, invalid
   UTF-8, every sampling field at and past its limits, empty and oversized prompts, bad chat
   messages, a 3 MB Tokenize, Abort of unknown ids, the info RPCs). Every answer must be OK or
   a proper refusal, in the server's words, under 2 KB; the same greedy requests give the same
   text before and after.
2. cancel storm: streams cancelled after k messages, by short deadlines, or by an Abort from
   their own client. Afterwards GetServerInfo and /metrics must be back to idle, and the
   rejected counter must have risen by exactly the refusals the clients saw.
3. reuse race: client A cancels request id X; client B at once sends another request with the
   same id X; client C sends Abort(X) while B runs. B must get exactly its own output (its solo
   run), never A's tokens, prompt size or finish reason; C's Abort must find nothing.
4. concurrent load: greedy and seeded sampled requests, n=1/2, stop strings, --streams of
   them at --concurrency; each must equal the same request run alone on the same server.
5. batch kill -9: `jaxinfer batch` over a JSONL input (one malformed line) killed with SIGKILL
   --kills times, then run to the end; every id once, no torn line, the malformed line an
   error record, and every result equal to the server's greedy output for the same request
   (the independent reference: another code path over the same weights and engine flags).
6. server log: every stderr line of the server is one JSON object, none holds a traceback.

Prints a table (one row per phase) and PASS or FAIL; exits 1 on any failure. Progress goes
to stderr. Needs only `pip install -e .`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import grpc  # noqa: E402

from campaign_checks import (PROPER, REFUSALS, REJECTED, Completion, Phase, check_batch_output,  # noqa: E402
                             check_log, compare, cross_delivery, idle_problems, log_problems, parse_metrics,
                             passed, rejected_problem, render, status_problem)
from campaign_requests import METHODS, WORDS, Case, chat_messages, pick, boundary_cases, fuzz_case  # noqa: E402
from serving.gen.jaxinfer.v1 import inference_pb2 as pb  # noqa: E402
from serving.gen.jaxinfer.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

QUICK = dict(hostile=150, cancels=60, races=40, streams=96, concurrency=16, kills=1, batch_lines=24)
FULL = dict(hostile=1200, cancels=360, races=1000, streams=1024, concurrency=64, kills=3, batch_lines=60)
ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size")
SERVICE = "/jaxinfer.v1.Inference/"
# Text prompts that read as text to a real model and as bytes to the tests' byte tokenizer.
TEXTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colors:",
         "The quick brown fox", "In 1492, Columbus", "Water boils at", "My favourite food is",
         "Translate to French: cat", "2 + 2 =", "The sun rises in the", "A haiku about rain:"]
STOPS = [".", "\n", "e", " the", ",", "a"]
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- the server under test ------------------------------------------------------------------------


class ServeProcess:
    """`jaxinfer serve` on loopback, its stderr (JSON lines) in `log_path`."""

    def __init__(self, args, log_path: pathlib.Path):
        self.log_path = log_path
        cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--port", "0", "--metrics-port", "0",
               *model_flags(args)]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log)
        self.target = self.metrics_url = None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self._entries():
                msg = entry.get("msg", "")
                if msg == "listening":
                    self.target = entry["address"]
                elif msg.startswith("metrics on http://"):
                    self.metrics_url = msg.removeprefix("metrics on ")
                elif msg.startswith("ready on") and self.target and self.metrics_url:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"jaxinfer serve exited with {self.proc.returncode}: {self.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"jaxinfer serve was not ready within {timeout:.0f}s: {self.tail()}")

    def _entries(self):
        for line in self.log_path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry

    def tail(self, n: int = 600) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM (drain), then the exit code; SIGKILL if it does not stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self._log.close()
        return self.proc.returncode


def model_flags(args) -> list[str]:
    flags = ["--model", args.model] if args.model else []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


class Conn:
    """One client: a channel with a TCP connection of its own (the server tells clients apart
    by connection), typed stubs, and raw-bytes callables for every method."""

    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.raw = {name: (self.channel.unary_stream if name == "Generate" else self.channel.unary_unary)(
            SERVICE + name, request_serializer=bytes, response_deserializer=cls.FromString)
            for name, cls in METHODS.items()}

    async def close(self) -> None:
        await self.channel.close()


@dataclasses.dataclass
class Answer:
    code: str
    details: str = ""
    responses: list = dataclasses.field(default_factory=list)
    truncated: bool = False  # we stopped reading a stream that was still going


async def send(conn: Conn, method: str, data: bytes, timeout: float, max_messages: int = 64) -> Answer:
    """One call with raw request bytes; a Generate stream is read to its end, or cancelled
    after `max_messages` (accepted and streaming is all a hostile request needs to show)."""
    answer = Answer("OK")
    try:
        if method == "Generate":
            call = conn.raw[method](data, timeout=timeout)
            async for response in call:
                answer.responses.append(response)
                if len(answer.responses) >= max_messages and not response.finished:
                    call.cancel()
                    answer.truncated = True
                    break
        else:
            answer.responses.append(await conn.raw[method](data, timeout=timeout))
    except grpc.aio.AioRpcError as e:
        answer.code, answer.details = e.code().name, e.details() or ""
    return answer


async def generate(conn: Conn, request: pb.GenerateRequest, timeout: float = 600) -> tuple[str, Completion]:
    answer = await send(conn, "Generate", request.SerializeToString(), timeout, max_messages=1 << 30)
    return answer.code, Completion.from_responses(answer.responses)


# ---- the campaign's shared state ------------------------------------------------------------------


class Campaign:
    def __init__(self, args, serve: ServeProcess, rng: random.Random):
        self.args, self.serve, self.rng = args, serve, rng
        self.conns: list[Conn] = []

    async def setup(self) -> None:
        self.main = self.conn()
        info = await self.main.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        self.vocab, self.ctx, self.limits = info.vocab_size, info.context_length, info.limits
        self.token_range = (3, min(self.vocab, 256))  # plain ids: no special tokens on a small vocab
        progress(f"model {info.model} ({info.architecture}, vocab {self.vocab}, context {self.ctx})")

    def conn(self) -> Conn:
        c = Conn(self.serve.target)
        self.conns.append(c)
        return c

    async def close(self) -> None:
        for c in self.conns:
            await c.close()

    async def server_info(self) -> dict:
        s = await self.main.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        return {"running": s.running, "queued": s.queued, "active_streams": s.active_streams,
                "kv_cache_usage": s.kv_cache_usage, "draining": s.draining}

    async def metrics(self) -> dict[str, float]:
        def scrape():
            with urllib.request.urlopen(self.serve.metrics_url, timeout=30) as r:
                return r.read().decode()
        return parse_metrics(await asyncio.to_thread(scrape))

    async def idle_kv(self, timeout: float = 120) -> float:
        """The KV use the idle server reports (after whatever ran before has finished)."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.server_info()
            if (info["running"] == info["queued"] == info["active_streams"] == 0) or time.monotonic() > deadline:
                return info["kv_cache_usage"]
            await asyncio.sleep(0.1)

    async def idle_problems(self, idle_kv: float, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            problems = idle_problems(await self.server_info(), await self.metrics(), idle_kv)
            if not problems or time.monotonic() > deadline:
                return problems
            await asyncio.sleep(0.1)

    def text_prompt(self, rng: random.Random) -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
        return (rng.choice(TEXTS) + (" " + words if words else ""))

    def token_prompt(self, rng: random.Random, lo: int = 2, hi: int = 24) -> list[int]:
        return [rng.randrange(*self.token_range) for _ in range(rng.randint(lo, hi))]

    def room(self, prompt_tokens: int, want: int) -> int:
        return max(1, min(want, self.ctx - prompt_tokens - 1))


async def run_phase(campaign: Campaign, name: str, body, *, check_rejected: bool = True) -> Phase:
    """Run one phase: idle KV and the rejected counter before, the body, then the leak check
    and the counter's rise against the refusals the clients saw."""
    phase = Phase(name)
    progress(f"phase {name}")
    idle_kv = await campaign.idle_kv()
    rejected_before = (await campaign.metrics()).get(REJECTED, 0.0)
    start = time.monotonic()
    try:
        await body(phase)
    except Exception as e:  # a broken phase is a failed phase; the campaign goes on
        phase.fail("the phase raised", f"{type(e).__name__}: {str(e)[:200]}")
    if not campaign.serve.alive():
        phase.fail("the server died", campaign.serve.tail(300))
        phase.seconds = time.monotonic() - start
        return phase
    leaks = await campaign.idle_problems(idle_kv)
    phase.leaks = len(leaks)
    for leak in leaks:
        phase.fail("not idle after the phase", leak)
    phase.rejected_delta = (await campaign.metrics()).get(REJECTED, 0.0) - rejected_before
    phase.refusals_seen = sum(phase.statuses[c] for c in REFUSALS)
    if check_rejected:
        problem = rejected_problem(phase.rejected_delta, phase.refusals_seen)
        if problem:
            phase.fail("rejected counter", problem)
    phase.seconds = time.monotonic() - start
    progress(f"phase {name}: {'FAIL' if phase.failed else 'ok'} in {phase.seconds:.1f}s")
    return phase


async def bounded(concurrency: int, jobs) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def one(job):
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


# ---- 1. hostile requests ----------------------------------------------------------------------------


async def phase_hostile(c: Campaign, phase: Phase, n: int) -> None:
    rng = random.Random(c.rng.random())
    canaries = [pb.GenerateRequest(text=t, sampling=pb.SamplingParams(temperature=0.0, max_tokens=16))
                for t in TEXTS[:3]]
    before = [await generate(c.main, r) for r in canaries]
    cases = boundary_cases(c, rng)
    fixed = len(cases)
    cases += [fuzz_case(c, rng) for _ in range(max(0, n - fixed))]
    phase.notes.append(f"{fixed} boundary cases + {len(cases) - fixed} fuzzed (seed {c.args.seed}); the rejected "
                       "counter is only reported here (garbage bytes and Tokenize refusals are not requests)")
    conn = c.conn()

    async def one(case: Case) -> None:
        answer = await send(conn, case.method, case.data, case.timeout)
        phase.statuses[answer.code] += 1
        problem = status_problem(answer.code, answer.details, expected=case.expect, request_bytes=len(case.data),
                                 max_message_bytes=c.limits.max_message_bytes)
        if problem:  # a boundary case fails under its own name; fuzzed ones by the status they got
            kind = case.label if case.expect is not PROPER else f"{answer.code} answer to a {case.label}"
            phase.fail(kind, f"{case.label}: {problem}" if case.expect is PROPER else problem)
        elif answer.code == "OK" and case.method == "Generate" and not answer.truncated:
            if not answer.responses or not answer.responses[-1].finished:
                phase.fail("a stream ended OK without its finished message", case.label)
        elif answer.code == "OK" and case.method == "Abort" and answer.responses[0].found:
            phase.fail("Abort of an id nobody sent found something", case.label)

    for case in cases:
        if case.alone:
            await one(case)
    rest = [case for case in cases if not case.alone]
    for i in range(0, len(rest), 100):
        await bounded(8, [one(case) for case in rest[i:i + 100]])
        progress(f"  hostile: {len(cases) - len(rest) + min(i + 100, len(rest))}/{len(cases)}")
    phase.sent = len(cases) + 2 * len(canaries)
    after = [await generate(c.main, r) for r in canaries]
    for (code0, out0), (code1, out1), r in zip(before, after, canaries):
        phase.statuses[code0] += 1
        phase.statuses[code1] += 1
        problem = compare(out1, out0) if code0 == code1 == "OK" else f"status {code0} before, {code1} after"
        if problem:
            phase.mismatches = (phase.mismatches or 0) + 1
            phase.fail("greedy output changed across the phase", f"{r.text!r}: {problem}")
    phase.mismatches = phase.mismatches or 0


# ---- 2. cancel storm --------------------------------------------------------------------------------


async def phase_cancel_storm(c: Campaign, phase: Phase, n: int) -> None:
    rng = random.Random(c.rng.random())
    clients = [c.conn() for _ in range(4)]
    aborts = collections.Counter()

    def plan(i: int) -> tuple:
        """(what happens to stream i, the request, after how many messages, its deadline)."""
        action = rng.choices(["cancel", "deadline", "abort", "keep"], [0.35, 0.3, 0.25, 0.1])[0]
        sampling = dict(max_tokens=rng.randint(16, 64), ignore_eos=True, temperature=0.0)
        if rng.random() < 0.5:
            sampling.update(temperature=0.9, top_p=0.95, seed=rng.randrange(1000))
        request = pb.GenerateRequest(request_id=f"storm-{c.args.seed}-{i}", text=c.text_prompt(rng),
                                     sampling=pb.SamplingParams(**sampling))
        return action, request, rng.randint(1, 6), rng.uniform(0.01, 1.0) if action == "deadline" else 600

    async def one(i: int, action: str, request: pb.GenerateRequest, k: int, timeout: float) -> None:
        conn = clients[i % len(clients)]
        request_id, max_tokens = request.request_id, request.sampling.max_tokens
        responses, code, found = [], "OK", None
        call = conn.stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                responses.append(response)
                if len(responses) == k and not response.finished:
                    if action == "cancel":
                        call.cancel()
                        code = "CANCELLED"
                        break
                    if action == "abort":
                        found = (await conn.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=30)).found
                        aborts[found] += 1
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        phase.statuses[code] += 1
        allowed = {"OK", *REFUSALS, *{"deadline": ["DEADLINE_EXCEEDED"], "cancel": ["CANCELLED"]}.get(action, [])}
        problem = status_problem(code, "", expected=frozenset(allowed))
        if problem:
            phase.fail("improper status", f"{action}: {problem}")
        out = Completion.from_responses(responses)
        if found and out.finished and out.finish() != "abort" and len(out.tokens()) < max_tokens:
            phase.fail("Abort said found=True but the stream was not aborted",
                       f"{request_id}: finish {out.finish()} after {len(out.tokens())} tokens")

    plans = [plan(i) for i in range(n)]  # drawn up front: the same seed, the same storm
    await bounded(c.args.concurrency, [one(i, *p) for i, p in enumerate(plans)])
    phase.sent = n + sum(aborts.values())
    phase.notes.append(f"own-client Abort found the request {aborts[True]} of {sum(aborts.values())} times")


# ---- 3. cross-client reuse race ---------------------------------------------------------------------


async def phase_races(c: Campaign, phase: Phase, n: int) -> None:
    rng = random.Random(c.rng.random())
    # A pool of prompts of distinct sizes; each with its solo greedy outputs as A and as B.
    pool, sizes = [], set()
    for text in TEXTS:
        size = len((await c.main.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)).token_ids)
        if size not in sizes:
            sizes.add(size)
            pool.append((text, size))
    # A runs long enough to be cancelled mid-stream; B long enough for C's Abort to find it running.
    a_params = {t: pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=c.room(s, 64)) for t, s in pool}
    b_params = {t: pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=c.room(s, 24)) for t, s in pool}
    pool = [t for t, _ in pool]
    solo_a, solo_b = {}, {}
    for text in pool:
        for solo, params in ((solo_a, a_params), (solo_b, b_params)):
            code, solo[text] = await generate(c.main, pb.GenerateRequest(text=text, sampling=params[text]))
            phase.statuses[code] += 1
            if code != "OK":
                raise RuntimeError(f"the solo run of {text!r} failed: {code}")
    pairs = [(a, b) for a in pool for b in pool if a != b and solo_a[a].tokens()[:1] != solo_b[b].tokens()[:1]]
    if not pairs:
        pairs = [(a, b) for a in pool for b in pool if a != b]
        phase.notes.append("no two prompts differ in their first greedy token: A and B told apart by size only")
    conn_a, conn_b, conn_c = c.conn(), c.conn(), c.conn()
    counts = collections.Counter()

    async def race(i: int, a: str, b: str, k: int) -> None:
        """A (X, prompt a) cancelled after k messages; B (X, prompt b) at once; C's Abort(X) in even races."""
        x = f"race-{c.args.seed}-{i}"
        with_c = i % 2 == 0
        call_a = conn_a.stub.Generate(pb.GenerateRequest(request_id=x, text=a, sampling=a_params[a]), timeout=600)
        got = None
        try:
            async for got in call_a:
                k -= 1
                if k == 0 or got.finished:
                    break
            call_a.cancel()
            phase.statuses["OK" if got is not None and got.finished else "CANCELLED"] += 1
        except grpc.aio.AioRpcError as e:
            phase.statuses[e.code().name] += 1
            phase.fail("client A's stream failed", f"{e.code().name}: {e.details()}")
            return
        responses, c_found = [], None
        for _ in range(100):  # A's id may still be held for a moment: B tries again at once
            request_b = pb.GenerateRequest(request_id=x, text=b, sampling=b_params[b])
            call_b = conn_b.stub.Generate(request_b, timeout=600)
            try:
                async for response in call_b:
                    responses.append(response)
                    if with_c and c_found is None and not response.finished:
                        c_found = (await conn_c.stub.Abort(pb.AbortRequest(request_id=x), timeout=30)).found
                        phase.statuses["OK"] += 1
                        counts["c_aborts"] += 1
                phase.statuses["OK"] += 1
                break
            except grpc.aio.AioRpcError as e:
                phase.statuses[e.code().name] += 1
                if e.code() != grpc.StatusCode.ALREADY_EXISTS or responses:
                    phase.fail("client B's stream failed", f"{e.code().name}: {e.details()}")
                    return
                counts["b_retries"] += 1
        if c_found:
            phase.fail("client C's Abort(X) found client B's request", x)
        out = Completion.from_responses(responses)
        problem = compare(out, solo_b[b])
        if problem:
            phase.mismatches += 1
            phase.fail("B's output is not its solo output", f"{x}: {problem}")
        evidence = cross_delivery(out, a_solo=solo_a[a], a_prompt_tokens=solo_a[a].prompt_tokens,
                                  b_solo=solo_b[b], b_aborted_by_someone=bool(c_found))
        if evidence:
            phase.cross_client += 1
            phase.fail("cross-client delivery", f"{x}: {evidence}")

    phase.mismatches = phase.cross_client = 0
    plans = [(*pick(rng, pairs), rng.randint(1, 3)) for _ in range(n)]
    lanes = min(8, max(1, n))  # races on distinct ids run side by side

    async def lane(j: int) -> None:
        for i in range(j, n, lanes):
            await race(i, *plans[i])
            if i % 100 == 0:
                progress(f"  races: {i}/{n}")

    await asyncio.gather(*(lane(j) for j in range(lanes)))
    phase.sent = sum(phase.statuses.values())
    phase.notes.append(f"{len(pool)} prompts; B retried after ALREADY_EXISTS {counts['b_retries']} times; "
                       f"C sent Abort(X) in {counts['c_aborts']} races")


# ---- 4. concurrent load -----------------------------------------------------------------------------


def load_request(c: Campaign, rng: random.Random) -> pb.GenerateRequest:
    sampling = dict(max_tokens=rng.randint(4, 32 if c.args.quick else 48))
    if rng.random() < 0.5:
        sampling["temperature"] = 0.0
    else:
        sampling.update(temperature=rng.choice([0.7, 1.0]), top_p=0.95, seed=rng.randrange(10_000))
        if rng.random() < 0.4:
            sampling["n"] = 2
    if rng.random() < 0.3:
        sampling["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.5:
        sampling["ignore_eos"] = True
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if rng.random() < 0.7:
        request.text = c.text_prompt(rng)
    else:
        request.token_ids.ids.extend(c.token_prompt(rng))
    return request


async def phase_load(c: Campaign, phase: Phase, n: int, concurrency: int) -> None:
    rng = random.Random(c.rng.random())
    distinct = min(n, max(16, n // 8))
    requests = [load_request(c, rng) for _ in range(distinct)]
    solo = []
    for r in requests:  # each alone on the server: the reference
        code, out = await generate(c.main, r)
        phase.statuses[code] += 1
        if code != "OK":
            phase.fail("a solo request failed", f"{code}")
        solo.append(out)
    progress(f"  load: {distinct} solo outputs; {n} streams at {concurrency} concurrent")
    order = [rng.randrange(distinct) for _ in range(n)]
    clients = [c.conn() for _ in range(4)]

    async def one(i: int, j: int):
        return j, await generate(clients[i % len(clients)], requests[j])

    results = await bounded(concurrency, [one(i, j) for i, j in enumerate(order)])
    phase.mismatches = 0
    for j, (code, out) in results:
        phase.statuses[code] += 1
        if code != "OK":
            phase.fail("a stream failed", code)
            continue
        problem = compare(out, solo[j])
        if problem:
            phase.mismatches += 1
            phase.fail("output differs from the same request run alone", problem)
    phase.sent = distinct + n
    phase.notes.append(f"{distinct} distinct requests (greedy, seeded sampled, n=1/2, stop strings), "
                       f"each run alone first")


# ---- 5. batch kill -9 ---------------------------------------------------------------------------------


def batch_lines(c: Campaign, rng: random.Random, count: int) -> tuple[list[dict], int]:
    """The batch input's requests and the 1-based line number of the malformed line."""
    lines = []
    for i in range(count):
        request_id = 1000 + i if i % 7 == 3 else f"b{i}"
        line = {"id": request_id, "temperature": 0, "max_tokens": rng.randint(1, 40)}
        kind = rng.random()
        if kind < 0.6:
            line["prompt"] = c.text_prompt(rng)
        elif kind < 0.8:
            line["token_ids"] = c.token_prompt(rng)
        else:
            line["messages"] = [{"role": "user", "content": c.text_prompt(rng)}]
        if rng.random() < 0.3:
            line["ignore_eos"] = True
        lines.append(line)
    return lines, rng.randint(1, count + 1)


def batch_request(line: dict) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=line["max_tokens"],
                                 ignore_eos=line.get("ignore_eos", False))
    request = pb.GenerateRequest(sampling=sampling)
    if "prompt" in line:
        request.text = line["prompt"]
    elif "token_ids" in line:
        request.token_ids.ids.extend(line["token_ids"])
    else:
        request.messages.CopyFrom(chat_messages([(m["role"], m["content"]) for m in line["messages"]]))
    return request


def _records(path: pathlib.Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_batch_with_kills(cmd: list[str], out: pathlib.Path, total: int, kills: int, rng: random.Random,
                         err_path: pathlib.Path, phase: Phase) -> None:
    """Start the batch, SIGKILL it once `target` more records are out, `kills` times; then
    let it finish."""
    landed = torn = 0
    with open(err_path, "ab") as err:
        for _ in range(kills):
            done = _records(out)
            if total - done < 2:
                break
            target = done + rng.randint(1, total - done - 1)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 1800
            while proc.poll() is None and _records(out) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))
            if proc.poll() is None:
                proc.kill()
                landed += proc.wait() == -signal.SIGKILL
                data = out.read_bytes() if out.exists() else b""
                torn += bool(data) and not data.endswith(b"\n")
                progress(f"  batch: killed with SIGKILL at {_records(out)}/{total} records")
            else:
                phase.notes.append(f"a batch run ended (exit {proc.returncode}) before its kill")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            rc = proc.wait(1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = f"{proc.wait()} (killed after 1800 s)"
    phase.sent = landed + 1
    phase.statuses["kill -9"] = landed
    phase.notes.append(f"{landed} kills landed mid-run; {torn} left a torn last line for the next run to cut")
    if rc != 0:
        phase.fail("the last batch run did not exit 0", f"exit {rc}; see {err_path}")
    if landed == 0 and kills > 0:
        phase.fail("no kill landed while the batch was running")


async def phase_batch(c: Campaign, phase: Phase, kills: int, count: int, workdir: pathlib.Path) -> None:
    rng = random.Random(c.rng.random())
    lines, malformed = batch_lines(c, rng, count)
    reference = {}
    results = await bounded(4, [generate(c.main, batch_request(line)) for line in lines])
    for line, (code, out) in zip(lines, results):
        if code != "OK":
            phase.fail("the server refused a batch line's request", f"{line['id']}: {code}")
        reference[line["id"]] = out
    inp, out = workdir / "batch_input.jsonl", workdir / "batch_output.jsonl"
    raw = [json.dumps(line) for line in lines]
    raw.insert(malformed - 1, '{"id": "broken", "prompt": "this line is cut')
    inp.write_text("\n".join(raw) + "\n")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "jaxinfer.cli", "batch", "--input", str(inp), "--output", str(out),
           *model_flags(c.args)]
    err = workdir / "batch_stderr.log"
    await asyncio.to_thread(run_batch_with_kills, cmd, out, len(raw), kills, rng, err, phase)
    problems, compared, phase.mismatches = check_batch_output(out.read_bytes(), [line["id"] for line in lines],
                                                              malformed, reference)
    for p in problems:
        phase.fail("batch output", p)
    phase.notes.append(f"{compared} results compared with the server's greedy output; output in {out}")


# ---- 6. the server's log ----------------------------------------------------------------------------


def phase_log(serve: ServeProcess, exit_code: int | None) -> Phase:
    phase = Phase("server log")
    counts = check_log(serve.log_path.read_bytes())
    phase.sent = counts.lines
    phase.statuses.update({"json": counts.lines - counts.not_json, "not json": counts.not_json,
                           "traceback": counts.tracebacks})
    for kind, example in log_problems(counts):
        phase.fail(kind, example)
    if exit_code != 0:
        phase.fail("the server did not drain and exit 0 on SIGTERM", f"exit {exit_code}")
    phase.notes.append(f"{counts.lines} lines, {counts.errors} at ERROR; log in {serve.log_path}")
    return phase


# ---- main -------------------------------------------------------------------------------------------


async def campaign(args, serve: ServeProcess, workdir: pathlib.Path) -> list[Phase]:
    c = Campaign(args, serve, random.Random(args.seed))
    await c.setup()
    phases = []
    steps = [("hostile", lambda p: phase_hostile(c, p, args.hostile), False),
             ("cancel storm", lambda p: phase_cancel_storm(c, p, args.cancels), True),
             ("reuse race", lambda p: phase_races(c, p, args.races), True),
             ("concurrent load", lambda p: phase_load(c, p, args.streams, args.concurrency), True),
             ("batch kill -9", lambda p: phase_batch(c, p, args.kills, args.batch_lines, workdir), True)]
    for name, body, check_rejected in steps:
        if not serve.alive():
            phase = Phase(name)
            phase.fail("not run: the server is gone")
            phases.append(phase)
            continue
        phases.append(await run_phase(c, name, body, check_rejected=check_rejected))
    await c.close()
    return phases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="what `jaxinfer serve --model` takes (default: the default one)")
    for name in ENGINE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="passed to serve and batch")
    p.add_argument("--quick", action="store_true", help=f"small counts: {QUICK}")
    p.add_argument("--hostile", type=int, help="hostile requests (boundary cases included)")
    p.add_argument("--cancels", type=int, help="streams in the cancel storm")
    p.add_argument("--races", type=int, help="cross-client request-id reuse races")
    p.add_argument("--streams", type=int, help="streams in the concurrent-load phase")
    p.add_argument("--concurrency", type=int, help="streams in flight in the storm and the load phase")
    p.add_argument("--kills", type=int, help="kill -9 of the batch job")
    p.add_argument("--batch-lines", type=int, help="requests in the batch input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="the server's stderr (default: in a new temporary directory)")
    p.add_argument("--start-timeout", type=float, default=1200, help="seconds for the server to be ready")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="serving-campaign-"))
    log_path = pathlib.Path(args.log) if args.log else workdir / "server.log"
    command = "python scripts/serving_campaign.py " + " ".join(sys.argv[1:] if argv is None else argv)
    progress(f"starting jaxinfer serve (log {log_path})")
    serve = ServeProcess(args, log_path)
    phases: list[Phase] = []
    try:
        serve.wait_ready(args.start_timeout)
        progress(f"ready on {serve.target}, metrics {serve.metrics_url}")
        phases = asyncio.run(campaign(args, serve, workdir))
    except Exception as e:
        setup = Phase("setup")
        setup.fail("the campaign could not run", f"{type(e).__name__}: {str(e)[:300]}")
        phases.append(setup)
    finally:
        exit_code = serve.stop()
    phases.append(phase_log(serve, exit_code))
    print(f"{command}\n(total {time.monotonic() - _START:.0f}s; work files in {workdir})")
    print(render(phases))
    return 0 if passed(phases) else 1


if __name__ == "__main__":
    sys.exit(main())
