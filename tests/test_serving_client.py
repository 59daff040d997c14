"""serving.client and `jaxinfer client` against a real in-process server on the tiny test
model: what comes over the wire equals the offline API run on a second engine of the
same configuration."""

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

from engine_fixtures import tiny_llm
from jaxinfer import cli
from jaxinfer.core.sampling_params import SamplingParams
from serving.client import AsyncClient, Client
from serving.gen.jaxinfer.v1 import inference_pb2 as pb
from serving.server import SERVICE, VERSION, Security, Server

TIMEOUT = 60


@pytest.fixture(scope="module")
def offline(data_dir):
    return tiny_llm(data_dir, warmup=False)


@pytest.fixture(scope="module")
def server(data_dir):
    srv = Server(tiny_llm(data_dir, warmup=False).engine, warmup=False)
    srv.start()
    assert srv.wait_ready(60)
    yield srv
    srv.drain(10)


@pytest.fixture(scope="module")
def client(server):
    with Client(port=server.port, timeout=TIMEOUT) as c:
        yield c


def offline_run(llm, prompt, **sampling):
    return llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0].outputs[0]


def streamed(client, prompt, **sampling):
    """(token ids, text deltas, last response) of one request."""
    ids, deltas, last = [], [], None
    for last in client.generate(prompt, **sampling):
        for o in last.outputs:
            ids.extend(o.token_ids)
            deltas.append(o.text)
    return ids, deltas, last


@pytest.mark.parametrize("sampling", [
    dict(max_tokens=24, temperature=0.0, ignore_eos=True),
    dict(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_streamed_tokens_and_text_equal_offline_generate(client, offline, sampling):
    expected = offline_run(offline, "hello world", **sampling)
    ids, deltas, last = streamed(client, "hello world", **sampling)
    assert ids == expected.token_ids
    assert "".join(deltas) == expected.text
    assert last.finished and last.outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len("hello world")  # one token per byte
    assert last.usage.completion_tokens == 24


def test_text_deltas_with_a_stop_string_concatenate_to_the_offline_text(client, offline):
    free = offline_run(offline, "abc", max_tokens=40, temperature=0.0, ignore_eos=True).text
    stop = free[10:12]  # a stop string the greedy continuation is known to reach
    expected = offline_run(offline, "abc", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    assert expected.finish_reason == "stop"
    ids, deltas, last = streamed(client, "abc", max_tokens=40, temperature=0.0, ignore_eos=True, stop=stop)
    assert "".join(deltas) == expected.text
    assert ids == expected.token_ids
    assert last.outputs[0].finish_reason == pb.FINISH_REASON_STOP
    assert last.outputs[0].stop_string == stop


def test_token_id_and_chat_prompts_equal_offline_generate(client, offline):
    sampling = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = [104, 105, 106, 32, 107]
    assert client.generate_text(ids, **sampling)[0] == offline_run(offline, ids, **sampling).text
    chat = [{"role": "user", "content": "hi there"}]
    text, last = client.generate_text(chat, **sampling)
    assert text == offline_run(offline, {"messages": chat}, **sampling).text
    assert last.usage.prompt_tokens == len(client.tokenize(chat))


def test_unset_sampling_fields_take_the_server_defaults(client, offline):
    # SamplingParams' default max_tokens (16) applies when the client leaves it unset.
    text, last = client.generate_text("xyz", temperature=0.0, ignore_eos=True, seed=None)
    assert last.usage.completion_tokens == SamplingParams().max_tokens
    assert text == offline_run(offline, "xyz", temperature=0.0, ignore_eos=True).text


def test_tokenize_equals_the_tokenizer(client, offline):
    tok = offline.tokenizer
    assert client.tokenize("héllo, world") == tok.encode("héllo, world")
    assert client.tokenize("abc", add_special_tokens=False) == tok.encode("abc", add_special_tokens=False)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert client.tokenize(chat) == tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)


def test_model_and_server_info_describe_the_served_engine(client, server, offline):
    info = client.model_info()
    cfg = offline.config
    assert (info.architecture, info.vocab_size, info.context_length) == (cfg.architecture, cfg.vocab_size, 128)
    assert info.dtype == "float32" and info.quantization == "none" and info.num_params > 0
    assert info.limits.max_prompt_tokens == 127 and info.limits.max_total_tokens == 128
    s = client.server_info()
    assert s.version == VERSION and not s.draining and s.uptime_seconds > 0
    assert s.kv_cache_pages == server.engine.scheduler.pool.num_pages - 1


def test_health_reports_serving(client):
    assert client.health() == "SERVING"
    assert client.health(SERVICE) == "SERVING"


def test_abort_ends_the_stream_with_finish_reason_abort(client):
    stream = client.generate("abort me", max_tokens=110, temperature=0.0, ignore_eos=True, request_id="to-abort")
    first = next(stream)
    assert client.abort("to-abort") is True
    rest = list(stream)
    last = rest[-1] if rest else first
    assert last.finished and last.outputs[0].finish_reason == pb.FINISH_REASON_ABORT
    assert sum(len(o.token_ids) for r in [first, *rest] for o in r.outputs) < 110
    assert client.abort("no-such-request") is False


def test_async_client_runs_concurrent_streams_like_the_offline_api(server, offline):
    prompts = ["one", "two two", "three three three", "four"]
    sampling = dict(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    expected = [offline_run(offline, p, **sampling).text for p in prompts]

    async def main():
        async with AsyncClient(port=server.port, timeout=TIMEOUT) as c:
            assert await c.health() == "SERVING"
            assert (await c.model_info()).vocab_size == offline.config.vocab_size
            return await asyncio.gather(*(c.generate_text(p, **sampling) for p in prompts))

    assert [text for text, _ in asyncio.run(main())] == expected


def test_unknown_sampling_field_fails_before_sending(client):
    with pytest.raises(TypeError, match="temprature"):
        client.generate_text("x", temprature=0.5)


def test_token_and_tls_reach_a_guarded_server(offline, tmp_path):
    security_lib = pytest.importorskip("serving.security")
    try:
        certs = security_lib.make_test_certificates(tmp_path)
    except Exception as e:  # no usable openssl here
        pytest.skip(f"no test certificates: {e}")
    token = "client-test-token-0123456789"
    srv = Server(offline.engine, warmup=False, security=Security(
        tokens=(token,), cert_file=str(certs.server_cert), key_file=str(certs.server_key)))
    srv.start()
    try:
        assert srv.wait_ready(60)
        with Client("127.0.0.1", srv.port, ca_file=certs.ca_cert, timeout=TIMEOUT) as anonymous:
            assert anonymous.health() == "SERVING"  # health checks need no token
            with pytest.raises(grpc.RpcError) as e:
                anonymous.model_info()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client("127.0.0.1", srv.port, ca_file=certs.ca_cert, token=token, timeout=TIMEOUT) as c:
            text, _ = c.generate_text("guarded", max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(text) > 0
    finally:
        srv.drain(10)  # the engine is the offline fixture's: free it again


def test_client_cli_reports_a_grpc_error_on_one_stderr_line(server, capsys):
    rc = cli.main(["client", "x", "--port", str(server.port), "--temperature", "-1"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    line, = [ln for ln in captured.err.splitlines() if ln.startswith("jaxinfer: error:")]
    assert line.startswith("jaxinfer: error: INVALID_ARGUMENT: ") and "temperature" in line


def test_client_cli_streams_the_offline_text_to_stdout(server, offline):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONIOENCODING="utf-8")
    env.pop("JAXINFER_TOKEN", None)
    run = subprocess.run([sys.executable, "-m", "jaxinfer.cli", "client", "hello world", "--port", str(server.port),
                          "--max-tokens", "20", "--ignore-eos"], capture_output=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr.decode()
    expected = offline_run(offline, "hello world", max_tokens=20, temperature=0.0, ignore_eos=True).text
    assert run.stdout.decode("utf-8") == expected + "\n"  # bytes: no newline translation
