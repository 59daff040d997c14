"""quantization="gguf" keeps a GGUF's quantized output head as stored, as llama.cpp runs it: an untied
output.weight as a QuantizedLinear `lm_head`, a tied token_embd.weight as a QuantizedEmbed (lookups
dequantize the rows they read; the head is the projections' quantized matmul). Checked against the
dequantized float model (quantization=None), over two devices, and through Orbax."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as T

from checkpoints import gguf_repack, loader, orbax_io
from jaxinfer import params as params_lib
from jaxinfer.layers.linear import QuantizedEmbed, QuantizedLinear
from jaxinfer.params import MixedQuantization
from jaxinfer.sharding import make_mesh
from tests.test_gguf_kquants import HEAD_DIM, HEADS, KV_HEADS, LAYERS, _load, _logits, kquant_bytes, \
    tiny_llama_writer

VOCAB, HIDDEN, FFN = 64, 256, 512
SHAPES = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
          "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}


def _q8_0(rng, shape, scale):
    return gguf.quants.quantize((rng.standard_normal(shape) * scale).astype(np.float32), T.Q8_0)


def write_head_gguf(path, rng, head_type, tied):
    """A 2-layer llama whose projections are Q8_0 and whose output head (token_embd where `tied`, else
    output.weight beside a float token_embd) is of `head_type` (Q8_0 or Q6_K)."""
    w = tiny_llama_writer(path)
    head = _q8_0(rng, (VOCAB, HIDDEN), 1.0) if head_type == T.Q8_0 else kquant_bytes(rng, T.Q6_K, VOCAB, HIDDEN)
    if tied:
        w.add_tensor("token_embd.weight", head, raw_dtype=head_type)
    else:
        w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
        w.add_tensor("output.weight", head, raw_dtype=head_type)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for short, shape in SHAPES.items():
            w.add_tensor(f"blk.{i}.{short}.weight", _q8_0(rng, shape, 0.05), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CASES = [(True, T.Q8_0), (True, T.Q6_K), (False, T.Q8_0), (False, T.Q6_K)]


def _id(case):
    tied, qtype = case
    return f"{'tied' if tied else 'untied'}-{qtype.name}"


@pytest.fixture(scope="module", params=CASES, ids=_id)
def head(request, tmp_path_factory):
    """(tied, head type, path, the model kept quantized, the dequantized float model)."""
    tied, qtype = request.param
    path = write_head_gguf(tmp_path_factory.mktemp("head") / "m.gguf", np.random.default_rng(int(qtype)), qtype, tied)
    return tied, qtype, path, _load(path, "gguf"), _load(path)


def test_the_output_head_is_kept_in_its_gguf_type_and_no_float_copy_is_held(head):
    tied, qtype, path, kept, _ = head
    module = "embed" if tied else "lm_head"
    q = kept.quantization
    assert isinstance(q, MixedQuantization) and q.scheme_for(module) == gguf_repack.scheme_of(qtype)
    assert q.scheme_for("layers.0.attn.q_proj") == gguf_repack.scheme_of(T.Q8_0)
    flat = params_lib.flat_params(kept.state)
    assert (module, "weight") not in flat
    values = params_lib.value_of(flat[(module, "values")])
    scales = params_lib.value_of(flat[(module, "scales")])
    g = q.scheme_for(module).group_size
    assert values.dtype == jnp.int8 and values.shape == (VOCAB, HIDDEN) and scales.shape == (HIDDEN // g, VOCAB)
    # The levels times their scales are gguf-py's own dequantization of the stored head.
    stored = next(t for t in gguf.GGUFReader(str(path)).tensors
                  if t.name == ("token_embd.weight" if tied else "output.weight"))
    want = gguf.quants.dequantize(stored.data, qtype).reshape(VOCAB, HIDDEN)
    got = np.asarray(values, np.float32).reshape(VOCAB, HIDDEN // g, g) * np.asarray(scales).T[:, :, None]
    np.testing.assert_array_equal(got.reshape(VOCAB, HIDDEN), want)
    model = nnx.merge(kept.graphdef, kept.state)
    if tied:
        assert isinstance(model.embed, QuantizedEmbed) and not hasattr(model, "lm_head")
    else:  # the input embedding stays the float table it is stored as
        assert isinstance(model.lm_head, QuantizedLinear)
        assert params_lib.value_of(flat[("embed", "weight")]).dtype == jnp.float32


def test_a_kept_head_gives_the_dequantized_float_models_logits_and_greedy_tokens(head):
    _, _, _, kept, floats = head
    want, got = _logits(floats), _logits(kept)
    scale = np.abs(want).max()
    assert scale > 0.1  # the random model says something
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_a_kept_head_over_two_devices_is_split_by_vocab_and_gives_the_single_device_logits(head):
    tied, _, path, kept, _ = head
    mesh = make_mesh(tensor=2)
    sharded = _load(path, "gguf", mesh)
    values = params_lib.value_of(params_lib.flat_params(sharded.state)[("embed" if tied else "lm_head", "values")])
    assert values.addressable_shards[0].data.shape == (VOCAB // 2, HIDDEN)
    single = _logits(kept)
    np.testing.assert_allclose(_logits(sharded, mesh), single, atol=1e-5 * np.abs(single).max())


def test_a_kept_head_round_trips_through_orbax(head, tmp_path):
    _, _, _, kept, _ = head
    orbax_io.save(tmp_path / "q", kept)
    restored = loader.load(tmp_path / "q", dtype=jnp.float32, mesh=make_mesh(), progress=False)
    assert restored.quantization == kept.quantization
    a, b = params_lib.flat_params(kept.state), params_lib.flat_params(restored.state)
    assert list(a) == list(b)
    for p in a:
        x, y = params_lib.value_of(a[p]), params_lib.value_of(b[p])
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(_logits(restored), _logits(kept))


def test_quantizing_on_load_keeps_the_head_float(head):
    """int8 quantizes the projections as they load; the head stays float, as vLLM keeps it."""
    tied, _, path, _, _ = head
    model = _load(path, "int8")
    flat = params_lib.flat_params(model.state)
    assert ("layers", 0, "attn", "q_proj", "values") in flat
    module = "embed" if tied else "lm_head"
    assert params_lib.value_of(flat[(module, "weight")]).dtype == jnp.float32 and (module, "values") not in flat
