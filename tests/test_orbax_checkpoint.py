"""jaxinfer's Orbax checkpoints: bit-identical round trip, restored into the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import loader, orbax_io
from jaxinfer import params as params_lib
from jaxinfer import sharding
from jaxinfer.errors import CheckpointError
from jaxinfer.sharding import make_mesh


@pytest.mark.parametrize("dtype,name", [(jnp.float32, "qwen2_bias"), (jnp.bfloat16, "qwen2_bias"),
                                        (jnp.bfloat16, "deepseek_v3")])  # MLA, experts, YaRN's config
def test_orbax_round_trip_is_bit_identical_and_sharded_by_the_rules(dtype, name, data_dir, tmp_path):
    original = loader.load(data_dir / "hf_tiny" / name, dtype=dtype, mesh=make_mesh(), progress=False)
    orbax_io.save(tmp_path / "ckpt", original)
    mesh = make_mesh(tensor=2, data=2)
    restored = loader.load(tmp_path / "ckpt", dtype=None, mesh=mesh, progress=False)
    assert restored.config == original.config
    before = params_lib.flat_params(original.state)
    after = params_lib.flat_params(restored.state)
    assert before.keys() == after.keys()
    for path, var in after.items():
        value = params_lib.value_of(var)
        expected = np.asarray(params_lib.value_of(before[path]))
        assert value.dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(value).view(np.uint8), expected.view(np.uint8))
        rule = sharding.logical_to_spec(params_lib.logical_axes(var), value.shape, mesh)
        assert value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, rule), value.ndim)
        assert len(value.sharding.device_set) == 4
    q_proj = ("layers", 0, "attn", "q_b_proj" if name == "deepseek_v3" else "q_proj", "weight")
    heads = params_lib.value_of(after[q_proj])
    assert heads.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)


def test_saving_into_a_non_empty_directory_is_refused(data_dir, tmp_path):
    loaded = loader.load(data_dir / "hf_tiny" / "qwen2_bias", dtype=jnp.float32, mesh=make_mesh(),
                         progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        orbax_io.save(tmp_path / "out", loaded)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
