"""GGUF K-quants (Q4_K, Q5_K, Q6_K) kept quantized (checkpoints/gguf_repack.py): each super-block repacked
level for level and checked against gguf-py's own dequantization; a file that mixes them (as Q4_K_M does)
loaded with a scheme per projection, giving the dequantized float model's logits, and saved and restored
with Orbax.

gguf-py cannot quantize K-quants, so the blocks are synthesized by ggml's layouts: random level bytes,
random 6-bit (or int8) scales and minimums, finite fp16 d and dmin, and sub-blocks whose d sc is 0."""

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from checkpoints import gguf_repack, loader, orbax_io
from jaxinfer import params as params_lib
from jaxinfer.errors import CheckpointError
from jaxinfer.params import MixedQuantization
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from pallas_kernels.quantized_matmul import dequantize, parse
from tests.paged_runs import teacher_forced_logits

SCHEMES = {T.Q4_K: "int4-g32-zp", T.Q5_K: "int8-g32-zp", T.Q6_K: "int8-g16"}
VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 256, 512, 2, 4, 2, 64


def pack_scales_and_mins(sc, m):
    """Q4_K/Q5_K's 6-bit scales and minimums [n, 8] -> their 12 packed bytes [n, 12] (the inverse of
    gguf-py's Q4_K.get_scale_min): bytes 0-3 sc 0-3 with sc 4-7's top bits, 4-7 m 0-3 with m 4-7's top
    bits, 8-11 the low nibbles of sc 4-7 and m 4-7."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
                           (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=1)


def kquant_bytes(rng, qtype, out, k, scale=0.01):
    """Random valid `qtype` data for an [out, k] weight: uint8 [out, bytes_per_row]. Sub-block 2 of the
    first super-block has sc = 0 and the second super-block d = 0 (its sub-blocks are the constants -dmin m)."""
    per_block, type_size = GGML_QUANT_SIZES[qtype]
    n = out * (k // per_block)
    b = rng.integers(0, 256, (n, type_size), dtype=np.uint8)  # the levels (and anything not set below)

    def f16(lo, hi):
        return rng.uniform(lo, hi, (n, 1)).astype(np.float16).view(np.uint8)
    if qtype == T.Q3_K:  # hmask[32], qs[64], scales[12], d: random but d
        b[:, 108:110] = f16(-scale, scale)
    elif qtype == T.Q6_K:  # ql[128], qh[64], scales int8[16], d
        sc = rng.integers(-128, 128, (n, 16)).astype(np.int8)
        sc[0, 2] = 0
        b[:, 192:208] = sc.view(np.uint8)
        b[:, 208:210] = f16(-scale, scale)
        b[1, 208:210] = 0
    else:  # d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        sc, m = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
        sc[0, 2] = 0
        b[:, 0:2] = f16(-scale, scale)
        b[:, 2:4] = f16(0, scale)
        b[1, 0:2] = 0
        b[:, 4:16] = pack_scales_and_mins(sc, m)
    return b.reshape(out, -1)


@pytest.mark.parametrize("qtype", list(SCHEMES), ids=lambda t: t.name)
def test_repacked_k_quant_blocks_dequantize_to_gguf_pys_own_values(qtype):
    rng = np.random.default_rng(int(qtype))
    out, k = 24, 512
    data = kquant_bytes(rng, qtype, out, k)
    qt = gguf_repack.repack(data, qtype, (out, k), name="w")
    scheme = parse(SCHEMES[qtype])
    assert qt.scheme == scheme and qt.values.shape == (out, k) and qt.values.dtype == scheme.values_dtype
    assert qt.scales.shape == (k // scheme.group_size, out)
    want = gguf.quants.dequantize(data, qtype).reshape(out, k)
    g = scheme.group_size
    assert np.isfinite(want).all() and (want[0, 2 * g:3 * g] == want[0, 2 * g]).all()  # sc = 0: a constant
    assert (want[0, 256 + 2 * g:256 + 3 * g] == want[0, 256 + 2 * g]).all()  # d = 0: constants too
    got = np.asarray(dequantize(qt.values, qt.scales, qt.zeros, qt.scheme)).T
    if qtype == T.Q6_K:  # d sc (q - 32): every factor exact in float32
        np.testing.assert_array_equal(got, want)
    else:  # (v - z) D with z = M / D (- 8): the zero is a float quotient, exact to a few ulps of D q and M
        size = np.abs(qt.scales) * (40 + np.abs(qt.zeros))  # >= |D| 31 + |M|
        assert np.all(np.abs(got - want) <= np.repeat(size.T, g, axis=1) * 2.0 ** -22)
        assert np.mean(got == want) > 0.5
    levels = qt.values.astype(np.int32)
    lo, hi = {T.Q4_K: (-8, 7), T.Q5_K: (0, 31), T.Q6_K: (-32, 31)}[qtype]
    assert levels.min() == lo and levels.max() == hi  # every level of the format is reached, none beyond


def test_corrupt_k_quant_data_is_refused_naming_the_tensor():
    rng = np.random.default_rng(0)
    data = kquant_bytes(rng, T.Q4_K, 4, 512)
    with pytest.raises(CheckpointError, match=r"blk.0.ffn_up.weight: Q4_K tensor of shape \[4, 512\] needs 1152 bytes, "
                                              r"found 1151"):
        gguf_repack.repack(data.reshape(-1)[:-1], T.Q4_K, (4, 512), name="blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="blk.1.attn_v.weight: 384 input channels are not whole Q6_K blocks "
                                              "of 256"):
        gguf_repack.repack(data, T.Q6_K, (3, 384), name="blk.1.attn_v.weight")
    with pytest.raises(CheckpointError, match="w: GGUF type Q3_K is not kept quantized"):
        gguf_repack.repack(data, T.Q3_K, (4, 512), name="w")


# The tiny llama's projections as a Q4_K_M-like file stores them: Q4_K most, Q6_K for attn_v and one ffn_down,
# Q5_K for the ups and layer 1's ffn_down; layer 1's attn_k a Q8_0.
MIXED = {"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q4_K, "ffn_gate": T.Q4_K,
         "ffn_up": T.Q5_K, "ffn_down": T.Q6_K}
def tiny_llama_writer(path) -> gguf.GGUFWriter:
    """A GGUF writer with the tiny llama's metadata written; the caller adds the tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


FLOAT_PROJECTION = "blk.1.attn_k.weight"  # a Q8_0 among the K-quants


def write_mixed_gguf(path, rng, override=None):
    """A 2-layer llama (hidden 256, MLP 512, head_dim 64) whose projections are random K-quant blocks of
    MIXED's types (layer 1's ffn_down Q5_K), but those `override` gives another type."""
    override = {FLOAT_PROJECTION: T.Q8_0} if override is None else override
    w = tiny_llama_writer(path)
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for short, (out, k) in shapes.items():
            name = f"blk.{i}.{short}.weight"
            qtype = override.get(name, MIXED[short] if i == 0 or short != "ffn_down" else T.Q5_K)
            if qtype == T.Q8_0:
                x = (rng.standard_normal((out, k)) * 0.05).astype(np.float32)
                w.add_tensor(name, gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
            else:  # small scales keep the random model's activations tame through two layers
                w.add_tensor(name, kquant_bytes(rng, qtype, out, k, scale=0.002), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load(path, quantization=None, mesh=None):
    from jaxinfer.tokenizer import Tokenizer

    tokenizer, Tokenizer.from_gguf_metadata = Tokenizer.from_gguf_metadata, staticmethod(lambda metadata: None)
    try:  # token ids only here
        return loader.load(path, dtype=jnp.float32, mesh=mesh or make_mesh(), progress=False,
                           quantization=quantization)
    finally:
        Tokenizer.from_gguf_metadata = tokenizer


def _logits(model, mesh=None):
    """Teacher-forced logits [21, vocab] of one fixed prompt."""
    prompts = [np.random.default_rng(1).integers(3, VOCAB, 21)]
    runner = ModelRunner(model.config, model.graphdef, model.state, mesh or make_mesh(), num_pages=16)
    return teacher_forced_logits(runner, prompts, [np.array([5])])[0]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(path, the model kept quantized, the dequantized float model) of a mixed K-quant file. Its one Q8_0
    projection (FLOAT_PROJECTION) stands for a type kept on its own: beside the K-quants it is int8-g32."""
    path = write_mixed_gguf(tmp_path_factory.mktemp("kq") / "mixed.gguf", np.random.default_rng(7))
    return path, _load(path, "gguf"), _load(path)


def _scheme_of_each_projection(model):
    flat = params_lib.flat_params(model.state)
    out = {}
    for p in flat:
        if p[0] == "layers" and p[-1] in ("values", "weight") and p[-2].endswith("_proj"):
            module = ".".join(map(str, p[:-1]))
            out[module] = params_lib.scheme_at(model.quantization, module) if p[-1] == "values" else None
    return out


def test_a_mixed_k_quant_file_keeps_each_projection_in_its_own_scheme(mixed):
    _, kept, floats = mixed
    q = kept.quantization
    assert isinstance(q, MixedQuantization)
    assert q.name == "gguf (int4-g32-zp, int8-g16, int8-g32-zp, int8-g32)"  # most used first
    want = {}
    for i in range(LAYERS):
        for short, hf in (("attn_q", "attn.q_proj"), ("attn_k", "attn.k_proj"), ("attn_v", "attn.v_proj"),
                          ("attn_output", "attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                          ("ffn_down", "mlp.down_proj")):
            qtype = MIXED[short] if i == 0 or short != "ffn_down" else T.Q5_K
            if f"blk.{i}.{short}.weight" == FLOAT_PROJECTION:
                qtype = T.Q8_0
            want[f"layers.{i}.{hf}"] = gguf_repack.scheme_of(qtype)
    assert _scheme_of_each_projection(kept) == want
    flat = params_lib.flat_params(kept.state)
    v = params_lib.value_of(flat[("layers", 0, "attn", "v_proj", "values")])
    assert v.dtype == jnp.int8 and params_lib.value_of(flat[("layers", 0, "attn", "v_proj", "scales")]).shape == (
        HIDDEN // 16, KV_HEADS * HEAD_DIM)
    assert params_lib.value_of(flat[("layers", 0, "attn", "q_proj", "values")]).dtype == jnp.int4
    assert floats.quantization is None


def test_a_projection_of_a_type_no_scheme_holds_stays_float(tmp_path):
    path = write_mixed_gguf(tmp_path / "q3.gguf", np.random.default_rng(3), override={"blk.0.ffn_gate.weight": T.Q3_K})
    kept = _load(path, "gguf")
    schemes = _scheme_of_each_projection(kept)
    assert schemes["layers.0.mlp.gate_proj"] is None and schemes["layers.0.mlp.up_proj"] == parse("int8-g32-zp")
    assert kept.quantization.name.endswith(" + float)")
    flat = params_lib.flat_params(kept.state)
    assert params_lib.value_of(flat[("layers", 0, "mlp", "gate_proj", "weight")]).dtype == jnp.float32


def test_a_mixed_k_quant_model_gives_the_dequantized_float_models_logits(mixed):
    _, kept, floats = mixed
    logits = [_logits(floats), _logits(kept)]
    scale = np.abs(logits[0]).max()
    assert scale > 0.1  # the random model says something
    np.testing.assert_allclose(logits[1] / scale, logits[0] / scale, atol=1e-4)


def test_a_mixed_k_quant_model_over_two_devices_gives_the_single_device_logits(mixed):
    path, kept, _ = mixed
    mesh = make_mesh(tensor=2)
    sharded = _load(path, "gguf", mesh)
    value = params_lib.value_of(params_lib.flat_params(sharded.state)[("layers", 0, "attn", "v_proj", "values")])
    assert value.addressable_shards[0].data.size * 2 == value.size  # int8-g16 split like the others
    single = _logits(kept)
    np.testing.assert_allclose(_logits(sharded, mesh), single, atol=1e-5 * np.abs(single).max())


def test_a_mixed_k_quant_model_round_trips_through_orbax(mixed, tmp_path):
    _, kept, _ = mixed
    orbax_io.save(tmp_path / "q", kept)
    restored = loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False)
    assert restored.quantization == kept.quantization and restored.quantization.name == kept.quantization.name
    a, b = params_lib.flat_params(kept.state), params_lib.flat_params(restored.state)
    assert list(a) == list(b)
    for p in a:
        x, y = params_lib.value_of(a[p]), params_lib.value_of(b[p])
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))
    with pytest.raises(CheckpointError, match=r"holds gguf \(int4-g32-zp.*\) weights"):
        loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False, quantization="int8")
    # A record that says another scheme for one projection than its stored arrays hold: refused by name.
    meta = json.loads((tmp_path / "q" / orbax_io.MARKER).read_text())
    meta["projections"]["projections"]["layers.1.attn.v_proj"] = "int4-g32"
    (tmp_path / "q" / orbax_io.MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"quantized tensor layers.1.attn.v_proj.(values|scales) is"):
        loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False)


def test_a_truncated_k_quant_file_is_refused_naming_the_tensor(tmp_path):
    rng = np.random.default_rng(5)
    path = write_mixed_gguf(tmp_path / "t.gguf", rng)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated or corrupt .*blk.1.ffn_down.weight"):
        loader.load(tmp_path / "cut.gguf", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                    quantization="gguf")
