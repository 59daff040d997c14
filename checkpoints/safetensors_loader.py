"""HF checkpoint directories: config.json + *.safetensors (single or sharded).

Pickle-based weights (.bin, .pt, .pth, .ckpt, .pkl) are refused: loading them
runs arbitrary code.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from jaxinfer.errors import CheckpointError
from jaxinfer.models import ModelConfig, config_from_hf

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path: pathlib.Path) -> None:
    raise CheckpointError(
        f"{path}: pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because "
        "loading them can execute arbitrary code; convert the model to safetensors or GGUF")


def read_config(directory: pathlib.Path) -> ModelConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not an HF checkpoint directory")
    try:
        hf = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    return config_from_hf(hf)


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(f"{directory} has no *.safetensors weight files")


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of one .safetensors file, memory-mapped.

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw data.
    """
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if data.size < 8:
        raise CheckpointError(f"{path} is truncated: {data.size} bytes")
    header_len = int(np.frombuffer(data[:8].tobytes(), "<u8")[0])
    if header_len > data.size - 8:
        raise CheckpointError(f"{path} is corrupt: header length {header_len} exceeds the file")
    try:
        header = json.loads(data[8:8 + header_len].tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its header is not JSON ({e})") from None
    base = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt or uses an unsupported dtype for {name!r}: "
                                  f"{info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize or base + end > data.size:
            raise CheckpointError(f"{path} is truncated or corrupt at tensor {name!r}")
        yield name, data[base + start:base + end].view(dtype).reshape(shape)


def iter_tensors(directory: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor of every shard, in the stored dtype."""
    for path in safetensors_files(directory):
        yield from read_safetensors(path)
