"""Probe: what one DeepSeek-V2-Lite MoE block costs on the GPU at decode sizes, by formulation (issue 14).

    python3 scripts/probe_moe_layer.py           # GPU (CUPTI kernel time), or wall time elsewhere

64 routed experts of 2048 x 1408 (gate, up, down; bf16), top-6, T tokens (1 to 1024), routed at random:
  kernel      layers/moe.py's `_experts`: on CUDA the Mosaic grouped-matmul kernel (pallas_kernels/grouped_matmul)
              over the rows laid out in tiles, gate and up in one launch, then down
  ragged_dot  the same rows sorted by expert, three jax.lax.ragged_dot calls (the engine's path before the kernel)
  gather      the chosen experts' weights gathered per (token, slot), then batched matmuls: reads only the
              experts chosen, T * 6 of them (with repeats)
  dense       every expert over every token, weighted by a mask (the upper bound: all weights, T x 64 rows)
against the bytes of the distinct experts chosen over 4.8 TB/s. Copies rotated so weights come from HBM.
"max err" is the kernel's largest difference from a float32 reference, over the reference's largest value.
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

from jaxinfer.layers import moe  # noqa: E402
from pallas_kernels import grouped_matmul  # noqa: E402

X, E, I, K = 64, 2048, 1408, 6  # noqa: E741


def ragged(x, weights, ids, gate, up, down):
    real = moe.grouped_swiglu

    def on_sorted_rows(rows, gate, up, down, group):
        body = grouped_matmul._swiglu(gate, up, down)
        return grouped_matmul._on_sorted_rows(body, rows, group, gate.shape[0])[0]
    moe.grouped_swiglu = on_sorted_rows
    try:
        return moe._experts(x, weights, ids, gate, up, down)
    finally:
        moe.grouped_swiglu = real


def reference(x, weights, ids, gate, up, down):
    """ragged_dot's formulation in float32 throughout."""
    f32 = [a.astype(jnp.float32) for a in (x, gate, up, down)]
    with jax.default_matmul_precision("highest"):
        return ragged(f32[0], weights, ids, *f32[1:])


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
    sizes = (1, 8, 64, 256, 1024) if jax.default_backend() != "cpu" else (1, 8)
    shape = (X, E, I) if jax.default_backend() != "cpu" else (X, 256, 128)
    copies = []
    for c in range(n_copies):
        ks = jax.random.split(jax.random.fold_in(key, c), 3)
        copies.append(tuple(jax.random.normal(k, s, jnp.bfloat16) * 0.02
                            for k, s in zip(ks, (shape, shape, (shape[0], shape[2], shape[1])))))
    per_expert = 3 * shape[1] * shape[2] * 2
    print(f"{jax.devices()[0].device_kind}; experts {shape}, top-{K}\n")
    print("| T | distinct experts | floor µs | kernel µs | of the floor | max err | ragged_dot µs | gather µs "
          "| dense µs | timer |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for t in sizes:
        x = jnp.asarray(rng.standard_normal((t, shape[1])), jnp.bfloat16)
        ids = jnp.asarray(np.stack([rng.choice(X, K, replace=False) for _ in range(t)]), jnp.int32)
        w = jnp.asarray(rng.random((t, K)), jnp.float32)
        distinct = len(np.unique(np.asarray(ids)))
        floor = distinct * per_expert / 4.8e12
        try:
            want = jax.jit(reference)(x, w, ids, *copies[0])
            got = jax.jit(moe._experts)(x, w, ids, *copies[0]).astype(jnp.float32)
            err = f"{float(jnp.abs(got - want).max() / jnp.abs(want).max()):.1e}"
        except Exception as e:  # noqa: BLE001
            err = type(e).__name__
            print(f"check at T = {t}: {str(e)[:2000]}", file=sys.stderr)
        row, timer = [], "–"
        for f in (moe._experts, ragged, gather, dense):
            if f is dense and t > 256:
                row.append("–")
                continue
            fn = jax.jit(lambda x, cs, f=f: [f(x, w, ids, *c) for c in cs])
            try:
                s, timer = timed(fn, x, copies)
                row.append(f"{s * 1e6:.1f}")
                if f is moe._experts:
                    row += [f"{floor / s:.0%}", err]
            except Exception as e:  # noqa: BLE001
                row.append(type(e).__name__)
                print(f"{f.__name__} at T = {t}: {str(e)[:2000]}", file=sys.stderr)
                if f is moe._experts:
                    row += ["–", err]
        print(f"| {t} | {distinct} | {floor * 1e6:.1f} | {' | '.join(row)} | {timer} |", flush=True)
    if jax.default_backend() == "gpu":
        sweep(rng, copies, per_expert)


def sweep(rng, copies, per_expert):
    """The kernel alone (gate and up in one launch; down), by tile_m / tile_k / stages."""
    from pallas_kernels.grouped_matmul import gpu
    from pallas_kernels.grouped_matmul.reference import plan, tile_rows

    print("\n| T | tile_m | weights | tile_k | stages | µs | of the floor |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for t in (1, 64, 256):
        ids = jnp.asarray(np.stack([rng.choice(X, K, replace=False) for _ in range(t)]), jnp.int32).reshape(-1)
        distinct = len(np.unique(np.asarray(ids)))
        for tile_m in sorted({tile_rows(t * K, X), 8 if t < 256 else 32}):
            p = plan(ids, X, tile_m)
            for which in ("gate+up", "down"):
                k = copies[0][2].shape[1] if which == "down" else copies[0][0].shape[1]
                x = jnp.asarray(rng.standard_normal((p.row_of_slot.shape[0], k)), jnp.bfloat16)
                floor = distinct * per_expert / 3 * (2 if which == "gate+up" else 1) / 4.8e12
                for tile_k in (64, 128, 256):
                    for stages in (2, 4):
                        if k % tile_k or (tile_m + 64) * tile_k * 2 * stages > 200 * 1024:
                            continue
                        cfg = gpu.Config(tile_k, stages)

                        def fn(x, cs, cfg=cfg, which=which, p=p, tile_m=tile_m):
                            return [gpu.grouped_matmul_many(x, (c[2],) if which == "down" else c[:2], p.tile_group,
                                                            tile_m=tile_m, config=cfg) for c in cs]
                        try:
                            s, _ = timed(jax.jit(fn), x, copies)
                            print(f"| {t} | {tile_m} | {which} | {tile_k} | {stages} | {s * 1e6:.1f} "
                                  f"| {floor / s:.0%} |", flush=True)
                        except Exception as e:  # noqa: BLE001
                            print(f"| {t} | {tile_m} | {which} | {tile_k} | {stages} | {type(e).__name__} | – |",
                                  flush=True)


if __name__ == "__main__":
    main()
