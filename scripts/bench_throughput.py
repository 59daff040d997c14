"""Offline throughput of the engine on fixed synthetic workloads (generated from a seed).

    python scripts/bench_throughput.py                                   # default model, all workloads
    python scripts/bench_throughput.py --dummy-weights --workload fixed  # Llama-3-8B shape, random bf16

Workloads (all prompts are random token ids; outputs run to their set length, EOS ignored):
    fixed          N prompts of --input-len tokens, --output-len new tokens each
    sharegpt       N prompts with a ShareGPT-like length mix: log-normal input (median 190,
                   clipped to [4, 2048]) and output (median 170, clipped to [4, 1024]) lengths
    shared-prefix  G groups x K prompts sharing a --prefix-len prefix plus a 32-token suffix,
                   --output-len new tokens; run with the prefix cache on, then off

Printed per run: requests/s, input/output/total tokens/s, TTFT and TPOT percentiles,
preemptions and prefix-cache hit rate, and MFU: model FLOPs (2 x params x tokens computed)
per second over the bf16/f32 matmul peak measured in the same run.
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
from jaxinfer.core.sampling_params import SamplingParams  # noqa: E402
from jaxinfer.llm import DTYPES, LLM, default_dtype_name  # noqa: E402
from jaxinfer.engine.metrics import percentiles  # noqa: E402
from jaxinfer.models import LlamaConfig  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402

LLAMA3_8B = LlamaConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=8192)


def matmul_peak(dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype`: the compute ceiling MFU is measured against."""
    if jax.default_backend() == "cpu":
        n = 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def workload(name: str, args, rng: np.random.Generator, vocab: int):
    """[(prompt ids, output length)]"""
    def ids(n):
        return rng.integers(10, vocab - 10, n).tolist()

    if name == "fixed":
        return [(ids(args.input_len), args.output_len) for _ in range(args.num_prompts)]
    if name == "sharegpt":
        ins = np.clip(rng.lognormal(np.log(190), 0.9, args.num_prompts), 4, 2048).astype(int)
        outs = np.clip(rng.lognormal(np.log(170), 0.8, args.num_prompts), 4, 1024).astype(int)
        return [(ids(int(i)), int(o)) for i, o in zip(ins, outs)]
    if name == "shared-prefix":
        out = []
        for _ in range(args.groups):
            prefix = ids(args.prefix_len)
            out += [(prefix + ids(32), args.output_len) for _ in range(args.group_size)]
        order = rng.permutation(len(out))  # groups interleave, as traffic would
        return [out[i] for i in order]
    raise ValueError(name)


def run(llm: LLM, requests, label: str, peak: float, num_params: int) -> dict:
    engine = llm.engine
    before = engine.stats() if llm.is_leader else {}
    prompts = [r[0] for r in requests]
    params = [SamplingParams(max_tokens=o, temperature=1.0, seed=i, ignore_eos=True)
              for i, (_, o) in enumerate(requests)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    wall = time.perf_counter() - t
    if not llm.is_leader:  # a follower process of a multi-process run: the leader reports
        return {}
    after = engine.stats()
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = percentiles([o.metrics.time_to_first_token for o in outs])
    tpot = percentiles([o.time_per_output_token for o in outs if o.time_per_output_token])

    def grew(key):
        return after[key] - before[key]
    queried = grew("prefix_cache_queried_tokens")
    return dict(
        workload=label, requests=len(outs), seconds=wall, req_s=len(outs) / wall,
        in_tok_s=n_in / wall, out_tok_s=n_out / wall, total_tok_s=(n_in + n_out) / wall,
        ttft=ttft, tpot=tpot, preemptions=grew("preemptions"),
        hit_rate=grew("prefix_cache_hit_tokens") / queried if queried else 0.0,
        mfu=2 * num_params * grew("computed_tokens") / wall / peak)


def print_table(rows, peak: float) -> None:
    print(f"\nmatmul peak measured: {peak / 1e12:.1f} TFLOP/s")
    head = ("workload", "req/s", "in tok/s", "out tok/s", "total tok/s", "TTFT p50/p99 s",
            "TPOT p50/p99 ms", "preempt", "prefix hit", "MFU")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['workload']} | {r['req_s']:.2f} | {r['in_tok_s']:,.0f} | {r['out_tok_s']:,.0f} | "
              f"{r['total_tok_s']:,.0f} | {r['ttft']['p50']:.2f} / {r['ttft']['p99']:.2f} | "
              f"{r['tpot']['p50'] * 1e3:.1f} / {r['tpot']['p99'] * 1e3:.1f} | {r['preemptions']} | "
              f"{r['hit_rate']:.1%} | {r['mfu']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dummy-weights", action="store_true", help="Llama-3-8B shape, random weights")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--data-parallel", type=int, default=1, help="engine replicas (each over --tensor-parallel)")
    p.add_argument("--coordinator-address", default=None, help="a multi-process run (jax.distributed): every "
                   "process runs this same command with its --process-id; process 0 prints")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--workload", default="all",
                   help="fixed, sharegpt, shared-prefix, a comma list of them, or all")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest request of the chosen workloads")
    p.add_argument("--decode-sizes", default=None, help="compiled decode-row counts, e.g. 16,64,256")
    p.add_argument("--prefill-sizes", default=None, help="compiled prefill sizes, e.g. 512,2048")
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from jaxinfer import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    dtype_name = args.dtype or default_dtype_name()
    mesh = make_mesh(tensor=args.tensor_parallel, data=args.data_parallel)
    names = ["fixed", "sharegpt", "shared-prefix"] if args.workload == "all" else args.workload.split(",")
    if any(n not in ("fixed", "sharegpt", "shared-prefix") for n in names):
        p.error(f"unknown workload in {args.workload!r}")
    if args.dummy_weights:
        graphdef, state = params_lib.dummy_params(LLAMA3_8B, DTYPES[dtype_name], mesh)
        loaded = LoadedModel(LLAMA3_8B, graphdef, state, None, "dummy Llama-3-8B shape",
                             dtype=DTYPES[dtype_name])
    else:
        from checkpoints import loader
        loaded = loader.load(args.model, dtype=DTYPES[dtype_name], mesh=mesh)
    vocab = loaded.config.vocab_size
    rng = np.random.default_rng(args.seed)
    loads = {n: workload(n, args, rng, vocab) for n in names}
    longest = max(len(pr) + o for reqs in loads.values() for pr, o in reqs)
    max_len = args.max_model_len or min(longest + 1, loaded.config.max_position_embeddings)
    sizes = dict(decode_sizes=tuple(int(x) for x in args.decode_sizes.split(",")) if args.decode_sizes else (),
                 prefill_sizes=tuple(int(x) for x in args.prefill_sizes.split(",")) if args.prefill_sizes else ())
    t = time.perf_counter()
    llm = LLM.from_loaded(loaded, mesh, warmup=True, progress=True, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                          block_q=args.block_q, **sizes)
    warm = time.perf_counter() - t
    num_params = params_lib.num_params(loaded.state)
    peak = matmul_peak(DTYPES[dtype_name])
    cfg = llm.engine.config
    say = print if llm.is_leader else (lambda *a, **k: None)
    say(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} ({jax.process_count()} processes), "
        f"tp {args.tensor_parallel} x dp {args.data_parallel}; model: {loaded.source} "
        f"({num_params / 1e9:.2f} B params, {dtype_name}); KV pool {cfg.num_pages} pages x {cfg.page_size}"
        f"{' a replica' if args.data_parallel > 1 else ''}; max_num_seqs {cfg.max_num_seqs}, max_num_batched_tokens "
        f"{cfg.max_num_batched_tokens}, max_model_len {cfg.max_model_len}; warm-up {warm:.0f}s "
        f"({len(cfg.all_shapes())} shapes)")
    say("command: python " + " ".join(sys.argv))
    rows = []
    for name in names:
        if name == "shared-prefix":
            for on in (True, False):
                llm.engine.set_prefix_caching(on)
                rows.append(run(llm, loads[name], f"shared-prefix, cache {'on' if on else 'off'}",
                                peak, num_params))
            llm.engine.set_prefix_caching(True)
        else:
            rows.append(run(llm, loads[name], name, peak, num_params))
        if llm.is_leader:
            print_table(rows[-1:], peak)
    if llm.is_leader:
        print_table(rows, peak)
    llm.close()  # lets a multi-process run's followers go


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
