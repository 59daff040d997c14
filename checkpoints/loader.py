"""Load any supported checkpoint: pick the reader by what the path holds.

    None                      -> the default model (downloaded once, cached)
    *.gguf file               -> GGUF (quantized tensors dequantized to the compute dtype)
    directory with jaxinfer.json -> jaxinfer's Orbax format (restored into the sharding)
    directory with config.json   -> HF safetensors (single file or sharded with an index)
    .bin / .pt / ... pickles  -> refused
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from checkpoints import hf_names, orbax_io, safetensors_loader
from jaxinfer import params as params_lib
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: object | None  # jaxinfer.tokenizer.Tokenizer
    source: str


def _is_gguf(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load(path: str | pathlib.Path | None, *, dtype, mesh: Mesh, progress: bool = True) -> LoadedModel:
    from jaxinfer.tokenizer import Tokenizer

    if path is None:
        from checkpoints.default_model import default_model_path
        path = default_model_path(progress=progress)
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in safetensors_loader.PICKLE_SUFFIXES:
            safetensors_loader.refuse_pickle(path)
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path} is a bare safetensors file: pass the directory that "
                                  "holds it together with config.json")
        if path.suffix == ".gguf" or _is_gguf(path):
            return _load_gguf(path, dtype, mesh, progress)
        raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint directory")
    if orbax_io.is_checkpoint(path):
        cfg, graphdef, state = orbax_io.restore(path, mesh, dtype)
        tok_dir = path / "tokenizer"
        tokenizer = Tokenizer.from_hf_dir(tok_dir) if tok_dir.is_dir() else None
        return LoadedModel(cfg, graphdef, state, tokenizer, str(path))
    cfg = safetensors_loader.read_config(path)
    tensors = safetensors_loader.iter_tensors(path)
    tensors = tqdm(tensors, desc="loading weights", unit=" tensors", disable=not progress)
    graphdef, state = params_lib.place_params(cfg, dtype, mesh, hf_names.convert_all(cfg, tensors))
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: text prompts cannot be used with it", path)
    return LoadedModel(cfg, graphdef, state, tokenizer, str(path))


def _load_gguf(path: pathlib.Path, dtype, mesh: Mesh, progress: bool) -> LoadedModel:
    from checkpoints.gguf_loader import gguf_hf_tensors, gguf_model_config, open_gguf
    from jaxinfer.tokenizer import Tokenizer

    gguf = open_gguf(path)
    cfg = gguf_model_config(gguf)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    tensors = tqdm(gguf_hf_tensors(gguf), desc="loading GGUF", unit=" tensors",
                   total=len(gguf.tensor_names), disable=not progress)
    graphdef, state = params_lib.place_params(cfg, dtype, mesh, hf_names.convert_all(cfg, tensors))
    return LoadedModel(cfg, graphdef, state, tokenizer, str(path))
