"""jaxinfer's own checkpoint format: params saved with Orbax, restored straight
into the target sharding.

Layout of a converted checkpoint directory:
    jaxinfer.json   format version, model config, parameter dtype
    params/         Orbax checkpoint of {"layers.0.attn.q_proj": array, ...}
    tokenizer/      tokenizer.json + tokenizer_config.json
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxinfer import params as params_lib
from jaxinfer.params import value_of
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

MARKER = "jaxinfer.json"
FORMAT_VERSION = 1


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save(directory: str | pathlib.Path, cfg: ModelConfig, state: nnx.State, tokenizer=None) -> None:
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists and is not empty; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    flat = {_key(p): value_of(v) for p, v in params_lib.flat_params(state).items()}
    dtype = str(next(iter(flat.values())).dtype)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", flat)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
    (directory / MARKER).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "dtype": dtype, "config": cfg.to_dict()}, indent=1))


def is_checkpoint(directory: pathlib.Path) -> bool:
    return (directory / MARKER).is_file()


def read_meta(directory: pathlib.Path) -> tuple[ModelConfig, str]:
    try:
        meta = json.loads((directory / MARKER).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{directory} has format version {meta.get('format_version')}, "
                                  f"this jaxinfer reads version {FORMAT_VERSION}")
        return ModelConfig.from_dict(meta["config"]), meta["dtype"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / MARKER} is malformed: {e}") from None


def restore(directory: str | pathlib.Path, mesh: Mesh, dtype=None
            ) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """Restore params with every array placed as the sharding rules say for `mesh`."""
    directory = pathlib.Path(directory).absolute()
    cfg, saved_dtype = read_meta(directory)
    graphdef, abstract = params_lib.abstract_model(cfg, jax.numpy.dtype(saved_dtype))
    shardings = params_lib.param_shardings(abstract, mesh)
    flat = params_lib.flat_params(abstract)
    target = {_key(p): jax.ShapeDtypeStruct(value_of(v).shape, value_of(v).dtype, sharding=shardings[p])
              for p, v in flat.items()}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / "params", target)
    except Exception as e:  # orbax raises many types for missing or mismatched data
        raise CheckpointError(f"cannot restore params from {directory / 'params'}: {e}") from None
    for p, v in flat.items():
        value = restored[_key(p)]
        if dtype is not None and value.dtype != jax.numpy.dtype(dtype):
            value = jax.jit(lambda x: x.astype(dtype), out_shardings=shardings[p])(value)
        flat[p] = v.replace(value)
    return cfg, graphdef, nnx.from_flat_state(flat)
