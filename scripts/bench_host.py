"""Host work per engine step, with the device out of the picture.

The real engine (scheduler, page pool, step packing, sampling arrays, read-back,
detokenization and stop checks, streamed outputs) runs against a device step that
returns at once with random tokens, so every microsecond measured is host work that
a real step would have to hide behind the device. Decode steps only: all sequences
are running and prefilled before the clock starts.

    python scripts/bench_host.py                      # 1, 64 and 256 running sequences
    python scripts/bench_host.py --running 64 --steps 500 --profile
    python scripts/bench_host.py --stream-interval 8   # streamed outputs every 8 tokens
    python scripts/bench_host.py --core-process        # the engine core in its own process

With --core-process the core steps in a child process as fast as it can; its µs per
step come from the read-back times of consecutive steps, and the frontend (this
process) turns them into outputs on its own core, behind.

This machine's speed is not steady: the same loop has measured 150 µs a step in one
stretch and 300 in the next, often within one run. So each row also times a fixed
reference (50 small numpy operations on 64-element arrays, about what a decode step of
64 sequences does) just before its runs: read the step times against it.

The tokenizer is the default model's (a 49k BPE vocabulary, fetched once) when it is
available, else the tests' byte tokenizer.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pathlib
import pstats
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

PROMPT_TOKENS = 32
MAX_MODEL_LEN = 2048


class InstantDevice:
    """Stands in for the ModelRunner: a step 'computes' at once and samples random tokens."""

    def __init__(self, vocab: int, num_top: int, seed: int = 0):
        self.vocab, self.num_top = vocab, num_top
        self.rng = np.random.default_rng(seed)
        self._outputs: dict[int, list] = {}  # made ahead, so the stand-in itself costs nothing
        self._next = 0

    def step(self, inputs):
        from jaxinfer.runner.model_runner import StepOutput
        rows = inputs.shape.num_rows
        if rows not in self._outputs:
            made = []
            for _ in range(64):
                tokens = self.rng.integers(100, self.vocab, rows, dtype=np.int32)
                logprobs = np.full(rows, -1.0, np.float32)
                made.append(StepOutput(packed=np.concatenate([tokens, logprobs.view(np.int32)]),
                                       top_ids=np.zeros((rows, self.num_top), np.int32),
                                       top_logprobs=np.zeros((rows, self.num_top), np.float32)))
            self._outputs[rows] = made
        self._next += 1
        made = self._outputs[rows]
        return made[self._next % len(made)]

    def copy_pages(self, pairs):
        pass

    def reset_penalty_slot(self, slot, tokens, prompt_len):
        pass


def tokenizer():
    try:
        from checkpoints.default_model import default_model_path
        from jaxinfer.tokenizer import Tokenizer
        return Tokenizer.from_gguf_file(default_model_path(progress=False)), "SmolLM2 (49,152 tokens)"
    except Exception as e:  # offline and not cached
        from engine_fixtures import byte_tokenizer
        return byte_tokenizer(), f"byte tokenizer (default model unavailable: {e})"


def instant_core(running: int, tok, stream_interval: int = 1):
    """An EngineCore for `running` sequences over the tiny model, with the instant device
    standing in for the runner: the factory of a core process (module-level: it pickles)."""
    from jaxinfer.engine.engine_core import EngineCore
    from jaxinfer.sharding import make_mesh

    model, config = _model_and_config(running, tok, stream_interval)
    core = EngineCore(model, make_mesh(), config)
    core.runner = InstantDevice(tok.vocab_size, _max_logprobs())
    return core


def _max_logprobs() -> int:
    from jaxinfer.core.sampling_params import MAX_LOGPROBS
    return MAX_LOGPROBS


def _model_and_config(running: int, tok, stream_interval: int):
    import jax.numpy as jnp

    from checkpoints import loader
    from jaxinfer.core.config import EngineConfig
    from jaxinfer.sharding import make_mesh

    model = loader.load(ROOT / "tests" / "data" / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(),
                        progress=False)
    # The tiny model's context is short; the bench runs long sequences.
    model = dataclasses.replace(model, tokenizer=tok,
                                config=dataclasses.replace(model.config, max_position_embeddings=MAX_MODEL_LEN))
    pages = running * (MAX_MODEL_LEN // 16 + 1) + 1
    config = EngineConfig(max_num_seqs=max(running, 2), max_num_batched_tokens=max(512, running),
                          max_model_len=MAX_MODEL_LEN, num_pages=pages, enable_prefix_caching=True,
                          stream_interval=stream_interval)
    return model, config


def reference_us(rounds: int = 400) -> float:
    """µs for a fixed batch of 50 small numpy operations (the median of `rounds`): the machine's
    speed at the moment, for reading the step times beside it."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, 100, (256, 8)).astype(np.int32)
    col = rng.integers(0, 100, 256).astype(np.int32)
    rows = np.sort(rng.choice(256, 64, replace=False))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(10):
            a = col[rows] + 1
            b = table[rows]
            col[rows] = a
            np.flatnonzero(a > 50)
            (b == a[:, None]).any(axis=1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def engine_for(running: int, tok, stream_interval: int = 1):
    from jaxinfer.engine.engine import Engine
    from jaxinfer.sharding import make_mesh

    model, config = _model_and_config(running, tok, stream_interval)
    engine = Engine(model, make_mesh(), config)
    engine.runner = InstantDevice(tok.vocab_size, _max_logprobs())
    return engine


def _add_requests(engine, running: int) -> None:
    from jaxinfer.core.sampling_params import SamplingParams

    rng = np.random.default_rng(1)
    for i in range(running):
        sampled = i % 2 == 1  # half greedy, half sampled with top-p and a seed
        params = SamplingParams(max_tokens=MAX_MODEL_LEN - PROMPT_TOKENS, ignore_eos=True,
                                temperature=0.8 if sampled else 0.0, top_p=0.95, seed=i,
                                stop=["\n\n\n\n"] if i % 4 == 0 else None)
        prompt = rng.integers(100, engine.vocab_size, PROMPT_TOKENS).tolist()  # the tiny model's vocabulary
        engine.add_request(f"r{i}", prompt, params, stream=True)


def measure_core_process(running: int, steps: int, tok, repeats: int = 3, stream_interval: int = 1,
                         core_only: bool = False) -> dict:
    """The core in its own process, stepping as fast as it can: its µs per step from the
    read-back times of consecutive steps, and the frontend's time to turn `steps` of them
    into outputs."""
    import functools

    from jaxinfer.engine.engine import Engine

    engine = Engine.with_core_process(functools.partial(instant_core, running, tok, stream_interval), warmup=False)
    try:
        runs = []
        for _ in range(repeats):
            # Fresh requests each run: the core runs ahead of the frontend, so by the end of a
            # run it may have taken the last ones to their length already.
            for rid in list(engine.requests):
                engine.abort(rid)
            engine.drain()
            _add_requests(engine, running)
            while any(s.first_token_time is None for s in engine.requests.values()):
                engine.step()
            times, cpu_before = [], engine.outputs.cpu_seconds
            t = time.perf_counter()
            original = engine.outputs.submit

            def submit(record, original=original):
                if hasattr(record, "seq_ids"):
                    times.append(record.time)
                if not core_only:
                    original(record)
            engine.outputs.submit = submit
            while len(times) < steps:
                if not engine.has_unfinished():
                    raise RuntimeError(f"the requests finished after {len(times)} of {steps} steps: "
                                       "use fewer --steps")
                engine.step()
            engine.outputs.wait()
            took = time.perf_counter() - t
            engine.outputs.submit = original
            core_us = (times[steps - 1] - times[0]) / (steps - 1) * 1e6
            runs.append({"step_us": core_us, "step_cpu_us": float("nan"),
                         "output_cpu_us": (engine.outputs.cpu_seconds - cpu_before) / len(times) * 1e6,
                         "all_us": took / len(times) * 1e6})
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    finally:
        engine.close()


def measure(running: int, steps: int, tok, profile: bool, step_thread_only: bool = False,
            repeats: int = 3, stream_interval: int = 1) -> dict:
    engine = engine_for(running, tok, stream_interval)
    if step_thread_only:  # the output processor gets nothing: only the step thread's own work is timed
        engine.outputs.submit = lambda record: None
    _add_requests(engine, running)
    while engine.scheduler.waiting or any(s.remaining > 1 for s in engine.scheduler.running):
        engine.step()  # admit and prefill everyone
    for _ in range(5):
        engine.step()
    engine.outputs.wait()
    runs = []
    for _ in range(repeats):  # the median of a few runs: this machine's speed moves from second to second
        runs.append(_timed(engine, steps, profile))
        assert engine.num_running == running, (engine.num_running, running)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _timed(engine, steps: int, profile: bool) -> dict:
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    cpu_before = engine.outputs.cpu_seconds
    t = time.perf_counter()
    step_cpu = time.thread_time()
    for _ in range(steps):
        engine.step()
    step_cpu = time.thread_time() - step_cpu
    took = time.perf_counter() - t
    engine.outputs.wait()
    drained = time.perf_counter() - t
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    out_cpu = engine.outputs.cpu_seconds - cpu_before
    return {"step_us": took / steps * 1e6, "step_cpu_us": step_cpu / steps * 1e6,
            "output_cpu_us": out_cpu / steps * 1e6, "all_us": drained / steps * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--running", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=200, help="steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per size; the median is printed")
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps (to stderr)")
    p.add_argument("--stream-interval", type=int, default=1, help="EngineConfig.stream_interval")
    p.add_argument("--step-thread-only", action="store_true",
                   help="hand the output processor nothing: time the step thread's work alone")
    p.add_argument("--core-process", action="store_true",
                   help="the engine core in its own process (Engine.with_core_process): the core's µs per step "
                        "and the frontend's time per step's outputs")
    args = p.parse_args()
    tok, tok_name = tokenizer()
    print(f"# python scripts/bench_host.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# decode steps against an instant device; tokenizer: {tok_name}; streamed outputs "
          f"(every {args.stream_interval} tokens)")
    print("| running sequences | step thread µs / step (wall) | its CPU | output thread CPU µs / step "
          "| both, wall, outputs drained | goal (issue 11) | reference µs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    goals = {64: "≤ 300", 256: "≤ 1,000"}
    if args.core_process:
        print("(core process: 'step thread' is the core's own loop in its process, from its read-back times; "
              "'both' is the frontend's wall time per step's outputs, the core running ahead)")
    for running in args.running:
        ref = reference_us()
        if args.core_process:
            r = measure_core_process(running, args.steps, tok, args.repeats, args.stream_interval,
                                     core_only=args.step_thread_only)
        else:
            r = measure(running, args.steps, tok, args.profile, args.step_thread_only, args.repeats,
                        args.stream_interval)
        print(f"| {running} | {r['step_us']:,.0f} | {r['step_cpu_us']:,.0f} | {r['output_cpu_us']:,.0f} "
              f"| {r['all_us']:,.0f} | {goals.get(running, '')} | {ref:.0f} |", flush=True)


if __name__ == "__main__":
    main()
