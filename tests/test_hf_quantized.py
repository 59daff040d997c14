"""HF checkpoints that come quantized (AWQ, GPTQ, compressed-tensors) load with their own scheme, stay
quantized, and give HF transformers' logits on the dequantized float model; corrupt or inconsistent
ones are refused naming the tensor.

Fixtures: scripts/make_quantized_fixtures.py (run with torch, transformers and compressed-tensors).
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints import loader, safetensors_loader
from jaxinfer.errors import CheckpointError
from jaxinfer.layers.param import value_of
from jaxinfer.params import flat_params
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from tests.paged_runs import teacher_forced_logits

# fixture -> the scheme it loads as
EXPECTED = {
    "awq_g32": "int4-g32-zp",
    "gptq_v1_sym_g32": "int4-g32",
    "gptq_v2_asym_g64": "int4-g64-zp",
    "gptq_act_order_g32": "int4-g32-zp-act",
    "gptq_int8_channel": "int8-ch",
    "ct_int4_asym_g32": "int4-g32-zp",
    "ct_w8a16_int8_g64": "int8-g64",
    "ct_w8a8_int8_channel": "int8-ch",
    "ct_fp8_dynamic_channel": "fp8",
    "ct_fp8_tensor": "fp8",
}
VALUE_DTYPES = {"int4": ml_dtypes.int4, "int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}


@pytest.fixture(autouse=True)
def float_exact_matmuls(monkeypatch):
    """The reference logits are float: matmuls take XLA's dequantize-then-dot, exact in float32. (A native
    CPU kernel, where one is built, quantizes the activations to int8 as llama.cpp does: its accuracy is
    tests/test_quantized_matmul.py's to check, the checkpoint's decoding this file's.)"""
    try:
        from pallas_kernels.quantized_matmul import cpu
    except ImportError:
        return
    monkeypatch.setattr(cpu, "supports", lambda *args: False)


def load(directory, **kw):
    return loader.load(directory, dtype=jnp.float32, mesh=make_mesh(), progress=False, **kw)


@pytest.fixture(scope="module")
def fixtures(data_dir) -> pathlib.Path:
    return data_dir / "hf_quantized"


@pytest.fixture(scope="module")
def runners() -> dict:
    """One ModelRunner per scheme: fixtures of one scheme have one parameter structure, so the next one's
    state runs through the step the first compiled (a compilation is most of each case's time)."""
    return {}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quantized_checkpoint_loads_quantized_and_matches_transformers(name, fixtures, runners):
    loaded = load(fixtures / name)
    assert loaded.quantization.name == EXPECTED[name]
    # Every projection holds its values in the scheme's dtype: nothing was expanded to floats.
    flat = {".".join(map(str, p)): value_of(v) for p, v in flat_params(loaded.state).items()}
    projections = [p for p in flat if p.startswith("layers.") and p.endswith("_proj.values")]
    assert len(projections) == 2 * 7
    assert not [p for p in flat if p.endswith("_proj.weight")]
    assert {flat[p].dtype for p in projections} == {np.dtype(VALUE_DTYPES[loaded.quantization.method])}
    if loaded.quantization.act_order:
        order = np.asarray(flat["layers.0.attn.q_proj.input_order"])
        assert sorted(order) == list(range(64)) and (order != np.arange(64)).any()

    ref = np.load(fixtures / name / "reference.npz")
    # One packed prefill over prompt + generation gives the logits at every position (causal).
    sequence = np.concatenate([ref["prompt_0"], ref["generated_0"][:-1]])
    runner = runners.get(loaded.quantization)
    if runner is None:
        runner = runners[loaded.quantization] = ModelRunner(loaded.config, loaded.graphdef, loaded.state, make_mesh(),
                                                            num_pages=16, page_size=4)
    runner.state = loaded.state
    (ours,) = teacher_forced_logits(runner, [sequence], [np.zeros(0, np.int32)])
    np.testing.assert_allclose(ours, ref["logits_0"][:-1], atol=1e-4, rtol=0)
    assert (ours[len(ref["prompt_0"]) - 1:].argmax(-1) == ref["generated_0"]).all()


def test_act_order_checkpoint_runs_with_tensor_parallelism(fixtures):
    """Over two devices (column- and row-parallel projections: q, k, v, gate, up split by outputs, o and
    down by inputs) each projection gathers the activations in its stored order too."""
    mesh = make_mesh(tensor=2)
    loaded = loader.load(fixtures / "gptq_act_order_g32", dtype=jnp.float32, mesh=mesh, progress=False)
    ref = np.load(fixtures / "gptq_act_order_g32" / "reference.npz")
    sequence = np.concatenate([ref["prompt_0"], ref["generated_0"][:-1]])
    runner = ModelRunner(loaded.config, loaded.graphdef, loaded.state, mesh, num_pages=16, page_size=4)
    (ours,) = teacher_forced_logits(runner, [sequence], [np.zeros(0, np.int32)])
    np.testing.assert_allclose(ours, ref["logits_0"][:-1], atol=1e-4, rtol=0)


def test_act_order_checkpoint_converts_to_orbax_and_back(fixtures, tmp_path):
    """`jaxinfer convert` keeps the scheme and each projection's input order."""
    from checkpoints import orbax_io

    loaded = load(fixtures / "gptq_act_order_g32")
    orbax_io.save(tmp_path / "converted", loaded)
    restored = load(tmp_path / "converted")
    assert restored.quantization == loaded.quantization
    before, after = flat_params(loaded.state), flat_params(restored.state)
    for path in [p for p in before if p[-1] in ("input_order", "values", "zeros")]:
        np.testing.assert_array_equal(np.asarray(value_of(after[path])), np.asarray(value_of(before[path])))


def test_explicit_quantization_must_be_the_checkpoints_own(fixtures):
    with pytest.raises(CheckpointError, match="holds awq weights, int4-g32-zp"):
        load(fixtures / "awq_g32", quantization="int8")
    assert load(fixtures / "gptq_v1_sym_g32", quantization="int4-g32").quantization.name == "int4-g32"


# --- bad input: small corrupt copies ---------------------------------------------------------------

_CODES = {np.dtype(v): k for k, v in safetensors_loader._DTYPES.items()}


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        data = np.ascontiguousarray(t).tobytes()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def corrupt(fixtures, tmp_path, name, *, tensors=None, quantization_config=None) -> pathlib.Path:
    """A copy of fixture `name` with its single safetensors file's tensors and its quantization_config
    edited by the functions given."""
    target = tmp_path / name
    shutil.copytree(fixtures / name, target)
    if tensors is not None:
        path = target / "model.safetensors"
        loaded = {n: np.array(t) for n, t in safetensors_loader.read_safetensors(path)}
        write_safetensors(path, tensors(loaded))
    if quantization_config is not None:
        config = json.loads((target / "config.json").read_text())
        quantization_config(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    return target


def edit(fn):
    def apply(d):
        fn(d)
        return d
    return apply


Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


def test_scale_shape_mismatch_is_refused_naming_the_tensor(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "awq_g32", tensors=edit(lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]})))
    with pytest.raises(CheckpointError, match=rf"{Q}\.scales has shape \(1, 64\).*needs \(2, 64\)"):
        load(path)
    path = corrupt(fixtures, tmp_path, "ct_int4_asym_g32",
                   tensors=edit(lambda t: t.update({f"{DOWN}.weight_scale": t[f"{DOWN}.weight_scale"][:, :3]})))
    with pytest.raises(CheckpointError, match=rf"{DOWN}\.weight_scale has shape \(64, 3\).*needs \(64, 4\)"):
        load(path)


def test_unknown_bit_width_is_refused_naming_the_tensor(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "gptq_v2_asym_g64", quantization_config=lambda q: q.update(bits=3))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\.\S+\.qweight: gptq gptq_v2 weights of 3 bits "
                                              r"are not supported"):
        load(path)


def test_group_that_does_not_divide_is_refused_naming_the_tensor(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "gptq_v1_sym_g32", quantization_config=lambda q: q.update(group_size=128))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.qweight: group size 128 does not divide its 64 "
                                              "input channels"):
        load(path)
    path = corrupt(fixtures, tmp_path / "g48", "gptq_v1_sym_g32", quantization_config=lambda q: q.update(group_size=48))
    with pytest.raises(CheckpointError, match=r"qweight: gptq gptq groups of 48 input channels are not supported"):
        load(path)


def test_linear_missing_a_part_is_refused_naming_it(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "gptq_v1_sym_g32", tensors=edit(lambda t: t.pop(f"{DOWN}.qzeros")))
    with pytest.raises(CheckpointError, match=rf"{DOWN}: a quantized Linear .* without {DOWN}\.qzeros"):
        load(path)


def test_zeros_that_contradict_sym_are_refused_naming_the_tensor(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "gptq_v2_asym_g64", quantization_config=lambda q: q.update(sym=True))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\.\S+\.qzeros: sym is set, but the zero of group"):
        load(path)


def test_act_order_groups_of_unequal_size_are_refused(fixtures, tmp_path):
    """g_idx is read from the shard that holds it; a group given one channel too many is named."""
    target = tmp_path / "act"
    shutil.copytree(fixtures / "gptq_act_order_g32", target)
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    path = target / index[f"{Q}.g_idx"]
    tensors = {n: np.array(t) for n, t in safetensors_loader.read_safetensors(path)}
    g_idx = tensors[f"{Q}.g_idx"]
    g_idx[np.flatnonzero(g_idx == 1)[0]] = 0
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match=rf"{Q}\.g_idx: group 0 has 33 input channels, not 32"):
        load(target)


def test_unsupported_quantization_configs_are_refused_by_name(fixtures, tmp_path):
    path = corrupt(fixtures, tmp_path, "awq_g32", quantization_config=lambda q: q.update(quant_method="bitsandbytes"))
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes' is not supported"):
        load(path)
    path = corrupt(fixtures, tmp_path / "v", "gptq_v1_sym_g32", quantization_config=lambda q: q.update(
        checkpoint_format="marlin"))
    with pytest.raises(CheckpointError, match="GPTQ checkpoint_format 'marlin' is not supported"):
        load(path)


def test_a_quantized_output_head_comes_as_floats():
    """GPTQ tools may quantize lm_head too; the model keeps its head in float, so it is dequantized
    (v2 sym, 4 bit: every level 9 over zero 8 with scale 0.5 is 0.5)."""
    from checkpoints import hf_quantized

    quant = hf_quantized.HFQuantization("gptq", "gptq_v2", 4, 32, True)
    nibbles = lambda v: np.int32(np.uint32(int(f"{v:x}" * 8, 16)).view(np.int32))  # noqa: E731
    tensors = [("lm_head.qweight", np.full((8, 16), nibbles(9), np.int32)),
               ("lm_head.qzeros", np.full((2, 2), nibbles(8), np.int32)),
               ("lm_head.scales", np.full((2, 16), 0.5, np.float16)),
               ("lm_head.g_idx", (np.arange(64) // 32).astype(np.int32))]
    scheme, stream = hf_quantized.kept_tensors(tensors, quant)
    assert scheme.name == "int4-g32"
    ((name, head),) = list(stream)
    assert name == "lm_head.weight" and head.dtype == np.float32 and head.shape == (16, 64)
    np.testing.assert_array_equal(head, 0.5)
