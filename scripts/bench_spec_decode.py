"""Speculative decoding (issue 13): decode speed with and without it, and how many drafts the target keeps.

    python scripts/bench_spec_decode.py                          # CPU: the default model, real text
    python scripts/bench_spec_decode.py --speculative-config '{"model": "default", "quantization": "gguf"}'
    python3 scripts/bench_spec_decode.py --random-8b --batches 1 --oracle 0.5,0.7,0.9 --drafts itself,1b  # H200

On random weights (--random-8b: the Llama-3-8B shape) nothing a proposer guesses is kept, so speed is
measured against a known acceptance instead (--oracle): a replay proposer drafts the target's own greedy
continuation (recorded by a plain engine first, in the verifying steps' row bucket, which the speculating
engine then has alone: on the GPU greedy tokens are reproduced only within one bucket), each draft token
swapped for a wrong one with probability 1 - a. Alone it costs what prompt lookup costs (host work only);
with --drafts, a real draft model runs for every proposal (its device time and read-back paid) and the
replay's tokens replace its own: "itself" (the target as its own draft: every draft kept, nothing
replayed), "1b" (the Llama-3.2-1B shape, random weights) and "head" (a draft head of one layer over the
target's hidden states, random parameters), the last two with tokens replayed at each --oracle acceptance.

Workloads (greedy, EOS ignored, --new-tokens each):
  repeat   8 prompts that ask for a given passage again (chat template on a real model; a random passage
           said three times on random weights): where prompt lookup finds its drafts
  edit     8 prompts that ask for a passage or a function back with a small edit (real model only)
  free     8 open-ended prompts (real model only): what lookup finds in ordinary text
Prompts run B at a time (max_num_seqs = B). Acceptance length: tokens a verifying sequence emits per step
(1 + kept drafts / verifications), as speculative-decoding papers report it.
For each batch size, two engines in one process over the same weights: speculation off, and on
(--speculative-config, vLLM's keys; decode buckets sized for B x (1 + k) rows). Each runs one untimed
`generate`, then --repeats timed ones. tok/s = generated tokens / the decode phase's wall time (first token
read back to last, the slowest request); acceptance = kept / drafted tokens; tokens per verifying step =
1 + kept / sequences verified. Greedy outputs of the two engines are compared: they must be equal.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PASSAGE = ("The printing press spread quickly across Europe. Within fifty years of its invention, presses were "
           "at work in more than two hundred cities, and millions of books had been printed. Scholars could "
           "compare texts side by side, errors could be corrected in later editions, and ideas travelled faster "
           "than ever before.")
PASSAGE2 = ("Our team meets every Monday at nine. We review last week's work, agree on the plan for the week "
            "and note any risks. Minutes are shared by noon, and anyone who missed the meeting reads them first.")
CODE = "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
REPEAT = [f"Repeat this passage exactly, word for word:\n\n{PASSAGE}",
          f"Copy the following text without changing anything:\n\n{PASSAGE}",
          f"Here is a paragraph. Write it out again.\n\n{PASSAGE}",
          f"Please echo back this text: {PASSAGE}",
          f"Repeat this passage exactly:\n\n{PASSAGE2}", f"Copy this note word for word: {PASSAGE2}",
          f"Write this out again, unchanged:\n{PASSAGE2}", f"Echo the text below.\n\n{PASSAGE2}"]
EDIT = [f"Rename the function to `average` and return the code:\n\n{CODE}",
        f"Add a docstring to this function and return the whole code:\n\n{CODE}",
        f"Change `total` to `acc` everywhere in this code:\n\n{CODE}",
        f"Add type hints to this function and print it again:\n\n{CODE}",
        f"Replace 'Monday' with 'Tuesday' in this text and return it: {PASSAGE2}",
        f"Fix the spelling in this text and return it in full: {PASSAGE.replace('quickly', 'quikly')}",
        f"Rewrite this text with 'nine' as '9 am' and return it: {PASSAGE2}",
        f"Put this paragraph in the past tense:\n\n{PASSAGE2}"]
FREE = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
        "What are three tips for learning a new language?", "Describe the water cycle for a child.",
        "Write a Python function that reverses a string.", "What is the capital of Australia, and why?",
        "Give me a recipe for pancakes.", "Summarize the plot of a heist movie in five sentences."]
WORKLOADS = {"repeat": REPEAT, "edit": EDIT, "free": FREE}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-8b", action="store_true", help="the Llama-3-8B shape with random weights")
    p.add_argument("--tiny", action="store_true", help="with --random-8b: tiny shapes instead (a CPU smoke run)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batches", default="1")
    p.add_argument("--workloads", default=None, help="repeat,edit,free (random weights: repeat only)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                                                    '"prompt_lookup_min": 2, "prompt_lookup_max": 4}')
    p.add_argument("--oracle", default="0.5,0.7,0.9", help="random weights: replayed acceptances")
    p.add_argument("--carry-all", action="store_true",
                   help="carry every proposed draft (step and proposal times unmeasured): acceptance, not the "
                        "load-adaptive choice")
    p.add_argument("--drafts", default="", help="random weights: draft models to run (itself,1b,head)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args()


def load(args):
    import jax.numpy as jnp

    from jaxinfer.sharding import make_mesh

    if args.random_8b:
        from bench_decode import dummy_model, model_config

        dtype = jnp.dtype(args.dtype or "bfloat16")
        return dummy_model(model_config(args.tiny), dtype, make_mesh()), "Llama-3-8B shape, random weights"
    from checkpoints import loader
    from checkpoints.default_model import default_model_path

    path = default_model_path(progress=False)
    spec = json.loads(args.speculative_config)
    if spec.get("model") == "default":
        spec["model"] = str(path)
        args.speculative_config = json.dumps(spec)
    model = loader.load(path, dtype=jnp.dtype(args.dtype or "float32"), mesh=make_mesh(), progress=False)
    return model, f"default model ({path.name})"


def prompts_for(workload, b, model, rng):
    if model.tokenizer is None:  # random weights: a random passage said three times, then its start
        passage = rng.integers(10, model.config.vocab_size - 10, 48).tolist()
        return [passage * 3 + passage[:8] for _ in range(b)]
    texts = WORKLOADS[workload]
    return [{"messages": [{"role": "user", "content": texts[i % len(texts)]}]} for i in range(max(b, len(texts)))]


def run(llm, prompts, params, repeats):
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    best, rates = None, []
    for _ in range(repeats):
        before = dict(llm.engine.core.counters())
        outs = llm.generate(prompts, params, use_tqdm=False)
        first = min(o.metrics.first_token_time for o in outs)
        last = max(o.metrics.finished_time for o in outs)
        tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
        after = llm.engine.core.counters()
        rate = tokens / (last - first)
        row = dict(tok_s=rate, drafted=after["spec_draft_tokens"] - before["spec_draft_tokens"],
                   accepted=after["spec_accepted_tokens"] - before["spec_accepted_tokens"],
                   verified=(after["spec_drafted_per_position"] or [0])[0]
                   - (before["spec_drafted_per_position"] or [0])[0],
                   steps=after["steps"] - before["steps"], outputs=[list(o.outputs[0].token_ids) for o in outs])
        best = row if best is None or row["tok_s"] > best["tok_s"] else best
        rates.append(round(rate, 1))
    return {**best, "all": rates}


class Replay:
    """A proposer that drafts each sequence's known greedy continuation (`refs`, by prompt), each token
    swapped for a wrong one with probability 1 - acceptance; with `inner`, that proposer runs first (its cost
    paid, its tokens dropped)."""

    def __init__(self, k, refs, prompt_len, vocab, acceptance, inner=None, seed=0):
        import numpy as np

        self.k, self.refs, self.prompt_len, self.vocab, self.acceptance = k, refs, prompt_len, vocab, acceptance
        self.inner, self.rng = inner, np.random.default_rng(seed)
        self.writes_pages = bool(inner is not None and inner.writes_pages)

    def propose(self, queries):
        import numpy as np

        if self.inner is not None:
            self.inner.propose(queries)
        out = []
        for q in queries:
            ref = self.refs[tuple(q.tokens[:self.prompt_len].tolist())]
            done = len(q.tokens) - self.prompt_len
            d = np.array(ref[done:done + q.k], np.int32)
            wrong = self.rng.random(len(d)) >= self.acceptance
            d[wrong] = (d[wrong] + 1) % self.vocab
            out.append(d)
        return out

    def forget(self, row):
        if self.inner is not None:
            self.inner.forget(row)


def llama_1b(vocab):
    from jaxinfer.models import LlamaConfig

    return LlamaConfig(architecture="llama", vocab_size=vocab, hidden_size=2048, intermediate_size=8192,
                       num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192)


def random_weights_main(args):
    """Speed against a known acceptance on random weights (module docstring)."""
    import jax
    import numpy as np

    from bench_decode import dummy_model
    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.llm import LLM
    from jaxinfer.sharding import make_mesh

    k = json.loads(args.speculative_config).get("num_speculative_tokens", 3)
    model, label = load(args)
    V, L = model.config.vocab_size, 64
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"# {label} on {jax.devices()[0].device_kind}; k = {k}; {args.new_tokens} new tokens, greedy; "
          f"prompts of {L} random tokens", flush=True)
    print("\n| B | proposer | replayed acceptance | off tok/s | on tok/s | speed-up | kept / drafted | "
          "acceptance length | outputs equal |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|", flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        rng = np.random.default_rng(b)
        prompts = [rng.integers(10, V - 10, L).tolist() for _ in range(b)]
        common = dict(max_num_seqs=b, max_num_batched_tokens=max(256, b * L), max_model_len=L + args.new_tokens + 32,
                      enable_prefix_caching=False, prefill_sizes=(max(256, -(-b * L // 64) * 64),))
        started = time.monotonic()
        off = LLM.from_loaded(model, **common, decode_sizes=(max(2, b),))
        a = run(off, prompts, params, args.repeats)
        off.close()  # its KV pool and steps freed now, not at the next cyclic collection
        sizes = (b * (1 + k),) if b <= 8 else (max(2, b),)
        if b <= 8:
            # On the GPU a row's logits depend on the step's row count (XLA picks a GEMM per shape), and random
            # weights' near-flat logits turn that into other greedy tokens within a few. So the replayed text
            # comes from a plain run in the verifying steps' bucket, and the speculating engine has that bucket
            # alone: its steps without drafts pay for the wider rows (the speed-up is against `off`).
            wide = LLM.from_loaded(model, **common, decode_sizes=sizes)
            reference = run(wide, prompts, params, 1)["outputs"]
            wide.close()
        else:
            reference = a["outputs"]
        refs = {tuple(p): out for p, out in zip(prompts, reference)}
        variants = [("replay", None)] + [(d, d) for d in args.drafts.split(",") if d]
        for name, draft in variants:
            spec = {"method": "ngram", "num_speculative_tokens": k}
            extra = {}
            if draft == "itself":
                spec, extra = {"method": "draft_model", "model": "the target", "num_speculative_tokens": k}, \
                    {"draft_model": model}
            elif draft == "head":  # a draft head (random parameters) over layers 1/4, 1/2, 3/4 up
                import tempfile

                from jaxinfer.spec_decode import draft_head

                n = model.config.num_layers
                head = draft_head.new_head(model.graphdef, model.state, model.config, (n // 4, n // 2, 3 * n // 4),
                                           dtype=model.dtype)
                where = tempfile.mkdtemp()
                draft_head.save(head, model.config, where)
                del head
                spec = {"method": "eagle3", "model": where, "num_speculative_tokens": k}
            elif draft == "1b":
                small = dummy_model(model.config if args.tiny else llama_1b(V), model.dtype, make_mesh())
                spec, extra = {"method": "draft_model", "model": "1B shape", "num_speculative_tokens": k}, \
                    {"draft_model": small}
            on = LLM.from_loaded(model, **common, decode_sizes=sizes, speculative_config=spec, **extra)
            on.engine.core._observe_step = lambda rows_, seconds: None  # carry every draft: the replayed rate
            inner = on.engine.core.proposer
            print(f"(engines for B = {b}, {name}: {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            for acceptance in ([None] if draft == "itself" else [float(x) for x in args.oracle.split(",")]):
                if acceptance is not None:
                    on.engine.core.scheduler.proposer = Replay(k, refs, L, V, acceptance, inner)
                s = run(on, prompts, params, args.repeats)
                kept = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
                row = dict(b=b, proposer=name, replayed=acceptance, off=a["tok_s"], on=s["tok_s"], off_all=a["all"],
                           on_all=s["all"], drafted=s["drafted"], accepted=s["accepted"], acceptance=kept,
                           acceptance_length=1 + s["accepted"] / s["verified"] if s["verified"] else 1.0,
                           equal=reference == s["outputs"])
                rows.append(row)
                if not row["equal"]:  # where the first output differs, for the record
                    for i, (x, y) in enumerate(zip(reference, s["outputs"])):
                        if x != y:
                            at = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v) if len(x) == len(y) else -1
                            print(f"(sequence {i} differs at token {at}: {x[max(0, at - 2):at + 3]} against "
                                  f"{y[max(0, at - 2):at + 3]})", file=sys.stderr, flush=True)
                            break
                print(f"| {b} | {name} | {'-' if acceptance is None else f'{acceptance:.0%}'} | {row['off']:.1f} | "
                      f"{row['on']:.1f} | {row['on'] / row['off']:.2f}x | {s['accepted']} / {s['drafted']} "
                      f"({kept:.0%}) | {row['acceptance_length']:.2f} | {'yes' if row['equal'] else 'NO'} |",
                      flush=True)
            on.close()
    print("\nrepeats (tok/s, off / on):", [(r["b"], r["proposer"], r["replayed"], r["off_all"], r["on_all"])
                                          for r in rows])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


def main():
    args = parse_args()
    if args.random_8b:
        return random_weights_main(args)
    import jax
    import numpy as np

    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.llm import LLM

    model, label = load(args)  # "model": "default" in the speculative config becomes the default model's path
    spec = json.loads(args.speculative_config)
    k = spec.get("num_speculative_tokens", 3)
    workloads = (args.workloads or ("repeat" if args.random_8b else "repeat,edit,free")).split(",")
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"# {label} on {jax.devices()[0].device_kind}; speculative_config {spec}; {args.new_tokens} new tokens, greedy", flush=True)
    print("\n| workload | prompts | B | off tok/s | on tok/s | speed-up | drafted | kept | acceptance | "
          "acceptance length | outputs equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        common = dict(max_num_seqs=b, max_num_batched_tokens=max(512, b * 64), max_model_len=1024,
                      enable_prefix_caching=False)
        started = time.monotonic()
        off = LLM.from_loaded(model, **common)
        # Rows for every sequence's drafts where the batch is small enough to speculate at all.
        limit = spec.get("disable_by_batch_size") or 8
        on = LLM.from_loaded(model, **common, speculative_config=spec,
                             decode_sizes=(b, b * (1 + k)) if b <= limit else ())
        if args.carry_all:
            on.engine.core._observe_step = lambda rows_, seconds: None
        print(f"(engines for B = {b} ready in {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        for workload in workloads:
            prompts = prompts_for(workload, b, model, np.random.default_rng(b))
            a, s = run(off, prompts, params, args.repeats), run(on, prompts, params, args.repeats)
            verifying = max(1, s["steps"])  # steps of the speculative run (each verifies its sequences)
            row = dict(workload=workload, b=b, off=a["tok_s"], on=s["tok_s"], off_all=a["all"], on_all=s["all"],
                       drafted=s["drafted"], accepted=s["accepted"],
                       acceptance=s["accepted"] / s["drafted"] if s["drafted"] else 0.0,
                       tokens_per_step=sum(len(o) for o in s["outputs"]) / verifying / b,
                       acceptance_length=1 + s["accepted"] / s["verified"] if s["verified"] else 1.0,
                       equal=a["outputs"] == s["outputs"])
            rows.append(row)
            print(f"| {workload} | {len(prompts)} | {b} | {row['off']:.1f} | {row['on']:.1f} | "
                  f"{row['on'] / row['off']:.2f}× | {row['drafted']} | {row['accepted']} | {row['acceptance']:.0%} | "
                  f"{row['acceptance_length']:.2f} | {'yes' if row['equal'] else 'NO'} |", flush=True)
        off.close()
        on.close()
    print("\nrepeats (tok/s, off / on):", [(r["workload"], r["b"], r["off_all"], r["on_all"]) for r in rows])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
