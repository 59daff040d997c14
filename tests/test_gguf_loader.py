"""checkpoints.gguf_loader: GGUF files written here with gguf-py, read back as HF tensors."""

import math
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from checkpoints.gguf_loader import (gguf_hf_tensors, gguf_model_config, gguf_tensor_count,
                                     open_gguf)
from jaxinfer.errors import CheckpointError, ConfigError

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 32, 48, 2, 4, 2


def llama_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def hf_weights(rng, head_dim=HIDDEN // HEADS, bias=False, qk_norm=False, tied=True, ffn=FFN):
    """Random HF-layout float32 weights of a tiny 2-layer GQA model."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    out = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": w(HIDDEN)}
    if not tied:
        out["lm_head.weight"] = w(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = w(HIDDEN)
        out[p + "post_attention_layernorm.weight"] = w(HIDDEN)
        out[p + "self_attn.q_proj.weight"] = w(HEADS * head_dim, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = w(KV_HEADS * head_dim, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = w(KV_HEADS * head_dim, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * head_dim)
        if bias:
            for n, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                out[p + f"self_attn.{n}_proj.bias"] = w(rows * head_dim)
        if qk_norm:
            out[p + "self_attn.q_norm.weight"] = w(head_dim)
            out[p + "self_attn.k_norm.weight"] = w(head_dim)
        out[p + "mlp.gate_proj.weight"] = w(ffn, HIDDEN)
        out[p + "mlp.up_proj.weight"] = w(ffn, HIDDEN)
        out[p + "mlp.down_proj.weight"] = w(HIDDEN, ffn)
    return out


# HF name suffix -> llama.cpp name suffix (written independently of the loader's table)
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def write_gguf(path, arch, weights, head_dim=None, quantize=(), extra=None, tensors=None):
    """Write `weights` (HF names) as llama.cpp would: permuted q/k for llama, given qtypes."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(weights["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, fn in (extra or {}).items():
        getattr(w, key)(fn)
    for hf, x in weights.items():
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            x = llama_permute(x, HEADS, HEADS if ".q_proj." in hf else KV_HEADS)
        name = gguf_name(hf)
        if name in quantize:
            w.add_tensor(name, gguf.quants.quantize(x, quantize[name]), raw_dtype=quantize[name])
        else:
            w.add_tensor(name, np.ascontiguousarray(x))
    for name, x in (tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def llama_weights():
    return hf_weights(np.random.default_rng(0))


def test_llama_tensors_round_trip_with_qk_permutation_undone(tmp_path, llama_weights):
    path = write_gguf(tmp_path / "llama.gguf", "llama", llama_weights)
    f = open_gguf(path)
    got = dict(gguf_hf_tensors(f))
    assert gguf_tensor_count(f) == len(got) == len(llama_weights)
    assert set(got) == set(llama_weights)
    for name, x in llama_weights.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_llama_config_from_metadata(tmp_path, llama_weights):
    f = open_gguf(write_gguf(tmp_path / "llama.gguf", "llama", llama_weights))
    cfg = gguf_model_config(f)
    assert f.architecture == "llama" and f.path == tmp_path / "llama.gguf"
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == \
        ("llama", VOCAB, HIDDEN, FFN)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        (LAYERS, HEADS, KV_HEADS, HIDDEN // HEADS)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0
    assert cfg.max_position_embeddings == 256 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.sliding_window is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert f.metadata["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert f.metadata["llama.block_count"] == LAYERS


def test_quantized_q_proj_is_unpermuted_dequantized_data(tmp_path, llama_weights):
    """A Q8_0 q/k weight comes back as gguf-py's dequantization with the row permutation undone."""
    qtypes = {"blk.0.attn_q.weight": T.Q8_0, "blk.1.attn_k.weight": T.Q4_0,
              "blk.0.ffn_up.weight": T.Q4_1}
    f = open_gguf(write_gguf(tmp_path / "q.gguf", "llama", llama_weights, quantize=qtypes))
    assert f.tensor_types["blk.0.attn_q.weight"] == "Q8_0"
    got = dict(gguf_hf_tensors(f))
    for gname, hf, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", HEADS),
                             ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", KV_HEADS),
                             ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", None)):
        t = f.tensors[gname]
        stored = gguf.quants.dequantize(t.data, t.tensor_type)
        back = llama_permute(got[hf], heads, heads) if heads else got[hf]
        np.testing.assert_allclose(back, stored, rtol=1e-6, atol=1e-7)
        # and it is close to the original (quantization error only)
        assert np.abs(got[hf] - llama_weights[hf]).max() < 0.5


def test_qwen2_with_bias_and_lm_head_is_not_permuted(tmp_path):
    weights = hf_weights(np.random.default_rng(1), bias=True, tied=False)
    f = open_gguf(write_gguf(tmp_path / "qwen2.gguf", "qwen2", weights,
                             extra={"add_sliding_window": 16}))
    cfg = gguf_model_config(f)
    assert cfg.architecture == "qwen2" and cfg.attention_bias and not cfg.tie_word_embeddings
    assert cfg.sliding_window == 16
    got = dict(gguf_hf_tensors(f))
    assert set(got) == set(weights)
    for name, x in weights.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_qwen3_qk_norm_and_explicit_head_dim(tmp_path):
    head_dim = 16  # != HIDDEN / HEADS, as in real Qwen3 configs
    weights = hf_weights(np.random.default_rng(2), head_dim=head_dim, qk_norm=True)
    f = open_gguf(write_gguf(tmp_path / "qwen3.gguf", "qwen3", weights, head_dim=head_dim))
    cfg = gguf_model_config(f)
    assert cfg.architecture == "qwen3" and cfg.qk_norm and cfg.head_dim == head_dim
    got = dict(gguf_hf_tensors(f))
    for name, x in weights.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def llama3_factors(factor, low, high, old_ctx, base, dim):
    """convert_hf_to_gguf.py's LlamaModel rope_freqs computation."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    head_dim = HIDDEN // HEADS * 8  # 64: enough frequencies to see the smooth band
    weights = hf_weights(np.random.default_rng(3), head_dim=head_dim)
    rf = llama3_factors(8.0, 1.0, 4.0, 8192, 500000.0, head_dim)
    f = open_gguf(write_gguf(tmp_path / "l3.gguf", "llama", weights, head_dim=head_dim,
                             extra={"add_rope_freq_base": 500000.0},
                             tensors={"rope_freqs.weight": rf}))
    cfg = gguf_model_config(f)
    s = cfg.rope_scaling
    assert (s.kind, s.factor, s.low_freq_factor, s.high_freq_factor,
            s.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
    got = dict(gguf_hf_tensors(f))
    assert set(got) == set(weights)  # rope_freqs is config, not a weight
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.weight"],
                                  weights["model.layers.1.self_attn.k_proj.weight"])


def test_linear_rope_scaling_from_metadata(tmp_path, llama_weights):
    f = open_gguf(write_gguf(tmp_path / "lin.gguf", "llama", llama_weights, extra={
        "add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": 2.0}))
    s = gguf_model_config(f).rope_scaling
    assert (s.kind, s.factor) == ("linear", 2.0)


def test_unknown_architecture_raises_config_error(tmp_path, llama_weights):
    f = open_gguf(write_gguf(tmp_path / "g.gguf", "gpt2", llama_weights))
    with pytest.raises(ConfigError, match="unknown architecture 'gpt2': jaxinfer supports "
                                          "llama, qwen2, qwen3"):
        gguf_model_config(f)


def test_unknown_tensor_name_raises_checkpoint_error(tmp_path, llama_weights):
    f = open_gguf(write_gguf(tmp_path / "x.gguf", "llama", llama_weights,
                             tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)}))
    with pytest.raises(CheckpointError, match="blk.0.mystery.weight"):
        next(gguf_hf_tensors(f))


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 a zip, not a gguf" * 4])
def test_wrong_magic_raises_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.gguf is not a GGUF file"):
        open_gguf(path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.02])
def test_truncated_file_raises_checkpoint_error(tmp_path, llama_weights, keep):
    """Cut in the tensor data, and in the header (metadata / tensor infos)."""
    path = write_gguf(tmp_path / "t.gguf", "llama", llama_weights)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as e:
        open_gguf(path)
    assert "t.gguf" in str(e.value) and "truncated" in str(e.value)


@pytest.mark.default_model
def test_default_model_loads_with_expected_config_and_tensors():
    from checkpoints.default_model import default_model_path
    start = time.perf_counter()
    f = open_gguf(default_model_path(progress=False))
    cfg = gguf_model_config(f)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
            cfg.num_kv_heads, cfg.vocab_size, cfg.head_dim) == ("llama", 30, 576, 9, 3, 49152, 64)
    assert cfg.tie_word_embeddings and cfg.intermediate_size == 1536
    count = gguf_tensor_count(f)
    tensors = dict(gguf_hf_tensors(f))
    elapsed = time.perf_counter() - start
    print(f"default model: {count} tensors opened and dequantized in {elapsed:.2f}s")
    assert len(tensors) == count == 272 and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    checks = [("token_embd.weight", "model.embed_tokens.weight", None),
              ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight", None),
              ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", None),
              ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", 9),
              ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", 3),
              ("output_norm.weight", "model.norm.weight", None)]
    for gname, hf, heads in checks:
        t = f.tensors[gname]
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = llama_permute(tensors[hf], heads, heads) if heads else tensors[hf]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=gname)
