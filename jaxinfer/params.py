"""Parameters as data: the NNX state of a model family, split once.

The model is built abstractly (no memory) to learn every parameter's
declaration (jaxinfer/layers/param.py): path, shape, dtype, logical axes and
init. Arrays are then created or loaded straight into the sharding the rules
table gives them, each in its declared dtype. The runtime holds (graphdef,
state) and merges them only while tracing the jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfer import sharding
from jaxinfer.errors import CheckpointError
from jaxinfer.layers import param as param_lib
from jaxinfer.layers.linear import quantize_model
from jaxinfer.layers.param import initial_value, value_of
from jaxinfer.models import ModelConfig, family
from pallas_kernels.quantized_matmul import QuantScheme, quantize

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MixedQuantization:
    """A scheme per projection, for a checkpoint that quantizes its projections differently (a GGUF
    Q4_K_M file: most Q4_K, some attn_v and ffn_down Q6_K). `projections` pairs each projection's module
    path ("layers.0.attn.v_proj") with the scheme it is held in, or None where it stays a float Linear (a
    GGUF type no scheme holds exactly, Q3_K say, dequantized). A projection not listed stays float too.
    The output head is listed where the checkpoint keeps it quantized: "lm_head", or "embed" where the head
    is the tied embedding (a QuantizedEmbed, layers/linear.py).

    Wherever a model's quantization is taken (abstract_model, place_params, the Orbax format, the model's
    reported quantization) this stands beside a single QuantScheme, which keeps its own path."""

    projections: tuple[tuple[str, QuantScheme | None], ...]
    label: str = "mixed"  # where the schemes come from: "gguf"

    @functools.cached_property
    def _by_path(self) -> dict[str, QuantScheme | None]:
        return dict(self.projections)

    def scheme_for(self, path) -> QuantScheme | None:
        """The scheme of the projection at `path` (a module path: dotted, or a tuple of keys), None: float."""
        return self._by_path.get(path if isinstance(path, str) else ".".join(map(str, path)))

    @property
    def schemes(self) -> tuple[QuantScheme, ...]:
        """The distinct schemes, most used first."""
        counts: dict[QuantScheme, int] = {}
        for _, scheme in self.projections:
            if scheme is not None:
                counts[scheme] = counts.get(scheme, 0) + 1
        return tuple(sorted(counts, key=lambda s: -counts[s]))

    @property
    def name(self) -> str:
        """For reports (GetModelInfo, logs): "gguf (int4-g32-zp, int8-g16)", "+ float" where some stay float."""
        floats = any(scheme is None for _, scheme in self.projections)
        return f"{self.label} ({', '.join(s.name for s in self.schemes)}{' + float' if floats else ''})"

    def to_json(self) -> dict:
        return {"label": self.label, "projections": {p: None if s is None else s.name for p, s in self.projections}}

    @classmethod
    def from_json(cls, data: dict) -> "MixedQuantization":
        """The inverse of to_json; a ValueError names a bad entry."""
        from pallas_kernels.quantized_matmul import parse

        return cls(tuple((str(p), parse(s)) for p, s in data["projections"].items()), str(data.get("label", "mixed")))


def scheme_at(quantization, path) -> QuantScheme | None:
    """The scheme of the projection at module path `path` under a model's quantization (None, a QuantScheme
    for all, or a MixedQuantization)."""
    if quantization is None or isinstance(quantization, QuantScheme):
        return quantization
    return quantization.scheme_for(path)


def abstract_model(cfg: ModelConfig, dtype, quantization: QuantScheme | MixedQuantization | None = None
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs) without allocating anything. `dtype` is the
    compute dtype; each parameter's own dtype is what its declaration says. With
    `quantization`, the projections are QuantizedLinear (layers/linear.py), each in its own scheme
    where it is a MixedQuantization."""
    with param_lib.abstract():
        model = family(cfg).Model(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if quantization is not None:
            quantize_model(model, quantization, dtype=dtype, rngs=nnx.Rngs(0))
    return nnx.split(model)


def fit_quantization(cfg: ModelConfig, dtype, scheme: QuantScheme | None) -> QuantScheme | None:
    """`scheme` for this model: an int8 or int4 whose group was not asked for takes the largest
    of 128, 64 and 32 that divides every projection (logged); otherwise `scheme` as it is."""
    if not isinstance(scheme, QuantScheme) or not scheme.fit_group:
        return scheme
    for group in (128, 64, 32):
        fitted = QuantScheme(scheme.method, group, scheme.zero_points)
        try:
            abstract_model(cfg, dtype, fitted)
        except ValueError as e:
            reason = e
            continue
        if group != scheme.group_size:
            log.info("quantization %s: group size %d (%s)", scheme.method, group, reason)
        return fitted
    return QuantScheme(scheme.method, scheme.group_size, scheme.zero_points)  # refused by name where it loads


def flat_params(state: nnx.State) -> dict[tuple, Any]:
    """path -> nnx.Param (value and metadata) for every parameter."""
    return dict(nnx.to_flat_state(state))


def logical_axes(variable) -> tuple:
    return tuple(variable.get_metadata()["logical_axes"])


def param_shardings(state: nnx.State, mesh: Mesh) -> dict[tuple, NamedSharding]:
    return {path: sharding.named_sharding(logical_axes(v), value_of(v).shape, mesh)
            for path, v in flat_params(state).items()}


def _with_values(state: nnx.State, values: dict[tuple, jax.Array]) -> nnx.State:
    flat = flat_params(state)
    for path, v in flat.items():
        flat[path] = v.replace(values[path])
    return nnx.from_flat_state(flat)


def kernel_layouts(state: nnx.State) -> nnx.State:
    """For the CPU: the scales and zero points of int8 and int4 projections placed in the layout the native
    kernel reads (output-major, pallas_kernels/quantized_matmul/cpu.py); the same values and shardings, and
    every other parameter as it is."""
    from pallas_kernels.quantized_matmul import cpu

    flat = flat_params(state)
    values = {}
    for path, v in flat.items():
        x = value_of(v)
        levels = flat.get(path[:-1] + ("values",))
        if (path[-1] in ("scales", "zeros") and x.ndim == 2 and levels is not None
                and jnp.issubdtype(value_of(levels).dtype, jnp.integer)):
            x = cpu.kernel_layout(x)
        values[path] = x
    return _with_values(state, values)


def place_params(cfg: ModelConfig, dtype, mesh: Mesh, tensors: Iterable[tuple[tuple, np.ndarray]],
                 quantization: QuantScheme | MixedQuantization | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Load host arrays (our layout) onto the mesh, one tensor at a time, each cast to its
    parameter's declared dtype. With `quantization`, a projection's float weight is quantized
    on the host as it arrives (or comes quantized already, a QuantizedTensor of its projection's
    scheme): only its values and scales reach the device."""
    try:
        graphdef, state = abstract_model(cfg, dtype, quantization)
    except ValueError as e:  # a projection the scheme cannot hold, named
        if quantization is None:
            raise
        raise CheckpointError(f"cannot quantize this model with {quantization.name}: {e}") from None
    flat = flat_params(state)
    shardings = param_shardings(state, mesh)
    values = {}
    for path, array in tensors:
        parent = path[:-1]
        if path not in flat and path[-1] == "weight" and parent + ("values",) in flat:
            name = ".".join(map(str, path))
            scheme = scheme_at(quantization, parent)
            if hasattr(array, "parts"):  # it came quantized (checkpoints/quantized_tensor.py)
                if array.scheme != scheme:
                    held = (f"the model's projection {scheme.name}" if isinstance(quantization, MixedQuantization)
                            else f"the model's projections {scheme.name}")
                    raise CheckpointError(f"tensor {name} is {array.scheme.name}, {held}")
                parts = array.parts()
            else:
                n = value_of(flat[parent + ("scales",)]).shape[1]
                host = np.asarray(array, np.float32)
                if host.size % n:
                    raise CheckpointError(f"tensor {name} has shape {tuple(host.shape)}, which does not hold "
                                          f"{n} outputs")
                try:
                    parts = quantize(host.reshape(host.size // n, n), scheme)
                except ValueError as e:
                    raise CheckpointError(f"tensor {name}: {e}") from None
                if scheme.act_order:  # a float weight among act-order ones: its channels in order
                    parts["input_order"] = np.arange(host.size // n, dtype=np.int32)
            for key, part in parts.items():
                declared = value_of(flat[parent + (key,)])
                if tuple(part.shape) != tuple(declared.shape):
                    raise CheckpointError(f"tensor {name} quantizes to {key} of shape {tuple(part.shape)}, "
                                          f"the config implies {tuple(declared.shape)}")
                values[parent + (key,)] = jax.device_put(part, shardings[parent + (key,)])
            continue
        if path not in flat:
            raise CheckpointError(f"checkpoint has a tensor for {'.'.join(map(str, path))}, "
                                  "which this model does not have")
        if hasattr(array, "parts"):
            raise CheckpointError(f"tensor {'.'.join(map(str, path))} comes quantized ({array.scheme.name}); "
                                  "the model holds it in float")
        declared = value_of(flat[path])
        if tuple(array.shape) != tuple(declared.shape):
            raise CheckpointError(f"tensor {'.'.join(map(str, path))} has shape "
                                  f"{tuple(array.shape)}, the config implies {tuple(declared.shape)}")
        host = np.asarray(array)
        if host.dtype != declared.dtype:
            host = host.astype(declared.dtype)
        values[path] = jax.device_put(host, shardings[path])
    missing = [".".join(map(str, p)) for p in flat if p not in values]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint lacks tensors for: {shown}")
    return graphdef, _with_values(state, values)


def dummy_params(cfg: ModelConfig, dtype, mesh: Mesh, seed: int = 0, quantization: QuantScheme | None = None
                 ) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights made directly on the devices, in their shardings (for benchmarks):
    each parameter as its declaration's init says (norm scales ones, biases zeros, quantized
    values random levels under fixed scales, the rest small normals), in its declared dtype."""
    graphdef, state = abstract_model(cfg, dtype, fit_quantization(cfg, dtype, quantization))
    flat = flat_params(state)
    shardings = param_shardings(state, mesh)
    values, makers = {}, {}  # one compiled maker per distinct declaration (9, not 291, for an 8B)
    for i, (path, v) in enumerate(flat.items()):
        meta, declared = v.get_metadata(), value_of(v)
        kind = (meta["init"], meta["init_scale"], tuple(declared.shape), declared.dtype, shardings[path])
        if kind not in makers:
            def make(key, init=meta["init"], scale=meta["init_scale"], shape=declared.shape,
                     dtype=declared.dtype):
                return initial_value(init, key, shape, dtype, scale)
            makers[kind] = jax.jit(make, out_shardings=shardings[path])
        values[path] = makers[kind](jax.random.key(seed * 100003 + i))
    return graphdef, _with_values(state, values)


def num_params(state: nnx.State) -> int:
    return sum(int(np.prod(value_of(v).shape)) for v in flat_params(state).values())


def param_bytes(state: nnx.State) -> int:
    return sum(int(np.prod(value_of(v).shape)) * value_of(v).dtype.itemsize
               for v in flat_params(state).values())
