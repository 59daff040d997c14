"""The native CPU kernel for quantized matmuls: cpu.cc, an XLA FFI handler (built by pallas_kernels/native_cpu.py).

XLA's CPU backend runs a float32 GEMV near the memory's speed but any narrower operand about ten times
slower (docs/benchmarks.md), so int8 / int4 weights are multiplied here instead: each block of 32
levels is widened in registers and meets x in float32 FMAs, a group's scale and zero point applied to
its sums, exact to float rounding (cpu.cc says why not llama.cpp's int8 activations). One custom call takes every weight of a
`quantized_matmul_many` (q, k and v; gate and up), its outputs split over XLA's intra-op thread pool.
fp8 weights, and K or groups that are not whole blocks of 32 (Q6_K's groups of 16), stay on XLA's path
(`supports`); x in bf16 is widened first and the outputs cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import native_cpu
from pallas_kernels.quantized_matmul.reference import QuantScheme

TARGET = native_cpu.QUANTIZED_MATMUL
BLOCK = 32  # x's quantization block (cpu.cc)
# Scales and zeros [K / g, N] as the kernel reads them: output-major, N the major axis (cpu.cc says why).
SCALES_MAJOR_TO_MINOR = (1, 0)


def kernel_layout(array: jax.Array) -> jax.Array:
    """A scale or zero-point array [K / g, N] placed in the layout the kernel reads, same values and sharding
    (XLA then passes it to the custom call as it is, instead of transposing it at every step)."""
    from jax.experimental.layout import Format, Layout

    return jax.device_put(array, Format(Layout(major_to_minor=SCALES_MAJOR_TO_MINOR), array.sharding))


def supports(x: jax.Array, values: jax.Array, scheme: QuantScheme) -> bool:
    """Whether the kernel takes x [M, K] times these values: int8 or int4 (zero points or not), K and the group
    whole blocks of 32 (Q6_K's groups of 16 stay on XLA's path)."""
    k = x.shape[-1]
    return (scheme.method in ("int8", "int4") and x.ndim == 2 and values.ndim == 2 and values.shape[1] == k
            and k % BLOCK == 0 and scheme.group(k) % BLOCK == 0)


def quantized_matmul_many(x: jax.Array, weights, scheme: QuantScheme, *, out_dtype) -> list[jax.Array]:
    """x [M, K] (float32 or bf16) times each (values [N, K], scales [K // g, N], zeros or None): one custom
    call, [M, N] each in `out_dtype`. The caller checked `supports` and `native_cpu.load`."""
    m, k = x.shape
    flat = []
    for values, scales, zeros in weights:
        flat += [values, scales] + ([zeros] if scheme.zero_points else [])
    out = [jax.ShapeDtypeStruct((m, values.shape[0]), jnp.float32) for values, _, _ in weights]
    per_weight = (None, SCALES_MAJOR_TO_MINOR) + ((SCALES_MAJOR_TO_MINOR,) if scheme.zero_points else ())
    ys = jax.ffi.ffi_call(TARGET, out, input_layouts=(None,) + per_weight * len(weights))(
        x.astype(jnp.float32), *flat, group=np.int64(scheme.group(k)), int4=scheme.method == "int4",
        zero_points=bool(scheme.zero_points))
    return [y.astype(out_dtype) for y in ys]
