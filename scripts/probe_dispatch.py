"""Where does a decode step's time go on the GPU? (Diagnosis for issue 11.)

Builds the Llama-3-8B-shape engine (or --shape deepseek-v2-lite; random bf16 weights) and, for each batch size, times:
  - the device step: back-to-back runner.step calls, one wait at the end;
  - the GPU's own work per step (CUPTI: kernel count and summed kernel time), so
    device step minus kernel time is how long the GPU sat idle;
  - how long calls take to return with the device kept busy by queued steps: the
    step's one input transfer and the whole runner.step. A call that takes about a
    device step to return is waiting on the device;
  - how long the forward and the sampler alone take to return with 0, 1 or 3 steps
    queued before them (the host's launch cost, and whether a deeper queue blocks it);
  - eight steps in a row under CUPTI: wall per step against kernel time per step;
  - the sampler's two variants alone (plain, and full: top-k/top-p and top-n logprobs);
  - what the optimized forward and sampler hold (conditionals, loops, command buffers).

    python scripts/probe_dispatch.py --batches 1,64
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _cupti(fn):
    """(kernel count, summed kernel ms) of what fn launches; fn must wait for its work."""
    import jax

    if jax.default_backend() != "gpu":
        fn()
        return []
    from jax.experimental.mosaic.gpu import profiler

    ext = profiler.mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        fn()
    finally:
        timings = ext._cupti_get_timings(True)
    return timings or []


def host_trace(fn, top: int) -> None:
    """Run fn (which must not keep results alive for long) under the profiler and print the host-side events
    by total time: where a call spends the time before it returns."""
    import gzip
    import json
    import tempfile

    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would slow the very calls being looked at
    options.host_tracer_level = 3  # verbose: the runtime's own steps (thunks, command buffer updates)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=options):
            jax.block_until_ready(fn())
        path = next(pathlib.Path(d).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {(e.get("pid"), e.get("tid")): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    total = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            thread = threads.get((e.get("pid"), e.get("tid")), "?")
            if "stream" in thread.lower() or "gpu" in thread.lower() and "host" not in thread.lower():
                continue  # device timelines
            key = (thread[:24], re.sub(r"[._:]\d+$", "", str(e.get("name")))[:70])
            total[key][0] += 1
            total[key][1] += e["dur"] / 1e3
    print("  host events over 5 forward calls (thread | event: count, ms):", flush=True)
    for (thread, name), (n, ms) in sorted(total.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {thread} | {name}: {n}, {ms:.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,64")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a tiny model (a CPU smoke test)")
    p.add_argument("--kernels", type=int, default=12, help="kernel groups to list, by time")
    p.add_argument("--dump", default=None, help="a folder: write each B's kernels (in launch order, with "
                   "times) and the optimized forward and sampler HLO there, for reading offline")
    p.add_argument("--no-full", action="store_true", help="skip the full sampler variant")
    p.add_argument("--trace", action="store_true", help="profile 5 forward calls (host side) and list the host "
                   "events that take the time")
    p.add_argument("--shape", choices=("llama-3-8b", "deepseek-v2-lite"), default="llama-3-8b",
                   help="the random-weight model's shape (as bench_decode.py's)")
    p.add_argument("--quantization", default=None, help="projections quantized: int8, int4, fp8, ... (random levels)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxinfer.llm import LLM
    from jaxinfer.runner.step_inputs import StepInputs
    from jaxinfer.sharding import make_mesh
    from scripts.bench_decode import dummy_model, model_config

    cfg = model_config(args.tiny, args.shape)
    mesh = make_mesh()
    model = dummy_model(cfg, jnp.bfloat16, mesh, args.quantization)
    for b in (int(x) for x in args.batches.split(",")):
        llm = LLM.from_loaded(model, mesh, max_num_seqs=b, max_num_batched_tokens=max(b, 128),
                              max_model_len=256, enable_prefix_caching=False)
        engine = llm.engine
        runner = engine.runner
        shape = engine.config.shape(next(d for d in engine.config.decode_buckets() if d >= b), 0)
        inputs = StepInputs.empty(shape, engine.ban_width)
        for _ in range(3):
            runner.step(inputs)
        jax.block_until_ready(runner.cache)

        def timed(fn, n):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
            return statistics.median(out)

        t = time.perf_counter()
        for _ in range(args.iters):
            runner.step(inputs)
        jax.block_until_ready(runner.cache)
        device_ms = (time.perf_counter() - t) / args.iters * 1e3
        kernels = _cupti(lambda: jax.block_until_ready(runner.step(inputs)))
        kernel_ms = sum(k[1] for k in kernels)
        t = time.perf_counter()
        ks = _cupti(lambda: jax.block_until_ready([runner.step(inputs) for _ in range(8)]))
        wall = (time.perf_counter() - t) * 1e3
        if ks:
            print(f"  8 steps in a row: {wall / 8:.2f} ms per step, kernels {sum(k[1] for k in ks) / 8:.2f} ms",
                  flush=True)
        for _ in range(5):
            runner.step(inputs)  # keep the device busy
        put_ms = timed(lambda: jax.device_put(inputs.buffer, runner.replicated), 5)
        step_ms = timed(lambda: runner.step(inputs), 10)
        jax.block_until_ready(runner.cache)
        print(f"B={b}: device step {device_ms:.2f} ms; GPU kernels {len(kernels)}, "
              f"{kernel_ms:.2f} ms (idle {device_ms - kernel_ms:.2f} ms)", flush=True)
        print(f"  host time to return, device busy: device_put {put_ms:.3f} ms, runner.step {step_ms:.3f} ms",
              flush=True)
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for name, ms in kernels:
            key = re.sub(r"[._]\d+$", "", name)[:60]
            by_name[key][0] += 1
            by_name[key][1] += ms
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:args.kernels]
        print("  kernels by time: " + "; ".join(f"{k} x{n} {ms:.3f}" for k, (n, ms) in top), flush=True)
        forward, _ = runner._executables_for(shape, engine.ban_width, False)
        on_device = runner.stage(inputs)
        latest = list(runner.run_forward(forward, on_device))  # (logits, rows) of the last forward

        def fwd(buf=None):  # the step's forward on its staged input (the buffer held for its shape, on the GPU)
            buf = buf if buf is not None else runner._held_inputs.get((shape, engine.ban_width), on_device)
            latest[:] = runner.run_forward(forward, buf)

        def loop(with_sampler, put):  # back-to-back pieces of the step, ms per step
            _, sampler = runner._executables_for(shape, engine.ban_width, False)
            jax.block_until_ready(runner.cache)
            t = time.perf_counter()
            for _ in range(args.iters):
                fwd(runner.stage(inputs) if put else None)
                if with_sampler:
                    runner.run_sampler(sampler, *latest)
            jax.block_until_ready(runner.cache)
            return (time.perf_counter() - t) / args.iters * 1e3

        loop(True, True)

        def host_ms(with_sampler, ahead):  # host time for the call to return; `ahead` steps queued first
            _, sampler = runner._executables_for(shape, engine.ban_width, False)
            out_ms = []
            for _ in range(10):
                jax.block_until_ready(runner.cache)
                for _ in range(ahead):
                    fwd()
                t = time.perf_counter()
                if with_sampler:
                    runner.run_sampler(sampler, *latest)
                else:
                    fwd()
                out_ms.append((time.perf_counter() - t) * 1e3)
            jax.block_until_ready(runner.cache)
            print(f"    host ms ({'sampler' if with_sampler else 'forward'}, {ahead} queued): min {min(out_ms):.2f} "
                  f"max {max(out_ms):.2f}", flush=True)
            return statistics.median(out_ms)

        if args.trace:
            def five_forwards():
                for _ in range(5):
                    fwd()
                return runner.cache

            host_trace(five_forwards, args.kernels * 2)
        print(f"  host time to return: forward {host_ms(False, 0):.3f} ms idle, {host_ms(False, 1):.3f} ms with one "
              f"step queued, {host_ms(False, 3):.3f} with three; sampler {host_ms(True, 0):.3f} idle, "
              f"{host_ms(True, 1):.3f} with one forward queued", flush=True)
        print(f"  back to back: forward alone {loop(False, False):.2f} ms; forward + sampler {loop(True, False):.2f} ms;"
              f" forward + input transfer {loop(False, True):.2f} ms; all three {loop(True, True):.2f} ms", flush=True)
        if args.dump:
            import json
            folder = pathlib.Path(args.dump)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"kernels_b{b}.json").write_text(json.dumps(kernels))
            (folder / f"forward_b{b}.hlo.txt").write_text(forward.flat.as_text())
        for full in (False,) if args.no_full else (False, True):
            _, sampler = runner._executables_for(shape, engine.ban_width, full)

            def run_sampler():
                jax.block_until_ready(runner.run_sampler(sampler, *latest).packed)

            run_sampler()
            ks = _cupti(run_sampler)
            print(f"  sampler {'full' if full else 'plain'}: {len(ks)} kernels, {sum(k[1] for k in ks):.3f} ms",
                  flush=True)
        for name, exe in (("forward", forward), ("sampler", sampler)):
            text = exe.flat.as_text()
            print(f"  optimized {name}: {text.count(' conditional(')} conditional, {text.count(' while(')} "
                  f"while, {text.count('command_buffer')} command_buffer mentions, "
                  f"{text.count(' custom-call(')} custom-call, {text.count(' fusion(')} fusion", flush=True)


if __name__ == "__main__":
    main()
