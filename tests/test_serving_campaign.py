"""scripts/serving_campaign.py keeps being run: its quick campaign passes against a real
`jaxinfer serve` subprocess of the tiny model, and each of its checks fires on a fabricated
failure, so its PASS means something."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine_fixtures import byte_tokenizer
from jaxinfer.tokenizer import CHATML_TEMPLATE
from serving.gen.jaxinfer.v1 import inference_pb2 as pb

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import campaign_checks as checks  # noqa: E402

# The engine shapes of tests/engine_fixtures.SMALL, so the server starts fast.
ENGINE_FLAGS = ["--max-num-seqs", "16", "--max-num-batched-tokens", "64", "--max-model-len", "128",
                "--page-size", "4"]


@pytest.fixture
def tiny_model_dir(data_dir, tmp_path) -> Path:
    """The tiny llama with the byte tokenizer and a ChatML template, as `jaxinfer serve --model` takes it."""
    model = tmp_path / "tiny"
    shutil.copytree(data_dir / "hf_tiny" / "llama_gqa", model)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save(model)
    return model


# Budget: 65 s on 2 CPU cores with a warm XLA cache (server start 12 s; hostile 15 s; storm, races
# and load 10 s; the batch job started twice 27 s), 90 s with a cold one (measured); limit 120 s.
def test_the_quick_campaign_passes_against_a_real_server(tiny_model_dir, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the campaign's work files land in tmp_path
    # The suite's 8 simulated devices are for the sharding tests; the campaign runs as users do.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    log = tmp_path / "server.log"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "serving_campaign.py"), "--quick",
                           "--model", str(tiny_model_dir), *ENGINE_FLAGS, "--log", str(log)],
                          capture_output=True, text=True, timeout=600, env=env)
    report = proc.stdout + "\n--- stderr (tail) ---\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "PASS", report
    for phase in ("hostile", "cancel storm", "reuse race", "concurrent load", "batch kill -9", "server log"):
        row = next(line for line in lines if line.startswith(f"| {phase} "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[1]) > 0 and cells[-1] == "ok", row  # it ran, and nothing failed
    assert log.stat().st_size > 0


# ---- each check fires on a fabricated failure -----------------------------------------------------


def test_status_check_refuses_crashes_transport_errors_and_long_messages():
    check = checks.status_problem
    assert check("INVALID_ARGUMENT", "invalid sampling parameters: n must be ...") is None
    assert check("OK", "") is None
    for code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert check(code, "Exception calling application") is not None, code
    assert check("UNAVAILABLE", "the server is draining", draining=True) is None
    # gRPC's own RESOURCE_EXHAUSTED: a reply or its trailers too big to send.
    assert check("RESOURCE_EXHAUSTED", "SERVER: Sent message larger than max (4479805 vs. 4194304)") is not None
    assert check("RESOURCE_EXHAUSTED", "Stream removed (received metadata size exceeds soft limit "
                                       "(16061 vs. 8192))") is not None
    # ... but the answer to a request over max_message_bytes, and the server's own words, are fine.
    assert check("RESOURCE_EXHAUSTED", "Received message larger than max (5000 vs. 4000)",
                 request_bytes=5000, max_message_bytes=4000) is None
    assert check("RESOURCE_EXHAUSTED", "the reply would exceed max_message_bytes (4194304)") is None
    assert check("INVALID_ARGUMENT", "x" * 2049) is not None
    assert check("OK", "", expected=frozenset({"INVALID_ARGUMENT"})) is not None
    assert check("RESOURCE_EXHAUSTED", "max_concurrent_streams (1) reached",
                 expected=frozenset({"INVALID_ARGUMENT"})) is not None


def _response(index, tokens, text, finish=0, prompt_tokens=None, stop_string=None):
    r = pb.GenerateResponse(outputs=[pb.CompletionDelta(index=index, token_ids=tokens, text=text,
                                                        finish_reason=finish)])
    if stop_string is not None:
        r.outputs[0].stop_string = stop_string
    if prompt_tokens is not None:
        r.finished = True
        r.usage.prompt_tokens = prompt_tokens
    return r


def _completion(tokens, text, finish=pb.FINISH_REASON_LENGTH, prompt_tokens=5):
    half = len(tokens) // 2
    return checks.Completion.from_responses([
        _response(0, tokens[:half], text[:half]),
        _response(0, tokens[half:], text[half:], finish, prompt_tokens)])


def test_a_stream_that_differs_from_its_solo_run_is_a_mismatch():
    want = _completion([10, 11, 12, 13], "abcd")
    assert checks.compare(_completion([10, 11, 12, 13], "abcd"), want) is None
    assert "tokens differ at 2" in checks.compare(_completion([10, 11, 99, 13], "abcd"), want)
    assert "finish" in checks.compare(_completion([10, 11, 12, 13], "abcd", pb.FINISH_REASON_STOP), want)
    assert "prompt_tokens" in checks.compare(_completion([10, 11, 12, 13], "abcd", prompt_tokens=9), want)
    assert "text" in checks.compare(_completion([10, 11, 12, 13], "abcX"), want)
    unfinished = checks.Completion.from_responses([_response(0, [10], "a")])
    assert "finished" in checks.compare(unfinished, want)
    stopped = checks.Completion.from_responses([_response(0, [10], "a", pb.FINISH_REASON_STOP, 5, "\n")])
    assert checks.compare(stopped, stopped) is None and stopped.samples[0].stop == "\n"
    two = checks.Completion.from_responses([_response(1, [7], "x"), _response(0, [10], "a", 2, 5)])
    assert "samples" in checks.compare(two, checks.Completion.from_responses([_response(0, [10], "a", 2, 5)]))


def test_client_a_output_on_client_b_stream_is_a_cross_client_delivery():
    a_solo = _completion([50, 51, 52, 53, 54, 55], "uvwxyz", prompt_tokens=24)
    b_solo = _completion([70, 71, 72, 73], "abcd", prompt_tokens=11)
    kwargs = dict(a_solo=a_solo, a_prompt_tokens=24, b_solo=b_solo)
    assert checks.cross_delivery(b_solo, **kwargs, b_aborted_by_someone=False) is None
    # What the unfixed server sent B: A's tokens so far, A's abort, A's prompt size.
    leaked = _completion([50, 51], "uv", pb.FINISH_REASON_ABORT, prompt_tokens=24)
    evidence = checks.cross_delivery(leaked, **kwargs, b_aborted_by_someone=False)
    assert "prompt size" in evidence and "A's" in evidence and "abort" in evidence
    # B aborted by client C (a failure of its own): its abort is not evidence of A's output.
    cut = _completion([70, 71], "ab", pb.FINISH_REASON_ABORT, prompt_tokens=11)
    assert checks.cross_delivery(cut, **kwargs, b_aborted_by_someone=True) is None
    assert checks.cross_delivery(cut, **kwargs, b_aborted_by_someone=False) is not None


def test_a_server_not_back_to_idle_and_a_miscounted_rejection_are_failures():
    idle_info = {"running": 0, "queued": 0, "active_streams": 0, "kv_cache_usage": 0.0}
    idle_metrics = checks.parse_metrics(
        "# HELP x\njaxinfer_num_requests_running 0.0\njaxinfer_num_requests_waiting 0.0\n"
        "jaxinfer_kv_cache_usage_ratio 0.0\n" + checks.REJECTED + " 4.0\n")
    assert checks.idle_problems(idle_info, idle_metrics, idle_kv=0.0) == []
    assert idle_metrics[checks.REJECTED] == 4.0
    assert checks.idle_problems({**idle_info, "running": 1}, idle_metrics, 0.0) == ["GetServerInfo running=1"]
    assert checks.idle_problems({**idle_info, "kv_cache_usage": 0.25}, idle_metrics, 0.0)
    leaky = {**idle_metrics, "jaxinfer_kv_cache_usage_ratio": 0.1, "jaxinfer_num_requests_waiting": 2.0}
    assert len(checks.idle_problems(idle_info, leaky, 0.0)) == 2
    assert checks.idle_problems(idle_info, {}, 0.0)  # gauges missing from /metrics
    assert checks.rejected_problem(4.0, 0) is not None  # the storm that counted 4 refusals nobody saw
    assert checks.rejected_problem(3.0, 3) is None


def _record(request_id, tokens, text="t", finish="length"):
    return {"id": request_id, "outputs": [{"index": 0, "text": text, "token_ids": tokens,
                                           "finish_reason": finish, "stop_reason": None}],
            "prompt_tokens": 3}


def test_batch_output_checks_find_duplicates_torn_lines_gaps_and_wrong_results():
    ref = {"a": checks.Completion.from_record(_record("a", [1, 2])),
           7: checks.Completion.from_record(_record(7, [3], "u", "stop"))}
    good = [_record("a", [1, 2]), {"id": None, "line": 2, "error": "not valid JSON"}, _record(7, [3], "u", "stop")]

    def run(records, tail=b""):
        data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail
        return checks.check_batch_output(data, ["a", 7], 2, ref)

    assert run(good) == ([], 2, 0)
    assert any("appears 2 times" in p for p in run(good + [_record(7, [3], "u", "stop")])[0])
    assert any("torn" in p for p in run(good, tail=b'{"id": "a", "out')[0])
    assert any("no result" in p for p in run(good[:2])[0])
    assert any("malformed line 2" in p for p in run([good[0], good[2]])[0])
    problems, _, mismatched = run([_record("a", [1, 9]), good[1], good[2]])
    assert mismatched == 1 and any("tokens differ" in p for p in problems)
    assert any("not in the input" in p for p in run(good + [_record("zzz", [1])])[0])


def test_log_check_counts_progress_bars_raw_warnings_and_tracebacks():
    good = json.dumps({"ts": "t", "level": "INFO", "logger": "x", "msg": "listening"})
    bad = json.dumps({"level": "ERROR", "msg": "boom", "exc": "Traceback (most recent call last): ..."})
    data = (b"loading weights: 0 tensors [00:00]\rloading weights: 21 tensors [00:00]\n" + good.encode()
            + b"\n/x/sampling.py:292: RuntimeWarning: overflow encountered in cast\n" + bad.encode() + b"\n\n")
    counts = checks.check_log(data)
    assert (counts.lines, counts.not_json, counts.tracebacks, counts.errors) == (5, 3, 1, 1)
    assert [kind for kind, _ in checks.log_problems(counts)] == ["3 log lines are not JSON",
                                                                 "1 log lines hold a traceback"]
    assert checks.log_problems(checks.check_log(good.encode() + b"\n")) == []


def test_one_failure_in_any_phase_makes_the_verdict_fail():
    phases = [checks.Phase("hostile", sent=3), checks.Phase("reuse race", sent=2)]
    assert checks.passed(phases) and checks.render(phases).splitlines()[-1] == "PASS"
    phases[1].cross_client = 1
    phases[1].fail("cross-client delivery", "race-0-2: usage.prompt_tokens 24 is A's prompt size")
    text = checks.render(phases)
    assert not checks.passed(phases)
    assert text.splitlines()[-1] == "FAIL: 1 failures in 1 of 2 phases"
    assert "FAIL reuse race: cross-client delivery x1" in text
