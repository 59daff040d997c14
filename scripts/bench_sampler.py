"""What the sampler costs on the device, piece by piece, and an exact sort-free top-k/top-p cut
to weigh against the sort (issue 11: the full sampler variant took 2.13 ms at B = 64 on an H200).

    python scripts/bench_sampler.py                       # GPU: B = 1, 16, 64; Llama-3's 128,256 tokens
    python scripts/bench_sampler.py --check --vocab 512   # any device: the bisection cut equals the sort's

Rows (GPU: summed CUPTI kernel time of one call; elsewhere: wall time per call, back to back):
  plain, full       the engine's two sampler variants (jaxinfer.runner.sampler.sample), sampled rows
                    with top_p 0.9 and top-n logprobs wanted, so full does all its work
  sort              jnp.sort over [B, V] alone: what the full variant's cut starts with
  top_k 20          lax.top_k(logits, 20) alone: the top-n logprobs
  cut: sort         sampler._cut_floor, the cut as the engine makes it
  cut: bisection    the same floor found without sorting: a binary search on the value threshold,
                    32 counting passes for top_k and 32 mass passes for top_p
  cut: radix        the same floor, 8 bits at a time: 4 + 4 passes, each a 256-bin histogram
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _ukey(x):
    """float32 -> uint32 with the same order (negative floats: all bits flipped)."""
    import jax
    import jax.numpy as jnp

    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _from_ukey(k):
    import jax
    import jax.numpy as jnp

    b = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def cut_floor_bisection(scaled, top_k, top_p):
    """The lowest logit [R] that survives top_k then top_p, as sampler._cut_floor defines it
    (by value: ties at a boundary stay together), found by binary search, not by sorting."""
    import jax
    import jax.numpy as jnp

    vocab = scaled.shape[-1]
    key = _ukey(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    top = key.max(-1)

    def count_step(_, c):  # the largest t with count(key >= t) >= k: the k-th largest value
        lo, hi = c
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = jnp.sum(key >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    floor_k, _ = jax.lax.fori_loop(0, 32, count_step, (key.min(-1), top))
    kept = key >= floor_k[:, None]
    probs = jnp.where(kept, jnp.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    probs = probs / probs.sum(-1, keepdims=True)

    def mass_step(_, c):  # the smallest t with mass(key > t) < top_p: the last value top_p keeps
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(key > mid[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, floor_p = jax.lax.fori_loop(0, 32, mass_step, (floor_k, top))
    return _from_ukey(jnp.where(top_p >= 1, floor_k, jnp.maximum(floor_k, floor_p)))


def cut_floor_radix(scaled, top_k, top_p):
    """The same floor as `cut_floor_bisection`, found 8 bits at a time: 4 passes that each make a
    256-bin histogram (counts for top_k, then counts and masses for top_p) of the values that
    share the bits decided so far."""
    import jax.numpy as jnp

    rows, vocab = scaled.shape
    key = _ukey(scaled)
    bins = jnp.arange(256, dtype=jnp.uint32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)

    def histogram(prefix, shift, weights=None):
        """Per row and digit (bits shift..shift+7), how many (or how much weight) of the values
        whose higher bits equal prefix's."""
        hit = (key >> shift & 0xFF)[..., None] == bins
        if shift < 24:
            hit &= ((key >> (shift + 8)) == (prefix[:, None] >> (shift + 8)))[..., None]
        if weights is None:
            return jnp.sum(hit, axis=1, dtype=jnp.int32)
        return jnp.sum(jnp.where(hit, weights[..., None], 0.0), axis=1)

    prefix, need = jnp.zeros(rows, jnp.uint32), k
    for shift in (24, 16, 8, 0):  # the k-th largest value: count down from the top digit
        counts = histogram(prefix, shift)
        at_least = jnp.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # values with digit >= b
        digit = jnp.sum(at_least >= need[:, None], axis=1) - 1
        need = need - (at_least[jnp.arange(rows), digit] - counts[jnp.arange(rows), digit])
        prefix = prefix | digit.astype(jnp.uint32) << shift
    floor_k = prefix
    kept = key >= floor_k[:, None]
    probs = jnp.where(kept, jnp.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    probs = probs / probs.sum(-1, keepdims=True)

    prefix, above = jnp.zeros(rows, jnp.uint32), jnp.zeros(rows, jnp.float32)
    for shift in (24, 16, 8, 0):  # the lowest value whose strictly-greater mass is < top_p
        counts = histogram(prefix, shift)
        mass = histogram(prefix, shift, probs)
        higher = above[:, None] + jnp.cumsum(mass[:, ::-1], axis=1)[:, ::-1] - mass  # mass of higher digits
        ok = (counts > 0) & (higher < top_p[:, None])
        lowest = jnp.min(jnp.where(ok, bins.astype(jnp.int32), 256), axis=1)
        present = jnp.max(jnp.where(counts > 0, bins.astype(jnp.int32), -1), axis=1)
        digit = jnp.where(lowest < 256, lowest, present)  # none: rounding; keep the top bucket
        above = higher[jnp.arange(rows), digit]
        prefix = prefix | digit.astype(jnp.uint32) << shift
    return _from_ukey(jnp.where(top_p >= 1, floor_k, jnp.maximum(floor_k, prefix)))


def _timer():
    import jax

    if jax.default_backend() == "gpu":
        from scripts.probe_dispatch import _cupti

        def gpu(fn):
            jax.block_until_ready(fn())
            return sum(ms for _, ms in _cupti(lambda: jax.block_until_ready(fn())))
        return gpu, "GPU kernel ms (CUPTI)"

    def wall(fn, n=20):
        jax.block_until_ready(fn())
        t = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / n * 1e3
    return wall, "wall ms per call"


def check(vocab: int, rows: int = 256, seed: int = 0) -> None:
    """The bisection floor keeps exactly the tokens the sort's floor keeps, except where a
    boundary token's mass lies within float rounding of top_p."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.runner import sampler

    rng = np.random.default_rng(seed)
    scaled = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4.0, (rows, 1))).astype(np.float32)
    scaled[rng.random((rows, vocab)) < 0.05] = -np.inf  # min_p and bans leave -inf behind
    scaled[:8] = np.round(scaled[:8])  # ties at every boundary
    top_k = rng.choice([0, 1, 2, 5, 50, vocab, vocab + 7], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.1, 0.5, 0.9, 0.95, 0.999], rows).astype(np.float32)
    arrays = sampler.SamplingArrays.from_rows([], rows, 1)
    import dataclasses
    arrays = dataclasses.replace(arrays, top_k=top_k, top_p=top_p)
    want = np.asarray(jax.jit(sampler._cut_floor)(scaled, arrays))
    for candidate in (cut_floor_bisection, cut_floor_radix):
        got = np.asarray(jax.jit(candidate)(jnp.asarray(scaled), top_k, top_p))
        _explain(candidate.__name__, scaled, top_k, top_p, want, got)


def _explain(name, scaled, top_k, top_p, want, got) -> None:
    import numpy as np

    rows, vocab = scaled.shape
    differ = np.flatnonzero(want != got)
    ties = 0
    for r in differ.tolist():
        s = np.sort(scaled[r])[::-1].astype(np.float64)
        k = vocab if top_k[r] <= 0 else min(top_k[r], vocab)
        if k < vocab and s[k - 1] == s[k]:
            # Ties straddle the top_k boundary: both keep them all, but the sort weighs top_p's
            # mass over exactly k tokens and the bisection over every token top_k keeps.
            ties += 1
            continue
        p = np.exp(s[:k] - s[0])
        p /= p.sum()
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        assert np.min(np.abs(before - top_p[r])) < 1e-5, (r, want[r], got[r], top_k[r], top_p[r])
    print(f"check {name}: {rows} rows over {vocab} tokens: {rows - len(differ)} floors equal; {ties} differ where "
          f"ties straddle the top_k boundary, {len(differ) - ties} at a top_p boundary within rounding")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--check", action="store_true", help="compare the bisection cut with the sort's first")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.core.sampling_params import MAX_LOGPROBS, SamplingParams
    from jaxinfer.runner import sampler

    if args.check:
        check(min(args.vocab, 4096))
    timer, unit = _timer()
    print(f"device: {jax.devices()[0].device_kind}; vocabulary {args.vocab:,}; {unit}")
    print("| batch | plain | full | sort | top_k 20 | cut: sort | cut: bisection | cut: radix |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        rng = np.random.default_rng(b)
        logits = jnp.asarray(rng.standard_normal((b, args.vocab)).astype(np.float32) * 3)
        params = SamplingParams(temperature=0.8, top_p=0.9, logprobs=5)
        rows = [sampler.Row(params, seed=i, position=7, want_top=True) for i in range(b)]
        arrays = jax.device_put(sampler.SamplingArrays.from_rows(rows, b, 1))
        state = sampler.PenaltyState.zeros(1, args.vocab)
        plain = jax.jit(functools.partial(sampler.sample, num_top=MAX_LOGPROBS, full=False))
        full = jax.jit(functools.partial(sampler.sample, num_top=MAX_LOGPROBS, full=True))
        sort = jax.jit(lambda x: jnp.sort(x, axis=-1))
        top = jax.jit(lambda x: jax.lax.top_k(x, MAX_LOGPROBS))
        cut_sort = jax.jit(sampler._cut_floor)
        cut_bisect = jax.jit(cut_floor_bisection)
        cut_radix = jax.jit(cut_floor_radix)
        def cell(fn) -> str:
            try:
                return f"{timer(fn):.3f}"
            except Exception as e:  # e.g. out of memory: XLA may build the radix's histogram input
                return f"failed ({type(e).__name__})"

        cells = [cell(lambda: plain(logits, arrays, state)[0].tokens),
                 cell(lambda: full(logits, arrays, state)[0].tokens),
                 cell(lambda: sort(logits)), cell(lambda: top(logits)[0]),
                 cell(lambda: cut_sort(logits, arrays)),
                 cell(lambda: cut_bisect(logits, arrays.top_k, arrays.top_p)),
                 cell(lambda: cut_radix(logits, arrays.top_k, arrays.top_p))]
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
