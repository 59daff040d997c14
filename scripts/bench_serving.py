"""Online serving benchmark: many concurrent Generate streams against a jaxinfer gRPC server.

    python scripts/bench_serving.py --port 50051 --num-prompts 200 --request-rate 8     # a running server
    python scripts/bench_serving.py --launch --num-prompts 16 --input-len 64 --output-len 16   # CPU-sized
    python scripts/bench_serving.py --launch --dummy-weights --num-prompts 500 --input-len 1024 --output-len 128

Requests are N synthetic prompts of --input-len random token ids, each asking for exactly
--output-len tokens (ignore_eos, temperature 1 with a per-request seed), all drawn from --seed.
They arrive as a Poisson process at --request-rate per second (inf: all at once), optionally
capped at --max-concurrency open streams, through serving.client.AsyncClient.

Measured per request, on the client: TTFT (sent -> first token), TPOT ((end-to-end - TTFT) /
(output tokens - 1)), ITL (gaps between stream messages after the first token) and end-to-end
latency. Printed: mean, median and p99 of each; requests/s, output and total tokens/s.

--launch starts an in-process server (the default model, --model, or --dummy-weights: the
Llama-3-8B shape of scripts/bench_throughput.py with random weights), warms it up, then runs.
The client then shares the process (and the GIL) with the server; for the cleanest latencies
run `jaxinfer serve` separately and point this script at it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.engine.metrics import percentiles  # noqa: E402
from serving.client import AsyncClient  # noqa: E402


@dataclasses.dataclass
class Result:
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def one_request(client: AsyncClient, prompt: list[int], output_len: int, seed: int,
                      timeout: float | None) -> Result:
    r = Result()
    start = last = time.perf_counter()
    try:
        async for response in client.generate(prompt, max_tokens=output_len, ignore_eos=True, temperature=1.0,
                                              seed=seed, timeout=timeout):
            now = time.perf_counter()
            n = sum(len(o.token_ids) for o in response.outputs)
            if n:
                if r.ttft is None:
                    r.ttft = now - start
                else:
                    r.itl.append(now - last)
                last = now
                r.output_tokens += n
        r.e2e = time.perf_counter() - start
        r.ok = True
    except grpc.RpcError as e:
        r.error = f"{e.code().name}: {e.details()}"
    return r


async def run_benchmark(args, requests: list[list[int]], arrivals: np.ndarray, token: str | None
                        ) -> tuple[list[Result], float]:
    async with AsyncClient(args.host, args.port, token=token, ca_file=args.tls_ca) as client:
        limit = asyncio.Semaphore(args.max_concurrency or len(requests))

        async def fire(i: int) -> Result:
            async with limit:
                return await one_request(client, requests[i], args.output_len, args.seed + i, args.timeout)

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(i)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


async def describe_server(args, token: str | None):
    async with AsyncClient(args.host, args.port, token=token, ca_file=args.tls_ca, timeout=30) as client:
        return await client.model_info()


def launch(args):
    """An in-process server on the chosen model, warmed up; sets args.port."""
    import jax

    from jaxinfer.llm import DTYPES, LLM, default_dtype_name
    from jaxinfer.sharding import make_mesh
    from serving.server import Server

    dtype_name = args.dtype or default_dtype_name()
    mesh = make_mesh(tensor=args.tensor_parallel)
    if args.dummy_weights:
        from checkpoints.loader import LoadedModel
        from jaxinfer import params as params_lib
        from scripts.bench_throughput import LLAMA3_8B

        graphdef, state = params_lib.dummy_params(LLAMA3_8B, DTYPES[dtype_name], mesh)
        loaded = LoadedModel(LLAMA3_8B, graphdef, state, None, "dummy Llama-3-8B shape",
                             dtype=DTYPES[dtype_name])
    else:
        from checkpoints import loader
        loaded = loader.load(args.model, dtype=DTYPES[dtype_name], mesh=mesh)
    sizes = dict(decode_sizes=_sizes(args.decode_sizes), prefill_sizes=_sizes(args.prefill_sizes))
    max_len = args.max_model_len or min(args.input_len + args.output_len + 1,
                                        loaded.config.max_position_embeddings)
    config = dict(max_num_seqs=args.max_num_seqs or min(args.num_prompts, 256),
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                  **{k: v for k, v in sizes.items() if v})
    if args.num_pages:
        config["num_pages"] = args.num_pages
    llm = LLM.from_loaded(loaded, mesh, warmup=False, progress=True, **config)
    server = Server(llm.engine, host=args.host, port=0, warmup=True)
    t = time.perf_counter()
    args.port = server.start()
    server.wait_ready()
    print(f"launched: {jax.devices()[0].device_kind} x{len(jax.devices())}, {dtype_name}; port {args.port}; "
          f"warm-up {time.perf_counter() - t:.0f}s; {config}", file=sys.stderr)
    return server


def _sizes(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


def print_report(args, info, results: list[Result], duration: float) -> None:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    n_in = len(ok) * args.input_len
    n_out = sum(r.output_tokens for r in ok)
    stats = {
        "TTFT (ms)": percentiles([r.ttft * 1e3 for r in ok if r.ttft is not None], qs=(50, 99)),
        "TPOT (ms)": percentiles([r.tpot * 1e3 for r in ok if r.tpot is not None], qs=(50, 99)),
        "ITL (ms)": percentiles([x * 1e3 for r in ok for x in r.itl], qs=(50, 99)),
        "E2E (ms)": percentiles([r.e2e * 1e3 for r in ok], qs=(50, 99)),
    }
    print(f"\nserver: {info.model} ({info.architecture}, {info.dtype}, {info.num_params / 1e9:.2f} B params), "
          f"context {info.context_length}")
    print(f"requests: {len(ok)} done, {len(failed)} failed, in {duration:.2f}s; "
          f"{args.input_len} in / {args.output_len} out tokens each; request rate {args.request_rate}/s"
          + (f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""))
    if failed:
        print(f"first failure: {failed[0].error}")
    print("\n| metric | mean | median | p99 |\n|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} |")
    print("\n| requests/s | output tok/s | total tok/s |\n|---|---|---|")
    print(f"| {len(ok) / duration:.2f} | {n_out / duration:,.1f} | {(n_in + n_out) / duration:,.1f} |")
    print("\ncommand: python " + " ".join(sys.argv))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server to benchmark")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument("--token-file", default=None, help="bearer token file (default: $JAXINFER_TOKEN)")
    g.add_argument("--tls-ca", default=None, help="use TLS; the CA of the server's certificate")
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=16)
    g.add_argument("--input-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    g.add_argument("--max-concurrency", type=int, default=None, help="open streams at most")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout", type=float, default=None, help="per-request deadline, seconds")
    g = p.add_argument_group("--launch: an in-process server")
    g.add_argument("--launch", action="store_true")
    g.add_argument("--model", default=None)
    g.add_argument("--dummy-weights", action="store_true", help="Llama-3-8B shape, random weights")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.add_argument("--tensor-parallel", type=int, default=1)
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: --num-prompts, at most 256 (fewer decode shapes to compile)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None, help="default: input + output + 1")
    g.add_argument("--num-pages", type=int, default=None)
    g.add_argument("--decode-sizes", default=None, help="compiled decode-row counts, e.g. 16,64")
    g.add_argument("--prefill-sizes", default=None, help="compiled prefill sizes, e.g. 128,512")
    args = p.parse_args()
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be positive")
    if not args.request_rate > 0:
        p.error("--request-rate must be positive (inf: all at once)")

    from jaxinfer.cli import _read_token
    token = _read_token(args.token_file)
    server = launch(args) if args.launch else None
    try:
        info = asyncio.run(describe_server(args, token))
        rng = np.random.default_rng(args.seed)
        vocab = info.vocab_size
        requests = [rng.integers(10, vocab - 10, args.input_len).tolist() for _ in range(args.num_prompts)]
        gaps = (np.zeros(args.num_prompts) if math.isinf(args.request_rate)
                else rng.exponential(1 / args.request_rate, args.num_prompts))
        arrivals = np.cumsum(gaps) - gaps[0]  # the first request goes at once
        results, duration = asyncio.run(run_benchmark(args, requests, arrivals, token))
        print_report(args, info, results, duration)
    finally:
        if server is not None:
            server.drain(timeout=10)
            server._thread.join(30)  # let the server's asyncio.run clean up before the interpreter exits
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
