"""checkpoints.gguf_quants: the checks and row chunking it wraps around gguf-py's dequantizer
(gguf.quants.dequantize), and float types against numpy's own conversions."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as ref

from checkpoints.gguf_quants import SUPPORTED_TYPES, dequantize
from jaxinfer.errors import CheckpointError

# Byte offsets of the fp16 scale fields inside each block (ggml-common.h block structs).
# Random bytes there would give inf/nan scales; the test writes sane values instead.
FP16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANTIZED = list(FP16_FIELDS)
FLOATS = [T.F32, T.F16, T.BF16]


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random quant bits, fp16 scales of either sign in 1e-3..0.1."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 0.1, n_blocks) * rng.choice([-1, 1], n_blocks)
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def random_float_bytes(qtype: T, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    # BF16 as gguf-py's reader gives it: uint8 [..., 2 * row]
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    return bf16.view(np.uint8).reshape(*shape[:-1], shape[-1] * 2)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (2, 3, 2), (7,)], ids=str)
def test_block_types_keep_any_shape_through_the_row_chunks(qtype, shape):
    """shape counts blocks per axis; the last axis is multiplied by the block size."""
    rng = np.random.default_rng(int(qtype))
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape))
    raw = random_blocks(qtype, n_blocks, rng).reshape(*shape[:-1], shape[-1] * type_size)
    logical = (*shape[:-1], shape[-1] * block)
    expected = ref.dequantize(raw, qtype)
    got = dequantize(raw, qtype, logical)
    assert got.dtype == np.float32 and got.shape == logical == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 5), (1,), (2, 3, 7)], ids=str)
def test_float_types_match_numpys_conversion(qtype, shape):
    data = random_float_bytes(qtype, shape, np.random.default_rng(1))
    if qtype == T.BF16:  # the top half of a float32's bits
        expected = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        expected = data.astype(np.float32)
    got = dequantize(data, qtype, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, expected.reshape(shape))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q6_K, T.BF16], ids=lambda t: t.name)
def test_chunked_decoding_equals_one_shot(qtype):
    """Row chunks (here a few rows each, ragged last chunk) give the same result as one pass."""
    rng = np.random.default_rng(2)
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 11, 3
    if qtype == T.BF16:
        raw = random_float_bytes(qtype, (rows, blocks_per_row), rng)
    else:
        raw = random_blocks(qtype, rows * blocks_per_row, rng).reshape(rows, -1)
    shape = (rows, blocks_per_row * block)
    whole = dequantize(raw, qtype, shape)
    chunked = dequantize(raw, qtype, shape, chunk_elems=4 * shape[1])
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_allclose(whole, ref.dequantize(raw, qtype).reshape(shape), rtol=1e-6, atol=1e-7)


def test_required_types_are_supported():
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K",
                 "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K"]:
        assert name in SUPPORTED_TYPES


@pytest.mark.parametrize("qtype", [T.Q8_K, 999], ids=str)
def test_unsupported_type_raises_checkpoint_error_listing_supported(qtype):
    with pytest.raises(CheckpointError) as e:
        dequantize(np.zeros(4096, np.uint8), qtype, (256,), name="blk.0.attn_q.weight")
    msg = str(e.value)
    assert "blk.0.attn_q.weight" in msg and "not supported" in msg
    assert "Q4_K" in msg and "Q8_0" in msg
    if isinstance(qtype, T):
        assert qtype.name in msg


def test_wrong_byte_count_raises_checkpoint_error():
    with pytest.raises(CheckpointError, match="needs 40 bytes, found 39"):
        dequantize(np.zeros(39, np.uint8), T.Q4_1, (2, 32), name="w")


def test_row_not_multiple_of_block_raises_checkpoint_error():
    with pytest.raises(CheckpointError, match="not a multiple of the Q4_K block size 256"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (1, 200), name="w")
