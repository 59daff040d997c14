"""Shared pieces for engine tests: a tiny model with a byte tokenizer, and helpers
that drive an Engine the way a server would (requests arriving between steps)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import tokenizers

from checkpoints import loader
from jaxinfer.llm import LLM
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import Tokenizer

# Small shapes: 4 decode buckets x 3 prefill buckets, compiled once per engine.
SMALL = dict(max_num_seqs=16, max_num_batched_tokens=64, block_q=16, page_size=4, max_model_len=128)


def byte_level_backend() -> tokenizers.Tokenizer:
    """256 tokens, one per byte (GPT-2 byte-level alphabet, id = byte value), no merges."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return backend


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer as jaxinfer's Tokenizer; id 2 ends text."""
    return Tokenizer(byte_level_backend(), eos_token_id=2)


def _byte_of(char: str) -> int:
    from jaxinfer.tokenizer import _bytes_to_unicode
    return {v: k for k, v in _bytes_to_unicode().items()}[char]


def tiny_model(data_dir, name: str = "llama_gqa") -> loader.LoadedModel:
    model = loader.load(data_dir / "hf_tiny" / name, dtype=jnp.float32, mesh=make_mesh(), progress=False)
    return dataclasses.replace(model, tokenizer=byte_tokenizer())


def tiny_llm(data_dir, **config) -> LLM:
    return LLM.from_loaded(tiny_model(data_dir), **{**SMALL, "num_pages": 400, **config})


def random_prompts(rng: np.random.Generator, n: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    # Avoid id 2 (end of text) so prompts read as plain bytes.
    return [rng.integers(3, 256, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def run_alone(llm: LLM, prompt, params):
    """One request with the engine to itself."""
    return llm.generate([prompt], params, use_tqdm=False)[0]


def run_arriving(llm: LLM, prompts, params, rng: np.random.Generator, arrive_prob: float = 0.3,
                 abort_prob: float = 0.0) -> tuple[dict, set]:
    """Requests join at random steps (and, with abort_prob, some are aborted at random
    points). Returns (outputs by index, aborted indices)."""
    engine = llm.engine
    queue = list(range(len(prompts)))
    outputs, aborted, live = {}, set(), set()
    while queue or engine.has_unfinished():
        while queue and (rng.random() < arrive_prob or not engine.has_unfinished()):
            i = queue.pop(0)
            engine.add_request(f"a{i}", prompts[i], params[i])
            live.add(i)
        if abort_prob and live and rng.random() < abort_prob:
            i = int(rng.choice(sorted(live)))
            engine.abort(f"a{i}")
            aborted.add(i)
        for out in engine.step():
            i = int(out.request_id[1:])
            if out.finished:
                live.discard(i)
                if i not in aborted:
                    outputs[i] = out
    return outputs, aborted


__all__ = ["SMALL", "byte_level_backend", "byte_tokenizer", "tiny_model", "tiny_llm", "random_prompts",
           "run_alone", "run_arriving"]


def tiny_core(data_dir: str, **config):
    """An EngineCore over the tiny model: the factory a core process builds itself from."""
    import pathlib

    from jaxinfer.core.config import EngineConfig
    from jaxinfer.engine.engine_core import EngineCore

    return EngineCore(tiny_model(pathlib.Path(data_dir)), make_mesh(),
                      EngineConfig(**{**SMALL, "num_pages": 400, **config}))
