"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`.

Names follow vLLM where they overlap, so scripts move over without relearning:

    from jaxinfer import LLM, SamplingParams
    llm = LLM()  # the default model
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)

A prompt is text, a list of token ids, or a dict with one of `prompt`,
`prompt_token_ids` or `messages` (a chat, rendered with the model's template).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

from checkpoints import loader
from jaxinfer import distributed
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.driver import EngineDriver
from jaxinfer.errors import InputError
from jaxinfer.engine.input_processor import ProcessedPrompt, PromptType
from jaxinfer.engine.outputs import RequestOutput
from jaxinfer.sharding import make_mesh

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NOTHING = object()


def _core_for(model, dtype_name: str, tensor_parallel_size: int, config: EngineConfig, progress: bool,
              quantization=None):
    """The engine core a core process builds: it loads the model itself."""
    from jaxinfer.engine.engine_core import EngineCore

    mesh = make_mesh(tensor=tensor_parallel_size)
    loaded = loader.load(model, dtype=DTYPES[dtype_name], mesh=mesh, progress=progress, quantization=quantization)
    return EngineCore(loaded, mesh, config)


def default_dtype_name() -> str:
    """bfloat16 on accelerators; float32 on the CPU, where bf16 matmuls are slow."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str | None = None, quantization: str | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, warmup: bool = True,
                 warmup_in_background: bool = True, progress: bool = True, core_process: bool = False,
                 **engine_config):
        """Load `model` (GGUF file, HF directory or jaxinfer checkpoint; None: the default
        model) and start an engine. Extra keywords are EngineConfig fields
        (max_num_seqs, max_num_batched_tokens, max_model_len, num_pages, ...).

        `data_parallel_size` (vLLM's name): that many independent replicas, each over
        `tensor_parallel_size` devices, with requests routed by load and shared prefix
        (jaxinfer/engine/data_parallel.py).

        `quantization` (vLLM's name): "int8" or "int4" (groups of 128 input channels, or the
        largest of 64 and 32 that fits), "fp8" (per channel), or a variant such as "int8-ch",
        "int4-g64" or "int4-g32-zp" (zero points): every projection but the output head is
        quantized as the model loads, and the float weights never reach the device. "gguf": a
        GGUF file's own Q8_0 / Q4_0 / Q4_1 projections, kept as they are. An HF checkpoint that
        comes quantized (AWQ, GPTQ, compressed-tensors) loads with its own scheme when this is None.

        Warm-up makes the step shapes a first request needs before returning; with
        `warmup_in_background` the others are made on a thread meanwhile (a step that
        needs one sooner waits for it), else before returning too.

        With `core_process` the engine core (scheduler, device, weights) runs in a child
        process of its own, and this process keeps input and output processing: streaming
        many requests then never slows the step loop (jaxinfer/engine/core_process.py)."""
        if distributed.initialize() and core_process:  # joins a run the environment asks for
            raise InputError("core_process does not combine with a multi-process run")
        dtype_name = dtype or default_dtype_name()
        if dtype_name not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
        config = EngineConfig(**engine_config)  # a bad setting is named before the model loads
        try:
            quantization = loader.quantization_spec(quantization)
        except ValueError as e:
            raise InputError(str(e)) from None
        if core_process and data_parallel_size > 1:
            raise InputError("core_process does not combine with data_parallel_size > 1 yet")
        if core_process:
            factory = functools.partial(_core_for, model, dtype_name, tensor_parallel_size, config, progress,
                                        quantization)
            self.engine = Engine.with_core_process(factory, warmup=warmup, background=warmup_in_background,
                                                   progress=progress)
            self.model, self.tokenizer, self._ids = self.engine.model, self.engine.tokenizer, itertools.count()
            return
        mesh = make_mesh(tensor=tensor_parallel_size, data=data_parallel_size)
        started = time.monotonic()
        loaded = loader.load(model, dtype=DTYPES[dtype_name], mesh=mesh, progress=progress, quantization=quantization)
        log.info("start-up: loaded %s in %.1f s", loaded.source, time.monotonic() - started)
        self._init(loaded, mesh, config, warmup, progress, warmup_in_background)

    @classmethod
    def from_loaded(cls, loaded: loader.LoadedModel, mesh=None, *, warmup: bool = True,
                    warmup_in_background: bool = False, progress: bool = False,
                    draft_model: loader.LoadedModel | None = None, **engine_config) -> "LLM":
        """An LLM over an already loaded model (tests, benchmarks with dummy weights). Its
        warm-up makes every shape before returning unless `warmup_in_background`. `draft_model`: an
        already loaded draft for speculative_config's method "draft_model" (its `model` then only names it)."""
        self = cls.__new__(cls)
        self._init(loaded, mesh or make_mesh(), EngineConfig(**engine_config), warmup, progress,
                   warmup_in_background, draft_model)
        return self

    def _init(self, loaded, mesh, config: EngineConfig, warmup: bool, progress: bool,
              background: bool = False, draft=None) -> None:
        self.model = loaded
        self.tokenizer = loaded.tokenizer
        started = time.monotonic()
        self.engine = Engine(loaded, mesh, config, draft)
        log.info("start-up: engine (KV cache, %d pages) in %.1f s", self.engine.config.num_pages,
                 time.monotonic() - started)
        self._ids = itertools.count()
        if warmup:
            self.engine.warmup(progress=progress, background=background)

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        """Stop the engine and free what it holds: the device memory, the compiled steps, a core process.
        `with LLM(...) as llm:` closes it on leaving the block."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts ------------------------------------------------------------------------------

    def encode(self, prompt: PromptType) -> tuple[list[int], str | None]:
        """Token ids (and text, if any) of one prompt in any accepted form."""
        return self.engine.input_processor.encode(prompt)

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs in the order of the prompts.

        Every prompt is checked before anything runs: a bad one raises InputError naming
        its index, and nothing is generated.

        In a multi-process run (jaxinfer/distributed.py) every process calls this alike; process 0's
        prompts are the ones generated, and every process returns its outputs."""
        if self._follower:
            return self._follow()
        prompts = _as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        if priority is not None and len(priority) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(priority)} priorities")
        processor = self.engine.input_processor
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append((processor.process(prompt, p), 0 if priority is None else priority[i]))
            except InputError as e:
                raise InputError(f"prompt {i}: {e}") from None
        return self._run(requests, use_tqdm)

    def chat(self, messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them."""
        if messages and isinstance(messages[0], Mapping):
            messages = [messages]
        return self.generate([{"messages": m} for m in messages], sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield one request's output (cumulative) each time it has new tokens. In a multi-process run
        the other processes get the last one only."""
        if self._follower:
            last = self._follow()
            if last is not None:
                yield last
            return
        prompt = self.engine.input_processor.process(prompt, sampling_params or SamplingParams())
        request_id = f"stream-{next(self._ids)}"
        last = None
        try:
            with EngineDriver(self.engine) as driver:  # a consumer that stops early aborts the request
                driver.add(request_id, prompt.token_ids, prompt.params, request_id, prompt=prompt.text,
                           stream=True)
                for out, tag in driver.run():
                    if tag is not None:
                        last = out
                        yield out
                        if out.finished:
                            return
        except Exception as e:  # not GeneratorExit: a consumer that stops early shares its last output
            self._share_failure(e)
            last = _NOTHING
            raise
        finally:
            if last is not _NOTHING:
                self._share(last)  # once every step is read back (the driver drained)

    def _params_for(self, prompts, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise InputError(f"sampling parameters {i} must be SamplingParams, got {type(p).__name__}")
        return params

    def _run(self, requests: list[tuple[ProcessedPrompt, int]], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        results: list[RequestOutput | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="req", disable=not use_tqdm)
        out_tokens = 0
        try:
            with EngineDriver(self.engine) as driver:  # on an exception, aborts what is left

                def feed():
                    for i, (prompt, priority) in enumerate(requests):
                        driver.add(f"{next(self._ids)}", prompt.token_ids, prompt.params, i, prompt=prompt.text,
                                   priority=priority)
                        yield

                for out, i in driver.run(feed()):
                    if i is None or not out.finished:
                        continue
                    results[i] = out
                    out_tokens += sum(len(o.token_ids) for o in out.outputs)
                    bar.update(1)
                    bar.set_postfix(out_tok=out_tokens, refresh=False)
        except BaseException as e:
            self._share_failure(e)
            raise
        finally:
            bar.close()
        return self._share(results)

    # ---- multi-process runs -------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """False on the follower processes of a multi-process run (jaxinfer/distributed.py)."""
        return not self._follower

    def follow(self) -> None:
        """On a follower process: make the leader's device calls until the leader closes its engine,
        then close this one (what `jaxinfer serve` runs on the other processes)."""
        if not self._follower:
            raise RuntimeError("only a follower process of a multi-process run follows")
        self.engine.close()

    @property
    def _follower(self) -> bool:
        return getattr(self.engine.core, "follower", False)

    def _share(self, value):
        """The leader's results of a call, sent to the other processes (their `_follow` returns them)."""
        return self.engine.core.share(value) if self.engine.in_process else value

    def _share_failure(self, error: BaseException) -> None:
        """The leader's call failed: the other processes' calls raise too, rather than wait for results."""
        if self.engine.in_process and self.engine.core.channel is not None and not self.engine.core.channel.lost:
            self._share(_LeaderFailed(f"the leader's call failed: {type(error).__name__}: {error}"))

    def _follow(self):
        """A follower's part in a call: the leader's device calls, then the leader's results."""
        from jaxinfer.engine.engine_core import CLOSED

        value = self.engine.core.follow()
        if value is CLOSED:
            raise distributed.ProcessLost("the leader closed its engine before this call's results came")
        if isinstance(value, _LeaderFailed):
            raise value
        return value


class _LeaderFailed(RuntimeError):
    """A follower's share of a call that failed on the leader."""


def _as_list(prompts) -> list:
    """One prompt or a list of them."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompts):
        return [prompts]  # one prompt of token ids
    if not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    return list(prompts)
