"""Does a step's host launch cost come from XLA re-recording its CUDA graph every call? (issue 12)

A stand-in for the 8B decode forward at B = 1 (two rows): 32 layers of four quantized projections
(q/k/v, o, gate/up, down: the Mosaic GPU kernel) and a bf16 head. Timed, with the device kept busy:
how long one call takes to return, when
  fresh:   the input is a new device buffer each call and the logits a new output (as the runner does now);
  stable:  the same input buffer each call, and the logits written into a donated buffer that is passed back
           (every address the graph holds stays the same from call to call).
Run it under different XLA_FLAGS (e.g. --xla_gpu_command_buffer_update_mode=SKIP_TEMP) to compare.

    python scripts/probe_graph_update.py [--quantization int8] [--layers 32]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quantization", default="int8")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.quantized_matmul import parse, quantized_matmul, quantized_matmul_many

    scheme = parse(args.quantization)
    e, f, v = 4096, 14336, 128256
    key = jax.random.key(0)

    def weight(n, k):
        shapes = scheme.shapes(k, n)
        out = []
        for name in ("values", "scales", "zeros"):
            if name not in shapes:
                out.append(None)
                continue
            shape, dtype = shapes[name]
            if name == "values":
                lo, hi = (-8, 8) if scheme.method == "int4" else (-127, 128)
                a = jax.random.randint(key, shape, lo, hi, jnp.int32).astype(dtype) if scheme.method != "fp8" else \
                    (0.1 * jax.random.normal(key, shape)).astype(dtype)
            else:
                a = jnp.full(shape, 1e-3 if name == "scales" else 0.0, dtype)
            out.append(a)
        return tuple(out)

    layers = [dict(qkv=(weight(e, e), weight(1024, e), weight(1024, e)), o=weight(e, e),
                   gu=(weight(f, e), weight(f, e)), down=weight(e, f)) for _ in range(args.layers)]
    head = (0.01 * jax.random.normal(key, (e, v))).astype(jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(layers))

    def forward(layers, head, x):
        h = x
        for w in layers:
            q, _, _ = quantized_matmul_many(h, w["qkv"], scheme)
            h = h + quantized_matmul(q, *w["o"], scheme)
            g, u = quantized_matmul_many(h, w["gu"], scheme)
            h = h + quantized_matmul((jax.nn.silu(g) * u).astype(h.dtype), *w["down"], scheme)
        return jnp.dot(h, head, preferred_element_type=jnp.float32)

    fresh = jax.jit(forward)
    stable = jax.jit(lambda layers, head, x, out: forward(layers, head, x) + 0 * out[0, 0], donate_argnums=(3,))
    x_host = np.ones((2, e), np.float32).astype(jnp.bfloat16)
    x_dev = jax.device_put(x_host)
    out = jnp.zeros((2, v), jnp.float32)
    jax.block_until_ready(fresh(layers, head, x_dev))
    out = stable(layers, head, x_dev, out)
    jax.block_until_ready(out)

    def time_calls(call):
        ms = []
        for _ in range(3):
            call()  # keep the device busy
        for _ in range(args.calls):
            t = time.perf_counter()
            call()
            ms.append((time.perf_counter() - t) * 1e3)
        return ms

    results = {}

    def call_fresh():
        results["fresh"] = fresh(layers, head, jax.device_put(x_host))

    def call_stable():
        results["stable"] = out_ref[0] = stable(layers, head, x_dev, out_ref[0])

    out_ref = [out]
    t = time.perf_counter()
    for _ in range(args.calls):
        call_fresh()
    jax.block_until_ready(results["fresh"])
    device_ms = (time.perf_counter() - t) / args.calls * 1e3
    for name, call in (("fresh", call_fresh), ("stable", call_stable), ("fresh", call_fresh),
                       ("stable", call_stable)):
        ms = time_calls(call)
        jax.block_until_ready(results[name])
        print(f"{name:>6}: host time to return median {statistics.median(ms):.3f} ms, min {min(ms):.3f}, "
              f"max {max(ms):.3f} (back-to-back step {device_ms:.3f} ms)", flush=True)


if __name__ == "__main__":
    main()
