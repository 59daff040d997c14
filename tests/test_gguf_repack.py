"""GGUF Q8_0 / Q4_0 / Q4_1 weights kept quantized (checkpoints/gguf_repack.py, quantization="gguf"):
each block repacked level for level, checked against gguf-py's own dequantization, and a GGUF model
loaded that way holding the same weights as the dequantized load."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_gguf_loader import HIDDEN, gguf_name, hf_weights, write_gguf

from checkpoints import gguf_repack, loader
from jaxinfer import params as params_lib
from jaxinfer.errors import CheckpointError
from jaxinfer.sharding import make_mesh
from pallas_kernels.quantized_matmul import dequantize, parse

KEPT = [(T.Q8_0, "int8-g32"), (T.Q4_0, "int4-g32"), (T.Q4_1, "int4-g32-zp")]


@pytest.mark.parametrize("qtype,scheme", KEPT, ids=lambda v: getattr(v, "name", v))
def test_repacked_blocks_dequantize_to_gguf_pys_own_values(qtype, scheme):
    rng = np.random.default_rng(int(qtype))
    out, k = 40, 96
    x = rng.standard_normal((out, k)).astype(np.float32) * np.linspace(0.01, 3, out)[:, None]
    x[3, 32:64] = 0.75  # a block of one value: Q4_1 stores d = 0 there
    data = gguf.quants.quantize(x, qtype)
    qt = gguf_repack.repack(data, qtype, (out, k), name="w")
    assert qt.scheme == parse(scheme) and qt.values.shape == (out, k) and qt.scales.shape == (k // 32, out)
    want = gguf.quants.dequantize(data, qtype).reshape(out, k)
    got = np.asarray(dequantize(qt.values, qt.scales, qt.zeros, qt.scheme)).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - x).max() > 0  # it is the quantized weight, not the float one


def test_repack_names_the_tensor_it_cannot_keep():
    data = gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q8_0)
    with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight: GGUF type F16 is not kept"):
        gguf_repack.repack(data, T.F16, (4, 64), name="blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="w: Q8_0 tensor of shape \\[4, 96\\] needs"):
        gguf_repack.repack(data, T.Q8_0, (4, 96), name="w")
    with pytest.raises(CheckpointError, match="w: 48 input channels are not whole Q8_0 blocks"):
        gguf_repack.repack(data, T.Q8_0, (4, 48), name="w")


def _projections(weights, qtype):
    return {gguf_name(hf): qtype for hf in weights if hf.endswith("_proj.weight")}


@pytest.mark.parametrize("qtype,scheme", KEPT, ids=lambda v: getattr(v, "name", v))
def test_a_gguf_model_loads_with_its_own_quantization_and_holds_the_dequantized_weights(tmp_path, monkeypatch,
                                                                                     qtype, scheme):
    from jaxinfer.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "from_gguf_metadata", staticmethod(lambda metadata: None))  # ids only here
    weights = hf_weights(np.random.default_rng(1), ffn=64)  # every input width whole blocks of 32
    path = write_gguf(tmp_path / "m.gguf", "llama", weights, quantize=_projections(weights, qtype))
    mesh = make_mesh()
    kept = loader.load(path, dtype=jnp.float32, mesh=mesh, progress=False, quantization="gguf")
    floats = loader.load(path, dtype=jnp.float32, mesh=mesh, progress=False)
    assert kept.quantization == parse(scheme)
    fk, ff = params_lib.flat_params(kept.state), params_lib.flat_params(floats.state)
    projections = [p[:-1] for p in ff if p[-1] == "weight" and p[0] == "layers"]
    assert len(projections) == 2 * 7
    for p in projections:
        parts = [params_lib.value_of(fk[p + (n,)]) if p + (n,) in fk else None for n in ("values", "scales", "zeros")]
        w = np.asarray(dequantize(*parts, kept.quantization))  # [K, N]
        want = np.asarray(params_lib.value_of(ff[p + ("weight",)]))
        np.testing.assert_allclose(w.reshape(want.shape), want, rtol=1e-5, atol=1e-6, err_msg=str(p))


def test_a_file_mixing_kept_types_keeps_each_projection_in_its_own_scheme(tmp_path, monkeypatch):
    from jaxinfer.params import MixedQuantization, scheme_at
    from jaxinfer.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "from_gguf_metadata", staticmethod(lambda metadata: None))  # ids only here
    weights = hf_weights(np.random.default_rng(2), ffn=64)
    mixed = _projections(weights, T.Q4_1) | {"blk.1.ffn_down.weight": T.Q8_0}
    path = write_gguf(tmp_path / "mixed.gguf", "llama", weights, quantize=mixed)
    kept = loader.load(path, dtype=jnp.float32, mesh=make_mesh(), progress=False, quantization="gguf")
    floats = loader.load(path, dtype=jnp.float32, mesh=make_mesh(), progress=False)
    assert isinstance(kept.quantization, MixedQuantization) and kept.quantization.name == "gguf (int4-g32-zp, int8-g32)"
    fk, ff = params_lib.flat_params(kept.state), params_lib.flat_params(floats.state)
    projections = [p[:-1] for p in ff if p[-1] == "weight" and p[0] == "layers"]
    for p in projections:
        scheme = scheme_at(kept.quantization, p)
        assert scheme == parse("int8-g32" if p == ("layers", 1, "mlp", "down_proj") else "int4-g32-zp"), p
        parts = [params_lib.value_of(fk[p + (n,)]) if p + (n,) in fk else None for n in ("values", "scales", "zeros")]
        w = np.asarray(dequantize(*parts, scheme))  # [K, N]
        want = np.asarray(params_lib.value_of(ff[p + ("weight",)]))
        np.testing.assert_allclose(w.reshape(want.shape), want, rtol=1e-5, atol=1e-6, err_msg=str(p))


def test_gguf_quantization_refuses_files_with_no_kept_projection_and_other_files(tmp_path, data_dir):
    weights = hf_weights(np.random.default_rng(2), ffn=64)
    floats = write_gguf(tmp_path / "f32.gguf", "llama", weights)
    with pytest.raises(CheckpointError, match="this file has F32"):
        loader.load(floats, dtype=jnp.float32, mesh=make_mesh(), progress=False, quantization="gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        loader.load(data_dir / "hf_tiny" / "llama_gqa", dtype=jnp.float32, mesh=make_mesh(), progress=False,
                    quantization="gguf")
    assert HIDDEN % 32 == 0
