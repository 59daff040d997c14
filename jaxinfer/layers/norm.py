"""RMSNorm, computed as HF transformers computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.layers.param import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, *, dtype, rngs: nnx.Rngs):
        # `dtype` is the scale's: HF keeps it in the model's dtype, and so do the models here.
        self.scale = param(rngs, (dim,), (axis_name,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # As HF: normalize in float32, cast back to x's dtype, then multiply by the scale.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)
