"""The one attention function models call; it picks an implementation.

Every attention type is paged. Implementations, by name:

    xla        jaxinfer/attention_xla.py: plain JAX, blockwise over pages (default)
    reference  pallas_kernels/paged_attention/reference.py: dense, obviously right

The Pallas kernels (pallas_kernels/) plug in here as further names behind the
same signature. Pick one with JAXINFER_ATTENTION=<name> (read at import),
`set_implementation(name)`, or `with implementation(name): ...`. The choice is
read when a function is traced: an already-compiled jit keeps the one it saw.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import jax

from jaxinfer import attention_xla
from jaxinfer.batch import Batch
from pallas_kernels.paged_attention import reference


def _reference(q, k_pages, v_pages, batch: Batch, *, sm_scale, sliding_window, soft_cap):
    return reference(q, k_pages, v_pages, batch.kv_lens, batch.page_table, batch.cu_q_lens,
                     max_q_len=batch.max_q_len, sm_scale=sm_scale,
                     sliding_window=sliding_window, soft_cap=soft_cap)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": attention_xla.paged_attention,
    "reference": _reference,
}

_current = os.environ.get("JAXINFER_ATTENTION", "xla")
if _current not in IMPLEMENTATIONS:
    raise ValueError(f"JAXINFER_ATTENTION={_current!r}: expected one of {sorted(IMPLEMENTATIONS)}")


def set_implementation(name: str) -> None:
    global _current
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}: expected one of "
                         f"{sorted(IMPLEMENTATIONS)}")
    _current = name


def get_implementation() -> str:
    return _current


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    previous = _current
    set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: Batch, *,
                    sm_scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> jax.Array:
    """q: [T, H, Dh] over pages [num_pages, page_size, K, Dh] -> [T, H, Dh]."""
    return IMPLEMENTATIONS[_current](q, k_pages, v_pages, batch, sm_scale=sm_scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap)
