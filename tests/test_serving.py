"""The real gRPC server on a loopback port, over the tiny test model: concurrent
streams equal the offline API, cancellations and deadlines free everything,
health follows warm-up and drain, hostile requests get proper status codes,
bearer tokens and TLS guard the door."""

import asyncio
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_fixtures import random_prompts, tiny_llm
from jaxinfer.core.sampling_params import SamplingParams
from serving.gen.jaxinfer.v1 import inference_pb2 as pb
from serving.gen.jaxinfer.v1 import inference_pb2_grpc as pb_grpc
from serving.server import Limits, Security, Server

PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def offline(data_dir):
    return tiny_llm(data_dir)


@pytest.fixture(scope="module")
def server(data_dir):
    srv = Server(tiny_llm(data_dir, warmup=False).engine, limits=Limits(max_queued_requests=10_000),
                 metrics_port=0)
    srv.start()
    assert srv.wait_ready(120)
    yield srv
    srv.drain(10)


def sampling_msg(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed or 0,
                             top_p=p.top_p, ignore_eos=p.ignore_eos, n=p.n)


def wait_idle(srv, timeout=30):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        s = srv.loop.snapshot
        if s["running"] == 0 and s["waiting"] == 0 and srv.loop.num_requests == 0 and not srv.servicer.streams:
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not go idle: {srv.loop.snapshot}")


async def collect(stub, request, cancel_after=None, timeout=None):
    """Tokens per sample index; with cancel_after, cancel once that many messages came."""
    call = stub.Generate(request, timeout=timeout)
    tokens, n = {}, 0
    async for response in call:
        for o in response.outputs:
            tokens.setdefault(o.index, []).extend(o.token_ids)
        n += 1
        if cancel_after is not None and n >= cancel_after:
            call.cancel()
            return None
    return [tokens.get(i, []) for i in sorted(tokens)]


def test_64_concurrent_streams_equal_the_offline_api(server, offline):
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 64)
    params = [SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=float(rng.choice([0.0, 0.9])),
                             seed=int(rng.integers(1000)), top_p=0.95, n=int(rng.choice([1, 1, 2])),
                             ignore_eos=True) for _ in prompts]
    expected = [[o.token_ids for o in out.outputs] for out in offline.generate(prompts, params, use_tqdm=False)]

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            return await asyncio.gather(*[
                collect(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=sampling_msg(sp)))
                for p, sp in zip(prompts, params)])

    got = asyncio.run(main())
    assert got == expected
    wait_idle(server)
    assert server.engine.scheduler.pool.num_used_pages == 0


def test_cancelled_streams_and_passed_deadlines_free_everything_and_harm_no_one(server, offline):
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 120)
    params = [SamplingParams(max_tokens=int(rng.integers(20, 60)), temperature=0.0, ignore_eos=True)
              for _ in prompts]
    keep = set(range(0, 120, 6))  # 20 streams run to the end; 100 are cancelled or time out
    expected = {i: offline.generate([prompts[i]], params[i], use_tqdm=False)[0].outputs[0].token_ids for i in keep}

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            jobs = []
            for i, (p, sp) in enumerate(zip(prompts, params)):
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=sampling_msg(sp))
                if i in keep:
                    jobs.append(collect(stub, req))
                elif i % 2:
                    jobs.append(collect(stub, req, cancel_after=int(rng.integers(1, 15))))
                else:
                    jobs.append(collect(stub, req, timeout=float(rng.uniform(0.01, 0.5))))
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    for i in keep:
        assert results[i] == [expected[i]], f"stream {i}"
    timed_out = [r for i, r in enumerate(results) if i not in keep and isinstance(r, grpc.aio.AioRpcError)]
    assert timed_out and all(r.code() == grpc.StatusCode.DEADLINE_EXCEEDED for r in timed_out)
    wait_idle(server)
    pool = server.engine.scheduler.pool
    assert pool.num_used_pages == 0 and pool.num_free_pages == pool.num_pages - 1
    assert not server.engine.requests


def test_health_follows_warm_up_and_drain_and_a_drain_finishes_running_streams(data_dir):
    engine = tiny_llm(data_dir, warmup=False).engine
    release = threading.Event()
    real_warmup = engine.warmup
    engine.warmup = lambda *a, **k: (release.wait(60), real_warmup(*a, **k))[1]
    srv = Server(engine)
    port = srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.InferenceStub(channel)

    def status(service=""):
        return health.Check(health_pb2.HealthCheckRequest(service=service)).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="hi")))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in e.value.details()
    release.set()
    assert srv.wait_ready(120)
    assert status() == status("jaxinfer.v1.Inference") == health_pb2.HealthCheckResponse.SERVING

    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                              sampling=pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    streams = [stub.Generate(long) for _ in range(3)]
    firsts = [next(s) for s in streams]  # all three are running
    assert all(f.outputs for f in firsts)
    drainer = threading.Thread(target=srv.drain, kwargs={"timeout": 60})
    drainer.start()
    deadline = time.monotonic() + 10
    while status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    for first, s in zip(firsts, streams):
        rest = list(s)
        assert rest[-1].finished and rest[-1].usage.completion_tokens == 100
        assert len(first.outputs[0].token_ids) + sum(len(r.outputs[0].token_ids) for r in rest if r.outputs) == 100
    drainer.join(30)
    assert srv.stopped.is_set()


def _hostile_requests():
    text = st.text(max_size=300)
    ints = st.integers(-2**63, 2**63 - 1)
    sampling = st.fixed_dictionaries({}, optional={
        "n": st.integers(0, 2**32 - 1), "temperature": st.floats(allow_nan=True, allow_infinity=True),
        "top_p": st.floats(allow_nan=True, allow_infinity=True), "top_k": st.integers(-2**31, 2**31 - 1),
        "min_p": st.floats(allow_nan=True, allow_infinity=True), "seed": ints,
        "max_tokens": st.integers(0, 2**32 - 1), "min_tokens": st.integers(0, 2**32 - 1),
        "stop": st.lists(text, max_size=40), "stop_token_ids": st.lists(ints, max_size=100),
        "ignore_eos": st.booleans(), "logprobs": st.integers(0, 2**32 - 1),
        "prompt_logprobs": st.integers(0, 2**32 - 1),
        "presence_penalty": st.floats(), "frequency_penalty": st.floats(), "repetition_penalty": st.floats(),
    })
    prompt = st.one_of(
        st.builds(lambda t: {"text": t}, text),
        st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(ints, max_size=300)),
        st.builds(lambda ms: {"messages": pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c)
                                                                  for r, c in ms])},
                  st.lists(st.tuples(text, text), max_size=5)),
        st.just({}))
    message = st.builds(
        lambda rid, p, s, prio: pb.GenerateRequest(request_id=rid, sampling=pb.SamplingParams(**s),
                                                   **p, **({"priority": prio} if prio is not None else {})),
        st.text(max_size=300), prompt, sampling, st.none() | st.integers(-2**31, 2**31 - 1))
    garbage = st.binary(max_size=200)
    # A valid message whose stop string carries invalid UTF-8: no client library would send it.
    bad_utf8 = st.builds(lambda b: pb.GenerateRequest(text="x", sampling=pb.SamplingParams(stop=["AB"]))
                         .SerializeToString().replace(b"AB", b"\xff" + b[:1]), st.binary(min_size=1, max_size=1))
    return st.one_of(message.map(lambda m: m.SerializeToString()), garbage, bad_utf8)


def test_a_thousand_hostile_requests_get_proper_codes_and_leak_nothing(server, offline):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    raw = channel.unary_stream("/jaxinfer.v1.Inference/Generate", request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
    codes = {}

    @settings(max_examples=1000, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_hostile_requests())
    def send(data):
        try:
            responses = list(raw(data, timeout=60))
            code = grpc.StatusCode.OK
            assert responses and responses[-1].finished
        except grpc.RpcError as e:
            code = e.code()
            assert code in PROPER, (code, e.details(), data[:100])
            assert e.details()
        codes[code] = codes.get(code, 0) + 1

    send()
    assert sum(codes.values()) >= 1000 and codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100
    wait_idle(server)
    assert server.engine.scheduler.pool.num_used_pages == 0 and not server.engine.requests
    # Still serving, and serving right.
    stub = pb_grpc.InferenceStub(channel)
    got = [t for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                       sampling=pb.SamplingParams(max_tokens=8, temperature=0.0)))
           for o in r.outputs for t in o.token_ids]
    want = offline.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert got == want[0].outputs[0].token_ids


def test_limits_name_themselves(data_dir):
    srv = Server(tiny_llm(data_dir, warmup=False).engine, warmup=False,
                 limits=Limits(max_prompt_tokens=10, max_total_tokens=100, max_concurrent_streams=1,
                               max_message_bytes=2000))
    srv.start()
    srv.wait_ready(60)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
    cases = [
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 11)), "max_prompt_tokens"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 5), sampling=pb.SamplingParams(max_tokens=96)),
         "max_total_tokens"),
        (pb.GenerateRequest(text="x" * 5000), None),  # over max_message_bytes: grpc's own RESOURCE_EXHAUSTED
    ]
    for req, name in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        if name:
            assert name in e.value.details()
    busy = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]),
                                            sampling=pb.SamplingParams(max_tokens=99, ignore_eos=True)))
    next(busy)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]))))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_streams" in e.value.details()
    busy.cancel()
    srv.drain(10)


def test_a_bearer_token_is_required_and_tls_works_end_to_end(data_dir, tmp_path):
    from serving.security import channel_credentials, make_test_certificates

    certs = make_test_certificates(tmp_path)
    srv = Server(tiny_llm(data_dir, warmup=False).engine, warmup=False,
                 security=Security(tokens=("s3cret-token-value",), cert_file=str(certs.server_cert),
                                   key_file=str(certs.server_key)))
    srv.start()
    srv.wait_ready(60)
    creds = channel_credentials(ca_file=str(certs.ca_cert))
    channel = grpc.secure_channel(f"localhost:{srv.port}", creds)
    stub = pb_grpc.InferenceStub(channel)
    # Sampled without a seed: the end-of-text id may come up within 4 tokens (it did once), so it is ignored.
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]),
                             sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, metadata=[("authorization", "Bearer wrong")]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = list(stub.Generate(req, metadata=[("authorization", "Bearer s3cret-token-value")]))
    assert ok[-1].finished and ok[-1].usage.completion_tokens == 4
    plain = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
    with pytest.raises(grpc.RpcError):
        plain.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    srv.drain(10)


def test_metrics_are_scraped_over_http(server):
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[9, 9]),
                                          sampling=pb.SamplingParams(max_tokens=3))))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "jaxinfer_time_to_first_token_seconds_count" in body
    assert "jaxinfer_kv_cache_usage_ratio" in body and 'jaxinfer_requests_total{status="length"}' in body
