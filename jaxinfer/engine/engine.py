"""The engine: requests in, outputs out. A frontend over the engine core.

    add_request() ──▶ InputProcessor (checks) ──▶ EngineCore: schedule, step the device
                                                         │  (jaxinfer/engine/engine_core.py)
    step() returns outputs ◀── OutputProcessor (own thread) ◀── CoreStep (plain arrays)

The frontend holds what the outputs are made from (RequestState: text, logprobs,
timings) and the core holds what scheduling needs (Request, Sequence, the SeqTable):
they share no object, only CoreRequests going in and CoreSteps coming out, so the
core could run in another process. `step()` runs one core step on the caller's thread;
detokenization, stop strings, logprobs and the outputs themselves are the output
processor's, on its own thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from jax.sharding import Mesh

from checkpoints.loader import LoadedModel
from jaxinfer import distributed
from jaxinfer.core.config import EngineConfig
from jaxinfer.core.sampling_params import SamplingParams, request_seed
from jaxinfer.engine.core_process import CoreProcessClient
from jaxinfer.engine.engine_core import CoreRequest, EngineCore
from jaxinfer.engine.input_processor import InputProcessor
from jaxinfer.engine.metrics import percentiles
from jaxinfer.engine.output_processor import AbortRecord, OutputProcessor, RequestState
from jaxinfer.engine.outputs import RequestOutput
from jaxinfer.errors import InputError


class Engine:
    def __init__(self, model: LoadedModel, mesh: Mesh, config: EngineConfig = EngineConfig(),
                 draft: LoadedModel | None = None):
        """The core in this process, stepped on the caller's thread (`draft`: as EngineCore's). A mesh
        whose data axis is larger than 1 gets a replica per row (jaxinfer/engine/data_parallel.py)."""
        distributed.check_mesh(mesh)
        if mesh.shape.get("data", 1) > 1:
            from jaxinfer.engine.data_parallel import DataParallelCore
            self._attach(DataParallelCore(model, mesh, config, draft), model)
        else:
            self._attach(EngineCore(model, mesh, config, draft), model)

    @classmethod
    def with_core_process(cls, factory, *, warmup: bool = True, background: bool = False,
                          progress: bool = False) -> Engine:
        """The core in a child process of its own (jaxinfer/engine/core_process.py), built
        there by `factory` (a picklable callable returning an EngineCore) and warmed up before
        this returns. The model's weights live in the child only."""
        client = CoreProcessClient(factory, warmup=warmup, background=background, progress=progress)
        info = client.info
        engine = cls.__new__(cls)
        engine._attach(client, LoadedModel(info.model_config, None, None, info.tokenizer, info.source,
                                           dtype=info.dtype))
        return engine

    def _attach(self, core, model: LoadedModel) -> None:
        self.core = core
        self.model = model
        self.tokenizer = model.tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids  # what a request stops at (tests may set it)
        self.ban_width = self.core.ban_width
        self.metrics = self.core.metrics
        self.input_processor = InputProcessor.for_engine(self)  # encodes and checks every prompt
        self.requests: dict[str, RequestState] = {}  # until their final output is made
        self._arrivals = itertools.count()
        self._next_seq_id = 0  # a request's n sequences take the next n ids
        self.closed = False
        self.outputs = OutputProcessor(self.tokenizer, self.requests, self.metrics,
                                       stream_interval=self.config.stream_interval)

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @runner.setter
    def runner(self, runner) -> None:  # benchmarks stand a fake device in
        self.core.runner = runner

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, *,
                    prompt: str | None = None, priority: int = 0, stream: bool = False,
                    arrival_time: float | None = None) -> RequestState:
        """Queue a request. Raises InputError (and changes nothing) if it cannot be served."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        try:
            if not isinstance(request_id, str) or not request_id:
                raise InputError(f"request id must be a non-empty string, got {request_id!r}")
            # An aborted request's last output is still to come from a later step(): its id stays
            # taken until then, so that output can never be mistaken for a newcomer's.
            if request_id in self.requests:
                raise InputError(f"request id {request_id!r} is already in use")
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise InputError(f"priority must be an integer, got {priority!r}")
            ids, max_tokens = self.check_request(prompt_token_ids, params)
        except InputError:
            self.metrics.rejected += 1
            raise
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        first_seq_id, self._next_seq_id = self._next_seq_id, self._next_seq_id + params.n
        state = RequestState(request_id, prompt, ids, params, stream, arrival_time, first_seq_id)
        self.outputs.add(state)
        self.core.add_request(CoreRequest(request_id, ids, params, self.eos_token_ids, max_tokens, first_seq_id,
                                          request_seed(params), priority, next(self._arrivals), arrival_time))
        return state

    def check_request(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], int]:
        """Raise InputError if this prompt and these parameters cannot be served; else the
        prompt ids and the number of tokens the request may generate (see InputProcessor)."""
        return self.input_processor.check(prompt_token_ids, params)

    def check_prompt(self, prompt_token_ids) -> list[int]:
        return self.input_processor.check_prompt(prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its output (finish reason "abort") comes from a later step()."""
        state = self.requests.get(request_id)
        if state is None or state.aborted:
            return False
        state.aborted = True
        self.core.abort(request_id)
        self.outputs.submit(AbortRecord(state, time.monotonic()))
        return True

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn automatic prefix caching on or off (between workloads: the engine must be idle).
        Either way the cache starts empty."""
        if self.has_unfinished():
            raise RuntimeError("prefix caching can only be switched while the engine is idle")
        self.core.set_prefix_caching(enabled)

    def drain(self) -> list[RequestOutput]:
        """After aborting: step until the step in flight has landed and every aborted request's
        output is out, as long as nothing but aborted requests is left. Returns those outputs."""
        outputs = []
        while self.has_unfinished() and all(r.aborted for r in list(self.requests.values())):
            outputs += self.step()
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.core.has_work() or self.outputs.busy

    @property
    def in_process(self) -> bool:
        return not isinstance(self.core, CoreProcessClient)

    @property
    def num_running(self) -> int:
        if isinstance(self.core, EngineCore):
            return len(self.core.scheduler.running)
        return self.core.gauges().get("running", 0)

    @property
    def num_waiting(self) -> int:
        if isinstance(self.core, EngineCore):
            return len(self.core.scheduler.waiting)
        if self.in_process:  # data-parallel replicas
            return self.core.gauges()["waiting"]
        return max(0, len(self.requests) - self.num_running)  # the core's own count lags what was sent

    @property
    def kv_usage(self) -> float:
        return self.gauges().get("kv_usage", 0.0)

    def close(self) -> None:
        """Stop the core (its process, or free the device of one in this process) and the output thread.
        Requests still running are dropped; nothing can be added afterwards."""
        if not self.closed:
            self.closed = True
            self.core.close()
            self.outputs.close()

    def gauges(self) -> dict:
        """The engine's current state, cheap enough to read every step."""
        return self.core.gauges()

    def stats(self) -> dict:
        """Everything the engine measures, as plain numbers (for export and benchmarks)."""
        m = self.metrics
        return {
            **self.gauges(), **self.core.counters(),
            "prompt_tokens": m.prompt_tokens, "generation_tokens": m.generation_tokens,
            "requests": dict(m.requests), "rejected": m.rejected,
            "time_to_first_token": percentiles(m.ttft), "time_per_output_token": percentiles(m.tpot),
            "queue_time": percentiles(m.queue_time), "e2e_latency": percentiles(m.e2e),
        }

    # ---- the step loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One core step (dispatch the next device step, read back the previous one). Returns
        the outputs made since the last call: finished requests, and streamed ones with new
        tokens."""
        for request_id, index, stop in self.outputs.take_stops():  # stop strings the output processor found
            self.core.finish_stop(request_id, index, stop)
        records, dispatched = self.core.step()
        for record in records:
            self.outputs.submit(record)
        if not dispatched:
            self.outputs.wait(timeout=1.0)  # nothing on the device: let the outputs catch up
        return self.outputs.take_outputs()

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, progress: bool = False, background: bool = False) -> int:
        """EngineCore.warmup: make the step shapes ready before they are needed."""
        if self.has_unfinished():
            raise RuntimeError("warm up before adding requests")
        return self.core.warmup(progress=progress, background=background)

    def stop_warmup(self) -> None:
        self.core.stop_warmup()

    def wait_for_warmup(self) -> None:
        self.core.wait_for_warmup()
