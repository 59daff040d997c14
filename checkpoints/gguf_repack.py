"""GGUF blocks kept quantized: Q8_0, Q4_0 and Q4_1 tensors repacked, exactly, into the kernels'
format (`quantization="gguf"`, vLLM's name for running a GGUF file as it is quantized).

A GGML block holds 32 consecutive values of a row with one fp16 scale (and Q4_1 a minimum):

    Q8_0  d, qs int8[32]        x = d * q                 -> int8, group 32
    Q4_0  d, qs[16] nibbles     x = d * (n - 8)           -> int4 (n - 8), group 32
    Q4_1  d, m, qs[16] nibbles  x = d * n + m             -> int4 (n - 8), group 32, zero -8 - m / d

(the low nibbles of a Q4 block are its values 0..15, the high ones 16..31). A GGUF Linear weight
is [out, in] row-major with each row a run of blocks, which is already the kernels' [N, K]: the
values need no transpose, the scales one. K-quants (Q4_K, Q5_K, Q6_K: sub-blocks of 16 or 32
with 6-bit scales of scales) are not kept yet; a file that uses them loads dequantized only.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as T

from checkpoints.quantized_tensor import QuantizedTensor
from jaxinfer.errors import CheckpointError
from pallas_kernels.quantized_matmul import QuantScheme

F16 = np.dtype("<f2")
BLOCK = 32
# GGML type -> (the scheme that holds it exactly, bytes per block, the block's fields)
LAYOUTS = {
    T.Q8_0: (QuantScheme("int8", 32), 34, [("d", F16), ("qs", "i1", 32)]),
    T.Q4_0: (QuantScheme("int4", 32), 18, [("d", F16), ("qs", "u1", 16)]),
    T.Q4_1: (QuantScheme("int4", 32, zero_points=True), 20, [("d", F16), ("m", F16), ("qs", "u1", 16)]),
}
KEPT = tuple(t.name for t in LAYOUTS)


def scheme_of(qtype: int) -> QuantScheme | None:
    """The scheme a GGML type is kept in, or None when it is not kept (floats, K-quants, ...)."""
    try:
        return LAYOUTS[T(int(qtype))][0]
    except (ValueError, KeyError):
        return None


def repack(data: np.ndarray, qtype: int, shape: tuple[int, int], *, name: str = "tensor") -> QuantizedTensor:
    """A GGUF Linear weight's bytes (`[out, bytes_per_row]` uint8, as the reader gives them) of logical
    shape [out, in] -> the same weight as a QuantizedTensor, level for level."""
    qtype = T(int(qtype))
    if qtype not in LAYOUTS:
        raise CheckpointError(f"{name}: GGUF type {qtype.name} is not kept quantized (only {', '.join(KEPT)})")
    scheme = LAYOUTS[qtype][0]
    out, k = (int(d) for d in shape)
    if k % BLOCK:
        raise CheckpointError(f"{name}: {k} input channels are not whole {qtype.name} blocks of {BLOCK}")
    b, d = _blocks(data, qtype, out, k, name)
    zeros = None
    if qtype == T.Q8_0:
        values = b["qs"].reshape(out, k)
    else:
        nibbles = _nibbles(b)
        if qtype == T.Q4_1:
            m = b["m"].astype(np.float32)
            # x = d n + m = d (q + 8) + m = d (q - z) with z = -8 - m / d. A block with d = 0 holds m alone:
            # there scale 1, every level -8, and z = -8 - m.
            flat = d == 0
            nibbles[flat] = 0
            zeros = np.where(flat, -8.0 - m, -8.0 - m / np.where(flat, 1.0, d)).astype(np.float32).T.copy()
            d = np.where(flat, np.float32(1.0), d)
        values = (nibbles - 8).reshape(out, k).astype(ml_dtypes.int4)
    return QuantizedTensor(np.ascontiguousarray(values), np.ascontiguousarray(d.T), zeros, scheme)


def to_float(data: np.ndarray, qtype: int, shape: tuple[int, int], *, name: str = "tensor") -> np.ndarray:
    """The same blocks as float32 [rows, in], by GGML's own formulas (d q, d (n - 8), d n + m), so
    the float path matches llama.cpp's dequantization bit for bit (the repacked Q4_1 zero, -8 - m / d,
    rounds)."""
    qtype = T(int(qtype))
    out, k = (int(v) for v in shape)
    b, d = _blocks(data, qtype, out, k, name)
    q = (b["qs"] if qtype == T.Q8_0 else _nibbles(b)).astype(np.float32)  # [out, blocks, 32]
    if qtype == T.Q4_0:
        q -= 8.0
    q *= d[:, :, None]
    if qtype == T.Q4_1:
        q += b["m"].astype(np.float32)[:, :, None]
    return q.reshape(out, k)


def _blocks(data: np.ndarray, qtype: T, out: int, k: int, name: str):
    """(the block structs [out, K / 32], their scales d as float32), the byte count checked."""
    scheme, type_size, fields = LAYOUTS[qtype]
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.size != out * (k // BLOCK) * type_size:
        raise CheckpointError(f"{name}: {qtype.name} tensor of shape {[out, k]} needs "
                              f"{out * (k // BLOCK) * type_size} bytes, found {raw.size}")
    b = raw.view(np.dtype(fields)).reshape(out, k // BLOCK)
    return b, b["d"].astype(np.float32)


def _nibbles(b) -> np.ndarray:
    """A Q4 block's 32 levels 0..15, int8 [out, blocks, 32]: the low nibbles (values 0..15), then the high."""
    qs = b["qs"]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
