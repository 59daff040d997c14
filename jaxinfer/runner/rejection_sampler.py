"""Speculative verification on the device: which drafted tokens a sequence keeps, losslessly.

S sequences, each with up to K drafted tokens, verified in one call:

    logits        f32 [S, K + 1, V]  row j: the target model's logits for the token after the
                                     sequence's known tokens and drafts 0..j-1
    draft_tokens  i32 [S, K]         the proposer's tokens (padding past num_drafts: any id)
    num_drafts    i32 [S]            0..K; a sequence with none samples one token, as `sample` would
    draft_probs   f32 [S, K, V] or None: the distribution each draft was drawn from (a draft model
                                     sampling); None for proposers that pick deterministically
                                     (n-gram lookup, greedy drafts): then q is one-hot at the draft

Settings come from `arrays`, one row per sequence, `position` being the position of its first token
to sample; row j of a sequence is processed exactly as the sampler processes a row at position
`position + j` (penalties, bans, temperature, min_p, top_k / top_p), with the drafts before row j
counted as generated output for the penalties, as they would be had they been sampled one by one.

  * Greedy rows accept drafts while each equals the target's argmax at its row, then emit the
    argmax at the first row that disagrees (or, all accepted, at row num_drafts: the bonus token).
    The output is the one non-speculative greedy decoding gives, token for token.
  * Sampled rows with deterministic drafts (no draft_probs) keep draft j where it equals the token the
    sampler itself draws at row j, and emit those draws: the output is non-speculative sampling's,
    token for token (a coupling of rejection sampling: draft d is kept with probability p(d), and a
    rejected row's token is p's draw conditioned on not being d, the residual).
  * Sampled rows with drawn drafts accept draft j with probability min(1, p_j(d_j) / q_j(d_j)), stop
    at the first rejection and draw the token there from the residual max(p_j - q_j, 0),
    renormalized; all accepted, a bonus token is drawn from p at row num_drafts. The emitted tokens
    are distributed as sampling them one by one from p would be (Leviathan et al., Chen et al., 2023).

Randomness is keyed by (seed, position of the token), as in the sampler: a seeded sequence's output
does not depend on its batch mates or row. With no drafts, a row's token is the sampler's own draw
(the same key, the same noise); drawn drafts' acceptance tests draw from a key of their own.

Logprobs are the raw log-softmax of the target's logits at each emitted token (vLLM's default), as
`sample` returns them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.core.sampling_params import MAX_LOGPROBS
from jaxinfer.runner.sampler import (PenaltyState, SamplingArrays, apply_penalties, ban, first_argmax, gumbel_argmax,
                                     penalize, row_key, target_logits, top_n)

_ACCEPT = 0x5BEC  # folded into a token's key for its acceptance test: a stream apart from its draw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyOutput:
    """tokens i32 [S, K + 1]: the accepted drafts, then the token drawn where verification stopped,
    then -1; num_accepted i32 [S] (0..num_drafts; num_accepted + 1 tokens are emitted); last i32 [S]:
    the last emitted token (the one a next step feeds); logprobs f32 [S, K + 1] (0 past the emitted);
    top_ids / top_logprobs [S, K + 1, num_top]: raw top-n at each row for rows that want them."""

    tokens: jax.Array
    num_accepted: jax.Array
    last: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def verify(logits: jax.Array, arrays: SamplingArrays, state: PenaltyState, draft_tokens: jax.Array,
           num_drafts: jax.Array, draft_probs: jax.Array | None = None, *, num_top: int = MAX_LOGPROBS,
           full: bool = True) -> tuple[VerifyOutput, PenaltyState]:
    """Verify each sequence's drafts against the target's logits (module docstring); returns what
    each keeps and the penalty state with the emitted tokens counted.

    full (static): apply top-k/top-p and compute top-n logprobs, as `sample`'s."""
    S, K1, V = logits.shape
    K = K1 - 1
    j = jnp.arange(K1)
    rows = jax.tree.map(lambda a: jnp.repeat(a, K1, axis=0), arrays)
    rows = dataclasses.replace(rows, position=rows.position + jnp.tile(j, S))
    flat = logits.astype(jnp.float32).reshape(S * K1, V)
    lse = jax.nn.logsumexp(flat, axis=-1)

    drafts = jnp.clip(draft_tokens, 0, V - 1)
    # before[s, j, i]: draft i precedes row j (and is a real draft), so it counts as output there.
    before = (jnp.arange(K)[None, None, :] < j[None, :, None]) & (jnp.arange(K) < num_drafts[:, None])[:, None, :]
    penalized = _count_drafts(flat, apply_penalties(flat, rows, state), arrays, state, drafts,
                              before.reshape(S * K1, K))
    processed = ban(penalized, rows.banned)
    greedy = first_argmax(processed).reshape(S, K1)
    scaled = target_logits(processed, rows, full)
    logp = jax.nn.log_softmax(scaled, axis=-1).reshape(S, K1, V)

    sampled = arrays.temperature > 0
    keys = jax.vmap(row_key)(rows.seed, rows.position).reshape(S, K1)
    if draft_probs is None:
        # A deterministic draft is kept where it equals the token the sampler itself draws at its row (its
        # key, its noise), and verification emits those draws: P(keep d) = p(d), the most any lossless
        # scheme keeps of a one-hot proposal, and a rejection's token is p's draw given it is not d, the
        # residual. So the output is the one non-speculative decoding gives, token for token, whatever the
        # drafts: how many a sequence carried (the load-adaptive choice) changes no seeded output.
        own = jnp.where(sampled[:, None], gumbel_argmax(scaled, keys.reshape(-1)).reshape(S, K1), greedy)
        accept = (drafts == own[:, :K]) & (jnp.arange(K) < num_drafts[:, None])
        num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
        a = num_accepted
        last = jnp.take_along_axis(own, a[:, None], axis=1)[:, 0]
    else:
        num_accepted, last = _verify_drawn(logp, scaled.reshape(S, K1, V), greedy, keys, sampled, drafts,
                                           num_drafts, draft_probs)
        a = num_accepted

    padded = jnp.concatenate([drafts, jnp.zeros((S, 1), jnp.int32)], axis=1) if K else jnp.zeros((S, 1), jnp.int32)
    tokens = jnp.where(j[None, :] < a[:, None], padded, jnp.where(j[None, :] == a[:, None], last[:, None], -1))
    emitted = tokens >= 0
    raw = jnp.take_along_axis(flat, jnp.maximum(tokens, 0).reshape(S * K1, 1), axis=-1)[:, 0] - lse
    logprobs = jnp.where(emitted, raw.reshape(S, K1), 0.0)
    top_ids, top_lp = top_n(flat, lse, rows.want_top, num_top if full else 0, num_top)
    out = VerifyOutput(tokens, num_accepted, last, logprobs, top_ids.reshape(S, K1, num_top),
                       top_lp.reshape(S, K1, num_top))
    return out, _record(state, arrays, tokens)


def _verify_drawn(logp, scaled, greedy, keys, sampled, drafts, num_drafts, draft_probs):
    """Drafts drawn from `draft_probs` (q): draft j is kept with probability min(1, p_j(d_j) / q_j(d_j)),
    from a stream of its own; the first rejection draws from the residual max(p - q, 0), all kept draws the
    bonus from p. Returns (num_accepted, the token emitted where verification stopped)."""
    S, K1, V = logp.shape
    K = K1 - 1
    p_draft = jnp.exp(jnp.take_along_axis(logp[:, :K], drafts[..., None], axis=-1)[..., 0])
    q = draft_probs.astype(jnp.float32)
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _ACCEPT))))(keys[:, :K])
    accept = jnp.where(sampled[:, None], u * q_draft < p_draft, drafts == greedy[:, :K])
    accept &= jnp.arange(K) < num_drafts[:, None]
    a = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
    p_a = jnp.exp(jnp.take_along_axis(logp, a[:, None, None], axis=1)[:, 0])  # [S, V]
    q_a = jnp.take_along_axis(q, jnp.minimum(a, K - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    # A residual with no mass left (p and q equal up to rounding) falls back to p.
    use_residual = (a < num_drafts) & (jnp.sum(residual, axis=-1) > 0)
    scaled_a = jnp.take_along_axis(scaled, a[:, None, None], axis=1)[:, 0]
    final_logits = jnp.where(use_residual[:, None], jnp.log(residual), scaled_a)  # the bonus: `sample`'s draw
    drawn = gumbel_argmax(final_logits, jnp.take_along_axis(keys, a[:, None], axis=1)[:, 0])
    return a, jnp.where(sampled, drawn, jnp.take_along_axis(greedy, a[:, None], axis=1)[:, 0])


def _count_drafts(logits, penalized, arrays: SamplingArrays, state: PenaltyState, drafts, before):
    """`penalized` (the rows' penalties from the state's counts) with the drafts before each row
    counted too: only the drafted ids change, so only they are computed again and set."""
    n, K = before.shape
    if K == 0:
        return penalized
    K1 = n // len(drafts)
    ids = jnp.repeat(drafts, K1, axis=0)  # [n, K]: the sequence's drafts, on each of its rows
    slot = jnp.clip(jnp.repeat(arrays.penalty_slot, K1), 0, state.counts.shape[0] - 1)
    # How often each drafted id occurs among the drafts before the row.
    extra = jnp.sum((ids[:, :, None] == ids[:, None, :]) & before[:, None, :], axis=2)
    counts = state.counts[slot[:, None], ids] + extra
    values = penalize(jnp.take_along_axis(logits, ids, axis=1), counts, state.prompt_mask[slot[:, None], ids],
                      jnp.repeat(arrays.repetition, K1)[:, None], jnp.repeat(arrays.frequency, K1)[:, None],
                      jnp.repeat(arrays.presence, K1)[:, None])
    # Only rows with a penalty slot, and only ids drafted before the row (the others keep their value).
    change = before & (jnp.repeat(arrays.penalty_slot, K1) >= 0)[:, None]
    target = jnp.where(change, ids, logits.shape[1])  # out of range -> dropped
    return penalized.at[jnp.arange(n)[:, None], target].set(values, mode="drop")


def _record(state: PenaltyState, arrays: SamplingArrays, tokens: jax.Array) -> PenaltyState:
    """counts[slot, token] += 1 for every emitted token of rows with a penalty slot."""
    num_slots, vocab = state.counts.shape
    slot = jnp.where(arrays.penalty_slot >= 0, arrays.penalty_slot, num_slots)[:, None]
    ids = jnp.where(tokens >= 0, tokens, vocab)
    slots = jnp.broadcast_to(slot, ids.shape)
    return dataclasses.replace(state, counts=state.counts.at[slots, ids].add(1, mode="drop"))
