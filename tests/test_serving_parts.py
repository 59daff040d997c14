"""The server's parts that need no engine: bearer-token auth, TLS, Prometheus metrics, JSON logs.

gRPC tests run a real grpc.aio server on 127.0.0.1:0 with the standard health service and a
trivial bytes-in/bytes-out service (test.Echo: unary Say, server-streaming Count).
"""

import asyncio
import io
import json
import logging
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer.errors import ConfigError
from jaxinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from serving import logs, prometheus, security

TOKEN = "s3cr3t-token-value-0123456789"
TIMEOUT = 10


# ---- a small gRPC server --------------------------------------------------------------------


def _echo_handler(calls: list):
    async def say(request: bytes, context) -> bytes:
        calls.append("Say")
        return b"hi:" + request

    async def count(request: bytes, context):
        calls.append("Count")
        for i in range(3):
            yield bytes([i])

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    })


async def _start_server(interceptors=(), credentials=None):
    calls = []
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_echo_handler(calls),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port, calls


async def _say(channel, metadata=None) -> bytes:
    return await channel.unary_unary("/test.Echo/Say")(b"x", metadata=metadata, timeout=TIMEOUT)


async def _count(channel, metadata=None) -> list[bytes]:
    return [m async for m in channel.unary_stream("/test.Echo/Count")(b"", metadata=metadata, timeout=TIMEOUT)]


async def _check_health(channel):
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=TIMEOUT)
    return response.status


def _auth(token):
    return (("authorization", f"Bearer {token}"),)


# ---- bearer token ---------------------------------------------------------------------------


def test_bearer_token_admits_the_right_token_on_unary_and_streaming_methods():
    async def main():
        server, port, calls = await _start_server([security.BearerTokenInterceptor(TOKEN)])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _say(channel, _auth(TOKEN)) == b"hi:x"
                assert await _count(channel, _auth(TOKEN)) == [b"\0", b"\1", b"\2"]
                # The scheme is case-insensitive (RFC 6750).
                assert await _say(channel, (("authorization", f"bearer {TOKEN}"),)) == b"hi:x"
        finally:
            await server.stop(None)
        assert calls == ["Say", "Count", "Say"]

    asyncio.run(main())


@pytest.mark.parametrize("metadata", [
    None,
    _auth("wrong-token"),
    _auth(TOKEN[:-1]),
    _auth(TOKEN + "x"),
    (("authorization", TOKEN),),  # no scheme
    (("authorization", f"Basic {TOKEN}"),),
    (("x-api-key", TOKEN),),
], ids=["missing", "wrong", "prefix", "longer", "no-scheme", "basic-scheme", "other-header"])
def test_bearer_token_refuses_missing_or_wrong_tokens_with_unauthenticated(metadata, caplog):
    async def main():
        server, port, calls = await _start_server([security.BearerTokenInterceptor(TOKEN)])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for call in (_say, _count):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call(channel, metadata)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert e.value.details() == "missing or invalid bearer token"
        finally:
            await server.stop(None)
        assert calls == []  # the servicer never ran

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text


def test_health_check_is_reachable_without_a_token():
    async def main():
        server, port, _ = await _start_server([security.BearerTokenInterceptor(TOKEN)])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _check_health(channel) == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _say(channel)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_exempt_set_can_be_emptied_so_health_needs_the_token_too():
    async def main():
        server, port, _ = await _start_server([security.BearerTokenInterceptor(TOKEN, exempt=set())])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _check_health(channel)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_empty_bearer_token_is_a_config_error():
    with pytest.raises(ConfigError, match="empty"):
        security.BearerTokenInterceptor("")


# ---- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return security.make_test_certificates(tmp_path_factory.mktemp("certs"))


def test_tls_end_to_end_with_generated_certificates(certs):
    async def main():
        server, port, _ = await _start_server(
            [security.BearerTokenInterceptor(TOKEN)],
            security.server_credentials(certs.server_cert, certs.server_key))
        try:
            creds = security.channel_credentials(ca_file=certs.ca_cert)
            for host in ("127.0.0.1", "localhost"):
                async with grpc.aio.secure_channel(f"{host}:{port}", creds) as channel:
                    assert await _say(channel, _auth(TOKEN)) == b"hi:x"
                    assert await _check_health(channel) == health_pb2.HealthCheckResponse.SERVING
            # A client that trusts only the system roots must not accept the test CA's certificate.
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", security.channel_credentials()) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _say(channel, _auth(TOKEN))
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_mutual_tls_admits_a_client_certificate_and_refuses_a_client_without_one(certs):
    async def main():
        server, port, calls = await _start_server(
            credentials=security.server_credentials(certs.server_cert, certs.server_key,
                                                    client_ca_file=certs.ca_cert))
        try:
            with_cert = security.channel_credentials(certs.ca_cert, certs.client_cert, certs.client_key)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", with_cert) as channel:
                assert await _say(channel) == b"hi:x"
            without_cert = security.channel_credentials(certs.ca_cert)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", without_cert) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _say(channel)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)
        assert calls == ["Say"]

    asyncio.run(main())


def test_tls_file_errors_name_the_file_and_never_show_its_contents(certs, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="nope.pem.*does not exist"):
        security.server_credentials(missing, certs.server_key)
    with pytest.raises(ConfigError, match="is not a regular file"):
        security.channel_credentials(ca_file=tmp_path)
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("hunter2-private-material")
    with pytest.raises(ConfigError, match="key.txt.*not PEM") as e:
        security.server_credentials(certs.server_cert, not_pem)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="client CA file .*nope.pem"):
        security.server_credentials(certs.server_cert, certs.server_key, client_ca_file=missing)
    with pytest.raises(ConfigError, match="both or neither"):
        security.channel_credentials(certs.ca_cert, cert_file=certs.client_cert)


# ---- Prometheus -----------------------------------------------------------------------------


def _output(finish_reason, prompt_len, sample_lens, *, scheduled=0.01, first=0.05, finished=None,
            arrival=1000.0):
    """A finished RequestOutput with the given timings (seconds after arrival; None: never)."""
    outputs = [CompletionOutput(index=i, text="", token_ids=list(range(n)), cumulative_logprob=None,
                                logprobs=None, finish_reason=finish_reason) for i, n in enumerate(sample_lens)]
    at = lambda t: None if t is None else arrival + t  # noqa: E731
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=list(range(prompt_len)),
                         prompt_logprobs=None, outputs=outputs, finished=True,
                         metrics=RequestMetrics(arrival, at(scheduled), at(first), at(finished)))


def _scrape(port) -> dict:
    """{(sample name, sorted labels): value} from the HTTP endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics():
    m = prometheus.ServerMetrics()
    server, thread = m.start_http(0)
    assert m.http_port == server.server_port > 0 and thread.is_alive()
    yield m
    m.stop_http()


def test_scraped_metrics_match_the_observed_requests(metrics):
    # stop: 11 tokens, first at 0.05 s, then one every 0.02 s -> finished at 0.25 s.
    metrics.observe_finished(_output("stop", 5, [11], finished=0.25))
    # length, n=2 (4 and 2 tokens): TPOT over the longest sample, (2.0 - 0.5) / 3.
    metrics.observe_finished(_output("length", 3, [4, 2], scheduled=0.2, first=0.5, finished=2.0))
    # aborted while queued: no tokens, never scheduled.
    metrics.observe_finished(_output("abort", 7, [0], scheduled=None, first=None, finished=3.0))
    metrics.count("rejected")
    metrics.count("rejected")
    metrics.count("error")

    got = _scrape(metrics.http_port)
    for status, n in {"stop": 1, "length": 1, "abort": 1, "rejected": 2, "error": 1}.items():
        assert got[("jaxinfer_requests_total", (("status", status),))] == n
    assert got[("jaxinfer_prompt_tokens_total", ())] == 5 + 3 + 7
    assert got[("jaxinfer_generation_tokens_total", ())] == 11 + 6

    ttft = "jaxinfer_time_to_first_token_seconds"
    assert got[(ttft + "_count", ())] == 2
    assert got[(ttft + "_sum", ())] == pytest.approx(0.55)
    assert got[(ttft + "_bucket", (("le", "0.04"),))] == 0
    assert got[(ttft + "_bucket", (("le", "0.06"),))] == 1
    assert got[(ttft + "_bucket", (("le", "0.5"),))] == 2
    tpot = "jaxinfer_time_per_output_token_seconds"
    assert got[(tpot + "_count", ())] == 2
    assert got[(tpot + "_sum", ())] == pytest.approx(0.02 + 1.5 / 3)
    queue = "jaxinfer_queue_time_seconds"
    assert got[(queue + "_count", ())] == 2
    assert got[(queue + "_sum", ())] == pytest.approx(0.21)
    e2e = "jaxinfer_e2e_request_latency_seconds"
    assert got[(e2e + "_count", ())] == 3
    assert got[(e2e + "_sum", ())] == pytest.approx(0.25 + 2.0 + 3.0)
    assert got[(e2e + "_bucket", (("le", "+Inf"),))] == 3


def test_engine_gauges_are_read_from_the_source_at_each_scrape(metrics):
    assert ("jaxinfer_num_requests_running", ()) not in _scrape(metrics.http_port)  # no source yet
    stats = {"running": 3, "waiting": 5, "kv_usage": 0.25, "kv_pages": 64, "prefix_cache_hit_rate": 0.5,
             "preemptions": 2, "active_streams": 4, "requests": {"stop": 1}}
    metrics.set_engine_source(lambda: stats)
    got = _scrape(metrics.http_port)
    assert got[("jaxinfer_num_requests_running", ())] == 3
    assert got[("jaxinfer_num_requests_waiting", ())] == 5
    assert got[("jaxinfer_kv_cache_usage_ratio", ())] == 0.25
    assert got[("jaxinfer_prefix_cache_hit_rate", ())] == 0.5
    assert got[("jaxinfer_preemptions_total", ())] == 2
    assert got[("jaxinfer_active_streams", ())] == 4
    stats.update(running=1, waiting=0, active_streams=1)
    got = _scrape(metrics.http_port)
    assert got[("jaxinfer_num_requests_running", ())] == 1
    assert got[("jaxinfer_num_requests_waiting", ())] == 0
    assert got[("jaxinfer_active_streams", ())] == 1


def test_failing_engine_source_leaves_gauges_out_but_the_scrape_succeeds(metrics):
    def broken():
        raise RuntimeError("engine gone")

    metrics.observe_finished(_output("stop", 2, [3], finished=0.1))
    metrics.set_engine_source(broken)
    got = _scrape(metrics.http_port)
    assert got[("jaxinfer_requests_total", (("status", "stop"),))] == 1
    assert ("jaxinfer_num_requests_running", ()) not in got


def test_two_server_metrics_in_one_process_keep_separate_counts():
    a, b = prometheus.ServerMetrics(), prometheus.ServerMetrics()
    a.count("error")
    assert b'jaxinfer_requests_total{status="error"} 1.0' in a.exposition()
    assert b'jaxinfer_requests_total{status="error"} 0.0' in b.exposition()


def test_count_refuses_an_unknown_status():
    with pytest.raises(ValueError, match="unknown request status"):
        prometheus.ServerMetrics().count("timeout")


# ---- JSON logs ------------------------------------------------------------------------------


@pytest.fixture
def log_lines():
    """Configure JSON logging into a buffer; returns a function giving the parsed lines."""
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = logs.configure(json=True, level="DEBUG", stream=buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)
    logs._handler = None


def test_json_log_lines_carry_the_message_and_extra_fields(log_lines):
    log = logging.getLogger("serving.test")
    log.info("request %s finished", "r1", extra={"request_id": "r1", "status": "stop", "prompt_tokens": 12,
                                                 "token_ids": [1, 2]})
    log.warning("plain")
    first, second = log_lines()
    assert first["msg"] == "request r1 finished"
    assert (first["level"], first["logger"]) == ("INFO", "serving.test")
    assert (first["request_id"], first["status"], first["prompt_tokens"], first["token_ids"]) == \
        ("r1", "stop", 12, [1, 2])
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert second["level"] == "WARNING" and "request_id" not in second


def test_json_logs_redact_secret_fields_and_bearer_credentials(log_lines):
    logging.getLogger("serving.test").info(
        "got header Bearer %s from client", TOKEN,
        extra={"token": TOKEN, "bearer_token": TOKEN, "authorization": f"Bearer {TOKEN}", "password": "pw",
               "client_secret": "cs", "apiKey": "k", "headers": {"Authorization": TOKEN, "user-agent": "ua"},
               "prompt_tokens": 3, "max_tokens": 9, "note": "missing or invalid bearer token"})
    (line,) = log_lines()
    for key in ("token", "bearer_token", "authorization", "password", "client_secret", "apiKey"):
        assert line[key] == "[redacted]", key
    assert line["headers"] == {"Authorization": "[redacted]", "user-agent": "ua"}
    assert line["msg"] == "got header Bearer [redacted] from client"
    assert (line["prompt_tokens"], line["max_tokens"]) == (3, 9)
    assert line["note"] == "missing or invalid bearer token"  # prose is not a credential
    assert TOKEN not in json.dumps(line)


def test_json_logs_include_the_traceback_of_an_exception(log_lines):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("serving.test").exception("failed", extra={"request_id": "r2"})
    (line,) = log_lines()
    assert line["level"] == "ERROR" and line["request_id"] == "r2"
    assert "ValueError: boom" in line["exc"]
