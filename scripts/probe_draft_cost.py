"""Where a draft model's proposal time goes (issue 13): the host's time to launch its catch-up and extend
calls, the wait for the device, and the read-back, for the Llama-3.2-1B shape drafting for the 8B shape
(random weights), at one sequence.

    python3 scripts/probe_draft_cost.py            # H200
    python scripts/probe_draft_cost.py --tiny      # CPU smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--attention", default=None, help="the engine's attention implementation (default: auto)")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_decode import dummy_model, model_config
    from bench_spec_decode import llama_1b
    from jaxinfer.llm import LLM
    from jaxinfer.sharding import make_mesh
    from jaxinfer.spec_decode.proposer import DraftQuery

    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    target = dummy_model(model_config(args.tiny), dtype, make_mesh())
    cfg = target.config if args.tiny else llama_1b(target.config.vocab_size)
    draft = dummy_model(cfg, dtype, make_mesh())
    llm = LLM.from_loaded(target, max_num_seqs=1, max_num_batched_tokens=256, max_model_len=512,
                          decode_sizes=(2, 2 * (1 + args.k)), prefill_sizes=(256,), enable_prefix_caching=False,
                          attention=args.attention,
                          speculative_config={"method": "draft_model", "model": "1B shape",
                                              "num_speculative_tokens": args.k}, draft_model=draft)
    prop = llm.engine.core.proposer
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, 100).astype(np.int32)
    pages = np.arange(1, 12, dtype=np.int32)
    prop.propose([DraftQuery(0, tokens[:60], args.k, pages)])  # the prompt, caught up in a chunk
    times = {"catch-up launch": [], "extend launch": [], "device wait": [], "read-back": [], "whole": []}
    n = 60
    for _ in range(args.rounds):
        n += 3
        q = DraftQuery(0, tokens[:n] if n <= 100 else np.resize(tokens, n), args.k, pages)
        t0 = time.perf_counter()
        prop._catch_up_rows([(0, q, int(prop.computed[0]))])
        t1 = time.perf_counter()
        prop.computed[0] = n
        S = prop.query_buckets[0]  # one sequence's bucket (2 on a GPU)
        out = prop._drafts_out.pop(S)
        positions = np.zeros(S, np.int32)
        positions[0] = n
        table = np.zeros((S, prop.pages_per_seq), np.int32)
        table[0, :len(pages)] = pages
        buf = np.concatenate([positions, table.ravel()])
        out = prop._call(("extend", S), prop._extend_fn, prop._carry, prop._stage(("extend", S), buf), out)
        t2 = time.perf_counter()
        jax.block_until_ready(out)
        t3 = time.perf_counter()
        np.asarray(out)
        t4 = time.perf_counter()
        prop._drafts_out[S] = out
        for name, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            times[name].append(v * 1e3)
    print(f"# draft {'tiny' if args.tiny else 'Llama-3.2-1B shape'} for the 8B shape, k = {args.k}, "
          f"attention {args.attention or 'auto'}, {jax.devices()[0].device_kind}; median of {args.rounds} proposals (3 new tokens each)\n")
    print("| part | ms |\n|---|---:|")
    for name, v in times.items():
        print(f"| {name} | {np.median(v):.2f} |")


if __name__ == "__main__":
    main()
