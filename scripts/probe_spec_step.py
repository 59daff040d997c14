"""Where a speculative step's wall time goes (issue 13), against a plain step: each phase of the engine
loop timed per step, at one sequence, random weights (the Llama-3-8B shape, or tiny shapes on the CPU),
drafts replayed from a plain run so that every one is kept (scripts/bench_spec_decode.py's Replay).

Three engines: plain in the verifying step's bucket (1 + k rows per sequence: on the GPU a row's logits
depend on the step's row count through XLA's choice of GEMM, so greedy output is reproduced only within one
bucket; this run gives the replayed text), plain in two-row steps (the engine's default for one sequence),
and speculative in the verifying bucket alone.

    python3 scripts/probe_spec_step.py            # H200
    python scripts/probe_spec_step.py --tiny      # CPU smoke run

Phases (ms per step, mean over the timed run; the launch thread's phases overlap the loop's):
  engine step    EngineCore.step, all of it (loop thread)
  read-back      _read_back: waiting for the step's tokens, copying them over, and Scheduler.update
  update         Scheduler.update alone
  schedule       Scheduler.schedule (with speculation, the proposal inside it)
  inputs         packing the step's inputs (EngineCore.inputs)
  frontend       the rest of Engine.step: outputs, detokenizing (between two EngineCore.step calls)
  stage / forward / sampler   ModelRunner's launch of the input copy and the two executables (launch thread)
"""

from __future__ import annotations

import argparse
import collections
import functools
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TIMES: collections.Counter = collections.Counter()
LOCK = threading.Lock()


def timed(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            with LOCK:
                TIMES[label] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


LAST: dict = {}


def device_times(core, calls: int = 20) -> dict:
    """The widest decode step's executables (a verifying one where drafts were carried), each call waited for:
    ms per call, median."""
    import statistics

    import jax

    inputs = LAST.get("spec") or LAST.get("plain")
    if inputs is None:
        return {}
    runner = core.runner
    forward, sampler = runner._executables_for(inputs.shape, inputs.ban_width, inputs.needs_full_sampling(),
                                               inputs.speculates())
    buf = runner.stage(inputs)

    def median(fn):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return f"{1e3 * statistics.median(times):.3f}"
    held = {}

    def fwd():
        held["out"] = runner.run_forward(forward, buf)
        return held["out"]
    out = {"rows": inputs.shape.decode_rows, "forward alone": median(fwd)}
    out["sampler alone"] = median(lambda: runner.run_sampler(sampler, *held["out"]).packed)
    out["whole step"] = median(lambda: runner.step(inputs).packed)
    LAST.clear()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--acceptance", type=float, default=1.0)
    p.add_argument("--trace", action="store_true", help="also list each engine's host events (XLA's runtime: "
                   "thunks, command buffer updates) over one more run, by total time")
    p.add_argument("--attention", default=None, help="the engine's attention implementation (default: auto)")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_decode import dummy_model, model_config
    from bench_spec_decode import Replay
    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.core.scheduler import Scheduler
    from jaxinfer.engine.engine import Engine
    from jaxinfer.engine.engine_core import EngineCore
    from jaxinfer.llm import LLM
    from jaxinfer.runner.model_runner import ModelRunner
    from jaxinfer.sharding import make_mesh

    model = dummy_model(model_config(args.tiny), jnp.float32 if args.tiny else jnp.bfloat16, make_mesh())
    V, L, k = model.config.vocab_size, 64, args.k
    prompt = np.random.default_rng(0).integers(10, V - 10, L).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    common = dict(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=L + args.new_tokens + 32,
                  enable_prefix_caching=False, prefill_sizes=(256,), attention=args.attention)
    for owner, name, label in [(EngineCore, "step", "engine step"), (EngineCore, "_read_back", "read-back"),
                               (Scheduler, "update", "update"), (Scheduler, "schedule", "schedule"),
                               (EngineCore, "inputs", "inputs"), (Engine, "step", "Engine.step"),
                               (ModelRunner, "stage", "stage"), (ModelRunner, "run_forward", "forward"),
                               (ModelRunner, "run_sampler", "sampler")]:
        timed(owner, name, label)
    keep = EngineCore.inputs

    def inputs(self, step):  # the last decode step's inputs, for device_times
        made = keep(self, step)
        key = "spec" if made.speculates() else "plain"
        widest = getattr(LAST.get(key), "shape", made.shape).decode_rows
        if not made.shape.prefill_tokens and made.shape.decode_rows >= widest:
            LAST[key] = made
        return made
    EngineCore.inputs = inputs
    print(f"# {'tiny shapes' if args.tiny else 'Llama-3-8B shape'}, random weights, on "
          f"{jax.devices()[0].device_kind}; one sequence, {args.new_tokens} new tokens, k = {k}, replayed "
          f"acceptance {args.acceptance:.0%}\n")
    rows = {}
    ref = None
    wide = 2 * (1 + k)  # one sequence's rows, in a bucket of an even size
    for name, spec, sizes in [(f"plain, {wide} rows", None, (wide,)), ("plain", None, (2,)),
                              ("speculative", {"method": "ngram", "num_speculative_tokens": k}, (wide,))]:
        llm = LLM.from_loaded(model, **common, decode_sizes=sizes, speculative_config=spec)
        if spec is not None:
            llm.engine.core._observe_step = lambda rows_, seconds: None  # carry every draft
            llm.engine.core.scheduler.proposer = Replay(k, {tuple(prompt): ref}, L, V, args.acceptance)
        out = llm.generate([prompt], params, use_tqdm=False)[0]  # warm-up
        ref = ref or list(out.outputs[0].token_ids)
        TIMES.clear()
        before = llm.engine.core.counters()["steps"]
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        steps = llm.engine.core.counters()["steps"] - before
        got = list(out.outputs[0].token_ids)
        rows[name] = dict(TIMES, wall=wall, steps=steps, tokens=len(got), equal=got == ref,
                          differs_at=next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None))
        if args.trace:
            from probe_dispatch import host_trace

            print(f"{name}:")
            host_trace(lambda: llm.generate([prompt], params, use_tqdm=False) and None, 14)
        rows[name].update(device_times(llm.engine.core))
        llm.close()
    print("| phase (ms per step) | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for label in ["wall", "engine step", "read-back", "update", "schedule", "inputs", "frontend", "stage",
                  "forward", "sampler"]:
        cells = []
        for r in rows.values():
            v = r["Engine.step"] - r["engine step"] if label == "frontend" else r.get(label, 0.0)
            cells.append(f"{1e3 * v / r['steps']:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| *device, calls waited for one by one:* |" + " |" * len(rows))
    for label in ["rows", "forward alone", "sampler alone", "whole step"]:
        print(f"| {label} | " + " | ".join(str(r.get(label, "-")) for r in rows.values()) + " |")
    for name, r in rows.items():
        print(f"\n{name}: {r['steps']} steps, {r['tokens']} tokens ({r['tokens'] / r['steps']:.2f} a step), "
              f"{r['tokens'] / r['wall']:.1f} tok/s over the whole request; output equal to the plain {wide}-row "
              f"run's: {r['equal']}" + ("" if r["equal"] else f" (first differs at token {r['differs_at']})"))


if __name__ == "__main__":
    main()
