"""Train a draft head (jaxinfer/spec_decode/draft_head.py, EAGLE-3 style) for a model, from text the model
generates itself (self-distillation), with JAX and optax. On this 2-core CPU the default model's head
trains in a few minutes:

    python scripts/train_draft_head.py --out heads/smollm2            # the default model
    jaxinfer generate --chat "..." --speculative-config '{"method": "eagle3", "model": "heads/smollm2"}'

1. Text: the model answers --prompts chat prompts (tasks x topics, made here) at temperature 0.8.
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
    p.add_argument("--gen-batch", type=int, default=32, help="sequences generated at once (more on a GPU)")
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


def generate_text(model, n, new_tokens, seed, temperature=0.8, greedy=0, batch=32):
    """Prompt + answer token ids of n chat prompts, answered by the model itself."""
    from jaxinfer.core.sampling_params import SamplingParams
    from jaxinfer.llm import LLM

    first = len(TASKS) * len(TOPICS)

    def topic(i):
        if i < first:
            return TOPICS[(i // len(TASKS) + i) % len(TOPICS)]
        return MORE_TOPICS[(i - first) // len(TASKS) % len(MORE_TOPICS)]

    prompts = [TASKS[i % len(TASKS)].format(t=topic(i), T=topic(i).capitalize()) for i in range(n)]
    llm = LLM.from_loaded(model, max_num_seqs=batch, max_num_batched_tokens=max(1024, 4 * batch), max_model_len=512,
                          warmup=False)
    params = [SamplingParams(temperature=0.0 if i < greedy else temperature, seed=seed + i, max_tokens=new_tokens)
              for i in range(n)]
    outs = llm.generate([{"messages": [{"role": "user", "content": p}]} for p in prompts], params, use_tqdm=True)
    seqs = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    llm.close()
    return seqs, [len(o.prompt_token_ids) for o in outs]


def model_targets(model, seqs, layers, page_size=16):
    """Per sequence: (features [T, F] float32, the model's greedy prediction after each position [T])."""
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
    runner = ModelRunner(model.config, model.graphdef, model.state, make_mesh(), num_pages=pages + 1,
                         page_size=page_size, max_rows=T + 1, feature_layers=layers, attention_impl="xla")
    shape = BatchShape(1, T, 64, pages, prompt_logprob_rows=T)
    out = []
    for s in tqdm(seqs, desc="the model's features"):
        work = SeqWork(s, 0, list(range(1, pages + 1)), logit_offsets=range(len(s)))
        batch, rows = build(shape, [], [work], page_size)
        logits = runner.logits(batch)
        feats = np.asarray(runner.features).reshape((pages + 1) * page_size, -1)
        slots = np.asarray(batch.slots)[1:1 + len(s)]
        out.append((feats[slots].astype(np.float32), np.asarray(jax.numpy.argmax(logits[np.array(rows[0])], -1))))
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
    print(f"# {model.source}: {L} layers, features after layers {list(layers)}", flush=True)

    seqs, prompt_lens = generate_text(model, args.prompts, args.new_tokens, args.seed, args.temperature,
                                       args.greedy, args.gen_batch)
    targets = model_targets(model, seqs, layers)
    # Only the answers are learned from and scored: the prompts repeat the chat template's fixed text, which a
    # head learns by heart, and which the engine never drafts (a prompt is known).
    targets = [(feats, np.where(np.arange(len(pred)) >= n - 1, pred, -1))
               for (feats, pred), n in zip(targets, prompt_lens)]
    print(f"{len(seqs)} sequences, {sum(map(len, seqs))} tokens ({time.monotonic() - started:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(seqs))
    held, train = order[:args.held_out], order[args.held_out:]

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
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr_at(step, total), jnp.float32)
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
    for chunk in np.array_split(held, max(1, len(held) // args.batch)):
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
