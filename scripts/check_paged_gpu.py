"""Checks the Mosaic GPU ragged paged-attention kernel on a real GPU: correctness
against the pure-JAX reference on ragged cases and at the benchmark shapes (bf16,
int8, fp8 KV), then decode timings against the device's copy bandwidth and JAX's
own (Triton) Pallas paged attention. Every case catches and prints its own
exception, so one run reports everything.

    python scripts/check_paged_gpu.py            # checks + benchmark table
    python scripts/check_paged_gpu.py --sweep    # also a small tuning sweep
    python scripts/check_paged_gpu.py --quick    # checks only
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import kv_quantization  # noqa: E402
from pallas_kernels.paged_attention import gpu as pa_gpu  # noqa: E402
from pallas_kernels.paged_attention import ragged_paged_attention  # noqa: E402
from pallas_kernels.paged_attention import reference as _reference  # noqa: E402
from tests.paged_inputs import ragged_paged_inputs  # noqa: E402

reference = jax.jit(_reference, static_argnames=("max_q_len", "sm_scale", "sliding_window", "soft_cap"))
RESULTS: list[tuple[str, str]] = []


def make_inputs(seqs, num_tokens, num_seqs, q_heads, kv_heads, head_dim, page_size, pages_per_seq,
                kv_dtype=jnp.bfloat16, seed=0):
    """tests/paged_inputs.py's ragged batch; quantized pages come with per-token scales."""
    args, max_q_len = ragged_paged_inputs(seqs, num_tokens, num_seqs, q_heads, kv_heads, head_dim,
                                          page_size, pages_per_seq, seed=seed)
    scales = {}
    if jnp.dtype(kv_dtype) != jnp.dtype(jnp.bfloat16):
        q, k_pages, v_pages, *rest = args
        k_pages, ks = kv_quantization.quantize(k_pages, kv_dtype)
        v_pages, vs = kv_quantization.quantize(v_pages, kv_dtype)
        args, scales = (q, k_pages, v_pages, *rest), dict(k_scale=ks, v_scale=vs)
    return args, scales, max_q_len


def record(name, ok, detail):
    status = "PASS" if ok else "FAIL"
    RESULTS.append((name, status))
    print(f"{status}  {name:60s} {detail}", flush=True)


def check(name, inputs, options=None, kernel_options=None, tol=3e-2):
    options, kernel_options = options or {}, kernel_options or {}
    try:
        args, scales, max_q_len = inputs()
        sm_scale = args[0].shape[-1] ** -0.5
        want = reference(*args, max_q_len=max_q_len, sm_scale=sm_scale, **scales, **options)
        got = pa_gpu.ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=sm_scale, **scales,
                                            **options, **kernel_options)
        public = ragged_paged_attention(*args, max_q_len=max_q_len, sm_scale=sm_scale, **scales, **options)
        got, want, public = (np.asarray(x, np.float32) for x in (got, want, public))
        err = float(np.max(np.abs(got - want)))
        err_public = float(np.max(np.abs(public - got)))
        pad = float(np.max(np.abs(got[int(args[-1][-1]):]))) if got.shape[0] > int(args[-1][-1]) else 0.0
        finite = bool(np.all(np.isfinite(got)))
        ok = err <= tol and pad == 0.0 and finite and err_public <= tol
        record(name, ok, f"max|kernel-ref|={err:.2e} max|public-kernel|={err_public:.2e} "
                         f"padding={pad:.1e} finite={finite}")
    except Exception as e:  # noqa: BLE001 -- report every case
        record(name, False, f"EXCEPTION {type(e).__name__}: {str(e)[:2000]}")
        traceback.print_exc()


RAGGED = {
    # name: (seqs, T, S, q_heads, kv_heads, head_dim, page_size, P, kernel options, options)
    "decode_kv_len_1_page_and_block_edges_gqa4":
        ([(1, 1), (1, 16), (1, 64), (1, 65), (1, 127), (1, 128), (1, 1000)], 8, 8, 32, 8, 128, 16, 64, {}, {}),
    "mixed_prefill_chunks_mid_context_decodes_empty_slots":
        ([(1, 9), (37, 300), (1, 1), (0, 0), (128, 128), (3, 3), (1, 2049)], 200, 9, 32, 8, 128, 16, 130, {}, {}),
    "many_short_one_long_mqa":
        ([(1, 3)] * 20 + [(64, 3000)], 100, 24, 8, 1, 128, 16, 190, {}, {}),
    "gqa8_head_dim_64_page_8":
        ([(1, 100), (17, 400), (1, 7)], 32, 4, 16, 2, 64, 8, 64, {}, {}),
    "sliding_window_soft_cap":
        ([(1, 1500), (40, 900), (1, 6)], 48, 4, 32, 8, 128, 16, 100, {}, dict(sliding_window=256, soft_cap=30.0)),
    "split_kv_4_decode_batch_1":
        ([(1, 4096)], 1, 1, 32, 8, 128, 16, 256, dict(num_splits=4), {}),
    "split_kv_default_decode_batch_2_long":
        ([(1, 16384), (1, 333)], 2, 2, 32, 8, 128, 16, 1024, {}, {}),
    "pages_per_block_8_stages_2":
        ([(1, 1000), (20, 700)], 24, 3, 32, 8, 128, 16, 64, dict(pages_per_block=8, num_stages=2), {}),
    "one_compute_warpgroup_stages_3":
        ([(1, 1000), (20, 700), (1, 64)], 24, 3, 32, 8, 128, 16, 64, dict(num_compute=1, num_stages=3), {}),
    "head_dim_256_falls_back_to_one_slot":
        ([(1, 300), (5, 200)], 8, 2, 8, 2, 256, 16, 20, {}, {}),
}

BENCH = dict(batch=64, context=4096, q_heads=32, kv_heads=8, head_dim=128, page_size=16)


QUANT_PAGE_SIZE = 32  # the GPU kernel's int8/fp8 pages need a multiple of 32 (see gpu.supports)


def bench_inputs(kv_dtype, seed=0):
    b = BENCH
    quantized = jnp.dtype(kv_dtype) != jnp.dtype(jnp.bfloat16)
    page_size = QUANT_PAGE_SIZE if quantized else b["page_size"]
    pages_per_seq = b["context"] // page_size
    return make_inputs([(1, b["context"])] * b["batch"], b["batch"], b["batch"], b["q_heads"], b["kv_heads"],
                       b["head_dim"], page_size, pages_per_seq, kv_dtype, seed)


def timed(fn, *args, iters=100):
    """Mean seconds per call, dispatch pipelined (includes the XLA glue around kernels)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def device_times(fn, *args, iters=10):
    """(largest kernel, all kernels) device seconds per call, medians over iterations, by CUPTI;
    (nan, nan) where CUPTI is unavailable."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, runs = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
        largest = float(np.median([max(ms for _, ms in run) for run in runs]))
        total = float(np.median([sum(ms for _, ms in run) for run in runs]))
        return largest / 1e3, total / 1e3
    except Exception as e:  # noqa: BLE001
        print(f"  (CUPTI timing unavailable: {type(e).__name__}: {str(e)[:200]})")
        return float("nan"), float("nan")


def copy_bandwidth():
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
    seconds = timed(jax.jit(lambda x: x + 1), x, iters=50)
    return 2 * x.nbytes / seconds


def benchmark(sweep: bool):
    try:
        bw = copy_bandwidth()
        print(f"\ndevice copy bandwidth: {bw / 1e12:.2f} TB/s (read + write of 1 GiB)")
    except Exception as e:  # noqa: BLE001
        print(f"copy bandwidth failed: {e}")
        bw = float("nan")
    b = BENCH
    print(f"benchmark: batch {b['batch']} decode, context {b['context']}, {b['q_heads']}/{b['kv_heads']} heads, "
          f"head_dim {b['head_dim']}, page_size {b['page_size']}; time per call includes XLA glue")
    print("wall: per call, dispatch pipelined; kernel/all: CUPTI device time of the largest kernel / of "
          "all kernels; GB/s and % of copy bandwidth from the kernel time (KV bytes read)")
    print(f"{'impl':44s} {'kv':13s} {'wall us':>8s} {'kernel us':>9s} {'all us':>8s} {'GB/s':>7s} "
          f"{'% copy bw':>9s}")
    configs = [dict()]
    if sweep:
        configs += [dict(num_compute=c, num_stages=s, pages_per_block=p)
                    for c in (1, 2) for s in (2, 4) for p in (4, 8)]
        configs += [dict(num_splits=2), dict(num_compute=1, num_stages=6)]
    for kv_dtype in (jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn):
        kv_name = jnp.dtype(kv_dtype).name
        try:
            args, scales, _ = bench_inputs(kv_dtype)
        except Exception as e:  # noqa: BLE001
            print(f"inputs {kv_name} failed: {e}")
            continue
        q, k_pages, v_pages, kv_lens, table, cu = args
        kv_bytes = 2 * b["batch"] * b["context"] * b["kv_heads"] * b["head_dim"] * jnp.dtype(kv_dtype).itemsize
        if scales:
            kv_bytes += 2 * b["batch"] * b["context"] * b["kv_heads"] * 4

        def row(name, fn, *fn_args):
            wall = timed(fn, *fn_args)
            kernel, total = device_times(fn, *fn_args)
            rate = kv_bytes / (kernel if kernel == kernel else wall)
            print(f"{name:44s} {kv_name:13s} {wall * 1e6:8.1f} {kernel * 1e6:9.1f} {total * 1e6:8.1f} "
                  f"{rate / 1e9:7.0f} {100 * rate / bw:8.1f}%", flush=True)

        for config in configs:
            name = "mosaic_gpu " + (",".join(f"{k}={v}" for k, v in config.items()) or "default")
            try:
                fn = jax.jit(functools.partial(pa_gpu.ragged_paged_attention, max_q_len=1,
                                               sm_scale=b["head_dim"] ** -0.5, **config))
                row(name, lambda *a: fn(*a, **scales), *args)
            except Exception as e:  # noqa: BLE001
                print(f"{name:44s} {kv_name:13s} EXCEPTION {type(e).__name__}: {str(e)[:300]}")
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as triton_pa

            kt, vt = k_pages.transpose(2, 0, 1, 3), v_pages.transpose(2, 0, 1, 3)  # [K, pages, ps, D]
            tscales = {}
            if scales:
                tscales = dict(k_scales_pages=scales["k_scale"].transpose(1, 0, 2),
                               v_scales_pages=scales["v_scale"].transpose(1, 0, 2))
            for k_splits in (1, 16):
                fn = jax.jit(functools.partial(triton_pa.paged_attention, k_splits=k_splits,
                                               pages_per_compute_block=8))
                row(f"jax pallas triton paged_attention k_splits={k_splits}",
                    lambda *a: fn(*a, **tscales), q, kt, vt, table, kv_lens)
        except Exception as e:  # noqa: BLE001
            print(f"{'jax pallas triton paged_attention':44s} {kv_name:13s} EXCEPTION {type(e).__name__}: "
                  f"{str(e)[:300]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="correctness checks only")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep num_compute/num_stages/pages_per_block/num_splits")
    flags = parser.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)

    for name, (seqs, t, s, hq, hkv, d, ps, p, kernel_options, options) in RAGGED.items():
        check(name, functools.partial(make_inputs, seqs, t, s, hq, hkv, d, ps, p), options, kernel_options)
    for kv_dtype in (jnp.int8, jnp.float8_e4m3fn):
        name = f"mixed_quantized_{jnp.dtype(kv_dtype).name}"
        seqs, t, s, hq, hkv, d, ps, p, _, _ = RAGGED["mixed_prefill_chunks_mid_context_decodes_empty_slots"]
        p = -(-p * ps // QUANT_PAGE_SIZE)
        check(name, functools.partial(make_inputs, seqs, t, s, hq, hkv, d, QUANT_PAGE_SIZE, p, kv_dtype))
    for kv_dtype in (jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn):
        check(f"benchmark_shape_decode_{jnp.dtype(kv_dtype).name}", functools.partial(bench_inputs, kv_dtype))

    failed = [n for n, status in RESULTS if status != "PASS"]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not flags.quick:
        benchmark(flags.sweep)
    print("\ncommand:", " ".join([Path(sys.executable).name] + sys.argv))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
