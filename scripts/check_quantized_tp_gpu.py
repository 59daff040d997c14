"""Tensor parallelism with quantized weights on GPUs: the engine over two devices gives what it gives on one.

    python3 scripts/check_quantized_tp_gpu.py [--methods int8,int4,fp8] [--tp 2]

A small Llama shape (4 layers, hidden 1024, 8 query and 4 KV heads of 128, vocab 4096) with random weights made
once on one device and placed again over the tensor-parallel mesh, so both engines hold the same values. Under
the mesh every quantized projection runs the GPU kernel inside shard_map (column-parallel q/k/v and gate/up,
row-parallel o and down, with the group scales split alongside). For each method, prompts of 5 to 300 tokens:

  * teacher-forced logprobs of every prompt token (prompt_logprobs), one device against tp devices: the largest
    difference, checked against a bf16 tolerance;
  * 16 greedy tokens per prompt: the share of sequences that agree token for token (random weights have near
    ties that bf16 rounding in another reduction order can flip, so this one is reported, not checked).

Prints a table and PASS/FAIL; exits 1 on FAIL. Needs tp devices (nvidia-h200-x2 for --tp 2).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

TOLERANCE = 0.05  # nats: bf16 activations summed in another order


def model_config():
    from jaxinfer.models import LlamaConfig

    return LlamaConfig(architecture="llama", vocab_size=4096, hidden_size=1024, intermediate_size=3584,
                       num_layers=4, num_heads=8, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=2048)


def engine(cfg, state, graphdef, scheme, mesh):
    import jax.numpy as jnp

    from checkpoints.loader import LoadedModel
    from jaxinfer import LLM

    loaded = LoadedModel(cfg, graphdef, state, None, "dummy", dtype=jnp.bfloat16, quantization=scheme)
    return LLM.from_loaded(loaded, mesh, max_num_seqs=8, max_model_len=512, enable_prefix_caching=False)


def run(llm, prompts):
    from jaxinfer import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    logprobs = [np.array([pos[tok].logprob for pos, tok in zip(o.prompt_logprobs[1:], p[1:])])
                for o, p in zip(outs, prompts)]
    return logprobs, [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    import jax.numpy as jnp

    from jaxinfer import params as P
    from jaxinfer.sharding import make_mesh
    from pallas_kernels.quantized_matmul import parse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="int8,int4,fp8")
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    cfg = model_config()
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, cfg.vocab_size, n)] for n in (5, 17, 64, 130, 300)]
    one, many = make_mesh(tensor=1), make_mesh(tensor=args.tp)
    rows, failed = [], False
    for method in args.methods.split(","):
        scheme = P.fit_quantization(cfg, jnp.bfloat16, parse(method))
        graphdef, state = P.dummy_params(cfg, jnp.bfloat16, one, quantization=scheme)
        # The same values over tp devices, each in the sharding the model's rules give it.
        shardings = P.param_shardings(state, many)
        spread = P._with_values(state, {path: jax.device_put(P.value_of(v), shardings[path])
                                        for path, v in P.flat_params(state).items()})
        lp1, tok1 = run(engine(cfg, state, graphdef, scheme, one), prompts)
        lp2, tok2 = run(engine(cfg, spread, graphdef, scheme, many), prompts)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(lp1, lp2))
        agree = sum(a == b for a, b in zip(tok1, tok2))
        ok = diff <= TOLERANCE
        failed |= not ok
        rows.append((scheme.name, diff, agree, len(prompts), ok))
        print(f"{'PASS' if ok else 'FAIL'}  {scheme.name}: max |logprob diff| {diff:.4f} over "
              f"{sum(len(a) for a in lp1)} prompt tokens; greedy sequences equal {agree}/{len(prompts)}", flush=True)
    print(f"\n| weights | max \\|Δ logprob\\| (1 vs {args.tp} devices) | greedy sequences equal | check |")
    print("|---|---:|---:|---|")
    for name, diff, agree, total, ok in rows:
        print(f"| {name} | {diff:.4f} | {agree}/{total} | {'PASS' if ok else 'FAIL'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
