"""Text in, text out: a loaded model, its tokenizer and a Generator, sized on demand.

The CLI and the benchmarks build on this; the offline batch API of the engine
replaces it for large workloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from checkpoints import loader
from jaxinfer.batch import next_bucket
from jaxinfer.errors import InputError
from jaxinfer.generate import GenerationResult, Generator
from jaxinfer.kv_cache import pages_needed
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingParams
from jaxinfer.sharding import make_mesh

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_dtype_name() -> str:
    """bfloat16 on accelerators; float32 on the CPU, where bf16 matmuls are slow."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class TextGenerator:
    def __init__(self, model: loader.LoadedModel, mesh: Mesh, *, page_size: int = 16,
                 max_context: int | None = None):
        if page_size < 1 or page_size & (page_size - 1):
            raise InputError(f"page size must be a power of two, got {page_size}")
        self.mesh = mesh
        self.model = model
        self.tokenizer = self.model.tokenizer
        self.page_size = page_size
        self.max_context = min(max_context or self.model.config.max_position_embeddings,
                               self.model.config.max_position_embeddings)
        self._generator: Generator | None = None

    @classmethod
    def load(cls, model: str | None = None, *, dtype: str | None = None, tensor_parallel: int = 1,
             progress: bool = True, **kwargs) -> "TextGenerator":
        """Load a checkpoint (None: the default model) onto a tensor-parallel mesh."""
        dtype_name = dtype or default_dtype_name()
        if dtype_name not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
        mesh = make_mesh(tensor=tensor_parallel)
        loaded = loader.load(model, dtype=DTYPES[dtype_name], mesh=mesh, progress=progress)
        return cls(loaded, mesh, **kwargs)

    @property
    def config(self):
        return self.model.config

    def eos_token_ids(self) -> frozenset[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return frozenset(ids)

    def encode_prompt(self, prompt: str | Sequence[dict], chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"{self.model.source} has no tokenizer: pass token ids instead of text")
        if chat:
            messages = prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            # The template already holds any BOS/special tokens it wants.
            return self.tokenizer.encode(text, add_special_tokens=False)
        if not isinstance(prompt, str):
            raise InputError("a prompt must be a string (or chat messages with chat=True)")
        if not prompt:
            raise InputError("the prompt is empty")
        return self.tokenizer.encode(prompt)

    def generator_for(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Generator:
        """A Generator whose page pool fits these requests (re-made, larger, when not)."""
        need = 1 + sum(pages_needed(min(len(p) + sp.max_tokens, self.max_context), self.page_size)
                       for p, sp in zip(prompts, params))
        if self._generator is None or self._generator.allocator.num_pages < need:
            runner = ModelRunner(self.config, self.model.graphdef, self.model.state, self.mesh,
                                 num_pages=next_bucket(need, 64), page_size=self.page_size)
            self._generator = Generator(runner, self.eos_token_ids(), self.max_context)
        return self._generator

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                     on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        generator = self.generator_for(prompts, params)
        return generator.generate(prompts, params, on_token)  # validates the prompts
