"""Matmuls over quantized weights (int8, packed int4, fp8 values plus scales).

`reference.py` defines the format (`QuantScheme`, `quantize`, `dequantize`) and the pure-JAX
matmul the kernels are checked against. `quantized_matmul` is the one entry point the model's
projections reach (through jaxinfer/layers/linear.py). Today it runs XLA's own fusion of the
dequantization into a dot everywhere; the Mosaic GPU and TPU kernels plug in here by platform,
as the attention kernels do, where their `supports` takes the shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul import reference as _reference
from pallas_kernels.quantized_matmul.reference import QuantScheme, dequantize, parse, quantize

reference = _reference.quantized_matmul  # the pure-JAX matmul the kernels are checked against


def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None) -> jax.Array:
    """x [M, K] (bf16 or float32) times the quantized weight [K, N]: [M, N] in `out_dtype`
    (default x's dtype), accumulated in float32.

    The weight is dequantized into x's dtype inside the step, one projection at a time, and
    never stored as floats."""
    w = dequantize(values, scales, zeros, scheme, x.dtype)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


__all__ = ["QuantScheme", "dequantize", "parse", "quantize", "quantized_matmul", "reference"]
