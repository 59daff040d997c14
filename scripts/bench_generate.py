"""Prefill and decode throughput of `jaxinfer generate`'s path, with the decode
step's fraction of the HBM roofline.

    python scripts/bench_generate.py                      # default model, this machine
    python scripts/bench_generate.py --dummy-weights      # Llama-3-8B shape, random bf16 weights

Decode roofline: each decode step must read every weight once plus the K/V of
every cached token; bytes per step over the step time, divided by the
bandwidth of a large device-to-device copy measured in the same run (bytes
read + written), is the fraction printed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from checkpoints.loader import LoadedModel  # noqa: E402
from jaxinfer import params as params_lib  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402
from jaxinfer.text_generation import DTYPES, TextGenerator, default_dtype_name  # noqa: E402

LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=8192)


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / float(np.median(times))


def build(args) -> TextGenerator:
    mesh = make_mesh(tensor=args.tensor_parallel)
    dtype_name = args.dtype or default_dtype_name()
    if args.dummy_weights:
        graphdef, state = params_lib.dummy_params(LLAMA3_8B, DTYPES[dtype_name], mesh)
        loaded = LoadedModel(LLAMA3_8B, graphdef, state, None, "dummy Llama-3-8B shape")
        return TextGenerator(loaded, mesh)
    return TextGenerator.load(args.model, dtype=dtype_name, tensor_parallel=args.tensor_parallel)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--dummy-weights", action="store_true", help="random Llama-3-8B-shaped weights")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up run")
    args = parser.parse_args()

    tg = build(args)
    cfg = tg.config
    weight_bytes = params_lib.param_bytes(tg.model.state)
    print(f"model: {tg.model.source}; {params_lib.num_params(tg.model.state) / 1e9:.3f} B params, "
          f"{weight_bytes / 2**30:.2f} GiB; device: {jax.devices()[0].device_kind} x{len(jax.devices())}; "
          f"backend {jax.default_backend()}", flush=True)
    bandwidth = copy_bandwidth(256 << 20 if jax.default_backend() == "cpu" else 4 << 30)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [rng.integers(100, cfg.vocab_size - 100, args.prompt_len).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
        tg.generate_ids(prompts, params)  # warm-up: compiles prefill and decode shapes
        best_prefill, best_decode = float("inf"), float("inf")
        for _ in range(args.repeats):
            results = tg.generate_ids(prompts, params)
            best_prefill = min(best_prefill, results[0].prefill_seconds)
            best_decode = min(best_decode, results[0].decode_seconds)
        steps = args.decode_tokens  # one decode step per generated token (plus the pipelined read)
        step_time = best_decode / steps
        kv_spec = tg._generator.runner.cache_spec
        kv_bytes_per_token = kv_spec.bytes_per_page // kv_spec.page_size
        mean_context = args.prompt_len + args.decode_tokens / 2
        bytes_per_step = weight_bytes + batch * mean_context * kv_bytes_per_token
        rows.append((batch, batch * args.prompt_len / best_prefill, batch * steps / best_decode,
                     step_time * 1e3, bytes_per_step / step_time / bandwidth))
        print(f"batch {batch} done", flush=True)

    print()
    print(f"prompt {args.prompt_len} tokens, {args.decode_tokens} generated, dtype {args.dtype or default_dtype_name()}")
    print("| batch | prefill tok/s | decode tok/s | decode step ms | decode HBM roofline |")
    print("|---:|---:|---:|---:|---:|")
    for batch, prefill, decode, ms, frac in rows:
        print(f"| {batch} | {prefill:,.0f} | {decode:,.1f} | {ms:.2f} | {frac:.1%} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
