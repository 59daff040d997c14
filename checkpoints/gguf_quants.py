"""Dequantize GGUF tensor data into float32.

Used where floats are what the model wants (embeddings, norms, a checkpoint loaded without
`quantization="gguf"`). Q8_0, Q4_0 and Q4_1 decode where they are repacked for the kernels
(checkpoints/gguf_repack.py: one definition of those formats, and 2 to 3 times faster
than gguf-py's decoders, which the default model's start-up feels); every other type through
gguf-py's own (`gguf.quants`). This module checks the data against its type and shape, naming
the tensor, and decodes bounded chunks of rows, so a large tensor needs few temporaries beyond
its float32 output.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants

from checkpoints import gguf_repack
from jaxinfer.errors import CheckpointError

DEFAULT_CHUNK_ELEMS = 1 << 22  # values decoded per step: bounds the temporaries to ~100 MB
FLOATS = (T.F32, T.F16, T.BF16)
SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in FLOATS) + tuple(
    sorted(t.name for t in getattr(quants, "_type_traits", {}) if t not in FLOATS))


def qtype_name(qtype: int | T) -> str:
    try:
        return T(int(qtype)).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def dequantize(data: np.ndarray, qtype: int | T, shape: Sequence[int], *, name: str = "tensor",
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """Decode GGUF tensor data into float32 of `shape`.

    data: the tensor's bytes as `gguf.GGUFReader` gives them (`ReaderTensor.data`:
      uint8 `[rows..., bytes_per_row]` for block types and BF16, or the typed F16/F32 view).
    shape: the logical numpy shape (GGUF `ne` reversed); the last axis is the row.
    Raises CheckpointError for an unsupported qtype or data of the wrong size.
    """
    shape = tuple(int(d) for d in shape)
    try:
        qtype = T(int(qtype))
        if qtype.name not in SUPPORTED_TYPES:
            raise ValueError
    except ValueError:
        raise CheckpointError(
            f"{name}: GGUF tensor type {qtype_name(qtype)} is not supported; jaxinfer can "
            f"dequantize {', '.join(SUPPORTED_TYPES)}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_len = shape[-1] if shape else 1
    if row_len % block:
        raise CheckpointError(f"{name}: row length {row_len} is not a multiple of the "
                              f"{qtype.name} block size {block}")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n_rows = math.prod(shape[:-1]) if shape else 1
    row_bytes = row_len // block * type_size
    if raw.size != n_rows * row_bytes:
        raise CheckpointError(f"{name}: {qtype.name} tensor of shape {list(shape)} needs "
                              f"{n_rows * row_bytes} bytes, found {raw.size}")
    raw = raw.reshape(n_rows, row_bytes)
    typed = {T.F32: "<f4", T.F16: "<f2"}.get(qtype)  # gguf-py reads these as typed arrays
    out = np.empty((n_rows, row_len), np.float32)
    step = max(1, chunk_elems // max(row_len, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        if qtype in gguf_repack.LAYOUTS:
            out[r0:r1] = gguf_repack.to_float(raw[r0:r1], qtype, (r1 - r0, row_len), name=name)
            continue
        chunk = raw[r0:r1] if typed is None else raw[r0:r1].view(typed)
        out[r0:r1] = quants.dequantize(chunk, qtype).reshape(r1 - r0, row_len)
    return out.reshape(shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """Decode a `gguf.ReaderTensor` into float32 of its numpy shape (reversed `ne`)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type, shape, name=tensor.name)
