"""Checks the Mosaic GPU MLA kernel (pallas_kernels/mla_attention/gpu.py) on a real GPU: correctness against
the pure-JAX reference on ragged decode / speculative batches at DeepSeek's width (kv_lora_rank 512 + rope 64),
then decode timings against the device's copy bandwidth (measured in the same run) and the XLA path the
model took before (the paged attention's blockwise loop over the same pages). Every case catches and
prints its own exception, so one run reports everything.

    python scripts/check_mla_gpu.py            # checks + benchmark table (DeepSeek-V2-Lite: 16 heads)
    python scripts/check_mla_gpu.py --sweep    # also num_splits / num_stages
    python scripts/check_mla_gpu.py --quick    # checks only

The issue's goal: at batch 64 x 4k context, the kernel reads the latent pages at >= 85% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.layers import attention_xla  # noqa: E402
from jaxinfer.runner.batch import Batch  # noqa: E402
from pallas_kernels.mla_attention import gpu, reference  # noqa: E402
from scripts.check_paged_gpu import copy_bandwidth, device_times, timed  # noqa: E402
from tests.paged_inputs import ragged_paged_inputs  # noqa: E402

L, R = 512, 64  # DeepSeek's kv_lora_rank and rope width
RESULTS: list[tuple[str, str]] = []

# seqs (q_len, kv_len), tokens, seq rows, heads, page_size, pages per seq, kernel options
CASES = {
    "decode_16_heads_ragged_contexts": ([(1, 5), (1, 700), (1, 1), (1, 130), (1, 64)], 5, 6, 16, 16, 48, {}),
    "decode_one_split": ([(1, 300), (1, 1000)], 2, 2, 16, 16, 64, dict(num_splits=1)),
    "decode_four_splits_one_stage": ([(1, 900), (1, 65)], 2, 2, 16, 16, 64, dict(num_splits=4, num_stages=1)),
    "spec_decode_8_heads_two_tokens_a_block": ([(3, 200), (1, 77), (5, 64), (2, 2)], 11, 4, 8, 16, 16, {}),
    "decode_pages_of_64": ([(1, 1000), (1, 3)], 2, 3, 16, 64, 16, {}),
}


def inputs(seqs, t, s, heads, page_size, pages_per_seq, seed=0):
    (q, pages, _, kv_lens, table, cu), max_q_len = ragged_paged_inputs(
        seqs, t, s, heads, 1, L + R, page_size, pages_per_seq, jnp.bfloat16, seed=seed)
    return (q, pages[:, :, 0], kv_lens, table, cu), max_q_len


def check(name, case):
    seqs, t, s, heads, ps, p, options = case
    try:
        args, max_q_len = inputs(seqs, t, s, heads, ps, p)
        want = np.asarray(reference(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1), np.float32)
        got = np.asarray(gpu.mla_attention(*args, value_dim=L, max_q_len=max_q_len, sm_scale=0.1, **options),
                         np.float32)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
        padding = float(np.abs(got[int(args[-1][-1]):]).max()) if got.shape[0] > int(args[-1][-1]) else 0.0
        ok = err < 2e-2 and padding == 0.0
        RESULTS.append((name, "PASS" if ok else "FAIL"))
        print(f"{'PASS' if ok else 'FAIL'} {name}: max error {err:.2e} of the largest output, padding {padding}",
              flush=True)
    except Exception:  # noqa: BLE001
        RESULTS.append((name, "ERROR"))
        print(f"ERROR {name}:\n{traceback.format_exc()[-3000:]}", flush=True)


def xla_path(q, pages, kv_lens, table, cu):
    """The model's MLA before this kernel: the paged attention's blockwise XLA loop, pages as K and V."""
    t = q.shape[0]
    zeros = jnp.zeros(t, jnp.int32)
    batch = Batch(tokens=zeros, feed_index=zeros, positions=kv_lens - 1, slots=zeros, cu_q_lens=cu, kv_lens=kv_lens,
                  page_table=table, block_tokens=jnp.zeros((0, 1), jnp.int32), block_seq=jnp.zeros(0, jnp.int32),
                  logits_indices=jnp.zeros(1, jnp.int32), decode_rows=t, max_q_len=1)
    p4 = pages[:, :, None, :]
    return attention_xla.paged_attention(q, p4, p4, batch, sm_scale=0.1)[..., :L]


def benchmark(sweep: bool):
    try:
        bw = copy_bandwidth()
        print(f"\ndevice copy bandwidth: {bw / 1e12:.2f} TB/s (read + write of 1 GiB)")
    except Exception as e:  # noqa: BLE001
        print(f"copy bandwidth failed: {e}")
        bw = float("nan")
    print("decode, 16 heads (V2-Lite), page_size 16; kernel/all: CUPTI device time of the largest kernel / of all "
          "kernels; GB/s and % of copy bandwidth from the kernel time over the latent bytes read")
    print("\n| batch x context | impl | wall µs | kernel µs | all µs | GB/s | of copy bw |")
    print("|---|---|---:|---:|---:|---:|---:|")
    configs = [dict()]
    if sweep:
        configs += [dict(num_splits=s, num_stages=st) for s in (1, 2, 4, 8) for st in (1, 2)]
    for batch, context in ((64, 4096), (1, 4096), (64, 512), (8, 16384)):
        try:
            ps = 16
            args, _ = inputs([(1, context)] * batch, batch, batch, 16, ps, context // ps)
        except Exception as e:  # noqa: BLE001
            print(f"inputs {batch} x {context} failed: {e}")
            continue
        kv_bytes = batch * context * (L + R) * 2

        def row(name, fn):
            try:
                wall = timed(fn, *args, iters=50)
                kernel, total = device_times(fn, *args)
                rate = kv_bytes / (kernel if kernel == kernel else wall)
                print(f"| {batch} x {context} | {name} | {wall * 1e6:.1f} | {kernel * 1e6:.1f} | {total * 1e6:.1f} "
                      f"| {rate / 1e9:.0f} | {rate / bw:.0%} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {batch} x {context} | {name} | {type(e).__name__}: {str(e)[:300]} | | | | |", flush=True)

        for config in configs:
            name = "kernel " + (",".join(f"{k}={v}" for k, v in config.items()) or "default")
            row(name, jax.jit(functools.partial(gpu.mla_attention, value_dim=L, max_q_len=1, sm_scale=0.1, **config)))
        row("xla (the paged blockwise loop)", jax.jit(xla_path))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="correctness checks only")
    parser.add_argument("--sweep", action="store_true", help="also sweep num_splits / num_stages")
    flags = parser.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    for name, case in CASES.items():
        check(name, case)
    failed = [n for n, status in RESULTS if status != "PASS"]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not flags.quick:
        benchmark(flags.sweep)
    print("\ncommand:", " ".join([Path(sys.executable).name] + sys.argv))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
