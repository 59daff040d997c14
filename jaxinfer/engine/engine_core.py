"""The engine core: the scheduler and the device, one step at a time, and nothing per token
that is Python-heavy.

    CoreRequest ──▶ Scheduler.schedule() ──▶ StepInputs (one buffer) ──▶ runner.step (async)
                                                                             │
    CoreStep (plain arrays) ◀── Scheduler.update() ◀── read back ◀──────────┘

The host runs one step ahead: `step()` schedules step N and hands it to the launch thread,
then reads step N-1's tokens (which blocks only until N-1 is done, while N is already
being launched). Sequences in N-1 that sampled feed their new token into N straight from the
device; the scheduler counts it as pending. A sequence that finishes in N-1 was already
given a slot in N: that step's token for it is dropped (its SeqTable row changed occupant).

What comes out is a CoreStep: plain numbers and arrays keyed by sequence ids, no live
objects. Text, stop strings, logprobs entries and the outputs themselves are the
frontend's (jaxinfer/engine/engine.py and its output processor), which tells the core
when a stop string ends a sequence. The same values could cross to another process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import pickle
import struct
import threading
import time
import weakref
import zlib

import jax
import numpy as np
from jax.sharding import Mesh

from checkpoints.loader import LoadedModel
from jaxinfer.core.config import EngineConfig
from jaxinfer.core.request import Request, Sequence, Status
from jaxinfer.core.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams
from jaxinfer.core.scheduler import ScheduledStep, Scheduler
from jaxinfer.core.shapes import next_bucket
from jaxinfer import distributed
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.runner import compilations, kv_cache
from jaxinfer.runner.model_runner import ModelRunner, StepOutput
from jaxinfer.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU, where memory is shared with everything
ACCELERATOR_KV_FRACTION = 0.9  # of the memory left after the weights


@dataclasses.dataclass(frozen=True)
class CoreRequest:
    """A checked request, as the frontend hands it to the core. Its sequences are numbered
    `first_seq_id` + sample index (0 .. n-1) in every CoreStep."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int
    first_seq_id: int
    seed: int  # drawn once, on arrival
    priority: int = 0
    arrival: int = 0
    arrival_time: float = 0.0


@dataclasses.dataclass
class CoreStep:
    """One step's results, read back: per accepted sample (arrays of [k]) and what else
    happened to requests since the last CoreStep."""

    seq_ids: np.ndarray  # int64: CoreRequest.first_seq_id + sample index
    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32: the raw logprob of each sampled token
    finished: np.ndarray  # bool: this token finished the sequence (a stop id or its length)
    finish: dict[int, tuple[str, int | None]]  # seq id -> (finish reason, stop token) where finished
    top_ids: np.ndarray | None  # [k, num_top] when some row asked for top-n logprobs
    top_logprobs: np.ndarray | None
    # Prompt logprobs: (request id, first position, logprob of each next prompt token, top ids, top logprobs).
    prompt_scores: list[tuple[str, int, np.ndarray, np.ndarray | None, np.ndarray | None]]
    scheduled: list[tuple[str, float, int]]  # first scheduled: (request id, time, prompt tokens cached)
    preempted: list[int]  # seq ids preempted (once per preemption)
    time: float

    def encode(self) -> bytes:
        """As bytes for another process: the arrays raw, the rarer parts pickled only when
        present (a plain pickle costs about 50 µs a step, this a few)."""
        extras = (self.finish, self.top_ids, self.top_logprobs, self.prompt_scores, self.scheduled, self.preempted)
        rare = pickle.dumps(extras, protocol=pickle.HIGHEST_PROTOCOL) if (
            self.finish or self.top_ids is not None or self.prompt_scores or self.scheduled or self.preempted) else b""
        k = len(self.seq_ids)
        return b"".join((_HEAD.pack(k, self.time, len(rare)), np.ascontiguousarray(self.seq_ids, np.int64).data,
                         np.ascontiguousarray(self.tokens, np.int32).data,
                         np.ascontiguousarray(self.logprobs, np.float32).data,
                         np.ascontiguousarray(self.finished, np.bool_).data, rare))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> CoreStep:
        k, when, rare = _HEAD.unpack_from(data)
        at = _HEAD.size
        arrays = []
        for dtype in (np.int64, np.int32, np.float32, np.bool_):
            n = k * np.dtype(dtype).itemsize
            arrays.append(np.frombuffer(data, dtype, k, at))
            at += n
        if rare:
            finish, top_ids, top_lps, scores, scheduled, preempted = pickle.loads(data[at:at + rare])
        else:
            finish, top_ids, top_lps, scores, scheduled, preempted = {}, None, None, [], [], []
        return cls(*arrays, finish, top_ids, top_lps, scores, scheduled, preempted, when)


CLOSED = object()  # what EngineCore.follow returns when the leader has closed its core


@dataclasses.dataclass(frozen=True)
class _RemoteStep:
    n: int  # a remote core's step, by number: its owner sends back its output under it


class _RemoteRunner:
    """Stands in for the runner of a core whose devices are all another process's: no device state, no
    calls (the leader sends them to that process)."""

    def __init__(self, spec: kv_cache.CacheSpec, num_pages: int, mesh: Mesh):
        self.mesh = mesh
        self.kv_partitions = dataclasses.replace(spec, num_pages=num_pages).partitions(mesh)
        self.cache = self.features = None

    def prepare(self, *args, **kwargs) -> None:
        pass

    def copy_pages(self, pairs) -> None:
        pass

    def reset_penalty_slot(self, *args) -> None:
        pass

    def release(self) -> None:
        pass


def _fetch(out: StepOutput, want_top: bool) -> tuple:
    """A step's (tokens and logprobs packed, top ids, top logprobs) on the host: one transfer without top-n."""
    if want_top:
        return tuple(jax.device_get([out.packed, out.top_ids, out.top_logprobs]))
    return np.asarray(out.packed), None, None

_HEAD = struct.Struct("<idi")  # rows, time, bytes of the pickled rare parts


@dataclasses.dataclass
class _InFlight:
    step: ScheduledStep
    out: StepOutput | concurrent.futures.Future  # on the device (a Future of it from the launch thread)
    want_top: bool
    dispatched: float = 0.0  # time.perf_counter() when it was handed to the device


def _average(old: float, new: float) -> float:
    """A moving average of step times (0: none yet); an outlier counts as twice the average at most."""
    return new if old <= 0 else 0.7 * old + 0.3 * min(new, 2 * old)


def _min_decode_rows(mesh: Mesh) -> int:
    """The fewest rows of a decode step on this platform (EngineConfig.min_decode_rows says why)."""
    return 1 if mesh.devices.flat[0].platform == "cpu" else 2


class EngineCore:
    def __init__(self, model: LoadedModel, mesh: Mesh, config: EngineConfig = EngineConfig(),
                 draft: LoadedModel | None = None, replica: int = 0):
        """`draft`: an already loaded draft model (benchmarks over random weights), where the config's
        speculative_config names one; else it is loaded from there. `replica`: this core's index among
        data-parallel replicas (jaxinfer/engine/data_parallel.py)."""
        compilations.enable_persistent_cache()
        # A multi-process run: every process builds this core alike; process 0 steps it and sends each
        # step's device calls to the processes that hold its devices, whose cores only follow
        # (jaxinfer/distributed.py). Where the mesh lies: "local" (this process's devices only), "spanning"
        # (several processes'), or "remote" (another single process's: this core schedules it, if this is
        # the leader, and its owner runs its steps and sends back their tokens).
        self.channel = distributed.channel() if distributed.multi_process() else None
        self.follower = self.channel is not None and not distributed.is_leader()
        holders = {d.process_index for d in mesh.devices.flat}
        self.placement = ("spanning" if len(holders) > 1 else
                          "local" if jax.process_index() in holders else "remote")
        self.owner = min(holders)  # the process that runs a remote core's steps
        self._digest = 0  # of every sampled token array, compared between the processes
        self._launched = 0  # steps launched (a remote core: steps sent), numbering their outputs
        self._publisher: concurrent.futures.ThreadPoolExecutor | None = None  # an owner's, sending its outputs
        # The cores one channel serves, by replica (data parallelism: jaxinfer/engine/data_parallel.py sets these).
        self.replica, self.group = replica, [self]
        if self.channel is not None and config.speculative_config is not None and (
                config.speculative_config.method in ("draft_model", "eagle3")):
            raise ConfigError("a draft model or head does not run in a multi-process run yet: its own device calls "
                              "are not sent to the other processes (method 'ngram' is)")
        self.model = model
        cfg = model.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if model.tokenizer is not None:
            eos |= set(model.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)  # the model's; a request brings its own
        self.ban_width = next_bucket(MAX_STOP_TOKEN_IDS + len(self.eos_token_ids), 8)
        try:
            given = config.num_pages
            config = config.replace(max_model_len=self.max_model_len, num_pages=given or 2,
                                    min_decode_rows=config.min_decode_rows or _min_decode_rows(mesh))
            spec = kv_cache.CacheSpec.for_model(cfg, num_pages=1, page_size=config.page_size,
                                                dtype=model.kv_cache_dtype)
            self.draft = _draft_model(model, config, mesh, draft)
            # A draft model's or head's pages (jaxinfer/spec_decode/) share the target's ids: one pool each; a
            # head also reads the target's hidden states, kept per token beside its K/V.
            self.feature_layers = () if self.draft is None else self.draft.feature_layers
            page_bytes = spec.bytes_per_page + (0 if self.draft is None else kv_cache.CacheSpec.for_model(
                self.draft.config, num_pages=1, page_size=config.page_size,
                dtype=self.draft.kv_cache_dtype).bytes_per_page) + (
                len(self.feature_layers) * cfg.hidden_size * config.page_size * np.dtype(model.dtype).itemsize)
            if given:
                num_pages = given
            elif self.placement == "remote":  # sized by the process that holds its devices
                num_pages = int(self.channel.fetch(f"replica/{replica}/num_pages"))
            else:
                num_pages = self._pool_size(page_bytes, config, mesh)
            tp = mesh.shape.get("tensor", 1)
            if not given and spec.splits_pages and num_pages > tp:
                num_pages -= num_pages % tp  # pages split by sequence over the devices: a partition each
            if not given and self.placement == "local" and self.channel is not None:  # for the others' stand-ins
                self.channel.publish(f"replica/{replica}/num_pages", str(num_pages))
            partitions = dataclasses.replace(spec, num_pages=num_pages).partitions(mesh)
            self.config = config = config.replace(num_pages=num_pages, kv_partitions=partitions)
        except ValueError as e:
            raise ConfigError(f"invalid engine configuration: {e}") from None
        self.proposer = self._proposer(config, mesh)
        self.scheduler = Scheduler(config, stop_width=self.ban_width, proposer=self.proposer)
        max_rows = max(s.num_rows for s in config.all_shapes())
        if self.placement == "remote":
            self.runner = _RemoteRunner(spec, num_pages, mesh)
        else:
            self.runner = ModelRunner(cfg, model.graphdef, model.state, mesh, num_pages=num_pages,
                                      page_size=config.page_size, cache_dtype=model.kv_cache_dtype, max_rows=max_rows,
                                      penalty_slots=config.max_num_seqs, feed_slots=config.max_num_seqs,
                                      max_model_len=self.max_model_len,
                                      attention_impl=config.attention, feature_layers=self.feature_layers)
        assert self.runner.kv_partitions == config.kv_partitions, "the pool and the cache split alike"
        log.info("KV cache: %d pages of %d tokens (%.2f GiB, %d partitions); max_model_len %d", num_pages,
                 config.page_size, num_pages * spec.bytes_per_page / 2**30, partitions, self.max_model_len)
        self.requests: dict[str, Request] = {}  # until every sequence of theirs has finished
        self.metrics = EngineMetrics()
        self._arrivals = itertools.count()
        self._inflight: _InFlight | None = None
        self._buckets_seen: set = set()  # decode buckets (and "proposal") whose time was observed once
        self._last_read_back: float | None = None  # when the last step ahead was read back
        # On a GPU the runner's device calls go out on a thread of their own, in order. Calling
        # a compiled step there returns only once XLA has launched its few hundred kernels,
        # which takes about as long as the device takes to run them (4 ms for the 8B shape at
        # two rows), and the call releases the GIL meanwhile. So the step thread's read-back,
        # scheduling and packing of the next step run during that launch, not between two
        # launches, where the device would wait for them. The CPU and TPU clients return at
        # once: there the thread would only add a hand-off, so the calls stay inline.
        self.launch_thread = mesh.devices.flat[0].platform == "gpu"
        self._launcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._warming: threading.Thread | None = None
        self._stop_warming = False
        self._closed = False
        compilations.install()

    def _proposer(self, config: EngineConfig, mesh: Mesh):
        """Speculation's proposer (None: the scheduler's own n-gram lookup, or no speculation)."""
        if self.draft is None:
            return None
        from jaxinfer.spec_decode.draft_head import DraftHeadProposer
        from jaxinfer.spec_decode.draft_model import DraftModelProposer

        spec, draft = config.speculative_config, self.draft
        runner = ModelRunner(draft.config, draft.graphdef, draft.state, mesh, num_pages=config.num_pages,
                             page_size=config.page_size, cache_dtype=draft.kv_cache_dtype, penalty_slots=1,
                             feed_slots=1, max_model_len=self.max_model_len, attention_impl=config.attention)
        settings = dict(k=spec.num_speculative_tokens, rows=config.max_num_seqs,
                        max_queries=min(config.max_num_seqs, spec.batch_limit), prefill_buckets=config.prefill_buckets(),
                        block_q=config.block_q, pages_per_seq=config.pages_per_seq, min_rows=config.min_decode_rows)
        if self.feature_layers:  # a trained head, over the target's hidden states
            return DraftHeadProposer(runner, lambda: self.runner.features, **settings)
        return DraftModelProposer(runner, **settings)

    def _pool_size(self, bytes_per_page: int, config: EngineConfig, mesh: Mesh) -> int:
        """Pages for the KV pool: what the config allows, never more than every sequence at
        full length needs. On accelerators the budget is set by the device of the mesh with
        the least memory free, times the devices a page is split across."""
        most = 1 + config.max_num_seqs * config.pages_per_seq
        budget = config.kv_cache_bytes
        if budget is None:
            # This process's devices; in a multi-process run, the least of every process's.
            devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
            stats = [d.memory_stats() if d.platform != "cpu" else None for d in devices]
            if all(s and "bytes_limit" in s for s in stats):
                free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
                if self.channel is not None:
                    from jax.experimental import multihost_utils
                    free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
                tensor = dict(mesh.shape).get("tensor", 1)
                split = tensor if getattr(self.model.config, "num_kv_heads", 1) % tensor == 0 else 1
                budget = int(free * ACCELERATOR_KV_FRACTION) * split
            else:
                budget = CPU_KV_CACHE_BYTES
        pages = min(most, budget // bytes_per_page)
        if pages < 2:
            raise ConfigError(f"the KV cache budget of {budget} bytes holds no page of "
                              f"{bytes_per_page} bytes")
        return int(pages)

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, r: CoreRequest) -> None:
        """Queue a request the frontend checked."""
        request = Request(r.request_id, r.prompt_token_ids, r.params, r.eos_token_ids, r.max_tokens,
                          priority=r.priority, arrival=next(self._arrivals), arrival_time=r.arrival_time,
                          seed=r.seed, first_seq_id=r.first_seq_id)
        self.requests[r.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """Free every sequence of a request now (its tokens still in flight are dropped)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.aborted = True
            for seq in list(request.sequences):
                self.scheduler.finish(seq, "abort")

    def finish_stop(self, request_id: str, index: int, stop_reason: str) -> None:
        """The frontend found a stop string in sequence `index` of a request: free it."""
        request = self.requests.get(request_id)
        if request is not None and index < len(request.sequences):
            self.scheduler.finish(request.sequences[index], "stop", stop_reason)
            self._retire_if_done(request)

    def _retire_if_done(self, request: Request) -> None:
        if (request.forked or request.n == 1) and all(s.status is Status.FINISHED for s in request.sequences):
            self.requests.pop(request.request_id, None)

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn automatic prefix caching on or off (the engine must be idle); the cache
        starts empty either way."""
        if self.has_work():
            raise RuntimeError("prefix caching can only be switched while the engine is idle")
        self.config = self.config.replace(enable_prefix_caching=enabled)
        self.scheduler.cfg = self.config
        self.scheduler.pool.reset_prefix_cache()
        self.scheduler.pool.enable_prefix_caching = enabled

    def has_work(self) -> bool:
        return bool(self.requests) or self._inflight is not None or self.scheduler.has_work()

    def gauges(self) -> dict:
        """The core's current state, cheap enough to read every step."""
        pool = self.scheduler.pool
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": pool.usage, "kv_pages": pool.num_pages - 1,
                "prefix_cache_hit_rate": pool.prefix_hit_rate, "preemptions": self.scheduler.num_preemptions,
                "spec_k": self.scheduler.spec_k}

    def counters(self) -> dict:
        pool = self.scheduler.pool
        return {"prefix_cache_queried_tokens": pool.prefix_queried_tokens,
                "prefix_cache_hit_tokens": pool.prefix_hit_tokens, "steps": self.metrics.steps,
                "computed_tokens": self.metrics.computed_tokens,
                "spec_draft_tokens": self.scheduler.num_drafted, "spec_accepted_tokens": self.scheduler.num_accepted,
                "spec_drafted_per_position": self.scheduler.drafted_per_position.tolist(),
                "spec_accepted_per_position": self.scheduler.accepted_per_position.tolist(),
                "compilations": compilations.count()}

    # ---- the step loop ------------------------------------------------------------------------

    def step(self) -> tuple[list[CoreStep], bool]:
        """Dispatch the next step, then read back the previous one: (what the previous one
        produced, if there was one; whether a step was dispatched). With the launch thread, a
        step whose launch failed raises when it is read back, from the next call. In a multi-process
        run, any failure of a step means the run is broken: it raises ProcessLost."""
        if self.channel is None:
            return self._step()
        try:
            return self._step()
        except distributed.ProcessLost:
            raise
        except Exception as e:  # a collective lost its peer: a process, or the network between them, is gone
            self.channel.fail(distributed.ProcessLost(f"a step across the processes failed; a process or the network "
                                                      f"between them is gone ({type(e).__name__}: {e})"))
            raise self.channel.failure from e

    def _step(self) -> tuple[list[CoreStep], bool]:
        records = []
        s = self.scheduler
        if self._inflight is not None and s.may_speculate() and not s.pipelined:
            # Drafts follow each sequence's last token: read it back before scheduling (no step ahead).
            inflight = self._inflight
            records.append(self._read_back(inflight))
            self._inflight = None
            if not inflight.step.shape.prefill_tokens:  # a step's whole cost, for the draft rows' trade-off
                self._observe_step(inflight.step.shape.decode_rows, time.perf_counter() - inflight.dispatched)
        scheduled = s.schedule()
        previous = self._inflight
        self._inflight = self._dispatch(scheduled) if scheduled is not None else None
        if previous is not None:
            records.append(self._read_back(previous))
            now = time.perf_counter()
            last, self._last_read_back = self._last_read_back, now
            if s.proposer is not None and not previous.step.shape.prefill_tokens and last is not None:
                # One step ahead, a step costs the time between two read-backs (the draft rows' trade-off).
                self._observe_step(previous.step.shape.decode_rows, now - last)
        else:
            self._last_read_back = None
        return records, self._inflight is not None

    def _observe_step(self, rows: int, seconds: float) -> None:
        """Seconds a decode step of `rows` rows takes, dispatch to read-back, for the scheduler's choice of
        how many drafts to carry. A bucket's first step is left out (it may include a compile), then a
        moving average."""
        s = self.scheduler
        proposal, s.last_propose_seconds = s.last_propose_seconds, None
        if proposal is not None:  # the proposal before it (host and device time), the first one left out too
            if "proposal" in self._buckets_seen:
                s.propose_seconds = _average(s.propose_seconds, proposal)
            self._buckets_seen.add("proposal")
        seen, times = self._buckets_seen, s.bucket_seconds
        if rows not in seen:
            seen.add(rows)
            return
        times[rows] = _average(times.get(rows, 0.0), seconds)

    def _dispatch(self, step: ScheduledStep) -> _InFlight:
        started = time.perf_counter()
        inputs = self.inputs(step)  # packed on this thread, whichever thread launches it
        want_top = bool(step.logits.want_top.any())
        if self.channel is not None and self.placement != "local":  # the processes holding its devices make
            self.channel.send(("launch", self.replica, step.page_copies, step.slot_resets, inputs, want_top))
        n, self._launched = self._launched, self._launched + 1
        if self.placement == "remote":  # the same calls (sent here: in order); a remote core's owner sends back
            out = _RemoteStep(n)
        elif self.launch_thread:
            if self._launcher is None:
                self._launcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-launch")
            out = self._launcher.submit(self._launch, step.page_copies, step.slot_resets, inputs)
        else:
            out = self._launch(step.page_copies, step.slot_resets, inputs)
            if self._one_at_a_time():
                jax.block_until_ready(out.packed)
        self.metrics.steps += 1
        self.metrics.computed_tokens += step.num_tokens
        return _InFlight(step, out, want_top, started)

    def _launch(self, page_copies, slot_resets, inputs: StepInputs) -> StepOutput:
        runner = self.runner
        if page_copies:
            runner.copy_pages(page_copies)
        for slot, tokens, prompt_len in slot_resets:
            runner.reset_penalty_slot(slot, tokens, prompt_len)
        return runner.step(inputs)

    def inputs(self, step: ScheduledStep) -> StepInputs:
        """The step's inputs as one value, from the scheduler's decision alone."""
        return StepInputs.from_step(step, self.ban_width, self.config.page_size)

    def _read_back(self, inflight: _InFlight) -> CoreStep:
        out = inflight.out
        if isinstance(out, _RemoteStep):  # its owner's read-back, through the store
            packed, top_ids, top_lps = pickle.loads(self.channel.fetch_output(self.replica, out.n))
        else:
            if self.channel is not None:  # a step may never end if a process is gone: notice that instead
                out = self.channel.wait(out)
            elif isinstance(out, concurrent.futures.Future):
                out = out.result()
            packed, top_ids, top_lps = _fetch(out, inflight.want_top)
            if self.placement == "spanning":  # compared with the processes that ran it too (_digests)
                self._digest = zlib.crc32(packed, self._digest)
        tokens, logprobs = StepOutput.split(np.asarray(packed))
        now = time.monotonic()
        s = self.scheduler
        u = s.update(inflight.step, tokens)
        seq_ids = u.seq_ids
        finish = {}
        for i in np.flatnonzero(u.finished).tolist() if u.finished.any() else ():
            seq: Sequence = u.seqs[i]
            finish[int(seq_ids[i])] = (seq.finish_reason, seq.stop_reason)
            self._retire_if_done(seq.request)
        rows = u.sample_rows
        scores = [(req.request_id, first, logprobs[r], None if top_ids is None else top_ids[r],
                   None if top_lps is None else top_lps[r]) for req, first, r in inflight.step.prompt_scores]
        scheduled = [(r.request_id, r.first_scheduled_time, r.num_cached_tokens) for r in s.take_first_scheduled()]
        preempted = [q.request.first_seq_id + q.index for q in s.take_preempted()]
        return CoreStep(seq_ids, u.tokens, logprobs[rows], u.finished, finish,
                        None if top_ids is None else top_ids[rows], None if top_lps is None else top_lps[rows],
                        scores, scheduled, preempted, now)

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, progress: bool = False, background: bool = False) -> int:
        """Make every step shape ready (loaded or compiled) before it is needed; returns how many.

        The shapes a first request needs (the fewest decode rows, alone or beside a prefill)
        are made now. With `background`, the rest are made on a thread while the engine
        already serves: a step that needs one of them first waits for it (a compile, or a
        load from the caches on a restart). `wait_for_warmup()` waits for them all."""
        if self.has_work():
            raise RuntimeError("warm up before adding requests")
        started = time.monotonic()
        shapes = self.config.all_shapes()
        # Made before anything runs: the shape every small step fits (the fewest decode rows
        # beside the smallest prefill); with `background`, only it, else all of them.
        fewest = min(s.decode_rows for s in shapes)
        first = [min((s for s in shapes if s.decode_rows == fewest and s.prefill_tokens),
                     key=lambda s: s.prefill_tokens, default=shapes[0])]
        rest = [s for s in shapes if s not in first]
        bar = _progress(len(first) + (0 if background else len(rest)) + 2, "compiling", progress)
        for shape in first:
            # In the background, the sampler that ranks the vocabulary (top-k/top-p, top-n
            # logprobs) comes first thing after; a step that needs it sooner waits for it.
            self.runner.prepare(StepInputs.empty(shape, self.ban_width), full=(False,) if background else (False, True))
            bar.update(1)
        if self.proposer is not None and not background:
            self.proposer.prepare()
        self.runner.copy_pages([(0, 0)])
        bar.update(1)
        self.runner.reset_penalty_slot(0, [0], 1)
        bar.update(1)
        jax.block_until_ready(self.runner.cache)
        if background:
            self.scheduler.ready_shapes = frozenset(first)  # steps fit these until the rest are made
            self._warming = threading.Thread(target=self._prepare_all, args=(first + rest, started),
                                             name="jaxinfer-warmup", daemon=True)
            self._warming.start()
            _stop_at_exit(self)
        else:
            for shape in rest:
                self.runner.prepare(StepInputs.empty(shape, self.ban_width))
                bar.update(1)
        bar.close()
        s = compilations.stats
        log.info("start-up: warm-up of %d step shapes in %.1f s (%d traced and lowered in %.1f s, %d loaded lowered "
                 "in %.1f s; compiling %.1f s)%s", len(shapes) - (len(rest) if background else 0),
                 time.monotonic() - started, s["traced"], s["trace_seconds"], s["loaded"], s["load_seconds"],
                 s["compile_seconds"], f"; {len(rest)} more in the background" if background and rest else "")
        return len(shapes)

    def _prepare_all(self, shapes, started: float) -> None:
        try:
            if self.proposer is not None:
                self.proposer.prepare()
            for shape in shapes:
                if self._stop_warming:
                    return
                self.runner.prepare(StepInputs.empty(shape, self.ban_width))
                self.scheduler.ready_shapes = self.scheduler.ready_shapes | {shape}
        except Exception:  # the step that needs the shape will make it (and raise) itself
            log.exception("background warm-up failed")
            return
        finally:
            self.scheduler.ready_shapes = None
        log.info("start-up: background warm-up done: all %d step shapes ready %.1f s after warm-up began",
                 len(self.config.all_shapes()), time.monotonic() - started)

    def stop_warmup(self) -> None:
        """Stop a background warm-up after the shape it is on (the rest compile when first
        needed)."""
        self._stop_warming = True
        self.wait_for_warmup()

    def close(self) -> None:
        """Stop a background warm-up and free the device (weights, KV cache, compiled steps: the target's and
        a draft's); nothing can run afterwards. The leader of a multi-process run lets its followers go."""
        if self.channel is not None and not self._closed and not self.channel.lost and self.replica == 0:
            if self.follower:  # the leader's calls up to its close first
                while self.follow() is not CLOSED:
                    pass
            else:
                self.channel.send(("close", self._digests()))
        self._closed = True
        if self._publisher is not None:  # an owner's last outputs go out first
            self._publisher.shutdown(wait=True)
        self.stop_warmup()
        for runner in (self.runner, getattr(self.proposer, "runner", None)):
            if runner is not None:
                runner.release()

    # ---- the followers of a multi-process run -------------------------------------------------

    def share(self, value=None):
        """Leader: send `value` (picklable: a call's results) to the followers, which get it from `follow`
        once they have made every device call before it. Returns `value`."""
        if self.channel is not None and not self.follower:
            self.channel.send(("share", self._digests(), value))
        return value

    def _publish(self, out: StepOutput, want_top: bool) -> None:
        """An owner's step output, read back and sent to the leader once computed, in order, on a thread
        (the leader may wait for it before sending anything more)."""
        if self._publisher is None:
            self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-publish")
        n, self._launched = self._launched, self._launched + 1

        def send():
            self.channel.publish_output(self.replica, n, pickle.dumps(_fetch(out, want_top),
                                                                      protocol=pickle.HIGHEST_PROTOCOL))
        self._publisher.submit(send)

    def _one_at_a_time(self) -> bool:
        """Whether each step must end before the next replica's starts: across processes on the CPU, whose
        (gloo) collectives of two replicas' steps would otherwise interleave on one connection."""
        return (self.placement == "spanning" and len(self.group) > 1
                and self.runner.mesh.devices.flat[0].platform == "cpu")

    def _digests(self) -> list[int]:
        """What the processes compare: the tokens of every core they all run (not those one process runs alone)."""
        return [core._digest if core.placement == "spanning" else 0 for core in self.group]

    def follow(self):
        """Follower: make the leader's device calls, in order, until it shares a value (returned) or
        closes (CLOSED: then `close` this core). Each step's sampled tokens are read back one step
        late (the device never waits for the host) and checked against the leader's: a process whose
        tokens differ raises, since its devices computed something else than the leader's."""
        assert self.follower, "only a follower of a multi-process run follows"
        pending: dict[int, jax.Array] = {}  # replica -> its last step's tokens, not yet read back
        while True:
            op, *args = self.channel.receive()
            if op == "launch":
                core = self.group[args[0]]
                if core.placement == "remote":  # another process's replica
                    continue
                out = core._launch(*args[1:4])
                if core._one_at_a_time():
                    jax.block_until_ready(out.packed)
                if core.placement == "local":  # this process's own replica: its tokens go back to the leader
                    core._publish(out, args[4])
                    continue
                if args[0] in pending:
                    core._digest = zlib.crc32(np.asarray(pending[args[0]]), core._digest)
                pending[args[0]] = out.packed
                continue
            for replica, packed in pending.items():
                self.group[replica]._digest = zlib.crc32(np.asarray(packed), self.group[replica]._digest)
            pending.clear()
            if args[0] != self._digests():
                raise RuntimeError(f"process {jax.process_index()} sampled other tokens than the leader: the "
                                   "processes' devices disagree")
            if op == "share":
                return args[1]
            for core in self.group:
                core._closed = True
            return CLOSED

    def wait_for_warmup(self) -> None:
        """Until a background warm-up has made every step shape."""
        if self._warming is not None:
            self._warming.join()


def _draft_model(target: LoadedModel, config: EngineConfig, mesh: Mesh, draft: LoadedModel | None = None
                 ) -> LoadedModel | None:
    """The draft model a speculative_config names (`draft` if given), loaded beside the target (same dtype
    and mesh), or None. It must share the target's vocabulary: its tokens are the target's."""
    spec = config.speculative_config
    if spec is not None and spec.method == "eagle3":
        return _draft_head(target, spec)
    if spec is None or spec.method != "draft_model":
        if draft is not None:
            raise ConfigError("a draft model was given, but speculative_config's method is not 'draft_model'")
        return None
    from checkpoints import loader

    try:
        draft = draft or loader.load(spec.model, dtype=target.dtype, mesh=mesh, progress=False,
                                     quantization=spec.quantization)
    except CheckpointError as e:
        raise ConfigError(f"invalid speculative_config: the draft model: {e}") from None
    want, got = target.config.vocab_size, draft.config.vocab_size
    mismatch = got != want
    if not mismatch and target.tokenizer is not None and draft.tokenizer is not None:
        probe = range(0, want, max(1, want // 512))  # a sample of ids, spread over the vocabulary
        mismatch = any(target.tokenizer.id_to_token(i) != draft.tokenizer.id_to_token(i) for i in probe)
    if mismatch:
        raise ConfigError(f"invalid speculative_config: the draft model {spec.model} has another vocabulary than "
                          f"the target ({got} tokens against {want}{', other tokens' if got == want else ''}): a "
                          "draft model must share the target's tokenizer")
    log.info("speculative decoding: draft model %s (%s), %d tokens a step", draft.source,
             getattr(draft.quantization, "name", draft.quantization) or str(draft.dtype), spec.num_speculative_tokens)
    return draft


def _draft_head(target: LoadedModel, spec) -> LoadedModel:
    """A trained draft head (spec.model: its directory) over the target, as a LoadedModel of one layer whose
    `feature_layers` the target keeps for it."""
    from jaxinfer.spec_decode import draft_head
    from flax import nnx

    head = draft_head.load(spec.model, target.graphdef, target.state, target.config, target.dtype)
    graphdef, state = nnx.split(head)
    loaded = LoadedModel(draft_head.head_config(target.config), graphdef, state, None, str(spec.model),
                         dtype=target.dtype, feature_layers=tuple(head.feature_layers))
    log.info("speculative decoding: draft head %s over layers %s, %d tokens a step", spec.model,
             list(head.feature_layers), spec.num_speculative_tokens)
    return loaded


def _stop_at_exit(core: EngineCore) -> None:
    """At interpreter exit, let a background warm-up finish the shape it is on and stop: a
    compile still running when the interpreter goes away would abort the process."""
    core = weakref.ref(core)  # the exit hook keeps no engine alive

    def stop() -> None:
        alive = core()
        if alive is not None:
            alive.stop_warmup()
    register = getattr(threading, "_register_atexit", None)  # runs before non-daemon threads are joined
    if register is not None:
        register(stop)
    else:
        import atexit
        atexit.register(stop)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
