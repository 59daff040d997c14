"""The one matmul entry point: every projection of every model goes through `einsum`.

A weight is a float array or a `QuantizedWeight` (int8/int4/fp8 values plus per-channel
or per-group scales, pallas_kernels/quantized_matmul). `QuantizedLinear` holds the
latter as parameters of their own dtypes; `quantize_model` swaps it in for each
`Linear` of a built model, so the model files never change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.layers.param import param, value_of
from pallas_kernels.quantized_matmul import QuantScheme, quantized_matmul_many

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A projection's weight [K, N] quantized: values [N, K], scales [K // g, N] (see
    pallas_kernels/quantized_matmul/reference.py);
    `out_shape` is its output axes' shape, N their product. An act-order scheme's weight also holds
    `input_order` [K] int32: its stored input channel j is x's channel input_order[j]."""

    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    scheme: QuantScheme = dataclasses.field(metadata={"static": True})
    out_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    axes: tuple = dataclasses.field(default=(None, None), metadata={"static": True})  # logical (input, output)
    input_order: jax.Array | None = None


def einsum(equation: str, x: jax.Array, weight, *, preferred_element_type=None) -> jax.Array:
    """`x` times `weight` as `equation` says, e.g. "te,ehd->thd" (activations first).

    weight: a float array, or a QuantizedWeight (then the equation contracts x's trailing
    axes with the weight's leading ones, as every projection's does). The result is in the
    promoted dtype of x and weight (x's, for a quantized one) unless `preferred_element_type`
    asks for another (the logits ask for float32)."""
    if isinstance(weight, jax.Array):
        try:
            contracted, _ = split_equation(equation)
        except ValueError:  # not a projection (the tied head's "te,ve->tv")
            return jnp.einsum(equation, x, weight, preferred_element_type=preferred_element_type)
        # One 2-D matmul over the merged axes (bitcasts of both operands): left to itself, XLA on the
        # CPU matched a multi-axis contraction to the activations' layout by transposing the weight,
        # a copy of o_proj's weight in every layer of every step.
        nk = len(contracted)
        lead, k = x.shape[:x.ndim - nk], math.prod(weight.shape[:nk])
        y = jnp.dot(x.reshape(-1, k), weight.reshape(k, -1), preferred_element_type=preferred_element_type)
        return y.reshape(*lead, *weight.shape[nk:])
    if isinstance(weight, QuantizedWeight):
        contracted, _ = split_equation(equation)
        lead = x.shape[:x.ndim - len(contracted)]
        k = math.prod(x.shape[len(lead):])
        (y,) = _matmuls(x.reshape(-1, k), [weight], out_dtype=preferred_element_type or x.dtype)
        return y.reshape(*lead, *weight.out_shape)
    raise TypeError(f"no matmul for a weight of type {type(weight).__name__}")


def split_equation(equation: str) -> tuple[str, str]:
    """(contracted, output) axes of a projection's weight: "te,ehd->thd" gives ("e", "hd").
    Refuses an equation whose weight is not its contracted axes then its output axes, with
    x ending in the contracted ones."""
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(c for c in ws if c not in out)
    produced = ws[len(contracted):]
    if ws != contracted + produced or not xs.endswith(contracted) or out != xs[:-len(contracted)] + produced:
        raise ValueError(f"{equation!r} is not a projection (x[..., in] times w[in, out])")
    return contracted, produced


def project(x: jax.Array, *linears) -> tuple[jax.Array, ...]:
    """`x` through several projections that read it (q, k and v; gate and up), as each would alone.
    Quantized alike (one scheme, the same input axes, no bias), they take one kernel launch on the GPU:
    fewer launches a step, and the narrow ones (k, v) share the SMs with the wide."""
    first = linears[0]
    # Act-order weights each gather x's channels in their own order: never fused.
    if not all(isinstance(lin, QuantizedLinear) and lin.bias is None and lin.scheme == first.scheme
               and not lin.scheme.act_order
               and lin.preferred_element_type == first.preferred_element_type
               and split_equation(lin.equation)[0] == split_equation(first.equation)[0] for lin in linears):
        return tuple(lin(x) for lin in linears)
    nk = len(split_equation(first.equation)[0])
    lead = x.shape[:x.ndim - nk]
    ys = _matmuls(x.reshape(math.prod(lead), -1), [lin.quantized_weight() for lin in linears],
                  out_dtype=first.preferred_element_type or x.dtype)
    return tuple(y.reshape(*lead, *lin.out_shape) for y, lin in zip(ys, linears))


def _matmuls(x: jax.Array, weights: list[QuantizedWeight], *, out_dtype) -> list[jax.Array]:
    """x [M, K] times quantized weights of one scheme (one kernel launch for several on the GPU).

    A Pallas kernel is one custom call that XLA cannot split: traced under a mesh with a `tensor` axis
    (attention.on_mesh, as the runner traces its step), the kernels run inside `shard_map`, each device on
    its own slice of the weights. Column-parallel weights (outputs sharded: q, k, v, gate, up) give each
    device its outputs; row-parallel ones (inputs sharded: o, down) give each a partial sum, added across
    devices. A slice must hold whole scale groups; where it does not, the call is left to XLA's partitioner
    (which replicates it) with a warning naming the sizes."""
    from jaxinfer.layers import attention

    if any(w.input_order is not None for w in weights):
        # Act-order: x's columns gathered into each weight's stored order, after which the weight is a plain
        # grouped one (the kernels never see the order). Under tensor parallelism the gather is XLA's (it
        # gathers a sharded x whole); the matmul after it splits as any other.
        return [y for w in weights for y in _matmuls(
            jnp.take(x, w.input_order, axis=1),
            [dataclasses.replace(w, input_order=None, scheme=dataclasses.replace(w.scheme, act_order=False))],
            out_dtype=out_dtype)]
    scheme = weights[0].scheme

    def call(x, *leaves):
        return quantized_matmul_many(x, [leaves[i:i + 3] for i in range(0, len(leaves), 3)], scheme,
                                     out_dtype=out_dtype)

    leaves = [a for w in weights for a in (w.values, w.scales, w.zeros)]
    mesh = attention.kernel_mesh()
    tp = 1 if mesh is None else mesh.shape.get("tensor", 1)
    if tp == 1:
        return call(x, *leaves)
    from jax.sharding import PartitionSpec as P

    from jaxinfer.sharding import DEFAULT_RULES
    in_axes = {DEFAULT_RULES.get(w.axes[0]) for w in weights}
    out_axes = {DEFAULT_RULES.get(w.axes[1]) for w in weights}
    k = x.shape[1]
    g = scheme.group(k)
    if out_axes == {"tensor"} and in_axes == {None} and all(w.values.shape[0] % tp == 0 for w in weights):
        specs = [(P("tensor", None), P(None, "tensor"), None if w.zeros is None else P(None, "tensor"))
                 for w in weights]
        x_spec, out_spec, reduce = P(), P(None, "tensor"), False
    elif in_axes == {"tensor"} and out_axes == {None} and k % tp == 0 and (scheme.group_size is None
                                                                           or (k // g) % tp == 0):
        # Per channel, the one scale row applies to every device's partial sum alike (it is linear).
        group = P() if scheme.group_size is None else P("tensor", None)
        specs = [(P(None, "tensor"), group, None if w.zeros is None else group) for w in weights]
        x_spec, out_spec, reduce = P(None, "tensor"), P(), True
    else:
        import logging

        logging.getLogger(__name__).warning(
            "quantized matmul of K=%d (groups of %d) over %d devices: no per-device split of whole groups for "
            "logical axes %s; XLA replicates the call", k, g, tp, sorted(map(str, in_axes | out_axes)))
        return call(x, *leaves)
    flat_specs = [sp for w_specs in specs for sp in w_specs]

    def per_device(x, *leaves):
        ys = call(x, *leaves)
        return [jax.lax.psum(y.astype(jnp.float32), "tensor").astype(y.dtype) for y in ys] if reduce else ys

    return jax.shard_map(per_device, mesh=mesh, in_specs=(x_spec, *flat_specs),
                         out_specs=[out_spec] * len(weights), check_vma=False)(x, *leaves)


class Linear(nnx.Module):
    """A projection y = einsum(equation, x, weight) (+ bias), declared once.

    The weight is laid out for the equation (inputs first: q_proj is [embed, heads,
    head_dim] for "te,ehd->thd"); the optional bias covers the weight's output axes.
    """

    def __init__(self, equation: str, shape: Sequence[int], logical_axes: Sequence[str | None], *,
                 dtype, rngs: nnx.Rngs, bias: bool = False, preferred_element_type=None):
        self.equation = equation
        self.preferred_element_type = preferred_element_type
        self.weight = param(rngs, shape, logical_axes, dtype)
        if bias:
            inputs, out = equation.replace(" ", "").split("->")
            w_subscripts = inputs.split(",")[1]
            keep = [i for i, c in enumerate(w_subscripts) if c in out]
            self.bias = param(rngs, [shape[i] for i in keep], [logical_axes[i] for i in keep], dtype,
                              init="zeros")
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = einsum(self.equation, x, self.weight[...], preferred_element_type=self.preferred_element_type)
        return y if self.bias is None else y + self.bias[...]


class QuantizedLinear(nnx.Module):
    """A Linear whose weight is quantized: `values` [N, K], `scales` (and `zeros`) [K // g, N]
    parameters for the weight viewed as [K, N] (K its contracted axes, N its output axes). Their logical axes
    are the weight's first contracted and first output axis, which keeps a sharded axis
    (heads, mlp) sharded: both are the major ones of their merged dimension."""

    def __init__(self, equation: str, shape: Sequence[int], logical_axes: Sequence[str | None], *,
                 scheme: QuantScheme, dtype, rngs: nnx.Rngs, bias: bool = False, preferred_element_type=None,
                 name: str = "weight"):
        contracted, produced = split_equation(equation)
        nk = len(contracted)
        self.equation = equation
        self.preferred_element_type = preferred_element_type
        self.scheme = scheme
        self.out_shape = tuple(shape[nk:])
        k, n = math.prod(shape[:nk]), math.prod(shape[nk:])
        scheme.check(k, n, name)  # a ValueError naming the projection
        axes = (logical_axes[0], logical_axes[nk])  # (input, output); values are output-major
        self.axes = axes
        self.values, self.scales, self.zeros = _quantized_params(rngs, scheme, k, n, axes)
        # Act-order (GPTQ desc_act): which of x's channels each stored input channel is. Replicated: it is
        # K int32s. Random (benchmark) weights take all zeros, a valid order.
        self.input_order = (param(rngs, (k,), (None,), jnp.int32, init="zeros") if scheme.act_order else None)
        if bias:
            keep = [i for i, c in enumerate(contracted + produced) if c in produced]
            self.bias = param(rngs, [shape[i] for i in keep], [logical_axes[i] for i in keep], dtype,
                              init="zeros")
        else:
            self.bias = None

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.values[...], self.scales[...], None if self.zeros is None else self.zeros[...],
                               self.scheme, self.out_shape, self.axes,
                               None if self.input_order is None else self.input_order[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = einsum(self.equation, x, self.quantized_weight(), preferred_element_type=self.preferred_element_type)
        return y if self.bias is None else y + self.bias[...]


def _quantized_params(rngs: nnx.Rngs, scheme: QuantScheme, k: int, n: int, axes: tuple):
    """(values, scales, zeros or None) parameters of a [K, N] weight in `scheme`; `axes` its logical (input,
    output) axes, which values take reversed (they are output-major)."""
    made = {part: param(rngs, shape, axes[::-1] if part == "values" else axes, dtype,
                        init="levels" if part == "values" else "fill", scale=_FILL.get((part, scheme.method), 0.0))
            for part, (shape, dtype) in scheme.shapes(k, n).items()}
    return made["values"], made["scales"], made.get("zeros")


# Scales of random (benchmark) weights: about the size of a 0.02-normal weight's.
_FILL = {("scales", "int8"): 0.02 / 64, ("scales", "int4"): 0.02 / 4, ("scales", "fp8"): 0.02 / 224}


def quantize_model(model: nnx.Module, scheme, *, dtype, rngs: nnx.Rngs,
                   skip: Sequence[str] = ("lm_head",)) -> nnx.Module:
    """Swap a QuantizedLinear in for every Linear of `model` (but those named in `skip`; the
    output head stays in float, as vLLM keeps it by default). Built under
    `param.abstract()` the new parameters are declarations only.

    scheme: a QuantScheme for every projection, or a scheme per projection (params.MixedQuantization:
    `scheme_for(module path)`, None where the projection stays a float Linear). A plan follows its own
    entries, `skip` aside: one naming the output head (a GGUF's quantized "lm_head", or the tied
    embedding "embed", which becomes a QuantizedEmbed) keeps the head as the checkpoint quantizes it."""
    planned = not isinstance(scheme, QuantScheme)
    for path, module in list(nnx.iter_modules(model)):
        for name, child in list(vars(module).items()):
            if not isinstance(child, (Linear, Embed)) or (not planned and (isinstance(child, Embed) or name in skip)):
                continue
            own = scheme.scheme_for((*path, name)) if planned else scheme
            if own is None:
                continue
            where = ".".join(map(str, (*path, name)))
            if isinstance(child, Embed):
                vocab, dim = value_of(child.weight).shape
                setattr(module, name, QuantizedEmbed(vocab, dim, scheme=own, dtype=dtype, rngs=rngs, name=where))
                continue
            shape = tuple(value_of(child.weight).shape)
            axes = child.weight.get_metadata()["logical_axes"]
            q = QuantizedLinear(child.equation, shape, axes, scheme=own, dtype=dtype,
                                rngs=rngs, bias=child.bias is not None,
                                preferred_element_type=child.preferred_element_type, name=where)
            setattr(module, name, q)
    from jaxinfer.layers.moe import Experts

    experts = sum(isinstance(m, Experts) for _, m in nnx.iter_modules(model))
    if experts:
        log.warning("quantization: the routed experts of %d layers stay in %s; only the other projections are "
                    "quantized (quantized expert weights are not supported yet)", experts, jnp.dtype(dtype).name)
    return model


class Embed(nnx.Module):
    """The token embedding [vocab, embed]; `attend` is its transpose, for tied output heads."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (vocab_size, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [T] -> [T, embed]
        return self.weight[...][tokens]

    def attend(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:  # [T, embed] -> [T, vocab]
        return einsum("te,ve->tv", x, self.weight[...], preferred_element_type=preferred_element_type)


class QuantizedEmbed(nnx.Module):
    """A token embedding held quantized (a GGUF's Q8_0 token_embd, tied to the output head): `values`
    [vocab, embed], which is the head's output-major [N, K] as the kernels take it, and `scales` (and
    `zeros`) [embed // g, vocab]. A lookup dequantizes only the rows it reads; `attend` is the head's
    quantized matmul, through the projections' kernels (and their tensor-parallel split by vocab)."""

    def __init__(self, vocab_size: int, dim: int, *, scheme: QuantScheme, dtype, rngs: nnx.Rngs,
                 name: str = "embed"):
        scheme.check(dim, vocab_size, name)  # a ValueError naming the embedding
        self.scheme = scheme
        self.dtype = dtype
        self.axes = ("embed", "vocab")  # (input, output) of the head; values are output-major
        self.values, self.scales, self.zeros = _quantized_params(rngs, scheme, dim, vocab_size, self.axes)

    def quantized_weight(self) -> QuantizedWeight:
        values = self.values[...]
        return QuantizedWeight(values, self.scales[...], None if self.zeros is None else self.zeros[...],
                               self.scheme, (values.shape[0],), self.axes)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [T] -> [T, embed]
        from pallas_kernels.quantized_matmul.reference import dequantize_output_major

        w = self.quantized_weight()
        zeros = None if w.zeros is None else w.zeros[:, tokens]
        return dequantize_output_major(w.values[tokens], w.scales[:, tokens], zeros, self.scheme, self.dtype)

    def attend(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:  # [T, embed] -> [T, vocab]
        (y,) = _matmuls(x, [self.quantized_weight()], out_dtype=preferred_element_type or x.dtype)
        return y
