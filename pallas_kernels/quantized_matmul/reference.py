"""Quantized weights and the pure-JAX matmul over them: the reference the kernels are checked
against.

A projection's weight is viewed as a matrix [K, N] (K input channels, N outputs). Quantized:

    values  [K, N]      int8 or float8_e4m3fn; int4: [K // 2, N] uint8, two per byte along K
                        (the low nibble holds the even input channel, the high one the odd)
    scales  [K // g, N] float32: one per group of g input channels per output (g = K: per channel)
    zeros   [K // g, N] float32, int4 with zero points only: the level that stands for 0 (not
                        always a whole level: an integer one, GPTQ's, is one case)

and W[k, n] = (values[k, n] - zero) * scales[k // g, n], where zero is zeros[k // g, n] when
there are zero points, 8 for symmetric int4 (its levels 0..15 hold -8..7) and 0 otherwise.

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
GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a weight is quantized: vLLM's method name, and the grouping of its scales."""

    method: str  # "int8" | "int4" | "fp8"
    group_size: int | None = None  # input channels per scale; None: one scale per output channel
    zero_points: bool = False  # int4 only: asymmetric, with a zero level per group
    # The group was not asked for ("int8", "int4"): a model whose projections 128 does not divide takes
    # the largest of 64 and 32 that divides them all (params.fit_quantization).
    fit_group: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        if self.method not in ("int8", "int4", "fp8"):
            raise ValueError(f"unknown quantization {self.method!r}: expected int8, int4 or fp8")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} is not one of {GROUP_SIZES}")
        if self.zero_points and self.method != "int4":
            raise ValueError(f"zero points are for int4, not {self.method}")

    @property
    def name(self) -> str:
        """The spec `parse` reads back: "int8", "int4-g128", "int4-g64-zp", "int4-ch", ..."""
        default = 128 if self.method in ("int8", "int4") else None
        group = "" if self.group_size == default else ("-ch" if self.group_size is None else f"-g{self.group_size}")
        return self.method + group + ("-zp" if self.zero_points else "")

    @property
    def zero_level(self) -> float:
        """The level that stands for 0 when no zeros are stored: 8 for int4 (levels 0..15 hold
        -8..7), 0 otherwise."""
        return 8.0 if self.method == "int4" and not self.zero_points else 0.0

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
        values = {"int8": ((k, n), np.dtype(np.int8)), "int4": ((k // 2, n), np.dtype(np.uint8)),
                  "fp8": ((k, n), np.dtype(ml_dtypes.float8_e4m3fn))}[self.method]
        out = {"values": values, "scales": ((rows, n), np.dtype(np.float32))}
        if self.zero_points:
            out["zeros"] = ((rows, n), np.dtype(np.float32))
        return out


def parse(spec: str | QuantScheme | None) -> QuantScheme | None:
    """"int8" / "int4" (group 128, symmetric), "fp8" (per channel), "int4-g64", "int4-g128-zp",
    "int8-ch" (per channel): a scheme."""
    if spec is None or isinstance(spec, QuantScheme):
        return spec
    parts = spec.lower().split("-")
    method, group, zero = parts[0], None, False
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
        else:
            raise ValueError(f"unknown quantization option {p!r} in {spec!r}")
    return QuantScheme(method, group, zero, fit_group=fit)


def quantize(w, scheme: QuantScheme) -> dict:
    """A float [K, N] weight as `scheme` holds it: {"values", "scales"(, "zeros")}, numpy in,
    numpy out; jax in, jax out."""
    xp = np if isinstance(w, np.ndarray) else jnp
    k, n = w.shape
    scheme.check(k, n)
    g = scheme.group(k)
    wg = w.astype(xp.float32).reshape(k // g, g, n)
    if scheme.method == "int4" and scheme.zero_points:
        # The zero level is kept exact (a float, as GGUF's Q4_1 keeps its minimum): rounding it to
        # an integer, as GPTQ does, would shift every level of the group by up to half a step.
        lo, hi = wg.min(axis=1), wg.max(axis=1)
        scales = xp.where(hi > lo, (hi - lo) / 15.0, 1.0)
        zeros = -lo / scales
        q = xp.clip(xp.round((wg - lo[:, None]) / scales[:, None]), 0, 15)
        out = {"values": _pack_int4(q.reshape(k, n), xp), "scales": scales.astype(xp.float32),
               "zeros": zeros.astype(xp.float32)}
        return out
    top = {"int8": 127.0, "int4": 7.0, "fp8": FP8_MAX}[scheme.method]
    amax = xp.abs(wg).max(axis=1)
    scales = xp.where(amax > 0, amax / top, 1.0).astype(xp.float32)
    scaled = wg / scales[:, None]
    if scheme.method == "fp8":
        values = xp.clip(scaled, -FP8_MAX, FP8_MAX).reshape(k, n).astype(ml_dtypes.float8_e4m3fn)
    elif scheme.method == "int8":
        values = xp.clip(xp.round(scaled), -127, 127).reshape(k, n).astype(xp.int8)
    else:
        values = _pack_int4(xp.clip(xp.round(scaled), -8, 7).reshape(k, n) + 8, xp)
    return {"values": values, "scales": scales}


def _pack_int4(levels, xp):
    """[K, N] levels 0..15 -> [K // 2, N] uint8 (even channel in the low nibble)."""
    q = levels.astype(xp.uint8)
    return (q[0::2] | (q[1::2] << 4)).astype(xp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """[K // 2, N] uint8 -> [K, N] levels 0..15 (int8)."""
    lo = (packed & 0xF).astype(jnp.int8)
    hi = (packed >> 4).astype(jnp.int8)
    return jnp.stack([lo, hi], axis=1).reshape(packed.shape[0] * 2, packed.shape[1])


def dequantize(values: jax.Array, scales: jax.Array, zeros: jax.Array | None, scheme: QuantScheme,
               dtype=jnp.float32) -> jax.Array:
    """The float [K, N] weight back."""
    if scheme.method == "int4":
        q = unpack_int4(jnp.asarray(values)).astype(jnp.float32)
    else:
        q = jnp.asarray(values).astype(jnp.float32)
    k, n = q.shape
    rows = scales.shape[0]
    q = q.reshape(rows, k // rows, n)
    q = q - (scheme.zero_level if zeros is None else zeros[:, None, :])
    w = q * scales[:, None, :]
    return w.reshape(k, n).astype(dtype)


def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None) -> jax.Array:
    """x [M, K] times the dequantized weight [K, N], accumulated in float32: [M, N] in `out_dtype`
    (default: x's dtype)."""
    w = dequantize(values, scales, zeros, scheme, jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)
