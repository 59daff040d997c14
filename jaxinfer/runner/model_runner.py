"""The model runner: device state and the jitted functions that change it.

Device state: the params, the KV pages, the penalty state (token counts per
running sequence) and the previous step's sampled tokens. `step` takes a step's
StepInputs (one buffer, one transfer), runs the model over the Batch in it,
writes the new K/V into the pages and samples a token per logits row; it is one
compiled function per BatchShape, with the state donated so it is updated in
place, and gives back the tokens and their logprobs as one array. The runner
decides nothing: the scheduler says what runs, StepInputs.from_step packs it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxinfer import sharding
from jaxinfer.runner import compilations, kv_cache
from jaxinfer.runner.batch import Batch
from jaxinfer.core.sampling_params import MAX_LOGPROBS
from jaxinfer.errors import ConfigError
from jaxinfer.layers import attention
from jaxinfer.models import ModelConfig, family
from jaxinfer.runner.sampler import PenaltyState, reset_slot, sample
from jaxinfer.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

COPY_WIDTH = 8  # page copies per copy_pages call (padded with null-page copies)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, *,
                 num_pages: int, page_size: int = 16, cache_dtype=None, max_rows: int = 1024,
                 penalty_slots: int = 1, max_model_len: int | None = None,
                 attention_impl: str | None = None):
        self.cfg = cfg
        if attention_impl is not None and attention_impl not in attention.IMPLEMENTATIONS:
            raise ConfigError(f"unknown attention implementation {attention_impl!r}: expected one of "
                              f"{sorted(attention.IMPLEMENTATIONS)}")
        self.attention_impl = attention_impl  # None: the process default (jaxinfer.layers.attention)
        self.graphdef = graphdef
        self.state = state
        self.mesh = mesh
        self.page_size = page_size
        self.max_rows = max_rows
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        dtype = cache_dtype or next(iter(jax.tree.leaves(state))).dtype
        self.cache_spec = kv_cache.CacheSpec(
            num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
            entries=family(cfg).cache_entries(cfg), dtype=jnp.dtype(dtype))
        self.cache = kv_cache.allocate(self.cache_spec, mesh)
        self.replicated = sharding.replicated(mesh)
        self.penalty = jax.device_put(PenaltyState.zeros(penalty_slots, cfg.vocab_size), self.replicated)
        self.sampled = jax.device_put(np.zeros(max_rows, np.int32), self.replicated)
        self._executables: dict[tuple, concurrent.futures.Future] = {}  # per step shape
        self._lock = threading.Lock()
        self._out_tree = jax.tree.structure((StepOutput(0, 0, 0), self.cache, self.penalty, self.sampled))

        self._logits = jax.jit(self._logits_fn, donate_argnums=(1,))
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,))
        self._reset = jax.jit(reset_slot, donate_argnums=(0,))

    def _forward(self, state, cache, batch: Batch, sampled):
        # Tokens sampled by the previous step feed this one without a trip through the host.
        tokens = jnp.where(batch.feed_index >= 0, sampled[jnp.maximum(batch.feed_index, 0)], batch.tokens)
        model = nnx.merge(self.graphdef, state)
        with attention.implementation(self.attention_impl), attention.on_mesh(self.mesh):
            return model(dataclasses.replace(batch, tokens=tokens), cache)

    def _step_fn(self, state, cache, penalty, sampled, inputs: StepInputs):
        batch, sampling = inputs.unpack()
        logits, cache = self._forward(state, cache, batch, sampled)
        out, penalty = sample(logits, sampling, penalty, num_top=MAX_LOGPROBS)
        sampled = jnp.zeros_like(sampled).at[:out.tokens.shape[0]].set(out.tokens)
        # Tokens and their logprobs come back to the host as one array.
        packed = jnp.concatenate([out.tokens, jax.lax.bitcast_convert_type(out.logprobs, jnp.int32)])
        return StepOutput(packed, out.top_ids, out.top_logprobs), cache, penalty, sampled

    def _logits_fn(self, state, cache, batch: Batch, sampled):
        return self._forward(state, cache, batch, sampled)

    def _put(self, tree):
        return jax.device_put(tree, self.replicated)

    def step(self, inputs: StepInputs) -> StepOutput:
        """Run one step (asynchronously); returns the device-side samples."""
        args = self._args(inputs)
        out, self.cache, self.penalty, self.sampled = self._executable(args)(*args)
        return out

    def prepare(self, inputs: StepInputs) -> None:
        """Make the executable of this step's shape ready (load or compile it) without running it.
        Safe beside running steps: it looks only at the arguments' shapes and shardings."""
        args = (self.state, self.cache, self.penalty, self.sampled,
                dataclasses.replace(inputs, buffer=jax.ShapeDtypeStruct(inputs.buffer.shape, inputs.buffer.dtype,
                                                                        sharding=self.replicated)))
        self._executable(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args))

    def _args(self, inputs: StepInputs) -> tuple:
        if inputs.shape.num_rows > self.max_rows:
            raise ValueError(f"{inputs.shape.num_rows} logits rows > max_rows {self.max_rows}")
        inputs = dataclasses.replace(inputs, buffer=self._put(inputs.buffer))  # the one transfer
        return self.state, self.cache, self.penalty, self.sampled, inputs

    def _executable(self, args: tuple):
        """The step's executable for this shape; made once, whichever thread asks first (a
        background warm-up and the step thread may ask for the same one)."""
        inputs = args[4]
        key = (inputs.shape, inputs.ban_width)
        with self._lock:
            made = self._executables.get(key)
            mine = made is None
            if mine:
                made = self._executables[key] = concurrent.futures.Future()
        if mine:
            try:
                # What the executable depends on beyond its arguments (see compilations.load_or_compile).
                identity = repr((self.cfg, self.attention_impl or attention.get_implementation(),
                                 self.mesh.axis_names, self.mesh.devices.shape, self.max_model_len, MAX_LOGPROBS))
                made.set_result(compilations.load_or_compile(self._step_fn, args, self._out_tree, (1, 2, 3),
                                                             identity))
            except BaseException as e:
                made.set_exception(e)
                with self._lock:
                    del self._executables[key]  # the next caller tries again
        return made.result()

    def logits(self, batch: Batch) -> jax.Array:
        """Float32 logits [R, V] at batch.logits_indices, writing the batch's K/V (no sampling)."""
        logits, self.cache = self._logits(self.state, self.cache, self._put(batch), self.sampled)
        return logits

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV pages src -> dst (copy-on-write forks), in order."""
        for i in range(0, len(pairs), COPY_WIDTH):
            chunk = pairs[i:i + COPY_WIDTH]
            src = np.zeros(COPY_WIDTH, np.int32)
            dst = np.zeros(COPY_WIDTH, np.int32)
            src[:len(chunk)] = [p[0] for p in chunk]
            dst[:len(chunk)] = [p[1] for p in chunk]
            self.cache = self._copy(self.cache, *self._put((src, dst)))

    def reset_penalty_slot(self, slot: int, tokens: list[int], prompt_len: int) -> None:
        """Start a sequence's penalty counts: its prompt (and any output it already has)."""
        ids = np.full(self.max_model_len, -1, np.int32)
        ids[:len(tokens)] = tokens
        is_output = np.arange(self.max_model_len) >= prompt_len
        self.penalty = self._reset(self.penalty, *self._put((np.int32(slot), ids, is_output)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What a step gives back: `packed` i32 [2R] holds the sampled tokens, then their
    logprobs' float32 bits (one read-back); the top-n arrays as in SampleOutput."""

    packed: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array

    @staticmethod
    def split(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, logprobs) of a packed array read back to the host."""
        rows = packed.shape[0] // 2
        return packed[:rows], packed[rows:].view(np.float32)


def _copy_pages(cache: kv_cache.KVCache, src: jax.Array, dst: jax.Array) -> kv_cache.KVCache:
    # Padding pairs copy the null page onto itself. Sequential pairs never chain (a fork
    # copies from its parent's page into fresh pages), so one gather/scatter is exact.
    return jax.tree.map(lambda pages: pages.at[dst].set(pages[src]), cache)
