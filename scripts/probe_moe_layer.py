"""Probe: what one DeepSeek-V2-Lite MoE block costs on the GPU at decode sizes, by formulation (issue 14).

    python3 scripts/probe_moe_layer.py           # GPU (CUPTI kernel time), or wall time elsewhere

64 routed experts of 2048 x 1408 (gate, up, down; bf16), top-6, T tokens (1, 8, 64, 256), routed at random:
  ragged_dot  layers/moe.py's `_experts`: rows sorted by expert, three jax.lax.ragged_dot calls
  gather      the chosen experts' weights gathered per (token, slot), then batched matmuls: reads only the
              experts chosen, T * 6 of them (with repeats)
  dense       every expert over every token, weighted by a mask (the upper bound: all weights, T x 64 rows)
against the bytes of the distinct experts chosen over 4.8 TB/s. Copies rotated so weights come from HBM.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.layers.moe import _experts  # noqa: E402

X, E, I, K = 64, 2048, 1408, 6  # noqa: E741


def gather(x, weights, ids, gate, up, down):
    g = jnp.einsum("te,tkei->tki", x, gate[ids], preferred_element_type=jnp.float32)
    u = jnp.einsum("te,tkei->tki", x, up[ids], preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("tki,tkie->tke", h, down[ids], preferred_element_type=jnp.float32)
    return (y * weights[..., None]).sum(1).astype(x.dtype)


def dense(x, weights, ids, gate, up, down):
    mask = jnp.zeros((x.shape[0], X), jnp.float32).at[jnp.arange(x.shape[0])[:, None], ids].set(weights)
    g = jnp.einsum("te,xei->txi", x, gate, preferred_element_type=jnp.float32)
    u = jnp.einsum("te,xei->txi", x, up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("txi,xie->txe", h, down, preferred_element_type=jnp.float32)
    return (y * mask[..., None]).sum(1).astype(x.dtype)


def timed(fn, x, copies, reps=5):
    out = fn(x, copies)
    jax.block_until_ready(out)
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, ms = profiler.measure(fn, iterations=reps)(x, copies)
        return statistics.median(ms) / 1e3 / len(copies), "CUPTI"
    except Exception:  # noqa: BLE001
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(fn(x, copies))
        return (time.perf_counter() - t0) / reps / len(copies), "wall"


def main():
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    n_copies = 3 if jax.default_backend() != "cpu" else 1
    sizes = (1, 8, 64, 256) if jax.default_backend() != "cpu" else (1, 8)
    shape = (X, E, I) if jax.default_backend() != "cpu" else (X, 256, 128)
    copies = []
    for c in range(n_copies):
        ks = jax.random.split(jax.random.fold_in(key, c), 3)
        copies.append(tuple(jax.random.normal(k, s, jnp.bfloat16) * 0.02
                            for k, s in zip(ks, (shape, shape, (shape[0], shape[2], shape[1])))))
    per_expert = 3 * shape[1] * shape[2] * 2
    print(f"{jax.devices()[0].device_kind}; experts {shape}, top-{K}\n")
    print("| T | distinct experts | floor µs | ragged_dot µs | gather µs | dense µs | timer |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for t in sizes:
        x = jnp.asarray(rng.standard_normal((t, shape[1])), jnp.bfloat16)
        ids = jnp.asarray(np.stack([rng.choice(X, K, replace=False) for _ in range(t)]), jnp.int32)
        w = jnp.asarray(rng.random((t, K)), jnp.float32)
        distinct = len(np.unique(np.asarray(ids)))
        floor = distinct * per_expert / 4.8e12
        row = []
        for f in (_experts, gather, dense):
            fn = jax.jit(lambda x, cs, f=f: [f(x, w, ids, *c) for c in cs])
            try:
                s, timer = timed(fn, x, copies)
                row.append(f"{s * 1e6:.1f}")
            except Exception as e:  # noqa: BLE001
                row.append(type(e).__name__)
        print(f"| {t} | {distinct} | {floor * 1e6:.1f} | {' | '.join(row)} | {timer} |", flush=True)


if __name__ == "__main__":
    main()
