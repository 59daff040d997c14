"""Decode speed side by side with gpt-fast (issue 11): the same workload through both, in one sitting.

    python scripts/bench_decode.py                      # H200: jaxinfer, then the peer, then a restart
    python scripts/bench_decode.py --tiny --no-peer     # CPU smoke test: small Llama, float32, B = 1, 2

Workload (the peer's, `../shared/bench/peer_gptfast.py`): the Llama-3-8B shape with random bf16 weights, B prompts
of 128 random token ids, 128 new tokens each, temperature 1 (seeded), EOS ignored, B in 1, 16, 64.

What runs, each part in its own child process so that only one of them holds the GPU at a time (JAX takes 75% of
the GPU's memory when it starts and keeps it until its process exits; so does PyTorch's caching allocator, less
eagerly):
  1. jaxinfer: random weights made on the device, then for each B an `LLM.from_loaded` with max_num_seqs = B, a
     one-step prefill (max_num_batched_tokens = B x 128, so every request starts decoding in the same step and no
     decode step carries prefill work) and exactly two compiled shapes (B decode rows with and without the
     prefill region). An untimed `generate` of 4 tokens, then --repeats timed `LLM.generate` runs on fresh prompts.
     Then the step split (below) on that engine's runner. Largest B first, so a cut-short run keeps B = 64.
  2. the peer: `python <carry>/bench/peer_gptfast.py llama-3-8b bf16 1,16,64` (--peer-script, --peer-quantization),
     if not --no-peer.
  3. a restart: a fresh process makes the weights and starts the B = 64 engine again, now with the persistent XLA
     cache and the lowered steps on disk warm: the "8B shape to ready, warm cache" of issue 11, for this
     benchmark's two-shape engine (--no-restart skips it).
Then the parent prints two markdown tables. Every part has a time limit inside --budget-s; what finished is
printed and written to <out-dir>/bench_decode.json even when a later part fails or runs out of time.

Decode tok/s = B / median TPOT, as in issue 11. TPOT is taken per request from RequestOutput.metrics:
(finished_time - first_token_time) / (output tokens - 1), i.e. the read-back of the first token (which ends the
prefill step) to the read-back of the last, so prefill is excluded and every interval in it is one engine step
with B decode rows. It needs nothing from the engine's internals and stays valid while the host loop is rewritten;
the engine's own per-step timing would need a hook into the step loop. The median is over the requests of all
timed repeats (all requests of one run move in lockstep, so it is the mean step time of that run's decode phase);
each repeat's median is printed too, as the spread. gpt-fast's tok/s is B x 128 / its decode wall time, the
same quantity for a batch that decodes in lockstep.

HBM roofline fraction = (weight bytes read per step + KV bytes read per step) / step time / --hbm-tbps (H200
datasheet 4.8 TB/s; a device-to-device copy measured about 4.3 TB/s there). Weight bytes: every parameter except
the input embedding table, of which a step reads only B rows. KV bytes: B x mean context (prompt + new / 2) x
layers x 2 x kv_heads x head_dim x dtype bytes, the ideal; whatever an attention kernel reads beyond it (padding
to pages or to the page table's width) counts as slowness here.

Step split (second table), measured on the jaxinfer engine of each B after its timed runs, on a decode batch of B
rows at the mean context, all on the device with block_until_ready around N back-to-back calls:
  device step  runner.step: forward + sampling + the step's input transfers, as the engine issues it
  forward      the step's forward executable alone, its input already on the device
  sampling     the step's sampler executable alone (the variant the step uses), on that forward's logits
  host         step wall (the median TPOT above) - device step: the host time the device waits for per step
  dispatch     how long runner.step took to return (host), as a check that 'device step' is device-bound
Engine internals used for the split sit in `decode_step_pieces` alone, so a rewrite of the engine needs only that
function changed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PART_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "PYTHONUNBUFFERED": "1"}
DEFAULT_PEER = ROOT / ".bench" / "bench" / "peer_gptfast.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="timed generate runs per batch size")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: bfloat16, float32 with --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="CPU check: a 2-layer Llama shape, float32, batches 1,2, 8 new tokens, no restart unless --restart")
    p.add_argument("--attention", default=None, help="jaxinfer attention implementation (default: auto)")
    p.add_argument("--shape", choices=("llama-3-8b", "deepseek-v2-lite"), default="llama-3-8b",
                   help="the random-weight model's shape (deepseek-v2-lite: MLA and 64 routed experts, no peer)")
    p.add_argument("--quantization", default=None,
                   help="jaxinfer's projections quantized: int8, int4 (group 128), fp8, ... (random weights)")
    p.add_argument("--prefix-caching", action="store_true", help="leave automatic prefix caching on")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the roofline, TB/s")
    p.add_argument("--split-iters", type=int, default=20, help="back-to-back calls per timing round")
    p.add_argument("--no-split", action="store_true", help="skip the forward/sampling/host split")
    p.add_argument("--compare-inline", action="store_true",
                   help="time the repeats again with the step launched inline (no launch thread; GPU only)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-jaxinfer", action="store_true", help="skip part 1 (e.g. to re-run only the peer)")
    p.add_argument("--peer-script", default=str(DEFAULT_PEER))
    p.add_argument("--peer-python", default=sys.executable, help="a python with torch (the device's python3)")
    p.add_argument("--peer-model", default="llama-3-8b")
    p.add_argument("--peer-quantization", choices=("bf16", "int8", "int4"), default="bf16",
                   help="the peer's weights (its int4 groups by 128)")
    p.add_argument("--restart", action=argparse.BooleanOptionalAction, default=None,
                   help="restart the largest-B engine with warm caches (default: on, off with --tiny)")
    p.add_argument("--budget-s", type=float, default=570, help="wall-clock budget of the whole run")
    p.add_argument("--peer-timeout", type=float, default=330)
    p.add_argument("--restart-reserve-s", type=float, default=60,
                   help="time kept back from the peer for the restart")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or None,
                   help="results and logs (default: $OUT, else a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("jaxinfer", "restart"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        if args.batches == "1,16,64":
            args.batches = "1,2"
        if args.new_tokens == 128:
            args.new_tokens = 8
        args.split_iters = min(args.split_iters, 5)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.no_restart = not (args.restart if args.restart is not None else not args.tiny)
    return args


# ==== the jaxinfer part (child process; the only code that imports jax) =========================================

def model_config(tiny: bool, shape: str = "llama-3-8b"):
    from jaxinfer.models import LlamaConfig

    if shape == "deepseek-v2-lite":
        from jaxinfer.layers.rope import RopeScaling
        from jaxinfer.models.deepseek import DeepseekConfig

        return DeepseekConfig(  # DeepSeek-V2-Lite's config.json
            architecture="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27,
            num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            q_lora_rank=None, rms_norm_eps=1e-6, max_position_embeddings=163840, num_experts=64,
            num_experts_per_tok=6, moe_intermediate_size=1408, num_shared_experts=2, first_k_dense_replace=1,
            scoring_func="softmax", topk_method="greedy", routed_scaling_factor=1.0,
            rope_scaling=RopeScaling(kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                                     mscale=0.707, mscale_all_dim=0.707))
    if tiny:
        return LlamaConfig(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                           rope_theta=500000.0, max_position_embeddings=1024)
    return LlamaConfig(  # the LLAMA3_8B of scripts/bench_throughput.py
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192)


def dummy_model(cfg, dtype, mesh, quantization=None):
    """Random weights on the device (params.dummy_params: one compiled initializer per kind);
    with `quantization` ("int8", "int4", "fp8", ...), every projection but the head quantized."""
    import jax

    from checkpoints.loader import LoadedModel
    from jaxinfer import params as P
    from pallas_kernels.quantized_matmul import parse

    scheme = P.fit_quantization(cfg, dtype, parse(quantization))
    graphdef, state = P.dummy_params(cfg, dtype, mesh, quantization=scheme)
    jax.block_until_ready(jax.tree.leaves(state))
    return LoadedModel(cfg, graphdef, state, None, "dummy (params.dummy_params)" + (f", {scheme.name}" if scheme else ""),
                       dtype=dtype, quantization=scheme)


def engine_config(b: int, args) -> dict:
    """EngineConfig fields for batch size b: b rows, the whole prefill in one step, two compiled shapes."""
    prefill = -(-b * args.prompt_len // 64) * 64
    cfg = {"max_num_seqs": b, "max_num_batched_tokens": max(prefill, b),
           "max_model_len": args.prompt_len + args.new_tokens, "decode_sizes": (b,), "prefill_sizes": (prefill,),
           "block_q": 64, "enable_prefix_caching": args.prefix_caching}
    if args.attention:
        cfg["attention"] = args.attention
    return cfg


def xla_cache_files() -> int | None:
    """Files in jaxinfer's persistent XLA cache now (0: a cold start), if it has one."""
    try:
        from jaxinfer.runner import compilations
        directory = compilations.enable_persistent_cache()
    except (ImportError, AttributeError):
        return None
    return sum(1 for f in pathlib.Path(directory).rglob("*") if f.is_file()) if directory else None


def num_shapes(llm) -> int | None:
    try:
        return len(llm.engine.config.all_shapes())
    except AttributeError:
        return None


def compile_count() -> int | None:
    """XLA compilations so far in this process, if jaxinfer counts them."""
    try:
        from jaxinfer.runner import compilations
        return compilations.count()
    except (ImportError, AttributeError):
        return None


def bytes_per_step(cfg, state, b: int, context: float, kv_itemsize: int) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step reads at the ideal."""
    from jaxinfer import params as P

    weights = P.param_bytes(state)
    weights -= cfg.vocab_size * cfg.hidden_size * kv_itemsize * (0 if cfg.tie_word_embeddings else 1)
    if getattr(cfg, "kv_lora_rank", None):  # MLA: one latent entry per token; routed experts as touched
        x, k = cfg.num_experts, cfg.num_experts_per_tok
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * kv_itemsize
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        touched = x * (1 - (1 - k / x) ** b)  # distinct experts b tokens choose, routed uniformly
        weights -= moe_layers * (x - touched) * per_expert
        kv = b * context * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * kv_itemsize
        return float(weights), float(kv)
    kv = b * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    return float(weights), float(kv)


def decode_tpot(outs) -> list[float]:
    """Per-request time per output token of the decode phase (first token read back to last)."""
    tpot = []
    for o in outs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        if m.first_token_time is not None and m.finished_time is not None and n > 1:
            tpot.append((m.finished_time - m.first_token_time) / (n - 1))
    return tpot


def timed_per_call(fn, iters: int, rounds: int = 3) -> tuple[float, float]:
    """Median over rounds of (wall time of `iters` back-to-back calls, blocked at the end) / iters, and of the
    time the calls took to return (host dispatch) / iters, in s. Where dispatch comes close to the total, the
    host, not the device, set the pace and the first number is no device time."""
    import jax

    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    per, dispatch = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        dispatch.append((time.perf_counter() - t) / iters)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / iters)
    return statistics.median(per), statistics.median(dispatch)


def decode_step_pieces(llm, b: int, context: int, temperature: float):
    """The engine internals the split needs, in one place: (step, forward, sample) callables over one decode batch
    of b rows at `context` tokens each, built the way the engine builds a decode step. Adapt here when the engine
    moves; each callable returns something to block on."""

    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.core.shapes import SeqWork, pages_needed
    from jaxinfer.runner.sampler import Row, SamplingArrays
    from jaxinfer.runner.step_inputs import StepInputs, build

    engine = llm.engine
    runner, sc = engine.runner, engine.config
    per = pages_needed(context + 1, sc.page_size)
    if 1 + b * per > sc.num_pages:
        raise RuntimeError(f"{b} x {per} pages do not fit the pool of {sc.num_pages}")
    shape = sc.shape(next(d for d in sc.decode_buckets() if d >= b), 0)
    works = [SeqWork([1 + s], context, list(range(1 + s * per, 1 + (s + 1) * per)), logit_offsets=[0])
             for s in range(b)]
    batch, _ = build(shape, works, [], sc.page_size)
    sp = SamplingParams(temperature=temperature, max_tokens=1, ignore_eos=True)
    rows = [Row(sp, 1000 + s, context + 1) for s in range(b)]
    arrays = SamplingArrays.from_rows(rows, shape.num_rows, engine.ban_width)

    inputs = StepInputs.pack(batch, arrays, shape)
    forward_exe, sampler_exe = runner._executables_for(shape, engine.ban_width, inputs.needs_full_sampling())
    on_device = runner.stage(inputs)
    latest = []  # the last forward's (logits, rows): each forward writes over the one before

    def step():
        return runner.step(inputs).packed

    def forward():  # the step's own forward executable, its input already on the device
        # (in the buffer held for its shape, which a runner.step in between refills: not `on_device` then)
        latest[:] = runner.run_forward(forward_exe, runner._held_inputs.get((shape, engine.ban_width), on_device))
        return latest[0]

    forward()

    def sampling():  # the step's own sampler executable on the latest forward's logits
        return runner.run_sampler(sampler_exe, *latest).packed

    return step, forward, sampling


def timed_repeats(run, args, b, cfg, loaded, dtype) -> dict:
    """args.repeats timed generate runs of args.new_tokens each: decode tok/s from the median TPOT, and more."""
    import numpy as np

    compiled = compile_count()
    tpots, medians, ttfts, walls, spreads = [], [], [], [], []
    for _ in range(args.repeats):
        outs, wall = run(args.new_tokens)
        got = {len(o.outputs[0].token_ids) for o in outs}
        if got != {args.new_tokens}:
            raise RuntimeError(f"outputs of {sorted(got)} tokens, expected {args.new_tokens}")
        tp = decode_tpot(outs)
        tpots += tp
        medians.append(statistics.median(tp))
        ttfts += [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        firsts = [o.metrics.first_token_time for o in outs]
        spreads.append(max(firsts) - min(firsts))  # ~0: every request left prefill in the same step
        walls.append(wall)
    tpot = statistics.median(tpots)
    kv_itemsize = np.dtype(dtype).itemsize
    context = args.prompt_len + args.new_tokens / 2
    w_bytes, kv_bytes = bytes_per_step(cfg, loaded.state, b, context, kv_itemsize)
    return dict(tpot_ms=tpot * 1e3, tok_s=b / tpot, repeat_tpot_ms=[m * 1e3 for m in medians],
                ttft_ms_median=statistics.median(ttfts) * 1e3, generate_wall_s=walls,
                first_token_spread_ms=max(spreads) * 1e3, weight_GB=w_bytes / 1e9, kv_GB=kv_bytes / 1e9,
                roofline=(w_bytes + kv_bytes) / tpot / (args.hbm_tbps * 1e12),
                compilations_in_timed_runs=(None if compiled is None else compile_count() - compiled))


def run_jaxinfer(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    import jax
    import numpy as np

    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.llm import DTYPES, LLM
    from jaxinfer.sharding import make_mesh

    out = {"device": f"{jax.devices()[0].device_kind} x{len(jax.devices())}", "jax": jax.__version__,
           "dtype": args.dtype, "batches": {}, "startup": {}}
    result = pathlib.Path(args.result_file)

    def save():
        result.write_text(json.dumps(out, indent=1))

    def say(msg):
        print(f"[jaxinfer {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    cfg = model_config(args.tiny, args.shape)
    dtype = DTYPES[args.dtype]
    out["startup"]["xla_cache_files_before"] = xla_cache_files()
    mesh = make_mesh()
    out["startup"]["import_s"] = time.perf_counter() - t_start
    t = time.perf_counter()
    loaded = dummy_model(cfg, dtype, mesh, args.quantization)
    out["startup"]["weights_s"] = time.perf_counter() - t
    say(f"weights: {loaded.source} in {out['startup']['weights_s']:.1f} s")
    if jax.default_backend() == "gpu":
        from scripts.check_paged_gpu import copy_bandwidth

        out["copy_tbps"] = copy_bandwidth() / 1e12
        say(f"copy bandwidth: {out['copy_tbps']:.2f} TB/s (read + write of 1 GiB)")
    save()
    rng = np.random.default_rng(args.seed)
    # Largest first: if the time limit cuts this part short, the batch that matters most is in.
    batches = sorted((int(x) for x in args.batches.split(",")), reverse=True)
    if args.part == "restart":
        batches = batches[:1]
    for b in batches:
        rec = out["batches"][str(b)] = {}
        try:
            t = time.perf_counter()
            # A restart is ready as LLM() is: once the first shape is made (the rest in the background).
            llm = LLM.from_loaded(loaded, mesh, warmup=True, warmup_in_background=args.part == "restart",
                                  progress=False, **engine_config(b, args))
            rec["ready_s"] = time.perf_counter() - t
            rec["shapes"] = num_shapes(llm)
            say(f"B={b}: engine ready in {rec['ready_s']:.1f} s ({rec['shapes']} shapes)")
            save()
            if args.part == "restart":
                break

            def run(max_tokens, b=b, llm=llm):
                prompts = [rng.integers(10, cfg.vocab_size - 10, args.prompt_len).tolist() for _ in range(b)]
                params = [SamplingParams(max_tokens=max_tokens, temperature=args.temperature, seed=args.seed + i,
                                         ignore_eos=True) for i in range(b)]
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                return outs, time.perf_counter() - t

            run(4)  # untimed: first calls of each shape, first transfers
            rec.update(timed_repeats(run, args, b, cfg, loaded, dtype))
            say(f"B={b}: {rec['tok_s']:,.1f} tok/s, {rec['tpot_ms']:.2f} ms/step "
                f"(repeats {', '.join(f'{m:.2f}' for m in rec['repeat_tpot_ms'])} ms; "
                f"compilations in timed runs: {rec['compilations_in_timed_runs']}; first tokens within "
                f"{rec['first_token_spread_ms']:.2f} ms)")
            if args.compare_inline and llm.engine.core.launch_thread:
                llm.engine.core.launch_thread = False
                inline = rec["inline"] = timed_repeats(run, args, b, cfg, loaded, dtype)
                llm.engine.core.launch_thread = True
                say(f"B={b}: launched inline (no launch thread): {inline['tok_s']:,.1f} tok/s, "
                    f"{inline['tpot_ms']:.2f} ms/step")
            save()
            if not args.no_split:
                context = args.prompt_len + args.new_tokens / 2
                step, forward, sampling = decode_step_pieces(llm, b, int(context), args.temperature)
                split = {}
                for name, fn in (("step", step), ("forward", forward), ("sampling", sampling)):
                    total, dispatch = timed_per_call(fn, args.split_iters)
                    split[name + "_ms"], split[name + "_dispatch_ms"] = total * 1e3, dispatch * 1e3
                split["host_ms"] = rec["tpot_ms"] - split["step_ms"]
                split["forward_roofline"] = ((rec["weight_GB"] + rec["kv_GB"]) * 1e9 / (split["forward_ms"] / 1e3)
                                             / (args.hbm_tbps * 1e12))
                rec["split"] = split
                say(f"B={b}: split " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
                save()
        except Exception as e:  # noqa: BLE001 -- keep going: the other batch sizes still tell something
            import traceback

            traceback.print_exc()
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            say(f"B={b}: FAILED {rec['error']}")
            save()
        finally:
            llm = None
            import gc

            gc.collect()
    out["total_s"] = time.perf_counter() - t_start
    save()


# ==== the parent: runs the parts, prints the tables (never imports jax or torch) ================================

class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_child(cmd: list[str], log_path: pathlib.Path, timeout: float, label: str,
              on_line=None) -> tuple[int | None, float]:
    """Run cmd in its own session; stdout lines are echoed (and given to on_line), stderr goes to log_path.
    Returns (exit code or None on timeout, seconds)."""
    env = {**os.environ, **PART_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t = time.monotonic()
    print(f"== {label}: {' '.join(cmd)} (limit {timeout:.0f} s; stderr -> {log_path})", flush=True)
    if timeout < 5:
        print(f"== {label}: skipped, {timeout:.0f} s left", flush=True)
        return None, 0.0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT,
                                start_new_session=True, text=True, bufsize=1)
        deadline = t + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        timed_out = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 5.0)):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            print(f"  {line.rstrip()}", flush=True)
            if on_line:
                on_line(line)
        if timed_out:
            print(f"== {label}: over its {timeout:.0f} s, stopped", flush=True)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = proc.wait()
    seconds = time.monotonic() - t
    if timed_out:
        rc = None
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"== {label}: exit {rc} after {seconds:.0f} s; last lines of {log_path.name}:", flush=True)
        for line in tail:
            print(f"  | {line[:300]}", flush=True)
    else:
        print(f"== {label}: done in {seconds:.0f} s", flush=True)
    return rc, seconds


def peer_results(lines: list[str]) -> dict[int, dict]:
    """{batch: {tok_s, ms_per_step}} from the peer's JSON lines (each line repeats the earlier batches)."""
    res: dict = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            res.update(json.loads(line))
        except json.JSONDecodeError:
            continue
    out = {}
    for k, v in res.items():
        if k.startswith("b") and k.endswith("_tok_s"):
            b = int(k[1:-len("_tok_s")])
            out[b] = {"tok_s": v, "ms_per_step": res.get(f"b{b}_ms_per_step")}
    return out | ({"meta": {k: v for k, v in res.items() if not k.startswith("b")}} if res else {})


def fmt(v, spec: str, missing: str = "–") -> str:
    return missing if v is None else format(v, spec)


def floor_ms(rec: dict, copy_tbps: float | None) -> float | None:
    """The step's bytes (weights + KV) over the measured copy bandwidth, in ms."""
    if not copy_tbps or rec.get("weight_GB") is None:
        return None
    return (rec["weight_GB"] + rec["kv_GB"]) / copy_tbps


def times(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_tables(report: dict, args) -> None:
    jx = report.get("jaxinfer") or {}
    peer = report.get("peer") or {}
    batches = [int(x) for x in args.batches.split(",")]
    print()
    meta = peer.get("meta", {})
    print(f"device: {jx.get('device', '?')}; jax {jx.get('jax', '?')}; peer: {meta.get('peer', 'not run')} "
          f"(torch {meta.get('torch', '?')}); {args.dtype}; prompts {args.prompt_len}, new tokens "
          f"{args.new_tokens}, temperature {args.temperature}; roofline at {args.hbm_tbps} TB/s")
    print()
    copy = jx.get("copy_tbps")
    print("| batch | gpt-fast tok/s | jaxinfer tok/s | ratio | gpt-fast ms/step | jaxinfer ms/step | HBM roofline "
          "| copy-bw floor ms | × floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        p = peer.get(b) or peer.get(str(b)) or {}
        j = (jx.get("batches") or {}).get(str(b), {})
        ratio = j["tok_s"] / p["tok_s"] if j.get("tok_s") and p.get("tok_s") else None
        note = f" ({j['error']})" if j.get("error") else ""
        print(f"| {b} | {fmt(p.get('tok_s'), ',.1f')} | {fmt(j.get('tok_s'), ',.1f')}{note} | "
              f"{fmt(ratio, '.2f')}{'×' if ratio else ''} | {fmt(p.get('ms_per_step'), '.2f')} | "
              f"{fmt(j.get('tpot_ms'), '.2f')} | {fmt(j.get('roofline'), '.0%')} | "
              f"{fmt(floor_ms(j, copy), '.2f')} | {fmt(times(j.get('tpot_ms'), floor_ms(j, copy)), '.2f')} |")
    if copy:
        print(f"(copy-bw floor: the step's weight and KV bytes over the copy bandwidth measured in this run, "
              f"{copy:.2f} TB/s)")
    print()
    print("jaxinfer decode step split (ms; device times from back-to-back jitted calls at the mean context):")
    print()
    print("| batch | step wall | device step | forward | sampling | host (wall - device) | forward roofline "
          "| step dispatch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        j = (jx.get("batches") or {}).get(str(b), {})
        s = j.get("split") or {}
        print(f"| {b} | {fmt(j.get('tpot_ms'), '.2f')} | {fmt(s.get('step_ms'), '.2f')} | "
              f"{fmt(s.get('forward_ms'), '.2f')} | {fmt(s.get('sampling_ms'), '.3f')} | "
              f"{fmt(s.get('host_ms'), '.2f')} | {fmt(s.get('forward_roofline'), '.0%')} | "
              f"{fmt(s.get('step_dispatch_ms'), '.2f')} |")
    print("(step dispatch: host time for runner.step to return; near 'device step', the host set the pace there)")
    print()
    st = jx.get("startup") or {}
    ready = {b: (jx.get("batches") or {}).get(str(b), {}).get("ready_s") for b in batches}
    print(f"start-up, first in this run ({st.get('xla_cache_files_before')} files in the XLA cache before): import + init {fmt(st.get('import_s'), '.1f')} s, weights {fmt(st.get('weights_s'), '.1f')}"
          f" s, engine + warm-up per batch: " + ", ".join(f"B={b} {fmt(v, '.1f')} s" for b, v in ready.items()))
    rs = report.get("restart") or {}
    if rs:
        rb = next(iter((rs.get("batches") or {}).values()), {})
        total = (rs.get("startup", {}).get("weights_s") or 0) + (rb.get("ready_s") or 0)
        print(f"start-up, restart with warm caches (B={max(batches)} engine, {rb.get('shapes', '?')} shapes, "
              f"{rs.get('startup', {}).get('xla_cache_files_before')} files in the XLA cache): "
              f"import + init {fmt(rs.get('startup', {}).get('import_s'), '.1f')} s, weights "
              f"{fmt(rs.get('startup', {}).get('weights_s'), '.1f')} s, engine + warm-up {fmt(rb.get('ready_s'), '.1f')}"
              f" s; weights to ready {total:.1f} s")
    print(f"wall: {', '.join(f'{k} {v:.0f} s' for k, v in report.get('seconds', {}).items())}")


def main() -> None:
    args = parse_args()
    if args.part:
        return run_jaxinfer(args)
    budget = Budget(args.budget_s)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="bench_decode_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args), "seconds": {}}
    summary = out_dir / "bench_decode.json"

    def save():
        summary.write_text(json.dumps(report, indent=1, default=str))

    own = [sys.executable, str(pathlib.Path(__file__).resolve())] + sys.argv[1:]
    # 1. jaxinfer, leaving the peer and the restart their time.
    reserve = (0 if args.no_peer else min(args.peer_timeout, 240)) + (0 if args.no_restart else args.restart_reserve_s)
    part = out_dir / "jaxinfer.json"
    if not args.no_jaxinfer:
        _, report["seconds"]["jaxinfer"] = run_child(
            own + ["--part", "jaxinfer", "--result-file", str(part)], out_dir / "jaxinfer.log",
            max(budget.left() - reserve, 60), "jaxinfer")
        if part.exists():
            report["jaxinfer"] = json.loads(part.read_text())
        save()
    # 2. the peer.
    if not args.no_peer:
        if not pathlib.Path(args.peer_script).exists():
            print(f"== peer: {args.peer_script} not found (run scripts/prepare_device_carry.sh and carry .bench)")
        else:
            lines: list[str] = []
            batches = args.batches
            _, report["seconds"]["peer"] = run_child(
                [args.peer_python, args.peer_script, args.peer_model, args.peer_quantization, batches],
                out_dir / "peer.log",
                min(args.peer_timeout, budget.left() - (0 if args.no_restart else args.restart_reserve_s)),
                "peer gpt-fast", on_line=lines.append)
            report["peer"] = peer_results(lines)
            save()
    # 3. restart with warm caches.
    if not args.no_restart:
        part = out_dir / "restart.json"
        _, report["seconds"]["restart"] = run_child(
            own + ["--part", "restart", "--result-file", str(part)], out_dir / "restart.log",
            budget.left() - 3, "restart (warm caches)")
        if part.exists():
            report["restart"] = json.loads(part.read_text())
        save()
    print_tables(report, args)
    print(f"results: {summary}")


if __name__ == "__main__":
    main()
