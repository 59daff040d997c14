"""Read a GGUF file: metadata -> model config, tensors -> HF-named float32 arrays.

`open_gguf` maps the file, reads its metadata and tensor infos, and turns every
way a file can be unreadable into a `CheckpointError` naming the file. The model
family of `general.architecture` (jaxinfer/models/) knows the rest:
`gguf_model_config` maps the `{arch}.*` metadata onto its config, and
`gguf_hf_tensors` dequantizes each tensor and yields it under its transformers
name and layout (undoing llama.cpp's reordering where the family has one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from checkpoints.gguf_quants import dequantize_tensor, qtype_name
from jaxinfer import models
from jaxinfer.errors import CheckpointError
from jaxinfer.models import ModelConfig

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types (the file format's numbering).
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
            11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_FLOAT32 = 6


class _Truncated(Exception):
    pass


class _Parser:
    """Reads GGUF's header, metadata and tensor infos straight from the mapped bytes.

    (gguf-py's reader builds an object per array element: for a 49k-token vocabulary and
    its merges that is most of a second of every start; this reads them in one pass.)"""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise _Truncated(f"needs {self.pos + n} bytes")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> str:
        return bytes(self.take(self.u64())).decode("utf-8", errors="surrogateescape")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, count = self.u32(), self.u64()
            if sub == _STRING:
                return self.strings(count)
            if sub == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_SCALARS[sub])
            return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
        dtype = np.dtype(_SCALARS[kind])
        value = np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()
        if kind == _FLOAT32:  # shortest decimal that round-trips: 1e-05, not 9.99e-06
            value = float(str(np.float32(value)))
        return value

    def strings(self, count: int) -> list[str]:
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated(f"needs {pos + 8} bytes")
            n = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
            if pos + n > end:
                raise _Truncated(f"needs {pos + n} bytes")
            out.append(str(buf[pos:pos + n], "utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file: `shape` in GGUF order (`ne`, the row first), `data` its bytes
    (uint8 `[rows, bytes_per_row]`; for F16/F32/BF16... the typed view), as gguf-py gives them."""

    name: str
    tensor_type: int
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


def _read(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    data = np.memmap(path, mode="r")
    p = _Parser(memoryview(data.view(np.ndarray)))
    p.take(4)  # magic, checked by the caller
    version = p.u32()
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = p.u64(), p.u64()
    metadata = {}
    for _ in range(n_kv):
        key = p.string()
        metadata[key] = p.value(p.u32())
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        dims = [p.u64() for _ in range(p.u32())]
        infos.append((name, dims, p.u32(), p.u64()))
    align = int(metadata.get("general.alignment", 32))
    start = -(-p.pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_elements = math.prod(dims)
        n_bytes = n_elements * type_size // block
        at = start + offset
        if at + n_bytes > len(data):
            raise _Truncated(f"tensor {name!r} needs bytes up to offset {at + n_bytes}")
        raw = data[at:at + n_bytes].view(np.ndarray)
        rows = list(reversed(dims))
        typed = _TYPED.get(qtype)
        arr = raw.view(typed).reshape(rows) if typed else raw.reshape(*rows[:-1], -1)
        tensors[name] = GGUFTensor(name, qtype, np.array(dims, np.uint64), n_elements, n_bytes, at, arr)
    return metadata, tensors


_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFFile:
    """An opened GGUF file.

    path: the file; architecture: `general.architecture`; metadata: key -> plain
    Python value (str, int, float, bool, list); tensors: name -> GGUFTensor.
    """

    def __init__(self, path: pathlib.Path, metadata: dict[str, Any], tensors: dict[str, GGUFTensor]):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.architecture: str | None = self.metadata.get("general.architecture")

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    @property
    def tensor_types(self) -> dict[str, str]:
        """Tensor name -> GGML type name ("Q4_1", "F32", ...)."""
        return {name: qtype_name(t.tensor_type) for name, t in self.tensors.items()}

    def array(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, in its logical numpy shape."""
        try:
            return dequantize_tensor(self.tensors[name])
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Logical numpy shape of a tensor (GGUF `ne` reversed): [out, in] for a Linear."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self)})"

    def close(self) -> None:
        """Drop the mmap (arrays already yielded are copies and stay valid)."""
        self.tensors = {}

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; any unreadable file raises CheckpointError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < len(GGUF_MAGIC):
        raise CheckpointError(f"{path} is not a GGUF file: it is only {size} bytes long")
    if head != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {head!r}, "
                              f"not the magic {GGUF_MAGIC!r}")
    try:
        metadata, tensors = _read(path)
    except _Truncated as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): it {e}") from None
    except Exception as e:  # unknown types, bad UTF-8 lengths, ... on bad bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): the GGUF "
                              f"reader failed with {type(e).__name__}: {e}") from None
    return GGUFFile(path, metadata, tensors)


# --- config ----------------------------------------------------------------------------

def gguf_model_config(f: GGUFFile) -> ModelConfig:
    """The model config from the file's metadata, by the family of `general.architecture`."""
    return models.config_from_gguf(f)


# --- tensors ----------------------------------------------------------------------------

def _hf_names(f: GGUFFile) -> dict[str, str]:
    hf_name = models.gguf_family(f.architecture).gguf_hf_name
    names, unknown = {}, []
    for name in f.tensors:
        try:
            hf = hf_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if hf is not None:
            names[name] = hf
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{f.path}: tensors jaxinfer does not know for "
                              f"{f.architecture}: {shown}")
    return names


def gguf_tensor_count(f: GGUFFile) -> int:
    """How many tensors `gguf_hf_tensors` yields (for a progress bar)."""
    return len(_hf_names(f))


def gguf_hf_tensors(f: GGUFFile, keep_quantized: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF layout) for every weight, in file order.

    Linear weights are `[out_features, in_features]`, embeddings `[vocab, hidden]`,
    norms and biases `[n]`. Unknown tensor names raise CheckpointError before any work.
    With `keep_quantized`, each projection (HF names matching PROJECTION) and the output head (`output_head`:
    output.weight, or token_embd.weight where tied) stored in a type a scheme holds exactly
    (gguf_repack.KEPT) comes as a QuantizedTensor, repacked from its blocks (checkpoints/gguf_repack.py),
    not as floats; the others come dequantized.
    """
    from checkpoints import gguf_repack

    names = _hf_names(f)
    cfg = gguf_model_config(f)
    to_hf = models.family(cfg).gguf_to_hf
    head = output_head(cfg)
    for name, hf in names.items():
        t = f.tensors[name]
        try:
            if (keep_quantized and (PROJECTION.search(hf) or hf == head)
                    and gguf_repack.scheme_of(t.tensor_type) is not None):
                w = gguf_repack.repack(t.data, t.tensor_type, f.tensor_shape(name), name=name)
                w = w.with_rows(lambda a, name=name: to_hf(cfg, name, a))
            else:
                w = to_hf(cfg, name, f.array(name))
        except CheckpointError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        yield hf, w


PROJECTION = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")  # HF names of the quantizable Linears


def output_head(cfg) -> str:
    """The HF name of the tensor the output head multiplies by: the token embedding where they are tied."""
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


def gguf_kept_quantization(f: GGUFFile):
    """How `quantization="gguf"` holds `f`'s projections as they are stored: one QuantScheme where every
    projection is of one kept type (a Q4_0 file) and the output head is float, else a
    params.MixedQuantization with each projection's scheme (a Q4_K_M file: Q4_K -> int4-g32-zp, Q6_K ->
    int8-g16), None for those of a type no scheme holds exactly (Q2_K, Q3_K, IQ*, F16, ...), which stay
    float Linears of the dequantized weights. An output head of a kept type (`output_head`: a Q8_0
    token_embd, Q6_K output) is kept too, as llama.cpp runs it: the plan's "lm_head", or "embed" where the
    head is the tied embedding. A CheckpointError where no projection is of a kept type."""
    from checkpoints import gguf_repack
    from jaxinfer.params import MixedQuantization

    cfg = gguf_model_config(f)
    hf_param = models.family(cfg).hf_param
    projections: list[tuple[str, object]] = []
    head: list[tuple[str, object]] = []
    types: dict[str, list[str]] = {}
    for name, hf in _hf_names(f).items():
        qtype = f.tensors[name].tensor_type
        if hf == output_head(cfg) and gguf_repack.scheme_of(qtype) is not None:
            placed = hf_param(cfg, hf, _UNREAD)  # ("embed", "weight") tied, ("lm_head", "weight") not
            head.append((".".join(map(str, placed[0][:-1])), gguf_repack.scheme_of(qtype)))
        if not PROJECTION.search(hf):
            continue
        placed = hf_param(cfg, hf, _UNREAD)  # (parameter path, _UNREAD): where the projection goes
        if placed is None:
            continue
        projections.append((".".join(map(str, placed[0][:-1])), gguf_repack.scheme_of(qtype)))
        types.setdefault(qtype_name(qtype), []).append(name)
    listing = "; ".join(f"{t}: {', '.join(ns[:3])}{' ...' if len(ns) > 3 else ''}" for t, ns in types.items())
    schemes = {s for _, s in projections}
    if schemes - {None} and len(schemes) == 1 and not head:
        return schemes.pop()
    if not schemes - {None}:
        raise CheckpointError(f"{f.path}: quantization 'gguf' keeps projections stored in "
                              f"{', '.join(gguf_repack.KEPT)}; this file has {listing}. Load it without "
                              "a quantization (dequantized), or with int8 / int4 to requantize")
    floats = [t for t in types if t not in gguf_repack.KEPT]
    if floats:
        log.info("%s: projections of %s are dequantized (float); the others kept as stored",
                 f.path.name, ", ".join(floats))
    return MixedQuantization(tuple(projections + head), "gguf")


class _Unread:
    """Stands in for a projection's weight where only its parameter path is asked (not an ndarray: a family's
    hf_param passes it through as it does a QuantizedTensor)."""


_UNREAD = _Unread()
