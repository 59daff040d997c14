"""Pure-JAX grouped matmul: the reference the kernels are checked against, and the tile plan they share.

A grouped matmul multiplies each row of x by the weight of its own group (an MoE's rows by their expert):
y[r] = x[r] @ w[group[r]]. Rows come in any order; a row whose group is G (the number of groups) belongs
to none and gives zeros, as rows past every group do in `jax.lax.ragged_dot`.

`plan` lays the rows out for a kernel that reads each group's weight once per tile of `tile_m` rows:
every group's rows packed into whole tiles, the tiles one after another ([tiles * tile_m] slots). The
number of tiles is data-dependent, so the layout holds the most any routing can need,
min(G, R) + R // tile_m; tiles past the routing's own are marked with group G and skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TILE_MS = (8, 16, 32, 64, 128)  # rows per tile: wgmma's N on the GPU, so a multiple of 8 up to 256


def grouped_matmul(x: jax.Array, w: jax.Array, group: jax.Array) -> jax.Array:
    """x [R, K] times w [G, K, N], row r by w[group[r]] (group [R] int32; G means none): [R, N] float32.
    Dense and obviously right: every row gathers its own weight."""
    num_groups = w.shape[0]
    held = group < num_groups
    rows_w = w[jnp.where(held, group, 0)].astype(jnp.float32)
    y = jnp.einsum("rk,rkn->rn", x.astype(jnp.float32), rows_w, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(held[:, None], y, 0.0)


def tile_rows(rows: int, num_groups: int) -> int:
    """Rows per tile for R rows over G groups: the smallest tile holding the mean group's rows. From the H200
    sweep at DeepSeek-V2-Lite's experts (scripts/probe_moe_layer.py): 8 at T = 64 tokens (6 rows a group)
    beat 16 by 3 to 5%, and 32 at T = 256 (24 rows) beat 64 by 15%; each tile reads its group's whole weight,
    but the wasted rows of larger tiles cost more than the few groups that spill into a second tile."""
    mean = rows / max(1, min(num_groups, rows))
    return next((t for t in TILE_MS if t >= mean), TILE_MS[-1])


def max_tiles(rows: int, num_groups: int, tile_m: int) -> int:
    """The most tiles any routing of R rows over G groups needs: a group of s > 0 rows takes
    1 + (s - 1) // tile_m tiles, and at most min(G, R) groups are not empty."""
    return min(num_groups, rows) + rows // tile_m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each row goes in the tiled layout, and each tile's group.

    tile_group [W]          the group of tile w (G: a tile past the routing's, to skip)
    slot_of_row [R]         row r's slot (tile * tile_m + place), or W * tile_m for a row of no group
    row_of_slot [W * tile_m] the row in each slot, or R for a slot no row fills
    """

    tile_group: jax.Array
    slot_of_row: jax.Array
    row_of_slot: jax.Array
    tile_m: int = dataclasses.field(metadata=dict(static=True))

    def gather(self, x: jax.Array) -> jax.Array:
        """x [R, ...] laid out in slots [W * tile_m, ...]; empty slots hold zeros."""
        return jnp.take(x, self.row_of_slot, axis=0, mode="fill", fill_value=0)

    def scatter(self, y: jax.Array) -> jax.Array:
        """Slots [W * tile_m, ...] back to rows [R, ...]; rows of no group get zeros."""
        return jnp.take(y, self.slot_of_row, axis=0, mode="fill", fill_value=0)


def plan(group: jax.Array, num_groups: int, tile_m: int | None = None) -> Plan:
    """The tiled layout for rows whose groups are `group` [R] int32 (values 0..G, G for none). A few small
    XLA ops: a stable sort by group, counts and cumulative sums; no loop."""
    rows = group.shape[0]
    tile_m = tile_m or tile_rows(rows, num_groups)
    w = max_tiles(rows, num_groups, tile_m)
    group = group.astype(jnp.int32)
    sizes = jnp.bincount(group, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes  # each group's first row in sorted order
    order = jnp.argsort(group, stable=True)
    sorted_group = group[order]
    held_sorted = sorted_group < num_groups
    safe = jnp.where(held_sorted, sorted_group, 0)
    rank = jnp.arange(rows, dtype=jnp.int32) - starts[safe]  # place within its group
    tiles = -(-sizes // tile_m)
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    slot_sorted = (tile_starts[safe] + rank // tile_m) * tile_m + rank % tile_m
    slot_sorted = jnp.where(held_sorted, slot_sorted, w * tile_m)
    slot_of_row = jnp.zeros((rows,), jnp.int32).at[order].set(slot_sorted)
    row_of_slot = jnp.full((w * tile_m,), rows, jnp.int32).at[slot_sorted].set(order.astype(jnp.int32), mode="drop")
    # A tile's group: how many groups' tiles end at or before it (compare-all: no XLA while loop).
    index = jnp.arange(w, dtype=jnp.int32)
    tile_group = (index[:, None] >= tile_ends[None, :]).sum(axis=1).astype(jnp.int32)
    return Plan(tile_group=tile_group, slot_of_row=slot_of_row, row_of_slot=row_of_slot, tile_m=tile_m)


def grouped_matmul_tiled(x_tiles: jax.Array, w: jax.Array, tile_group: jax.Array, tile_m: int) -> jax.Array:
    """What a kernel computes on the tiled layout, in XLA: x_tiles [W * tile_m, K] times each tile's
    weight w[tile_group[t]] ([G, K, N]): [W * tile_m, N] float32 (tiles of group G give zeros)."""
    num_groups = w.shape[0]
    group = jnp.repeat(tile_group, tile_m)
    return grouped_matmul(x_tiles, w, jnp.where(group < num_groups, group, num_groups))
