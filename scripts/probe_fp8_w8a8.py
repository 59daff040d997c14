"""Probe (issue 12): fp8 weights times fp8 activations (W8A8, XLA's fp8 GEMM) against the Mosaic kernel's
weight-only fp8 (W8A16) and bf16, at Llama-3-8B's projection shapes and decode / prefill M, on one GPU.

    python3 scripts/probe_fp8_w8a8.py

W8A8 quantizes x per row (token) to float8_e4m3fn on the fly (amax / 448, vLLM's dynamic per-token scheme),
multiplies in fp8 with float32 accumulation and applies the row scale and the weight's per-channel scale after.
Prints CUPTI kernel time per matmul (every kernel of the call: the quantization of x too), the fraction of 4.8
TB/s over the bytes moved, and each path's error against a float32 reference as max |err| / max |y|.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from check_quantized_gpu import SHAPES, random_parts, time_per_call  # noqa: E402
from pallas_kernels.quantized_matmul import parse, quantize, quantized_matmul, reference  # noqa: E402

HBM = 4.8e12


def w8a8(x, values, scales):
    xf = x.astype(jnp.float32)
    xs = jnp.maximum(jnp.max(jnp.abs(xf), axis=1, keepdims=True), 1e-12) / 448.0
    xq = (xf / xs).astype(jnp.float8_e4m3fn)
    y = jax.lax.dot_general(xq, values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * xs * scales[0]).astype(jnp.bfloat16)


def main():
    scheme = parse("fp8")
    print("| K x N | M | bf16 µs | fp8 kernel µs | W8A8 µs | kernel % roof | W8A8 % roof | W8A8 × bf16 | "
          "err kernel | err W8A8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, n in SHAPES:
        w = (np.random.default_rng(k).standard_normal((k, n)) * 0.02).astype(np.float32)
        q = {name: jnp.asarray(a) for name, a in quantize(w, scheme).items()}
        shapes = scheme.shapes(k, n)
        copies = [random_parts(shapes, i) for i in range(12)]
        bcopies = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(6)]
        for m in (1, 16, 64, 256):
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
            want = reference(x.astype(jnp.float32), q["values"], q["scales"], None, scheme, out_dtype=jnp.float32)
            top = float(jnp.abs(want).max())
            err_k = float(jnp.abs(jax.jit(lambda x: quantized_matmul(x, q["values"], q["scales"], None, scheme))(x)
                                  .astype(jnp.float32) - want).max()) / top
            err_a = float(jnp.abs(jax.jit(w8a8)(x, q["values"], q["scales"]).astype(jnp.float32) - want).max()) / top
            t_b = time_per_call(jax.jit(lambda x, cs: [jnp.dot(x, c) for c in cs]), x, bcopies)
            t_k = time_per_call(jax.jit(lambda x, cs: [quantized_matmul(x, c["values"], c["scales"], None, scheme)
                                                       for c in cs]), x, copies)
            t_a = time_per_call(jax.jit(lambda x, cs: [w8a8(x, c["values"], c["scales"]) for c in cs]), x, copies)
            moved = k * n + 4 * n + 2 * m * (k + n)
            print(f"| {k} x {n} | {m} | {t_b * 1e6:.1f} | {t_k * 1e6:.1f} | {t_a * 1e6:.1f} | "
                  f"{moved / t_k / HBM:.0%} | {moved / t_a / HBM:.0%} | {t_b / t_a:.2f}× | {err_k:.1e} | {err_a:.1e} |",
                  flush=True)
        del copies, bcopies


if __name__ == "__main__":
    main()
