"""Probe: would a GEMV-shaped kernel on CUDA cores (Pallas' Triton lowering) beat the Mosaic GPU wgmma kernel
at decode sizes (M = 1..16)? Issue 12: at B = 1 the int4 kernel reaches about 36% of the HBM roofline, bound by
its per-element work (wgmma of N = 8 per 64 x 128 piece), not by HBM.

    python scripts/probe_gemv_triton.py              # on a GPU: checks, then times against bf16 and Mosaic
    python scripts/probe_gemv_triton.py --interpret  # on the CPU: the checks only, in interpret mode

Two forms, each one block per BN outputs (and K splits where the outputs alone leave SMs idle):
  fma: every weight tile widened to float32 and multiplied into x's rows on CUDA cores, a sum over K per tile
  dot: the tile widened to bf16 and fed to the tensor cores with x padded to 16 rows (Triton's mma)
int4 values are bytes in the probe's own layout: within each K tile of `bk` channels, byte j of a row holds
channel j (low nibble) and channel j + bk / 2 (high nibble), so a tile's two halves meet x's two halves
without an interleave. Group scales apply per group to the [M, BN] partial sums, not to the weights.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144)]


def pack_int4(q: np.ndarray, bk: int) -> np.ndarray:
    """q [N, K] int levels in -8..7 -> bytes [N, K / 2] in the probe's layout (halves of each bk tile)."""
    n, k = q.shape
    t = q.reshape(n, k // bk, 2, bk // 2).astype(np.int32) & 0xF
    return (t[:, :, 0] | (t[:, :, 1] << 4)).astype(np.uint8).reshape(n, k // 2)


def gemv(x, values, scales, *, method, g, bn=64, bk=256, splits=1, form="fma", warps=4, stages=3,
         interpret=False):
    """x [M, K] bf16 times W (values [N, K] int8 / fp8, or [N, K / 2] uint8 for int4; scales [K // g, N] float32,
    g = K for per channel): float32 partials [splits, Mp, N] summed here into [M, N] bf16."""
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    n = values.shape[0]
    mp = 16 if form == "dot" else max(1, 1 << (m - 1).bit_length())
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    per_channel = g == k
    gk = bk if per_channel else g  # channels per scaled partial
    assert k % (bk * splits) == 0 and bk % gk == 0 and n % bn == 0, (k, bk, splits, gk, n, bn)
    steps = k // bk // splits
    int4 = method == "int4"

    def kernel(x_ref, v_ref, s_ref, o_ref):
        split = pl.program_id(1)
        width = bk // 2 if int4 else bk  # channels per half (int4) or per tile
        c = min(gk, width)  # channels per scaled partial

        def weight(k0, h, off):
            """w [BN, c] of the tile at k0: channels k0 + h * width + off .. + c, widened."""
            if int4:
                raw = v_ref[:, pl.ds(k0 // 2 + off, c)].astype(jnp.int32)
                q = lax.shift_right_arithmetic(lax.shift_left(raw, 28 - 4 * h), 28)
            else:
                q = v_ref[:, pl.ds(k0 + off, c)]
            q = q.astype(jnp.float32)
            return q if form == "fma" else q.astype(jnp.bfloat16)

        def body(i, acc):
            k0 = (split * steps + i) * bk
            acc = list(acc)
            for h in range(2 if int4 else 1):
                for j in range(width // c):
                    cols = pl.ds(k0 + h * width + j * c, c)
                    w = weight(k0, h, j * c)
                    row = (k0 + h * width + j * c) // g
                    if form == "dot":
                        part = pltriton.dot(x_ref[:, cols], w, trans_b=True)
                        acc[0] = acc[0] + (part if per_channel else part * s_ref[pl.ds(row, 1), :])
                        continue
                    for r in range(mp):
                        part = jnp.sum(w * x_ref[pl.ds(r, 1), cols].astype(jnp.float32), axis=1)
                        acc[r] = acc[r] + (part if per_channel else part * s_ref[row, :])
            return tuple(acc)

        init = (jnp.zeros((mp, bn), jnp.float32),) if form == "dot" else tuple(
            jnp.zeros((bn,), jnp.float32) for _ in range(mp))
        acc = lax.fori_loop(0, steps, body, init)
        if form == "dot":
            o_ref[0] = acc[0] * s_ref[pl.ds(0, 1), :] if per_channel else acc[0]
        else:
            for r in range(mp):
                o_ref[0, r, :] = acc[r] * s_ref[0, :] if per_channel else acc[r]

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((mp, k), lambda i, s: (0, 0)),
                  pl.BlockSpec((bn, values.shape[1]), lambda i, s: (i, 0)),
                  pl.BlockSpec((scales.shape[0], bn), lambda i, s: (0, i))],
        out_specs=pl.BlockSpec((1, mp, bn), lambda i, s: (s, 0, i)),
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(xp, values, scales)
    return out.sum(axis=0)[:m].astype(jnp.bfloat16)


def make(method, k, n, g, bk, seed):
    """Random levels, their scales, and the float weight they stand for ([K, N] float32, for the check)."""
    rng = np.random.default_rng(seed)
    groups = k // g
    s = (rng.random((groups, n)) * 0.01 + 0.001).astype(np.float32)
    if method == "int8":
        q = rng.integers(-127, 128, (n, k)).astype(np.int8)
        stored, qf = q, q.astype(np.float32)
    elif method == "int4":
        q = rng.integers(-8, 8, (n, k)).astype(np.int8)
        stored, qf = pack_int4(q, bk), q.astype(np.float32)
    else:
        import ml_dtypes
        q = (rng.standard_normal((n, k)) * 64).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
        stored, qf = q, q.astype(np.float32)
    w = (qf.reshape(n, groups, g) * s.T[:, :, None]).reshape(n, k).T
    return jnp.asarray(stored), jnp.asarray(s), w


def configs(method, m, k, n):
    """The forms and tilings tried per shape: per tiling the two smallest K splits that give every SM a
    block (the blocks then stay within 8 per SM)."""
    out = []
    # (fma at M = 16 unrolls 16 row sums per piece: a 6.5-minute Triton compile on the H200, so not tried)
    for form in ("fma", "dot") if m <= 4 else ("dot",):
        for bn, bk in ((64, 256), (32, 256), (128, 256), (64, 512), (16, 512)):
            if form == "dot" and bn < 32:
                continue
            fits = [s for s in (1, 2, 4, 8, 16) if k % (bk * s) == 0 and k // bk // s >= 2
                    and 132 <= (n // bn) * s <= 8 * 132]
            out += [dict(form=form, bn=bn, bk=bk, splits=s) for s in fits[:2]]
    return out


def check(method, m, k, n, g, cfg, interpret):
    stored, s, w = make(method, k, n, g, cfg["bk"], seed=m + k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    want = np.asarray(xb, np.float32) @ w
    got = np.asarray(jax.jit(functools.partial(gemv, method=method, g=g, interpret=interpret, **cfg))(
        xb, stored, s), np.float32)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    ok = err < 1e-2
    print(f"{'PASS' if ok else 'FAIL'}  {method} M={m} K={k} N={n} g={g} {cfg}: max|err|/max|y| {err:.1e}", flush=True)
    return ok


def time_call(fn, x, copies, reps=7):
    out = fn(x, copies)
    jax.block_until_ready(out)
    from jax.experimental.mosaic.gpu import profiler
    _, ms = profiler.measure(fn, iterations=reps)(x, copies)
    return statistics.median(ms) / 1e3 / len(copies)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--methods", default="int4,int8")
    p.add_argument("--budget-s", type=float, default=400)
    p.add_argument("--hbm-tbps", type=float, default=4.8)
    args = p.parse_args()
    ok = True
    small = [("int8", 1, 512, 128, 128), ("int4", 3, 512, 128, 128), ("fp8", 2, 512, 128, 512),
             ("int4", 16, 1024, 64, 32), ("int8", 5, 1024, 192, 64)]
    for method, m, k, n, g in small:
        for cfg in (dict(form="fma", bn=32, bk=256, splits=2), dict(form="dot", bn=32, bk=256, splits=1)):
            ok &= check(method, m, k, n, g, cfg, args.interpret)
    if args.interpret:
        # The Triton lowering itself (what interpret mode does not cover), exported for CUDA from here.
        for method, m, k, n, g in small:
            for form in ("fma", "dot"):
                stored, s, _ = make(method, k, n, g, 256, 0)
                x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
                fn = jax.jit(functools.partial(gemv, method=method, g=g, form=form, bn=32, bk=256, splits=2))
                try:
                    jax.export.export(fn, platforms=["cuda"])(x, stored, s)
                    print(f"PASS  lowers for CUDA: {method} M={m} {form}", flush=True)
                except Exception as e:  # noqa: BLE001
                    ok = False
                    print(f"FAIL  lowers for CUDA: {method} M={m} {form}: {type(e).__name__}: {str(e)[:300]}")
        return 0 if ok else 1

    from pallas_kernels import quantized_matmul as qm
    from pallas_kernels.quantized_matmul import parse
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check_quantized_gpu import random_parts

    deadline = time.perf_counter() + args.budget_s
    hbm = args.hbm_tbps * 1e12
    print(f"\n{jax.devices()[0].device_kind}: CUPTI kernel time per matmul; % of {args.hbm_tbps} TB/s\n")
    print("| method | K x N | M | bf16 µs | Mosaic µs (%) | best probe µs (%) | probe config | × Mosaic |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for k, n in SHAPES[:2]:
        bf = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(6)]
        for method in args.methods.split(","):
            spec = {"int4": "int4", "int8": "int8", "fp8": "fp8"}[method]
            scheme = parse(spec)
            g = scheme.group(k)
            nbytes = n * k * scheme.bits // 8 + (k // g) * n * 4
            mosaic = [random_parts(scheme.shapes(k, n), i) for i in range(8)]
            for m in (int(v) for v in args.ms.split(",")):
                if time.perf_counter() > deadline:
                    break
                x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)) * 0.5, jnp.bfloat16)
                io = m * k * 2 + m * n * 2
                t_bf = time_call(jax.jit(lambda x, cs: [jnp.dot(x, w) for w in cs]), x, bf)
                t_mo = time_call(jax.jit(lambda x, cs, scheme=scheme: [
                    qm.quantized_matmul(x, c["values"], c["scales"], c.get("zeros"), scheme) for c in cs]), x, mosaic)
                best = None
                for cfg in configs(method, m, k, n):
                    if time.perf_counter() > deadline:
                        break
                    # distinct buffers made on the device, enough to keep them out of the 50 MB L2
                    shape = (n, k // 2) if method == "int4" else (n, k)
                    dtype = jnp.uint8 if method == "int4" else (jnp.int8 if method == "int8" else jnp.float8_e4m3fn)
                    copies = [(jax.random.randint(jax.random.key(i), shape, -100, 100).astype(dtype),
                               jnp.full((k // g, n), 1e-3, jnp.float32)) for i in range(8)]
                    fn = jax.jit(lambda x, cs, cfg=cfg: [gemv(x, v, s, method=method, g=g, **cfg) for v, s in cs])
                    try:
                        t = time_call(fn, x, copies, reps=5)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {method} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        continue
                    print(f"  {method} K={k} N={n} M={m} {cfg}: {t * 1e6:.1f} µs", flush=True)
                    best = min(best or (t, cfg), (t, cfg), key=lambda b: b[0])
                if best:
                    t, cfg = best
                    print(f"| {method} | {k} x {n} | {m} | {t_bf * 1e6:.1f} | {t_mo * 1e6:.1f} "
                          f"({(nbytes + io) / t_mo / hbm:.0%}) | {t * 1e6:.1f} ({(nbytes + io) / t / hbm:.0%}) | "
                          f"{cfg} | {t_mo / t:.2f}× |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
