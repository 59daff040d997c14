"""Between the wire and the engine: proto requests in, proto responses out.

Every check of the wire format happens here, and raises InputError with a
message naming the field; the servicer turns that into INVALID_ARGUMENT. The
prompt itself is encoded and checked by the engine's InputProcessor, as every
entry point's is.
"""

from __future__ import annotations

import math

from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import InputError
from jaxinfer.engine.outputs import RequestOutput
from serving.gen.jaxinfer.v1 import inference_pb2 as pb

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
                   "ignore_eos", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "skip_special_tokens", "include_stop_str_in_output", "speculate")
MAX_REQUEST_ID_CHARS = 256

FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
          "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Only fields the client set are passed on; the rest keep SamplingParams' defaults."""
    kwargs = {name: getattr(msg, name) for name in SAMPLING_FIELDS if msg.HasField(name)}
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if name in kwargs and not math.isfinite(kwargs[name]):
            raise InputError(f"invalid sampling parameters: {name} must be finite")
    return SamplingParams(**kwargs)


def messages(msg: pb.ChatMessages) -> list[dict[str, str]]:
    if not msg.messages:
        raise InputError("messages is empty")
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def prompt(request: pb.GenerateRequest) -> dict:
    """The request's prompt in the form InputProcessor.encode takes."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InputError("the request has no prompt: set one of text, token_ids or messages")
    if kind == "token_ids":
        return {"prompt_token_ids": list(request.token_ids.ids)}
    if kind == "text":
        return {"prompt": request.text}
    return {"messages": messages(request.messages)}


def request_id(value: str) -> str | None:
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InputError(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if value and not value.isprintable():
        raise InputError("request_id must be printable text")
    return value or None


def logprobs(entry: dict) -> pb.PositionLogprobs:
    return pb.PositionLogprobs(entries=[
        pb.TokenLogprob(token_id=t, logprob=lp.logprob if math.isfinite(lp.logprob) else -1e30,
                        rank=lp.rank, text=lp.decoded_token or "")
        for t, lp in entry.items()])


class DeltaTracker:
    """Turns the engine's cumulative outputs into per-message deltas.

    While a sample runs, text that could still become the start of a stop
    string is held back, so a client never receives text that the stop string
    later cuts away."""

    def __init__(self, params: SamplingParams, request_id: str):
        self.request_id = request_id  # the client's id (the engine's own id never goes out)
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.sent_tokens: dict[int, int] = {}
        self.sent_text: dict[int, int] = {}
        self.sent_prompt_logprobs = False
        self.finished: set[int] = set()  # samples whose final delta went out

    def response(self, out: RequestOutput) -> pb.GenerateResponse:
        resp = pb.GenerateResponse(request_id=self.request_id, finished=out.finished)
        if out.prompt_logprobs is not None and not self.sent_prompt_logprobs:
            resp.prompt_logprobs.extend(pb.PositionLogprobs() if e is None else logprobs(e)
                                        for e in out.prompt_logprobs)
            self.sent_prompt_logprobs = True
        for o in out.outputs:
            if o.index in self.finished:
                continue
            done = o.finish_reason is not None
            t0, c0 = self.sent_tokens.get(o.index, 0), self.sent_text.get(o.index, 0)
            end = len(o.text) if done else max(c0, len(o.text) - self.hold)
            if len(o.token_ids) == t0 and end == c0 and not done:
                continue
            delta = pb.CompletionDelta(index=o.index, token_ids=o.token_ids[t0:], text=o.text[c0:end],
                                       finish_reason=FINISH.get(o.finish_reason, pb.FINISH_REASON_UNSPECIFIED))
            if o.logprobs is not None:
                delta.logprobs.extend(logprobs(e) for e in o.logprobs[t0:])
            if isinstance(o.stop_reason, str):
                delta.stop_string = o.stop_reason
            elif o.stop_reason is not None:
                delta.stop_token_id = int(o.stop_reason)
            self.sent_tokens[o.index], self.sent_text[o.index] = len(o.token_ids), end
            if done:
                self.finished.add(o.index)
            resp.outputs.append(delta)
        if out.finished:
            resp.usage.CopyFrom(pb.Usage(
                prompt_tokens=len(out.prompt_token_ids),
                completion_tokens=sum(len(o.token_ids) for o in out.outputs),
                cached_tokens=out.num_cached_tokens))
        return resp
