"""The model runner: device state (params, KV pages) and the one jitted step.

`step` runs the model over a packed ragged batch, writes the new K/V into the
pages, and samples a token at each requested position; everything is one
compiled function per bucketed shape, with the KV cache donated so it is
updated in place.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxinfer import kv_cache, sharding
from jaxinfer.batch import Batch
from jaxinfer.config import ModelConfig
from jaxinfer.models import family
from jaxinfer.sampling import SamplingArrays, sample

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, *,
                 num_pages: int, page_size: int = 16, cache_dtype=None):
        self.cfg = cfg
        self.graphdef = graphdef
        self.state = state
        self.mesh = mesh
        self.page_size = page_size
        dtype = cache_dtype or next(iter(jax.tree.leaves(state))).dtype
        self.cache_spec = kv_cache.CacheSpec(
            num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
            entries=family(cfg).cache_entries(cfg), dtype=jnp.dtype(dtype))
        self.cache = kv_cache.allocate(self.cache_spec, mesh)
        self.replicated = sharding.replicated(mesh)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    def _step_fn(self, state, cache, batch: Batch, sampling: SamplingArrays, sample_positions):
        model = nnx.merge(self.graphdef, state)
        logits, cache = model(batch, cache)
        tokens = sample(logits, sampling, sample_positions)
        return tokens, logits, cache

    def step(self, batch: Batch, sampling: SamplingArrays, sample_positions
             ) -> tuple[jax.Array, jax.Array]:
        """Run one step; returns (sampled tokens [N], float32 logits [N, V]) as device arrays."""
        batch, sampling, sample_positions = jax.device_put(
            (batch, sampling, sample_positions), self.replicated)
        tokens, logits, self.cache = self._step(self.state, self.cache, batch, sampling,
                                                sample_positions)
        return tokens, logits
