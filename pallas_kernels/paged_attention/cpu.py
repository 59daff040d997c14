"""The native CPU kernel for decode attention: cpu.cc, an XLA FFI handler (built by pallas_kernels/native_cpu.py).

It takes the decode region of a step (one query token per row) and reads keys and values where they lie in
the pages; jaxinfer/layers/attention_xla.py keeps the prefill region, and everything where the kernel is
not built. The result is attention_xla's to float rounding (tests/test_paged_attention_cpu.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import native_cpu

TARGET = native_cpu.PAGED_ATTENTION_DECODE


def supports(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array) -> bool:
    """q [T, H, Dh] over pages [N, page_size, K, Dh] of float32 or bf16 (both alike), H a multiple of K."""
    return (q.ndim == 3 and k_pages.ndim == 4 and k_pages.shape == v_pages.shape and k_pages.dtype == v_pages.dtype
            and k_pages.dtype in (jnp.float32, jnp.bfloat16) and k_pages.shape[3] == q.shape[2]
            and q.shape[1] % k_pages.shape[2] == 0)


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                     page_table: jax.Array, positions: jax.Array, *, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """q [D, H, Dh], one token per row at `positions` [D], row d over page_table[d] and kv_lens[d] -> [D, H, Dh]
    in q's dtype. The caller checked `supports` and `native_cpu.load`."""
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_pages, v_pages, kv_lens.astype(jnp.int32), page_table.astype(jnp.int32),
        positions.astype(jnp.int32), sm_scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0))
    return out.astype(q.dtype)
