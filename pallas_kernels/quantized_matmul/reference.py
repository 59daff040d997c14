"""Quantized weights and the pure-JAX matmul over them: the reference the kernels are checked
against.

A projection's weight is the matrix W [K, N] (K input channels, N outputs). Quantized, it is
stored output-major, each output's K levels contiguous (the layout of GGUF, of PyTorch's Linear
and of compressed-tensors, and the one the GPU kernel streams into registers):

    values  [N, K]      int8, int4 (signed, packed two a byte on the device) or float8_e4m3fn
    scales  [K // g, N] float32: one per group of g input channels per output (g = K: per channel)
    zeros   [K // g, N] float32, with zero points only (int4 or int8): the level that stands for 0,
                        in the values' signed domain (-8..7, -128..127; not always a whole level:
                        GGUF's Q4_1 and K-quants keep a float minimum)

and W[k, n] = (values[n, k] - zero) * scales[k // g, n], with zero = zeros[k // g, n] when there
are zero points and 0 otherwise. Scales stay input-major, so a kernel reads one row of a tile's
outputs per group.

`quantize` works on numpy arrays (on the host, as a checkpoint loads: the float weight never
reaches the device) and on jax arrays (random weights made on the device).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # the largest float8_e4m3fn
GROUP_SIZES = (16, 32, 64, 128)  # 16: GGUF Q6_K's sub-blocks


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a weight is quantized: vLLM's method name, and the grouping of its scales."""

    method: str  # "int8" | "int4" | "fp8"
    group_size: int | None = None  # input channels per scale; None: one scale per output channel
    zero_points: bool = False  # int4 or int8: asymmetric, with a zero level per group
    # GPTQ's act-order (desc_act): the checkpoint groups input channels out of order. They are stored
    # sorted by group, and each projection holds `input_order` [K] int32: x's columns are gathered into
    # that order before the matmul (jaxinfer/layers/linear.py), so the kernels see contiguous groups.
    act_order: bool = False
    # The group was not asked for ("int8", "int4"): a model whose projections 128 does not divide takes
    # the largest of 64 and 32 that divides them all (params.fit_quantization).
    fit_group: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        if self.method not in ("int8", "int4", "fp8"):
            raise ValueError(f"unknown quantization {self.method!r}: expected int8, int4 or fp8")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} is not one of {GROUP_SIZES}")
        if self.zero_points and self.method == "fp8":
            raise ValueError("zero points are for int4 and int8, not fp8")
        if self.act_order and self.group_size is None:
            raise ValueError("act-order reorders groups of input channels; per channel there are none")

    @property
    def name(self) -> str:
        """The spec `parse` reads back: "int8", "int4-g128", "int4-g64-zp", "int8-g16", "int4-ch", "int4-g32-act", ..."""
        default = 128 if self.method in ("int8", "int4") else None
        group = "" if self.group_size == default else ("-ch" if self.group_size is None else f"-g{self.group_size}")
        return self.method + group + ("-zp" if self.zero_points else "") + ("-act" if self.act_order else "")

    @property
    def values_dtype(self) -> np.dtype:
        return np.dtype({"int8": np.int8, "int4": ml_dtypes.int4, "fp8": ml_dtypes.float8_e4m3fn}[self.method])

    @property
    def bits(self) -> int:
        return 4 if self.method == "int4" else 8

    def group(self, k: int) -> int:
        """Input channels per scale for a weight of K input channels."""
        return k if self.group_size is None else self.group_size

    def check(self, k: int, n: int, name: str = "weight") -> None:
        """Refuse a [K, N] weight this scheme cannot hold, naming it."""
        g = self.group(k)
        if k % g:
            raise ValueError(f"{name}: group size {g} does not divide its {k} input channels")
        if self.method == "int4" and k % 2:
            raise ValueError(f"{name}: int4 packs two input channels a byte; {k} is odd")

    def shapes(self, k: int, n: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
        """name -> (shape, dtype) of the arrays that hold a quantized [K, N] weight."""
        rows = k // self.group(k)
        out = {"values": ((n, k), self.values_dtype), "scales": ((rows, n), np.dtype(np.float32))}
        if self.zero_points:
            out["zeros"] = ((rows, n), np.dtype(np.float32))
        return out


def parse(spec: str | QuantScheme | None) -> QuantScheme | None:
    """"int8" / "int4" (group 128, symmetric), "fp8" (per channel), "int4-g64", "int4-g128-zp",
    "int8-ch" (per channel), "int4-g32-act" (GPTQ act-order, from a checkpoint), "int8-g16" and
    "int8-g32-zp" (GGUF Q6_K and Q5_K): a scheme."""
    if spec is None or isinstance(spec, QuantScheme):
        return spec
    parts = spec.lower().split("-")
    method, group, zero, act = parts[0], None, False, False
    # Plain int8 and int4 group by 128 (or the largest of 64 and 32 that fits the model): one scale
    # per output channel (-ch) misses the quality goal on small models; fp8 keeps one per channel.
    fit = method in ("int8", "int4")
    if fit:
        group = 128
    for p in parts[1:]:
        if p.startswith("g") and p[1:].isdigit():
            group, fit = int(p[1:]), False
        elif p == "zp":
            zero = True
        elif p == "ch":
            group, fit = None, False
        elif p == "act":
            act, fit = True, False
        else:
            raise ValueError(f"unknown quantization option {p!r} in {spec!r}")
    return QuantScheme(method, group, zero, act, fit_group=fit)


def quantize(w, scheme: QuantScheme) -> dict:
    """A float [K, N] weight as `scheme` holds it: {"values", "scales"(, "zeros")}, numpy in,
    numpy out; jax in, jax out."""
    xp = np if isinstance(w, np.ndarray) else jnp
    k, n = w.shape
    scheme.check(k, n)
    g = scheme.group(k)
    wg = w.astype(xp.float32).reshape(k // g, g, n)
    if scheme.zero_points:
        # The zero level is kept exact (a float, as GGUF's Q4_1 keeps its minimum): rounding it to
        # an integer, as GPTQ does, would shift every level of the group by up to half a step.
        top, half = (15.0, 8) if scheme.method == "int4" else (255.0, 128)
        lo, hi = wg.min(axis=1), wg.max(axis=1)
        scales = xp.where(hi > lo, (hi - lo) / top, 1.0)
        q = xp.clip(xp.round((wg - lo[:, None]) / scales[:, None]), 0, top) - half
        return {"values": _output_major(q, scheme, xp), "scales": scales.astype(xp.float32),
                "zeros": (-lo / scales - half).astype(xp.float32)}
    top = {"int8": 127.0, "int4": 7.0, "fp8": FP8_MAX}[scheme.method]
    amax = xp.abs(wg).max(axis=1)
    scales = xp.where(amax > 0, amax / top, 1.0).astype(xp.float32)
    scaled = wg / scales[:, None]
    if scheme.method == "fp8":
        q = xp.clip(scaled, -FP8_MAX, FP8_MAX)
    else:
        q = xp.clip(xp.round(scaled), -127 if scheme.method == "int8" else -8, top)
    return {"values": _output_major(q, scheme, xp), "scales": scales}


def _output_major(q, scheme: QuantScheme, xp):
    """Levels [K // g, g, N] (floats) -> values [N, K] in the scheme's dtype."""
    rows, g, n = q.shape
    return q.reshape(rows * g, n).T.astype(scheme.values_dtype)


def dequantize(values: jax.Array, scales: jax.Array, zeros: jax.Array | None, scheme: QuantScheme,
               dtype=jnp.float32) -> jax.Array:
    """The float [K, N] weight back."""
    return dequantize_output_major(values, scales, zeros, scheme, dtype).T


def dequantize_output_major(values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                            scheme: QuantScheme, dtype=jnp.float32) -> jax.Array:
    """The float weight as stored, [N, K] (W transposed)."""
    q = jnp.asarray(values).astype(jnp.float32)
    n, k = q.shape
    rows = scales.shape[0]
    q = q.reshape(n, rows, k // rows)
    if zeros is not None:
        q = q - zeros.T[:, :, None]
    w = q * scales.T[:, :, None]
    return w.reshape(n, k).astype(dtype)


def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None) -> jax.Array:
    """x [M, K] times the dequantized weight [K, N], accumulated in float32: [M, N] in `out_dtype`
    (default: x's dtype)."""
    w = dequantize(values, scales, zeros, scheme, jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)
