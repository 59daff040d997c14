"""GGUF blocks kept quantized: Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K repacked into the
kernels' format (`quantization="gguf"`, vLLM's name for running a GGUF file as it is quantized).

A GGML block holds 32 consecutive values of a row with one fp16 scale (and Q4_1 a minimum):

    Q8_0  d, qs int8[32]        x = d * q                 -> int8, group 32
    Q4_0  d, qs[16] nibbles     x = d * (n - 8)           -> int4 (n - 8), group 32
    Q4_1  d, m, qs[16] nibbles  x = d * n + m             -> int4 (n - 8), group 32, zero -8 - m / d

(the low nibbles of a Q4 block are its values 0..15, the high ones 16..31). A K-quant super-block
holds 256 values in sub-blocks, each with its own scale (and minimum), integers scaled by the
super-block's fp16 d (and dmin) (ggml's block_q4_K / block_q5_K / block_q6_K):

    Q4_K  d, dmin, 8 x 6-bit (sc, m), 4-bit q   x = d sc q - dmin m  -> int4 (q - 8), group 32,
                                                                       zero dmin m / (d sc) - 8
    Q5_K  the same with 5-bit q (a high bit a value in qh)            -> int8 (q), group 32,
                                                                       zero dmin m / (d sc)
    Q6_K  16 x int8 sc, d, 6-bit q              x = d sc (q - 32)    -> int8 (q - 32), group 16

A sub-block whose d sc is 0 holds the constant -dmin m: it takes level 0, scale 1 and zero dmin m,
which gives that constant exactly. d sc and dmin m are exact in float32 (an 11-bit mantissa times
a 6-bit integer), so Q8_0, Q4_0 and Q6_K dequantize bit for bit as gguf-py does; a zero point
(Q4_1, Q4_K, Q5_K) is a float quotient and rounds, a few float32 ulps of the sub-block's values.

A GGUF Linear weight is [out, in] row-major with each row a run of blocks, which is already the
kernels' [N, K]: the values need no transpose, the scales one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from checkpoints.quantized_tensor import QuantizedTensor
from jaxinfer.errors import CheckpointError
from pallas_kernels.quantized_matmul import QuantScheme

F16 = np.dtype("<f2")
BLOCK = 32
# GGML type -> (the scheme that holds it exactly, bytes per block, the block's fields): the blocks of 32
# (to_float decodes these too, for the float path)
LAYOUTS = {
    T.Q8_0: (QuantScheme("int8", 32), 34, [("d", F16), ("qs", "i1", 32)]),
    T.Q4_0: (QuantScheme("int4", 32), 18, [("d", F16), ("qs", "u1", 16)]),
    T.Q4_1: (QuantScheme("int4", 32, zero_points=True), 20, [("d", F16), ("m", F16), ("qs", "u1", 16)]),
}
# K-quant type -> the scheme that holds it (the blocks' layouts are in _k_levels)
K_SCHEMES = {
    T.Q4_K: QuantScheme("int4", 32, zero_points=True),
    T.Q5_K: QuantScheme("int8", 32, zero_points=True),
    T.Q6_K: QuantScheme("int8", 16),
}
KEPT = tuple(t.name for t in (*LAYOUTS, *K_SCHEMES))


def scheme_of(qtype: int) -> QuantScheme | None:
    """The scheme a GGML type is kept in, or None when it is not kept (floats, Q2_K, Q3_K, IQ*, ...)."""
    try:
        qtype = T(int(qtype))
    except ValueError:
        return None
    return LAYOUTS[qtype][0] if qtype in LAYOUTS else K_SCHEMES.get(qtype)


def repack(data: np.ndarray, qtype: int, shape: tuple[int, int], *, name: str = "tensor") -> QuantizedTensor:
    """A GGUF Linear weight's bytes (`[out, bytes_per_row]` uint8, as the reader gives them) of logical
    shape [out, in] -> the same weight as a QuantizedTensor, level for level."""
    qtype = T(int(qtype))
    scheme = scheme_of(qtype)
    if scheme is None:
        raise CheckpointError(f"{name}: GGUF type {qtype.name} is not kept quantized (only {', '.join(KEPT)})")
    if qtype in K_SCHEMES:
        return _repack_k(data, qtype, shape, name)
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


def _repack_k(data: np.ndarray, qtype: T, shape: tuple[int, int], name: str) -> QuantizedTensor:
    """A K-quant weight [out, in] (in whole super-blocks of 256) as its scheme holds it."""
    scheme = K_SCHEMES[qtype]
    out, k = (int(d) for d in shape)
    per_block, type_size = GGML_QUANT_SIZES[qtype]
    if k % per_block:
        raise CheckpointError(f"{name}: {k} input channels are not whole {qtype.name} blocks of {per_block}")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    blocks = out * (k // per_block)
    if raw.size != blocks * type_size:
        raise CheckpointError(f"{name}: {qtype.name} tensor of shape {[out, k]} needs "
                              f"{blocks * type_size} bytes, found {raw.size}")
    q, scale, minimum = _k_levels(raw.reshape(blocks, type_size), qtype)  # [blocks, subs, g], [blocks, subs]
    zeros = None
    if minimum is not None:
        # x = D q - M = D (v - z): v the stored level (q - 8 for int4, q for int8), z = M / D - offset.
        offset = 8 if scheme.method == "int4" else 0
        flat = scale == 0  # the sub-block is the constant -M: level 0, scale 1, zero M
        q[flat] = offset
        zeros = np.where(flat, minimum, minimum / np.where(flat, 1.0, scale) - offset).astype(np.float32)
        scale = np.where(flat, np.float32(1.0), scale)
        q -= offset
    elif qtype == T.Q6_K:
        q -= 32
    subs = k // scheme.group_size
    values = q.reshape(out, k).astype(scheme.values_dtype)

    def input_major(a):
        return np.ascontiguousarray(a.reshape(out, subs).T)
    return QuantizedTensor(np.ascontiguousarray(values), input_major(scale),
                           None if zeros is None else input_major(zeros), scheme)


def _k_levels(b: np.ndarray, qtype: T):
    """A K-quant's super-blocks (uint8 [blocks, bytes]) -> (levels q int8 [blocks, subs, g], as stored:
    0..15, 0..31, 0..63; scales d sc float32 [blocks, subs]; minimums dmin m float32 [blocks, subs] or
    None), by ggml's layouts (gguf-py's dequantizers read them the same way)."""
    n = b.shape[0]
    if qtype == T.Q6_K:  # ql[128], qh[64], sc int8[16], d
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(n, 256) | (high.reshape(n, 256) << 4)).astype(np.int8).reshape(n, 16, 16)
        scale = _f16(d) * sc.view(np.int8).astype(np.float32)
        return q, scale, None
    # Q4_K: d, dmin, scales[12], qs[128]; Q5_K: the same with qh[32] before qs
    d, dmin, packed = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].reshape(n, 3, 4)
    lo, mid, hi = packed[:, 0], packed[:, 1], packed[:, 2]  # 6-bit sc and m of 8 sub-blocks, packed
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1).astype(np.float32)
    qs = b[:, -128:]
    q = ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    if qtype == T.Q5_K:
        qh = b[:, 16:48]
        high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01
        q = q | (high << 4)
    return q.astype(np.int8), d * sc, dmin * m


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [blocks, 2] -> float32 [blocks, 1]."""
    return np.ascontiguousarray(b).view(F16).astype(np.float32)


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
