"""jaxinfer: a JAX/XLA inference engine for large language models."""

import importlib

__all__ = ["LLM", "SamplingParams"]

# Imported on first use, so `import jaxinfer` (and with it jaxinfer.core and the gRPC client)
# stays light: only LLM brings in jax.
_LAZY = {"LLM": "jaxinfer.llm", "SamplingParams": "jaxinfer.core.sampling_params"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
