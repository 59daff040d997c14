"""Matmuls over quantized weights (int8, packed int4, fp8 values plus scales).

`reference.py` defines the format (`QuantScheme`, `quantize`, `dequantize`) and the pure-JAX
matmul the kernels are checked against; `tpu.py` is the Mosaic TPU kernel, `gpu.py` the Mosaic
GPU (Hopper) one, `cpu.py` a native one (C++, an XLA FFI call). `quantized_matmul` is the one entry
point the model's projections reach (through jaxinfer/layers/linear.py). It picks by the platform
it is lowered for, as the attention kernels do: the TPU kernel on TPU and the GPU kernel on CUDA
where their `supports` take the shapes (the GPU one: decode-sized M), the native kernel on the CPU
where it is built (int8 and int4), XLA's dequantize-then-dot otherwise. `interpret=` forces a
kernel in interpret mode, for tests: `plgpu.InterpretGPUParams` the GPU kernel, `True` or
`pltpu.InterpretParams` the TPU one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul import reference as _reference
from pallas_kernels.quantized_matmul.reference import QuantScheme, dequantize, parse, quantize

reference = _reference.quantized_matmul  # the pure-JAX matmul the kernels are checked against


def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None, interpret=None) -> jax.Array:
    """x [M, K] (bf16 or float32) times the quantized weight [K, N]: [M, N] in `out_dtype`
    (default x's dtype), accumulated in float32. The weight is never stored as floats."""
    return quantized_matmul_many(x, [(values, scales, zeros)], scheme, out_dtype=out_dtype, interpret=interpret)[0]


def quantized_matmul_many(x: jax.Array, weights, scheme: QuantScheme, *, out_dtype=None,
                          interpret=None) -> list[jax.Array]:
    """x [M, K] times each of several weights of one scheme ((values, scales, zeros) tuples): q, k and v,
    or gate and up. On CUDA one kernel launch for all of them (fewer launches a step, and small widths
    share the SMs); on TPU one kernel call each; XLA's dequantize-then-dot where a kernel does not
    take the shapes, and on other platforms."""
    # Pallas (and Mosaic GPU) are imported when traced, not when this package is.
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels import native_cpu
    from pallas_kernels.quantized_matmul import cpu as _cpu
    from pallas_kernels.quantized_matmul import gpu as _gpu
    from pallas_kernels.quantized_matmul import tpu as _tpu

    out_dtype = out_dtype or x.dtype
    weights = tuple(tuple(w) for w in weights)
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return _gpu.quantized_matmul_many(x, weights, scheme, out_dtype=out_dtype, interpret=interpret)
    if interpret is not None and interpret is not False:
        return [_tpu.quantized_matmul(x, *w, scheme, out_dtype=out_dtype, interpret=interpret) for w in weights]
    tree = jax.tree.structure(weights)
    leaves = jax.tree.leaves(weights)

    def each(pick):
        def run(x, *leaves):
            return [pick(x, v)(x, v, s, z, scheme, out_dtype=out_dtype)
                    for v, s, z in jax.tree.unflatten(tree, leaves)]
        return run

    def fused(x, *leaves):
        return _gpu.quantized_matmul_many(x, jax.tree.unflatten(tree, leaves), scheme, out_dtype=out_dtype)

    def native(x, *leaves):
        return _cpu.quantized_matmul_many(x, jax.tree.unflatten(tree, leaves), scheme, out_dtype=out_dtype)

    tpu = each(lambda x, v: _tpu.quantized_matmul if _tpu.supports(x, v, scheme) else _xla)
    xla = each(lambda x, v: _xla)
    gpu_ok = all(_gpu.supports(x, v, scheme) is None for v, _, _ in weights)
    # Every branch is traced wherever this runs; the CPU kernel is built (once, cached) only where the
    # default backend is the CPU, so a GPU or TPU host never compiles it.
    cpu_ok = (jax.default_backend() == "cpu" and all(_cpu.supports(x, v, scheme) for v, _, _ in weights)
              and native_cpu.load())
    return jax.lax.platform_dependent(x, *leaves, tpu=tpu, cuda=fused if gpu_ok else xla,
                                      cpu=native if cpu_ok else xla, default=xla)


def _xla(x, values, scales, zeros, scheme: QuantScheme, *, out_dtype):
    """XLA: the weight dequantized into x's dtype inside the step, one projection at a time, and
    contracted on its stored minor axis (x W^T, as a Linear layer's)."""
    w = _reference.dequantize_output_major(values, scales, zeros, scheme, x.dtype)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(out_dtype)


__all__ = ["QuantScheme", "dequantize", "parse", "quantize", "quantized_matmul", "quantized_matmul_many", "reference"]
