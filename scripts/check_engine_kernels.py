"""The engine with the attention kernels gives what it gives with the reference
attention: greedy tokens and logits, on whatever device this runs on.

    python scripts/check_engine_kernels.py [--impl kernels] [--against reference]

Random bf16 weights (no checkpoint travels to the GPU), two small Llama-family
shapes that the kernels take: head_dim 128 with 4 query heads per KV head, and
head_dim 64 with 3 per KV head plus a sliding window. For each:

  * logits: every position of ragged prompts (one packed prefill) and of
    teacher-forced decode steps, kernels vs reference; max |diff| relative to
    the largest logit, checked against bf16 tolerance;
  * greedy tokens: 24 requests through the engine (prompts of 1 to 700 tokens,
    four sharing a 96-token prefix, chunked prefill, 32 new tokens each). A
    sequence that differs must differ first where the reference's top two
    tokens were closer than twice the largest logit difference measured above
    (a near tie that bf16 rounding can flip), or it fails.

Prints a table per model and PASS/FAIL; exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from checkpoints.loader import LoadedModel  # noqa: E402
from jaxinfer import params as params_lib  # noqa: E402
from jaxinfer.core.sampling_params import SamplingParams  # noqa: E402
from jaxinfer.llm import LLM  # noqa: E402
from jaxinfer.models import LlamaConfig  # noqa: E402
from jaxinfer.runner.model_runner import ModelRunner  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402
from tests.paged_runs import teacher_forced_logits  # noqa: E402

MODELS = {
    "d128_gqa4": LlamaConfig(architecture="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2048,
                             num_layers=4, num_heads=16, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=4096),
    "d64_gqa3_window": LlamaConfig(architecture="llama", vocab_size=4096, hidden_size=576,
                                   intermediate_size=1536, num_layers=4, num_heads=9, num_kv_heads=3,
                                   head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   max_position_embeddings=4096, sliding_window=160),
}
LOGIT_TOL = 3e-2  # max |diff| / max |logit|: a few bf16 roundings through 4 layers
TIE_FACTOR = 2  # a near tie: the reference's top-two gap under twice the largest logit difference


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = [1, 2, 15, 16, 17, 63, 64, 65, 200, 333, 511, 700] + list(rng.integers(1, 400, 8))
    out = [rng.integers(0, vocab, n).tolist() for n in lens]
    prefix = rng.integers(0, vocab, 96).tolist()
    out += [prefix + rng.integers(0, vocab, n).tolist() for n in (1, 7, 40, 90)]
    return out


def logits_diff(cfg, state, graphdef, mesh, impls) -> float:
    rng = np.random.default_rng(1)
    ps = [rng.integers(0, cfg.vocab_size, n) for n in (1, 9, 37, 130, 300)]
    cont = [rng.integers(0, cfg.vocab_size, 12) for _ in ps]
    out = {}
    for impl in impls:
        runner = ModelRunner(cfg, graphdef, state, mesh, num_pages=256, page_size=16, attention_impl=impl)
        out[impl] = teacher_forced_logits(runner, ps, cont, block_q=64)
        del runner
    a, b = (np.concatenate(out[i]).astype(np.float32) for i in impls)
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


def generate(loaded, mesh, impl, reqs):
    # One decode size and one prefill size: two compiled step shapes, compiled on first use.
    llm = LLM.from_loaded(loaded, mesh, warmup=False, attention=impl, max_num_seqs=16,
                          max_num_batched_tokens=512, decode_sizes=(16,), prefill_sizes=(512,),
                          num_pages=1024, max_model_len=1024)
    sp = SamplingParams(temperature=0.0, max_tokens=32, logprobs=2, ignore_eos=True)
    outs = llm.generate(reqs, sp, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="kernels")
    p.add_argument("--against", default="reference")
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; {args.impl} vs {args.against}")
    mesh = make_mesh()
    dtype = jnp.bfloat16
    ok = True
    for name in args.models.split(","):
        cfg = MODELS[name]
        graphdef, state = params_lib.dummy_params(cfg, dtype, mesh, seed=3)
        loaded = LoadedModel(cfg, graphdef, state, None, f"random {name}", dtype=dtype)
        diff, top = logits_diff(cfg, state, graphdef, mesh, (args.impl, args.against))
        rel = diff / top
        reqs = prompts(cfg.vocab_size)
        got = generate(loaded, mesh, args.impl, reqs)
        want = generate(loaded, mesh, args.against, reqs)
        same, ties, bad = 0, 0, []
        for i, ((g, _), (w, wlp)) in enumerate(zip(got, want)):
            if g == w:
                same += 1
                continue
            j = next(k for k in range(len(w)) if g[k] != w[k])
            top = sorted((lp.logprob for lp in wlp[j].values()), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
            if gap < TIE_FACTOR * diff:
                ties += 1
            else:
                bad.append((i, len(reqs[i]), j, gap))
        passed = rel < LOGIT_TOL and not bad
        ok &= passed
        print(f"\n{name}: {cfg.num_heads} q / {cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}, "
              f"window {cfg.sliding_window}")
        print("| logits max |diff| / max |logit| | identical greedy sequences | near-tie divergences | "
              "real divergences | result |")
        print("|---|---|---|---|---|")
        print(f"| {rel:.2e} (tol {LOGIT_TOL}; {diff:.3g} absolute) | {same} / {len(reqs)} | {ties} | {len(bad)} | "
              f"{'PASS' if passed else 'FAIL'} |")
        for i, n, j, gap in bad:
            print(f"  request {i} (prompt {n} tokens) differs at token {j}; reference top-2 gap {gap:.3f}")
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
