"""Logical axis names -> mesh axes.

Every parameter and cache array is declared with logical axis names (`embed`,
`heads`, `mlp`, ...). One rules table maps those names onto the mesh axes
`data` and `tensor`; shardings are derived from it and never written by hand.
A dimension that the mesh axis does not divide is replicated instead (for
instance 3 KV heads on a tensor axis of 2): correct everywhere, a warning in the
log, since it costs memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "tensor")

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "tensor",  # routed experts: whole experts per device (expert parallelism, layers/moe.py)
    "expert_mlp": None,
    "pages": None,
    "seq_pages": "tensor",  # pools split by sequence over the devices (data-parallel MLA attention)
    "page": None,
}


def make_mesh(tensor: int = 1, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor) mesh over the first data*tensor devices."""
    devices = list(devices if devices is not None else jax.devices())
    need = data * tensor
    if tensor < 1 or data < 1:
        raise ConfigError(f"mesh sizes must be positive, got data={data} tensor={tensor}")
    if need > len(devices):
        raise ConfigError(f"a mesh of data={data} x tensor={tensor} needs {need} devices, "
                          f"but only {len(devices)} are visible")
    grid = np.array(devices[:need], dtype=object).reshape(data, tensor)
    processes = sorted({d.process_index for d in devices[:need]})
    local = [[d for d in devices[:need] if d.process_index == p] for p in processes]
    if data > 1 and len(processes) > 1 and len(local[0]) % tensor:
        # A multi-process run whose tensor axis is wider than a process's devices: every replica (row) over
        # every process, its tensor axis across them (a TPU slice's interconnect links them all). Where the
        # tensor axis fits, the rows above lie within one process each.
        if len({len(ds) for ds in local}) != 1 or len(local[0]) % data:
            raise ConfigError(f"data={data} replicas over {len(processes)} processes need the same number of "
                              f"devices in each process, a multiple of {data}")
        grid = np.array(local, dtype=object).reshape(len(processes), data, -1).transpose(1, 0, 2).reshape(data, tensor)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes on `mesh`.

    Refuses two logical axes mapped to the same mesh axis; replicates a dimension
    that its mesh axis does not divide.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    spec, used = [], {}
    for name, size in zip(logical_axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule")
        if mesh_axis is None or mesh.shape.get(mesh_axis, 1) == 1:
            spec.append(None)
            continue
        if mesh_axis in used:
            raise ValueError(f"logical axes {used[mesh_axis]!r} and {name!r} both map to mesh "
                             f"axis {mesh_axis!r} in one array")
        if size % mesh.shape[mesh_axis]:
            if size > 1:  # size 1: a per-channel scale's one group (row-parallel o, down), nothing to split
                log.warning("replicating logical axis %r (size %d) instead of splitting it over "
                            "mesh axis %r of size %d", name, size, mesh_axis, mesh.shape[mesh_axis])
            spec.append(None)
            continue
        used[mesh_axis] = name
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

