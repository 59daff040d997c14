"""Load any supported checkpoint: pick the reader by what the path holds.

    None                      -> the default model (downloaded once, cached)
    *.gguf file               -> GGUF (quantized tensors dequantized, then cast like any other; or,
                                 with quantization="gguf", projections kept as the file quantizes them)
    directory with jaxinfer.json -> jaxinfer's Orbax format (restored into the sharding)
    directory with config.json   -> HF safetensors (single file or sharded with an index); one
                                    quantized by AWQ, GPTQ or compressed-tensors keeps its
                                    quantization (checkpoints/hf_quantized.py)
    .bin / .pt / ... pickles  -> refused

Every reader hands over tensors; each becomes the parameter its model family
names (jaxinfer/models/), cast to that parameter's declared dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from checkpoints import hf_quantized, orbax_io, safetensors_loader
from checkpoints.quantized_tensor import QuantizedTensor
from jaxinfer import params as params_lib
from jaxinfer.errors import CheckpointError
from jaxinfer.models import ModelConfig, family

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: object | None  # jaxinfer.tokenizer.Tokenizer
    source: str
    dtype: Any = dataclasses.field(kw_only=True)  # the compute dtype the model was built for
    # QuantScheme of its projections, a params.MixedQuantization (a scheme per projection: a GGUF Q4_K_M file kept
    # quantized), or None
    quantization: Any = dataclasses.field(default=None, kw_only=True)
    # A trained draft head's: the target layers whose hidden states it reads (jaxinfer/spec_decode/draft_head.py)
    feature_layers: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self):
        self.dtype = np.dtype(self.dtype)

    @property
    def kv_cache_dtype(self) -> np.dtype:
        """The dtype of the KV-cache pages: the compute dtype (no cache dtype is configurable yet)."""
        return self.dtype


def hf_params(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]]
              ) -> Iterator[tuple[tuple, np.ndarray]]:
    """(HF name, array) -> (parameter path, array in the model's layout), by the family's names."""
    fam = family(cfg)
    hf_param = fam.hf_param
    if hasattr(fam, "hf_tensors"):  # tensors the family regroups first (per-expert ones stacked)
        tensors = fam.hf_tensors(cfg, tensors)
    for name, t in tensors:
        converted = hf_param(cfg, name, t if isinstance(t, QuantizedTensor) else np.asarray(t))
        if converted is not None:
            yield converted


def _is_gguf(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def quantization_spec(spec):
    """`quantization` as the loader takes it: None, a QuantScheme, or "gguf" (a GGUF file's own). A
    ValueError names what is wrong."""
    from pallas_kernels.quantized_matmul import parse

    if isinstance(spec, str) and spec.lower() == "gguf":
        return "gguf"
    try:
        return parse(spec)
    except ValueError as e:
        raise ValueError(f"{e} (or gguf, a GGUF file's own quantization kept)") from None


def load(path: str | pathlib.Path | None, *, dtype, mesh: Mesh, progress: bool = True,
         quantization=None) -> LoadedModel:
    """`quantization`: None (the checkpoint as it is: float weights, or those an AWQ / GPTQ /
    compressed-tensors checkpoint holds, kept quantized), or "int8", "int4" (group 128),
    "fp8", "int4-g64-zp", ... (pallas_kernels.quantized_matmul.parse): every projection but
    the output head is quantized on the host as it loads. "gguf" (a GGUF file only): its
    projections stay as the file quantizes them (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), repacked level for
    level, each in its own scheme where the file mixes types (Q4_K_M); a projection of another type
    (Q3_K, IQ*, ...) is dequantized and stays float.
    A checkpoint that comes quantized is refused with any other quantization than its own."""
    from jaxinfer.tokenizer import Tokenizer

    try:
        quantization = quantization_spec(quantization)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    keep_gguf = quantization == "gguf"
    quantization = None if keep_gguf else quantization

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
            return _load_gguf(path, dtype, mesh, progress, quantization, keep_gguf)
        raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint directory")
    if keep_gguf:
        raise CheckpointError(f"{path}: quantization 'gguf' keeps a GGUF file's own quantization; this is not "
                              "a GGUF file")
    if orbax_io.is_checkpoint(path):
        cfg, graphdef, state, dtype, saved = orbax_io.restore(path, mesh, dtype)
        if quantization is not None and quantization != saved:
            raise CheckpointError(f"{path} holds {saved.name + ' ' if saved else 'float '}weights: load it "
                                  f"without a quantization, or convert its source again with {quantization.name}")
        tok_dir = path / "tokenizer"
        tokenizer = Tokenizer.from_hf_dir(tok_dir) if tok_dir.is_dir() else None
        return LoadedModel(cfg, graphdef, state, tokenizer, str(path), dtype=dtype, quantization=saved)
    cfg = safetensors_loader.read_config(path)
    tensors = safetensors_loader.iter_tensors(path)
    stored = hf_quantized.read_quantization(path)
    kept = None
    if stored is not None:
        kept, tensors = hf_quantized.kept_tensors(tensors, stored)
    if kept is not None:
        if quantization is not None and quantization != kept:
            raise CheckpointError(f"{path} holds {stored.method} weights, {kept.name}: load it without a "
                                  f"quantization (or with {kept.name}); quantized weights are not requantized")
        quantization = kept
        log.info("%s: projections kept as stored (%s), %s", path.name, stored.method, kept.name)
    else:
        quantization = params_lib.fit_quantization(cfg, dtype, quantization)
    tensors = tqdm(tensors, desc="loading weights", unit=" tensors", disable=not progress)
    graphdef, state = params_lib.place_params(cfg, dtype, mesh, hf_params(cfg, tensors), quantization)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: text prompts cannot be used with it", path)
    return LoadedModel(cfg, graphdef, state, tokenizer, str(path), dtype=dtype, quantization=quantization)


def _load_gguf(path: pathlib.Path, dtype, mesh: Mesh, progress: bool, quantization=None,
               keep_gguf: bool = False) -> LoadedModel:
    from checkpoints.gguf_loader import gguf_hf_tensors, gguf_kept_quantization, gguf_model_config, open_gguf
    from jaxinfer.tokenizer import Tokenizer

    gguf = open_gguf(path)
    cfg = gguf_model_config(gguf)
    if keep_gguf:
        quantization = gguf_kept_quantization(gguf)
        log.info("%s: projections kept as stored, %s", path.name, quantization.name)
    else:
        quantization = params_lib.fit_quantization(cfg, dtype, quantization)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    tensors = tqdm(gguf_hf_tensors(gguf, keep_quantized=keep_gguf), desc="loading GGUF", unit=" tensors",
                   total=len(gguf.tensor_names), disable=not progress)
    graphdef, state = params_lib.place_params(cfg, dtype, mesh, hf_params(cfg, tensors), quantization)
    return LoadedModel(cfg, graphdef, state, tokenizer, str(path), dtype=dtype, quantization=quantization)
