"""The device batch: one step's worth of work, packed into a fixed, bucketed shape.

A step mixes two kinds of work, each in its own region of the packed tokens:

    tokens [0, D)        decode region: one token per decode sequence (row i is
                         sequence i); rows past the real ones are padding
    tokens [D, D + Tp)   prefill region: chunks of prompts packed back to back

Sequences follow the same order: `D` decode sequences, then up to `M` prefill
sequences. Every array is ragged in the usual way: sequence `s` owns tokens
`cu_q_lens[s]:cu_q_lens[s+1]`, its last `q_len` positions out of `kv_lens[s]`.
Padding decode rows own one token with kv_len 1 over the null page; padding
prefill sequences own nothing. Padding tokens write their K/V into page 0,
which the page allocator never hands out.

For attention without a kernel, the prefill region is also cut into query
blocks of `block_q` tokens that each belong to one sequence (`block_tokens`,
`block_seq`), so a short prompt next to a long one does not pay for the long
one's query length.

Logits are computed only at `logits_indices` (R rows): one per decode row,
then the prefill rows (a completed prompt's last token, and prompt tokens whose
logprobs were asked for). A token may also be fed from the device
(`feed_index`): each sequence's latest sampled token is kept there in its feed
slot, so the host can schedule step N+1 before it has read step N's output.
(Keyed by sequence, not by the previous step's row: a step that emits several
tokens for one sequence, as speculative decoding does, keeps the last one it
accepts.) A speculating sequence owns several consecutive decode rows: its last
token, then its drafts, each at the next position with its own kv_len.
"""

from __future__ import annotations

import dataclasses

import jax



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: jax.Array  # [T] int32 token ids (where feed_index < 0)
    feed_index: jax.Array  # [T] int32 feed slot whose kept token to feed (ModelRunner.feed_tokens), or -1
    positions: jax.Array  # [T] int32 absolute position of each token in its sequence
    slots: jax.Array  # [T] int32 flat cache slot (page * page_size + offset) for the token's K/V
    cu_q_lens: jax.Array  # [S + 1] int32 start of each sequence's tokens
    kv_lens: jax.Array  # [S] int32 context length of each sequence including this step
    page_table: jax.Array  # [S, P] int32 page ids of each sequence, in order
    block_tokens: jax.Array  # [NB, Bq] int32 prefill token index of each query-block slot, T = none
    block_seq: jax.Array  # [NB] int32 sequence of each query block (a padding block: any)
    logits_indices: jax.Array  # [R] int32 tokens whose logits are wanted
    decode_rows: int = dataclasses.field(metadata=dict(static=True))  # D
    max_q_len: int = dataclasses.field(metadata=dict(static=True))  # bound on any q_len

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.shape[0]
