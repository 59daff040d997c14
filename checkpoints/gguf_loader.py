"""Read a GGUF file: metadata -> model config, tensors -> HF-named float32 arrays.

`open_gguf` wraps `gguf.GGUFReader` (which mmaps the file) and turns every way a
file can be unreadable into a `CheckpointError` naming the file. The model
family of `general.architecture` (jaxinfer/models/) knows the rest:
`gguf_model_config` maps the `{arch}.*` metadata onto its config, and
`gguf_hf_tensors` dequantizes each tensor and yields it under its transformers
name and layout (undoing llama.cpp's reordering where the family has one).
"""

from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from gguf import GGUFReader, GGUFValueType

from checkpoints.gguf_quants import dequantize_tensor, qtype_name
from jaxinfer import models
from jaxinfer.errors import CheckpointError
from jaxinfer.models import ModelConfig

GGUF_MAGIC = b"GGUF"

class _FastReader(GGUFReader):
    """GGUFReader whose small reads slice a plain ndarray view of the mmap.

    Slicing the `np.memmap` itself runs memmap's Python `__array_finalize__` on each
    of the ~250k metadata reads of a 50k-token vocabulary; the plain view is ~4x faster.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


# Use the fast path only while gguf-py's private `_get` keeps the signature it overrides.
_Reader = _FastReader if list(inspect.signature(GGUFReader._get).parameters) == [
    "self", "offset", "dtype", "count", "override_order"] else GGUFReader


class GGUFFile:
    """An opened GGUF file.

    path: the file; architecture: `general.architecture`; metadata: key -> plain
    Python value (str, int, float, bool, list); tensors: name -> `gguf.ReaderTensor`.
    """

    def __init__(self, path: pathlib.Path, reader: GGUFReader):
        self.path = path
        self.reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):  # version and counts, not metadata
                self.metadata[key] = _field_value(field)
        self.tensors = {t.name: t for t in reader.tensors}
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
        self.reader = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _field_value(field) -> Any:
    """A GGUF metadata field as a plain Python value (strings decoded as UTF-8)."""
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="surrogateescape")
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape")
                    for i in field.data]
        if sub == GGUFValueType.ARRAY:  # nested arrays: rare; keep gguf-py's flattening
            return field.contents()
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    value = field.parts[-1].tolist()[0]
    if kind == GGUFValueType.FLOAT32:  # shortest decimal that round-trips: 1e-05, not 9.99e-06
        value = float(str(np.float32(value)))
    return value


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
        reader = _Reader(path, "r")
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/... on bad bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): the GGUF "
                              f"reader failed with {type(e).__name__}: {e}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                  f"offset {end}, but the file has {size}")
    try:
        return GGUFFile(path, reader)
    except Exception as e:
        raise CheckpointError(f"{path} has corrupt metadata: {type(e).__name__}: {e}") from None


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


def gguf_hf_tensors(f: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF layout) for every weight, in file order.

    Linear weights are `[out_features, in_features]`, embeddings `[vocab, hidden]`,
    norms and biases `[n]`. Unknown tensor names raise CheckpointError before any work.
    """
    names = _hf_names(f)
    cfg = gguf_model_config(f)
    to_hf = models.family(cfg).gguf_to_hf
    for name, hf in names.items():
        w = f.array(name)
        try:
            w = to_hf(cfg, name, w)
        except CheckpointError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        yield hf, w
