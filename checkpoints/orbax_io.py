"""jaxinfer's own checkpoint format: params saved with Orbax, restored straight
into the target sharding.

Layout of a converted checkpoint directory:
    jaxinfer.json   format version, model config, compute dtype
    params/         Orbax checkpoint of {"layers.0.attn.q_proj.weight": array, ...}, each
                    array in its parameter's declared dtype
    tokenizer/      tokenizer.json + tokenizer_config.json

Format version 2: parameters are named by their module path (`q_proj.weight`,
`q_proj.bias`); version 1 named them `q_proj`, `q_bias` and is refused (convert
the source checkpoint again).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxinfer import params as params_lib
from jaxinfer.errors import CheckpointError
from jaxinfer.models import ModelConfig, config_from_dict
from jaxinfer.params import MixedQuantization, value_of

MARKER = "jaxinfer.json"
FORMAT_VERSION = 2


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save(directory: str | pathlib.Path, model) -> None:
    """Write `model` (a checkpoints.loader.LoadedModel) as a jaxinfer checkpoint."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists and is not empty; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    flat = {_key(p): value_of(v) for p, v in params_lib.flat_params(model.state).items()}
    import orbax.checkpoint as ocp  # only for Orbax checkpoints: a second of import otherwise

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", flat)
    if model.tokenizer is not None:
        model.tokenizer.save(directory / "tokenizer")
    (directory / MARKER).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "dtype": str(np.dtype(model.dtype)),
         "quantization": None if model.quantization is None else model.quantization.name,
         **({"projections": model.quantization.to_json()} if isinstance(model.quantization, MixedQuantization)
            else {}),
         "config": model.config.to_dict()}, indent=1))


def is_checkpoint(directory: pathlib.Path) -> bool:
    return (directory / MARKER).is_file()


def read_meta(directory: pathlib.Path) -> tuple[ModelConfig, str, object]:
    """(model config, compute dtype name, QuantScheme, MixedQuantization or None) of a jaxinfer checkpoint.
    A scheme per projection is recorded under "projections" ("quantization" then only names it)."""
    from pallas_kernels.quantized_matmul import parse

    try:
        meta = json.loads((directory / MARKER).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{directory} has format version {meta.get('format_version')}, "
                                  f"this jaxinfer reads version {FORMAT_VERSION}: convert the "
                                  "source checkpoint again with `jaxinfer convert`")
        quantization = (MixedQuantization.from_json(meta["projections"]) if "projections" in meta
                        else parse(meta.get("quantization")))
        return config_from_dict(meta["config"]), meta["dtype"], quantization
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory / MARKER} is malformed: {e}") from None


def _check_stored(stored, target: dict, directory: pathlib.Path, quantization) -> None:
    """Refuse, naming the tensor, a stored array whose shape or dtype is not the one the recorded
    config and quantization declare: orbax would cast it (int8 levels read as int4, say) or fail deep
    inside. Floats may differ in dtype (a float checkpoint restores into another compute dtype)."""
    for key, want in target.items():
        have = stored.get(key) if hasattr(stored, "get") else None
        if have is None:
            raise CheckpointError(f"{directory / 'params'} lacks the tensor {key}")
        shape, dtype = tuple(getattr(have, "shape", ()) or ()), np.dtype(getattr(have, "dtype", want.dtype))
        kind = "quantized " if key.rsplit(".", 1)[-1] in ("values", "scales", "zeros") else ""
        if shape != tuple(want.shape) or (kind and dtype != np.dtype(want.dtype)):
            scheme = f" for {quantization.name}" if quantization is not None else ""
            raise CheckpointError(f"{directory / 'params'}: {kind}tensor {key} is {dtype.name}{list(shape)}; "
                                  f"the recorded config{scheme} declares {np.dtype(want.dtype).name}"
                                  f"{list(want.shape)}")


def restore(directory: str | pathlib.Path, mesh: Mesh, dtype=None
            ) -> tuple[ModelConfig, nnx.GraphDef, nnx.State, np.dtype, object]:
    """Restore params with every array placed as the sharding rules say for `mesh`.
    dtype: the compute dtype to build the model for (None: the saved one); each array is
    cast to its parameter's declared dtype. Returns (config, graphdef, state, compute dtype,
    QuantScheme or None)."""
    directory = pathlib.Path(directory).absolute()
    cfg, saved_dtype, quantization = read_meta(directory)
    dtype = np.dtype(saved_dtype if dtype is None else dtype)
    try:
        _, saved = params_lib.abstract_model(cfg, np.dtype(saved_dtype), quantization)
        graphdef, abstract = params_lib.abstract_model(cfg, dtype, quantization)
    except ValueError as e:  # a projection the recorded scheme cannot hold, named
        raise CheckpointError(f"{directory / MARKER} records {quantization.name} weights, which this model "
                              f"cannot hold: {e}") from None
    shardings = params_lib.param_shardings(abstract, mesh)
    flat = params_lib.flat_params(abstract)
    target = {_key(p): jax.ShapeDtypeStruct(value_of(v).shape, value_of(v).dtype, sharding=shardings[p])
              for p, v in params_lib.flat_params(saved).items()}
    try:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(directory / "params")
            _check_stored(getattr(stored, "item_metadata", stored), target, directory, quantization)
            restored = checkpointer.restore(directory / "params", target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for missing or mismatched data
        raise CheckpointError(f"cannot restore params from {directory / 'params'}: {e}") from None
    for p, v in flat.items():
        value, declared = restored[_key(p)], value_of(v).dtype
        if value.dtype != declared:
            value = jax.jit(lambda x, d=declared: x.astype(d), out_shardings=shardings[p])(value)
        flat[p] = v.replace(value)
    return cfg, graphdef, nnx.from_flat_state(flat), dtype, quantization
