"""Offline batch jobs (`run_batch`, `jaxinfer batch`): results equal `LLM.generate` of the same
requests; bad lines become error records with their line numbers and never stop the job;
an interrupted job (Ctrl-C, SIGTERM, a torn last line) resumes to the same results, every
id exactly once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from engine_fixtures import tiny_llm
from jaxinfer.batch_job import run_batch
from jaxinfer.cli import _batch_defaults, build_parser
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.errors import InputError

PROMPT_KEYS = {"prompt": "prompt", "messages": "messages", "token_ids": "prompt_token_ids"}


@pytest.fixture(scope="module")
def llm(data_dir):
    return tiny_llm(data_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(llm, rows, defaults):
    """Independent reference: LLM.generate of the same requests, keyed by id."""
    prompts, params = [], []
    for row in rows:
        key = next(k for k in PROMPT_KEYS if k in row)
        prompts.append({PROMPT_KEYS[key]: row[key]})
        fields = {k: v for k, v in row.items() if k not in ("id", "priority", key)}
        params.append(SamplingParams(**{**defaults, **fields}))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {row["id"]: out for row, out in zip(rows, outs)}


def assert_same(record, out):
    assert [s["token_ids"] for s in record["outputs"]] == [o.token_ids for o in out.outputs]
    assert [s["text"] for s in record["outputs"]] == [o.text for o in out.outputs]
    assert [s["finish_reason"] for s in record["outputs"]] == [o.finish_reason for o in out.outputs]
    assert record["prompt_tokens"] == len(out.prompt_token_ids)


def mixed_rows(count):
    """Prompt text, chats and token ids, with per-line sampling fields."""
    rows = []
    for i in range(count):
        if i % 3 == 0:
            row = {"id": f"p{i}", "prompt": f"Prompt number {i}:"}
        elif i % 3 == 1:
            row = {"id": i, "messages": [{"role": "user", "content": f"question {i}"}]}
        else:
            row = {"id": f"t{i}", "token_ids": [3 + (i * 7 + j) % 250 for j in range(1 + i % 11)]}
        if i % 4 == 1:
            row["max_tokens"] = 3 + i % 5
        if i % 5 == 2:
            row.update(n=2, temperature=1.0, seed=i)
        rows.append(row)
    return rows


DEFAULTS = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def test_results_equal_llm_generate_for_mixed_prompt_kinds_and_per_line_sampling(llm, tmp_path):
    rows = mixed_rows(24)
    rows[0].update(logprobs=2, prompt_logprobs=1)
    rows[3]["priority"] = -1
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", DEFAULTS, progress=False)
    assert (summary.done, summary.errors, summary.skipped, summary.interrupted) == (24, 0, 0, None)
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert len(records) == 24
    want = expected(llm, rows, DEFAULTS)
    for row in rows:
        assert_same(records[row["id"]], want[row["id"]])
        samples = records[row["id"]]["outputs"]
        assert len(samples) == row.get("n", 1)
        assert all(len(s["token_ids"]) == row.get("max_tokens", 6) for s in samples)
    # n=2 with temperature 1 gives two different samples.
    assert records["t2"]["outputs"][0]["token_ids"] != records["t2"]["outputs"][1]["token_ids"]
    # Logprobs as JSON: per position the sampled token (rank 1: greedy) and the runner-up.
    first = records["p0"]
    out = want["p0"].outputs[0]
    assert len(first["outputs"][0]["logprobs"]) == len(out.token_ids)
    for position, entry, token in zip(first["outputs"][0]["logprobs"], out.logprobs, out.token_ids):
        assert [(e["token_id"], e["rank"]) for e in position] == [(t, entry[t].rank) for t in entry]
        assert [e["rank"] for e in position] == [1, 2] and position[0]["token_id"] == token
        assert [e["logprob"] for e in position] == pytest.approx([lp.logprob for lp in entry.values()])
        assert all(isinstance(e["text"], str) for e in position)
    assert first["prompt_logprobs"][0] is None
    assert len(first["prompt_logprobs"]) == first["prompt_tokens"]
    assert "logprobs" not in records["t2"]["outputs"][0] and "prompt_logprobs" not in records["t2"]
    metrics = records["p3"]["metrics"]
    assert set(metrics) == {"queue_time", "time_to_first_token", "time_per_output_token", "e2e",
                            "preemptions"}
    assert 0 <= metrics["time_to_first_token"] <= metrics["e2e"]


def test_sampling_fields_not_given_keep_sampling_params_defaults(llm, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "abc", "ignore_eos": True}])
    run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", {}, progress=False)
    [record] = read_jsonl(tmp_path / "out.jsonl")
    assert len(record["outputs"][0]["token_ids"]) == SamplingParams().max_tokens
    # The CLI hands on only the sampling flags actually given.
    args = build_parser().parse_args(["batch", "--input", "i", "--output", "o", "--max-num-seqs", "4"])
    assert _batch_defaults(args) == {}
    args = build_parser().parse_args(["batch", "--input", "i", "--output", "o", "--max-tokens", "5",
                                      "--temperature", "0", "--stop", "x", "--stop", "y", "--ignore-eos"])
    assert _batch_defaults(args) == {"max_tokens": 5, "temperature": 0.0, "stop": ["x", "y"],
                                     "ignore_eos": True}


def test_malformed_lines_are_reported_with_line_numbers_and_the_rest_complete(llm, tmp_path, capsys):
    good = {"id": "ok1", "prompt": "fine"}
    lines = [
        good,                                                   # 1
        "{not json",                                            # 2
        "[1, 2]",                                               # 3
        {"prompt": "no id"},                                    # 4
        {"id": 1.5, "prompt": "float id"},                      # 5
        {"id": "ok1", "prompt": "duplicate"},                   # 6
        {"id": "none"},                                         # 7
        {"id": "two", "prompt": "a", "token_ids": [5]},         # 8
        {"id": "unknown", "prompt": "a", "temprature": 0.5},    # 9
        {"id": "temp", "prompt": "a", "temperature": -1},       # 10
        {"id": "long", "prompt": "x" * 200},                    # 11
        {"id": "vocab", "token_ids": [5, 256]},                 # 12
        "",                                                     # 13: blank, ignored
        {"id": "chat", "messages": [{"role": "user"}]},         # 14
        {"id": "surrogate", "prompt": "a\ud800"},               # 15
        {"id": "ok2", "token_ids": [7, 8, 9]},                  # 16
        {"id": "prio", "prompt": "a", "priority": "high"},      # 17
        {"id": "empty", "prompt": ""},                          # 18
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", DEFAULTS, progress=False)
    records = read_jsonl(tmp_path / "out.jsonl")
    errors = {r["line"]: r for r in records if "error" in r}
    expect = {2: (None, "not valid JSON"), 3: (None, "expected a JSON object"), 4: (None, "missing 'id'"),
              5: (None, "'id' must be"), 6: ("ok1", "duplicate id"), 7: ("none", "exactly one of"),
              8: ("two", "exactly one of"), 9: ("unknown", "'temprature'"),
              10: ("temp", "temperature must be"), 11: ("long", "the context holds 128"),
              12: ("vocab", "outside the vocabulary"), 14: ("chat", "chat message 0"),
              15: ("surrogate", "lone surrogate"), 17: ("prio", "'priority' must be"),
              18: ("empty", "prompt is empty")}
    assert {n: (r["id"], ) for n, r in errors.items()} == {n: (i, ) for n, (i, _) in expect.items()}
    err = capsys.readouterr().err
    for n, (_, message) in expect.items():
        assert message in errors[n]["error"], (n, errors[n])
        assert f"in.jsonl:{n}: " in err
    want = expected(llm, [good, lines[15]], DEFAULTS)
    done = {r["id"]: r for r in records if "error" not in r}
    assert set(done) == {"ok1", "ok2"}
    for request_id, out in want.items():
        assert_same(done[request_id], out)
    assert (summary.done, summary.errors, summary.lines) == (2, 15, 18)


def test_bad_defaults_fail_before_anything_runs(llm, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    with pytest.raises(InputError, match="top_p"):
        run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", {"top_p": 2.0}, progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_input_is_fed_as_the_engine_makes_room_not_read_all_at_once(llm, tmp_path, monkeypatch):
    from jaxinfer import batch_job
    monkeypatch.setattr(batch_job, "WINDOW_PER_SEQ", 1)  # at most 16 waiting
    rows = [{"id": i, "prompt": f"line {i}", "max_tokens": 1 + i % 4} for i in range(100)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    in_engine = []
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", DEFAULTS, progress=False,
                        on_record=lambda r: in_engine.append(len(llm.engine.requests)))
    assert summary.done == 100
    assert max(in_engine) <= 2 * llm.engine.config.max_num_seqs


class StopAfter:
    """on_record hook: interrupt the job after `k` records, as Ctrl-C or SIGTERM would."""

    def __init__(self, k, how):
        self.k, self.how, self.seen = k, how, 0

    def __call__(self, record):
        self.seen += 1
        if self.seen == self.k:
            if self.how == "exception":
                raise KeyboardInterrupt
            os.kill(os.getpid(), self.how)


@pytest.mark.parametrize("how", ["exception", signal.SIGTERM], ids=["KeyboardInterrupt", "SIGTERM"])
def test_interrupted_job_resumes_to_the_results_of_an_uninterrupted_run(llm, tmp_path, how):
    rows = mixed_rows(40)
    lines = [*rows[:5], "{torn", {"id": "p0", "prompt": "dup"}, *rows[5:]]
    write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    first = run_batch(llm, tmp_path / "in.jsonl", out, DEFAULTS, progress=False,
                      on_record=StopAfter(12, how))
    assert first.interrupted == ("SIGINT" if how == "exception" else "SIGTERM")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert not llm.engine.has_unfinished()  # in-flight requests were aborted and drained
    partial = read_jsonl(out)  # every line whole
    # A signal lets the step that just landed write its finished requests; nothing after.
    assert 12 <= len(partial) < len(lines) and first.done + first.errors == len(partial)
    second = run_batch(llm, tmp_path / "in.jsonl", out, DEFAULTS, progress=False)
    assert second.interrupted is None and second.skipped == len(partial)
    records = read_jsonl(out)
    assert len(records) == len(lines)
    done = [r for r in records if "error" not in r]
    assert sorted(map(str, (r["id"] for r in done))) == sorted(str(r["id"]) for r in rows)
    assert sorted((r["line"], r["id"]) for r in records if "error" in r) == [(6, None), (7, "p0")]
    want = expected(llm, rows, DEFAULTS)
    for r in done:
        assert_same(r, want[r["id"]])


def test_torn_last_line_is_cut_off_and_its_request_run_again(llm, tmp_path):
    rows = mixed_rows(9)
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_batch(llm, tmp_path / "in.jsonl", out, DEFAULTS, progress=False)
    text = out.read_text()
    torn_id = json.loads(text.splitlines()[-1])["id"]
    out.write_text(text[:-25])  # killed mid-write
    summary = run_batch(llm, tmp_path / "in.jsonl", out, DEFAULTS, progress=False)
    assert (summary.skipped, summary.done) == (8, 1)
    records = read_jsonl(out)
    assert sorted(map(str, (r["id"] for r in records))) == sorted(str(r["id"]) for r in rows)
    assert records[-1]["id"] == torn_id
    assert_same(records[-1], expected(llm, [r for r in rows if r["id"] == torn_id], DEFAULTS)[torn_id])


# ---- the command line, as a user runs it ----------------------------------------------------

CLI_ENGINE = ["--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--page-size", "16",
              "--max-model-len", "128", "--num-pages", "80"]


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    """The tiny model as a checkpoint directory with a byte-level tokenizer.json."""
    target = tmp_path_factory.mktemp("model") / "llama_gqa"
    shutil.copytree(data_dir / "hf_tiny" / "llama_gqa", target)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    return target


def jaxinfer_batch(model_dir, tmp_path, *extra):
    cmd = [sys.executable, "-m", "jaxinfer.cli", "batch", "--input", str(tmp_path / "in.jsonl"),
           "--output", str(tmp_path / "out.jsonl"), "--model", str(model_dir), *CLI_ENGINE,
           "--temperature", "0", "--ignore-eos", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    with open(tmp_path / "stderr.txt", "w") as err:  # a file: a full pipe would stall the job
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)


def finish(proc, tmp_path, timeout):
    proc.wait(timeout=timeout)
    return (tmp_path / "stderr.txt").read_text()


def test_cli_ctrl_c_exits_130_with_whole_lines_and_rerun_completes(model_dir, tmp_path):
    # One prompt throughout: greedy outputs are all equal, whichever run produced them.
    n = 300
    rows = [{"id": i, "prompt": "The same prompt", "max_tokens": 40} for i in range(n)]
    rows[7] = {"id": 7, "prompt": "The same prompt"}  # max_tokens from SamplingParams (no flag)
    rows[9] = {"id": 9, "prompt": "bad", "top_p": 0}
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = jaxinfer_batch(model_dir, tmp_path)
    deadline = time.monotonic() + 240
    while not (out.exists() and '"outputs"' in out.read_text()):  # a first result is in
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(finish(proc, tmp_path, 60)[-3000:])
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = finish(proc, tmp_path, 120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted by SIGINT" in err and "resumes" in err and "Traceback" not in err
    partial = read_jsonl(out)
    assert 1 <= len(partial) < n

    rerun = jaxinfer_batch(model_dir, tmp_path)
    err = finish(rerun, tmp_path, 240)
    assert rerun.returncode == 0, err[-3000:]
    assert f"{len(partial)} skipped" in err
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == list(range(n))
    assert [r["line"] for r in records if "error" in r] == [10]
    outputs = {(o["text"], tuple(o["token_ids"]), o["finish_reason"])
               for r in records if "error" not in r and r["id"] != 7 for o in r["outputs"]}
    assert len(outputs) == 1 and len(outputs.pop()[1]) == 40
    [seven] = [r for r in records if r["id"] == 7]
    assert len(seven["outputs"][0]["token_ids"]) == SamplingParams().max_tokens
