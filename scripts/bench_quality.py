"""Quantization quality on the default model: KL divergence from the float model, top-1
agreement and perplexity, over held text of natural prose, code and chat (issue 12).

    python scripts/bench_quality.py                       # int8, int4 (plain: the largest group that fits), fp8
    python scripts/bench_quality.py --schemes int8 int4-g32-zp --tokens 6000

The text is assembled on the machine, never fetched: prose from the Python documentation that
ships with CPython (`pydoc_data.topics`), code from CPython's own modules, and chat, a dozen
question-and-answer turns written for this script, laid out with the model's chat template.
Each part is cut into windows of --window tokens; every window is one teacher-forced prefill,
and every position but a window's last is scored (the next token's log-probability under each
model, and the full distributions for the KL divergence).
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

CHAT = [
    ("How do I keep a sourdough starter alive while I'm away for two weeks?",
     "Feed it well, let it rise for an hour, then put it in the fridge with a loose lid. A cold starter "
     "slows down so much that two weeks is fine. When you come back, discard half and feed it twice a "
     "day for a couple of days until it doubles again."),
    ("What's the difference between a list and a tuple in Python?",
     "A list can change after you make it: you can append, remove or replace items. A tuple cannot. "
     "Because tuples never change, they can be dictionary keys and they say to the reader that the "
     "collection is fixed, like a point's coordinates."),
    ("Can you suggest a name for a grey kitten?",
     "A few ideas: Pebble, Smokey, Ash, Misty, Earl Grey, or Slate. If the kitten is playful, Pebble "
     "suits it; if it likes to sleep in warm places, Earl Grey is a nice joke."),
    ("Why is the sky blue?",
     "Sunlight holds every colour. Air molecules scatter short wavelengths far more than long ones, "
     "so blue light is bounced around the whole sky and reaches your eyes from every direction. At "
     "sunset the light crosses much more air, the blue is scattered away, and reds remain."),
    ("Write a haiku about a train station at night.",
     "Empty platform hums,\nthe last train's lights fade to red,\nrain on the timetable."),
    ("I have a job interview tomorrow. Any quick tips?",
     "Read the job description again and pick three things you have done that match it. Prepare a "
     "short story for each. Have two questions ready for them, arrive ten minutes early, and sleep "
     "well tonight rather than cramming."),
    ("How many minutes are there in a week?",
     "There are 60 minutes in an hour and 24 hours in a day, so 1,440 minutes a day. Times seven "
     "days, that is 10,080 minutes in a week."),
    ("Explain what a hash table is in one paragraph.",
     "A hash table stores values under keys. It runs each key through a hash function that turns it "
     "into a number, and uses that number to pick a slot in an array. Looking a key up means hashing "
     "it again and going straight to its slot, so on average it takes the same short time however "
     "many items are stored. When two keys land in the same slot, the table keeps both, for instance "
     "in a small list, and compares keys to find the right one."),
    ("What should I plant in a shady garden?",
     "Ferns, hostas, hellebores and foxgloves all like shade. For colour, try impatiens or begonias in "
     "summer, and snowdrops and bluebells in spring. Keep the soil rich with leaf mould."),
    ("Translate 'good morning, how are you?' into French and Spanish.",
     "French: « Bonjour, comment allez-vous ? » Spanish: «Buenos días, ¿cómo estás?»"),
    ("Is it safe to leave a laptop charging overnight?",
     "Yes, for a modern laptop. Its charging circuit stops when the battery is full. Heat is what wears "
     "a battery, so keep it on a hard surface, not a bed or a sofa."),
    ("Give me a simple recipe for tomato soup.",
     "Soften a chopped onion and two cloves of garlic in olive oil. Add a kilo of ripe tomatoes, "
     "chopped, a pinch of sugar, salt, and half a litre of stock. Simmer for twenty minutes, blend "
     "until smooth, and finish with a little cream or a spoon of butter."),
]


def held_text(tokenizer, tokens_per_part: int) -> dict[str, list[int]]:
    """{prose, code, chat}: about `tokens_per_part` token ids each."""
    import json
    import textwrap

    from pydoc_data.topics import topics

    prose_parts, code_parts = [], []
    for name in ("assignment", "if", "for", "try", "class", "function", "import", "lambda", "exceptions",
                 "numbers", "typesseq", "typesmapping", "with", "specialnames", "execmodel"):
        prose_parts.append(topics[name])
    for module in (textwrap, json.decoder, json.encoder, argparse):
        code_parts.append(inspect.getsource(module))
    chat = []
    for question, answer in CHAT:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        chat.append(tokenizer.apply_chat_template(messages, add_generation_prompt=False))

    def ids(texts):
        out = []
        for t in texts:  # text, or ids already (a chat template's)
            out += tokenizer.encode(t, add_special_tokens=False) if isinstance(t, str) else list(t)
            if len(out) >= tokens_per_part:
                break
        return out[:tokens_per_part]

    return {"prose": ids(prose_parts), "code": ids(code_parts), "chat": ids(chat)}


def window_logits(runner, ids: list[int], page_size: int, block_q: int):
    """Float32 logits [n, V] of a teacher-forced prefill over `ids` (position i predicts i + 1)."""
    from jaxinfer.core.shapes import BatchShape, SeqWork, pages_needed
    from jaxinfer.runner.step_inputs import build

    n = len(ids)
    tokens = -(-n // block_q) * block_q
    pages = list(range(1, 1 + pages_needed(n, page_size)))
    shape = BatchShape(decode_rows=1, prefill_tokens=tokens, block_q=block_q, pages_per_seq=len(pages),
                       prompt_logprob_rows=tokens)
    batch, rows = build(shape, [], [SeqWork(ids, 0, pages, logit_offsets=range(n))], page_size)
    return np.asarray(runner.logits(batch))[rows[0]]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["int8", "int4", "fp8"])
    p.add_argument("--tokens", type=int, default=4500, help="held tokens in all (a third each of prose, code, chat)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--model", default=None, help="default: the default model")
    args = p.parse_args()

    import jax.numpy as jnp

    from checkpoints import loader
    from jaxinfer.runner.model_runner import ModelRunner
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh()
    page_size, block_q = 16, 64
    results, reference = {}, None
    for scheme in [None, *args.schemes]:
        t = time.perf_counter()
        model = loader.load(args.model, dtype=jnp.float32, mesh=mesh, progress=False, quantization=scheme)
        if reference is None:
            parts = held_text(model.tokenizer, args.tokens // 3)
            windows = [(name, ids[i:i + args.window]) for name, ids in parts.items()
                       for i in range(0, len(ids) - 1, args.window) if len(ids[i:i + args.window]) > 1]
        runner = ModelRunner(model.config, model.graphdef, model.state, mesh,
                             num_pages=2 + -(-args.window // page_size), page_size=page_size)
        per_window = [log_softmax(window_logits(runner, ids, page_size, block_q))[:-1] for _, ids in windows]
        label = "float32" if scheme is None else model.quantization.name
        if scheme == "gguf":
            label = f"gguf ({label})"
        if reference is None:
            reference = per_window
        stats = {"nll": [], "kld": [], "top1": [], "part": []}
        for (part, ids), lp, ref in zip(windows, per_window, reference):
            nxt = np.asarray(ids[1:])
            stats["nll"].append(-lp[np.arange(len(nxt)), nxt])
            stats["kld"].append((np.exp(ref) * (ref - lp)).sum(axis=-1))
            stats["top1"].append(lp.argmax(-1) == ref.argmax(-1))
            stats["part"].append(np.full(len(nxt), part))
        results[label] = {k: np.concatenate(v) for k, v in stats.items()}
        print(f"# {label}: {len(results[label]['nll'])} tokens scored in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)

    base = results["float32"]
    print(f"# python scripts/bench_quality.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# default model, {len(base['nll'])} held tokens (prose / code / chat: "
          + " / ".join(str(int((base['part'] == k).sum())) for k in ("prose", "code", "chat")) + ")")
    print("| weights | perplexity | Δ ppl | mean KLD | top-1 agreement | goal |")
    print("|---|---:|---:|---:|---:|---|")
    goals = {"int8": "KLD ≤ 0.002, Δ ppl ≤ 0.5%", "int4": "KLD ≤ 0.05, Δ ppl ≤ 4% (g128)",
             "gguf": "top-1 ≥ 99% (the file's own weights, kept quantized)"}
    ppl0 = float(np.exp(base["nll"].mean()))
    for label, r in results.items():
        ppl = float(np.exp(r["nll"].mean()))
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / ppl0 - 1):+.2f}% | {r['kld'].mean():.5f} "
              f"| {100 * r['top1'].mean():.2f}% | {goals.get(label.split('-')[0].split(' ')[0], '')} |")
    print()
    print("By part (mean KLD / top-1 agreement):")
    for label, r in results.items():
        if label == "float32":
            continue
        cells = [f"{k} {r['kld'][r['part'] == k].mean():.5f} / {100 * r['top1'][r['part'] == k].mean():.1f}%"
                 for k in ("prose", "code", "chat")]
        print(f"- {label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
