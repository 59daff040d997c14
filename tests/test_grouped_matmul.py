"""pallas_kernels/grouped_matmul: the tile plan, the Mosaic GPU kernel in interpret mode and its CUDA lowering,
and the ragged_dot path, each against the dense reference (every row times its own group's weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul_many, plan, reference
from pallas_kernels.grouped_matmul.reference import max_tiles, tile_rows


def _routing(rng, rows, groups, none_share=0.2):
    """Group ids with some empty groups, some crowded ones and rows of no group (id G)."""
    crowded = rng.choice(groups, size=max(1, groups // 3), replace=False)
    ids = np.where(rng.random(rows) < 0.5, rng.choice(crowded, rows), rng.integers(0, groups, rows))
    return jnp.asarray(np.where(rng.random(rows) < none_share, groups, ids), jnp.int32)


@pytest.mark.parametrize("rows,groups,tile_m", [(1, 8, 8), (6, 64, 8), (40, 8, 16), (200, 16, 8), (384, 64, 16),
                                                (37, 4, 32)])
def test_the_plan_puts_each_row_in_one_slot_of_a_tile_of_its_own_group(rows, groups, tile_m):
    rng = np.random.default_rng(rows + groups)
    group = _routing(rng, rows, groups)
    p = jax.jit(plan, static_argnums=(1, 2))(group, groups, tile_m)
    tile_group, slot_of_row, row_of_slot = (np.asarray(a) for a in (p.tile_group, p.slot_of_row, p.row_of_slot))
    g = np.asarray(group)
    w = max_tiles(rows, groups, tile_m)
    assert tile_group.shape == (w,) and row_of_slot.shape == (w * tile_m,)
    held = g < groups
    # Each held row: one slot, in a tile of its group, and the slot names it back; the rest point past the slots.
    assert (slot_of_row[~held] == w * tile_m).all()
    slots = slot_of_row[held]
    assert len(set(slots.tolist())) == held.sum()
    assert (tile_group[slots // tile_m] == g[held]).all()
    assert (row_of_slot[slots] == np.flatnonzero(held)).all()
    # Every other slot is empty; tiles are as few as the groups' sizes allow, and the rest are skipped (G).
    assert ((row_of_slot == rows) == ~np.isin(np.arange(w * tile_m), slots)).all()
    need = sum(-(-int((g == e).sum()) // tile_m) for e in range(groups))
    assert (tile_group < groups).sum() == need and (tile_group[need:] == groups).all()
    assert (np.diff(tile_group) >= 0).all()


def test_the_tile_grows_with_the_rows_each_group_gets():
    assert tile_rows(1 * 6, 64) == 8  # decode, one token: a row per expert
    assert tile_rows(64 * 6, 64) == 8  # 6 rows per expert on average
    assert tile_rows(256 * 6, 64) == 32
    assert tile_rows(1024 * 6, 64) == 128
    assert tile_rows(4096 * 6, 8) == 128  # the largest tile


def _weights(rng, groups, k, ns, dtype=jnp.bfloat16):
    return tuple(jnp.asarray(rng.standard_normal((groups, k, n)) / np.sqrt(k), dtype) for n in ns)


@pytest.mark.parametrize("rows,groups,k,ns", [(1, 8, 128, (64,)), (23, 6, 192, (128, 64)), (40, 8, 256, (64, 192))])
def test_the_gpu_kernel_matches_the_reference_in_gpu_interpret_mode(rows, groups, k, ns):
    """Ragged groups, empty groups, rows of no group (zeros), K of 64-channel steps, and two weights
    (gate and up) of different widths on one grid."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rng = np.random.default_rng(rows * k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    weights = _weights(rng, groups, k, ns)
    group = _routing(rng, rows, groups)
    got = grouped_matmul_many(x, weights, group, interpret=plgpu.InterpretGPUParams())
    for y, w in zip(got, weights):
        want = np.asarray(reference(x, w, group))
        assert y.shape == want.shape and y.dtype == jnp.bfloat16
        # bf16 out: within half a bf16 step of the largest value.
        np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=np.abs(want).max() * 2 ** -8)
        assert (np.asarray(y)[np.asarray(group) == groups] == 0).all()


def test_the_ragged_dot_path_matches_the_reference_in_float32():
    rng = np.random.default_rng(3)
    rows, groups, k = 50, 7, 96
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    weights = _weights(rng, groups, k, (40, 24), jnp.float32)
    group = _routing(rng, rows, groups)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(grouped_matmul_many)(x, weights, group)
    for y, w in zip(got, weights):
        np.testing.assert_allclose(np.asarray(y), np.asarray(reference(x, w, group)), atol=1e-5)


def test_the_entry_point_lowers_to_the_mosaic_gpu_kernel_for_cuda_with_bf16_weights_only():
    """DeepSeek-V2-Lite's experts (64 of 2048 x 1408) at decode and prefill sizes take the kernel; float32
    weights, and widths the kernel does not tile, take ragged_dot."""
    from jax import export

    def lowered(rows, k, n, dtype):
        args = (jax.ShapeDtypeStruct((rows, k), dtype), jax.ShapeDtypeStruct((rows,), jnp.int32),
                jax.ShapeDtypeStruct((64, k, n), dtype), jax.ShapeDtypeStruct((64, k, n), dtype))
        exported = export.export(jax.jit(lambda x, g, a, b: grouped_matmul_many(x, (a, b), g)),
                                 platforms=["cuda"])(*args)
        assert [a.shape for a in exported.out_avals] == [(rows, n)] * 2
        return "custom_call @mosaic_gpu" in exported.mlir_module()

    assert lowered(6, 2048, 1408, jnp.bfloat16)
    assert lowered(384, 1408, 2048, jnp.bfloat16)
    assert lowered(6144, 2048, 1408, jnp.bfloat16)
    assert not lowered(6, 2048, 1408, jnp.float32)
    assert not lowered(6, 2048, 1400, jnp.bfloat16)


def test_the_gpu_kernel_says_which_shapes_it_does_not_take():
    from pallas_kernels.grouped_matmul import gpu

    x = jnp.zeros((8, 256), jnp.bfloat16)
    assert gpu.supports(x, jnp.zeros((4, 256, 128), jnp.bfloat16)) is None
    assert "bf16" in gpu.supports(x, jnp.zeros((4, 256, 128), jnp.float32))
    assert "N = 100" in gpu.supports(x, jnp.zeros((4, 256, 100), jnp.bfloat16))
    with pytest.raises(ValueError, match="not 2 tiles of 8"):
        gpu.grouped_matmul_many(jnp.zeros((24, 256), jnp.bfloat16), (jnp.zeros((4, 256, 128), jnp.bfloat16),),
                                jnp.zeros((2,), jnp.int32), tile_m=8)


def test_an_expert_mlp_on_one_layout_of_the_rows_matches_the_reference_on_the_gpu_kernel_and_ragged_dot():
    """grouped_swiglu (what the MoE layer calls): the GPU kernel in interpret mode and the ragged_dot path give
    silu(x gate) * (x up) times down, each row by its own group's weights, rows of no group zero."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.grouped_matmul import grouped_swiglu

    rng = np.random.default_rng(7)
    rows, groups, k, inner = 21, 6, 128, 64
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    gate, up = _weights(rng, groups, k, (inner, inner))
    (down,) = _weights(rng, groups, inner, (k,))
    group = _routing(rng, rows, groups)
    g, u = reference(x, gate, group), reference(x, up, group)
    h = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
    want = np.asarray(reference(h, down, group))
    for got in (grouped_swiglu(x, gate, up, down, group, interpret=plgpu.InterpretGPUParams()),
                jax.jit(grouped_swiglu)(x, gate, up, down, group)):
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=np.abs(want).max() * 2 ** -6)
        assert (np.asarray(got)[np.asarray(group) == groups] == 0).all()
