"""Model families and the registry from architecture names to them.

Each family is one module (its config, weight names, KV-cache entries and
forward pass; the interface is in base.py). Adding a family is one new file
and one entry in FAMILIES.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jaxinfer.errors import ConfigError
from jaxinfer.models import deepseek, llama, mixtral, qwen3_moe
from jaxinfer.models.base import ModelConfig
from jaxinfer.models.llama import LlamaConfig

__all__ = ["FAMILIES", "LlamaConfig", "ModelConfig", "config_from_dict", "config_from_gguf",
           "config_from_hf", "family", "gguf_family"]

FAMILIES: tuple[ModuleType, ...] = (
    llama,
    deepseek,
    qwen3_moe,
    mixtral,
)

_BY_ARCHITECTURE = {name: f for f in FAMILIES for name in f.ARCHITECTURES}
_BY_HF_ARCHITECTURE = {hf: name for f in FAMILIES for hf, name in f.HF_ARCHITECTURES.items()}
_GGUF_ARCHITECTURES = [name for f in FAMILIES for name in f.GGUF_ARCHITECTURES]


def family(cfg: ModelConfig | str) -> ModuleType:
    """The family module that runs `cfg` (a config or an architecture name)."""
    name = cfg if isinstance(cfg, str) else cfg.architecture
    try:
        return _BY_ARCHITECTURE[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}: jaxinfer supports "
                          f"{', '.join(sorted(_BY_ARCHITECTURE))}") from None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The config of a transformers config.json: the family by its `architectures`
    entries, else by `model_type`."""
    name = next((_BY_HF_ARCHITECTURE[a] for a in hf.get("architectures") or []
                 if a in _BY_HF_ARCHITECTURE), None)
    if name is None and hf.get("model_type") in _BY_ARCHITECTURE:
        name = hf["model_type"]
    if name is None:
        given = hf.get("architectures") or hf.get("model_type") or "nothing"
        raise ConfigError(f"unknown architecture {given!r}: jaxinfer supports "
                          f"{', '.join(sorted(_BY_HF_ARCHITECTURE))}")
    try:
        return family(name).Config.from_hf(hf, name)
    except KeyError as e:
        raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed field: {e}") from None


def gguf_family(architecture: str | None) -> ModuleType:
    """The family that loads GGUF files of `general.architecture` = `architecture`."""
    if architecture not in _GGUF_ARCHITECTURES:
        raise ConfigError(f"unknown architecture {architecture!r}: jaxinfer supports "
                          f"{', '.join(_GGUF_ARCHITECTURES)}")
    return family(architecture)


def config_from_gguf(f) -> ModelConfig:
    """The config of an opened GGUF file (checkpoints.gguf_loader.GGUFFile), by its
    `general.architecture`."""
    config_class = gguf_family(f.architecture).Config
    try:
        return config_class.from_gguf(f)
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"{f.path}: malformed GGUF metadata: {e}") from None


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of `cfg.to_dict()` for any family."""
    return family(d["architecture"]).Config.from_dict(d)
