"""Checks the Mosaic GPU quantized-matmul kernel on a real GPU, then times it at Llama-3-8B's
projection shapes against bf16 and against XLA's dequantize-then-dot (issue 12, kernel level).

    python scripts/check_quantized_gpu.py             # checks + the kernel table
    python scripts/check_quantized_gpu.py --quick     # checks only
    python scripts/check_quantized_gpu.py --sweep     # also a small tuning sweep (tile_k, stages, splits)

Checks: the kernel against the pure-JAX reference (float32, HIGHEST) on ragged M, every grouping,
int4 zero points and several K splits; it must agree to bf16 rounding of the dequantized weight.

Table: for K x N in 4096 x 14336, 14336 x 4096, 4096 x 6144 and M in 1, 16, 64, 256, the time of
one matmul (weights rotated through enough copies to keep them out of the 50 MB L2, timed
back to back in one jitted call), the bytes it must move (weight values + scales + zeros + x + y)
over that time as a fraction of --hbm-tbps (H200 datasheet: 4.8 TB/s), and the speed-up over
bf16. "kernel" is what the public entry point runs (the Mosaic kernel for M <= 128, XLA's
dequantize-then-dot above), "xla" forces the latter, so the table shows the dispatch's basis.
Every case prints its own failure and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.quantized_matmul import gpu, parse, quantize, quantized_matmul, reference  # noqa: E402
from pallas_kernels import quantized_matmul as qm  # noqa: E402

RESULTS: list[tuple[str, str]] = []
TIMER = ["-"]  # how the table was timed
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144)]  # (K, N): gate/up, down, fused qkv
METHODS = ("int8", "int4", "fp8")  # vLLM's names: int8 and int4 group by 128, fp8 per channel


def record(name, ok, detail):
    RESULTS.append((name, "PASS" if ok else "FAIL"))
    print(f"{'PASS' if ok else 'FAIL'}  {name:56s} {detail}", flush=True)


def weights(k, n, spec, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    return {name: jnp.asarray(a) for name, a in quantize(w, parse(spec)).items()}


def check(spec, m, k, n, config=None):
    name = f"{spec} M={m} K={k} N={n}" + (f" {config}" if config else "")
    try:
        scheme = parse(spec)
        parts = weights(k, n, spec, seed=m + k)
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
        args = (x, parts["values"], parts["scales"], parts.get("zeros"))
        want = reference(x.astype(jnp.float32), *args[1:], scheme, out_dtype=jnp.float32)
        scale = float(jnp.abs(want).max())
        errs = []
        for out_dtype in (jnp.float32, jnp.bfloat16):  # float32: partials summed in XLA; bf16: y from the kernel
            got = jax.jit(lambda *a, d=out_dtype: gpu.quantized_matmul(
                *a, scheme, out_dtype=d, config=None if config is None else gpu.Config(*config)))(*args)
            assert got.shape == (m, n) and got.dtype == out_dtype, (got.shape, got.dtype)
            errs.append(float(jnp.abs(got.astype(jnp.float32) - want).max()) / scale)
        record(name, errs[0] < 1e-4 and errs[1] < 1e-2, "max |err| / max |y|: float32 out "
               f"{errs[0]:.2e}, bf16 out {errs[1]:.2e}")
    except Exception as e:  # noqa: BLE001
        record(name, False, f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()


def time_per_call(fn, x, copies, reps=7):
    """Median seconds per matmul over `reps` calls of `fn`, each running every copy once: the device
    time of the kernels the call launches (CUPTI, through Mosaic GPU's profiler), or the wall time
    around block_until_ready where CUPTI is not there (then launch gaps count too)."""
    out = fn(x, copies)
    jax.block_until_ready(out)
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, ms = profiler.measure(fn, iterations=reps)(x, copies)
        TIMER[0] = "CUPTI kernel time"
        return statistics.median(ms) / 1e3 / len(copies)
    except Exception as e:  # noqa: BLE001
        TIMER[0] = f"wall clock (CUPTI: {type(e).__name__})"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, copies))
        times.append((time.perf_counter() - t0) / len(copies))
    return statistics.median(times)


def bench(k, n, m, hbm, rows, methods=METHODS):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)) * 0.5, jnp.bfloat16)
    io_bytes = m * k * 2 + m * n * 2

    def run_one(label, per_copy, bytes_per_copy, matmul):
        n_copies = int(min(24, max(2, -(-3 * 50e6 // bytes_per_copy))))
        copies = [per_copy(i) for i in range(n_copies)]
        fn = jax.jit(lambda x, cs: [matmul(x, c) for c in cs])
        try:
            t = time_per_call(fn, x, copies)
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        moved = bytes_per_copy + io_bytes
        rows.append(dict(k=k, n=n, m=m, method=label, us=t * 1e6, gbps=moved / t / 1e9, roofline=moved / t / hbm))
        return t

    bf16 = run_one("bf16", lambda i: jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02, k * n * 2,
                   lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    for method in methods:
        scheme = qm.parse(method)
        shapes = scheme.shapes(k, n)
        nbytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in shapes.values())
        if scheme.method == "int4":
            nbytes -= int(np.prod(shapes["values"][0])) // 2  # packed two a byte on the device
        copy = functools.partial(random_parts, shapes)

        def kernel(x, c, scheme=scheme):
            return quantized_matmul(x, c["values"], c["scales"], c.get("zeros"), scheme)

        def xla(x, c, scheme=scheme):
            return qm._xla(x, c["values"], c["scales"], c.get("zeros"), scheme, out_dtype=x.dtype)

        for label, fn in ((method, kernel), (method + "-xla", xla)):
            t = run_one(label, copy, nbytes, fn)
            if t and bf16:
                rows[-1]["vs_bf16"] = bf16 / t


def random_parts(shapes, seed):
    """A quantized weight of random levels made on the device (its values do not change the timing); each
    seed is a distinct buffer, so rotating through copies reads them from HBM, not L2."""
    from jaxinfer.layers.param import initial_value

    key = jax.random.key(seed)
    return {name: initial_value("levels" if name == "values" else "fill", key, shape, dtype, scale=0.001)
            for name, (shape, dtype) in shapes.items()}


def fused(hbm, rows_out):
    """q/k/v (K 4096, N 4096 + 1024 + 1024) and gate/up (K 4096, N 2 x 14336) at decode sizes: one launch for the
    group (quantized_matmul_many) against one launch each, and bf16 (one cuBLAS call each)."""
    from pallas_kernels.quantized_matmul import quantized_matmul_many

    print("\n## One launch for q/k/v and for gate/up, against one launch each (CUPTI kernel time per group)\n")
    print("| group | M | bf16 | method | one each | one launch | speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for label, k, ns in (("q/k/v", 4096, (4096, 1024, 1024)), ("gate/up", 4096, (14336, 14336))):
        for m in (1, 16, 64):
            x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)) * 0.5, jnp.bfloat16)
            n_copies = 6
            bf = [[jax.random.normal(jax.random.key(10 * i + j), (k, n), jnp.bfloat16) * 0.02
                   for j, n in enumerate(ns)] for i in range(n_copies)]
            t_bf16 = time_per_call(jax.jit(lambda x, cs: [[jnp.dot(x, w) for w in c] for c in cs]), x, bf)
            del bf
            for method in ("int8", "int4"):
                scheme = parse(method)
                copies = [[random_parts(scheme.shapes(k, n), 100 * i + j) for j, n in enumerate(ns)]
                          for i in range(n_copies)]

                def each(x, cs, scheme=scheme):
                    return [[quantized_matmul(x, w["values"], w["scales"], w.get("zeros"), scheme) for w in c]
                            for c in cs]

                def one(x, cs, scheme=scheme):
                    return [quantized_matmul_many(x, [(w["values"], w["scales"], w.get("zeros")) for w in c], scheme)
                            for c in cs]

                try:
                    t_each = time_per_call(jax.jit(each), x, copies)
                    t_one = time_per_call(jax.jit(one), x, copies)
                except Exception as e:  # noqa: BLE001
                    print(f"| {label} | {m} | - | {method} | {type(e).__name__}: {str(e)[:80]} | | |", flush=True)
                    continue
                rows_out.append(dict(group=label, m=m, method=method, bf16_us=t_bf16 * 1e6, each_us=t_each * 1e6,
                                     one_us=t_one * 1e6))
                print(f"| {label} | {m} | {t_bf16 * 1e6:.1f} µs | {method} | {t_each * 1e6:.1f} µs | "
                      f"{t_one * 1e6:.1f} µs | {t_each / t_one:.2f}× (vs bf16 {t_bf16 / t_one:.2f}×) |", flush=True)


def sweep(hbm, budget_s, ms=(1, 64), specs=("int4", "int8"), shapes=None):
    """Time the kernel's configs (tile_k, stages, splits, overlap) per shape, M and scheme, the default first."""
    deadline = time.perf_counter() + budget_s
    shapes = shapes or SHAPES[:2]
    print(f"\n== sweep (M in {ms}, {', '.join(specs)}, K x N in {shapes})")
    for k, n in shapes:
        for spec in specs:
            scheme = parse(spec)
            copies = [random_parts(scheme.shapes(k, n), i) for i in range(6)]
            for m in ms:
                x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.bfloat16)
                chunk = gpu._chunk(scheme, k)
                default = gpu.default_config(m, k, n, scheme)
                configs = [default] + [
                    gpu.Config(tile_k, stages, splits, overlap)
                    for tile_k in (256, 512, 1024) if not (tile_k % chunk or k % tile_k)
                    for stages, splits, overlap in itertools.product((2, 4, 6), (1, 2, 4, 7, 8), (False, True))
                    if (k // tile_k) % splits == 0 and (k // tile_k) // splits >= 2]
                best = None
                for cfg in configs:
                    if time.perf_counter() > deadline:
                        break
                    fn = jax.jit(lambda x, cs, cfg=cfg, scheme=scheme: [
                        gpu.quantized_matmul(x, c["values"], c["scales"], c.get("zeros"), scheme, config=cfg)
                        for c in cs])
                    try:
                        t = time_per_call(fn, x, copies, reps=5)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {spec} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    best = min(best or (t, cfg), (t, cfg), key=lambda b: b[0])
                    print(f"  {spec:5s} K={k:5d} N={n:5d} M={m:3d} {cfg}{' (default)' if cfg is default else ''}: "
                          f"{t * 1e6:7.1f} us", flush=True)
                if best:
                    print(f"  best {spec} K={k} N={n} M={m}: {best[1]} {best[0] * 1e6:.1f} us", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="checks only")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-only", action="store_true", help="the sweep alone (no checks, no table)")
    p.add_argument("--no-fused", action="store_true", help="skip the one-launch q/k/v and gate/up table")
    p.add_argument("--sweep-s", type=float, default=150, help="time limit of the sweep")
    p.add_argument("--sweep-m", default="1,64", help="M values of the sweep")
    p.add_argument("--sweep-specs", default="int4,int8", help="schemes of the sweep")
    p.add_argument("--sweep-shapes", default=None, help="KxN,KxN,... (default: 4096x14336,14336x4096)")
    p.add_argument("--methods", default=",".join(METHODS), help="schemes of the kernel-level table")
    p.add_argument("--hbm-tbps", type=float, default=4.8)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({getattr(dev, 'core_count', '?')} SMs); jax {jax.__version__}", flush=True)
    if args.sweep_only:
        args.sweep, args.quick = True, False

    for spec, m, k, n, config in [] if args.sweep_only else [("int8", 1, 4096, 14336, None), ("int8-ch", 7, 4096, 1024, None),
                                  ("int8-g32", 33, 1024, 512, None), ("int4", 16, 14336, 4096, None),
                                  ("int4-g128-zp", 64, 4096, 6144, None), ("int4-g32-zp", 5, 512, 192, None),
                                  ("int4-g64", 128, 2048, 256, (256, 3, 4)), ("int4-ch", 3, 1024, 128, None),
                                  ("fp8", 64, 4096, 1024, None), ("fp8-g128", 9, 1024, 256, (128, 4, 2)),
                                  ("int8", 100, 14336, 4096, (256, 2, 7)),
                                  ("int4", 1, 4096, 14336, (512, 2, 1, True)),  # groups issued back to back
                                  ("int4-g32-zp", 16, 1024, 256, (256, 2, 2, True)),
                                  ("int8-g64", 64, 2048, 512, (256, 2, 1, True)),
                                  # GGUF Q6_K (groups of 16) and Q5_K (int8 with zero points), kept quantized
                                  ("int8-g16", 1, 4096, 1024, None), ("int8-g16", 16, 1024, 256, None),
                                  ("int8-g16", 64, 2048, 512, None), ("int8-g32-zp", 5, 512, 192, None),
                                  ("int8-g32-zp", 64, 1024, 512, None)]:
        check(spec, m, k, n, config)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\nchecks: {len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
    if args.quick:
        return 1 if failed else 0

    hbm = args.hbm_tbps * 1e12
    methods = tuple(args.methods.split(","))
    rows: list[dict] = []
    for k, n in [] if args.sweep_only else SHAPES:
        for m in (1, 16, 64, 256):
            bench(k, n, m, hbm, rows, methods)
            print(f"  timed K={k} N={n} M={m}", flush=True)
    if not args.sweep_only:
        print(f"\n## Quantized matmul, {dev.device_kind}: time per matmul ({TIMER[0]}), fraction of {args.hbm_tbps} TB/s, "
              "vs bf16\n")
        print("| K x N | M | " + " | ".join(["bf16"] + [f"{mth} | {mth} (xla)" for mth in methods]) + " |")
        print("|---|---:|" + "---:|" * (1 + 2 * len(methods)))
        for k, n in SHAPES:
            for m in (1, 16, 64, 256):
                cells = []
                for label in ["bf16"] + [lbl for mth in methods for lbl in (mth, mth + "-xla")]:
                    r = next((r for r in rows if (r["k"], r["n"], r["m"], r["method"]) == (k, n, m, label)), None)
                    if r is None:
                        cells.append("-")
                    elif label == "bf16":
                        cells.append(f"{r['us']:.1f} us ({r['roofline']:.0%})")
                    else:
                        cells.append(f"{r['us']:.1f} us ({r['roofline']:.0%}, {r.get('vs_bf16', 0):.2f}x)")
                print(f"| {k} x {n} | {m} | " + " | ".join(cells) + " |")
    if not (args.no_fused or args.sweep_only):
        fused(hbm, rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.sweep:
        shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.sweep_shapes.split(",")] \
            if args.sweep_shapes else None
        sweep(hbm, args.sweep_s, tuple(int(v) for v in args.sweep_m.split(",")), tuple(args.sweep_specs.split(",")),
              shapes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
