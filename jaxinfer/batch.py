"""The device batch: one ragged step's worth of tokens, packed into fixed shapes.

Tokens of all sequences in a step are packed back to back ([T], padded to a
bucket); sequence `s` owns tokens `cu_q_lens[s]:cu_q_lens[s+1]`, which are its
last `q_len` positions out of `kv_lens[s]`. Rows past the real sequences have
q_len = kv_len = 0, and padding tokens (index >= cu_q_lens[-1]) write their K/V
into page 0, which the page allocator never hands out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NULL_PAGE = 0  # scratch page for padding writes; never allocated to a sequence


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: jax.Array  # [T] int32 token ids
    positions: jax.Array  # [T] int32 absolute position of each token in its sequence
    cu_q_lens: jax.Array  # [S + 1] int32 start of each sequence's tokens in `tokens`
    kv_lens: jax.Array  # [S] int32 context length of each sequence including this step
    page_table: jax.Array  # [S, P] int32 page ids of each sequence, in order
    logits_indices: jax.Array  # [N] int32 tokens whose logits (and samples) are wanted
    max_q_len: int = dataclasses.field(metadata=dict(static=True))  # bucketed max q_len

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.shape[0]


def slot_mapping(batch: Batch, page_size: int) -> jax.Array:
    """Flat cache slot (page * page_size + offset) for each token: [T] int32."""
    num_tokens = batch.tokens.shape[0]
    token_index = jnp.arange(num_tokens)
    seq = jnp.searchsorted(batch.cu_q_lens, token_index, side="right") - 1
    seq = jnp.clip(seq, 0, batch.num_seqs - 1)
    page = batch.page_table[seq, batch.positions // page_size]
    slots = page * page_size + batch.positions % page_size
    real = token_index < batch.cu_q_lens[-1]
    return jnp.where(real, slots, NULL_PAGE * page_size)


def next_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shapes we compile for."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def pack_batch(seq_tokens: list[np.ndarray], start_positions: list[int],
               page_tables: list[list[int]], *, all_logits: bool = False,
               min_tokens: int = 16, min_seqs: int = 1) -> Batch:
    """Pack sequences' new tokens into one bucketed numpy-backed Batch.

    seq_tokens[s]: the tokens sequence s feeds this step, at positions
    start_positions[s] onward. Logits are taken at each sequence's last token,
    or at every real token with `all_logits`.
    """
    q_lens = np.array([len(t) for t in seq_tokens], np.int32)
    num_real = int(q_lens.sum())
    T = next_bucket(num_real, min_tokens)
    S = next_bucket(len(seq_tokens), min_seqs)
    P = next_bucket(max(len(p) for p in page_tables))
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    cu = np.zeros(S + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = num_real
    kv_lens = np.zeros(S, np.int32)
    table = np.full((S, P), NULL_PAGE, np.int32)
    for s, (toks, start, pages) in enumerate(zip(seq_tokens, start_positions, page_tables)):
        tokens[cu[s]:cu[s + 1]] = toks
        positions[cu[s]:cu[s + 1]] = np.arange(start, start + len(toks))
        kv_lens[s] = start + len(toks)
        table[s, :len(pages)] = pages
    if all_logits:
        logits_indices = np.arange(T, dtype=np.int32)  # padding rows are ignored
    else:
        logits_indices = np.zeros(S, np.int32)
        logits_indices[:len(q_lens)] = cu[1:len(q_lens) + 1] - 1
    return Batch(tokens=tokens, positions=positions, cu_q_lens=cu, kv_lens=kv_lens,
                 page_table=table, logits_indices=logits_indices,
                 max_q_len=min(T, next_bucket(int(q_lens.max()))))
