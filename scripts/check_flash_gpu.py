"""The Mosaic GPU flash-attention kernel against the pure-JAX reference, on a GPU.

    python scripts/check_flash_gpu.py [--bench] [--sweep]

Ragged packings (length-1 and empty sequences, block-edge and unaligned ends,
padding tails, GQA 1..8, sliding window, soft cap, head_dim 64/128/256, f16)
and the benchmark shape (bf16, 32 query / 8 KV heads, head_dim 128, 8 x 4096
tokens, checked per sequence: the dense reference of all 32768 tokens would not
fit). Prints max |error| and PASS/FAIL per case; an exception fails its case
only. `--bench` times the benchmark shape against cuDNN
(`jax.nn.dot_product_attention(implementation='cudnn')`) in TFLOP/s of the
causal half; `--sweep` also times the kernel's tunables. Exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.flash_attention import gpu as fa_gpu  # noqa: E402
from pallas_kernels.flash_attention import reference  # noqa: E402

reference = jax.jit(reference, static_argnames=("sm_scale", "sliding_window", "soft_cap"))

# name: (cu_seqlens, T, q_heads, kv_heads, head_dim, dtype, attention options, kernel options)
CASES = {
    "len1_block_edges_padding_gqa4": ([0, 1, 64, 128, 300, 555], 640, 8, 2, 128, jnp.bfloat16, {}, {}),
    "empty_and_short_sequences_mqa": ([0, 0, 1, 2, 3, 5, 8, 129, 1000], 1024, 4, 1, 128, jnp.bfloat16, {}, {}),
    "unaligned_tokens_window_softcap_d64": ([0, 3, 700, 1500, 1999], 1999, 8, 2, 64, jnp.bfloat16,
                                            dict(sliding_window=100, soft_cap=30.0), {}),
    "window_smaller_than_block_f16": ([0, 517, 2048], 2048, 4, 4, 128, jnp.float16,
                                      dict(sliding_window=33), {}),
    "head_dim_256_gqa2": ([0, 77, 900], 1024, 4, 2, 256, jnp.bfloat16, {}, {}),
    "block_kv_64_three_stages": ([0, 1, 64, 500, 1024], 1024, 8, 1, 128, jnp.bfloat16, {},
                                 dict(block_kv=64, num_stages=3)),
    "one_sequence_all_tokens_gqa8": ([0, 4096], 4096, 32, 4, 128, jnp.bfloat16, {}, {}),
}
BENCH = (8, 4096, 32, 8, 128)  # sequences, tokens each, q heads, kv heads, head_dim


def _inputs(num_tokens, q_heads, kv_heads, head_dim, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (num_tokens, h, head_dim), jnp.float32).astype(dtype)
                 for key, h in ((kq, q_heads), (kk, kv_heads), (kv, kv_heads)))


TOL = 3e-2  # absolute and relative, as in tests/test_flash_attention_gpu.py


def _report(name, got, want, padding_nonzero=False):
    """got, want: float32 numpy arrays."""
    err = float(np.max(np.abs(got - want)))
    ok = bool(np.allclose(got, want, atol=TOL, rtol=TOL)) and not padding_nonzero
    note = "  padding rows not zero" if padding_nonzero else ""
    print(f"{name:42s} max|err| {err:9.2e}  {'PASS' if ok else 'FAIL'}{note}", flush=True)
    return ok


def check_case(name) -> bool:
    cu, num_tokens, hq, hkv, d, dtype, options, kernel_options = CASES[name]
    q, k, v = _inputs(num_tokens, hq, hkv, d, dtype)
    cu = jnp.asarray(cu, jnp.int32)
    scale = d ** -0.5
    want = np.asarray(reference(q, k, v, cu, sm_scale=scale, **options), np.float32)
    kernel = jax.jit(functools.partial(fa_gpu.flash_attention, sm_scale=scale, **options, **kernel_options))
    got = np.asarray(kernel(q, k, v, cu), np.float32)
    return _report(name, got, want, bool(np.any(got[int(cu[-1]):])))


def check_benchmark_shape() -> bool:
    num_seqs, seq_len, hq, hkv, d = BENCH
    q, k, v = _inputs(num_seqs * seq_len, hq, hkv, d, jnp.bfloat16, seed=1)
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32) * seq_len
    scale = d ** -0.5
    got = jax.jit(functools.partial(flash_attention, sm_scale=scale))(q, k, v, cu)
    one = jnp.array([0, seq_len], jnp.int32)
    want = [reference(q[rows], k[rows], v[rows], one, sm_scale=scale)
            for rows in (slice(s * seq_len, (s + 1) * seq_len) for s in range(num_seqs))]
    want = np.concatenate([np.asarray(w, np.float32) for w in want])
    return _report("benchmark_8x4096_32q8kv_d128 (public fn)", np.asarray(got, np.float32), want)


def _timeit(fn, *args, repeats=20, warmup=3) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench(sweep: bool) -> None:
    num_seqs, seq_len, hq, hkv, d = BENCH
    q, k, v = _inputs(num_seqs * seq_len, hq, hkv, d, jnp.bfloat16, seed=2)
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32) * seq_len
    scale = d ** -0.5
    flops = 4 * num_seqs * seq_len * seq_len * hq * d / 2  # causal half
    rows = []

    def cudnn(q, k, v):
        batched = [x.reshape(num_seqs, seq_len, *x.shape[1:]) for x in (q, k, v)]
        out = jax.nn.dot_product_attention(*batched, scale=scale, is_causal=True, implementation="cudnn")
        return out.reshape(q.shape)

    candidates = [("cudnn", jax.jit(cudnn), (q, k, v)),
                  ("ours (defaults)", jax.jit(functools.partial(fa_gpu.flash_attention, sm_scale=scale)),
                   (q, k, v, cu))]
    if sweep:
        for block_kv, stages in itertools.product((64, 128), (2, 3, 4)):
            fn = jax.jit(functools.partial(fa_gpu.flash_attention, sm_scale=scale, block_kv=block_kv,
                                           num_stages=stages))
            candidates.append((f"ours block_kv={block_kv} stages={stages}", fn, (q, k, v, cu)))
    for name, fn, args in candidates:
        try:
            seconds = _timeit(fn, *args)
            rows.append((name, seconds))
            print(f"{name:36s} {seconds * 1e3:8.3f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not fit SMEM only skips its row
            print(f"{name:36s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    if rows and rows[0][0] == "cudnn":
        for name, seconds in rows[1:]:
            print(f"{name:36s} {rows[0][1] / seconds:6.1%} of cuDNN")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time the benchmark shape against cuDNN")
    parser.add_argument("--sweep", action="store_true", help="with --bench: also time block_kv x num_stages")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    print("command: python " + " ".join(sys.argv), flush=True)
    results = []
    for name in CASES:
        try:
            results.append(check_case(name))
        except Exception:  # noqa: BLE001 - report and go on to the next case
            print(f"{name:42s} EXCEPTION  FAIL", flush=True)
            traceback.print_exc()
            results.append(False)
    try:
        results.append(check_benchmark_shape())
    except Exception:  # noqa: BLE001
        print("benchmark shape EXCEPTION  FAIL", flush=True)
        traceback.print_exc()
        results.append(False)
    print(f"{sum(results)}/{len(results)} PASS", flush=True)
    if args.bench or args.sweep:
        bench(args.sweep)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
