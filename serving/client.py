"""A small client for jaxinfer's gRPC service (jaxinfer.v1.Inference).

    with Client(port=50051) as client:
        for response in client.generate("The capital of France is", max_tokens=16, temperature=0):
            print(response.outputs[0].text if response.outputs else "", end="", flush=True)
        text, last = client.generate_text([{"role": "user", "content": "Hi"}], max_tokens=32)

    async with AsyncClient(port=50051) as client:  # the same methods, awaited; on grpc.aio
        async for response in client.generate(prompt_ids, max_tokens=16, ignore_eos=True): ...

A prompt is text, a list of token ids, or a list of chat messages ({"role", "content"}).
Sampling keywords are SamplingParams field names; only those given (and not None) are
set on the wire, so the others keep the server's defaults. Failed calls raise
grpc.RpcError (code() and details() say why). Breaking out of a `generate` stream
cancels the call, which aborts the request on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.gen.jaxinfer.v1 import inference_pb2 as pb
from serving.gen.jaxinfer.v1 import inference_pb2_grpc as pb_grpc

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]

SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REPEATED = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.is_repeated)


# ---- messages ---------------------------------------------------------------------------------


def sampling_params(**sampling) -> pb.SamplingParams:
    """SamplingParams with only the given, non-None fields set; `stop` may be one string."""
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    msg = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _REPEATED:
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(msg, name, value)
    return msg


def _messages(messages: Sequence[Mapping[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def generate_request(prompt: Prompt, *, request_id: str | None = None, priority: int | None = None,
                     **sampling) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=request_id or "", sampling=sampling_params(**sampling))
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        request.messages.CopyFrom(_messages(prompt))
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        request.token_ids.SetInParent()  # set even when empty, so the server names the problem
        request.token_ids.ids.extend(prompt)
    else:
        raise TypeError(f"a prompt is text, token ids or chat messages, got {type(prompt).__name__}")
    if priority is not None:
        request.priority = priority
    return request


def tokenize_request(text_or_messages: str | Sequence[Mapping[str, str]],
                     add_special_tokens: bool | None = None) -> pb.TokenizeRequest:
    if isinstance(text_or_messages, str):
        request = pb.TokenizeRequest(text=text_or_messages)
    else:
        request = pb.TokenizeRequest(messages=_messages(text_or_messages))
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


class _Text:
    """Accumulates sample 0's text over a stream; keeps the last response."""

    def __init__(self):
        self.parts: list[str] = []
        self.last: pb.GenerateResponse | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        self.parts.extend(o.text for o in response.outputs if o.index == 0)
        self.last = response


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(ca_file, cert_file, key_file):
    if ca_file is None and cert_file is None and key_file is None:
        return None
    from serving.security import channel_credentials
    return channel_credentials(ca_file, cert_file, key_file)


# ---- clients ----------------------------------------------------------------------------------


class _Base:
    def __init__(self, grpc_module, host: str, port: int, *, token, ca_file, cert_file, key_file, timeout,
                 options):
        target = _target(host, port)
        creds = _credentials(ca_file, cert_file, key_file)
        self.channel = (grpc_module.insecure_channel(target, options=options) if creds is None
                        else grpc_module.secure_channel(target, creds, options=options))
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _call(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_Base):
    """Synchronous client. TLS when any of ca_file/cert_file/key_file is given (ca_file None:
    the system roots); `token` is sent as `authorization: Bearer <token>`; `timeout` (seconds)
    is the default deadline of every call, a whole generate stream included."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, *, token: str | None = None,
                 ca_file=None, cert_file=None, key_file=None, timeout: float | None = None,
                 options: Sequence[tuple] = ()):
        super().__init__(grpc, host, port, token=token, ca_file=ca_file, cert_file=cert_file,
                         key_file=key_file, timeout=timeout, options=list(options))

    def generate(self, prompt: Prompt, *, request_id: str | None = None, priority: int | None = None,
                 timeout: float | None = None, **sampling) -> Iterator[pb.GenerateResponse]:
        """Yield the GenerateResponse messages of one request; the last has finished=True."""
        request = generate_request(prompt, request_id=request_id, priority=priority, **sampling)
        call = self.stub.Generate(request, **self._call(timeout))
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream ended; aborts the request if the caller stopped early

    def generate_text(self, prompt: Prompt, **kwargs) -> tuple[str, pb.GenerateResponse]:
        """(sample 0's whole text, the last response: finish reason and usage)."""
        acc = _Text()
        for response in self.generate(prompt, **kwargs):
            acc.add(response)
        return "".join(acc.parts), acc.last

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running request; False if no such request was running."""
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), **self._call(timeout)).found

    def tokenize(self, text_or_messages, *, add_special_tokens: bool | None = None,
                 timeout: float | None = None) -> list[int]:
        request = tokenize_request(text_or_messages, add_special_tokens)
        return list(self.stub.Tokenize(request, **self._call(timeout)).token_ids)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call(timeout))

    def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._call(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), **self._call(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """Client's methods on grpc.aio, for many concurrent streams from one thread. Create it
    inside the event loop that uses it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, *, token: str | None = None,
                 ca_file=None, cert_file=None, key_file=None, timeout: float | None = None,
                 options: Sequence[tuple] = ()):
        super().__init__(grpc.aio, host, port, token=token, ca_file=ca_file, cert_file=cert_file,
                         key_file=key_file, timeout=timeout, options=list(options))

    async def generate(self, prompt: Prompt, *, request_id: str | None = None, priority: int | None = None,
                       timeout: float | None = None, **sampling) -> AsyncIterator[pb.GenerateResponse]:
        request = generate_request(prompt, request_id=request_id, priority=priority, **sampling)
        call = self.stub.Generate(request, **self._call(timeout))
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate_text(self, prompt: Prompt, **kwargs) -> tuple[str, pb.GenerateResponse]:
        acc = _Text()
        async for response in self.generate(prompt, **kwargs):
            acc.add(response)
        return "".join(acc.parts), acc.last

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id), **self._call(timeout))).found

    async def tokenize(self, text_or_messages, *, add_special_tokens: bool | None = None,
                       timeout: float | None = None) -> list[int]:
        request = tokenize_request(text_or_messages, add_special_tokens)
        return list((await self.stub.Tokenize(request, **self._call(timeout))).token_ids)

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call(timeout))

    async def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._call(timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                **self._call(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
