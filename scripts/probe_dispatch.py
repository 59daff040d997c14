"""Where does a decode step's host call wait? (GPU diagnosis for issue 11.)

Builds the Llama-3-8B-shape engine (random bf16 weights) for one batch size and times, with
the device kept busy by queued steps: the step's one input transfer (device_put of the packed
buffer), the executable call with the buffer already on the device, and the whole runner.step.
A call that takes about a device step to return is waiting on the device.

    python scripts/probe_dispatch.py --batch 64
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    import dataclasses

    import jax
    import jax.numpy as jnp

    from checkpoints.loader import LoadedModel
    from jaxinfer import params as P
    from jaxinfer.llm import LLM
    from jaxinfer.sharding import make_mesh
    from jaxinfer.runner.step_inputs import StepInputs
    from scripts.bench_decode import model_config

    cfg = model_config(False)
    mesh = make_mesh()
    graphdef, state = P.dummy_params(cfg, jnp.bfloat16, mesh)
    model = LoadedModel(cfg, graphdef, state, None, "dummy", dtype=jnp.bfloat16)
    b = args.batch
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
    for _ in range(5):
        runner.step(inputs)  # keep the device busy
    put_ms = timed(lambda: jax.device_put(inputs.buffer, runner.replicated), 5)
    jax.block_until_ready(runner.cache)
    on_device = dataclasses.replace(inputs, buffer=jax.device_put(inputs.buffer, runner.replicated))
    exe = runner._executable(runner._args(inputs))
    for _ in range(5):
        runner.step(inputs)

    def call():
        out, runner.cache, runner.penalty, runner.sampled = exe(
            runner.state, runner.cache, runner.penalty, runner.sampled, on_device)
    call_ms = timed(call, 10)
    step_ms = timed(lambda: runner.step(inputs), 10)
    jax.block_until_ready(runner.cache)
    print(f"B={b}: device step {device_ms:.2f} ms; host time to return, device busy: device_put "
          f"{put_ms:.3f} ms, executable call (input on device) {call_ms:.3f} ms, runner.step {step_ms:.3f} ms",
          flush=True)


if __name__ == "__main__":
    main()
