"""The model runner: device state and the jitted functions that change it.

Device state: the params, the KV pages, the penalty state (token counts per
running sequence) and each running sequence's latest sampled token (its feed
slot), which the next step feeds without a trip through the host. `step` takes a step's
StepInputs (one buffer, one transfer) and queues two compiled functions: the
forward pass over the Batch in it, which writes the new K/V into the pages and
gives the logits rows, and the sampler, which picks a token per row and gives
back the tokens and their logprobs as one array. The forward pass is compiled
once per BatchShape; the sampler once per (rows, ban width) in two variants, with
and without the vocabulary-ranking work (top-k/top-p, top-n logprobs), chosen
by the host from the step's rows: nothing in a step makes the host wait for the
device. With speculative decoding each of them also has a verifying variant,
taken when some sequence of the step carries drafts (rejection_sampler.verify).
The state is donated, so it is updated in place. The runner decides
nothing: the scheduler says what runs, StepInputs.from_step packs it.

Every buffer a step's forward touches keeps its device address from step to step: the step's
inputs are copied into a buffer held per shape, and the logits and sampling rows are written
into buffers held per size and donated back. On the GPU, XLA replays the forward as a CUDA
graph, and a graph whose addresses changed is re-recorded before it runs: with the inputs and
outputs in fresh buffers every step, that re-recording took longer than the device's step
(scripts/probe_dispatch.py --trace, scripts/probe_graph_update.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxinfer import params, sharding
from jaxinfer.runner import compilations, kv_cache
from jaxinfer.runner.batch import Batch
from jaxinfer.core.sampling_params import MAX_LOGPROBS
from jaxinfer.errors import ConfigError
from jaxinfer.layers import attention, kv
from jaxinfer.models import ModelConfig, family
from jaxinfer.runner.rejection_sampler import verify
from jaxinfer.runner.sampler import PenaltyState, SampleOutput, reset_slot, sample
from jaxinfer.runner.step_inputs import StepInputs, layout, unpack_sampling, unpack_spec

log = logging.getLogger(__name__)

COPY_WIDTH = 8  # page copies per copy_pages call (padded with null-page copies)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, *,
                 num_pages: int, page_size: int = 16, cache_dtype=None, max_rows: int = 1024,
                 penalty_slots: int = 1, feed_slots: int | None = None, max_model_len: int | None = None,
                 attention_impl: str | None = None, feature_layers: tuple[int, ...] = ()):
        """`feature_layers`: every step also keeps the hidden states after these layers, per token, in a
        pool at the token's K/V slot (a trained draft head reads them: jaxinfer/spec_decode/draft_head.py).
        The pool rides as one more entry at the end of the cache list, so page copies and donation take
        it along; `features` is it."""
        self.cfg = cfg
        if attention_impl is not None and attention_impl not in attention.IMPLEMENTATIONS:
            raise ConfigError(f"unknown attention implementation {attention_impl!r}: expected one of "
                              f"{sorted(attention.IMPLEMENTATIONS)}")
        self.attention_impl = attention_impl  # None: the process default (jaxinfer.layers.attention)
        self.graphdef = graphdef
        # An AbstractMesh (a pod that is not here): the state and every buffer are abstract values, for
        # exporting the step (jax.export), never for running it.
        self.abstract = isinstance(mesh, jax.sharding.AbstractMesh)
        # On the CPU, quantized scales in the native kernel's layout: XLA would otherwise transpose them each step.
        cpu = not self.abstract and mesh.devices.flat[0].platform == "cpu"
        self.state = params.kernel_layouts(state) if cpu else state
        self.mesh = mesh
        self.page_size = page_size
        self.max_rows = max_rows
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        dtype = cache_dtype or next(iter(jax.tree.leaves(state))).dtype
        self.cache_spec = kv_cache.CacheSpec(
            num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
            entries=family(cfg).cache_entries(cfg), dtype=jnp.dtype(dtype))
        self.cache = (kv_cache.abstract if self.abstract else kv_cache.allocate)(self.cache_spec, mesh)
        # Partitions of the host's page pool: a sequence's pages from one (data-parallel MLA attention).
        self.kv_partitions = self.cache_spec.partitions(mesh)
        self.feature_layers = tuple(sorted(set(feature_layers)))
        if self.feature_layers:
            width = len(self.feature_layers) * cfg.hidden_size
            self.cache.append({"features": jax.device_put(jnp.zeros((num_pages, page_size, width), dtype),
                                                          sharding.replicated(mesh))})
        self.replicated = sharding.replicated(mesh)
        put = self._abstract_put if self.abstract else jax.device_put
        self.penalty = put(PenaltyState.zeros(penalty_slots, cfg.vocab_size), self.replicated)
        # Each sequence's latest sampled token, by feed slot (the scheduler's SeqTable row).
        self.feed_tokens = put(np.zeros(feed_slots or max_rows, np.int32), self.replicated)
        self._executables: dict[tuple, concurrent.futures.Future] = {}  # forward per shape, sampler per rows
        self._lock = threading.Lock()
        self._made: dict[tuple, tuple] = {}  # (shape, ban width, full) -> (forward, sampler), once made
        self._cache_tree = jax.tree.structure(self.cache)
        self._penalty_tree = jax.tree.structure(self.penalty)
        self._forward_tree = jax.tree.structure((0, self.cache, 0))
        self._sample_tree = jax.tree.structure((StepOutput(0, 0, 0), self.penalty, self.feed_tokens))

        self._held_inputs: dict[tuple, jax.Array] = {}  # the step's input buffer, per shape
        self._held_outputs: dict[tuple, tuple] = {}  # (logits, sampling rows) written in place, per size
        self._refill = jax.jit(lambda held, fresh: fresh, donate_argnums=(0,))  # fresh's contents, held's address
        self._logits = jax.jit(self._logits_fn, donate_argnums=(1,))
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,))
        self._reset = jax.jit(reset_slot, donate_argnums=(0,))

    @staticmethod
    def _abstract_put(tree, where):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=where), tree)

    def _forward(self, state, cache, batch: Batch, feed_tokens=None):
        """The model over `batch` (logits at its logits_indices, and the cache with its K/V); under jit.
        Tokens sampled by earlier steps feed this one without a trip through the host (none: every token
        is the batch's own)."""
        tokens = batch.tokens if feed_tokens is None else jnp.where(
            batch.feed_index >= 0, feed_tokens[jnp.maximum(batch.feed_index, 0)], batch.tokens)
        model = nnx.merge(self.graphdef, state)
        batch = dataclasses.replace(batch, tokens=tokens)
        with self.attention_context():
            if not self.feature_layers:
                return model(batch, cache)
            logits, layers, features = model(batch, cache[:-1], self.feature_layers)
        return logits, layers + [{"features": kv.write(cache[-1]["features"], batch.slots, features)}]

    @contextlib.contextmanager
    def attention_context(self):
        """Where this runner's models are traced: its attention implementation, kernels per device on its mesh."""
        with attention.implementation(self.attention_impl), attention.on_mesh(self.mesh):
            yield

    @property
    def features(self) -> jax.Array | None:
        """The hidden states kept per K/V slot, [num_pages, page_size, len(feature_layers) * hidden], or None."""
        return self.cache[-1]["features"] if self.feature_layers else None

    def _forward_step_fn(self, state, cache, feed_tokens, inputs: StepInputs, logits_out, rows_out):
        """The forward, its logits and sampling rows written over `logits_out` and `rows_out` (donated: the
        outputs keep their addresses)."""
        batch, _ = inputs.unpack()
        logits, cache = self._forward(state, cache, batch, feed_tokens)
        logits = jax.lax.with_sharding_constraint(logits.astype(jnp.float32), self.replicated)
        return (jax.lax.dynamic_update_slice(logits_out, logits, (0, 0)), cache,
                jax.lax.dynamic_update_slice(rows_out, inputs.sampling_rows(), (0,)))

    def _sample_fn(self, logits, penalty, feed_tokens, rows, *, full: bool, ban_width: int, spec=None):
        """Sample a token per row; with `spec` (decode rows, drafts per sequence) the speculating sequences'
        rows are verified instead (rejection_sampler.verify) and give back their emitted tokens, -1 after."""
        num_rows = logits.shape[0]
        arrays = unpack_sampling(rows, num_rows, ban_width)
        if spec is not None:
            first, num, drafts = unpack_spec(rows, num_rows, ban_width, *spec)
            j = jnp.arange(spec[1] + 1)
            own = (first >= 0)[:, None] & (j <= num[:, None])
            spec_rows = jnp.where(own, first[:, None] + j, num_rows)  # [D, K + 1]; num_rows: dropped
            in_spec = jnp.zeros(num_rows, bool).at[spec_rows].set(True, mode="drop")
            # The plain sampler leaves these rows' penalty counts and feed slots to the verification.
            plain = dataclasses.replace(arrays, penalty_slot=jnp.where(in_spec, -1, arrays.penalty_slot),
                                        feed_slot=jnp.where(in_spec, -1, arrays.feed_slot))
            out, penalty = sample(logits, plain, penalty, num_top=MAX_LOGPROBS, full=full)
            g = jnp.clip(first, 0, num_rows - 1)
            seqs = jax.tree.map(lambda a: a[g], arrays)
            seqs = dataclasses.replace(seqs, penalty_slot=jnp.where(first >= 0, seqs.penalty_slot, -1))
            verified, penalty = verify(logits[jnp.minimum(g[:, None] + j, num_rows - 1)], seqs, penalty, drafts,
                                       jnp.where(first >= 0, num, 0), num_top=MAX_LOGPROBS, full=full)
            out = SampleOutput(out.tokens.at[spec_rows].set(verified.tokens, mode="drop"),
                               out.logprobs.at[spec_rows].set(verified.logprobs, mode="drop"),
                               out.top_ids.at[spec_rows].set(verified.top_ids, mode="drop"),
                               out.top_logprobs.at[spec_rows].set(verified.top_logprobs, mode="drop"))
            feed_at = jnp.where((first >= 0) & (seqs.feed_slot >= 0), seqs.feed_slot, feed_tokens.shape[0])
            feed_tokens = feed_tokens.at[feed_at].set(verified.last, mode="drop")
            arrays = plain
        else:
            out, penalty = sample(logits, arrays, penalty, num_top=MAX_LOGPROBS, full=full)
        slot = jnp.where(arrays.feed_slot >= 0, arrays.feed_slot, feed_tokens.shape[0])  # -1: dropped
        feed_tokens = feed_tokens.at[slot].set(out.tokens, mode="drop")
        # Tokens and their logprobs come back to the host as one array.
        packed = jnp.concatenate([out.tokens, jax.lax.bitcast_convert_type(out.logprobs, jnp.int32)])
        return StepOutput(packed, out.top_ids, out.top_logprobs), penalty, feed_tokens

    def _logits_fn(self, state, cache, batch: Batch, feed_tokens):
        return self._forward(state, cache, batch, feed_tokens)

    def _put(self, tree):
        return jax.device_put(tree, self.replicated)

    def step(self, inputs: StepInputs) -> StepOutput:
        """Run one step (asynchronously); returns the device-side samples."""
        forward, sampler = self._executables_for(inputs.shape, inputs.ban_width, inputs.needs_full_sampling(),
                                                 inputs.speculates())
        logits, rows = self.run_forward(forward, self.stage(inputs))
        return self.run_sampler(sampler, logits, rows)

    def stage(self, inputs: StepInputs) -> jax.Array:
        """The step's input buffer on the device (the one transfer), in the buffer held for its shape."""
        fresh = self._put(inputs.buffer)
        if self.mesh.devices.flat[0].platform != "gpu":  # no CUDA graph to keep: the copy would only cost
            return fresh
        key = (inputs.shape, inputs.ban_width)
        held = self._held_inputs.get(key)
        self._held_inputs[key] = fresh if held is None else self._refill(held, fresh)
        return self._held_inputs[key]

    def run_forward(self, forward, buffer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queue a forward executable (of `_executables_for`) on a staged buffer: (logits, sampling rows),
        which stay valid until the next forward of the same size writes over them."""
        logits_out, rows_out = self._held_outputs.pop(forward.out_key, None) or forward.new_outputs()
        # Over flat leaves: flattening the params' nnx.State every step costs milliseconds.
        out = forward.flat(*self._state_leaves, *jax.tree.leaves(self.cache), self.feed_tokens, buffer,
                           logits_out, rows_out)
        logits, rows = out[0], out[-1]  # (logits, *cache, sampling rows)
        self.cache = jax.tree.unflatten(self._cache_tree, out[1:-1])
        self._held_outputs[forward.out_key] = logits, rows
        return logits, rows

    def run_sampler(self, sampler, logits: jax.Array, rows: jax.Array) -> StepOutput:
        """Queue a sampler executable on a forward's logits and rows."""
        out = sampler.flat(logits, *jax.tree.leaves(self.penalty), self.feed_tokens, rows)
        # (packed, top_ids, top_logprobs, *penalty, feed_tokens)
        self.penalty = jax.tree.unflatten(self._penalty_tree, out[3:-1])
        self.feed_tokens = out[-1]
        return StepOutput(*out[:3])

    @property
    def state(self) -> nnx.State:
        return self._state

    @state.setter
    def state(self, state: nnx.State) -> None:
        self._state = state
        self._state_leaves = jax.tree.leaves(state)

    def prepare(self, inputs: StepInputs, full: tuple[bool, ...] = (False, True)) -> None:
        """Make the executables of this step's shape ready (load or compile them) without running
        them: the forward pass and the sampler variants in `full`. Safe beside running steps: it
        looks only at the arguments' shapes and shardings."""
        for variant in full:
            for verifies in (False, True) if inputs.shape.spec_tokens else (False,):
                self._executables_for(inputs.shape, inputs.ban_width, variant, verifies)

    def _executables_for(self, shape, ban_width: int, full: bool, verifies: bool = False):
        """The forward and sampler executables of a step; `verifies`: the sampler verifies drafts."""
        made = self._made.get((shape, ban_width, full, verifies))
        if made is not None:
            return made
        if shape.num_rows > self.max_rows:
            raise ValueError(f"{shape.num_rows} logits rows > max_rows {self.max_rows}")

        spec = self.spec_of
        rows = jax.ShapeDtypeStruct((layout(shape, ban_width).size - layout(shape, ban_width).offset("floats"),),
                                    jnp.int32, sharding=self.replicated)
        buffer = jax.ShapeDtypeStruct((layout(shape, ban_width).size,), jnp.int32, sharding=self.replicated)
        logits = jax.ShapeDtypeStruct((shape.num_rows, self.cfg.vocab_size), jnp.float32, sharding=self.replicated)
        forward = self.executable(("forward", shape, ban_width), self._forward_step_fn, (
            jax.tree.map(spec, self.state), jax.tree.map(spec, self.cache), spec(self.feed_tokens),
            StepInputs(buffer, shape, ban_width), logits, rows), self._forward_tree, (1, 4, 5))
        forward.out_key = (logits.shape, rows.shape)  # the held outputs it writes over

        def new_outputs():
            return (jax.device_put(jnp.zeros(logits.shape, logits.dtype), self.replicated),
                    jax.device_put(jnp.zeros(rows.shape, rows.dtype), self.replicated))
        forward.new_outputs = new_outputs
        spec_dims = (shape.decode_rows, shape.spec_tokens) if verifies else None
        # Keyed by the rows' length too: with speculation it depends on the decode rows, not only on num_rows.
        sampler = self.executable(("sample", shape.num_rows, ban_width, full) + (
                                       (rows.shape[0], spec_dims) if shape.spec_tokens else ()),
                                   functools.partial(self._sample_fn, full=full, ban_width=ban_width,
                                                     spec=spec_dims), (
            logits, jax.tree.map(spec, self.penalty), spec(self.feed_tokens), rows), self._sample_tree, (1, 2))
        self._made[(shape, ban_width, full, verifies)] = forward, sampler
        return forward, sampler

    @staticmethod
    def spec_of(x) -> jax.ShapeDtypeStruct:
        """An argument's abstract value, with its layout (params.kernel_layouts) or sharding."""
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "format", None) or x.sharding)

    def executable(self, key: tuple, fn, specs: tuple, out_tree, donate: tuple[int, ...]):
        """The executable of `fn` over arguments like `specs` (compilations.load_or_compile), named `key`
        within this runner; made once, whichever thread asks first (a background warm-up and the step
        thread may ask for the same one)."""
        with self._lock:
            made = self._executables.get(key)
            mine = made is None
            if mine:
                made = self._executables[key] = concurrent.futures.Future()
        if mine:
            try:
                # What the executable depends on beyond its arguments (see compilations.load_or_compile).
                identity = repr((key, self.cfg, self.attention_impl or attention.get_implementation(),
                                 self.mesh.axis_names, self.mesh.devices.shape, self.max_model_len, MAX_LOGPROBS))
                made.set_result(compilations.load_or_compile(fn, specs, out_tree, donate, identity))
            except BaseException as e:
                made.set_exception(e)
                with self._lock:
                    del self._executables[key]  # the next caller tries again
        return made.result()

    def release(self) -> None:
        """Let go of the device: the weights, the KV cache and every compiled step (an executable on the CPU
        also holds hundreds of memory mappings). The runner cannot run afterwards."""
        with self._lock:
            self._executables.clear()
            self._made.clear()
        self._held_inputs.clear()
        self._held_outputs.clear()
        self.state = self.cache = self.penalty = self.feed_tokens = None

    def logits(self, batch: Batch) -> jax.Array:
        """Float32 logits [R, V] at batch.logits_indices, writing the batch's K/V (no sampling)."""
        logits, self.cache = self._logits(self.state, self.cache, self._put(batch), self.feed_tokens)
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
