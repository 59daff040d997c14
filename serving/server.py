"""The gRPC server: `jaxinfer serve`.

    grpc.aio server (its own thread and event loop)
        Inference servicer ──submit/abort──▶ EngineLoop (engine thread) ──outputs──▶ per-stream queues
        grpc.health.v1 health: NOT_SERVING until warm-up is done and again while draining
        server reflection; Prometheus metrics over HTTP; bearer token and TLS when configured

A stream that is cancelled (client gone, deadline passed) aborts its request,
which frees its pages. Draining refuses new streams with UNAVAILABLE, lets the
running ones finish, then stops. Limits answer INVALID_ARGUMENT or
RESOURCE_EXHAUSTED with the limit's name instead of running out of memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer import params as params_lib
from jaxinfer.distributed import ProcessLost
from jaxinfer.core.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from jaxinfer.engine.engine import Engine
from jaxinfer.errors import InputError, JaxinferError
from jaxinfer.engine.input_processor import ProcessedPrompt
from serving import convert
from serving import security as security_lib
from serving.engine_loop import EngineLoop
from serving.gen.jaxinfer.v1 import inference_pb2 as pb
from serving.gen.jaxinfer.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("jaxinfer.serve")

SERVICE = "jaxinfer.v1.Inference"
INPUT_THREADS = 4
VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_concurrent_streams: int = 256
    max_queued_requests: int = 1024
    max_prompt_tokens: int | None = None  # None: the context length - 1
    max_total_tokens: int | None = None  # prompt + max_tokens; None: the context length
    max_message_bytes: int = 4 << 20


@dataclasses.dataclass(frozen=True)
class Security:
    tokens: tuple[str, ...] = ()  # bearer tokens clients may send; each is its own client identity
    cert_file: str | None = None  # TLS server certificate (PEM) ...
    key_file: str | None = None  # ... and key
    client_ca_file: str | None = None  # mutual TLS: clients need a certificate from this CA


MAX_STATUS_BYTES = 1024  # status messages travel in trailers, which gRPC caps at a few KB


async def refuse(context, code: grpc.StatusCode, message: str):
    """End the call with `code` and `message`, cut to MAX_STATUS_BYTES (never a transport error
    because a message was too long)."""
    data = message.encode("utf-8", "replace")
    if len(data) > MAX_STATUS_BYTES:
        message = data[:MAX_STATUS_BYTES - 40].decode("utf-8", "ignore") + f"... ({len(data)} bytes in all)"
    await context.abort(code, message)


REUSE_GRACE_SECONDS, REUSE_GRACE_TICKS = 0.25, 25  # how long a reused id waits for its cancelled stream


@dataclasses.dataclass(eq=False)
class _Stream:
    """A Generate stream, found by (principal, the client's request id)."""
    context: object  # its grpc.aio.ServicerContext
    engine_id: str | None = None  # the engine's own id, once submitted
    abort_requested: bool = False  # Abort arrived before it was submitted
    finished: bool = False  # the engine is done with it
    released: bool = False
    queue: asyncio.Queue | None = None  # its outputs, once submitted


class InferenceServicer(pb_grpc.InferenceServicer):
    """The RPCs. Everything that may take long on a large request (template rendering,
    tokenization, validation) runs on the server's input threads, never on the event loop.

    A client's request id is a label scoped to its principal (see `security.principal`):
    two clients may use the same id, and Abort reaches only the caller's own requests.
    The engine knows each request by an id the engine loop makes, so outputs can only
    reach the stream that submitted them."""

    def __init__(self, server: "Server"):
        self.server = server
        self.engine = server.engine
        self.tokenizer = server.engine.tokenizer
        self.streams: dict[tuple[str, str], _Stream] = {}

    async def _reject(self, context, code: grpc.StatusCode, message: str):
        self.server.count("rejected")
        await refuse(context, code, message)

    async def Generate(self, request, context):
        server, limits = self.server, self.server.limits
        if not server.ready.is_set():
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        if server.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the server is draining; try another replica")
        if server.lost is not None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, str(server.lost))
        try:
            label = convert.request_id(request.request_id) or uuid.uuid4().hex
        except InputError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        key = (server.principal(context), label)
        old = self.streams.get(key)
        if old is not None and not old.context.done():
            # A client that cancels a stream and reuses its id at once may be here before its
            # cancellation is: give that a moment to land.
            for _ in range(REUSE_GRACE_TICKS):
                await asyncio.sleep(REUSE_GRACE_SECONDS / REUSE_GRACE_TICKS)
                if old.context.done() or old.released:
                    break
        if old is not None and (old.context.done() or old.released):  # cancelled, its handler not yet unwound
            self._release(key, old)
        elif old is not None:
            await self._reject(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id {label!r} is running")
        if len(self.streams) >= limits.max_concurrent_streams:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"max_concurrent_streams ({limits.max_concurrent_streams}) reached")
        if server.loop.snapshot["waiting"] >= limits.max_queued_requests:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"max_queued_requests ({limits.max_queued_requests}) reached")
        stream = self.streams[key] = _Stream(context)  # taken while the input is prepared
        # A cancelled call frees its id and its pages at once, not when its handler unwinds.
        context.add_done_callback(lambda _: self._release(key, stream))
        try:
            try:
                prompt, priority = await server.off_loop(self._prepare, request)
            except InputError as e:
                await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except JaxinferError as e:  # the model cannot serve this kind of request (no chat template)
                await self._reject(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
            if stream.released:  # the client left while its input was prepared
                return
            aloop = asyncio.get_running_loop()
            queue = stream.queue = asyncio.Queue()
            tracker = convert.DeltaTracker(prompt.params, label)
            stream.engine_id = server.loop.submit(
                prompt.token_ids, prompt.params, lambda out: aloop.call_soon_threadsafe(queue.put_nowait, out),
                prompt=prompt.text, priority=priority)
            if stream.abort_requested:
                server.loop.abort(stream.engine_id)
            log.info("request accepted", extra={"request_id": stream.engine_id, "client_request_id": label,
                                                "client": key[0], "prompt_tokens": len(prompt.token_ids)})
            while True:
                out = await queue.get()
                if isinstance(out, ProcessLost):  # a process of a multi-process run is gone
                    stream.finished = True
                    server.count("error")
                    await refuse(context, grpc.StatusCode.UNAVAILABLE, str(out))
                if isinstance(out, JaxinferError):  # the engine refused it
                    stream.finished = True
                    await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(out))
                if isinstance(out, BaseException):
                    stream.finished = True
                    server.count("error")
                    await refuse(context, grpc.StatusCode.INTERNAL, f"engine failure: {out}")
                response = tracker.response(out)
                stream.finished = out.finished
                if response.outputs or response.finished or response.prompt_logprobs:
                    size = response.ByteSize()
                    if size > limits.max_message_bytes:
                        await refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"a reply of {size} bytes would exceed max_message_bytes "
                                     f"({limits.max_message_bytes}); ask for fewer prompt_logprobs")
                    yield response
                if stream.finished:
                    break
        finally:
            self._release(key, stream)

    def _release(self, key: tuple[str, str], stream: _Stream) -> None:
        """Forget a stream (once); abort its request if the engine is not done with it."""
        if self.streams.get(key) is stream:
            del self.streams[key]
        if stream.released:
            return
        stream.released = True
        if stream.engine_id is not None and not stream.finished:  # cancelled, deadline passed or client gone
            self.server.loop.abort(stream.engine_id)
            log.info("request cancelled", extra={"request_id": stream.engine_id})
        self.server.stream_ended()

    def _prepare(self, request) -> tuple[ProcessedPrompt, int]:
        """The checked prompt and the priority of a Generate request; InputError if it cannot
        be served. Runs on an input thread."""
        params = convert.sampling_params(request.sampling)
        processor = self.engine.input_processor
        ids, text = processor.encode(convert.prompt(request))
        self._check_limits(ids, params)  # the server's own limits come before the engine's
        ids, max_tokens = processor.check(ids, params)
        priority = request.priority if request.HasField("priority") else 0
        return ProcessedPrompt(ids, text, params, max_tokens), priority

    def _check_limits(self, token_ids: list[int], params) -> None:
        limits, n = self.server.limits, len(token_ids)
        if limits.max_prompt_tokens is not None and n > limits.max_prompt_tokens:
            raise InputError(f"the prompt has {n} tokens; max_prompt_tokens is {limits.max_prompt_tokens}")
        total = n + (params.max_tokens or self.engine.max_model_len)
        if limits.max_total_tokens is not None and params.max_tokens is not None and total > limits.max_total_tokens:
            raise InputError(f"prompt ({n}) + max_tokens ({params.max_tokens}) exceeds max_total_tokens "
                             f"({limits.max_total_tokens})")

    async def Abort(self, request, context):
        """Abort the caller's own request with this id; another client's stays untouched."""
        stream = self.streams.get((self.server.principal(context), request.request_id))
        if stream is None:
            return pb.AbortResponse(found=False)
        if stream.engine_id is None:
            stream.abort_requested = True
        else:
            self.server.loop.abort(stream.engine_id)
        return pb.AbortResponse(found=True)

    async def Tokenize(self, request, context):
        if self.tokenizer is None:
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        try:
            ids = await self.server.off_loop(self._tokenize, request)
        except InputError as e:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except JaxinferError as e:
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        response = pb.TokenizeResponse(token_ids=ids)
        size, limit = response.ByteSize(), self.server.limits.max_message_bytes
        if size > limit:
            await refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the reply ({len(ids)} token ids, {size} bytes) would exceed max_message_bytes "
                         f"({limit}); tokenize the text in parts")
        return response

    def _tokenize(self, request) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "messages":  # the ids Generate would run for these messages
            return self.engine.input_processor.encode_chat(convert.messages(request.messages))[0]
        if kind == "text":
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return self.tokenizer.encode(request.text, add_special_tokens=add)
        raise InputError("set one of text or messages")

    async def GetModelInfo(self, request, context):
        return self.server.model_info()

    async def GetServerInfo(self, request, context):
        s = self.server.loop.snapshot
        return pb.ServerInfo(version=VERSION, running=s["running"], queued=s["waiting"],
                             active_streams=len(self.streams), kv_cache_usage=s["kv_usage"],
                             kv_cache_pages=s["kv_pages"], prefix_cache_hit_rate=s["prefix_cache_hit_rate"],
                             preemptions=s["preemptions"], draining=self.server.draining,
                             uptime_seconds=time.monotonic() - self.server.started)


class Server:
    """Owns the engine loop, the grpc.aio server (on its own thread) and the metrics endpoint."""

    def __init__(self, engine: Engine, *, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits = Limits(), security: Security = Security(),
                 metrics_port: int | None = None, warmup: bool = True):
        self.engine = engine
        self.host, self.port = host, port
        self.limits = limits
        self.security = security
        self.metrics_port = metrics_port
        self.do_warmup = warmup
        self.metrics = None
        self.loop = EngineLoop(engine, on_finished=self._finished)
        self._tokens = tuple(t.encode() for t in security.tokens)
        # Tokenization, template rendering and validation of large requests run here, so the
        # event loop keeps answering (health checks, other streams) meanwhile.
        self.input_pool = concurrent.futures.ThreadPoolExecutor(INPUT_THREADS, thread_name_prefix="jaxinfer-input")
        self.ready = threading.Event()  # warmed up and serving
        self.listening = threading.Event()
        self.stopped = threading.Event()
        self.draining = False
        self.lost: ProcessLost | None = None  # set when a process of a multi-process run is gone
        self.started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._streams_done: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> int:
        """Start listening (warm-up continues in the background); returns the port."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="jaxinfer-grpc",
                                        daemon=True)
        self._thread.start()
        if not self.listening.wait(timeout) or self._error is not None:
            raise self._error or RuntimeError("the gRPC server did not start")
        return self.port

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def drain(self, timeout: float = 60) -> None:
        """Refuse new streams, let running ones finish (up to `timeout`), then stop."""
        if self._aio is None:
            return
        asyncio.run_coroutine_threadsafe(self._drain(timeout), self._aio).result(timeout + 30)
        self.stopped.wait(30)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)  # let asyncio finish its cleanup before the process may exit

    def stop(self) -> None:
        self.drain(timeout=0)

    async def _main(self) -> None:
        try:
            await self._serve()
        except BaseException as e:  # surfaced to start()
            self._error = e
            self.listening.set()
            raise
        finally:
            self.loop.stop(timeout=30)
            self.engine.stop_warmup()  # a background warm-up ends with the server
            self.input_pool.shutdown(wait=False, cancel_futures=True)
            self.stopped.set()

    async def _serve(self) -> None:
        self._aio = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._streams_done = asyncio.Event()
        self._streams_done.set()
        options = [("grpc.max_receive_message_length", self.limits.max_message_bytes),
                   ("grpc.max_send_message_length", self.limits.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        interceptors = []
        if self.security.tokens:
            interceptors.append(security_lib.BearerTokenInterceptor(*self.security.tokens))
        self.grpc_server = grpc.aio.server(options=options, interceptors=interceptors)
        self.servicer = InferenceServicer(self)
        _add_servicer(self.servicer, self.grpc_server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        names = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc_server)
        address = f"{self.host}:{self.port}"
        if self.security.cert_file:
            creds = security_lib.server_credentials(self.security.cert_file, self.security.key_file,
                                                    self.security.client_ca_file)
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise JaxinferError(f"could not listen on {address}")
        await self.grpc_server.start()
        if self.metrics_port is not None:
            from serving.prometheus import ServerMetrics
            self.metrics = ServerMetrics()
            self.metrics.set_engine_source(lambda: {**self.loop.snapshot,
                                                    "active_streams": len(self.servicer.streams)})
            self.metrics.start_http(self.metrics_port, host=self.host)
            self.metrics_port = self.metrics.http_port
        log.info("listening", extra={"address": f"{self.host}:{self.port}", "tls": bool(self.security.cert_file)})
        self.listening.set()
        if self.do_warmup:
            t = time.monotonic()
            # The shapes a first request needs are ready before SERVING; the rest follow on a thread.
            n = await asyncio.to_thread(self.engine.warmup, background=True)
            log.info("warm-up done", extra={"shapes": n, "seconds": round(time.monotonic() - t, 1)})
        channel = getattr(self.engine.core, "channel", None)
        if channel is not None:  # a multi-process run: SERVING only while every process is
            channel.watch(self._lost_from_thread)
        self.loop.start()
        self.ready.set()
        if self.lost is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        await self._stop_event.wait()
        await self.grpc_server.stop(grace=1)
        if self.metrics is not None:
            self.metrics.stop_http()

    async def _drain(self, timeout: float) -> None:
        self.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", extra={"streams": len(self.servicer.streams)})
        if self.servicer.streams:
            self._streams_done.clear()
            try:
                await asyncio.wait_for(self._streams_done.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("drain timed out; cancelling the remaining streams",
                            extra={"streams": len(self.servicer.streams)})
        self._stop_event.set()

    def _lost_from_thread(self, error: ProcessLost) -> None:
        if self._aio is not None and not self._aio.is_closed():
            asyncio.run_coroutine_threadsafe(self._lose(error), self._aio)

    async def _lose(self, error: ProcessLost) -> None:
        """A process of the run is gone: no step can run any more. NOT_SERVING, and every stream
        (new ones too) ends UNAVAILABLE at once, whatever the engine thread is waiting on."""
        self.lost = ProcessLost(f"{error}; this server cannot serve until the run is restarted")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("the multi-process run is broken: NOT_SERVING", extra={"error": str(error),
                                                                          "streams": len(self.servicer.streams)})
        for stream in list(self.servicer.streams.values()):
            if stream.queue is not None:
                stream.queue.put_nowait(self.lost)

    def stream_ended(self) -> None:
        if self.draining and not self.servicer.streams and self._streams_done is not None:
            self._streams_done.set()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    # ---- bookkeeping --------------------------------------------------------------------------

    def _finished(self, out) -> None:  # engine thread
        if self.metrics is not None:
            self.metrics.observe_finished(out)
        o = out.outputs[0] if out.outputs else None
        log.info("request finished", extra={
            "request_id": out.request_id, "status": o.finish_reason if o else "abort",
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": sum(len(x.token_ids) for x in out.outputs),
            "ttft": out.metrics.time_to_first_token})

    def principal(self, context) -> str:
        return security_lib.principal(context, self._tokens)

    async def off_loop(self, fn, *args):
        """fn(*args) on an input thread."""
        return await asyncio.get_running_loop().run_in_executor(self.input_pool, fn, *args)

    def count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.count(status)

    def model_info(self) -> pb.ModelInfo:
        engine, cfg = self.engine, self.engine.model.config
        dtype = engine.model.dtype
        limits = self.limits
        ctx = engine.max_model_len
        return pb.ModelInfo(
            model=str(engine.model.source), architecture=cfg.architecture, vocab_size=cfg.vocab_size,
            context_length=ctx, dtype=str(dtype),
            quantization="none" if engine.model.quantization is None else engine.model.quantization.name,
            num_params=params_lib.num_params(engine.model.state),
            limits=pb.Limits(
                max_concurrent_streams=limits.max_concurrent_streams,
                max_queued_requests=limits.max_queued_requests,
                max_prompt_tokens=min(limits.max_prompt_tokens or ctx - 1, ctx - 1),
                max_total_tokens=min(limits.max_total_tokens or ctx, ctx),
                max_message_bytes=limits.max_message_bytes, max_n=min(MAX_N, engine.config.max_num_seqs),
                max_logprobs=MAX_LOGPROBS, max_stop_strings=MAX_STOP_STRINGS,
                max_stop_token_ids=MAX_STOP_TOKEN_IDS))



class _Malformed:
    """What a request that does not parse (bad wire bytes, invalid UTF-8 in a string) becomes."""

    def __init__(self, error: Exception):
        self.error = error


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, UnicodeDecodeError
            return _Malformed(e)
    return parse


def _add_servicer(servicer: InferenceServicer, server) -> None:
    """Register the service like the generated helper does, except that a request that
    does not parse gets INVALID_ARGUMENT (grpc's own answer would be INTERNAL)."""
    def malformed(request) -> str:
        return f"malformed request: {request.error}"

    def unary(method):
        async def handler(request, context):
            if isinstance(request, _Malformed):
                await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, malformed(request))
            return await method(request, context)
        return handler

    async def generate(request, context):
        if isinstance(request, _Malformed):
            await servicer._reject(context, grpc.StatusCode.INVALID_ARGUMENT, malformed(request))
        async for response in servicer.Generate(request, context):
            yield response

    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        generate, request_deserializer=_parser(pb.GenerateRequest),
        response_serializer=pb.GenerateResponse.SerializeToString)}
    for name, req, resp in [("Abort", pb.AbortRequest, pb.AbortResponse),
                            ("Tokenize", pb.TokenizeRequest, pb.TokenizeResponse),
                            ("GetModelInfo", pb.GetModelInfoRequest, pb.ModelInfo),
                            ("GetServerInfo", pb.GetServerInfoRequest, pb.ServerInfo)]:
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            unary(getattr(servicer, name)), request_deserializer=_parser(req),
            response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
