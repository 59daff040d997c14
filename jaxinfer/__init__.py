"""jaxinfer: a JAX/XLA inference engine for large language models."""

import importlib
import os

__all__ = ["LLM", "SamplingParams"]

# Imported on first use, so `import jaxinfer` (and with it jaxinfer.core and the gRPC client)
# stays light: only LLM brings in jax.
_LAZY = {"LLM": "jaxinfer.llm", "SamplingParams": "jaxinfer.core.sampling_params"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")


# XLA on CUDA runs each compiled step as CUDA graphs, but by default a graph ends at every while loop,
# and the host then drives the rest kernel by kernel. MLA's XLA attention has one loop per layer: with
# loops and conditionals inside the graphs, DeepSeek-V2-Lite's batch-1 step on an H200 went from 6.73
# to 4.26 ms (docs/benchmarks.md). Set before any backend starts; a user's own setting of the flag wins.
_COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"
if _COMMAND_BUFFER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COMMAND_BUFFER_FLAG}=+WHILE,+CONDITIONAL".strip()
