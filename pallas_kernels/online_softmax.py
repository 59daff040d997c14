"""The flash-attention inner loop that every attention kernel shares, on VMEM refs.

A kernel walks key blocks for one query block: `init` before the first, `update`
for each block it does not skip (scores already scaled, capped and masked),
`finish` after the last. m/l are the running max and denominator ([rows, 1]),
acc the unnormalized output ([rows, head_dim]), all float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp() of it underflows to 0, no NaN


def init(m_ref, l_ref, acc_ref) -> None:
    m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)


def update(m_ref, l_ref, acc_ref, s, mask, v) -> None:
    """Fold one key block in: s [rows, keys] float32 scores (masked to MASK_VALUE), v [keys, head_dim]."""
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # rows with no key yet stay at 0
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new


def finish(o_ref, l_ref, acc_ref) -> None:
    """Normalize into the output; rows that saw no key come out zero."""
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)
