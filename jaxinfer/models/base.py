"""What every model family shares: the config fields each one has, and the family interface.

A family is one module in jaxinfer/models/ (llama.py is the example) with:

    ARCHITECTURES       names it runs: HF `model_type`, GGUF `general.architecture`,
                        and the value of `Config.architecture`
    HF_ARCHITECTURES    HF `architectures` entry -> one of ARCHITECTURES
    GGUF_ARCHITECTURES  the subset of ARCHITECTURES it loads from GGUF files
    Config              a ModelConfig subclass, with `from_hf(hf, architecture)` (config.json)
                        and `from_gguf(f)` (an opened checkpoints.gguf_loader.GGUFFile)
    hf_param(cfg, name, tensor)   an HF tensor -> (parameter path, array in our layout),
                        None for tensors the model does not use
    gguf_hf_name(name)  a GGUF tensor name -> its HF name, None to skip, KeyError if unknown
    gguf_to_hf(cfg, name, tensor) a dequantized GGUF tensor in HF layout (undoing llama.cpp's
                        reordering, if any); these two (and Config.from_gguf) only where
                        GGUF_ARCHITECTURES is not empty
    cache_entries(cfg)  what one token keeps in each layer's KV cache (jaxinfer.layers.kv)
    hf_tensors(cfg, tensors)  optional: the (HF name, tensor) stream regrouped before hf_param
                        (per-expert tensors stacked: jaxinfer/models/moe_names.py)
    Model               the Flax NNX module: Model(cfg, dtype=, rngs=)(batch, cache) -> logits, cache

and a line in jaxinfer/models/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxinfer.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every family's config has. Families subclass it and add their own."""

    architecture: str  # one of the family's ARCHITECTURES; the registry finds the family by it
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_layers",
                                           "max_position_embeddings")

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values (a family extends this)."""
        problems = []
        for name in self.POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict (a family with nested fields overrides it)."""
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


def hf_common(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields from a transformers config.json (KeyError/ValueError if malformed)."""
    eos = hf.get("eos_token_id")
    return {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    }
