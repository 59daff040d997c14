"""The engine: requests in, tokens out, one device step at a time.

    add_request() ──▶ Scheduler.schedule() ──▶ StepInputs (one buffer) ──▶ runner.step (async)
                                                                                │
    step() returns outputs ◀── OutputProcessor (own thread) ◀── Scheduler.update() ◀── read back

The host runs one step ahead: `step()` schedules and dispatches step N, then
reads step N-1's tokens (which blocks only until N-1 is done, while N is
already queued on the device). Sequences in N-1 that sampled feed their new
token into N straight from the device; the scheduler counts it as pending.
A sequence that finishes in N-1 was already given a slot in N: that step's
token for it is dropped (its SeqTable row changed occupant).

Per step the step thread does array work only (schedule, pack, append tokens,
check stop ids and lengths); detokenization, stop strings, logprobs and the
outputs themselves are the output processor's, on its own thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Sequence as Seq

import jax
import numpy as np
from jax.sharding import Mesh

from checkpoints.loader import LoadedModel
from jaxinfer.runner import compilations, kv_cache
from jaxinfer.core.config import EngineConfig
from jaxinfer.core.request import Request
from jaxinfer.core.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams
from jaxinfer.core.scheduler import ScheduledStep, Scheduler
from jaxinfer.core.shapes import next_bucket
from jaxinfer.errors import ConfigError, InputError
from jaxinfer.engine.input_processor import InputProcessor
from jaxinfer.engine.metrics import EngineMetrics, percentiles
from jaxinfer.engine.output_processor import AbortRecord, OutputProcessor, StepRecord
from jaxinfer.engine.outputs import RequestOutput
from jaxinfer.runner.model_runner import ModelRunner, StepOutput
from jaxinfer.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU, where memory is shared with everything
ACCELERATOR_KV_FRACTION = 0.9  # of the memory left after the weights


@dataclasses.dataclass
class _InFlight:
    step: ScheduledStep
    out: object  # StepOutput on the device
    want_top: bool


class Engine:
    def __init__(self, model: LoadedModel, mesh: Mesh, config: EngineConfig = EngineConfig()):
        compilations.enable_persistent_cache()
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.ban_width = next_bucket(MAX_STOP_TOKEN_IDS + len(self.eos_token_ids), 8)

        try:
            given = config.num_pages
            config = config.replace(max_model_len=self.max_model_len, num_pages=given or 2)
            spec = kv_cache.CacheSpec.for_model(cfg, num_pages=1, page_size=config.page_size,
                                                dtype=model.kv_cache_dtype)
            num_pages = given or self._pool_size(spec.bytes_per_page, config, mesh)
            self.config = config = config.replace(num_pages=num_pages)
        except ValueError as e:
            raise ConfigError(f"invalid engine configuration: {e}") from None
        self.scheduler = Scheduler(config, stop_width=self.ban_width)
        max_rows = max(s.num_rows for s in config.all_shapes())
        self.input_processor = InputProcessor.for_engine(self)  # encodes and checks every prompt
        self.runner = ModelRunner(cfg, model.graphdef, model.state, mesh, num_pages=num_pages,
                                  page_size=config.page_size, cache_dtype=model.kv_cache_dtype, max_rows=max_rows,
                                  penalty_slots=config.max_num_seqs, feed_slots=config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  attention_impl=config.attention)
        log.info("KV cache: %d pages of %d tokens (%.2f GiB); max_model_len %d",
                 num_pages, config.page_size, num_pages * spec.bytes_per_page / 2**30, self.max_model_len)
        self.requests: dict[str, Request] = {}  # until their final output is made
        self.metrics = EngineMetrics()
        self._arrivals = itertools.count()
        self._inflight: _InFlight | None = None
        self._streamed: set[str] = set()
        self.outputs = OutputProcessor(self.tokenizer, self.requests, self._streamed, self.metrics,
                                       stream_interval=config.stream_interval)
        self._warming: threading.Thread | None = None
        self._stop_warming = False
        compilations.install()

    def _pool_size(self, bytes_per_page: int, config: EngineConfig, mesh: Mesh) -> int:
        """Pages for the KV pool: what the config allows, never more than every sequence at
        full length needs. On accelerators the budget is set by the device of the mesh with
        the least memory free, times the devices a page is split across."""
        most = 1 + config.max_num_seqs * config.pages_per_seq
        budget = config.kv_cache_bytes
        if budget is None:
            devices = list(mesh.devices.flat)
            stats = [d.memory_stats() if d.platform != "cpu" else None for d in devices]
            if all(s and "bytes_limit" in s for s in stats):
                free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
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

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, *,
                    prompt: str | None = None, priority: int = 0, stream: bool = False,
                    arrival_time: float | None = None) -> Request:
        """Queue a request. Raises InputError (and changes nothing) if it cannot be served."""
        try:
            request = self._make_request(request_id, prompt_token_ids, params, prompt, priority)
        except InputError:
            self.metrics.rejected += 1
            raise
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.requests[request_id] = request
        if stream:
            self._streamed.add(request_id)
        self.scheduler.add(request)
        return request

    def _make_request(self, request_id, prompt_token_ids, params, prompt, priority) -> Request:
        if not isinstance(request_id, str) or not request_id:
            raise InputError(f"request id must be a non-empty string, got {request_id!r}")
        # An aborted request's last output is still to come from a later step(): its id stays
        # taken until then, so that output can never be mistaken for a newcomer's.
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InputError(f"priority must be an integer, got {priority!r}")
        ids, max_tokens = self.check_request(prompt_token_ids, params)
        return Request(request_id, ids, params, self.eos_token_ids, max_tokens, prompt=prompt,
                       priority=priority, arrival=next(self._arrivals))

    def check_request(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], int]:
        """Raise InputError if this prompt and these parameters cannot be served; else the
        prompt ids and the number of tokens the request may generate (see InputProcessor)."""
        return self.input_processor.check(prompt_token_ids, params)

    def check_prompt(self, prompt_token_ids) -> list[int]:
        return self.input_processor.check_prompt(prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its output (finish reason "abort") comes from a later step()."""
        request = self.requests.get(request_id)
        if request is None or request.aborted:
            return False
        request.aborted = True
        for seq in list(request.sequences):
            self.scheduler.finish(seq, "abort")
        self.outputs.submit(AbortRecord(request, time.monotonic()))
        return True

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn automatic prefix caching on or off (between workloads: the engine must be idle).
        Either way the cache starts empty."""
        if self.has_unfinished():
            raise RuntimeError("prefix caching can only be switched while the engine is idle")
        self.config = self.config.replace(enable_prefix_caching=enabled)
        self.scheduler.cfg = self.config
        self.scheduler.pool.reset_prefix_cache()
        self.scheduler.pool.enable_prefix_caching = enabled

    def drain(self) -> list[RequestOutput]:
        """After aborting: step until the step in flight has landed and every aborted request's
        output is out, as long as nothing but aborted requests is left. Returns those outputs."""
        outputs = []
        while self.has_unfinished() and all(r.aborted for r in list(self.requests.values())):
            outputs += self.step()
        return outputs

    def has_unfinished(self) -> bool:
        return (bool(self.requests) or self._inflight is not None or self.scheduler.has_work()
                or self.outputs.busy)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.scheduler.pool.usage

    def gauges(self) -> dict:
        """The engine's current state, cheap enough to read every step."""
        pool = self.scheduler.pool
        return {"running": self.num_running, "waiting": self.num_waiting, "kv_usage": pool.usage,
                "kv_pages": pool.num_pages - 1, "prefix_cache_hit_rate": pool.prefix_hit_rate,
                "preemptions": self.scheduler.num_preemptions}

    def stats(self) -> dict:
        """Everything the engine measures, as plain numbers (for export and benchmarks)."""
        m, pool = self.metrics, self.scheduler.pool
        return {
            **self.gauges(),
            "prefix_cache_queried_tokens": pool.prefix_queried_tokens,
            "prefix_cache_hit_tokens": pool.prefix_hit_tokens,
            "steps": m.steps, "prompt_tokens": m.prompt_tokens, "generation_tokens": m.generation_tokens,
            "requests": dict(m.requests), "rejected": m.rejected,
            "compilations": compilations.count(),
            "time_to_first_token": percentiles(m.ttft), "time_per_output_token": percentiles(m.tpot),
            "queue_time": percentiles(m.queue_time), "e2e_latency": percentiles(m.e2e),
        }

    # ---- the step loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Dispatch the next step, then read back the previous one. Returns the outputs made
        since the last call: finished requests, and streamed ones with new tokens."""
        for seq in self.outputs.take_stops():  # stop strings the output processor found
            self.scheduler.finish(seq, "stop", seq.output.stop_reason)
        scheduled = self.scheduler.schedule()
        dispatched = self._dispatch(scheduled) if scheduled is not None else None
        if self._inflight is not None:
            self._read_back(self._inflight)
        self._inflight = dispatched
        if dispatched is None:
            self.outputs.wait(timeout=1.0)  # nothing on the device: let the outputs catch up
        return self.outputs.take_outputs()

    def _dispatch(self, step: ScheduledStep) -> _InFlight:
        runner = self.runner
        if step.page_copies:
            runner.copy_pages(step.page_copies)
        for slot, tokens, prompt_len in step.slot_resets:
            runner.reset_penalty_slot(slot, tokens, prompt_len)
        inputs = self.inputs(step)
        out = runner.step(inputs)
        self.metrics.steps += 1
        self.metrics.computed_tokens += step.num_tokens
        return _InFlight(step, out, bool(step.logits.want_top.any()))

    def inputs(self, step: ScheduledStep) -> StepInputs:
        """The step's inputs as one value, from the scheduler's decision alone."""
        return StepInputs.from_step(step, self.ban_width, self.config.page_size)

    def _read_back(self, inflight: _InFlight) -> None:
        out = inflight.out
        if inflight.want_top:
            packed, top_ids, top_lps = jax.device_get([out.packed, out.top_ids, out.top_logprobs])
        else:
            packed, top_ids, top_lps = np.asarray(out.packed), None, None  # one transfer
        tokens, logprobs = StepOutput.split(np.asarray(packed))
        now = time.monotonic()
        update = self.scheduler.update(inflight.step, tokens)
        self.outputs.submit(StepRecord(update, logprobs, top_ids, top_lps, inflight.step.prompt_scores, now))

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, progress: bool = False, background: bool = False) -> int:
        """Make every step shape ready (loaded or compiled) before it is needed; returns how many.

        The shapes a first request needs (the fewest decode rows, alone or beside a prefill)
        are made now. With `background`, the rest are made on a thread while the engine
        already serves: a step that needs one of them first waits for it (a compile, or a
        load from the caches on a restart). `wait_for_warmup()` waits for them all."""
        if self.has_unfinished():
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

    def wait_for_warmup(self) -> None:
        """Until a background warm-up has made every step shape."""
        if self._warming is not None:
            self._warming.join()

def _stop_at_exit(engine: Engine) -> None:
    """At interpreter exit, let a background warm-up finish the shape it is on and stop: a
    compile still running when the interpreter goes away would abort the process."""
    register = getattr(threading, "_register_atexit", None)  # runs before non-daemon threads are joined
    if register is not None:
        register(engine.stop_warmup)
    else:
        import atexit
        atexit.register(engine.stop_warmup)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)

