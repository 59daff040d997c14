"""Dequantize GGUF tensor data (GGML block formats) into float32 with numpy.

A quantized row of `n` values is stored as `n / block_size` blocks of
`type_size` bytes each. Every decoder below takes the raw blocks of one chunk of
rows as a uint8 array `[n_blocks, type_size]` and returns float32
`[n_blocks, block_size]`, in the value order of GGML's reference
`dequantize_row_*` functions. Layouts follow the `block_*` structs of
ggml-common.h (QK_K = 256 for the k-quants). `dequantize` drives the decoders
over bounded row chunks, so a large tensor never needs more than a few chunk-sized
temporaries beyond its float32 output.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from jaxinfer.errors import CheckpointError

QK_K = 256
DEFAULT_CHUNK_ELEMS = 1 << 22  # values decoded per step: bounds the temporaries to ~100 MB

F16 = np.dtype("<f2")


def _blocks(raw: np.ndarray, fields: list) -> np.ndarray:
    """View `raw: uint8 [n, type_size]` as a structured array `[n]` of one GGML block struct."""
    return raw.view(np.dtype(fields)).reshape(-1)


def _scale(x: np.ndarray) -> np.ndarray:
    """fp16 scale field `[n]` -> float32 `[n, 1, ...]` ready to broadcast over a block."""
    return x.astype(np.float32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 `[n, k]` -> uint8 `[n, 2, k]`: low nibbles first, then high nibbles."""
    out = np.empty((qs.shape[0], 2, qs.shape[1]), np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, 0])
    np.right_shift(qs, 4, out=out[:, 1])
    return out


def _bits(x: np.ndarray, n_bits: int) -> np.ndarray:
    """uint32 `[n]` -> uint8 `[n, n_bits]` with bit i of each value at column i."""
    shifts = np.arange(n_bits, dtype=np.uint32)
    return ((x[:, None] >> shifts) & 1).astype(np.uint8)


# --- plain floats ---------------------------------------------------------------------

def _f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").copy()


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(F16).astype(np.float32)


def _bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the high half of a float32
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


# --- 32-value blocks ------------------------------------------------------------------

def _q4_0(raw):
    """block_q4_0: d fp16, qs[16]; x[j] = d * (nibble_j - 8), low nibbles are x[0:16]."""
    b = _blocks(raw, [("d", F16), ("qs", "u1", 16)])
    q = _nibbles(b["qs"]).reshape(-1, 32).astype(np.float32)
    q -= 8.0
    q *= _scale(b["d"])
    return q


def _q4_1(raw):
    """block_q4_1: d, m fp16, qs[16]; x = d * nibble + m."""
    b = _blocks(raw, [("d", F16), ("m", F16), ("qs", "u1", 16)])
    q = _nibbles(b["qs"]).reshape(-1, 32).astype(np.float32)
    q *= _scale(b["d"])
    q += _scale(b["m"])
    return q


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh uint32 `[n]` (bit j is the 5th bit of value j), qs `[n, 16]` -> values 0..31 `[n, 32]`."""
    q = _nibbles(qs).reshape(-1, 32)
    q |= _bits(qh, 32) << 4
    return q


def _q5_0(raw):
    """block_q5_0: d fp16, qh u32, qs[16]; x = d * (q5 - 16)."""
    b = _blocks(raw, [("d", F16), ("qh", "<u4"), ("qs", "u1", 16)])
    q = _five_bit(b["qh"], b["qs"]).astype(np.float32)
    q -= 16.0
    q *= _scale(b["d"])
    return q


def _q5_1(raw):
    """block_q5_1: d, m fp16, qh u32, qs[16]; x = d * q5 + m."""
    b = _blocks(raw, [("d", F16), ("m", F16), ("qh", "<u4"), ("qs", "u1", 16)])
    q = _five_bit(b["qh"], b["qs"]).astype(np.float32)
    q *= _scale(b["d"])
    q += _scale(b["m"])
    return q


def _q8_0(raw):
    """block_q8_0: d fp16, qs int8[32]; x = d * q."""
    b = _blocks(raw, [("d", F16), ("qs", "i1", 32)])
    q = b["qs"].astype(np.float32)
    q *= _scale(b["d"])
    return q


# --- 256-value k-quant super-blocks ---------------------------------------------------

def _q2_k(raw):
    """block_q2_K: scales[16] (lo nibble: scale, hi: min), qs[64], d, dmin fp16.

    Value order [half 2, shift 4, l 32]: q = (qs[half*32 + l] >> 2*shift) & 3, sub-block
    (16 values) index half*8 + shift*2 + l//16; x = d*sc*q - dmin*m.
    """
    b = _blocks(raw, [("scales", "u1", 16), ("qs", "u1", 64), ("d", F16), ("dmin", F16)])
    n = len(b)
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    q = ((b["qs"].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).astype(np.float32)
    sc = b["scales"]
    q *= (_scale(b["d"]) * (sc & 0x0F))[:, :, None]
    q -= (_scale(b["dmin"]) * (sc >> 4))[:, :, None]
    return q.reshape(n, QK_K)


def _q3_k(raw):
    """block_q3_K: hmask[32], qs[64], scales[12] (16 six-bit scales), d fp16.

    Value order [half 2, shift 4, l 32]: low 2 bits (qs[half*32 + l] >> 2*shift) & 3,
    high bit (hmask[l] >> half*4 + shift) & 1, where a clear high bit subtracts 4.
    Scale i: low 4 bits from scales[i % 8] (nibble i // 8), high 2 bits from
    scales[8 + i % 4] (bit pair i // 4); x = d * (scale - 32) * q.
    """
    b = _blocks(raw, [("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", F16)])
    n = len(b)
    s = b["scales"]
    i = np.arange(16)
    low = (s[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 0x03
    scales = (low | (high << 4)).astype(np.float32) - 32.0  # [n, 16]
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    low2 = (b["qs"].reshape(n, 2, 1, 32) >> shifts) & 3  # [n, 2, 4, 32]
    hbit = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = low2.astype(np.int8) - ((hbit.reshape(n, 2, 4, 32) ^ 1) << 2).astype(np.int8)
    q = q.reshape(n, 16, 16).astype(np.float32)
    q *= (_scale(b["d"]) * scales)[:, :, None]
    return q.reshape(n, QK_K)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte `scales` of Q4_K/Q5_K into 8 six-bit scales and 8 mins, uint8 `[n, 8]`.

    Sub-block j < 4: scale = s[j] & 63, min = s[j+4] & 63. j >= 4: the low 4 bits come
    from s[j+4] (scale: low nibble, min: high nibble), the top 2 bits from the top
    bits of s[j-4] (scale) and s[j] (min).
    """
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(raw):
    """block_q4_K: d, dmin fp16, scales[12], qs[128]; 8 sub-blocks of 32.

    Sub-block 2p takes the low nibbles of qs[32p : 32p+32], sub-block 2p+1 the high
    nibbles; x = d*sc*q - dmin*m.
    """
    b = _blocks(raw, [("d", F16), ("dmin", F16), ("scales", "u1", 12), ("qs", "u1", 128)])
    n = len(b)
    sc, mn = _k4_scales(b["scales"])
    q = _nibbles(b["qs"].reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    q *= (_scale(b["d"]) * sc)[:, :, None]
    q -= (_scale(b["dmin"]) * mn)[:, :, None]
    return q.reshape(n, QK_K)


def _q5_k(raw):
    """block_q5_K: as Q4_K plus qh[32]; bit j of qh[l] is the 5th bit of sub-block j's value l."""
    b = _blocks(raw, [("d", F16), ("dmin", F16), ("scales", "u1", 12), ("qh", "u1", 32),
                      ("qs", "u1", 128)])
    n = len(b)
    sc, mn = _k4_scales(b["scales"])
    q = _nibbles(b["qs"].reshape(n * 4, 32)).reshape(n, 8, 32)
    q |= ((b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    q = q.astype(np.float32)
    q *= (_scale(b["d"]) * sc)[:, :, None]
    q -= (_scale(b["dmin"]) * mn)[:, :, None]
    return q.reshape(n, QK_K)


def _q6_k(raw):
    """block_q6_K: ql[128], qh[64], scales int8[16], d fp16.

    Value order [half 2, k 4, l 32]: low 4 bits from ql[half*64 + (k%2)*32 + l]
    (nibble k // 2), high 2 bits (qh[half*32 + l] >> 2k) & 3; scale index
    half*8 + 2k + l//16; x = d * scale * (q6 - 32).
    """
    b = _blocks(raw, [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", F16)])
    n = len(b)
    low = _nibbles(b["ql"].reshape(n * 2, 64))  # [n*half, nibble, (k%2, l)]
    low = low.reshape(n, 2, 4, 32)  # k = nibble*2 + k%2
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    high = (b["qh"].reshape(n, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    q = q.reshape(n, 16, 16).astype(np.float32)
    q *= (_scale(b["d"]) * b["scales"])[:, :, None]
    return q.reshape(n, QK_K)


Decoder = Callable[[np.ndarray], np.ndarray]

# qtype -> (block_size in values, type_size in bytes, decoder)
DECODERS: dict[T, tuple[int, int, Decoder]] = {
    T.F32: (1, 4, _f32),
    T.F16: (1, 2, _f16),
    T.BF16: (1, 2, _bf16),
    T.Q4_0: (32, 18, _q4_0),
    T.Q4_1: (32, 20, _q4_1),
    T.Q5_0: (32, 22, _q5_0),
    T.Q5_1: (32, 24, _q5_1),
    T.Q8_0: (32, 34, _q8_0),
    T.Q2_K: (QK_K, 84, _q2_k),
    T.Q3_K: (QK_K, 110, _q3_k),
    T.Q4_K: (QK_K, 144, _q4_k),
    T.Q5_K: (QK_K, 176, _q5_k),
    T.Q6_K: (QK_K, 210, _q6_k),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in DECODERS)


def qtype_name(qtype: int | T) -> str:
    try:
        return T(int(qtype)).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def dequantize(data: np.ndarray, qtype: int | T, shape: Sequence[int], *, name: str = "tensor",
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """Decode GGUF tensor data into float32 of `shape`.

    data: the tensor's bytes as `gguf.GGUFReader` gives them (`ReaderTensor.data`:
      uint8 `[rows..., bytes_per_row]` for block types, or the typed F16/F32 view).
    shape: the logical numpy shape (GGUF `ne` reversed); the last axis is the row.
    Raises CheckpointError for an unsupported qtype or data of the wrong size.
    """
    shape = tuple(int(d) for d in shape)
    try:
        qtype = T(int(qtype))
        block, type_size, decode = DECODERS[qtype]
    except (ValueError, KeyError):
        raise CheckpointError(
            f"{name}: GGUF tensor type {qtype_name(qtype)} is not supported; jaxinfer can "
            f"dequantize {', '.join(SUPPORTED_TYPES)}") from None
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
    out = np.empty((n_rows, row_len), np.float32)
    step = max(1, chunk_elems // max(row_len, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        chunk = raw[r0:r1].reshape(-1, type_size)
        out[r0:r1] = decode(chunk).reshape(r1 - r0, row_len)
    return out.reshape(shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """Decode a `gguf.ReaderTensor` into float32 of its numpy shape (reversed `ne`)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type, shape, name=tensor.name)
