"""HF checkpoints that come quantized (config.json `quantization_config`), kept quantized: each
quantized Linear's tensors repacked, level for level, into one QuantizedTensor in the kernels'
format (pallas_kernels/quantized_matmul/reference.py: values [N, K], scales and zeros [K // g, N],
W[k, n] = (values[n, k] - zero) * scale), never expanded to floats.

    AWQ (GEMM)       qweight int32 [K, N/8]: 8 outputs an int32, nibble i holding output
                     8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; qzeros int32 [K/g, N/8] alike; scales [K/g, N].
                     W = (q - z) s with q, z in 0..15               -> int4-g{g}-zp
    GPTQ (4, 8 bit)  qweight int32 [K bits/32, N]: 32/bits inputs an int32, input 8r + i in nibble i
                     (bits 4); qzeros int32 [K/g, N bits/32], packed along the outputs alike;
                     scales [K/g, N]; g_idx [K]: input k's group. W[k] = (q - z) s[g_idx[k]], where
                     checkpoint_format "gptq" (v1) stores z - 1 and "gptq_v2" z itself (a v1 nibble
                     of 15 is read as 16, as v1 kernels read it: a true zero of 0 does not survive v1).
                     sym: z is the midpoint (8, 128)               -> int4 / int8, no zero points
                     not sym, 4 bit                                 -> int4-zp
                     act-order (g_idx not k // g): input channels stored sorted by group,
                     `input_order` saying where each came from       -> ...-act
    compressed-tensors  pack-quantized (weight-only int): weight_packed int32 [N, K bits/32], 32/bits
                     inputs an int32 (input 8c + i in nibble i, 4 bit), offset by 2^(bits-1);
                     weight_scale [N, K/g]; weight_zero_point (signed, packed alike along the
                     outputs) when asymmetric; weight_shape [N, K]  -> int4(-zp) / int8
                     int-quantized, naive-quantized: weight int8 [N, K], weight_scale [N, 1] or
                     [N, K/g]                                       -> int8
                     float-quantized, naive-quantized: weight float8_e4m3fn [N, K], weight_scale
                     [N, 1], [N, K/g] or one per tensor (made one per channel) -> fp8
                     Activation quantization (W8A8) is not applied: activations stay float.

A Linear that is not a projection of the model (the output head, quantized by some GPTQ tools) is
dequantized to float32. Every shape is checked against the others and the config before any
data is read (`kept_tensors`), so a corrupt or inconsistent checkpoint is refused naming the
tensor, never deep in JAX.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from checkpoints.quantized_tensor import QuantizedTensor
from jaxinfer.errors import CheckpointError
from pallas_kernels.quantized_matmul import QuantScheme
from pallas_kernels.quantized_matmul.reference import GROUP_SIZES

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds output 8c + AWQ_ORDER[i]
CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


@dataclasses.dataclass(frozen=True)
class HFQuantization:
    """What a checkpoint's quantization_config says, in one shape for the three formats."""

    method: str  # "awq" | "gptq" | "compressed-tensors"
    fmt: str  # awq: "gemm"; gptq: "gptq" (v1 zeros) | "gptq_v2"; compressed-tensors: one of CT_FORMATS
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    kind: str = "int"  # "int" | "float" (compressed-tensors fp8)
    strategy: str = "group"  # compressed-tensors: "group" | "channel" | "tensor"
    source: str = "quantization_config"

    @property
    def key(self) -> str:
        """The part whose presence marks a quantized Linear."""
        return {"awq": "qweight", "gptq": "qweight"}.get(
            self.method, "weight_packed" if self.fmt == "pack-quantized" else "weight_scale")

    @property
    def required(self) -> tuple[str, ...]:
        if self.method in ("awq", "gptq"):
            return "qweight", "qzeros", "scales"
        if self.fmt == "pack-quantized":
            return ("weight_packed", "weight_scale") + (() if self.symmetric else ("weight_zero_point",))
        return "weight", "weight_scale"

    @property
    def optional(self) -> tuple[str, ...]:
        if self.method == "gptq":
            return ("g_idx",)
        if self.method == "compressed-tensors":
            return ("weight_shape", "weight_zero_point", "weight_g_idx")
        return ()

    def scheme(self, name: str, act_order: bool = False) -> QuantScheme:
        """The kernels' scheme for this checkpoint's Linears; a CheckpointError naming `name` (the first
        quantized tensor) where there is none."""
        what = f"{self.method} {self.fmt}"
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise CheckpointError(f"{name}: {what} groups of {self.group_size} input channels are not supported: "
                                  f"the kernels take groups of {', '.join(map(str, GROUP_SIZES))} or one scale "
                                  "per output channel")
        if self.kind == "float":
            if self.bits != 8:
                raise CheckpointError(f"{name}: {what} float weights of {self.bits} bits are not supported "
                                      "(8: float8_e4m3fn)")
            return QuantScheme("fp8", self.group_size)
        if self.bits not in ((4,) if self.method == "awq" else (4, 8)):
            raise CheckpointError(f"{name}: {what} weights of {self.bits} bits are not supported "
                                  f"({'4' if self.method == 'awq' else '4 or 8'})")
        if self.bits == 8 and not self.symmetric:
            raise CheckpointError(f"{name}: {what} 8-bit weights with zero points (asymmetric) are not "
                                  "supported: int8 weights here are symmetric (int4 may have zero points)")
        return QuantScheme("int4" if self.bits == 4 else "int8", self.group_size, not self.symmetric and self.bits == 4,
                           act_order and self.group_size is not None)


def read_quantization(directory: pathlib.Path) -> HFQuantization | None:
    """The quantization a checkpoint directory's config.json (or an AutoGPTQ quantize_config.json)
    declares; None for float checkpoints."""
    raw, source = None, None
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if isinstance(hf, dict) and hf.get("quantization_config") is not None:
            raw, source = hf["quantization_config"], f"{config_path} quantization_config"
        elif (directory / "quantize_config.json").is_file():
            raw = json.loads((directory / "quantize_config.json").read_text())
            raw.setdefault("quant_method", "gptq")
            source = str(directory / "quantize_config.json")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory}: its quantization config is not valid JSON: {e}") from None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} is not a JSON object")
    try:
        return _parse(raw, source)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source} is malformed: {type(e).__name__} {e}") from None


def _group(value) -> int | None:
    return None if value is None or int(value) <= 0 else int(value)


def _parse(raw: dict, source: str) -> HFQuantization:
    method = str(raw.get("quant_method", "")).lower()
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{source}: AWQ version {version!r} is not supported (gemm is)")
        if not raw.get("zero_point", True):
            raise CheckpointError(f"{source}: AWQ without zero points is not supported")
        return HFQuantization("awq", "gemm", int(raw.get("bits", raw.get("w_bit", 4))),
                              _group(raw.get("group_size", raw.get("q_group_size", 128))), False,
                              source=source)
    if method == "gptq":
        fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if raw.get("dynamic"):
            raise CheckpointError(f"{source}: GPTQ per-module overrides ('dynamic') are not supported: every "
                                  "projection must share one quantization")
        return HFQuantization("gptq", fmt, int(raw["bits"]), _group(raw.get("group_size", 128)),
                              bool(raw.get("sym", True)), source=source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw, source)
    raise CheckpointError(f"{source}: quant_method {method!r} is not supported (awq, gptq, compressed-tensors)")


def _parse_compressed_tensors(raw: dict, source: str) -> HFQuantization:
    fmt = str(raw.get("format", "")).lower()  # "mixed-precision": each config group names its own
    sparsity = raw.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")).lower() != "dense":
        raise CheckpointError(f"{source}: sparse compressed-tensors ({sparsity.get('format')}) are not supported")
    weights = {name: group.get("weights") for name, group in raw["config_groups"].items()}
    weights = {name: w for name, w in weights.items() if w}
    if not weights:
        raise CheckpointError(f"{source}: no config group quantizes weights")
    first_name, first = next(iter(weights.items()))
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder")
    formats = {str(raw["config_groups"][name].get("format") or fmt).lower() for name in weights}
    for name, w in weights.items():
        if any(w.get(k) != first.get(k) for k in keys) or len(formats) > 1:
            raise CheckpointError(f"{source}: config groups {first_name} and {name} quantize weights differently; "
                                  "every projection must share one quantization")
    fmt = formats.pop()
    if fmt not in CT_FORMATS:
        raise CheckpointError(f"{source}: compressed-tensors format {fmt!r} is not supported ({', '.join(CT_FORMATS)})")
    strategy = str(first.get("strategy", "tensor")).lower()
    if strategy not in ("group", "channel", "tensor"):
        raise CheckpointError(f"{source}: compressed-tensors weight strategy {strategy!r} is not supported "
                              "(group, channel, tensor)")
    kind = str(first.get("type", "int")).lower()
    if fmt != "naive-quantized" and (kind == "float") != (fmt == "float-quantized"):
        raise CheckpointError(f"{source}: format {fmt} does not hold {kind} weights")
    group = _group(first.get("group_size")) if strategy == "group" else None
    if strategy == "group" and group is None:
        raise CheckpointError(f"{source}: weight strategy 'group' without a group_size")
    return HFQuantization("compressed-tensors", fmt, int(first["num_bits"]), group,
                          bool(first.get("symmetric", True)), kind=kind, strategy=strategy,
                          source=source)


def kept_tensors(tensors: Iterable[tuple[str, np.ndarray]], quant: HFQuantization
                 ) -> tuple[QuantScheme | None, Iterator[tuple[str, np.ndarray | QuantizedTensor]]]:
    """(the scheme every quantized projection shares, (HF name, array or QuantizedTensor) for the model).

    `tensors` are the checkpoint's, memory-mapped (safetensors_loader.iter_tensors): every
    quantized Linear's parts are found and their shapes checked here, before any data is read.
    The tensors then come in file order, a quantized Linear's as `prefix.weight` once its last
    part has arrived (parts may lie in different shards)."""
    from checkpoints.gguf_loader import PROJECTION

    tensors = list(tensors)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors:
        prefix, _, suffix = name.rpartition(".")
        parts.setdefault(prefix, {})[suffix] = t
    names = quant.required + quant.optional
    linears = {p: {s: t for s, t in ps.items() if s in names} for p, ps in parts.items() if quant.key in ps}
    if not linears:
        return None, iter(tensors)
    for prefix, ps in linears.items():
        missing = [s for s in quant.required if s not in ps]
        if missing:
            raise CheckpointError(f"{prefix}: a quantized Linear ({quant.method}, has {prefix}.{quant.key}) "
                                  f"without {', '.join(f'{prefix}.{s}' for s in missing)}")
    first = next(iter(linears))
    scheme = quant.scheme(f"{first}.{quant.required[0]}", any(_act_order(ps, quant) for ps in linears.values()))
    for prefix, ps in linears.items():  # a group that does not fit the model, named before any other shape
        _check_group(prefix, _dims(prefix, ps, quant)[1], quant, scheme)
    for prefix, ps in linears.items():
        _check_shapes(prefix, ps, quant, scheme)
    floats = [p for p, ps in parts.items() if p not in linears and "weight" in ps and PROJECTION.search(f"{p}.weight")]
    if floats:
        log.warning("%d projections of this %s checkpoint are stored in float (%s%s): they are quantized to %s as "
                    "they load", len(floats), quant.method, ", ".join(floats[:3]), " ..." if len(floats) > 3 else "",
                    scheme.name)

    def stream():
        pending: dict[str, dict[str, np.ndarray]] = {}
        for name, t in tensors:
            prefix, _, suffix = name.rpartition(".")
            if prefix not in linears or suffix not in names:  # a float tensor (a Linear's bias too)
                yield name, t
                continue
            got = pending.setdefault(prefix, {})
            got[suffix] = t
            if len(got) == len(linears[prefix]):
                del pending[prefix]
                w = decode(prefix, got, quant, scheme)
                yield f"{prefix}.weight", (w if PROJECTION.search(f"{prefix}.weight") else _to_float(w))

    return scheme, stream()


def _shape_error(prefix: str, part: str, t: np.ndarray, want: tuple, why: str) -> CheckpointError:
    return CheckpointError(f"{prefix}.{part} has shape {tuple(t.shape)} ({t.dtype}); {why} needs "
                           f"{tuple(int(d) for d in want)}")


def _dims(prefix: str, ps: dict[str, np.ndarray], quant: HFQuantization) -> tuple[int, int]:
    """[N, K] of a quantized Linear, as its values tensor (and compressed-tensors' weight_shape) give it."""
    main = quant.required[0]  # the values: qweight, weight_packed or weight
    values = ps[main]
    if values.ndim != 2:
        raise CheckpointError(f"{prefix}.{main} has shape {tuple(values.shape)}: a Linear's is 2-D")
    if quant.method == "awq":
        return values.shape[1] * 8, values.shape[0]
    if quant.method == "gptq":
        return values.shape[1], values.shape[0] * (32 // quant.bits)
    if quant.fmt != "pack-quantized":
        return values.shape
    per = 32 // quant.bits
    n, k = values.shape[0], values.shape[1] * per
    if "weight_shape" in ps:
        shape = tuple(int(d) for d in np.asarray(ps["weight_shape"]).reshape(-1))
        if len(shape) != 2 or shape[0] != n or not k - per < shape[1] <= k:
            raise CheckpointError(f"{prefix}.weight_shape is {list(shape)}, weight_packed {list(values.shape)} "
                                  f"holds [N, {per} * its columns]")
        k = shape[1]
    return n, k


def _check_group(prefix: str, k: int, quant: HFQuantization, scheme: QuantScheme) -> int:
    """Groups of the scheme's size in K input channels; a CheckpointError naming the tensor where they do not fit."""
    g = scheme.group(k)
    if k % g:
        raise CheckpointError(f"{prefix}.{quant.required[0]}: group size {g} does not divide its {k} input channels")
    return k // g


def _check_shapes(prefix: str, ps: dict[str, np.ndarray], quant: HFQuantization, scheme: QuantScheme
                  ) -> tuple[int, int]:
    """[N, K] of a quantized Linear, every part's shape and dtype checked against the others and the
    config. Reads no data (but compressed-tensors' weight_shape)."""
    def need(part, want, why, dtypes=None):
        t = ps[part]
        if tuple(t.shape) != tuple(want):
            raise _shape_error(prefix, part, t, want, why)
        if dtypes is not None and t.dtype not in dtypes:
            raise CheckpointError(f"{prefix}.{part} is {t.dtype}; {quant.method} stores it as "
                                  f"{' or '.join(np.dtype(d).name for d in dtypes)}")

    n, k = _dims(prefix, ps, quant)
    rows = _check_group(prefix, k, quant, scheme)
    int32 = (np.dtype(np.int32),)
    floats = tuple(np.dtype(d) for d in (np.float16, np.float32, ml_dtypes.bfloat16))
    main = quant.required[0]
    shape = list(ps[main].shape)
    why = f"{main} {shape} (K={k}, N={n}) with " + (f"groups of {scheme.group(k)}" if rows > 1 else "one scale an output")
    if quant.method in ("awq", "gptq"):
        per = 8 if quant.method == "awq" else 32 // quant.bits
        need("scales", (rows, n), why, floats)
        if n % per:
            raise CheckpointError(f"{prefix}.qzeros: {n} outputs are not whole int32s of {per} zeros")
        need("qzeros", (rows, n // per), f"scales {list(ps['scales'].shape)} ({per} zeros an int32)", int32)
        need("qweight", shape, "", int32)
        if "g_idx" in ps:
            need("g_idx", (k,), f"K={k}")
        return n, k
    # compressed-tensors
    if quant.fmt == "pack-quantized":
        per = 32 // quant.bits
        if k % per:
            raise CheckpointError(f"{prefix}.weight_packed: {k} input channels are not whole int32s of {per}")
        need("weight_packed", (n, k // per), "", int32)
    else:
        values = (ml_dtypes.float8_e4m3fn,) if quant.kind == "float" else (np.int8,)
        need("weight", (n, k), "", tuple(np.dtype(d) for d in values))
    scale = ps["weight_scale"]
    if quant.strategy == "tensor":
        if scale.size != 1:
            raise _shape_error(prefix, "weight_scale", scale, (1,), "one scale per tensor")
    else:
        need("weight_scale", (n, rows), why, floats)
    if "weight_zero_point" in ps:
        zp = ps["weight_zero_point"]
        # unpacked [N, K/g] (or one per tensor), or packed 32/bits an int32 along the outputs
        ok = {(n, rows), (-(-n // (32 // quant.bits)), rows)} if quant.strategy != "tensor" else {(1,), ()}
        if tuple(zp.shape) not in ok:
            raise _shape_error(prefix, "weight_zero_point", zp, (n, rows), why)
    if "weight_g_idx" in ps:
        need("weight_g_idx", (k,), f"K={k}")
    return n, k


def _act_order(ps: dict[str, np.ndarray], quant: HFQuantization) -> bool:
    """Whether a Linear's g_idx (GPTQ; compressed-tensors' weight_g_idx) groups its inputs out of order
    (reads only g_idx)."""
    g_idx = ps.get("g_idx", ps.get("weight_g_idx"))
    if g_idx is None or quant.group_size is None or g_idx.ndim != 1:
        return False
    return bool((np.asarray(g_idx) != np.arange(g_idx.shape[0]) // quant.group_size).any())


def decode(prefix: str, ps: dict[str, np.ndarray], quant: HFQuantization, scheme: QuantScheme) -> QuantizedTensor:
    """One quantized Linear's parts (shapes checked) -> its QuantizedTensor in `scheme`."""
    n, k = _check_shapes(prefix, ps, quant, scheme)
    rows = k // scheme.group(k)
    f32 = np.float32
    zeros = order = None
    if quant.method == "awq":
        q = _unpack(ps["qweight"], 4, axis=1)[:, _awq_outputs(n)]  # [K, N], 0..15
        z = _unpack(ps["qzeros"], 4, axis=1)[:, _awq_outputs(n)]
        values, scales, zeros = q.T - 8, ps["scales"].astype(f32), (z - 8).astype(f32)
    elif quant.method == "gptq":
        q = _unpack(ps["qweight"], quant.bits, axis=0)  # [K, N]
        z = _unpack(ps["qzeros"], quant.bits, axis=1) + (1 if quant.fmt == "gptq" else 0)  # v1 stores z - 1
        mid = 1 << (quant.bits - 1)
        scales = ps["scales"].astype(f32)
        if quant.symmetric:
            if (z != mid).any():
                r, c = np.argwhere(z != mid)[0]
                raise CheckpointError(f"{prefix}.qzeros: sym is set, but the zero of group {r}, output {c} is "
                                      f"{z[r, c]}, not {mid} ({quant.fmt} zeros)")
        else:
            zeros = (z - mid).astype(f32)
        values = q.T - mid
        order = _gptq_order(prefix, ps.get("g_idx"), k, rows, scheme)
        if order is not None:
            values = values[:, order]
    else:
        mid = 1 << (quant.bits - 1)
        if quant.fmt == "pack-quantized":
            values = _unpack(ps["weight_packed"], quant.bits, axis=1)[:, :k] - mid  # stored offset by 2^(bits-1)
        else:
            values = ps["weight"]
        scale = np.asarray(ps["weight_scale"], f32)
        scales = (np.full((1, n), scale.reshape(-1)[0], f32) if quant.strategy == "tensor"
                  else np.ascontiguousarray(scale.T))
        if "weight_zero_point" in ps:
            zp = np.asarray(ps["weight_zero_point"])
            if quant.strategy == "tensor":
                zp = np.full((n, 1), zp.reshape(-1)[0])
            elif zp.shape[0] != n:  # packed along the outputs (compressed-tensors >= 0.10), offset like the values
                zp = _unpack(zp, quant.bits, axis=0)[:n] - mid
            if scheme.zero_points:
                zeros = np.ascontiguousarray(zp.T).astype(f32)
            elif (zp != 0).any():
                raise CheckpointError(f"{prefix}.weight_zero_point: symmetric weights with non-zero zero points")
        order = _gptq_order(prefix, ps.get("weight_g_idx"), k, rows, scheme, "weight_g_idx")
        if order is not None:
            values = values[:, order]
    if scheme.act_order and order is None:
        order = np.arange(k)
    values = np.ascontiguousarray(values).astype(scheme.values_dtype)
    if zeros is None and scheme.zero_points:  # a Linear stored without zero points among ones with them
        zeros = np.zeros((rows, n), f32)
    return QuantizedTensor(values, np.ascontiguousarray(scales), zeros, scheme,
                           None if order is None else order.astype(np.int32))


def _gptq_order(prefix: str, g_idx, k: int, rows: int, scheme: QuantScheme, part: str = "g_idx"):
    """The permutation that sorts input channels by group (None: they already are), g_idx checked."""
    if g_idx is None:
        return None
    g_idx = np.asarray(g_idx).astype(np.int64)
    if ((g_idx < 0) | (g_idx >= rows)).any():
        raise CheckpointError(f"{prefix}.{part} names groups outside 0..{rows - 1}")
    g = k // rows
    if (g_idx == np.arange(k) // g).all():
        return None
    counts = np.bincount(g_idx, minlength=rows)
    if (counts != g).any():
        raise CheckpointError(f"{prefix}.{part}: group {int(np.argmax(counts != g))} has {int(counts[counts != g][0])} "
                              f"input channels, not {g}: the kernels' groups are of equal size")
    if not scheme.act_order:
        raise CheckpointError(f"{prefix}.{part} orders its inputs out of order, but the scheme is {scheme.name}")
    return np.argsort(g_idx, kind="stable")


def _unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> their 32/bits unsigned fields, lowest first, along `axis` (int16)."""
    words = np.moveaxis(np.ascontiguousarray(packed).view(np.uint32), axis, -1)  # [..., words]
    per = 32 // bits
    fields = (words[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    fields = fields.reshape(*words.shape[:-1], words.shape[-1] * per)  # field i of word c at c * per + i
    return np.moveaxis(fields, -1, axis).astype(np.int16)


def _awq_outputs(n: int) -> np.ndarray:
    """For each output of an AWQ tensor, its column among the unpacked nibbles."""
    inverse = np.argsort(AWQ_ORDER)  # output j of a word sits in nibble inverse[j]
    return (np.arange(n) // 8) * 8 + inverse[np.arange(n) % 8]


def _to_float(w: QuantizedTensor) -> np.ndarray:
    """A quantized Linear that is not a projection (the head) as float32 [out, in]."""
    n, k = w.shape
    rows = w.scales.shape[0]
    q = w.values.astype(np.float32).reshape(n, rows, k // rows)
    if w.zeros is not None:
        q = q - w.zeros.T[:, :, None]
    out = (q * w.scales.T[:, :, None]).reshape(n, k)
    if w.input_order is not None:
        out[:, w.input_order] = out.copy()
    return out
