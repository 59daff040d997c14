"""Model families by architecture name. Each family module provides a Flax NNX
`Model` class and `cache_entries(cfg)` (what one token stores in the KV cache)."""

from __future__ import annotations

from types import ModuleType

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.models import llama

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "qwen3": llama,
}


def family(cfg: ModelConfig) -> ModuleType:
    try:
        return FAMILIES[cfg.architecture]
    except KeyError:
        raise ConfigError(f"unknown architecture {cfg.architecture!r}: jaxinfer supports "
                          f"{', '.join(sorted(FAMILIES))}") from None
