"""Attention kernels against the hardware and against the alternatives, in one run.

    python scripts/bench_kernels.py [--sections prefill,decode,e2e] [--json FILE]

Three tables (each kernel is checked against its reference first, and the
custom call it lowered to is named, so a silent fallback shows):

  prefill  causal flash attention, bf16, 32 query / 8 KV heads, head_dim 128,
           8 x 4096 tokens: TFLOP/s of ours vs jax.nn.dot_product_attention
           with implementation='cudnn' and 'xla' (FLOPs count the causal half).
  decode   ragged paged attention, 64 sequences x 4096 context, page 16,
           bf16 and int8 KV: bandwidth of the KV bytes read vs a copy of the
           same bytes measured in this run, and vs JAX's own Pallas paged
           attention op (jax.experimental.pallas.ops.gpu.paged_attention).
  e2e      decode tokens/s of the Llama-3-8B shape (random bf16 weights) at
           batch 1 and 64, with the attention kernels vs the plain-JAX `xla`
           attention vs the dense reference.

`--small` shrinks every shape so the script can be tried on a CPU (there the
"kernels" are the references, and cuDNN is skipped).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import kv_quantization  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.flash_attention import reference as flash_reference  # noqa: E402
from pallas_kernels.paged_attention import ragged_paged_attention  # noqa: E402
from pallas_kernels.paged_attention import reference as paged_reference  # noqa: E402


def timeit(fn, *args, repeats: int = 50, warmup: int = 3) -> float:
    """Seconds per call with dispatch pipelined: `repeats` calls back to back, one wait."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def device_time(fn, *args) -> float:
    """GPU seconds per call, all kernels of the call summed (CUPTI); nan where unavailable."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, runs = profiler.measure(fn, aggregate=False, iterations=10)(*args)
        return float(np.median([sum(ms for _, ms in run) for run in runs])) / 1e3
    except Exception:  # no CUPTI (e.g. on the CPU)
        return float("nan")


def custom_call(fn, *args) -> str:
    """Which kernel a jitted function lowered to: the names of its custom calls."""
    text = jax.jit(fn).lower(*args).as_text()
    names = [n for n in ("mosaic_gpu", "__gpu$xla.gpu.triton", "tpu_custom_call", "cudnn") if n in text]
    return "+".join(names) or "xla"


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def copy_bandwidth() -> float:
    """Bytes/s of read + write for a 1 GiB device copy (x + 1, which XLA cannot skip)."""
    x = jnp.ones((1 << 29,), jnp.bfloat16)
    return 2 * x.nbytes / timeit(jax.jit(lambda x: x + 1), x)


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def prefill(args, results: dict) -> None:
    seqs, seq_len, hq, hkv, d = (2, 256, 4, 2, 64) if args.small else (8, 4096, 32, 8, 128)
    t = seqs * seq_len
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (t, hq, d), jnp.bfloat16)
    k = jax.random.normal(kk, (t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(kv, (t, hkv, d), jnp.bfloat16)
    cu = jnp.arange(seqs + 1, dtype=jnp.int32) * seq_len
    scale = d ** -0.5
    flops = 4 * seqs * seq_len * seq_len * hq * d / 2  # QK and PV, causal half

    ours = jax.jit(functools.partial(flash_attention, sm_scale=scale))
    to4 = lambda x: x.reshape(seqs, seq_len, *x.shape[1:])
    dense = {impl: jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        to4(q), to4(k), to4(v), is_causal=True, scale=scale, implementation=impl).reshape(q.shape))
        for impl in ("cudnn", "xla")}

    out = ours(q, k, v, cu)
    want = dense["xla"](q, k, v) if not args.small else flash_reference(q, k, v, cu, sm_scale=scale)
    err = max_err(out, want)
    rows, timings = [], {}
    for name, fn, call_args in [("jaxinfer flash_attention", ours, (q, k, v, cu)),
                                ("cuDNN (jax.nn, implementation='cudnn')", dense["cudnn"], (q, k, v)),
                                ("XLA (jax.nn, implementation='xla')", dense["xla"], (q, k, v))]:
        try:
            wall = timeit(fn, *call_args, repeats=20)
            dev = device_time(fn, *call_args)
            sec = dev if dev == dev else wall  # the GPU's own time where CUPTI can tell
            timings[name] = sec
            rows.append([name, custom_call(fn, *call_args), f"{wall * 1e3:.3f}", f"{dev * 1e3:.3f}",
                         f"{flops / sec / 1e12:.1f}"])
        except Exception as e:  # cuDNN is absent on the CPU
            rows.append([name, "-", "failed", str(e).splitlines()[0][:80], "-"])
    cudnn = timings.get("cuDNN (jax.nn, implementation='cudnn')")
    for r in rows:
        sec = timings.get(r[0])
        r.append(f"{cudnn / sec:.0%}" if cudnn and sec else "-")
    table(f"prefill flash attention: bf16, {hq} q / {hkv} kv heads, d {d}, {seqs} x {seq_len} causal "
          f"(ours vs XLA: max |diff| {err:.3g})",
          ["implementation", "kernel", "wall ms", "GPU ms", "TFLOP/s (GPU time)", "of cuDNN"], rows)
    results["prefill"] = {"rows": rows, "max_abs_err": err}


def _paged_inputs(seqs, ctx, hq, hkv, d, ps, dtype, seed=0):
    pages_per_seq = ctx // ps
    num_pages = seqs * pages_per_seq + 1
    rng = np.random.default_rng(seed)
    table_ = jnp.asarray(1 + rng.permutation(num_pages - 1).reshape(seqs, pages_per_seq), jnp.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (seqs, hq, d), jnp.bfloat16)
    k_pages = jax.random.normal(kk, (num_pages, ps, hkv, d), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (num_pages, ps, hkv, d), jnp.bfloat16)
    scales = {}
    if dtype != jnp.bfloat16:
        (k_pages, ks), (v_pages, vs) = (kv_quantization.quantize(k_pages, dtype),
                                        kv_quantization.quantize(v_pages, dtype))
        scales = dict(k_scale=ks, v_scale=vs)
    kv_lens = jnp.full((seqs,), ctx, jnp.int32)
    cu = jnp.arange(seqs + 1, dtype=jnp.int32)
    return q, k_pages, v_pages, kv_lens, table_, cu, scales


def decode(args, results: dict) -> None:
    seqs, ctx, hq, hkv, d, ps = (4, 256, 4, 2, 64, 16) if args.small else (64, 4096, 32, 8, 128, 16)
    scale = d ** -0.5
    rows = []
    copy = copy_bandwidth()
    # The GPU kernel takes int8/fp8 pages of 32 tokens or more (pallas_kernels/paged_attention/gpu.py).
    for dtype, ps in ((jnp.bfloat16, ps), (jnp.bfloat16, 2 * ps), (jnp.int8, 2 * ps)):
        q, k_pages, v_pages, kv_lens, table_, cu, scales = _paged_inputs(seqs, ctx, hq, hkv, d, ps, dtype)
        kv_bytes = 2 * seqs * ctx * hkv * d * jnp.dtype(dtype).itemsize
        if scales:
            kv_bytes += 2 * seqs * ctx * hkv * 4
        ours = jax.jit(lambda q, kp, vp, lens, tab, cu, sc: ragged_paged_attention(
            q, kp, vp, lens, tab, cu, max_q_len=1, sm_scale=scale, **sc))
        call = (q, k_pages, v_pages, kv_lens, table_, cu, scales)
        err = max_err(ours(*call), paged_reference(q, k_pages, v_pages, kv_lens, table_, cu, max_q_len=1,
                                                   sm_scale=scale, **scales))
        entries = [("jaxinfer ragged_paged_attention", ours, call)]
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
            kt, vt = k_pages.transpose(2, 0, 1, 3), v_pages.transpose(2, 0, 1, 3)  # [K, pages, ps, D]
            qs = q * scale  # that op applies no softmax scale
            extra = {}
            if scales:
                extra = dict(k_scales_pages=scales["k_scale"].transpose(1, 0, 2),
                             v_scales_pages=scales["v_scale"].transpose(1, 0, 2))
            for splits in (16, 1):  # its default, and no split (better at batch 64)
                theirs = jax.jit(lambda q, k, v, tab, lens, ex, splits=splits: jax_paged.paged_attention(
                    q, k, v, tab, lens, k_splits=splits, **ex))
                entries.append((f"JAX Pallas paged_attention k_splits={splits}", theirs,
                                (qs, kt, vt, table_, kv_lens, extra)))
        except ImportError as e:
            print("JAX's GPU paged attention op is unavailable:", e)
        timings = {}
        for name, fn, call_args in entries:
            try:
                wall = timeit(fn, *call_args)
                dev = device_time(fn, *call_args)
                sec = dev if dev == dev else wall
                timings[name] = sec
                bw = kv_bytes / sec
                rows.append([jnp.dtype(dtype).name, ps, name, custom_call(fn, *call_args), f"{wall * 1e6:.0f}",
                             f"{dev * 1e6:.0f}",
                             f"{bw / 1e9:.0f}", f"{bw / copy:.0%}", f"{copy / 1e9:.0f}",
                             f"{err:.3g}" if name.startswith("jaxinfer") else "-", ""])
            except Exception as e:
                rows.append([jnp.dtype(dtype).name, ps, name, "-", "failed", str(e).splitlines()[0][:80],
                             "-", "-", "-", "-", ""])
        mine = timings.get(entries[0][0])
        theirs_t = min((timings[n] for n, _, _ in entries[1:] if n in timings), default=None)
        if mine and theirs_t:
            rows[-len(entries)][-1] = f"{theirs_t / mine:.2f}x JAX's best"
    table(f"paged decode attention: {seqs} seqs x {ctx} context, {hq} q / {hkv} kv heads, d {d} "
          "(bandwidth = KV bytes read / GPU time of all the op's kernels; copy = read + write of 1 GiB)",
          ["kv", "page", "implementation", "kernel", "wall us", "GPU us", "GB/s", "of copy", "copy GB/s", "max |diff|", ""], rows)
    results["decode"] = {"rows": rows}


def e2e(args, results: dict) -> None:
    from jaxinfer import params as params_lib
    from jaxinfer.runner.step_inputs import build
    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.core.shapes import BatchShape, SeqWork
    from jaxinfer.runner.model_runner import ModelRunner
    from jaxinfer.runner.sampler import Row, SamplingArrays
    from jaxinfer.sharding import make_mesh
    from scripts.bench_throughput import LLAMA3_8B

    cfg = LLAMA3_8B
    if args.small:
        import dataclasses
        cfg = dataclasses.replace(cfg, num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4,
                                  num_kv_heads=2, vocab_size=1024)
    mesh = make_mesh()
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    graphdef, state = params_lib.dummy_params(cfg, dtype, mesh)
    w_bytes = params_lib.param_bytes(state)
    ps, ctx = 16, args.context
    per_seq = ctx // ps + 1
    copy = copy_bandwidth()
    rows = []
    for batch_size in (1, 64):
        works = [SeqWork([1], ctx - 1, list(range(1 + s * per_seq, 1 + (s + 1) * per_seq)), logit_offsets=[0])
                 for s in range(batch_size)]
        batch, _ = build(BatchShape(batch_size, 0, 64, per_seq), works, [], ps)
        kv_bytes = batch_size * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
        sp = SamplingParams(temperature=0.0, max_tokens=1)
        arrays = SamplingArrays.from_rows([Row(sp, 1, ctx)] * batch_size, batch_size, 8)
        base = None
        for impl in ("kernels", "xla", "reference"):
            runner = ModelRunner(cfg, graphdef, state, mesh, num_pages=batch_size * per_seq + 1, page_size=ps,
                                 max_rows=batch_size, penalty_slots=batch_size, max_model_len=ctx + ps,
                                 attention_impl=impl)
            try:
                sec = timeit(lambda: runner.step(batch, arrays).tokens, repeats=20)
                base = base or sec
                bw = (w_bytes + kv_bytes) / sec
                rows.append([batch_size, impl, f"{sec * 1e3:.2f}", f"{batch_size / sec:,.0f}",
                             f"{bw / 1e9:.0f}", f"{bw / (copy / 1):.0%}", f"{sec / base:.2f}x"])
            except Exception as e:  # e.g. the dense reference out of memory
                rows.append([batch_size, impl, "failed", str(e).splitlines()[0][:80], "-", "-", "-"])
            runner = None  # free its KV cache before the next one
    table(f"end-to-end decode step: Llama-3-8B shape{' (small)' if args.small else ''}, random "
          f"{jnp.dtype(dtype).name} weights ({w_bytes / 2**30:.1f} GiB), context {ctx}, greedy "
          "(bandwidth = (weights + KV) / step; of copy = vs a measured device copy)",
          ["batch", "attention", "ms/step", "tok/s", "GB/s", "of copy", "time vs kernels"], rows)
    results["e2e"] = {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="prefill,decode,e2e")
    p.add_argument("--context", type=int, default=2048, help="e2e decode context")
    p.add_argument("--small", action="store_true", help="tiny shapes, to try the script on a CPU")
    p.add_argument("--json", default=None, help="also write the tables here")
    args = p.parse_args()
    if args.small:
        args.context = min(args.context, 256)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    results: dict = {"device": jax.devices()[0].device_kind}
    for name in args.sections.split(","):
        {"prefill": prefill, "decode": decode, "e2e": e2e}[name](args, results)
        sys.stdout.flush()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
