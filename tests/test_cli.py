"""The `jaxinfer` command line, run as a user runs it (a subprocess), on a tiny
model with a byte-level tokenizer."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from checkpoints import loader
from engine_fixtures import byte_level_backend
from jaxinfer.core.sampling_params import SamplingParams
from jaxinfer.llm import LLM
from jaxinfer.sharding import make_mesh


@pytest.fixture(scope="module")
def tiny_model(data_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("model") / "llama_gqa"
    shutil.copytree(data_dir / "hf_tiny" / "llama_gqa", target)
    byte_level_backend().save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    return target


def jaxinfer(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_streams_only_the_continuation_to_stdout(tiny_model):
    run = jaxinfer("generate", "hello world", "--model", str(tiny_model), "--max-tokens", "12")
    assert run.returncode == 0, run.stderr
    llm = LLM.from_loaded(loader.load(tiny_model, dtype=jnp.float32, mesh=make_mesh(), progress=False),
                          warmup=False, max_model_len=256, num_pages=128)
    result = llm.generate("hello world", SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    assert run.stdout == llm.tokenizer.decode(result.outputs[0].token_ids) + "\n"
    assert "generated tokens" in run.stderr  # the summary went to stderr


def test_seeded_sampling_from_the_cli_is_reproducible(tiny_model):
    flags = ["generate", "abc", "--model", str(tiny_model), "--max-tokens", "16",
             "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7"]
    first, second = jaxinfer(*flags), jaxinfer(*flags)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_convert_then_generate_from_the_orbax_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "converted"
    run = jaxinfer("convert", "--model", str(tiny_model), "--output", str(out))
    assert run.returncode == 0, run.stderr
    a = jaxinfer("generate", "xyz", "--model", str(tiny_model), "--max-tokens", "8")
    b = jaxinfer("generate", "xyz", "--model", str(out), "--max-tokens", "8")
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout


@pytest.mark.parametrize("case", [
    "missing_checkpoint", "corrupt_safetensors", "corrupt_config", "unknown_architecture",
    "pickle_checkpoint", "empty_prompt", "prompt_longer_than_context", "bad_temperature",
    "bad_top_p", "bad_max_tokens", "truncated_gguf", "bad_engine_setting", "bad_speculative_config", "speculative_config_not_json",
])
def test_bad_input_gives_a_clear_error_and_nonzero_exit(case, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    prompt, extra, expect = "hi", [], None
    if case == "missing_checkpoint":
        model, expect = tmp_path / "nope", "no such file or directory"
    elif case == "corrupt_safetensors":
        shard = model / "model-00002-of-00004.safetensors"
        shard.write_bytes(shard.read_bytes()[:1000])
        expect = "truncated or corrupt"
    elif case == "corrupt_config":
        (model / "config.json").write_text("{not json")
        expect = "config.json is not valid JSON"
    elif case == "unknown_architecture":
        cfg = json.loads((model / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
        (model / "config.json").write_text(json.dumps(cfg))
        expect = "unknown architecture"
    elif case == "pickle_checkpoint":
        model = tmp_path / "pytorch_model.bin"
        model.write_bytes(b"\x80\x04pickle")
        expect = "pickle-based checkpoints"
    elif case == "empty_prompt":
        prompt, expect = "", "prompt is empty"
    elif case == "prompt_longer_than_context":
        prompt, expect = "x" * 300, "the context holds 256"
    elif case == "bad_temperature":
        extra, expect = ["--temperature", "-1"], "temperature must be"
    elif case == "bad_top_p":
        extra, expect = ["--top-p", "1.5"], "top_p must be"
    elif case == "bad_max_tokens":
        extra, expect = ["--max-tokens", "0"], "max_tokens must be"
    elif case == "truncated_gguf":
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
        expect = "truncated or corrupt"
    elif case == "bad_engine_setting":  # named before the (missing) model is looked for
        model, extra, expect = tmp_path / "nope", ["--stream-interval", "0"], "stream_interval must be"
    elif case == "bad_speculative_config":
        model, extra = tmp_path / "nope", ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": -2}']
        expect = "num_speculative_tokens must be"
    elif case == "speculative_config_not_json":
        model, extra, expect = tmp_path / "nope", ["--speculative-config", "{method: ngram"], "not JSON"
    run = jaxinfer("generate", prompt, "--model", str(model), *extra)
    assert run.returncode != 0
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert "jaxinfer: error:" in run.stderr and expect in run.stderr, run.stderr
