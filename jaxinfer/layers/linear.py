"""The one matmul entry point: every projection of every model goes through `einsum`.

A weight is a small pytree handed to `einsum`. Today that is a float array. A
quantized weight type (int8/int4/fp8 values plus per-channel or per-group
scales) is one more case in `einsum` and one more Linear-like module holding
`values` and `scales` parameters (each declared with its own dtype and logical
axes); swapping `Linear` for it in a built model leaves the model files alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.layers.param import param


def einsum(equation: str, x: jax.Array, weight, *, preferred_element_type=None) -> jax.Array:
    """`x` times `weight` as `equation` says, e.g. "te,ehd->thd" (activations first).

    weight: a float array. The result is in the promoted dtype of x and weight unless
    `preferred_element_type` asks for another (the logits ask for float32)."""
    if isinstance(weight, jax.Array):
        return jnp.einsum(equation, x, weight, preferred_element_type=preferred_element_type)
    raise TypeError(f"no matmul for a weight of type {type(weight).__name__}")


class Linear(nnx.Module):
    """A projection y = einsum(equation, x, weight) (+ bias), declared once.

    The weight is laid out for the equation (inputs first: q_proj is [embed, heads,
    head_dim] for "te,ehd->thd"); the optional bias covers the weight's output axes.
    """

    def __init__(self, equation: str, shape: Sequence[int], logical_axes: Sequence[str | None], *,
                 dtype, rngs: nnx.Rngs, bias: bool = False, preferred_element_type=None):
        self.equation = equation
        self.preferred_element_type = preferred_element_type
        self.weight = param(rngs, shape, logical_axes, dtype)
        if bias:
            inputs, out = equation.replace(" ", "").split("->")
            w_subscripts = inputs.split(",")[1]
            keep = [i for i, c in enumerate(w_subscripts) if c in out]
            self.bias = param(rngs, [shape[i] for i in keep], [logical_axes[i] for i in keep], dtype,
                              init="zeros")
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = einsum(self.equation, x, self.weight[...], preferred_element_type=self.preferred_element_type)
        return y if self.bias is None else y + self.bias[...]


class Embed(nnx.Module):
    """The token embedding [vocab, embed]; `attend` is its transpose, for tied output heads."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (vocab_size, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [T] -> [T, embed]
        return self.weight[...][tokens]

    def attend(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:  # [T, embed] -> [T, vocab]
        return einsum("te,ve->tv", x, self.weight[...], preferred_element_type=preferred_element_type)
