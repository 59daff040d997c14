"""Hostile requests for scripts/serving_campaign.py: boundary cases, each with the answer it
must get, and fuzzed requests (garbage bytes, invalid UTF-8, random fields) that must get a
proper answer. `c` is the campaign: its limits, vocabulary size, context length and token
helpers."""

from __future__ import annotations

import dataclasses
import math
import random

from campaign_checks import PROPER
from serving.gen.jaxinfer.v1 import inference_pb2 as pb

METHODS = {"Generate": pb.GenerateResponse, "Abort": pb.AbortResponse, "Tokenize": pb.TokenizeResponse,
           "GetModelInfo": pb.ModelInfo, "GetServerInfo": pb.ServerInfo}
WORDS = ["alpha", "river", "stone", "blue", "seven", "light", "north", "paper", "quiet", "glass"]


@dataclasses.dataclass
class Case:
    label: str
    method: str
    data: bytes
    expect: frozenset = PROPER
    timeout: float = 120.0
    alone: bool = False  # heavy (a long prefill, megabytes to tokenize): sent with nothing else in flight


INVALID = frozenset({"INVALID_ARGUMENT"})
OK = frozenset({"OK"})
BAD_UTF8 = [b"\xff\xfe\xfd\xfc", b"\xc0\x80AB", b"\xed\xa0\x80A", b"\xf4\x90\x80\x80", b"AB\xe2\x82",
            b"\x80\x80\x80\x80"]
MARK = "ZQXJ"


def _gen(sampling: dict | None = None, **fields) -> bytes:
    return pb.GenerateRequest(sampling=pb.SamplingParams(**(sampling or {})), **fields).SerializeToString()


def _with_bad_utf8(data: bytes, bad: bytes) -> bytes:
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), bad)


def chat_messages(pairs) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])


def boundary_cases(c, rng: random.Random) -> list[Case]:
    """Requests at and just past every limit, each with the answer it must get."""
    lim, vocab, ctx = c.limits, c.vocab, c.ctx
    ok_prompt = {"text": "Hello there"}
    cases: list[Case] = []

    def gen(label, expect, sampling=None, alone=False, **fields):
        fields = fields or dict(ok_prompt)
        cases.append(Case(label, "Generate", _gen(sampling, **fields), expect, 900 if alone else 120, alone))

    nan, inf = math.nan, math.inf
    for name, values in {"temperature": [nan, inf, -inf, -1e308, -1.0],
                         "top_p": [nan, inf, 0.0, -0.5, 1.0000001, 1e308], "min_p": [nan, -inf, -0.1, 1.5, 1e308],
                         "presence_penalty": [nan, inf, 2.5, -1e308],
                         "frequency_penalty": [nan, -inf, 1e308, -2.01],
                         "repetition_penalty": [nan, inf, 0.0, -1.0]}.items():
        for v in values:
            gen(f"{name}={v!r}", INVALID, {name: v, "max_tokens": 2})
    # Finite but huge: the server may serve them (sampling is uniform, the penalty total) or
    # refuse them; either way with a proper status and a clean log (a float32 overflow warning
    # on stderr shows up in the log check).
    for name, v in [("temperature", 1e308), ("temperature", 1e4 * 1.01), ("repetition_penalty", 1e5),
                    ("repetition_penalty", 1e308), ("repetition_penalty", 5e-324)]:
        gen(f"{name}={v!r}", PROPER, {name: v, "max_tokens": 2, "seed": 1})
    for name, values in {"n": [0, 129, lim.max_n + 1, 2**32 - 1], "logprobs": [21, 2**32 - 1],
                         "prompt_logprobs": [21, 2**32 - 1], "top_k": [-2, -2**31]}.items():
        for v in values:
            gen(f"{name}={v}", INVALID, {name: v, "max_tokens": 2})
    gen("max_tokens=0", INVALID, {"max_tokens": 0})
    gen("min_tokens > max_tokens", INVALID, {"max_tokens": 4, "min_tokens": 5})
    gen("min_tokens=2**32-1", INVALID, {"min_tokens": 2**32 - 1, "max_tokens": 4})
    gen("17 stop strings", INVALID, {"stop": [f"s{i}" for i in range(17)], "max_tokens": 2})
    gen("200 stop strings", INVALID, {"stop": [f"stop{i}" for i in range(200)], "max_tokens": 2})
    gen("200 stop strings of 300 chars", INVALID, {"stop": [f"{i}" + "x" * 300 for i in range(200)]})
    gen("200 empty stop strings", INVALID, {"stop": [""] * 200})
    gen("an empty stop string", INVALID, {"stop": [""]})
    gen("a 257-char stop string", INVALID, {"stop": ["y" * 257]})
    gen("65 stop_token_ids", INVALID, {"stop_token_ids": [5] * 65})
    gen("100k stop_token_ids", INVALID, {"stop_token_ids": [rng.randrange(2**62) for _ in range(100_000)]},
        alone=True)
    for v in (-1, vocab, 2**63 - 1, -2**63):
        gen(f"stop_token_ids=[{v}]", INVALID, {"stop_token_ids": [v], "max_tokens": 2})
    # Valid at the limit: must be served.
    gen("16 stop strings of 256 chars", OK, {"stop": [f"{i:02d}" + "z" * 254 for i in range(16)], "max_tokens": 4})
    gen("64 stop_token_ids", OK, {"stop_token_ids": [vocab - 1] * 64, "max_tokens": 4})
    gen("n=max_n", OK, {"n": lim.max_n, "max_tokens": 2, "temperature": 1.0, "seed": 1})
    gen("logprobs=20 prompt_logprobs=20", OK, {"logprobs": 20, "prompt_logprobs": 20, "max_tokens": 3})
    gen("temperature=1e4", OK, {"temperature": 1e4, "seed": 3, "max_tokens": 3})
    gen("top_p=1e-300", OK, {"top_p": 1e-300, "temperature": 1.0, "seed": 3, "max_tokens": 3})
    gen("top_k=2**31-1 min_p=1", OK, {"top_k": 2**31 - 1, "min_p": 1.0, "temperature": 1.0, "max_tokens": 3})
    gen("seed=-2**63", OK, {"seed": -2**63, "temperature": 1.0, "max_tokens": 3})
    gen("seed=2**63-1", OK, {"seed": 2**63 - 1, "temperature": 1.0, "max_tokens": 3})
    gen("penalties at their limits", OK, {"presence_penalty": 2.0, "frequency_penalty": -2.0,
                                          "repetition_penalty": 1e4, "max_tokens": 3})
    gen("max_tokens=2**32-1", PROPER, {"max_tokens": 2**32 - 1, "ignore_eos": True})
    for prio in (-2**31, 2**31 - 1):
        gen(f"priority={prio}", OK, {"max_tokens": 2}, text="Hi", priority=prio)
    # Prompts.
    gen("empty text", INVALID, text="")
    gen("no prompt", INVALID, request_id="")
    gen("empty token_ids", INVALID, token_ids=pb.TokenIds(ids=[]))
    for v in (-1, vocab, 2**63 - 1, -2**63):
        gen(f"token id {v}", INVALID, token_ids=pb.TokenIds(ids=[5, v, 6]))
    max_prompt = min(lim.max_prompt_tokens or ctx - 1, ctx - 1)
    gen("prompt of max_prompt_tokens", OK, {"max_tokens": 1}, alone=True,
        token_ids=pb.TokenIds(ids=[rng.randrange(*c.token_range) for _ in range(max_prompt)]))
    gen("prompt of max_prompt_tokens + 1", INVALID, token_ids=pb.TokenIds(ids=[5] * (max_prompt + 1)))
    gen("1 MB text", INVALID | {"RESOURCE_EXHAUSTED"}, alone=True, text="word " * 200_000)
    over = lim.max_message_bytes + 1024
    cases.append(Case("text over max_message_bytes", "Generate", _gen(text="w" * over),
                      frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}), 900, True))
    gen("request_id of 257 chars", INVALID, request_id="r" * 257, text="Hi")
    gen("request_id with a NUL", INVALID, request_id="bad\x00id", text="Hi")
    # Chat messages.
    gen("no messages", INVALID, messages=chat_messages([]))
    for pairs in ([("user", "a"), ("user", "b")], [("assistant", "first")], [("", "")], [("tool", "x")],
                  [("system", "s"), ("system", "t"), ("user", "u")], [("user", "{{ raise_exception('x') }}")],
                  [("USER", "\x00\x01")], [("user", "hi"), ("assistant", "")]):
        gen(f"chat {[r for r, _ in pairs]}", PROPER, {"max_tokens": 2}, messages=chat_messages(pairs))
    gen("20000 chat messages", INVALID | {"RESOURCE_EXHAUSTED"}, alone=True,
        messages=chat_messages([("user", "hi")] * 20_000))
    # Invalid UTF-8 in each string a request carries.
    for i, where in enumerate(["text", "stop", "request_id", "role", "content"]):
        bad = BAD_UTF8[i % len(BAD_UTF8)]
        if where == "text":
            data = _gen(text=MARK)
        elif where == "stop":
            data = _gen({"stop": [MARK]}, text="Hi")
        elif where == "request_id":
            data = _gen(request_id=MARK, text="Hi")
        else:
            data = _gen(messages=chat_messages([(MARK, "c") if where == "role" else ("user", MARK)]))
        cases.append(Case(f"invalid UTF-8 in {where}", "Generate", _with_bad_utf8(data, bad), INVALID))
    # The other methods.
    tok = lambda **kw: pb.TokenizeRequest(**kw).SerializeToString()  # noqa: E731
    words = " ".join(rng.choice(WORDS) for _ in range(600_000))[:3 << 20]
    cases += [
        Case("Tokenize 3 MB of words", "Tokenize", tok(text=words), PROPER, 900, True),
        Case("Tokenize 3 MB of rare characters", "Tokenize",
             tok(text="".join(chr(rng.choice([0xE9, 0x4E2D, 0x1F600, 0x0416, 0x3042])) for _ in range(800_000))),
             PROPER, 900, True),
        Case("Tokenize empty text", "Tokenize", tok(text=""), OK),
        Case("Tokenize nothing", "Tokenize", tok(), INVALID),
        Case("Tokenize no messages", "Tokenize", tok(messages=chat_messages([])), INVALID),
        Case("Tokenize chat", "Tokenize", tok(messages=chat_messages([("user", "hi")])), OK),
        Case("Tokenize invalid UTF-8", "Tokenize", _with_bad_utf8(tok(text=MARK), BAD_UTF8[0]), INVALID),
        Case("Abort an unknown id", "Abort", pb.AbortRequest(request_id="never-sent").SerializeToString(),
             PROPER | {"NOT_FOUND"}),
        Case("Abort an empty id", "Abort", pb.AbortRequest().SerializeToString(), PROPER | {"NOT_FOUND"}),
        Case("Abort a 10 KB id", "Abort", pb.AbortRequest(request_id="a" * 10_000).SerializeToString(),
             PROPER | {"NOT_FOUND"}),
        Case("Abort invalid UTF-8", "Abort", _with_bad_utf8(pb.AbortRequest(request_id=MARK).SerializeToString(),
                                                           BAD_UTF8[1]), INVALID),
        Case("GetModelInfo", "GetModelInfo", b"", OK),
        Case("GetServerInfo", "GetServerInfo", b"", OK),
    ]
    return cases


def pick(rng: random.Random, values):
    return values[rng.randrange(len(values))]


def _text(rng: random.Random, max_len: int) -> str:
    alphabet = "abc xyz\n\t.,!?{}<|>%\\\"'" + "é中😀Ж\u200b\u202e"
    return "".join(rng.choice(alphabet) if rng.random() < 0.9 else chr(rng.randrange(1, 0xD800))
                   for _ in range(rng.randint(0, max_len)))


def fuzz_case(c, rng: random.Random) -> Case:
    """One random request: garbage, a mutated message, invalid UTF-8, a fuzzed GenerateRequest
    (mostly refused), or a plausible one (odd but valid values: mostly served)."""
    kind = rng.random()
    if kind > 0.65:
        return Case("plausible request", "Generate", plausible_request(c, rng).SerializeToString())
    if kind < 0.1:
        method = pick(rng, list(METHODS))
        return Case(f"garbage to {method}", method, rng.randbytes(rng.randint(0, 300)))
    request = fuzz_request(c, rng)
    data = request.SerializeToString()
    if kind < 0.2 and data:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(data) or 1)
            if op < 0.4 and data:
                data[i % len(data)] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                data = data[:i]
            else:
                data[i:i] = rng.randbytes(rng.randint(1, 8))
        return Case("mutated bytes", "Generate", bytes(data))
    if kind < 0.3:
        where = pick(rng, ["text", "stop", "request_id", "content"])
        if where == "text":
            request.text = MARK
        elif where == "stop":
            request.sampling.stop.append(MARK)
        elif where == "request_id":
            request.request_id = MARK
        else:
            request.messages.CopyFrom(chat_messages([("user", MARK)]))
        return Case(f"invalid UTF-8 in {where}", "Generate",
                    _with_bad_utf8(request.SerializeToString(), pick(rng, BAD_UTF8)), INVALID)
    return Case("fuzzed request", "Generate", data)


def plausible_request(c, rng: random.Random) -> pb.GenerateRequest:
    """Every field drawn from its valid range, in random combinations."""
    fields = {"n": lambda: rng.randint(1, min(4, c.limits.max_n)), "temperature": lambda: rng.uniform(0, 2),
              "top_p": lambda: rng.uniform(1e-3, 1), "top_k": lambda: rng.randint(-1, 100),
              "min_p": lambda: rng.uniform(0, 1), "seed": lambda: rng.randrange(-2**63, 2**63),
              "max_tokens": lambda: rng.randint(1, 24), "ignore_eos": lambda: rng.random() < 0.5,
              "logprobs": lambda: rng.randint(0, 20), "prompt_logprobs": lambda: rng.randint(0, 5),
              "presence_penalty": lambda: rng.uniform(-2, 2), "frequency_penalty": lambda: rng.uniform(-2, 2),
              "repetition_penalty": lambda: rng.uniform(0.5, 2), "skip_special_tokens": lambda: rng.random() < 0.5,
              "include_stop_str_in_output": lambda: rng.random() < 0.5}
    sampling = {name: make() for name, make in fields.items() if rng.random() < 0.4}
    if "max_tokens" in sampling and rng.random() < 0.3:
        sampling["min_tokens"] = rng.randint(0, sampling["max_tokens"])
    if rng.random() < 0.3:
        sampling["stop"] = [_text(rng, 8) or "." for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.2:
        sampling["stop_token_ids"] = [rng.randrange(c.vocab) for _ in range(rng.randint(1, 8))]
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if rng.random() < 0.2:
        request.priority = rng.randint(-10, 10)
    prompt = rng.random()
    if prompt < 0.4:
        request.text = _text(rng, 40) or "x"
    elif prompt < 0.7:
        request.token_ids.ids.extend(c.token_prompt(rng, 1, 40))
    else:
        roles = ["user", "assistant", "system"]
        pairs = [(pick(rng, roles), _text(rng, 30)) for _ in range(rng.randint(1, 3))]
        request.messages.CopyFrom(chat_messages(pairs))
    return request


def fuzz_request(c, rng: random.Random) -> pb.GenerateRequest:
    floats = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 1e4, 1e5]
    u32 = [0, 1, 2, 16, 20, 21, 64, 128, 129, 2**31, 2**32 - 1]
    i32 = [-2**31, -2, -1, 0, 1, 50, 2**31 - 1]
    i64 = [-2**63, -1, 0, 1, 2, c.vocab - 1, c.vocab, 2**31, 2**63 - 1]

    def f():
        return rng.uniform(-3, 3) if rng.random() < 0.3 else pick(rng, floats)

    def u():
        return rng.randint(0, 40) if rng.random() < 0.4 else pick(rng, u32)

    def i():
        return rng.randrange(*c.token_range) if rng.random() < 0.5 else pick(rng, i64)

    fields = {"n": u, "temperature": f, "top_p": f, "top_k": lambda: pick(rng, i32), "min_p": f,
              "seed": lambda: pick(rng, i64), "max_tokens": u, "min_tokens": u,
              "ignore_eos": lambda: rng.random() < 0.5, "logprobs": u, "prompt_logprobs": u,
              "presence_penalty": f, "frequency_penalty": f, "repetition_penalty": f,
              "skip_special_tokens": lambda: rng.random() < 0.5,
              "include_stop_str_in_output": lambda: rng.random() < 0.5}
    sampling = {name: make() for name, make in fields.items() if rng.random() < 0.25}
    if rng.random() < 0.2:
        sampling["stop"] = [_text(rng, 300) for _ in range(rng.choice([0, 1, 3, 17, 40, 200]))]
    if rng.random() < 0.15:
        sampling["stop_token_ids"] = [i() for _ in range(rng.choice([1, 5, 64, 65, 3000]))]
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if rng.random() < 0.3:
        request.request_id = _text(rng, 300)
    if rng.random() < 0.2:
        request.priority = pick(rng, i32)
    prompt = rng.random()
    if prompt < 0.4:
        request.text = _text(rng, 300)
    elif prompt < 0.75:
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(i() for _ in range(rng.randint(0, 300) if rng.random() < 0.5 else 8))
    elif prompt < 0.95:
        roles = ["user", "assistant", "system", "tool", "", _text(rng, 10)]
        pairs = [(pick(rng, roles), _text(rng, 200)) for _ in range(rng.randint(0, 5))]
        request.messages.CopyFrom(chat_messages(pairs))
    return request
