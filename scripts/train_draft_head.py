"""Train a draft head (jaxinfer/spec_decode/draft_head.py, EAGLE-3 style) for a model, from text the model
generates itself (self-distillation), with JAX and optax. On this 2-core CPU the default model's head
trains in a few minutes:

    python scripts/train_draft_head.py --out heads/smollm2            # the default model
    jaxinfer generate --chat "..." --speculative-config '{"method": "eagle3", "model": "heads/smollm2"}'

1. Text: the model answers --prompts chat prompts (tasks x topics, made here) at temperature 0.8 (the first
   --greedy of them greedily), then --passages tasks over its own answers (copy, edit, go on; greedy).
   --save-text keeps the token ids, and --text trains on them again without generating.
2. Targets: one forward pass of the model over each whole sequence gives its hidden states after the
   feature layers (low, middle, high: 1/4, 1/2 and 3/4 of the way up unless --layers says) and its greedy
   prediction after every position, the token a draft must equal to be kept.
3. Training: the head's row at position q reads token q and the model's features at q - 1 and learns the
   model's prediction after q (cross-entropy; rows in the answers only, as only they are ever drafted), on
   packed batches of sequences through the same paged
   attention the engine runs (a scratch page pool per batch). A second pass ("training-time test", as
   EAGLE-3) feeds each row the head's own output at q - 1 instead of the model's features, as the head's
   later drafts see it, through one-token pages so that each row has a page of its own for itself.
4. Held-out sequences give the head's agreement with the model at its first and second draft; the engine's
   acceptance length comes from scripts/bench_spec_decode.py with {"method": "eagle3", ...}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["Explain {t} to a beginner.", "Write a short story about {t}.", "List five facts about {t}.",
         "Write a Python function related to {t}, with a docstring.", "What are the pros and cons of {t}?",
         "Summarize the history of {t} in a paragraph.", "Give me three tips about {t}.",
         "Write a short poem about {t}.", "Describe {t} in two sentences.", "Answer as a teacher: why does {t} matter?",
         "Repeat this sentence exactly: {T} is a topic many people find interesting.",
         "Write an email to a friend about {t}."]
TOPICS = ["the ocean", "volcanoes", "sorting algorithms", "the moon", "bread baking", "bicycles", "rain",
          "the printing press", "chess", "honey bees", "electric cars", "the internet", "gardening",
          "black holes", "coffee", "trains", "recursion", "the Roman empire", "music theory", "mountains"]
# Prompts past the first len(TASKS) x len(TOPICS) take these, each with every task: distinct prompts for greedy text.
MORE_TOPICS = ["photosynthesis", "hash tables", "the French revolution", "jazz", "glaciers", "solar panels", "penguins",
          "linked lists", "ancient Egypt", "tea", "airplanes", "vaccines", "prime numbers", "deserts", "robots",
          "the human heart", "coral reefs", "databases", "the Renaissance", "earthquakes", "wind turbines",
          "owls", "regular expressions", "the Silk Road", "chocolate", "submarines", "sleep", "fractions",
          "rainforests", "compilers", "the Olympic games", "bees and flowers", "batteries", "octopuses",
          "unit testing", "the Great Wall of China", "cheese", "rockets", "memory", "triangles",
          "rivers", "operating systems", "Shakespeare", "thunderstorms", "recycling", "wolves", "binary search",
          "the Industrial Revolution", "pasta", "satellites", "friendship", "probability", "caves", "web browsers",
          "the Vikings", "bread and yeast", "lighthouses", "elephants", "version control", "clouds"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the target (default: the default model)")
    p.add_argument("--out", required=True, help="directory to save the head in")
    p.add_argument("--prompts", type=int, default=240)
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="of the model's answers (0: greedy, the text a greedy request drafts on; every prompt "
                        "is then a distinct task x topic, up to len(TASKS) x len(TOPICS))")
    p.add_argument("--greedy", type=int, default=0,
                   help="the first this many prompts answered greedily (distinct prompts), the rest at --temperature")
    p.add_argument("--passages", type=int, default=0,
                   help="then this many tasks over the answers (copy, edit, continue; greedy), answered too")
    p.add_argument("--gen-batch", type=int, default=32, help="sequences generated at once (more on a GPU)")
    p.add_argument("--text", default=None,
                   help="an .npz of answers saved by an earlier run (--save-text): train on it, generating none")
    p.add_argument("--save-text", default=None, help="save the generated answers (token ids) to this .npz")
    p.add_argument("--init", default=None, help="a saved head to start from (its feature layers), not a new one")
    p.add_argument("--layers", default=None, help="feature layers, e.g. 7,15,23 (default: 1/4, 1/2, 3/4 up)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--rows", type=int, default=512, help="rows per step whose predictions are scored")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--held-out", type=int, default=16)
    p.add_argument("--ttt", type=float, default=0.5, help="weight of the second (own-output) pass; 0: none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also save the head every this many steps")
    p.add_argument("--time-budget-s", type=float, default=0,
                   help="fewer steps than --steps where they would not end within this many seconds of the start "
                        "(timed over the first steps; the learning-rate schedule follows)")
    return p.parse_args()


def generate_text(model, n, new_tokens, seed, temperature=0.8, greedy=0, batch=32, passages=0):
    """Prompt + answer token ids of n chat prompts, answered by the model itself, then of `passages` tasks
    over those answers."""
    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.llm import LLM

    first = len(TASKS) * len(TOPICS)

    def topic(i):
        if i < first:
            return TOPICS[(i // len(TASKS) + i) % len(TOPICS)]
        return MORE_TOPICS[(i - first) // len(TASKS) % len(MORE_TOPICS)]

    prompts = [TASKS[i % len(TASKS)].format(t=topic(i), T=topic(i).capitalize()) for i in range(n)]
    llm = LLM.from_loaded(model, max_num_seqs=batch, max_num_batched_tokens=max(1024, 4 * batch),
                          max_model_len=160 + 2 * new_tokens + 64, warmup=False)
    params = [SamplingParams(temperature=0.0 if i < greedy else temperature, seed=seed + i, max_tokens=new_tokens)
              for i in range(n)]
    outs = llm.generate([{"messages": [{"role": "user", "content": p}]} for p in prompts], params, use_tqdm=True)
    if passages:
        # Tasks over a given text (copy it, edit it, go on from it), the text being the model's own answers:
        # what a draft meets when a request quotes a document or code.
        texts = [o.outputs[0].text for o in outs]
        prompts = [passage_task(texts[i % len(texts)], i, seed) for i in range(passages)]
        params = [SamplingParams(temperature=0.0, max_tokens=new_tokens) for _ in prompts]
        outs = outs + llm.generate([{"messages": [{"role": "user", "content": p}]} for p in prompts], params,
                                   use_tqdm=True)
    seqs = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    llm.close()
    return seqs, [len(o.prompt_token_ids) for o in outs]


PASSAGE_TASKS = ["Please repeat the following text exactly as it is:\n\n{p}", "Copy this out word for word.\n\n{p}",
                 "Return this text unchanged: {p}", "Rewrite the text below in the past tense.\n\n{p}",
                 "Correct the typos in this text and give back the whole text:\n\n{typo}",
                 "In the text below, replace every '{w}' with '{w2}' and return the full text.\n\n{p}",
                 "Make this text more formal, keeping its meaning:\n\n{p}",
                 "Summarize this in two sentences:\n\n{p}", "Continue this text for a few more sentences:\n\n{p}",
                 "Translate this text into simpler English:\n\n{p}"]
CODE_TASKS = ["Rename the function `{name}` to `{name2}` and show the full code:\n\n{code}",
              "Add comments to this code and return all of it:\n\n{code}",
              "Add type annotations to this code and return it:\n\n{code}",
              "Return this code unchanged:\n\n{code}"]


def passage_task(text: str, i: int, seed: int) -> str:
    """A prompt asking for work on `text` (at most ~600 characters of it, cut at a sentence's end)."""
    import re

    import numpy as np

    rng = np.random.default_rng(seed * 7919 + i)
    code = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    name = re.search(r"def (\w+)\(", text)
    if code and name:
        task = CODE_TASKS[rng.integers(len(CODE_TASKS))]
        return task.format(code=code.group(1)[:700], name=name.group(1), name2=name.group(1) + "_v2")
    p = text[:600]
    p = p[:p.rfind(". ") + 1] if ". " in p else p
    words = re.findall(r"[A-Za-z]{4,}", p) or ["the"]
    w = words[rng.integers(len(words))]
    typo = " ".join(x[:1] + x[2] + x[1] + x[3:] if len(x) > 4 and rng.random() < 0.15 else x for x in p.split(" "))
    return PASSAGE_TASKS[rng.integers(len(PASSAGE_TASKS))].format(p=p, typo=typo, w=w, w2=w.upper())


def model_targets(model, seqs, layers, page_size=16, group=8):
    """Per sequence: (features [T, F] float32, the model's greedy prediction after each position [T]), `group`
    sequences a forward pass."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from jaxinfer.core.shapes import BatchShape, SeqWork
    from jaxinfer.runner.model_runner import ModelRunner
    from jaxinfer.runner.step_inputs import build
    from jaxinfer.sharding import make_mesh

    longest = max(len(s) for s in seqs)
    T = -(-longest // 64) * 64
    pages = -(-T // page_size)
    G = min(group, len(seqs))
    runner = ModelRunner(model.config, model.graphdef, model.state, make_mesh(), num_pages=G * pages + 1,
                         page_size=page_size, max_rows=G * T + 1, feature_layers=layers, attention_impl="xla")
    shape = BatchShape(1, G * T, 64, pages, prompt_logprob_rows=G * T)
    argmax = jax.jit(lambda x: jax.numpy.argmax(x, -1))
    out = []
    for at in tqdm(range(0, len(seqs), G), desc="the model's features"):
        part = seqs[at:at + G]
        works = [SeqWork(s, 0, list(range(1 + j * pages, 1 + (j + 1) * pages)), logit_offsets=range(len(s)))
                 for j, s in enumerate(part)]
        batch, rows = build(shape, [], works, page_size)
        predicted = np.asarray(argmax(runner.logits(batch)))
        feats = np.asarray(runner.features).reshape((G * pages + 1) * page_size, -1)
        for j, s in enumerate(part):
            first = (1 + j * pages) * page_size  # the sequence's pages are consecutive
            out.append((feats[first:first + len(s)].astype(np.float32), predicted[np.array(rows[j])]))
    return out


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from checkpoints import loader
    from jaxinfer import params as P
    from jaxinfer.core.shapes import BatchShape, SeqWork
    from jaxinfer.layers import attention
    from jaxinfer.runner.batch import Batch
    from jaxinfer.runner.step_inputs import build
    from jaxinfer.sharding import make_mesh
    from jaxinfer.spec_decode import draft_head

    started = time.monotonic()
    model = loader.load(args.model, dtype=jnp.float32, mesh=make_mesh(), progress=False)
    cfg = model.config
    L = cfg.num_layers
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else (L // 4, L // 2, 3 * L // 4)
    if args.init:
        layers = tuple(json.loads((pathlib.Path(args.init) / "head.json").read_text())["feature_layers"])
    print(f"# {model.source}: {L} layers, features after layers {list(layers)}", flush=True)

    if args.text:
        with np.load(args.text) as saved:
            flat, lens, prompt_lens = saved["tokens"], saved["lengths"], saved["prompt_lengths"].tolist()
        seqs = [x.tolist() for x in np.split(flat, np.cumsum(lens)[:-1])]
    else:
        seqs, prompt_lens = generate_text(model, args.prompts, args.new_tokens, args.seed, args.temperature,
                                           args.greedy, args.gen_batch, args.passages)
    if args.save_text:
        np.savez_compressed(args.save_text, tokens=np.concatenate(seqs).astype(np.int32),
                            lengths=np.array([len(x) for x in seqs]), prompt_lengths=np.array(prompt_lens))
    print(f"{len(seqs)} answers ({time.monotonic() - started:.0f} s)", flush=True)
    targets = model_targets(model, seqs, layers)
    # Only the answers are learned from and scored: the prompts repeat the chat template's fixed text, which a
    # head learns by heart, and which the engine never drafts (a prompt is known).
    targets = [(feats, np.where(np.arange(len(pred)) >= n - 1, pred, -1))
               for (feats, pred), n in zip(targets, prompt_lens)]
    print(f"{len(seqs)} sequences, {sum(map(len, seqs))} tokens ({time.monotonic() - started:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(seqs))
    held, train = order[:args.held_out], order[args.held_out:]

    if args.init:
        head = draft_head.load(args.init, model.graphdef, model.state, cfg, dtype=jnp.float32)
    else:
        head = draft_head.new_head(model.graphdef, model.state, cfg, layers, dtype=jnp.float32, seed=args.seed)
    graphdef, state = nnx.split(head)
    flat = P.flat_params(state)
    own_keys = sorted((k for k in flat if k[0] != "target"), key=str)
    frozen = {k: v for k, v in flat.items() if k[0] == "target"}

    def merged(own):
        values = dict(frozen)
        for k, x in zip(own_keys, own):
            values[k] = flat[k].replace(x)
        return nnx.merge(graphdef, nnx.from_flat_state(values))

    own = [P.value_of(flat[k]) for k in own_keys]
    ps = 16
    T = -(-max(len(s) for s in seqs) // 64) * 64
    seq_pages = -(-T // ps)

    def pack(ids):
        """A batch of sequences as prefill chunks; the features before each token; labels; the second pass's
        decode rows (one-token pages: row q's page table is the sequence's token pages up to q, then a page
        of its own)."""
        B = len(ids)
        works, prev, labels = [], [], []
        for j, i in enumerate(ids):
            s, (feats, pred) = seqs[i], targets[i]
            works.append(SeqWork(s, 0, list(range(1 + j * seq_pages, 1 + (j + 1) * seq_pages))))
            prev.append(np.concatenate([np.zeros((1, feats.shape[1]), np.float32), feats[:-1]]))
            labels.append(pred)
        shape = BatchShape(1, B * T, 64, seq_pages)
        batch, _ = build(shape, [], works, ps)
        F = prev[0].shape[1]
        prev_all = np.zeros((batch.num_tokens, F), np.float32)
        label_all = np.full(batch.num_tokens, -1, np.int32)
        t = 1
        for p_, l_ in zip(prev, labels):
            prev_all[t:t + len(p_)], label_all[t:t + len(l_)] = p_, l_
            label_all[t] = -1  # position 0 has no features before it
            t += len(p_)
        return batch, prev_all, label_all, shape

    def loss_fn(own, batch, prev, labels, scored, second):
        head = merged(own)
        cache = {"k": jnp.zeros((batch.page_table.shape[0] * seq_pages + 1, ps, cfg.num_kv_heads, cfg.head_dim)),
                 "v": jnp.zeros((batch.page_table.shape[0] * seq_pages + 1, ps, cfg.num_kv_heads, cfg.head_dim))}
        with attention.implementation("reference"):
            h, cache = head.step(batch.tokens, head.fuse(prev), batch, cache)
        logits = head.target(h[scored])
        lab = labels[scored]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(lab, 0))
        w = (lab >= 0).astype(jnp.float32)
        loss1 = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1)
        acc1 = jnp.sum((jnp.argmax(logits, -1) == lab) * w) / jnp.maximum(jnp.sum(w), 1)
        if second is None:
            return loss1, (acc1, 0.0)
        # Second pass: rows at q + 1 (token q + 1, the head's own output at q), attending the first pass's
        # K/V up to q and their own at q + 1 (a page of its own: one-token pages).
        rows, table, pos, slots, lab2 = second
        k1 = cache["k"].reshape(-1, 1, cfg.num_kv_heads, cfg.head_dim)
        v1 = cache["v"].reshape(-1, 1, cfg.num_kv_heads, cfg.head_dim)
        R = rows.shape[0]
        b2 = Batch(tokens=batch.tokens[rows + 1], feed_index=jnp.full(R, -1, jnp.int32), positions=pos,
                   slots=slots, cu_q_lens=jnp.arange(R + 1, dtype=jnp.int32), kv_lens=pos + 1, page_table=table,
                   block_tokens=jnp.zeros((0, 64), jnp.int32), block_seq=jnp.zeros(0, jnp.int32),
                   logits_indices=jnp.arange(R, dtype=jnp.int32), decode_rows=R, max_q_len=1)
        extra = jnp.zeros((R + 1, 1, cfg.num_kv_heads, cfg.head_dim))  # a page per row, and one for padding
        with attention.implementation("reference"):
            h2, _ = head.step(b2.tokens, h[rows], b2, {"k": jnp.concatenate([k1, extra]),
                                                       "v": jnp.concatenate([v1, extra])})
        logits2 = head.target(h2)
        w2 = (lab2 >= 0).astype(jnp.float32)
        ce2 = optax.softmax_cross_entropy_with_integer_labels(logits2, jnp.maximum(lab2, 0))
        loss2 = jnp.sum(ce2 * w2) / jnp.maximum(jnp.sum(w2), 1)
        acc2 = jnp.sum((jnp.argmax(logits2, -1) == lab2) * w2) / jnp.maximum(jnp.sum(w2), 1)
        return loss1 + args.ttt * loss2, (acc1, acc2)

    def second_pass(batch, labels, scored):
        """Rows at q + 1 for scored rows q (their sequence continues), over one-token pages: the first pass's
        token t sits at page t + (its flat slot), the second pass's row r at a page of its own after them."""
        tokens_flat = np.asarray(batch.slots)  # flat slot of each token in the first pass's pool
        pos = np.asarray(batch.positions)
        cu = np.asarray(batch.cu_q_lens)
        seq_of = np.searchsorted(cu, np.arange(len(pos)), side="right") - 1
        ok = [r for r in scored if r + 1 < len(pos) and seq_of[r + 1] == seq_of[r] and labels[r + 1] >= 0
              and pos[r + 1] > 0]
        ok = np.array(ok[:len(scored)] or [scored[0]], np.int32)
        R, base = len(ok), (batch.page_table.shape[0] * seq_pages + 1) * ps
        table = np.zeros((R, T + 1), np.int32)
        for i, r in enumerate(ok):
            start = cu[seq_of[r]]
            q1 = pos[r + 1]
            table[i, :q1] = tokens_flat[start:start + q1]  # positions 0..q: the first pass's K/V
            table[i, q1] = base + i  # position q + 1: its own
        lab2 = labels[ok + 1] if len(ok) else np.zeros(0, np.int32)
        return ok, table, pos[ok + 1].astype(np.int32), (base + np.arange(R)).astype(np.int32), lab2

    def lr_at(step, total):
        """Warm-up over the first 5%, then cosine down to lr / 20 at `total` (which a time budget may cut)."""
        warm = max(1, total // 20)
        if step < warm:
            return args.lr * step / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return args.lr / 20 + (args.lr - args.lr / 20) * 0.5 * (1 + np.cos(np.pi * t))

    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.01)
    opt_state = opt.init(own)

    @jax.jit
    def train_step(own, opt_state, batch, prev, labels, scored, second):
        (loss, accs), grads = jax.value_and_grad(loss_fn, has_aux=True)(own, batch, prev, labels, scored, second)
        updates, opt_state = opt.update(grads, opt_state, own)
        return optax.apply_updates(own, updates), opt_state, loss, accs

    def make_batch(ids, rng):
        batch, prev, labels, shape = pack(ids)
        valid = np.flatnonzero(labels >= 0)
        scored = np.sort(rng.choice(valid, min(args.rows, len(valid)), replace=False)).astype(np.int32)
        second = None
        if args.ttt > 0:
            ok, table, pos2, slots2, lab2 = second_pass(batch, labels, scored)
            pad = args.rows - len(ok)  # fixed sizes: one compile
            second = (np.pad(ok, (0, pad)), np.pad(table, ((0, pad), (0, 0))), np.pad(pos2, (0, pad)),
                      np.pad(slots2, (0, pad), constant_values=slots2[0] + args.rows),  # the padding page
                      np.pad(lab2, (0, pad), constant_values=-1))
        scored = np.pad(scored, (0, args.rows - len(scored)), constant_values=int(scored[0]))
        return batch, prev, labels, scored, second

    print(f"training: up to {args.steps} steps of {args.batch} sequences, {args.rows} rows scored", flush=True)
    t0 = time.monotonic()
    total, step, t_step2 = args.steps, 0, t0
    while step < total:
        step += 1
        if args.time_budget_s and step == 12:  # steps 2-11 timed (step 1 compiles): fit the rest in the budget
            jax.block_until_ready(own)
            per_step = (time.monotonic() - t_step2) / 10
            left = args.time_budget_s - (time.monotonic() - started)
            total = max(step, min(total, step + int(left / per_step)))
            print(f"{per_step * 1e3:.0f} ms a step: {total} steps fit in --time-budget-s", flush=True)
        if step == 2:
            t_step2 = time.monotonic()
        # The rate for the update counted from 0, as optax's schedules count (step 1 warms up from 0).
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr_at(step - 1, total), jnp.float32)
        ids = rng.choice(train, args.batch, replace=False)
        batch, prev, labels, scored, second = make_batch(ids, rng)
        own, opt_state, loss, (a1, a2) = train_step(own, opt_state, batch, prev, labels, scored, second)
        if step % 50 == 0 or step == 1 or step == total:
            print(f"step {step}: loss {float(loss):.3f}, agreement first {float(a1):.1%} second {float(a2):.1%} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
        if args.save_every and step % args.save_every == 0 and step < total:
            draft_head.save(merged(own), cfg, args.out, trained_on=model.source, steps=step, sequences=len(train))

    # Held out: agreement at the first and second draft.
    agree = []
    for chunk in np.array_split(held, max(1, -(-len(held) // args.batch))):  # chunks of at most a batch
        batch, prev, labels, scored, second = make_batch(np.pad(chunk, (0, args.batch - len(chunk)), mode="edge"),
                                                         np.random.default_rng(1))
        _, (a1, a2) = loss_fn(own, batch, prev, labels, scored, second)
        agree.append((float(a1), float(a2)))
    a1, a2 = np.mean(agree, axis=0)
    print(f"held out ({len(held)} sequences): agreement with the model at the first draft {a1:.1%}, second {a2:.1%}")
    trained = merged(own)
    draft_head.save(trained, cfg, args.out, trained_on=model.source, steps=total,
                    sequences=len(train), agreement_first=round(float(a1), 4), agreement_second=round(float(a2), 4),
                    seconds=round(time.monotonic() - started))
    print(f"saved {args.out} ({time.monotonic() - started:.0f} s in all)")
    print(json.dumps(json.loads((pathlib.Path(args.out) / "head.json").read_text())))


if __name__ == "__main__":
    main()
