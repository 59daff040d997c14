"""The engine: requests in, tokens out, one device step at a time.

    add_request() ──▶ Scheduler ──▶ build Batch + SamplingArrays ──▶ runner.step (async)
                                                                          │
    step() returns finished (and streamed) RequestOutputs ◀── read back ◀─┘

The host runs one step ahead: `step()` schedules and dispatches step N, then
reads step N-1's tokens (which blocks only until N-1 is done, while N is
already queued on the device). Sequences in N-1 that sampled feed their new
token into N straight from the device; the scheduler counts it as pending.
A sequence that finishes in N-1 was already given a slot in N: that step's
token for it is dropped (its `epoch` moved on).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence as Seq

import jax
import numpy as np
from jax.sharding import Mesh

from checkpoints.loader import LoadedModel
from jaxinfer import compilations, kv_cache
from jaxinfer.batch import build
from jaxinfer.core.request import Request, Sequence, Status
from jaxinfer.core.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams
from jaxinfer.core.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from jaxinfer.core.shapes import next_bucket, pages_needed
from jaxinfer.errors import ConfigError, InputError
from jaxinfer.layers import attention
from jaxinfer.metrics import EngineMetrics, percentiles
from jaxinfer.models import family
from jaxinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import Row, SamplingArrays

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU, where memory is shared with everything
ACCELERATOR_KV_FRACTION = 0.9  # of the memory left after the weights


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (decode + prefill chunks)
    max_model_len: int | None = None  # longest prompt + output; None: the model's context
    page_size: int = 16
    num_pages: int | None = None  # KV pages; None: sized from kv_cache_bytes
    kv_cache_bytes: int | None = None  # None: 90% of free accelerator memory, or 1 GiB on CPU
    block_q: int = 64  # prefill query block (attention without kernels)
    enable_prefix_caching: bool = True
    prompt_logprob_rows: int = 32
    decode_sizes: tuple[int, ...] = ()  # compiled decode-row counts; empty: powers of two
    prefill_sizes: tuple[int, ...] = ()  # compiled prefill-token counts; empty: block_q * 4^k
    attention: str | None = None  # jaxinfer.attention implementation; None: the process default ("auto")

    def validate(self) -> None:
        problems = []
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "block_q"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("page_size", "block_q"):
            v = getattr(self, name)
            if isinstance(v, int) and v >= 1 and v & (v - 1):
                problems.append(f"{name} must be a power of two, got {v}")
        if (isinstance(self.max_num_seqs, int) and isinstance(self.max_num_batched_tokens, int)
                and self.max_num_batched_tokens < self.max_num_seqs):
            problems.append("max_num_batched_tokens must be >= max_num_seqs")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            problems.append(f"num_pages must be an integer >= 2, got {self.num_pages!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 2):
            problems.append(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.attention is not None and self.attention not in attention.IMPLEMENTATIONS:
            problems.append(f"attention must be one of {sorted(attention.IMPLEMENTATIONS)}, "
                            f"got {self.attention!r}")
        if problems:
            raise ConfigError("invalid engine configuration: " + "; ".join(problems))


@dataclasses.dataclass
class _InFlight:
    step: ScheduledStep
    rows: list[list[int]]  # per item (decode first, then prefill): its logits rows
    out: object  # SampleOutput on the device
    want_top: bool


class Engine:
    def __init__(self, model: LoadedModel, mesh: Mesh, config: EngineConfig = EngineConfig()):
        config.validate()
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

        dtype = next(iter(jax.tree.leaves(model.state))).dtype
        try:
            probe = SchedulerConfig(
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len, page_size=config.page_size, block_q=config.block_q,
                prompt_logprob_rows=config.prompt_logprob_rows,
                enable_prefix_caching=config.enable_prefix_caching,
                decode_sizes=tuple(config.decode_sizes), prefill_sizes=tuple(config.prefill_sizes))
        except ValueError as e:
            raise ConfigError(f"invalid engine configuration: {e}") from None
        max_rows = max(s.num_rows for s in probe.all_shapes())
        spec = kv_cache.CacheSpec(cfg.num_layers, 1, config.page_size, family(cfg).cache_entries(cfg),
                                  np.dtype(dtype))
        num_pages = config.num_pages or self._pool_size(spec.bytes_per_page, probe)
        self.sched_config = dataclasses.replace(probe, num_pages=num_pages)
        self.scheduler = Scheduler(self.sched_config)
        self.runner = ModelRunner(cfg, model.graphdef, model.state, mesh, num_pages=num_pages,
                                  page_size=config.page_size, max_rows=max_rows,
                                  penalty_slots=config.max_num_seqs, max_model_len=self.max_model_len,
                                  attention_impl=config.attention)
        log.info("KV cache: %d pages of %d tokens (%.2f GiB); max_model_len %d",
                 num_pages, config.page_size, num_pages * spec.bytes_per_page / 2**30, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.metrics = EngineMetrics()
        self._arrivals = itertools.count()
        self._inflight: _InFlight | None = None
        self._streamed: set[str] = set()
        self._aborted: list[RequestOutput] = []
        compilations.install()

    def _pool_size(self, bytes_per_page: int, probe: SchedulerConfig) -> int:
        """Pages for the KV pool: what the config allows, never more than every sequence at
        full length needs."""
        most = 1 + probe.max_num_seqs * probe.pages_per_seq
        budget = self.config.kv_cache_bytes
        if budget is None:
            device = jax.devices()[0]
            stats = device.memory_stats() if device.platform != "cpu" else None
            if stats and "bytes_limit" in stats:
                free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                budget = int(free * ACCELERATOR_KV_FRACTION)
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
        # An aborted request's last output is still to come from the next step(): its id stays
        # taken until then, so that output can never be mistaken for a newcomer's.
        if request_id in self.requests or any(o.request_id == request_id for o in self._aborted):
            raise InputError(f"request id {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InputError(f"priority must be an integer, got {priority!r}")
        ids, max_tokens = self.check_request(prompt_token_ids, params)
        return Request(request_id, ids, params, self.eos_token_ids, max_tokens, prompt=prompt,
                       priority=priority, arrival=next(self._arrivals))

    def check_request(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], int]:
        """Raise InputError if this prompt and these parameters cannot be served; else the
        prompt ids and the number of tokens the request may generate."""
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        ids = self.check_prompt(prompt_token_ids)
        if len(ids) >= self.max_model_len:
            raise InputError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}, "
                             "leaving no room to generate")
        if params.n > self.config.max_num_seqs:
            raise InputError(f"n={params.n} is more than the engine runs at once "
                             f"(max_num_seqs={self.config.max_num_seqs})")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InputError(f"stop_token_ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer, and this model has none")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        need = pages_needed(len(ids) + max_tokens, self.sched_config.page_size)
        if need > self.sched_config.num_pages - 1:
            raise InputError(f"the request needs {need} KV pages at full length; the cache has "
                             f"{self.sched_config.num_pages - 1}")
        return ids, max_tokens

    def check_prompt(self, prompt_token_ids) -> list[int]:
        if isinstance(prompt_token_ids, (str, bytes)):
            raise InputError("prompt token ids must be a list of integers, not a string")
        try:
            ids = np.asarray(list(prompt_token_ids))
        except TypeError:
            raise InputError("prompt token ids must be a list of integers") from None
        if ids.size == 0:
            raise InputError("the prompt is empty")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InputError("prompt token ids must be a flat list of integers")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise InputError(f"prompt token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        return [int(t) for t in ids]

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its output (finish reason "abort") comes from the next step()."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._streamed.discard(request_id)
        request.finished_time = time.monotonic()
        output = self._output(request, finished=True)
        self.metrics.observe_request(output)
        self._aborted.append(output)
        return True

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn automatic prefix caching on or off (between workloads: the engine must be idle).
        Either way the cache starts empty."""
        if self.has_unfinished():
            raise RuntimeError("prefix caching can only be switched while the engine is idle")
        self.sched_config = dataclasses.replace(self.sched_config, enable_prefix_caching=enabled)
        self.scheduler.cfg = self.sched_config
        self.scheduler.pool.reset_prefix_cache()
        self.scheduler.pool.enable_prefix_caching = enabled

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._inflight is not None or bool(self._aborted)

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
        """Dispatch the next step, then read back the previous one. Returns the requests that
        finished (and, for streamed requests, those with new tokens)."""
        outputs, self._aborted = self._aborted, []
        scheduled = self.scheduler.schedule()
        dispatched = self._dispatch(scheduled) if scheduled is not None else None
        if self._inflight is not None:
            outputs += self._read_back(self._inflight)
        self._inflight = dispatched
        return outputs

    def _dispatch(self, step: ScheduledStep) -> _InFlight:
        runner = self.runner
        if step.page_copies:
            runner.copy_pages(step.page_copies)
        for slot, tokens, prompt_len in step.slot_resets:
            runner.reset_penalty_slot(slot, tokens, prompt_len)
        items = list(step.items)
        batch, rows = build(step.shape, [i.work for i in step.decode], [i.work for i in step.prefill],
                            self.sched_config.page_size)
        sampling_rows: list[Row | None] = [None] * step.shape.num_rows
        want_top = False
        now = time.monotonic()
        for item, item_rows in zip(items, rows):
            seq, req = item.seq, item.seq.request
            p = req.params
            for position, row in zip(item.prompt_positions, item_rows):
                top = bool(p.prompt_logprobs)
                sampling_rows[row] = Row(p, seq.seed, position, target=req.prompt_token_ids[position + 1],
                                         want_top=top)
                want_top |= top
            if item.samples:
                row = item_rows[-1]
                position = item.work.start + len(item.work.token_ids)  # of the token being sampled
                banned = ()
                if position - seq.prompt_len < p.min_tokens:
                    banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_token_ids))
                top = bool(p.logprobs)
                sampling_rows[row] = Row(p, seq.seed, position, penalty_slot=seq.penalty_slot,
                                         banned=banned, want_top=top)
                want_top |= top
                seq.pending += 1
                seq.pending_row = row
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        arrays = SamplingArrays.from_rows(sampling_rows, step.shape.num_rows, self.ban_width)
        out = runner.step(batch, arrays)
        self.metrics.steps += 1
        self.metrics.computed_tokens += step.num_tokens
        return _InFlight(step, rows, out, want_top)

    def _read_back(self, inflight: _InFlight) -> list[RequestOutput]:
        out = inflight.out
        fetch = [out.tokens, out.logprobs]
        if inflight.want_top:
            fetch += [out.top_ids, out.top_logprobs]
        host = jax.device_get(fetch)
        tokens, logprobs = host[0], host[1]
        top_ids, top_lps = (host[2], host[3]) if inflight.want_top else (None, None)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for item, item_rows in zip(inflight.step.items, inflight.rows):
            seq = item.seq
            if seq.epoch != item.epoch or seq.status is Status.FINISHED:
                continue  # preempted, finished or aborted since: this output is stale
            req = seq.request
            k = req.params.prompt_logprobs or 0
            for position, row in zip(item.prompt_positions, item_rows):
                if position == len(req.prompt_logprobs):
                    target = req.prompt_token_ids[position + 1]
                    req.prompt_logprobs.append(self._logprob_entry(
                        target, logprobs[row], top_ids, top_lps, row, k))
            if item.samples:
                token = int(tokens[item_rows[-1]])
                seq.pending -= 1
                if req.first_token_time is None:
                    req.first_token_time = now
                entry = None
                if req.params.logprobs is not None:
                    entry = self._logprob_entry(token, logprobs[item_rows[-1]], top_ids, top_lps,
                                                item_rows[-1], req.params.logprobs)
                self._append(seq, token, float(logprobs[item_rows[-1]]), entry)
                touched[req.request_id] = req
        results = []
        for req in touched.values():
            if req.finished:
                req.finished_time = now
                output = self._output(req, finished=True)
                del self.requests[req.request_id]
                self._streamed.discard(req.request_id)
                self.metrics.observe_request(output)
                results.append(output)
            elif req.request_id in self._streamed:
                results.append(self._output(req, finished=False))
        return results

    def _logprob_entry(self, token, logprob, top_ids, top_lps, row, k) -> dict[int, Logprob]:
        entry = {}
        if k and top_ids is not None:
            for rank, (t, lp) in enumerate(zip(top_ids[row, :k], top_lps[row, :k]), 1):
                entry[int(t)] = Logprob(float(lp), rank, self._token_text(int(t)))
        if token not in entry:
            entry = {token: Logprob(float(logprob), None, self._token_text(token)), **entry}
        return entry

    def _token_text(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    # ---- per-token bookkeeping: text, stops ----------------------------------------------------

    def _append(self, seq: Sequence, token: int, logprob: float, entry) -> None:
        req, p = seq.request, seq.request.params
        seq.tokens.append(token)
        seq.cumulative_logprob += logprob
        if entry is not None:
            seq.logprobs.append(entry)
        self.metrics.generation_tokens += 1
        n_out = seq.num_output_tokens
        if self.tokenizer is not None:
            if seq.decoder is None:
                seq.decoder = self.tokenizer.stream_decoder(skip_special_tokens=p.skip_special_tokens)
            before = len(seq.text)
            seq.text += seq.decoder.push(token)
            if p.stop and n_out >= p.min_tokens and self._match_stop(seq, before):
                return self._finish(seq, "stop", flush=False)
        if not p.ignore_eos and token in req.eos_token_ids and n_out > p.min_tokens:
            seq.stop_reason = None
            return self._finish(seq, "stop")
        if token in p.stop_token_ids and n_out > p.min_tokens:
            seq.stop_reason = token
            return self._finish(seq, "stop")
        if n_out >= req.max_tokens or len(seq.tokens) >= self.max_model_len:
            return self._finish(seq, "length")

    def _match_stop(self, seq: Sequence, before: int) -> bool:
        """Find the earliest stop string that the new text completes; cut the text there."""
        p = seq.request.params
        longest = max(len(s) for s in p.stop)
        lo = max(0, before - longest + 1)
        best = None
        for s in p.stop:
            i = seq.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.text = seq.text[:i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        seq.stop_reason = s
        return True

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        if flush and seq.decoder is not None:
            seq.text += seq.decoder.flush()
        seq.finish_reason = reason
        self.scheduler.finish(seq)

    def _output(self, req: Request, finished: bool) -> RequestOutput:
        outs = []
        for seq in req.sequences:
            outs.append(CompletionOutput(
                index=seq.index, text=seq.text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if req.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + list(req.prompt_logprobs)
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 req.finished_time, sum(s.num_preemptions for s in req.sequences))
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), prompt_logprobs,
                             outs, finished, metrics, req.num_cached_tokens)

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, progress: bool = False) -> int:
        """Compile every step shape (and the small helpers) now; returns how many shapes."""
        if self.has_unfinished():
            raise RuntimeError("warm up before adding requests")
        started = time.monotonic()
        shapes = self.sched_config.all_shapes()
        bar = _progress(len(shapes) + 2, "compiling", progress)
        for shape in shapes:
            batch, _ = build(shape, [], [], self.sched_config.page_size)
            arrays = SamplingArrays.from_rows([], shape.num_rows, self.ban_width)
            self.runner.prepare(batch, arrays)  # load or compile; nothing runs
            bar.update(1)
        self.runner.copy_pages([(0, 0)])
        bar.update(1)
        self.runner.reset_penalty_slot(0, [0], 1)
        bar.update(1)
        jax.block_until_ready(self.runner.cache)
        bar.close()
        s = compilations.stats
        log.info("start-up: warm-up of %d step shapes in %.1f s (%d traced and lowered in %.1f s, %d loaded lowered "
                 "in %.1f s; compiling %.1f s)", len(shapes), time.monotonic() - started, s["traced"],
                 s["trace_seconds"], s["loaded"], s["load_seconds"], s["compile_seconds"])
        return len(shapes)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)

