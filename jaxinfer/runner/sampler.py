"""Per-request token sampling on the device, for a continuous-batching engine.

Host side: `SamplingArrays.from_rows` packs one `Row` per logits row (a request's
`jaxinfer.core.sampling_params.SamplingParams` at one position) into numpy arrays
every step.

Device side: `sample` runs under `jax.jit` and processes each row as vLLM does:

  1. penalties (repetition on prompt and output tokens, frequency, presence),
     from a `PenaltyState` that lives on the device across steps;
  2. banned token ids -> -inf (the engine bans EOS and stop ids before
     min_tokens);
  3. greedy rows (temperature 0) take the argmax;
  4. sampled rows: temperature, min_p, top_k, top_p, then a categorical draw.

Logprobs are always the raw log-softmax of the unprocessed logits (vLLM's
default).

Nothing branches on the device. On the GPU a `lax.cond` reads its predicate
back to the host, so the host waits there for the whole forward pass before it
can queue anything more (measured on an H200: a B = 64 decode step went from
6.6 to 13.7 ms). Penalties and the random draw are cheap and always run, masked
per row. Only the two costly parts, top-k/top-p cuts (they rank the vocabulary)
and top-n logprobs, sit behind `full`, a static flag the host sets when some
row of the step asks for one (`SamplingArrays.needs_full`), so each is a
separately compiled variant.

A row's result depends only on that row's inputs, never on its batch-mates, its
row index or the variant: its random stream is keyed by (seed, position of the
token being sampled), and everything `full` adds is an exact no-op for rows that
do not use it. That is what keeps seeded requests reproducible under continuous
batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.core.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, SamplingParams

# ----------------------------------------------------------------------------
# Host -> device: per-row arrays, rebuilt every step.


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One logits row to sample from.

    seed: 64-bit (from `seed_for`); position: position of the token being
    sampled; penalty_slot: the row of `PenaltyState` holding this sequence's
    token counts, -1 for none; banned: token ids forbidden this step; target:
    score this token instead of the sampled one (prompt logprobs), -1 for none;
    want_top: return the top-n logprobs; feed_slot: keep the sampled token on the
    device in this slot, for a later step to feed (`Batch.feed_index`), -1 for none.
    """

    params: SamplingParams
    seed: int
    position: int
    penalty_slot: int = -1
    banned: Sequence[int] = ()
    target: int = -1
    want_top: bool = False
    feed_slot: int = -1


# A padding row: greedy, no penalties, nothing banned, nothing scored.
_PAD = (0.0, 0, 1.0, 0.0, 0, 0, 0, 0.0, 0.0, 1.0, -1, -1, False, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling inputs: all [R] unless noted. Build with `from_rows`."""

    temperature: jax.Array  # f32, 0 = greedy
    top_k: jax.Array  # i32, 0 = off
    top_p: jax.Array  # f32, 1 = off
    min_p: jax.Array  # f32, 0 = off
    seed: jax.Array  # u32 [R, 2]: (hi, lo) halves of the 64-bit seed
    position: jax.Array  # i32, keys the random stream
    presence: jax.Array  # f32
    frequency: jax.Array  # f32
    repetition: jax.Array  # f32, 1 = off
    penalty_slot: jax.Array  # i32, -1 = no penalties and no counting
    banned: jax.Array  # i32 [R, B], -1 padding
    target: jax.Array  # i32, -1 = score the sampled token
    want_top: jax.Array  # bool
    feed_slot: jax.Array  # i32, -1 = the token is not kept for feeding

    def needs_full(self) -> bool:
        """Whether `sample` must run with `full` (host arrays only; see `needs_full`)."""
        return needs_full(self.temperature, self.top_k, self.top_p, self.want_top)

    @classmethod
    def from_rows(cls, rows: Sequence[Row | None], num_rows: int, ban_width: int
                  ) -> "SamplingArrays":
        """Pack `rows` into numpy arrays of `num_rows` rows; None and missing rows are padding."""
        if len(rows) > num_rows:
            raise ValueError(f"{len(rows)} rows do not fit in {num_rows}")
        banned = np.full((num_rows, ban_width), -1, np.int32)
        packed = []
        for i, row in enumerate(rows):
            if row is None:
                packed.append(_PAD)
                continue
            p = row.params
            greedy = p.temperature < GREEDY_TEMPERATURE
            packed.append((
                0.0 if greedy else p.temperature, p.top_k, p.top_p, p.min_p,
                row.seed >> 32 & 0xFFFFFFFF, row.seed & 0xFFFFFFFF, row.position,
                p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                row.penalty_slot, row.target, row.want_top, row.feed_slot))
            if row.banned:
                if len(row.banned) > ban_width:
                    raise ValueError(f"row {i} bans {len(row.banned)} ids; "
                                     f"ban_width is {ban_width}")
                banned[i, :len(row.banned)] = row.banned
        packed.extend([_PAD] * (num_rows - len(rows)))
        (temperature, top_k, top_p, min_p, seed_hi, seed_lo, position, presence, frequency,
         repetition, penalty_slot, target, want_top, feed_slot) = zip(*packed) if packed else ((),) * 14
        return cls(
            temperature=np.array(temperature, np.float32),
            top_k=np.array(top_k, np.int32),
            top_p=np.array(top_p, np.float32),
            min_p=np.array(min_p, np.float32),
            seed=np.array([seed_hi, seed_lo], np.uint32).T.reshape(num_rows, 2),
            position=np.array(position, np.int32),
            presence=np.array(presence, np.float32),
            frequency=np.array(frequency, np.float32),
            repetition=np.array(repetition, np.float32),
            penalty_slot=np.array(penalty_slot, np.int32),
            banned=banned,
            target=np.array(target, np.int32),
            want_top=np.array(want_top, np.bool_),
            feed_slot=np.array(feed_slot, np.int32),
        )


def needs_full(temperature, top_k, top_p, want_top) -> bool:
    """Whether rows with these settings (numpy, [R] each) need `sample`'s `full`: a sampled
    row cuts by top_k or top_p, or a row wants top-n logprobs."""
    cut = (np.asarray(temperature) > 0) & ((np.asarray(top_k) > 0) | (np.asarray(top_p) < 1))
    return bool(cut.any() or np.asarray(want_top).any())


# ----------------------------------------------------------------------------
# Device side.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """Per-sequence token history for penalties, kept on the device across steps.

    counts: i32 [num_slots, V], how often the slot's sequence generated each
    token; prompt_mask: bool [num_slots, V], tokens in its prompt.
    """

    counts: jax.Array
    prompt_mask: jax.Array

    @classmethod
    def zeros(cls, num_slots: int, vocab: int) -> "PenaltyState":
        return cls(counts=jnp.zeros((num_slots, vocab), jnp.int32),
                   prompt_mask=jnp.zeros((num_slots, vocab), jnp.bool_))


def reset_slot(state: PenaltyState, slot: jax.Array, token_ids: jax.Array,
               is_output: jax.Array) -> PenaltyState:
    """Give `slot` to a sequence: token_ids i32 [L] (-1 padding), is_output bool [L].

    Clears the slot, marks prompt tokens in prompt_mask and counts output tokens
    (a preempted sequence comes back with output already). Jittable; slot must
    be in [0, num_slots).
    """
    vocab = state.counts.shape[1]
    valid = token_ids >= 0
    # Out-of-range ids (the padding) are dropped by the scatters; -1 would wrap.
    output_ids = jnp.where(valid & is_output, token_ids, vocab)
    prompt_ids = jnp.where(valid & ~is_output, token_ids, vocab)
    counts = jnp.zeros((vocab,), jnp.int32).at[output_ids].add(1, mode="drop")
    prompt = jnp.zeros((vocab,), jnp.bool_).at[prompt_ids].set(True, mode="drop")
    return PenaltyState(counts=state.counts.at[slot].set(counts),
                        prompt_mask=state.prompt_mask.at[slot].set(prompt))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """tokens i32 [R]; logprobs f32 [R]: raw log-softmax at the sampled token (or
    at `target`); top_ids i32 / top_logprobs f32 [R, num_top]: raw top-n, zeros
    for rows that did not ask (`want_top`)."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def sample(logits: jax.Array, arrays: SamplingArrays, state: PenaltyState, *,
           num_top: int = MAX_LOGPROBS, full: bool = True) -> tuple[SampleOutput, PenaltyState]:
    """Pick one token per row of logits f32 [R, V]; returns the output and the
    state with the picks counted (rows with a penalty slot and no target).

    full (static): apply top-k/top-p and compute top-n logprobs. Without it, rows
    that ask for either are wrong: use it when `arrays.needs_full()` holds."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    processed = ban(apply_penalties(logits, arrays, state), arrays.banned)
    greedy = first_argmax(processed)
    tokens = _draw(processed, arrays, greedy, full)
    scored = jnp.where(arrays.target >= 0, arrays.target, tokens)
    logprobs = jnp.take_along_axis(logits, scored[:, None], axis=-1)[:, 0] - lse
    top_ids, top_logprobs = top_n(logits, lse, arrays.want_top, num_top if full else 0, num_top)
    return SampleOutput(tokens, logprobs, top_ids, top_logprobs), _record(state, arrays, tokens)


def apply_penalties(logits: jax.Array, arrays: SamplingArrays, state: PenaltyState) -> jax.Array:
    """Repetition (tokens of prompt or output), frequency and presence (output
    only) penalties, as vLLM applies them; rows without a slot pass unchanged."""
    slot = jnp.clip(arrays.penalty_slot, 0, state.counts.shape[0] - 1)
    penalized = penalize(logits, state.counts[slot], state.prompt_mask[slot], arrays.repetition[:, None],
                         arrays.frequency[:, None], arrays.presence[:, None])
    return jnp.where((arrays.penalty_slot >= 0)[:, None], penalized, logits)


def penalize(logits, counts, in_prompt, repetition, frequency, presence):
    """The penalties of tokens with these output counts (and prompt membership), elementwise."""
    generated = counts > 0
    seen = generated | in_prompt
    penalized = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
    return (penalized - frequency * counts.astype(jnp.float32) - presence * generated.astype(jnp.float32))


def ban(logits: jax.Array, banned: jax.Array) -> jax.Array:
    rows, vocab = logits.shape
    ids = jnp.where(banned >= 0, banned, vocab)  # padding -> out of range -> dropped
    return logits.at[jnp.arange(rows)[:, None], ids].set(-jnp.inf, mode="drop")


def _draw(processed: jax.Array, arrays: SamplingArrays, greedy: jax.Array, cut: bool) -> jax.Array:
    """Temperature, min_p, top_k and top_p (with `cut`), then a categorical draw; greedy
    rows keep `greedy`."""
    scaled = target_logits(processed, arrays, cut)
    drawn = gumbel_argmax(scaled, jax.vmap(row_key)(arrays.seed, arrays.position))
    return jnp.where(arrays.temperature > 0, drawn, greedy)


def target_logits(processed: jax.Array, arrays: SamplingArrays, cut: bool) -> jax.Array:
    """The distribution a sampled row draws from, as logits: processed logits (penalties, bans) over the
    temperature, with tokens below min_p and (with `cut`) outside top_k / top_p at -inf. Greedy rows are
    returned unscaled. Speculative verification uses the same (rejection_sampler.py)."""
    sampled = arrays.temperature > 0
    scaled = processed / jnp.where(sampled, arrays.temperature, 1.0)[:, None]
    # min_p in logit space: p < min_p * p_max  <=>  z - z_max < log(min_p); min_p 0 keeps all.
    best = jnp.max(scaled, axis=-1, keepdims=True)
    scaled = jnp.where(scaled - best < jnp.log(arrays.min_p)[:, None], -jnp.inf, scaled)
    # Only a top_k or top_p cut needs the vocabulary sorted. For a row with
    # neither, the floor keeps every token, so leaving it out is invisible to it.
    if cut:
        scaled = jnp.where(scaled >= _cut_floor(scaled, arrays)[:, None], scaled, -jnp.inf)
    return scaled


def gumbel_argmax(scaled: jax.Array, keys: jax.Array) -> jax.Array:
    """One categorical draw per row of logits [R, V] from its key [R]: jax.random.categorical's own draw
    (the Gumbel-max trick, the same noise), with its argmax as first_argmax."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:], scaled.dtype))(keys)
    return first_argmax(scaled + noise)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; a NaN counts as the maximum), as two plain
    reductions: XLA's CPU backend runs argmax's paired (value, index) reduction element by element, about
    1.8 ms over a 49,152-token vocabulary, twice a step."""
    m = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == m) | jnp.isnan(x)
    ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1)


def _cut_floor(scaled: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """The lowest logit [R] that survives top_k then top_p.

    top_p keeps the smallest set of best tokens whose mass (after top_k)
    reaches top_p, and always the best. Cutting by value rather than by rank
    keeps ties at the boundary together instead of splitting them by token id.
    """
    vocab = scaled.shape[-1]
    desc = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
    rank = jnp.arange(vocab)[None, :]
    top_k = jnp.where(arrays.top_k > 0, jnp.minimum(arrays.top_k, vocab), vocab)
    keep = rank < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    # Exclusive cumsum, built from the inclusive one so it stays monotone in floats.
    mass_before = jnp.pad(jnp.cumsum(probs, axis=-1)[:, :-1], ((0, 0), (1, 0)))
    top_p = arrays.top_p[:, None]
    keep &= (mass_before < top_p) | (top_p >= 1) | (rank == 0)
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)


def row_key(seed: jax.Array, position: jax.Array) -> jax.Array:
    """The random key of one row: (seed hi, seed lo, position), nothing about the batch."""
    key = jax.random.key(seed[0])
    key = jax.random.fold_in(key, seed[1])
    return jax.random.fold_in(key, position)


def top_n(logits: jax.Array, lse: jax.Array, want_top: jax.Array, num_top: int, width: int
         ) -> tuple[jax.Array, jax.Array]:
    """The top `num_top` logprobs of rows that want them, zero-padded to `width` columns."""
    rows = logits.shape[0]
    if num_top == 0:
        return jnp.zeros((rows, width), jnp.int32), jnp.zeros((rows, width), jnp.float32)
    values, ids = jax.lax.top_k(logits, num_top)
    ids, logprobs = ids.astype(jnp.int32), values - lse[:, None]
    # Rows that did not ask get zeros whatever their batch-mates asked.
    return jnp.where(want_top[:, None], ids, 0), jnp.where(want_top[:, None], logprobs, 0.0)


def _record(state: PenaltyState, arrays: SamplingArrays, tokens: jax.Array) -> PenaltyState:
    """counts[slot, token] += 1 for rows that generated (a slot, no target)."""
    num_slots = state.counts.shape[0]
    counted = (arrays.penalty_slot >= 0) & (arrays.target < 0)
    slot = jnp.where(counted, arrays.penalty_slot, num_slots)  # out of range -> dropped
    return dataclasses.replace(state, counts=state.counts.at[slot, tokens].add(1, mode="drop"))
