"""Token sampling on the device, with per-row parameters.

Each row carries its own temperature, top-k, top-p and seed. A row's random
stream is keyed by (seed, position of the token being sampled), so a seeded
request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if problems:
            raise InputError("invalid sampling parameters: " + "; ".join(problems))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters as device arrays, all [S]."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32 pairs packed as [S, 2]

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], rows: int) -> "SamplingArrays":
        pad = rows - len(params)
        seed_array = np.array([[s >> 32 & 0xFFFFFFFF, s & 0xFFFFFFFF] for s in seeds] + [[0, 0]] * pad,
                              np.uint32)
        return cls(
            temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
            top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
            top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
            seed=seed_array,
        )


def sample(logits: jax.Array, params: SamplingArrays, positions: jax.Array) -> jax.Array:
    """logits: [S, V] float32; positions: [S] position of the token being sampled -> [S] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The vocabulary sort is skipped on device when every row is greedy.
    return jax.lax.cond(jnp.any(params.temperature > 0),
                        lambda: _sample(logits, params, positions, greedy), lambda: greedy)


def _sample(logits, params: SamplingArrays, positions, greedy) -> jax.Array:
    vocab = logits.shape[-1]
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits / temperature[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # descending; ties keep the lower id first
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    top_k = jnp.where(params.top_k > 0, params.top_k, vocab)
    keep = rank < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < params.top_p[:, None]) | (rank == 0)  # always keep the best token
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def row_key(seed, position):
        key = jax.random.key(seed[0])
        key = jax.random.fold_in(key, seed[1])
        return jax.random.fold_in(key, position)

    keys = jax.vmap(row_key)(params.seed, positions)
    choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(params.temperature > 0, sampled, greedy)
