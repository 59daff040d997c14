"""Check and time the dense projections' kernel (pallas_kernels/grouped_matmul.dense_matmul_many) on a GPU.

    python3 scripts/check_dense_gpu.py [--sweep] [--budget-s 300]

A decode step's dense bf16 projections at M = 1, 8, 16, 64 rows, for the shapes the engine runs: Llama-3-8B
(q/k/v, o, gate+up, down, head) and DeepSeek-V2-Lite (q + kv_a, o, the shared experts' gate+up and down, the
dense layer, head). Weights of one launch share a row ("+"). For each: the largest error of the kernel against
a float32 dot over the largest output (bf16 out: about 4e-3), then CUPTI kernel time of cuBLAS (XLA's dot, one
per weight) and of the kernel (with the XLA sum of its K splits), and the kernel's bytes over the copy bandwidth
measured in the same run. Weights rotate through copies that together exceed L2. `--sweep` times other
(tile_k, stages, splits) at M = 8 and prints the best.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.grouped_matmul import dense_matmul_many, gpu  # noqa: E402
from scripts.check_paged_gpu import copy_bandwidth, device_times  # noqa: E402

SHAPES = {  # name: (K, (N, ...)) -- weights that read one x share a launch
    "llama q+k+v": (4096, (4096, 1024, 1024)),
    "llama o": (4096, (4096,)),
    "llama gate+up": (4096, (14336, 14336)),
    "llama down": (14336, (4096,)),
    "llama head": (4096, (128256,)),
    "v2-lite q+kv_a": (2048, (3072, 576)),
    "v2-lite o": (2048, (2048,)),
    "v2-lite shared gate+up": (2048, (2816, 2816)),
    "v2-lite shared down": (2816, (2048,)),
    "v2-lite dense gate+up": (2048, (10944, 10944)),
    "v2-lite dense down": (10944, (2048,)),
    "v2-lite head": (2048, (102400,)),
}
L2_BYTES = 60 << 20


def copies_for(k, ns, key):
    nbytes = k * sum(ns) * 2
    n = max(2, -(-2 * L2_BYTES // nbytes))
    return [[jax.random.normal(jax.random.fold_in(key, c * 8 + i), (k, w), jnp.bfloat16) * 0.02
             for i, w in enumerate(ns)] for c in range(n)]


def run(name, k, ns, ms, bw, key, budget_end):
    copies = copies_for(k, ns, key)
    wbytes = k * sum(ns) * 2
    for m in ms:
        if time.time() > budget_end:
            print(f"| {name} | {m} | (budget spent) |")
            return
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
        head = name.endswith("head")
        out = jnp.float32 if head else None
        kern = jax.jit(lambda x, cs: [dense_matmul_many(x, c, out_dtype=out) for c in cs])
        xla = jax.jit(lambda x, cs: [[jnp.dot(x, w, preferred_element_type=out) for w in c] for c in cs])
        try:
            got = jax.jit(lambda x, c: dense_matmul_many(x, c, out_dtype=out))(x, copies[0])
            errs = []
            for y, w in zip(got, copies[0]):
                want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
                errs.append(float(jnp.abs(y.astype(jnp.float32) - want).max() / jnp.abs(want).max()))
            err = f"{max(errs):.1e}"
        except Exception as e:  # noqa: BLE001
            print(f"| {name} | {m} | check failed: {type(e).__name__}: {str(e)[:300]} |")
            continue
        _, t_xla = device_times(xla, x, copies)
        _, t_kern = device_times(kern, x, copies)
        t_xla, t_kern = t_xla / len(copies), t_kern / len(copies)
        cfg = gpu.dense_config(max(8, -(-m // 8) * 8), k, sum(ns) // gpu.TILE_N)
        print(f"| {name} | {m} | {wbytes / 1e6:.1f} | {t_xla * 1e6:.1f} ({wbytes / t_xla / bw:.0%}) | "
              f"{t_kern * 1e6:.1f} ({wbytes / t_kern / bw:.0%}) | {t_xla / t_kern:.2f}× | {err} | "
              f"({cfg.tile_k}, {cfg.stages}, {cfg.splits}) |", flush=True)


def sweep(name, k, ns, bw, key, budget_end):
    copies = copies_for(k, ns, key)
    wbytes = k * sum(ns) * 2
    m = 8
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    w3 = [tuple(w[None] for w in c) for c in copies]
    zero = jnp.zeros((1,), jnp.int32)
    found = []
    for tile_k in (64, 128, 256):
        for stages in (2, 4, 6):
            for splits in (1, 2, 4, 8, 16):
                if k % (tile_k * splits) or time.time() > budget_end:
                    continue
                cfg = gpu.Config(tile_k, stages, splits)
                fn = jax.jit(lambda x, cs, cfg=cfg: [gpu.grouped_matmul_many(x, c, zero, tile_m=8, config=cfg)
                                                     for c in cs])
                try:
                    _, t = device_times(fn, x, w3)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                found.append((t / len(copies), cfg))
    found.sort(key=lambda f: f[0])
    best = ", ".join(f"({c.tile_k}, {c.stages}, {c.splits}) {t * 1e6:.1f} µs ({wbytes / t / bw:.0%})"
                     for t, c in found[:4])
    default = gpu.dense_config(8, k, sum(ns) // gpu.TILE_N)
    mine = next((f"{t * 1e6:.1f}" for t, c in found if c == default), "–")
    print(f"| {name} | {best} | default ({default.tile_k}, {default.stages}, {default.splits}): {mine} µs |",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ms", default="1,8,16,64")
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    end = time.time() + args.budget_s
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")} if args.shapes else SHAPES
    bw = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write of 1 GiB)\n")
    print("| projection | M | weight MB | cuBLAS µs (of copy bw) | kernel µs (of copy bw) | kernel × cuBLAS | "
          "max err | (tile_k, stages, splits) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    key = jax.random.key(0)
    ms = [int(m) for m in args.ms.split(",")]
    for name, (k, ns) in shapes.items():
        run(name, k, ns, ms, bw, key, end)
    if args.sweep:
        print("\nM = 8, the kernel by (tile_k, stages, splits): the best four\n")
        print("| projection | best | default |\n|---|---|---|")
        for name, (k, ns) in shapes.items():
            sweep(name, k, ns, bw, key, end)


if __name__ == "__main__":
    main()
