"""Ragged paged attention over a paged KV cache.

`reference.py` is the pure-JAX reference; Pallas kernels for TPU (Mosaic) and
GPU (Mosaic GPU) come beside it and dispatch through `ragged_paged_attention`.
"""

from pallas_kernels.paged_attention.reference import ragged_paged_attention as reference

__all__ = ["reference"]
